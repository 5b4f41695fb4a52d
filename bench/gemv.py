"""Dense linear layers at decode (1..4 rows): the Pallas GEMV (pallas_kernels/linear/gemv.py)
against what XLA compiles for `ferrum_jax.ops.linear` (its autotuner's pick), and against XLA with
its Triton GEMMs off (cuBLAS), at the projection shapes of Llama-3.1-8B and Qwen3-30B-A3B.

    python bench/gemv.py --out bench/results --commit $(git rev-parse --short HEAD)
    python bench/gemv.py --smoke --out /tmp/x          # tiny, CPU (interpret)

Each timed call reads a different copy of the weight (enough copies to overflow the L2), as a
model's layers do, inside one fori_loop (no host launch per call); bytes read per second are reported as a fraction of the copy bandwidth
measured in the same run. With several tiles given, every (block_n, block_k, warps) is timed and
the best one per shape is reported.
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
from pallas_kernels.linear import gemv as G  # noqa: E402

SHAPES = {  # name: (N, K) of w [out, in]
    "qwen3-30b-a3b qkv": (5120, 2048), "qwen3-30b-a3b o": (2048, 4096), "qwen3-30b-a3b router": (128, 2048),
    "llama-3.1-8b qkv": (6144, 4096), "llama-3.1-8b o": (4096, 4096), "llama-3.1-8b gate_up": (28672, 4096),
    "llama-3.1-8b down": (4096, 14336),
    "qwen3-30b-a3b lm_head": (151936, 2048), "llama-3.1-8b lm_head": (128256, 4096),
}
L2_BYTES = 50 << 20  # H100/H200: 50 MB


def timed(fn, ws: list, x: jax.Array, reps: int, iters: int = 20) -> float:
    """Median seconds of one linear: a fori_loop of `iters` rounds over the distinct weight copies
    (one compiled program, as a model's decode loop: no host launch per kernel), per call."""
    def rounds(x, *ws):
        def body(_, x):
            for w in ws:  # each output feeds the next input: the calls run one after another
                y = fn(x, w)
                x = x + (y[..., :1] * 0).astype(x.dtype)
            return x
        return jax.lax.fori_loop(0, iters, body, x)
    compiled = fn.compiled(rounds, x, ws) if hasattr(fn, "compiled") else jax.jit(rounds)
    jax.block_until_ready(compiled(x, *ws))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(x, *ws))
        times.append((time.perf_counter() - t0) / (iters * len(ws)))
    return statistics.median(times)


class NoTritonGemm:
    """ops.linear compiled with XLA's Triton GEMMs off (cuBLAS)."""

    def __call__(self, x, w):
        return ref_ops.linear(x, w)

    @staticmethod
    def compiled(rounds, x, ws):
        return jax.jit(rounds).lower(x, *ws).compile({"xla_gpu_enable_triton_gemm": False})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="names from SHAPES")
    ap.add_argument("--block-n", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--block-k", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    interpret = args.smoke
    shapes = {"tiny": (64, 256)} if args.smoke else {n: SHAPES[n] for n in args.shapes}
    ceil = device_ceilings(copy_bytes=(64 << 20) if args.smoke else None, matmul_n=256 if args.smoke else None)
    bw = ceil["copy_bandwidth_bytes_per_s"]
    dev = jax.devices()[0].device_kind
    print(f"{dev}: copy {bw / 1e12:.2f} TB/s, jax {jax.__version__}", flush=True)
    rows_out = []
    for (name, (n, k)), t in itertools.product(shapes.items(), args.rows):
        nbytes = n * k * 2
        copies = 2 if args.smoke else max(2, min(16, -(-2 * L2_BYTES // nbytes)))
        key = jax.random.PRNGKey(n + k)
        ws = [jax.random.normal(jax.random.fold_in(key, c), (n, k), jnp.bfloat16) for c in range(copies)]
        x = jax.random.normal(key, (t, k), jnp.bfloat16)
        want = np.asarray(ref_ops.linear(x.astype(jnp.float32), ws[0].astype(jnp.float32)))
        row = {"shape": name, "n": n, "k": k, "rows": t, "weight_bytes": nbytes, "copies": copies}
        variants = {"xla": jax.jit(ref_ops.linear)}
        if not args.smoke:
            variants["xla_no_triton_gemm"] = NoTritonGemm()
        for vname, fn in variants.items():
            s = timed(fn, ws, x, args.reps)
            row[vname] = {"us": s * 1e6, "bw_fraction": nbytes / s / bw}
        best = None
        for bn, bk, nw in itertools.product(args.block_n, args.block_k, args.warps):
            cfg = G.choose_config(n, k, G.GemvConfig(bn, bk, nw))
            fn = jax.jit(lambda x, w, cfg=cfg: G.gemv(x, w, config=cfg, interpret=interpret))
            got = np.asarray(fn(x, ws[0]), np.float32)
            err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-9))
            s = timed(fn, ws, x, args.reps)
            point = {"config": [cfg.block_n, cfg.block_k, cfg.num_warps], "us": s * 1e6, "bw_fraction": nbytes / s / bw,
                     "rel_err": err}
            row.setdefault("gemv_sweep", []).append(point)
            if best is None or s * 1e6 < best["us"]:
                best = point
        row["gemv"] = best
        rows_out.append(row)
        print(f"{name:24s} T={t}  xla {row['xla']['us']:7.1f} us ({row['xla']['bw_fraction']:.0%})"
              + (f"  cublas {row['xla_no_triton_gemm']['us']:7.1f} us ({row['xla_no_triton_gemm']['bw_fraction']:.0%})"
                 if "xla_no_triton_gemm" in row else "")
              + f"  gemv {best['us']:7.1f} us ({best['bw_fraction']:.0%}) {best['config']} err {best['rel_err']:.1e}",
              flush=True)
    result = {"bench": "gemv", "device": dev, "jax": jax.__version__, "commit": args.commit,
              "copy_bandwidth_bytes_per_s": bw, "rows": rows_out}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gemv_bench_{dev.replace(' ', '-')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
