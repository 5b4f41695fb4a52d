"""Quantized matmul benchmark (issue 4): the Pallas kernel, the XLA reference path (dequantize + dot
in one jit) and a dense bf16 matmul, at Llama-3-8B shapes, on the default device.

    python bench/quant_matmul.py check                # kernel vs reference at real shapes
    python bench/quant_matmul.py sweep --formats Q4_K # block sizes at M = 1
    python bench/quant_matmul.py bench --out bench/results

Every timed program reads distinct weight copies adding up to >= 8x the L2 cache, so the figures are
HBM figures; each kernel call's time is (program time) / (copies). Bytes are what the kernel streams
(codes + scales + offsets); fractions are of the copy bandwidth / bf16 matmul measured in the run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ferrum_jax.bench.ceilings import device_ceilings  # noqa: E402
from ferrum_jax.quant.qweight import GGUF_FORMATS, QFormat, QuantWeight, gptq_format  # noqa: E402
from pallas_kernels import quant_matmul as qm  # noqa: E402

FORMATS: dict[str, QFormat] = {**GGUF_FORMATS, "GPTQ-int4": gptq_format(4, 128), "GPTQ-int8": gptq_format(8, 128)}
# Llama-3-8B: name -> (out, in)
SHAPES = {"qkv": (6144, 4096), "q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096),
          "gate+up": (28672, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)}
STREAM_BYTES = 400 << 20  # distinct weight bytes per timed program (H200 L2: 50 MB)


def random_weight(fmt: QFormat, n: int, k: int, key: jax.Array) -> QuantWeight:
    ks = jax.random.split(key, 5)
    g = k // fmt.group
    lo, hi = (-128, 128) if fmt.signed else (0, 1 << fmt.bits)
    codes = jax.random.randint(ks[0], (n, k), lo, hi, jnp.int32)
    if fmt.super_group:
        scales = jax.random.randint(ks[1], (n, g), 1, 64, jnp.int32)
        sup = jax.random.uniform(ks[2], (n, k // fmt.super_group), jnp.float32, 1e-3, 1e-2)
    else:
        scales, sup = jax.random.uniform(ks[1], (n, g), jnp.float32, 1e-3, 1e-2), None
    offs = {"min": jax.random.uniform(ks[3], (n, g), jnp.float32, -0.05, 0.0),
            "kmin": jax.random.randint(ks[3], (n, g), 0, 64, jnp.int32),
            "zero": jax.random.randint(ks[3], (n, g), 0, 1 << fmt.bits, jnp.int32)}.get(fmt.offset)
    sup_off = jax.random.uniform(ks[4], (n, k // fmt.super_group), jnp.float32, 1e-3, 1e-2) if fmt.offset == "kmin" else None
    codes = codes.astype(jnp.int8 if fmt.signed else jnp.uint8)
    return QuantWeight.from_codes(codes, scales, fmt, zeros=offs if fmt.offset == "zero" else None,
                                  mins=offs if fmt.offset in ("min", "kmin") else None,
                                  super_scales=sup, super_offsets=sup_off, compute_dtype="bfloat16")


def _median_seconds(fn, args, reps: int = 7, inner: int = 5) -> float:
    """Median over reps of the time per call, `inner` calls queued back to back (no host gaps)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = [fn(*args) for _ in range(inner)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def time_per_call(call, x: jax.Array, weights: list) -> float:
    """Seconds per call of `call(x, w)`, from one program calling it once on every weight copy."""
    prog = jax.jit(lambda x, ws: tuple(call(x, w) for w in ws))
    return _median_seconds(prog, (x, weights)) / len(weights)


def copies_for(nbytes: int) -> int:
    return max(1, math.ceil(STREAM_BYTES / nbytes))


def check(args) -> None:
    key = jax.random.PRNGKey(0)
    worst = 0.0
    for name in args.formats:
        fmt = FORMATS[name]
        for shape_name in args.shapes:
            n, k = SHAPES[shape_name]
            w = random_weight(fmt, n, k, jax.random.fold_in(key, n + k))
            cfg = qm.choose_config(w, 1, args.variant)
            for m in ((1, 3) if args.variant in ("fma", "dp4a") else (1, 3, 8, 16)):
                x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32)
                got = np.asarray(qm.qmatmul(x, w, config=qm.choose_config(w, m, args.variant)), np.float64)
                want = np.asarray(x, np.float64) @ np.asarray(w.dequantize(jnp.float32), np.float64).T
                err = np.linalg.norm(got - want) / np.linalg.norm(want)
                worst = max(worst, err / (2e3 if args.variant == "dp4a" else 1.0))  # int8 activations: ~1e-2
                print(f"check {name:9s} {shape_name:8s} M={m:2d} rel err {err:.2e} cfg {cfg}", flush=True)
        w = random_weight(fmt, 4096, 4096, key)
        dq = np.abs(np.asarray(qm.dequantize(w, jnp.float32)) - np.asarray(w.dequantize(jnp.float32))).max()
        print(f"check {name:9s} Pallas dequantize vs jnp: max |diff| {dq:.1e}", flush=True)
        worst = max(worst, float(dq))
    print(f"worst relative error {worst:.2e}")
    if not worst < 1e-5:
        raise SystemExit("kernel disagrees with the reference")


