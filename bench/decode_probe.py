"""Quick GPU probe: batch-1 decode of a random Llama-3.1-8B-shaped bf16 model against the device's
measured copy bandwidth. (The full instrument is issue 7's `ferrum-jax bench`.)

    python bench/decode_probe.py [--shape llama-3.1-8b] [--batch 1] [--context 1024] [--steps 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

import ferrum_jax as fj
from ferrum_jax.cache import KVCache
from ferrum_jax.compile_log import count_compiles
from ferrum_jax.sampling import GREEDY, SamplingArrays
from ferrum_jax.shapes import random_weights, shape_config


def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 20) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 0)  # a real read and write of every byte
    copy(x).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * nbytes / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=128)
    args = ap.parse_args()

    cfg = shape_config(args.shape)
    weights = random_weights(cfg, jnp.bfloat16)
    weight_bytes = sum(x.nbytes for x in {id(l): l for l in jax.tree_util.tree_leaves(weights)}.values())
    bw = copy_bandwidth()
    b, cap = args.batch, args.context + args.steps + 16
    cache = KVCache.create(num_layers=cfg.num_layers, batch=b, kv_heads=cfg.num_kv_heads, capacity=cap,
                           head_dim=cfg.head_dim, dtype=jnp.bfloat16)
    tokens = jnp.ones((b, 16), jnp.int32)
    params = SamplingArrays.from_params([GREEDY] * b)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.zeros((b,), jnp.uint32))
    stop = jnp.full((8,), -1, jnp.int32)
    max_new = jnp.full((b,), 1 << 30, jnp.int32)
    ops = fj.DEFAULT_OPS
    state, cache = fj.prefill(weights, cache, tokens, jnp.full((b,), 16, jnp.int32), params, max_new, stop, keys,
                              cfg=cfg, ops=ops)
    state, cache = fj.decode(weights, cache, state, params, jnp.int32(4), cfg=cfg, ops=ops)  # compile + warm
    jax.block_until_ready(state)
    runs = []
    with count_compiles() as log:
        for _ in range(3):
            t = time.perf_counter()
            state, cache = fj.decode(weights, cache, state, params, jnp.int32(args.steps), cfg=cfg, ops=ops)
            jax.block_until_ready(state)
            runs.append(time.perf_counter() - t)
    step = float(np.median(runs)) / args.steps
    kv_bytes = cache.nbytes  # the reference decode attention reads every slot of the cache
    result = {
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "shape": args.shape, "dtype": "bfloat16", "batch": b, "cache_capacity": cap,
        "tokens_per_second": b / step, "ms_per_step": step * 1e3,
        "weight_bytes": weight_bytes, "kv_bytes_read_per_step": kv_bytes,
        "weight_bandwidth_fraction": weight_bytes / step / bw,
        "weight_plus_kv_bandwidth_fraction": (weight_bytes + kv_bytes) / step / bw,
        "copy_bandwidth_GBps": bw / 1e9, "compiles_during_timing": log.compiles,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
