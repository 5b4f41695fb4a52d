"""Compile time through the persistent compilation cache: the decode and prefill programs compiled
cold, then warm, in two fresh processes (`python -m ferrum_jax.bench --compile-probe`) sharing one
cache directory."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ferrum_jax.backend import Ops
from ferrum_jax.bench.config import REPO, now, tail
from ferrum_jax.bench.sweeps import host_state
from ferrum_jax.cache import KVCache
from ferrum_jax.compile_log import count_compiles, enable_persistent_cache
from ferrum_jax.generate import EOS_SLOTS, decode, prefill
from ferrum_jax.sampling import GREEDY, SamplingArrays


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def compile_probe(spec_path: str, cache_dir: str) -> dict[str, Any]:
    """In a fresh process: lower and compile the decode and prefill programs of the pickled spec
    (abstract weights: no device memory for them) with the persistent cache in `cache_dir`."""
    import ferrum_jax  # noqa: F401  registers the ops

    events: dict[str, int] = {}
    jax.monitoring.register_event_listener(lambda name, **_: events.__setitem__(name, events.get(name, 0) + 1))
    enable_persistent_cache(cache_dir)
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    cfg, ops, weights, b, cap, length = (spec[k] for k in ("cfg", "ops", "weights", "batch", "capacity", "length"))
    kv = spec["kv_dtype"]
    sds = jax.ShapeDtypeStruct
    out: dict[str, Any] = {"platform": jax.default_backend()}

    def cache_of(batch: int, capacity: int) -> Any:
        return jax.eval_shape(lambda: KVCache.create(num_layers=cfg.num_layers, batch=batch, kv_heads=cfg.num_kv_heads,
                                                     capacity=capacity, head_dim=cfg.head_dim, dtype=kv))

    params = _abstract(SamplingArrays.from_params([GREEDY] * b))
    state = _abstract(host_state(b, cap, cfg.vocab_size, 0))
    with count_compiles() as log:
        start = now()
        decode.lower(weights, cache_of(b, cap), state, params, sds((), jnp.int32), cfg=cfg, ops=ops).compile()
        out["decode_seconds"] = now() - start
    out["decode_backend_compiles"] = log.compiles
    with count_compiles() as log:
        start = now()
        prefill.lower(weights, cache_of(1, length), sds((1, length), jnp.int32), sds((1,), jnp.int32),
                      _abstract(SamplingArrays.from_params([GREEDY])), sds((1,), jnp.int32),
                      sds((EOS_SLOTS,), jnp.int32), sds((1, 2), jnp.uint32), cfg=cfg, ops=ops).compile()
        out["prefill_seconds"] = now() - start
    out["prefill_backend_compiles"] = log.compiles
    out["cache_hits"] = events.get("/jax/compilation_cache/cache_hits", 0)
    out["cache_misses"] = events.get("/jax/compilation_cache/cache_misses", 0)
    return out


def compile_cache_check(cfg: Any, weights: Any, ops: Ops, *, batch: int, capacity: int, length: int,
                        kv_dtype: Any, timeout: float = 600.0) -> dict[str, Any]:
    """Compile the decode program (batch, capacity) and the prefill program (length) in two fresh
    processes sharing one empty persistent-cache directory: the first compiles cold and fills the
    cache, the second should load both programs from it. Times are lower + compile wall seconds;
    process_seconds is the child's whole life (interpreter, imports, backend start, compiles)."""
    result: dict[str, Any] = {"decode_batch": batch, "decode_capacity": capacity, "prefill_length": length}
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="ferrum-bench-") as tmp:
        spec = Path(tmp) / "spec.pkl"
        with open(spec, "wb") as f:
            pickle.dump({"cfg": cfg, "ops": ops, "weights": _abstract(weights), "batch": batch, "capacity": capacity,
                         "length": length, "kv_dtype": jnp.dtype(kv_dtype).name}, f)
        cache_dir = Path(tmp) / "xla-cache"
        deadline = now() + timeout
        for name in ("cold", "warm"):
            start = now()
            try:
                proc = subprocess.run([sys.executable, "-m", "ferrum_jax.bench", "--compile-probe", str(spec),
                                       str(cache_dir)], capture_output=True, text=True, check=False, cwd=REPO, env=env,
                                      timeout=max(deadline - now(), 1.0))
            except subprocess.TimeoutExpired:
                result[name] = {"error": f"timed out after {timeout:.0f} s"}
                break
            seconds = now() - start
            if proc.returncode != 0:
                result[name] = {"error": f"exit {proc.returncode}: {tail(proc.stderr)}"}
                break
            try:
                result[name] = json.loads(proc.stdout.strip().splitlines()[-1]) | {"process_seconds": seconds}
            except (ValueError, IndexError):
                result[name] = {"error": f"no JSON on stdout: {tail(proc.stdout + proc.stderr)}"}
                break
        cold, warm = result.get("cold", {}), result.get("warm", {})
        if "decode_seconds" in cold and "decode_seconds" in warm:
            result["files_in_cache"] = sum(1 for p in cache_dir.rglob("*") if p.is_file())
            result["decode_speedup"] = cold["decode_seconds"] / max(warm["decode_seconds"], 1e-9)
            result["prefill_speedup"] = cold["prefill_seconds"] / max(warm["prefill_seconds"], 1e-9)
    return result
