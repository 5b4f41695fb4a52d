"""GPU kernel registration for dense `linear` at decode (a few rows of x).

`linear` -> `pallas_gemv` (pallas_kernels/linear/gemv.py) for dense weights of at most MAX_BYTES,
1..4 rows of x, and outputs at least WIDE_RATIO times the inputs (N >= 2K: Qwen3-30B-A3B's qkv
[5120, 2048]). There it is as fast as XLA's best and does not change from one compile to the next:
XLA's autotuner times its candidates with the weight L2-resident and, for ~20 MB weights, picked a
Triton GEMM in some compiles that runs at half the bandwidth in the model (Qwen3-30B-A3B's qkv in
a decode profile on an H200: 13.2 us, 7.2 us as the GEMV; bench/results/gemv_bench_*). Narrower
projections (o, down, the router) measured faster through XLA (with every dense Llama-3.1-8B
projection as the GEMV, batch 1 at 2k ran at 217.8-231.9 tok/s against 233.1-233.7 in the same
session: bench/results/decode_launch_defaults_ab_*), and the vocabulary projections (0.6-1 GB)
stream at the copy bandwidth through XLA already (the GEMV 3-5% behind), so the kernel declines
them, as it does prefill-sized x, quantized weights (their own kernels) and mixed dtypes.
Not partitionable: on a mesh XLA runs the matmul.
"""

from __future__ import annotations

from typing import Any

import jax

from ferrum_jax import ops as _ops  # noqa: F401  registers the references first (register() keeps them last)
from ferrum_jax.backend import Impl, register
from pallas_kernels.linear import gemv

WIDE_RATIO = 2  # out_features / in_features from which the GEMV beat XLA at decode (H200)
MAX_BYTES = 128 << 20  # larger weights: XLA streams them at the copy bandwidth


def pallas_gemv(x: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    return gemv.gemv(x, w, bias)


def _applies(x: Any, w: Any, bias: Any = None) -> str | None:
    reason = gemv.unsupported(x, w, bias)
    if reason is not None:
        return reason
    n, k = w.shape
    if n < WIDE_RATIO * k:
        return f"weight [{n}, {k}] narrower than {WIDE_RATIO}x its inputs (XLA measured faster)"
    if w.size * w.dtype.itemsize > MAX_BYTES:
        return f"weight of {w.size * w.dtype.itemsize >> 20} MiB > {MAX_BYTES >> 20} MiB (XLA streams it as fast)"
    return None


register("linear", Impl("pallas_gemv", pallas_gemv, platforms=frozenset({"gpu"}), partitionable=False,
                        applies=_applies))
