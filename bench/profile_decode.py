"""Where a decode step's time goes: trace `steps` decode steps with jax.profiler and sum the GPU
kernel time by kernel (name prefix), for a named shape with random weights.

    python bench/profile_decode.py --shape llama-3.1-8b --dtype q4_k --out /tmp/prof

Prints the kernels by total time, GPU busy time per step and the wall time per step (the gap is
launch overhead and idle GPU)."""
import argparse
import collections
import gzip
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ferrum_jax.backend import Ops  # noqa: E402
from ferrum_jax.bench.sweeps import host_state  # noqa: E402
from ferrum_jax.bench.weights import random_quantized_weights  # noqa: E402
from ferrum_jax.cache import KVCache  # noqa: E402
from ferrum_jax.generate import decode  # noqa: E402
from ferrum_jax.sampling import GREEDY, SamplingArrays  # noqa: E402
from ferrum_jax.shapes import random_weights, shape_config  # noqa: E402


def kernel_events(trace_dir: Path) -> list[dict]:
    path = max(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)  # this run's, not an older one
    trace = json.loads(gzip.open(path).read())
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]


def group(name: str) -> str:
    return re.sub(r"[._]\d+$", "", re.sub(r"\(.*", "", name))[:60]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--dtype", default="q4_k")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default="/tmp/ferrum-profile")
    ap.add_argument("--sequence", type=int, default=0, metavar="N",
                    help="also print N consecutive kernels of the last step in launch order (one layer's worth)")
    ap.add_argument("--hlo", default="", metavar="PATH", help="write the optimized HLO of the decode program here")
    ap.add_argument("--args", default="", metavar="KERNEL",
                    help="print the trace details (and launch-order neighbours) of 3 calls of this kernel group")
    ap.add_argument("--force", default="", metavar="OP=IMPL,...", help="pin ops, e.g. decode_attention_append=xla")
    args = ap.parse_args()
    ops = Ops(force=tuple(tuple(p.split("=", 1)) for p in args.force.split(",") if p))
    cfg = shape_config(args.shape)
    if args.dtype == "bf16":
        weights = random_weights(cfg, jnp.bfloat16)
    else:
        weights, _ = random_quantized_weights(cfg, args.dtype.upper(), jnp.bfloat16)
    capacity = args.context + args.steps + 64
    cache = KVCache.create(num_layers=cfg.num_layers, batch=args.batch, kv_heads=cfg.num_kv_heads,
                           capacity=capacity, head_dim=cfg.head_dim, dtype=jnp.bfloat16)
    params = SamplingArrays.from_params([GREEDY] * args.batch)
    n = jax.device_put(np.int32(args.steps))
    run = lambda state, cache: decode(weights, cache, state, params, n, cfg=cfg, ops=ops)
    state, cache = run(host_state(args.batch, capacity, cfg.vocab_size, args.context), cache)
    jax.block_until_ready(cache)
    state = host_state(args.batch, capacity, cfg.vocab_size, args.context)
    if args.hlo:
        lowered = decode.lower(weights, cache, state, params, n, cfg=cfg, ops=ops)
        Path(args.hlo).write_text(lowered.compile().as_text())
    out = Path(args.out)
    with jax.profiler.trace(str(out)):
        t0 = time.perf_counter()
        state, cache = run(state, cache)
        jax.block_until_ready(cache)
        wall = time.perf_counter() - t0
    events = kernel_events(out)
    by = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        g = by[group(e["name"])]
        g[0] += e["dur"]
        g[1] += 1
    busy = sum(v[0] for v in by.values())
    print(f"{args.shape} {args.dtype} batch {args.batch}: wall {wall / args.steps * 1e3:.3f} ms/step, "
          f"GPU kernels {busy / args.steps / 1e3:.3f} ms/step, {sum(v[1] for v in by.values()) / args.steps:.0f} kernels/step")
    for name, (dur, count) in sorted(by.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {dur / args.steps:9.1f} us/step {count / args.steps:6.1f}/step  {dur / count:7.1f} us each  {name}")
    if args.args:
        events.sort(key=lambda e: e["ts"])
        hits = [i for i, e in enumerate(events) if group(e["name"]) == args.args][:3]
        for i in hits:
            print(f"{args.args}: {json.dumps(events[i].get('args', {}))[:600]}")
            print("  after " + ", ".join(group(e["name"]) for e in events[max(i - 3, 0):i])
                  + "; before " + ", ".join(group(e["name"]) for e in events[i + 1:i + 3]))
    if args.sequence:
        # The middle of the last step: a layer away from the loop's first and last kernels.
        events.sort(key=lambda e: e["ts"])
        per_step = len(events) // args.steps
        start = len(events) - per_step // 2
        print(f"kernels {start}..{start + args.sequence} in launch order (us, gap before):")
        for prev, e in zip(events[start - 1:], events[start:start + args.sequence]):
            print(f"  {e['dur']:7.1f}  +{e['ts'] - prev['ts'] - prev['dur']:5.1f}  {e['name'][:90]}")


if __name__ == "__main__":
    main()
