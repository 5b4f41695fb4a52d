"""MoE expert-matmul benchmark (issue 6): the grouped Pallas kernels (pallas_kernels/moe/) against
`jax.lax.ragged_dot` (entries sorted by expert, group sizes) and a dense all-experts product, at
Qwen3-30B-A3B's MoE shapes (E=128, top-8, hidden 2048, ff 768, bf16), near-uniform random routing.

    python bench/moe.py --out bench/results --commit $(git rev-parse --short HEAD)
    python bench/moe.py --sweep --tokens 1 64 4096 --out bench/results     # tiles per kernel
    python bench/moe.py --smoke --out /tmp/x                                # tiny, CPU (interpret)
    python bench/moe.py --format Q4_K --out bench/results                   # quantized expert stacks
    python bench/moe.py --format Q4_K --sweep --tokens 1 4096               # their kernels' tiles
    python bench/moe.py --format Q4_K --smoke --out /tmp/x                  # tiny, CPU (interpret)

prefill: one MoE layer (x -> x + moe(x)) at 8, 64, 512, 4096 tokens; seconds per layer from one
    jitted fori_loop over distinct routings (median of several runs); ratios against the grouped
    kernels; the grouped output's error against the dense product, checked first.
    dense:      every expert on every token as plain GEMMs over [E*F, H] views of the stacks (arranged
                once, outside the timing), routing-weighted: E/k times the needed flops, no sorting.
    ragged_dot: entries sorted by expert, three jax.lax.ragged_dot calls on [E, in, out] copies of
                the stacks (transposed once, outside the timing), weighted scatter back, sum.
decode: T = 1 and 32: the bytes of the distinct experts each step picks (3 * H * F each) per second
    as a fraction of the copy bandwidth measured in the same run; the grouped kernels, the XLA
    reference op (gathers the picked experts at T*k < E, else the dense path) and ragged_dot.
    Every iteration routes differently over one layer's 1.2 GB of stacks, so weights come from HBM.
--sweep: gate_up and down alone over (block_m, block_n, block_k, warps, stages), best per kernel
    (each point is a Triton compile: ~72 points per token count with the default lists; narrow them
    with --tokens / --block-m ... to stay inside a time limit; partial results are written as it goes).
--format F (a GGUF type with a kernel layout, or GPTQ-int4 with groups of 128): random quantized
    expert stacks (`QuantWeight` [E, out, in], GGUF ones repacked as the loader does) instead of
    bf16 ones; the quantized grouped kernels (pallas_kernels/moe/grouped_quant.py) against the
    "xla_dequant" reference op (decode: the picked experts gathered and dequantized; more rows: a
    scan dequantizing one expert at a time) and the dense grouped kernels on the same weights
    dequantized. prefill at --tokens as above (error against "xla_dequant"); decode at
    --decode-tokens: the packed bytes of the distinct experts picked per second over the copy
    bandwidth (the dense kernels: their bytes in the run's dtype). With --sweep, the quantized kernels' tiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ferrum_jax as fj  # noqa: E402
from ferrum_jax import moe_ops  # noqa: E402
from ferrum_jax.bench.ceilings import device_ceilings  # noqa: E402
from ferrum_jax.bench.weights import random_gguf_weight  # noqa: E402
from ferrum_jax.quant.qweight import GGUF_FORMATS, QuantWeight, gptq_format  # noqa: E402
from ferrum_jax.quant.repack import repack_gguf  # noqa: E402
from pallas_kernels import moe  # noqa: E402
from pallas_kernels.moe import decode as moe_decode  # noqa: E402
from pallas_kernels.moe import decode_quant  # noqa: E402
from pallas_kernels.moe import grouped_quant as gq  # noqa: E402

QWEN3_30B = dict(experts=128, top_k=8, hidden=2048, ff=768)
SMOKE = dict(experts=8, top_k=2, hidden=64, ff=128)
QUANT_SMOKE = dict(experts=8, top_k=2, hidden=256, ff=256)  # K-quant super-blocks are 256 wide
QUANT_FORMATS = (*GGUF_FORMATS, "GPTQ-int4")


def routes(key: jax.Array, iters: int, t: int, e: int, k: int) -> tuple[jax.Array, jax.Array]:
    """Near-uniform routing: top-k of random logits, softmax-renormalised weights; [iters, T, k] each."""
    logits = jax.random.normal(key, (iters, t, e), jnp.float32)
    w, ids = jax.lax.top_k(logits, k)
    return ids.astype(jnp.int32), jax.nn.softmax(w, axis=-1)


def stacks(key: jax.Array, e: int, h: int, f: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    ks = jax.random.split(key, 3)
    return tuple((jax.random.normal(kk, s, jnp.float32) / np.sqrt(s[2])).astype(dtype)
                 for kk, s in zip(ks, ((e, f, h), (e, f, h), (e, h, f))))


def dense_weights(wg, wu, wd) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The stacks as plain GEMM operands, arranged once outside the timing: [E*F, H] twice, [H, E*F]."""
    e, f, h = wg.shape
    return wg.reshape(e * f, h), wu.reshape(e * f, h), jnp.swapaxes(wd, 0, 1).reshape(h, e * f)