def sweep(args) -> list[dict]:
    key = jax.random.PRNGKey(1)
    rows = []
    bw = device_ceilings(reps=5)["copy_bandwidth_bytes_per_s"]
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    for name in args.formats:
        fmt = FORMATS[name]
        for shape_name in args.shapes:
            n, k = SHAPES[shape_name]
            ws = [random_weight(fmt, n, k, jax.random.fold_in(key, i)) for i in range(1)]
            nbytes = ws[0].stream_bytes()
            ws += [random_weight(fmt, n, k, jax.random.fold_in(key, i)) for i in range(1, copies_for(nbytes))]
            x = jax.random.normal(key, (1, k), jnp.bfloat16)
            best = None
            for bn, bk, sk, nw, ns in itertools.product(args.block_n, args.block_k, args.split_k, args.warps, args.stages):
                cfg = qm.GemvConfig(args.variant or "fma", 16, bn, bk, sk, nw, ns)
                if qm.unsupported(x, ws[0], cfg) is not None:
                    continue
                try:
                    t = time_per_call(lambda x, w: qm.qmatmul(x, w, config=cfg), x, ws)
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects is skipped
                    print(f"  {cfg}: {type(e).__name__} {str(e)[:120]}", flush=True)
                    continue
                frac = nbytes / t / bw
                rows.append(dict(format=name, shape=shape_name, n=n, k=k, config=cfg.__dict__, seconds=t,
                                 bw_fraction=frac))
                if best is None or t < best[0]:
                    best = (t, cfg)
                print(f"  {name} {shape_name} {cfg} {t * 1e6:7.1f} us {frac:6.1%}", flush=True)
            print(f"BEST {name} {shape_name} {best[1]} {best[0] * 1e6:.1f} us {nbytes / best[0] / bw:.1%}", flush=True)
            del ws
    return rows


