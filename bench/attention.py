"""Attention kernels benchmark (issue 5): Pallas flash prefill against cuDNN, Pallas decode (contiguous,
paged, int8/fp8 caches) against the copy bandwidth, all measured in one run on the default device.

    python bench/attention.py check                  # every kernel against the XLA reference, real shapes
    python bench/attention.py sweep --kernel flash   # block sizes / warps / stages
    python bench/attention.py bench --out bench/results --commit SHA

Prefill figures are causal-adjusted TFLOP/s (4 * B * H * D * visible (query, key) pairs) and their ratio
to cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) at the same shape. Decode figures
are the K/V bytes a kernel must read (the visible slots of every row, codes + scales) per second, as a
fraction of the copy bandwidth measured in the same run; paged is compared with contiguous.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ferrum_jax import ops as ref_ops  # noqa: E402
from ferrum_jax.bench.ceilings import device_ceilings  # noqa: E402
from ferrum_jax.cache import quantize_kv  # noqa: E402
from pallas_kernels.attention.decode import decode_attention  # noqa: E402
from pallas_kernels.attention.decode_append import decode_attention_append  # noqa: E402
from pallas_kernels.attention.flash import flash_attention  # noqa: E402
from pallas_kernels.attention.paged_decode import paged_decode_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B
PREFILL_LENGTHS = (2048, 8192, 32768)
DECODE_POINTS = ((1, 32768), (64, 2048), (64, 4096), (64, 8192))  # (batch, context)
PAGE_SIZE = 16


def median_seconds(fn, args, reps: int = 7, inner: int = 5) -> float:
    """Median over reps of the time per call, `inner` calls queued back to back (no host gaps)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = [fn(*args) for _ in range(inner)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def loop_seconds(fn, args, n: int = 20, reps: int = 5) -> float:
    """Seconds per call of fn(q, *rest) from one program calling it n times in a fori_loop, each
    call's q depending on the previous output (no host dispatch between calls, no CSE)."""
    def run(q, *rest):
        def body(_, q):
            out = fn(q, *rest)
            return q + (out.astype(jnp.float32) * 1e-30).astype(q.dtype).reshape(q.shape)
        return jax.lax.fori_loop(0, n, body, q)
    return median_seconds(jax.jit(run), args, reps=reps, inner=1) / n


STREAM_BYTES = 4 << 30  # distinct K/V bytes per timed decode program: >= 80x the H200 L2, ~1 ms of work


def copies_seconds(fn, arg_sets: list[tuple]) -> float:
    """Seconds per call of fn, from one program calling it once on each of several distinct input
    sets (caches adding up to >= 8x the L2, so the figure is an HBM figure; no host sync between calls)."""
    prog = jax.jit(lambda sets: [fn(*a) for a in sets])
    return median_seconds(prog, (arg_sets,), reps=7, inner=3) / len(arg_sets)


def copies_for(nbytes: int) -> int:
    return max(2, -(-STREAM_BYTES // nbytes))


# --- inputs ----------------------------------------------------------------------------------------

def prefill_inputs(t: int, batch: int = 1, head_dim: int = HEAD_DIM, dtype=jnp.bfloat16, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (batch, t, HEADS, head_dim), dtype)
    k = jax.random.normal(ks[1], (batch, KV_HEADS, t, head_dim), dtype)
    v = jax.random.normal(ks[2], (batch, KV_HEADS, t, head_dim), dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    return q, k, v, pos


def decode_inputs(batch: int, context: int, kv_dtype=None, seed: int = 0):
    """q [B,1,H,D], a cache of `context` slots with every row full (the last query at context-1),
    and optionally int8/fp8 codes + scales."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (batch, 1, HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(ks[1], (batch, KV_HEADS, context, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(ks[2], (batch, KV_HEADS, context, HEAD_DIM), jnp.bfloat16)
    pos = jnp.full((batch, 1), context - 1, jnp.int32)
    scales = {}
    if kv_dtype is not None:
        (k, ks_), (v, vs_) = quantize_kv(k, kv_dtype), quantize_kv(v, kv_dtype)
        scales = dict(k_scale=ks_, v_scale=vs_)
    return q, k, v, pos, scales


def to_pages(x: jax.Array, page_size: int, perm: np.ndarray) -> jax.Array:
    """[B, KVH, S, ...] -> pages [B*S/page, KVH, page, ...] stored in the order `perm` (scattered)."""
    b, h, s = x.shape[:3]
    pages = x.reshape(b, h, s // page_size, page_size, *x.shape[3:])
    pages = jnp.moveaxis(pages, 1, 2).reshape(b * (s // page_size), h, page_size, *x.shape[3:])
    return pages[np.argsort(perm)]  # page i of the logical order lands at slot perm[i]


def paged_inputs(batch: int, context: int, kv_dtype=None, page_size: int = PAGE_SIZE, seed: int = 0):
    q, k, v, pos, scales = decode_inputs(batch, context, kv_dtype, seed)
    n_pages = batch * context // page_size
    perm = np.random.default_rng(seed).permutation(n_pages)
    table = jnp.asarray(perm.reshape(batch, context // page_size), jnp.int32)
    pk, pv = to_pages(k, page_size, perm), to_pages(v, page_size, perm)
    pscales = {name: to_pages(s, page_size, perm) for name, s in scales.items()}
    return q, pk, pv, table, pos, pscales


def kv_bytes(batch: int, context: int, kv_dtype=None) -> int:
    item = 2 if kv_dtype is None else 1
    scales = 0 if kv_dtype is None else 2 * 4 * batch * KV_HEADS * context
    return 2 * batch * KV_HEADS * context * HEAD_DIM * item + scales


def causal_flops(batch: int, t: int, heads: int = HEADS, head_dim: int = HEAD_DIM) -> float:
    return 4.0 * batch * heads * head_dim * t * (t + 1) / 2


# --- callables -------------------------------------------------------------------------------------

def cudnn_prefill(q, k, v, pos):
    return ref_ops.cudnn_attention(q, k, v, pos, scale=HEAD_DIM ** -0.5, causal_from_zero=True)


def mgpu_prefill(q, k, v, pos):
    """jax's own Mosaic GPU (wgmma) example kernel, for reference: causal from zero, no scale argument
    (q is pre-scaled), keys as [batch, kv_len, kv_heads, head_dim]."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu as amg
    cfg = amg.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
    k, v = (jnp.swapaxes(a, 1, 2) for a in (k, v))
    return amg.attention((q * HEAD_DIM ** -0.5).astype(q.dtype), k, v, cfg)


def hopper_prefill(cfg: dict):
    from pallas_kernels.attention.flash_hopper import flash_attention_hopper
    return lambda q, k, v, pos: flash_attention_hopper(q, k, v, scale=HEAD_DIM ** -0.5, **cfg)


def flash_prefill(cfg: dict):
    return lambda q, k, v, pos: flash_attention(q, k, v, pos, scale=HEAD_DIM ** -0.5, **cfg)


def decode_call(cfg: dict):
    return lambda q, k, v, pos, s: decode_attention(q, k, v, pos, scale=HEAD_DIM ** -0.5, **s, **cfg)


def paged_call(cfg: dict):
    return lambda q, k, v, t, pos, s: paged_decode_attention(q, k, v, t, pos, scale=HEAD_DIM ** -0.5, **s, **cfg)


APPEND_COPIES = 32  # caches per timed program: a 32-layer model's worth (>= 5x the L2 at batch 1 / 1k)


def append_seconds(cfg: dict, sets: list[tuple], reps: int = 7) -> tuple[float, float]:
    """(seconds per decode_attention_append call from one program calling it once on each input
    set, the kernel's own GPU time per call): caches donated and fed back, so the in-place cache
    write costs what it costs in a decode step."""
    def prog(sets):
        outs = [decode_attention_append(q, k[:, :, :1].swapaxes(1, 2), v[:, :, :1].swapaxes(1, 2), k, v, pos,
                                        scale=HEAD_DIM ** -0.5, **cfg) for q, k, v, pos, _ in sets]
        return [(q, k2, v2, pos, sc) for (q, _, _, pos, sc), (_, k2, v2) in zip(sets, outs)], [o for o, _, _ in outs]
    run = jax.jit(prog, donate_argnums=0)
    state = {"sets": sets}

    def step():
        state["sets"], out = run(state["sets"])
        return out

    jax.block_until_ready(step())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - t0)
    kernel = kernel_seconds(lambda: step(), (), len(sets)).get("decode_attention_append", float("nan"))
    return statistics.median(times) / len(sets), kernel


def xla_decode(q, k, v, pos, s):
    return ref_ops.attention(q, k, v, pos, scale=HEAD_DIM ** -0.5, **s)


# --- modes -----------------------------------------------------------------------------------------

def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check(args) -> None:
    """Each kernel at real shapes against the float32 XLA reference."""
    worst = {}
    with jax.default_matmul_precision("highest"):
        for t, window, softcap, offset in ((2048, None, None, 0), (1000, 257, None, 0), (777, None, 30.0, 0),
                                           (512, None, None, 1536)):
            q, k, v, pos = prefill_inputs(t + offset)
            q, pos = q[:, offset:], pos[:, offset:]
            kw = dict(scale=HEAD_DIM ** -0.5, window=window, softcap=softcap)
            try:
                got = jax.jit(lambda *a: flash_attention(*a, **kw))(q, k, v, pos)
            except Exception as err:  # noqa: BLE001  report every kernel's failure, then go on
                print(f"check flash T={t}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
                worst["flash"] = float("inf")
                continue
            want = ref_ops.attention(*(a.astype(jnp.float32) for a in (q, k, v)), pos, **kw)
            e = rel_err(got, want)
            worst["flash"] = max(worst.get("flash", 0.0), e)
            print(f"check flash T={t} offset={offset} window={window} softcap={softcap}: rel err {e:.2e}", flush=True)
        for (b, s), kvd in itertools.product(((1, 32768), (64, 2048), (3, 1000)), (None, jnp.int8, jnp.float8_e4m3fn)):
            q, k, v, pos, sc = decode_inputs(b, s, kvd)
            pos = jnp.minimum(pos, jnp.arange(b, dtype=jnp.int32)[:, None] * 97 + s // 3)  # mixed lengths
            want = ref_ops.attention(q.astype(jnp.float32), k, v, pos, scale=HEAD_DIM ** -0.5, **sc)
            qp, pk, pv, table, _, psc = paged_inputs(b, s - s % PAGE_SIZE, kvd)
            ppos = jnp.minimum(pos, s - s % PAGE_SIZE - 1)
            want_p = ref_ops.paged_attention(qp.astype(jnp.float32), pk, pv, table, ppos, scale=HEAD_DIM ** -0.5,
                                             **psc)
            try:
                e = rel_err(jax.jit(decode_call({}))(q, k, v, pos, sc), want)
                ep = rel_err(jax.jit(paged_call({}))(qp, pk, pv, table, ppos, psc), want_p)
            except Exception as err:  # noqa: BLE001
                print(f"check decode B={b} S={s}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
                e = ep = float("inf")
            name = "bf16" if kvd is None else jnp.dtype(kvd).name
            worst["decode"], worst["paged"] = max(worst.get("decode", 0.0), e), max(worst.get("paged", 0.0), ep)
            print(f"check decode B={b} S={s} {name}: rel err {e:.2e}; paged {ep:.2e}", flush=True)
    print("worst relative errors:", {k: f"{v:.2e}" for k, v in worst.items()})
    if max(worst.values()) > 2e-2:
        raise SystemExit("a kernel disagrees with the reference")


def prefill_point(t: int, cfg: dict, with_cudnn: bool = True, hopper_configs: dict | None = None) -> dict:
    q, k, v, pos = prefill_inputs(t)
    flops = causal_flops(1, t)
    row = {"kind": "prefill", "T": t, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "config": cfg}
    row["pallas_seconds"] = loop_seconds(flash_prefill(cfg), (q, k, v, pos), n=4)
    row["pallas_tflops"] = flops / row["pallas_seconds"] / 1e12
    hopper_configs = hopper_configs or {}
    for name, hcfg in hopper_configs.items():
        try:
            t_h = loop_seconds(hopper_prefill(hcfg), (q, k, v, pos), n=4)
            row[f"hopper_{name}_seconds"], row[f"hopper_{name}_tflops"] = t_h, flops / t_h / 1e12
        except Exception as e:  # noqa: BLE001  report and go on (e.g. shared memory over the limit)
            row[f"hopper_{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if with_cudnn:
        row["cudnn_seconds"] = loop_seconds(cudnn_prefill, (q, k, v, pos), n=4)
        row["cudnn_tflops"] = flops / row["cudnn_seconds"] / 1e12
        row["pallas_over_cudnn"] = row["cudnn_seconds"] / row["pallas_seconds"]
        for name in hopper_configs:
            if f"hopper_{name}_seconds" in row:
                row[f"hopper_{name}_over_cudnn"] = row["cudnn_seconds"] / row[f"hopper_{name}_seconds"]
        try:
            row["jax_mgpu_example_seconds"] = loop_seconds(mgpu_prefill, (q.astype(jnp.float16), k.astype(jnp.float16),
                                                                          v.astype(jnp.float16), pos), n=4)
            row["jax_mgpu_example_tflops"] = flops / row["jax_mgpu_example_seconds"] / 1e12
        except Exception as e:  # noqa: BLE001  an example kernel outside our control: note and go on
            row["jax_mgpu_example_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def decode_point(batch: int, context: int, kv_dtype, cfg: dict, paged_cfg: dict | None, bw: float,
                 with_xla: bool = False, append_cfg: dict | None = None, kernel_times: bool = False) -> dict:
    name = "bf16" if kv_dtype is None else jnp.dtype(kv_dtype).name
    nbytes = kv_bytes(batch, context, kv_dtype)
    row = {"kind": "decode", "batch": batch, "context": context, "heads": HEADS, "kv_heads": KV_HEADS, "kv_dtype": name,
           "kv_bytes": nbytes, "config": cfg}
    sets = [decode_inputs(batch, context, kv_dtype, seed=i) for i in range(copies_for(nbytes))]
    row["copies"] = len(sets)
    if append_cfg is not None:  # the decode step's op: cache write + attention, one kernel
        row["append_config"] = append_cfg
        row["append_seconds"], row["append_kernel_seconds"] = append_seconds(append_cfg, sets[:APPEND_COPIES])
        row["append_fraction_of_copy_bw"] = nbytes / row["append_seconds"] / bw
        row["append_kernel_us"] = row["append_kernel_seconds"] * 1e6
        if not cfg:
            return row
    row["contiguous_seconds"] = copies_seconds(decode_call(cfg), sets)
    row["contiguous_fraction_of_copy_bw"] = nbytes / row["contiguous_seconds"] / bw
    if kernel_times:
        few = sets[:APPEND_COPIES]
        per = kernel_seconds(jax.jit(lambda few: [decode_call(cfg)(*a) for a in few]), (few,), len(few))
        row["contiguous_kernel_us"] = per.get("decode_attention", float("nan")) * 1e6
        row["contiguous_op_kernels_us"] = sum(per.values()) * 1e6
    if with_xla:
        row["xla_seconds"] = copies_seconds(xla_decode, sets)
        row["xla_fraction_of_copy_bw"] = nbytes / row["xla_seconds"] / bw
    del sets
    if paged_cfg is not None:
        sets = [paged_inputs(batch, context, kv_dtype, seed=i) for i in range(copies_for(nbytes))]
        row["paged_config"] = paged_cfg
        row["page_size"] = PAGE_SIZE
        row["paged_seconds"] = copies_seconds(paged_call(paged_cfg), sets)
        row["paged_fraction_of_copy_bw"] = nbytes / row["paged_seconds"] / bw
        row["paged_over_contiguous_time"] = row["paged_seconds"] / row["contiguous_seconds"]
    return row


def _grid(spec: str) -> list[dict]:
    """'block_q=64,128 num_warps=4,8' -> every combination as kwargs."""
    axes = [(name, [int(x) for x in values.split(",")]) for name, values in (a.split("=") for a in spec.split())]
    return [dict(zip([n for n, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def sweep(args) -> list[dict]:
    bw = device_ceilings(reps=5)["copy_bandwidth_bytes_per_s"] if args.kernel != "flash" else None
    rows = []
    for cfg in _grid(args.grid):
        try:
            if args.kernel == "flash":
                row = prefill_point(args.length or 8192, cfg, with_cudnn=not rows)
            else:
                b, s = args.point or (1, 32768)
                paged = cfg if args.kernel == "paged" else None
                append = cfg if args.kernel == "append" else None
                kvd = {"bf16": None, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[args.kv_dtype]
                row = decode_point(b, s, kvd, {} if paged or append else cfg, paged, bw, append_cfg=append,
                                   kernel_times=args.kernel == "decode")
        except Exception as e:  # a config the compiler refuses: report and go on
            print(f"sweep {args.kernel} {cfg}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows.append(row)
        print("sweep", args.kernel, json.dumps({k: v for k, v in row.items() if "seconds" not in k}), flush=True)
    return rows


def kernel_seconds(run, args: tuple, calls: int) -> dict[str, float]:
    """GPU time per call of each kernel (by name, jax.profiler) in one run of `run(*args)`, which
    makes `calls` calls: what the kernels take without the launch gaps between them."""
    import collections
    import gzip
    import re
    import tempfile

    jax.block_until_ready(run(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(run(*args))
        trace = json.loads(gzip.open(next(Path(d).rglob("*.trace.json.gz"))).read())["traceEvents"]
    gpu = {e["pid"] for e in trace if e.get("ph") == "M" and e.get("name") == "process_name"
           and "gpu" in e["args"]["name"].lower()}
    per = collections.Counter()
    for e in trace:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            per[re.sub(r"[._]\d+$", "", re.sub(r"\(.*", "", e["name"]))[:60]] += e["dur"] * 1e-6 / calls
    return dict(per)


def profile(args) -> None:
    """Kernel time per call (jax.profiler) of the decode op at --point: the kernel itself against
    the whole op (kernel + the split combine + launch gaps)."""
    b, s = args.point or (1, 32768)
    bw = device_ceilings(reps=5)["copy_bandwidth_bytes_per_s"]
    kvd = {"bf16": None, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[args.kv_dtype]
    nbytes, cfg = kv_bytes(b, s, kvd), json.loads(args.decode_config)
    sets = [decode_inputs(b, s, kvd, seed=i) for i in range(copies_for(nbytes))]
    seconds = copies_seconds(decode_call(cfg), sets)
    per = kernel_seconds(jax.jit(lambda sets: [decode_call(cfg)(*a) for a in sets]), (sets,), len(sets))
    print(f"decode B={b} S={s} {args.kv_dtype} {cfg}: op {seconds * 1e6:.1f} us/call = {nbytes / seconds / bw:.1%} of copy BW")
    for name, t in sorted(per.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {name:60s} {t * 1e6:8.1f} us/call  ({nbytes / t / bw:.1%} of copy BW if alone)")


def bench(args) -> dict:
    ceilings = device_ceilings(reps=7)
    bw = ceilings["copy_bandwidth_bytes_per_s"]
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {ceilings['matmul_bf16_flops_per_s'] / 1e12:.0f} TFLOP/s",
          flush=True)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "commit": args.commit,
              "ceilings": ceilings, "rows": []}
    out = Path(args.out) / f"attention_bench_{result['device'].replace(' ', '-')}.json" if args.out else None

    def add(row: dict) -> None:
        result["rows"].append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        if out:
            out.write_text(json.dumps(result, indent=1))

    for t in args.prefill:
        add(prefill_point(t, json.loads(args.flash_config), hopper_configs=json.loads(args.hopper_configs)))
    for (b, s), kvd in itertools.product(() if args.skip_decode else DECODE_POINTS,
                                         (None, jnp.int8, jnp.float8_e4m3fn)):
        add(decode_point(b, s, kvd, json.loads(args.decode_config),
                         json.loads(args.paged_config) if kvd is None or args.paged_quantized else None, bw,
                         with_xla=kvd is None))
    return result


def main() -> None:
    # --heads rebinds the module's HEADS / KV_HEADS, which every input builder reads.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("check", "sweep", "bench", "profile"))
    p.add_argument("--kernel", choices=("flash", "decode", "paged", "append"), default="flash")
    p.add_argument("--skip-decode", action="store_true", help="bench: prefill only")
    p.add_argument("--grid", default="block_q=64,128 block_k=64,128 num_warps=4,8 num_stages=2,3",
                   help="sweep: 'name=v1,v2 name=...' keyword arguments of the kernel")
    p.add_argument("--length", type=int, help="sweep flash: sequence length")
    p.add_argument("--point", type=lambda s: tuple(int(x) for x in s.split("x")), help="sweep decode: BxS")
    p.add_argument("--prefill", type=lambda s: [int(x) for x in s.split(",")], default=list(PREFILL_LENGTHS))
    p.add_argument("--flash-config", default="{}", help="JSON keyword arguments for flash_attention")
    p.add_argument("--hopper-configs", default='{"default": {}}',
                   help="JSON {name: keyword arguments} for flash_attention_hopper (Mosaic GPU), each timed")
    p.add_argument("--decode-config", default="{}", help="JSON keyword arguments for decode_attention")
    p.add_argument("--paged-config", default="{}", help="JSON keyword arguments for paged_decode_attention")
    p.add_argument("--kv-dtype", choices=("bf16", "int8", "fp8"), default="bf16", help="profile, sweep: cache dtype")
    p.add_argument("--paged-quantized", action="store_true", help="also time paged int8/fp8 caches")
    p.add_argument("--heads", default=f"{HEADS}/{KV_HEADS}", help="query/kv heads, e.g. 32/4 (default Llama-3.1-8B's)")
    p.add_argument("--out", help="folder for the JSON result")
    p.add_argument("--commit", default="unknown")
    args = p.parse_args()
    globals()["HEADS"], globals()["KV_HEADS"] = (int(x) for x in args.heads.split("/"))
    if args.mode == "check":
        check(args)
    elif args.mode == "profile":
        profile(args)
    elif args.mode == "sweep":
        rows = sweep(args)
        if args.out:
            b, ctx = args.point or (1, 32768)
            point = "" if args.kernel == "flash" else f"_b{b}-{ctx // 1024}k"
            name = (f"attention_sweep_{args.kernel}{point}_{HEADS}-{KV_HEADS}heads_"
                    f"{jax.devices()[0].device_kind.replace(' ', '-')}.json")
            (Path(args.out) / name).write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                                           "jax": jax.__version__, "commit": args.commit,
                                                           "rows": rows}, indent=1))
    else:
        bench(args)


if __name__ == "__main__":
    main()
