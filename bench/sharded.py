"""Sharded decode benchmark (issue 8): random weights of a real model's shape, drawn straight onto a
tensor-parallel mesh, decode tokens/s at each TP degree, scaling efficiency against TP 1 and the
fraction of the aggregate copy bandwidth (every device's weight shard, and its KV cache slice, read
once per decode step).

    python bench/sharded.py --shape llama-3.1-8b --tp 1,2,4 --batches 1,32          # 4 GPUs
    python bench/sharded.py --shape llama-3.1-70b --tp 2,4 --batches 1,32           # 4 GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python bench/sharded.py --shape llama-tiny --tp 1,2,4 --dtype f32 --context 64 --steps 8  # CPU smoke

Writes bench/results/sharded_<shape>_<dtype>_<device>.json (and a .png of tokens/s per TP when
matplotlib is there). NVLink multicast stays off: NCCL_NVLS_ENABLE=0 is set before jax starts.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before jax (and NCCL) start: NVLink multicast off

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import models  # noqa: E402
from ferrum_jax import sharding as sh  # noqa: E402
from ferrum_jax.backend import Ops  # noqa: E402
from ferrum_jax.bench.ceilings import device_ceilings  # noqa: E402
from ferrum_jax.bench.sweeps import host_state  # noqa: E402
from ferrum_jax.compile_log import count_compiles  # noqa: E402
from ferrum_jax.generate import _programs  # noqa: E402
from ferrum_jax.sampling import GREEDY, SamplingArrays  # noqa: E402
from ferrum_jax.shapes import shape_config  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}

# Shapes only: `arrange` on ShapeDtypeStructs gives the sharded layout's leaf shapes without data.
ABSTRACT_ROWS = sh.RowOps(
    take=lambda x, rows: jax.ShapeDtypeStruct((len(rows), *x.shape[1:]), x.dtype),
    concat=lambda xs: jax.ShapeDtypeStruct((sum(x.shape[0] for x in xs), *xs[0].shape[1:]), xs[0].dtype),
    fusable=lambda *xs: True)


@functools.cache
def _drawer(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding, ones: bool):
    def draw(key: jax.Array) -> jax.Array:
        if ones:
            return jnp.ones(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.jit(draw, out_shardings=sharding)  # each device draws only its slice


def random_sharded_weights(cfg: Any, mesh: Mesh, dtype: Any, seed: int = 0) -> tuple[Any, Any]:
    """(sharded config, weights of `cfg`'s shape in the sharded layout, N(0, 0.02), norms 1), drawn
    on the mesh one tensor at a time: no device or host ever holds a whole tensor."""
    family = models.family_of(cfg)
    structs = {n: jax.ShapeDtypeStruct(s, dtype) for n, s in family.tensor_shapes(cfg).items()}
    layout = sh.arrange(family.build_weights(cfg, structs), cfg, sh.axis_size(mesh, "model"), ABSTRACT_ROWS)
    key, count = jax.random.PRNGKey(seed), iter(range(1 << 30))

    def draw(path: tuple, s: jax.ShapeDtypeStruct) -> jax.Array:
        name = sh._path_name(path)
        sharding = NamedSharding(mesh, sh.spec(sh.logical_axes(path, s)))
        sh.check_split(name, s.shape, sharding.spec, mesh)
        return _drawer(s.shape, s.dtype, sharding, name.endswith("norm"))(jax.random.fold_in(key, next(count)))

    weights = sh._unique_map(draw, layout, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return sh.sharded_config(cfg, mesh), weights


def _state(mesh: Mesh, batch: int, capacity: int, vocab: int, context: int):
    """A decode state at position `context` for every row, placed as the decode program returns it."""
    s = host_state(batch, capacity, vocab, context)
    placed = {f.name: sh.place(mesh, np.asarray(getattr(s, f.name)), rows=f.name != "stop_ids")
              for f in dataclasses.fields(s)}
    return dataclasses.replace(s, **placed)


def bench_decode(weights: Any, cfg: Any, mesh: Mesh, *, batch: int, context: int, steps: int, runs: int,
                 dtype: Any) -> dict[str, Any]:
    capacity = context + steps + 16
    cache = sh.create_cache(mesh, num_layers=cfg.num_layers, batch=batch, kv_heads=cfg.num_kv_heads,
                            capacity=capacity, head_dim=cfg.head_dim, dtype=dtype)
    params = sh.place(mesh, SamplingArrays.from_params([GREEDY] * batch))
    _, decode = _programs(mesh)
    n = jnp.int32(steps)
    times, compiles = [], []
    for i in range(runs + 2):  # a compile call and a warm-up call, then the timed runs
        state = _state(mesh, batch, capacity, cfg.vocab_size, context)
        with count_compiles() as log:
            start = time.perf_counter()
            state, cache = decode(weights, cache, state, params, n, cfg=cfg, ops=Ops(sharded=True))
            jax.block_until_ready((state, cache))
            seconds = time.perf_counter() - start
        compiles.append(log.compiles)
        if i >= 2:
            times.append(seconds)
    done = int(sh.host(state.count).min())
    kv_bytes_read = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * (context + steps / 2) \
        * jnp.dtype(dtype).itemsize  # all devices together; each reads its kv heads' share
    t = statistics.median(times)
    return {"batch": batch, "context": context, "steps": steps, "steps_done_min": done, "run_seconds": times,
            "seconds_per_step": t / steps, "tokens_per_second": batch * steps / t,
            "kv_bytes_read_per_step": kv_bytes_read, "compiles_per_call": compiles}


def weight_bytes_per_device(weights: Any) -> float:
    """Weight bytes one device reads per decode step: its shards, less its slice of an untied
    embedding table (a step gathers only a few rows of it)."""
    per_device = sh.device_bytes(weights)
    embed_shard = sh.device_bytes(weights.embed) if weights.embed is not weights.lm_head else {}
    return statistics.mean(b - embed_shard.get(d, 0) for d, b in per_device.items())


def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = DTYPES[args.dtype]
    cfg0 = shape_config(args.shape)
    ceilings = device_ceilings(copy_bytes=args.copy_bytes)
    bw = ceilings["copy_bandwidth_bytes_per_s"]
    print(f"[sharded] {args.shape} {args.dtype} on {len(jax.devices())} x {jax.devices()[0].device_kind}: "
          f"copy bandwidth {bw / 1e9:.0f} GB/s per device", file=sys.stderr)
    points = []
    for tp in args.tp:
        if tp > len(jax.devices()):
            print(f"[sharded] tp={tp}: only {len(jax.devices())} devices, skipped", file=sys.stderr)
            continue
        mesh = sh.make_mesh(tp=tp)
        start = time.perf_counter()
        cfg, weights = random_sharded_weights(cfg0, mesh, dtype)
        jax.block_until_ready(weights)
        draw_seconds = time.perf_counter() - start
        w_dev = weight_bytes_per_device(weights)
        for batch in args.batches:
            p = bench_decode(weights, cfg, mesh, batch=batch, context=args.context, steps=args.steps,
                             runs=args.runs, dtype=dtype)
            step_bytes = w_dev + p["kv_bytes_read_per_step"] / tp  # per device
            p |= {"tp": tp, "weight_bytes_per_device": w_dev, "draw_seconds": draw_seconds,
                  "fraction_of_aggregate_copy_bandwidth": step_bytes / p["seconds_per_step"] / bw}
            points.append(p)
            print(f"[sharded] tp={tp} batch={batch}: {p['tokens_per_second']:.1f} tok/s, "
                  f"{p['seconds_per_step'] * 1e3:.2f} ms/step, {100 * p['fraction_of_aggregate_copy_bandwidth']:.0f}% "
                  f"of {tp} x copy bandwidth", file=sys.stderr)
        del weights
    for p in points:  # scaling efficiency: tokens/s per device against TP 1 at the same batch
        base = next((q for q in points if q["tp"] == 1 and q["batch"] == p["batch"]), None)
        p["scaling_efficiency"] = p["tokens_per_second"] / (p["tp"] * base["tokens_per_second"]) if base else None
    return {"shape": args.shape, "dtype": args.dtype, "context": args.context, "steps": args.steps,
            "devices": len(jax.devices()), "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"), "ceilings": ceilings, "points": points}


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({p["batch"] for p in result["points"]}):
        pts = [p for p in result["points"] if p["batch"] == batch]
        ax.plot([p["tp"] for p in pts], [p["tokens_per_second"] for p in pts], "o-", label=f"batch {batch}")
    ax.set(xlabel="tensor parallel devices", ylabel="decode tokens/s", xticks=sorted({p["tp"] for p in result["points"]}),
           title=f"{result['shape']} {result['dtype']}, {result['device_kind']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description="sharded decode benchmark (tensor parallel)")
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--tp", type=ints, default=(1, 2, 4))
    ap.add_argument("--batches", type=ints, default=(1, 32))
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--copy-bytes", type=int, default=None, help="copy-bandwidth buffer (default: the bench's)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON ('' for none)")
    ap.add_argument("--commit", default=None, help="the git commit to record (the device machine has no .git)")
    args = ap.parse_args()
    result = run(args)
    result["commit"] = args.commit
    result["jax"] = jax.__version__
    if args.out:
        kind = "".join(c if c.isalnum() else "-" for c in result["device_kind"].lower()).strip("-")
        path = Path(args.out) / f"sharded_{args.shape}_{args.dtype}_{kind}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=float) + "\n")
        plot(result, path.with_suffix(".png"))
        print(f"[sharded] wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