def bench(args) -> dict:
    from ferrum_jax.quant import qops

    key = jax.random.PRNGKey(2)
    dense_cache: dict = {}
    ceil = device_ceilings()
    bw, peak = ceil["copy_bandwidth_bytes_per_s"], ceil["matmul_bf16_flops_per_s"]
    print(f"copy {bw / 1e12:.3f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    points = []
    for name in args.formats:
        fmt = FORMATS[name]
        for shape_name in args.shapes:
            n, k = SHAPES[shape_name]
            w0 = random_weight(fmt, n, k, key)
            nbytes = w0.stream_bytes()
            for m in args.m:
                ncopy = copies_for(nbytes) if m <= 64 else 1 + (m < 1024)
                ws = [w0] + [random_weight(fmt, n, k, jax.random.fold_in(key, i)) for i in range(1, ncopy)]
                x = jax.random.normal(key, (m, k), jnp.bfloat16)
                row = dict(format=name, shape=shape_name, n=n, k=k, m=m, weight_bytes=nbytes)
                cfg = qm.choose_config(ws[0], m, args.variant)
                if jax.default_backend() == "gpu" and m <= args.kernel_max_rows and qm.unsupported(x, ws[0], cfg) is None:
                    t = time_per_call(lambda x, w: qm.qmatmul(x, w, config=cfg), x, ws)
                    row["kernel"] = dict(seconds=t, bw_fraction=nbytes / t / bw, config=cfg.__dict__)
                dcfg = qm.choose_config(ws[0], m, "dp4a")
                if jax.default_backend() == "gpu" and args.variant is None and qm.unsupported(x, ws[0], dcfg) is None:
                    t = time_per_call(lambda x, w: qm.qmatmul(x, w, config=dcfg), x, ws)
                    row["kernel_dp4a"] = dict(seconds=t, bw_fraction=nbytes / t / bw, config=dcfg.__dict__)
                t = time_per_call(qops.linear, x, ws)  # the reference path: dequantize once + dense matmul
                row["xla_dequant"] = dict(seconds=t, bw_fraction=nbytes / t / bw)
                if jax.default_backend() == "gpu":  # the GPU path for many rows: Pallas dequantize + matmul
                    t = time_per_call(qops.dequant_linear, x, ws)
                    row["pallas_dequant"] = dict(seconds=t, bw_fraction=nbytes / t / bw)
                if (n, k, m) not in dense_cache:
                    dense = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16)
                             for i in range(max(1, min(len(ws), math.ceil(STREAM_BYTES / (2 * n * k)))))]
                    dense_cache[n, k, m] = time_per_call(lambda x, w: jnp.einsum("mk,nk->mn", x, w), x, dense)
                    del dense
                t = dense_cache[n, k, m]
                row["dense_bf16"] = dict(seconds=t, bw_fraction=2 * n * k / t / bw, flops_fraction=2 * m * n * k / t / peak)
                del ws
                best = min((row[p]["seconds"], p) for p in ("kernel_dp4a", "kernel", "pallas_dequant", "xla_dequant") if p in row)
                row["best"] = best[1]
                row["best_bw_fraction"] = nbytes / best[0] / bw
                row["best_vs_dense_bf16"] = row["dense_bf16"]["seconds"] / best[0]
                points.append(row)
                kern = row.get("kernel", {}).get("bw_fraction")
                pdq = row.get("pallas_dequant", {}).get("bw_fraction")
                d4 = row.get("kernel_dp4a", {}).get("bw_fraction")
                print(f"{name:9s} {shape_name:8s} M={m:5d} dp4a {'-' if d4 is None else f'{d4:6.1%}'} "
                      f"kernel {'-' if kern is None else f'{kern:6.1%}'} "
                      f"pallas-dequant {'-' if pdq is None else f'{pdq:6.1%}'} "
                      f"xla {row['xla_dequant']['bw_fraction']:6.1%} dense {row['dense_bf16']['bw_fraction']:6.1%} BW | "
                      f"best/dense-bf16 time {row['best_vs_dense_bf16']:.2f}x", flush=True)
                if args.out:  # partial results survive a time limit
                    _write(args, "bench", dict(ceilings=ceil, points=points))
    return dict(ceilings=ceil, points=points)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["check", "sweep", "bench"])
    p.add_argument("--formats", nargs="+", default=list(FORMATS))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--m", nargs="+", type=int, default=[1, 8, 32, 256, 2048])
    p.add_argument("--block-n", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--block-k", nargs="+", type=int, default=[512, 1024, 2048])
    p.add_argument("--split-k", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    p.add_argument("--stages", nargs="+", type=int, default=[3])
    p.add_argument("--variant", default=None, choices=["dot", "fma", "dp4a"], help="default: the kernel's own choice")
    p.add_argument("--kernel-max-rows", type=int, default=64, help="time the kernel up to this many rows")
    p.add_argument("--out", default=None, help="write a JSON file here")
    p.add_argument("--commit", default=None)
    args = p.parse_args()
    result = {"check": check, "sweep": sweep, "bench": bench}[args.mode](args)
    if args.out and result is not None:
        print(f"wrote {_write(args, args.mode, result)}")


def _write(args, mode: str, result) -> Path:
    dev = jax.devices()[0]
    record = dict(mode=mode, device=dict(kind=dev.device_kind, platform=dev.platform),
                  jax=jax.__version__, commit=args.commit, stream_bytes=STREAM_BYTES, result=result)
    path = Path(args.out) / f"quant_matmul_{mode}_{dev.device_kind.replace(' ', '-')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


if __name__ == "__main__":
    main()
