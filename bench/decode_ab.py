"""Decode variants measured side by side in one process: one set of random weights, the variants
interleaved round by round (A B A B ...), each call timed without the profiler (ms a step: the
best of --runs calls of --steps steps), then one profiled call per variant (GPU kernel time and
kernels a step, the top kernels).

Separate `ferrum-jax bench` processes of the same code differ by 2-4% on an H200 (machine, clocks,
allocation); variants interleaved here differ by ~0.5% between rounds, so a 1% change is visible.

    python bench/decode_ab.py --shape qwen3-30b-a3b --variant base= \\
        --variant pdl=xla:xla_gpu_enable_pdl=true --variant ref-experts=force:moe_experts=xla

VARIANT is NAME=SPEC, SPEC a comma list of force:OP=IMPL (as Ops(force=...)) and xla:OPTION=VALUE
(an XLA compiler option of the decode program, Ops(xla_options=...); true/false/ints parsed).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ferrum_jax.backend import Ops  # noqa: E402
from ferrum_jax.bench.sweeps import host_state  # noqa: E402
from ferrum_jax.bench.weights import random_quantized_weights  # noqa: E402
from ferrum_jax.cache import KVCache  # noqa: E402
from ferrum_jax.generate import decode  # noqa: E402
from ferrum_jax.sampling import GREEDY, SamplingArrays  # noqa: E402
from ferrum_jax.shapes import random_weights, shape_config  # noqa: E402
from profile_decode import group, kernel_events  # noqa: E402


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


def parse_variant(text: str) -> tuple[str, Ops]:
    """"NAME=SPEC" -> (NAME, the Ops it describes); a clear error for anything else."""
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant {text!r}: expected NAME=SPEC (SPEC may be empty)")
    force, options = [], []
    for item in filter(None, spec.split(",")):
        kind, _, rest = item.partition(":")
        key, eq, val = rest.partition("=")
        if kind not in ("force", "xla") or not eq or not key or not val:
            raise ValueError(f"--variant {text!r}: {item!r} is not force:OP=IMPL or xla:OPTION=VALUE")
        (force if kind == "force" else options).append((key, val if kind == "force" else _value(val)))
    return name, Ops(force=tuple(force), xla_options=tuple(options))


def _weights(cfg: Any, dtype: str) -> Any:
    if dtype in ("bf16", "f32"):
        return random_weights(cfg, jnp.bfloat16 if dtype == "bf16" else jnp.float32)
    return random_quantized_weights(cfg, dtype.upper(), jnp.bfloat16)[0]


def run(args: argparse.Namespace) -> dict:
    cfg = shape_config(args.shape)
    weights = _weights(cfg, args.dtype)
    kv_dtype = jnp.float32 if args.dtype == "f32" else jnp.bfloat16
    variants = [parse_variant(v) for v in args.variant]
    capacity = args.context + args.steps + 64
    params = SamplingArrays.from_params([GREEDY] * args.batch)
    steps = jax.device_put(np.int32(args.steps))
    caches = {name: KVCache.create(num_layers=cfg.num_layers, batch=args.batch, kv_heads=cfg.num_kv_heads,
                                   capacity=capacity, head_dim=cfg.head_dim, dtype=kv_dtype) for name, _ in variants}

    def call(name: str, ops: Ops) -> float:
        state = host_state(args.batch, capacity, cfg.vocab_size, args.context)
        t0 = time.perf_counter()
        _, caches[name] = decode(weights, caches[name], state, params, steps, cfg=cfg, ops=ops)
        jax.block_until_ready(caches[name])
        return (time.perf_counter() - t0) / args.steps * 1e3

    for name, ops in variants:  # compile and warm up every variant before any timing
        call(name, ops)
    rows = {name: {"spec": text.partition("=")[2], "ms_per_step": []} for (name, _), text in zip(variants, args.variant)}
    for r in range(args.rounds):
        for name, ops in variants:
            rows[name]["ms_per_step"].append(min(call(name, ops) for _ in range(args.runs)))
            print(f"round {r}: {name:16s} {rows[name]['ms_per_step'][-1]:.3f} ms/step", flush=True)
    for name, ops in variants:
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                call(name, ops)
            events = kernel_events(Path(d))
        by: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        for e in events:
            by[group(e["name"])][0] += e["dur"]
            by[group(e["name"])][1] += 1
        row = rows[name]
        row["gpu_ms_per_step"] = sum(v[0] for v in by.values()) / args.steps / 1e3 if events else None
        row["kernels_per_step"] = sum(v[1] for v in by.values()) / args.steps
        row["top_kernels_us_per_step"] = {k: v[0] / args.steps
                                          for k, v in sorted(by.items(), key=lambda kv: -kv[1][0])[:args.top]}
    return {"bench": "decode_ab", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "commit": args.commit or _commit(), "shape": args.shape, "dtype": args.dtype, "batch": args.batch,
            "context": args.context, "steps": args.steps, "runs": args.runs, "rounds": args.rounds, "variants": rows}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def report(result: dict) -> str:
    lines = [f"{result['shape']} {result['dtype']} batch {result['batch']} context {result['context']} on "
             f"{result['device']} (jax {result['jax']}, commit {result['commit']})"]
    base = None
    for name, row in result["variants"].items():
        best = min(row["ms_per_step"])
        base = base or best
        gpu = "n/a" if row["gpu_ms_per_step"] is None else f"{row['gpu_ms_per_step']:.3f}"
        lines.append(f"  {name:16s} {best:8.3f} ms/step (rounds {', '.join(f'{t:.3f}' for t in row['ms_per_step'])}) "
                     f"x{base / best:.3f} of the first; GPU {gpu} ms/step, {row['kernels_per_step']:.0f} kernels/step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--dtype", default="bf16", help="bf16, f32 or a quantized format (q4_k, q8_0, ...)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5, help="calls per variant per round (the best is kept)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=SPEC")
    ap.add_argument("--top", type=int, default=8, help="kernels listed per variant")
    ap.add_argument("--out", default=None, help="write the JSON here (a file path)")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args(argv)
    try:
        [parse_variant(v) for v in args.variant]
    except ValueError as e:
        ap.error(str(e))
    result = run(args)
    print(report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
