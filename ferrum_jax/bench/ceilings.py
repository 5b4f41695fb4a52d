"""The device's ceilings: copy bandwidth and bf16 matmul rate (medians of several reps), and the
device memory still free (what a sweep point may use)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ferrum_jax.bench.config import now

MEMORY_HEADROOM = 0.9  # use at most this share of the device memory still free


def _median_rate(fn: Callable[..., Any], args: tuple, work: float, reps: int, inner: int
                 ) -> tuple[float, list[float]]:
    """work / (median seconds of one call fn(*args)), timing `inner` back-to-back calls per rep."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        start = now()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((now() - start) / inner)
    return work / statistics.median(times), times


def device_ceilings(copy_bytes: int | None = None, matmul_n: int | None = None, reps: int | None = None
                    ) -> dict[str, Any]:
    """The default device's copy bandwidth (bytes read + written per second by a device-to-device
    copy of `copy_bytes`: 4 GiB on accelerators, 256 MiB on the CPU) and bf16 matmul rate (FLOP/s of
    an n x n x n matmul: n = 8192 on accelerators, 1024 on the CPU), medians of `reps` reps."""
    cpu = jax.default_backend() == "cpu"
    copy_bytes = copy_bytes or ((256 << 20) if cpu else (4 << 30))
    matmul_n = matmul_n or (1024 if cpu else 8192)
    reps = reps or (3 if cpu else 10)
    inner = 1 if cpu else 5

    n = copy_bytes // 4
    copy = jax.jit(lambda a: a + 1)  # reads and writes every byte
    bandwidth, copy_times = _median_rate(copy, (jnp.ones((n,), jnp.float32),), 8.0 * n, reps, inner)

    key = jax.random.PRNGKey(0)
    shape = (matmul_n, matmul_n)
    mats = (jax.random.normal(key, shape, jnp.bfloat16),
            jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.bfloat16))
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    flops, mm_times = _median_rate(mm, mats, 2.0 * matmul_n ** 3, reps, inner)
    del mats
    return {"copy_bandwidth_bytes_per_s": bandwidth, "copy_buffer_bytes": int(copy_bytes),
            "copy_seconds": copy_times, "matmul_bf16_flops_per_s": flops, "matmul_n": int(matmul_n),
            "matmul_seconds": mm_times, "reps": reps, "calls_per_rep": inner}


def memory_stats() -> dict[str, int] | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  pragma: no cover - backends without the call
        return None
    return dict(stats) if stats else None


def fits(need: int) -> tuple[bool, str | None]:
    """Whether `need` more bytes fit in the device memory still free (unknown on the CPU: yes)."""
    stats = memory_stats()
    if not stats or "bytes_limit" not in stats:
        return True, None
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if need <= MEMORY_HEADROOM * free:
        return True, None
    return False, f"needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free of {stats['bytes_limit'] / 1e9:.1f} GB"