def dense_moe(x, ids, w, wg2, wu2, wd2, *, experts: int):
    """All experts on every token as plain GEMMs ([T, H] x [H, E*F] twice, then the routing-weighted
    [T, E*F] x [E*F, H]), combined by the dense [T, E] routing matrix."""
    t, e = x.shape[0], experts
    combine = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], ids].add(w)
    g = jnp.einsum("th,xh->tx", x, wg2, preferred_element_type=jnp.float32).reshape(t, e, -1)
    u = jnp.einsum("th,xh->tx", x, wu2, preferred_element_type=jnp.float32).reshape(t, e, -1)
    a = (jax.nn.silu(g) * u * combine[:, :, None]).astype(x.dtype).reshape(t, -1)
    return jnp.einsum("tx,hx->th", a, wd2, preferred_element_type=jnp.float32).astype(x.dtype)


def ragged_moe(x, ids, w, wg_t, wu_t, wd_t):
    """Entries sorted by expert, jax.lax.ragged_dot per projection ([E, in, out] stacks)."""
    t, h = x.shape
    k, e = ids.shape[1], wg_t.shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.zeros((e,), jnp.int32).at[flat].add(1)
    xs = jnp.take(x, order // k, axis=0)
    g = jax.lax.ragged_dot(xs, wg_t, sizes, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(xs, wu_t, sizes, preferred_element_type=jnp.float32)
    a = (jax.nn.silu(g) * u).astype(x.dtype)
    y = jax.lax.ragged_dot(a, wd_t, sizes, preferred_element_type=jnp.float32)
    y = y * jnp.take(w.reshape(-1), order)[:, None]
    rows = jnp.zeros((t * k, h), jnp.float32).at[order].set(y)
    return rows.reshape(t, k, h).sum(1).astype(x.dtype)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _median_seconds(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_seconds(moe_fn, x, ids, w, weights, reps: int) -> float:
    """Seconds per MoE layer: one jitted loop over the routings, x <- x + moe(x) (a residual, as in
    a model, so every iteration depends on the last and nothing is hoisted)."""
    iters = ids.shape[0]

    @jax.jit
    def loop(x, ids, w, weights):
        return jax.lax.fori_loop(0, iters, lambda i, x: x + moe_fn(x, ids[i], w[i], *weights), x)

    return _median_seconds(loop, (x, ids, w, weights), reps) / iters


def grouped_moe(x, ids, w, g, u, d):
    """The Pallas kernels (interpret mode off the GPU), choose_config's tiles."""
    return moe.moe_experts_pallas(x, ids, w, g, u, d, "silu", interpret=jax.default_backend() != "gpu")


def decode_moe(x, ids, w, g, u, d, config=None):
    """The decode GEMV kernels (pallas_kernels/moe/decode.py), T*k <= E/4 only."""
    return moe_decode.moe_experts_decode(x, ids, w, g, u, d, "silu", config=config,
                                         interpret=jax.default_backend() != "gpu")


def reference_moe(x, ids, w, g, u, d):
    """The XLA reference op (ferrum_jax.moe_ops), as the model runs it without the kernels."""
    return moe_ops.moe_experts(x, ids, w, g, u, d, "silu", ops=fj.Ops())


# ---- quantized expert stacks (--format) --------------------------------------------------------------

def quant_stack(fmt: str, e: int, n: int, k: int, key: jax.Array, dtype) -> QuantWeight:
    """A random [e, n, k] QuantWeight stack: a GGUF type as random valid blocks (ferrum_jax.bench's
    recipe: weights of std ~0.02) repacked as the loader does; GPTQ-int4 as random codes, zero
    points and scales (groups of 128), one expert at a time."""
    if fmt in GGUF_FORMATS:
        return repack_gguf(random_gguf_weight(key, fmt, (e, n, k), dtype))
    qf, groups = gptq_format(4, 128), k // 128

    def one(kk: jax.Array) -> QuantWeight:
        k1, k2, k3 = jax.random.split(kk, 3)
        codes = jax.random.randint(k1, (n, k), 0, 16, jnp.int32).astype(jnp.uint8)
        scales = jax.random.uniform(k2, (n, groups), jnp.float32, 1e-3, 5e-3)
        zeros = jax.random.randint(k3, (n, groups), 0, 16, jnp.int32).astype(jnp.uint8)
        return QuantWeight.from_codes(codes, scales, qf, zeros=zeros, compute_dtype=dtype)

    return dataclasses.replace(jax.lax.map(one, jax.random.split(key, e)), shape=(e, n, k))


def quant_stacks(fmt: str, shape: dict, dtype, key) -> tuple[QuantWeight, QuantWeight, QuantWeight]:
    e, h, f = shape["experts"], shape["hidden"], shape["ff"]
    ks = jax.random.split(key, 3)
    return tuple(quant_stack(fmt, e, n, k, kk, dtype) for kk, (n, k) in zip(ks, ((f, h), (f, h), (h, f))))


def grouped_quant_moe(x, ids, w, g, u, d):
    """The quantized grouped kernels (interpret mode off the GPU), choose_config's tiles."""
    return gq.moe_experts_quant(x, ids, w, g, u, d, "silu", interpret=jax.default_backend() != "gpu")


def decode_quant_moe(x, ids, w, g, u, d, config=None):
    """The quantized decode GEMV kernels (pallas_kernels/moe/decode_quant.py), T*k <= E/4 only."""
    return decode_quant.moe_experts_decode_quant(x, ids, w, g, u, d, "silu", config=config,
                                                 interpret=jax.default_backend() != "gpu")


def xla_dequant_moe(x, ids, w, g, u, d):
    """The "xla_dequant" reference op (ferrum_jax.moe_ops), as the model runs packed stacks without the kernels."""
    return moe_ops.moe_experts_packed(x, ids, w, g, u, d, "silu", ops=fj.Ops())


def quant_prefill(args, shape: dict, dtype, key, stacks, dense) -> list[dict]:
    """Seconds per layer at each of --tokens: the quantized kernels, "xla_dequant", and the dense
    kernels on the dequantized stacks; errors against "xla_dequant" on the first routing."""
    e, k, h, f = shape["experts"], shape["top_k"], shape["hidden"], shape["ff"]
    rows = []
    for t in args.tokens:
        iters = max(2, min(args.iters, 16384 // t))
        ids, w = routes(jax.random.fold_in(key, t), iters, t, e, k)
        x = jax.random.normal(jax.random.fold_in(key, 5000 + t), (t, h), jnp.float32).astype(dtype)
        want = np.asarray(jax.jit(xla_dequant_moe)(x, ids[0], w[0], *stacks), np.float64)
        flops = 2 * t * k * 3 * h * f
        row = dict(tokens=t, iters=iters, useful_flops=flops)
        for name, fn, ws in (("grouped_quant", grouped_quant_moe, stacks), ("xla_dequant", xla_dequant_moe, stacks),
                             ("grouped_dense", grouped_moe, dense)):
            err = rel_err(np.asarray(jax.jit(fn)(x, ids[0], w[0], *ws), np.float64), want)
            s = layer_seconds(fn, x, ids, w, ws, args.reps)
            row[name] = dict(seconds=s, useful_flops_per_s=flops / s, rel_err_vs_xla_dequant=err)
        for name in ("xla_dequant", "grouped_dense"):
            row[name]["time_vs_grouped_quant"] = row[name]["seconds"] / row["grouped_quant"]["seconds"]
        formats = tuple(s_.fmt for s_ in stacks)
        row["config"] = dataclasses.asdict(gq.choose_config(t * k, e, h, f, formats))
        rows.append(row)
        g = row["grouped_quant"]
        print(f"prefill T={t:5d} grouped_quant {g['seconds'] * 1e6:9.1f} us "
              f"({g['useful_flops_per_s'] / 1e12:6.1f} TFLOP/s, err vs xla_dequant {g['rel_err_vs_xla_dequant']:.1e}) | "
              f"xla_dequant {row['xla_dequant']['time_vs_grouped_quant']:6.2f}x | "
              f"grouped_dense {row['grouped_dense']['time_vs_grouped_quant']:5.2f}x", flush=True)
    return rows


def quant_decode(args, shape: dict, dtype, key, stacks, dense, bandwidth: float) -> list[dict]:
    """At each of --decode-tokens: the bytes of the distinct experts a step picks (packed bytes for
    the quantized paths, dense bytes in the run's dtype for the dense kernels) per second, as a
    fraction of the copy bandwidth."""
    e, k, h, f = shape["experts"], shape["top_k"], shape["hidden"], shape["ff"]
    packed_expert = sum(s_.stream_bytes() for s_ in stacks) / e  # one expert's gate, up and down
    dense_expert = 3 * h * f * jnp.dtype(dtype).itemsize
    rows = []
    for t in args.decode_tokens:
        ids, w = routes(jax.random.fold_in(key, 1000 + t), args.decode_iters, t, e, k)
        x = jax.random.normal(jax.random.fold_in(key, t), (t, h), jnp.float32).astype(dtype)
        distinct = float(np.mean([len(np.unique(np.asarray(i))) for i in ids]))
        row = dict(tokens=t, iters=args.decode_iters, distinct_experts=distinct)
        paths = [("grouped_quant", grouped_quant_moe, stacks, packed_expert),
                 ("xla_dequant", xla_dequant_moe, stacks, packed_expert),
                 ("grouped_dense", grouped_moe, dense, dense_expert)]
        if decode_quant.unsupported(x, ids[0], w[0], *stacks, "silu") is None:
            paths.insert(0, ("decode_quant", decode_quant_moe, stacks, packed_expert))
            want = np.asarray(jax.jit(xla_dequant_moe)(x, ids[0], w[0], *stacks), np.float64)
            got = np.asarray(jax.jit(decode_quant_moe)(x, ids[0], w[0], *stacks), np.float64)
            row["decode_quant_rel_err_vs_xla_dequant"] = rel_err(got, want)
        for name, fn, ws, per_expert in paths:
            active = distinct * per_expert
            s = layer_seconds(fn, x, ids, w, ws, args.reps)
            row[name] = dict(seconds=s, active_weight_bytes=active, bytes_per_s=active / s,
                             bw_fraction=active / s / bandwidth)
        rows.append(row)
        print(f"decode T={t:3d} ({distinct:5.1f} experts, {distinct * packed_expert / 1e6:7.1f} MB packed) "
              + " | ".join(f"{n} {row[n]['seconds'] * 1e6:8.1f} us {row[n]['bw_fraction']:6.1%} BW"
                           for n, *_ in paths), flush=True)
    return rows


def quant_bench(args, shape: dict, dtype, key, bandwidth: float) -> dict:
    stacks = quant_stacks(args.format, shape, dtype, jax.random.fold_in(key, 11))
    dense = tuple(jax.jit(lambda s_: s_.dequantize(dtype))(s_) for s_ in stacks)
    return dict(format=args.format, expert_bytes_packed=sum(s_.stream_bytes() for s_ in stacks),
                prefill=quant_prefill(args, shape, dtype, key, stacks, dense),
                decode=quant_decode(args, shape, dtype, key, stacks, dense, bandwidth))


# ---- bf16 expert stacks -------------------------------------------------------------------------------

def prefill(args, shape: dict, dtype, key) -> list[dict]:
    e, k, h, f = shape["experts"], shape["top_k"], shape["hidden"], shape["ff"]
    wg, wu, wd = stacks(key, e, h, f, dtype)
    transposed = tuple(jnp.swapaxes(a, 1, 2) for a in (wg, wu, wd))  # ragged_dot wants [E, in, out]
    dense, dense_ws = partial(dense_moe, experts=e), dense_weights(wg, wu, wd)
    rows = []
    for t in args.tokens:
        iters = max(2, min(args.iters, 16384 // t))
        ids, w = routes(jax.random.fold_in(key, t), iters, t, e, k)
        x = jax.random.normal(jax.random.fold_in(key, 5000 + t), (t, h), jnp.float32).astype(dtype)
        want = np.asarray(jax.jit(dense)(x, ids[0], w[0], *dense_ws), np.float64)
        got = np.asarray(jax.jit(grouped_moe)(x, ids[0], w[0], wg, wu, wd), np.float64)
        rag = np.asarray(jax.jit(ragged_moe)(x, ids[0], w[0], *transposed), np.float64)
        flops = 2 * t * k * 3 * h * f
        row = dict(tokens=t, iters=iters, useful_flops=flops)
        for name, fn, ws, e_rel in (("grouped", grouped_moe, (wg, wu, wd), rel_err(got, want)),
                                    ("ragged_dot", ragged_moe, transposed, rel_err(rag, want)),
                                    ("dense", dense, dense_ws, 0.0)):
            s = layer_seconds(fn, x, ids, w, ws, args.reps)
            row[name] = dict(seconds=s, useful_flops_per_s=flops / s, rel_err_vs_dense=e_rel)
        for name in ("ragged_dot", "dense"):
            row[name]["time_vs_grouped"] = row[name]["seconds"] / row["grouped"]["seconds"]
        row["config"] = dataclasses.asdict(moe.choose_config(t * k, e, h, f))
        rows.append(row)
        g = row["grouped"]
        print(f"prefill T={t:5d} grouped {g['seconds'] * 1e6:9.1f} us ({g['useful_flops_per_s'] / 1e12:6.1f} TFLOP/s, "
              f"err vs dense {g['rel_err_vs_dense']:.1e}) | ragged_dot {row['ragged_dot']['time_vs_grouped']:5.2f}x | "
              f"dense {row['dense']['time_vs_grouped']:5.2f}x", flush=True)
    return rows


def decode(args, shape: dict, dtype, key, bandwidth: float) -> list[dict]:
    e, k, h, f = shape["experts"], shape["top_k"], shape["hidden"], shape["ff"]
    wg, wu, wd = stacks(jax.random.fold_in(key, 7), e, h, f, dtype)
    transposed = tuple(jnp.swapaxes(a, 1, 2) for a in (wg, wu, wd))
    expert_bytes = 3 * h * f * jnp.dtype(dtype).itemsize
    rows = []
    for t in args.decode_tokens:
        ids, w = routes(jax.random.fold_in(key, 1000 + t), args.decode_iters, t, e, k)
        x = jax.random.normal(jax.random.fold_in(key, t), (t, h), jnp.float32).astype(dtype)
        distinct = float(np.mean([len(np.unique(np.asarray(i))) for i in ids]))
        active = distinct * expert_bytes
        row = dict(tokens=t, iters=args.decode_iters, distinct_experts=distinct, active_weight_bytes=active)
        runs = [("grouped", grouped_moe, (wg, wu, wd)), ("xla_reference", reference_moe, (wg, wu, wd)),
                ("ragged_dot", ragged_moe, transposed)]
        if moe_decode.unsupported(x, ids[0], w[0], wg, wu, wd, "silu") is None:
            runs.insert(0, ("decode_gemv", decode_moe, (wg, wu, wd)))
        for name, fn, ws in runs:
            s = layer_seconds(fn, x, ids, w, ws, args.reps)
            row[name] = dict(seconds=s, active_weight_bytes=active, bytes_per_s=active / s,
                             bw_fraction=active / s / bandwidth)
        rows.append(row)
        print(f"decode T={t:3d} ({distinct:5.1f} experts, {active / 1e6:7.1f} MB) "
              + " | ".join(f"{n} {row[n]['seconds'] * 1e6:8.1f} us {row[n]['bw_fraction']:6.1%} BW"
                           for n, _, _ in runs), flush=True)
    return rows


def kernel_seconds(call, al: moe.Alignment, reps: int) -> float:
    """Seconds per call of call(alignment): one jitted loop over the stacked alignments `al`."""
    iters = al.sorted_ids.shape[0]

    @jax.jit
    def loop(al):
        body = lambda i, acc: acc + call(jax.tree.map(lambda a: a[i], al))[0, 0].astype(jnp.float32)  # noqa: E731
        return jax.lax.fori_loop(0, iters, body, jnp.float32(0))

    return _median_seconds(loop, (al,), reps) / iters


def sweep(args, shape: dict, dtype, key) -> list[dict]:
    """Each kernel alone per tile config, over `iters` precomputed alignments (distinct routings)."""
    e, k, h, f = shape["experts"], shape["top_k"], shape["hidden"], shape["ff"]
    if args.format:
        wg, wu, wd = quant_stacks(args.format, shape, dtype, jax.random.fold_in(key, 9))
        gate_up_fn, down_fn = gq.gate_up, gq.down
        fits = {"gate_up": partial(gq.tiles_unsupported, formats=(wg.fmt, wu.fmt)),
                "down": partial(gq.tiles_unsupported, formats=(wd.fmt,))}
    else:
        wg, wu, wd = stacks(jax.random.fold_in(key, 9), e, h, f, dtype)
        gate_up_fn, down_fn = moe.gate_up, moe.down
        fits = {"gate_up": moe.tiles_unsupported, "down": moe.tiles_unsupported}
    interpret = jax.default_backend() != "gpu"
    rows = []
    for t in args.tokens:
        iters = max(2, min(args.iters, 16384 // t))
        ids, _ = routes(jax.random.fold_in(key, 2000 + t), iters, t, e, k)
        x = jax.random.normal(jax.random.fold_in(key, t), (t, h), jnp.float32).astype(dtype)
        for bm in args.block_m:
            al = jax.vmap(partial(moe.align_block_size, num_experts=e, block_m=bm))(ids)
            p = al.sorted_ids.shape[1]
            act = jax.random.normal(key, (p, f), jnp.float32).astype(dtype)
            routing = jnp.ones((p,), jnp.float32)
            kernels = {"gate_up": partial(gate_up_fn, x, w_gate=wg, w_up=wu, kind="silu", top_k=k,
                                          interpret=interpret),
                       "down": partial(down_fn, act, routing=routing, w_down=wd, interpret=interpret)}
            best = {}
            for kernel, bn, bk, nw, ns in itertools.product(kernels, args.block_n, args.block_k, args.warps,
                                                            args.stages):
                tiles = moe.Tiles(bn, bk, nw, ns)
                n_out, k_in = (f, h) if kernel == "gate_up" else (h, f)
                if fits[kernel](tiles, n_out, k_in, what=kernel) is not None:
                    continue
                try:
                    s = kernel_seconds(partial(kernels[kernel], tiles=tiles), al, args.reps)
                except Exception as exc:  # noqa: BLE001  a config the compiler rejects is skipped
                    print(f"  T={t} {kernel} bm={bm} {tiles}: {type(exc).__name__} {str(exc)[:120]}", flush=True)
                    continue
                flops = 2 * t * k * h * f * (2 if kernel == "gate_up" else 1)
                rows.append({"tokens": t, "kernel": kernel, "block_m": bm, "tiles": dataclasses.asdict(tiles),
                             "seconds": s, "useful_flops_per_s": flops / s, "format": args.format or "bf16"})
                print(f"  T={t:5d} {kernel:7s} bm={bm:3d} {tiles} {s * 1e6:9.1f} us", flush=True)
                if kernel not in best or s < best[kernel][0]:
                    best[kernel] = (s, tiles)
            for kernel, (s, tiles) in best.items():
                print(f"BEST T={t} {kernel} block_m={bm} {tiles} {s * 1e6:.1f} us", flush=True)
            if args.out:
                _write(args, _mode(args), {"shape": shape, "points": rows})
    return rows


def sweep_decode(args, shape: dict, dtype, key) -> list[dict]:
    """The decode GEMV kernels' tiles, one kernel at a time: first gate_up over
    (--block-n, --block-k, --warps, --stages) with down at its default, then down with the best
    gate_up. Each point: wall time per MoE layer of one jitted program of `decode_iters` unrolled
    layers (x <- x + moe(x), a distinct routing each), median of --reps; the fixed part (the other
    kernel, the add, launch gaps) is the same for every point of a phase."""
    e, k, h, f = shape["experts"], shape["top_k"], shape["hidden"], shape["ff"]
    if args.format:  # the quantized decode kernels (decode_quant.py) over packed stacks of that format
        wg, wu, wd = quant_stacks(args.format, shape, dtype, jax.random.fold_in(key, 9))
        kernels, run = decode_quant, decode_quant_moe
        choose = lambda cfg=None: cfg or decode_quant.QuantDecodeConfig()  # noqa: E731
    else:
        wg, wu, wd = stacks(jax.random.fold_in(key, 9), e, h, f, dtype)
        kernels, run = moe_decode, decode_moe
        choose = partial(moe_decode.choose_config, h, f)
    deadline = time.perf_counter() + args.time_budget
    rows = []
    for t in args.decode_tokens:
        ids, w = routes(jax.random.fold_in(key, 3000 + t), args.decode_iters, t, e, k)
        x = jax.random.normal(jax.random.fold_in(key, t), (t, h), jnp.float32).astype(dtype)
        if kernels.unsupported(x, ids[0], w[0], wg, wu, wd, "silu") is not None:
            continue

        def layer_us(cfg) -> float:
            return layer_seconds(partial(run, config=cfg), x, ids, w, (wg, wu, wd), args.reps) * 1e6

        best = choose()
        for phase in ("gate_up", "down"):
            points = []
            for bn, bk, nw, ns in itertools.product(args.block_n, args.block_k, args.warps, args.stages):
                tiles = moe_decode.GemvTiles(bn, bk, nw, ns)
                cfg = choose(dataclasses.replace(best, **{phase: tiles}))
                if getattr(cfg, phase) in [getattr(p[1], phase) for p in points] or time.perf_counter() > deadline:
                    continue  # cut to the same tiles as an earlier point, or out of time
                try:
                    us = layer_us(cfg)
                except Exception as exc:  # noqa: BLE001  a config the compiler rejects is skipped
                    print(f"  T={t} {phase} {tiles}: {type(exc).__name__} {str(exc)[:120]}", flush=True)
                    continue
                points.append((us, cfg))
                rows.append({"tokens": t, "phase": phase, "gate_up": dataclasses.asdict(cfg.gate_up),
                             "down": dataclasses.asdict(cfg.down), "layer_us": us})
                print(f"  T={t:3d} {phase:7s} {getattr(cfg, phase)} {us:7.1f} us/layer", flush=True)
            if points:
                us, best = min(points, key=lambda p: p[0])
                print(f"BEST T={t} {phase} {getattr(best, phase)} {us:.1f} us/layer", flush=True)
        if args.out:
            _write(args, f"sweep-decode-{args.format}" if args.format else "sweep-decode", {"shape": shape, "points": rows})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", nargs="+", type=int, default=[8, 64, 512, 4096])
    p.add_argument("--decode-tokens", nargs="+", type=int, default=[1, 32])
    p.add_argument("--iters", type=int, default=32, help="routings per timed loop (fewer for large T)")
    p.add_argument("--decode-iters", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="sweep each kernel's tiles instead")
    p.add_argument("--sweep-decode", action="store_true",
                   help="sweep the decode GEMV kernels' tiles (--block-n/--block-k/--warps/--stages, --decode-tokens)")
    p.add_argument("--block-m", nargs="+", type=int, default=[16, 64])
    p.add_argument("--block-n", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--block-k", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    p.add_argument("--stages", nargs="+", type=int, default=[3])
    p.add_argument("--time-budget", type=float, default=420, help="seconds for --sweep-decode (points past it skipped)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, float32, few reps (CPU check of the script)")
    p.add_argument("--format", choices=QUANT_FORMATS, default=None,
                   help="quantized expert stacks of this format (see the module docstring); default bf16 stacks")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="directory of the JSON file (default bench/results)")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    shape, dtype = (SMOKE, jnp.float32) if args.smoke else (QWEN3_30B, jnp.bfloat16)
    if args.smoke and args.format:
        shape = QUANT_SMOKE
    if args.smoke:
        args.tokens, args.decode_tokens = [17], [1]
        args.iters, args.decode_iters, args.reps = 2, 2, 1
        args.block_m, args.block_n, args.block_k, args.warps, args.stages = [16], [32], [64], [4], [3]
    key = jax.random.PRNGKey(0)
    if args.sweep_decode:
        sweep_decode(args, shape, dtype, key)
        return
    if args.sweep:
        result = dict(shape=shape, points=sweep(args, shape, dtype, key))
    else:
        small = dict(copy_bytes=1 << 20, matmul_n=64, reps=2) if args.smoke else {}
        ceil = device_ceilings(**small)
        bw = ceil["copy_bandwidth_bytes_per_s"]
        peak = ceil["matmul_bf16_flops_per_s"]
        print(f"copy {bw / 1e12:.3f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
        result = dict(shape=shape, dtype=jnp.dtype(dtype).name, ceilings=ceil)
        if args.format:
            result |= quant_bench(args, shape, dtype, key, bw)
        else:
            result |= dict(prefill=prefill(args, shape, dtype, key), decode=decode(args, shape, dtype, key, bw))
    if args.out:
        print(f"wrote {_write(args, _mode(args), result)}")


def _mode(args) -> str:
    """The result file's mode: bench or sweep, of bf16 stacks or of one quantized format."""
    mode = "sweep" if args.sweep else "bench"
    return f"{mode}-{args.format}" if args.format else mode


def _write(args, mode: str, result: dict) -> Path:
    dev = jax.devices()[0]
    record = dict(mode=mode, device=dict(kind=dev.device_kind, platform=dev.platform), jax=jax.__version__,
                  commit=args.commit, smoke=args.smoke, **result)
    tag = "_smoke" if args.smoke else ""
    path = Path(args.out) / f"moe_{mode}{tag}_{dev.device_kind.replace(' ', '-')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


if __name__ == "__main__":
    main()
