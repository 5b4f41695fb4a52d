"""GPU kernel registration for dense `linear` at decode (a few rows of x).

`linear` -> `pallas_gemv` (pallas_kernels/linear/gemv.py) for dense weights, 1..4 rows of x, and
outputs at least WIDE_RATIO times the inputs (N >= 2K: Qwen3-30B-A3B's qkv [5120, 2048], Llama's
fused gate_up [28672, 4096], the vocabulary projections). There it measured faster than what XLA
compiles (bench/results/gemv_bench_*: Qwen3-30B-A3B's qkv 11.0 vs 17.3 us a call on an H200, where
XLA's autotuner had picked a Triton GEMM that runs at half the bandwidth in the model), and the
choice no longer changes from one compile to the next. Narrower projections (o, down, the router)
measured faster through XLA, so the kernel declines them, as it does prefill-sized x, quantized
weights (their own kernels) and mixed dtypes. Not partitionable: on a mesh XLA runs the matmul.
"""

from __future__ import annotations

from typing import Any

import jax

from ferrum_jax import ops as _ops  # noqa: F401  registers the references first (register() keeps them last)
from ferrum_jax.backend import Impl, register
from pallas_kernels.linear import gemv

WIDE_RATIO = 2  # out_features / in_features from which the GEMV beat XLA at decode (H200)


def pallas_gemv(x: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    return gemv.gemv(x, w, bias)


def _applies(x: Any, w: Any, bias: Any = None) -> str | None:
    reason = gemv.unsupported(x, w, bias)
    if reason is not None:
        return reason
    n, k = w.shape
    if n < WIDE_RATIO * k:
        return f"weight [{n}, {k}] narrower than {WIDE_RATIO}x its inputs (XLA measured faster)"
    return None


register("linear", Impl("pallas_gemv", pallas_gemv, platforms=frozenset({"gpu"}), partitionable=False,
                        applies=_applies))
