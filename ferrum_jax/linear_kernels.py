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

`add_rms_norm_linear` -> `pallas_add_rms_norm_gemv` (pallas_kernels/linear/norm_gemv.py): the
layer's residual add and input norm inside the qkv projection's GEMV, one kernel where the decode
step ran two, for the weights the plain GEMV takes (the same rules). In a decode profile on an H200
(bench/results/norm_gemv_ab_*): Qwen3-30B-A3B's qkv 8.7-9.0 us where the add-and-norm kernel and
the GEMV took 1.9 + 7.3 (GPU time a step 2.816-2.822 vs 2.845 ms; end to end within the run-to-run
noise, 357-362 tok/s either way). Llama-3.1-8B's narrower qkv [6144, 4096] took 18.4 us fused
against 2.1 + 14.0 + 1.3 (norm, XLA's split-K GEMM and its sum): no gain (4.329 vs 4.337 ms a step;
every other tile choice measured slower), so the narrow ones keep the separate kernels. The same
fusion with an MoE router (returning the normed row for the experts) saved ~0.6 us a layer in the
profile and nothing end to end: not kept. Elsewhere the reference runs `add_rms_norm` and
`linear`, each with its own kernels.
"""

from __future__ import annotations

from typing import Any

import jax

from ferrum_jax import ops as _ops  # noqa: F401  registers the references first (register() keeps them last)
from ferrum_jax.backend import Impl, register
from pallas_kernels.linear import gemv, norm_gemv

WIDE_RATIO = 2  # out_features / in_features from which the GEMV beat XLA at decode (H200)
MAX_BYTES = 128 << 20  # larger weights: XLA streams them at the copy bandwidth


def pallas_gemv(x: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    return gemv.gemv(x, w, bias)


def _applies(x: Any, w: Any, bias: Any = None) -> str | None:
    reason = gemv.unsupported(x, w, bias)
    if reason is not None:
        return reason
    return _measured_faster(w)


def _measured_faster(w: jax.Array) -> str | None:
    n, k = w.shape
    if n < WIDE_RATIO * k:
        return f"weight [{n}, {k}] narrower than {WIDE_RATIO}x its inputs (XLA measured faster)"
    if w.size * w.dtype.itemsize > MAX_BYTES:
        return f"weight of {w.size * w.dtype.itemsize >> 20} MiB > {MAX_BYTES >> 20} MiB (XLA streams it as fast)"
    return None


register("linear", Impl("pallas_gemv", pallas_gemv, platforms=frozenset({"gpu"}), partitionable=False,
                        applies=_applies))


def pallas_add_rms_norm_gemv(x: jax.Array, residual: jax.Array | None, norm_w: jax.Array, w: jax.Array,
                             bias: jax.Array | None = None, *, eps: float, offset: float = 0.0,
                             ops: Any = None) -> tuple[jax.Array, jax.Array]:
    return norm_gemv.add_rms_norm_gemv(x, residual, norm_w, w, bias, eps=eps, offset=offset)


def _norm_applies(x: Any, residual: Any, norm_w: Any, w: Any, bias: Any = None, *, eps: float,
                  offset: float = 0.0, ops: Any = None) -> str | None:
    reason = norm_gemv.unsupported(x, residual, norm_w, w, bias)
    return reason if reason is not None else _measured_faster(w)


register("add_rms_norm_linear", Impl("pallas_add_rms_norm_gemv", pallas_add_rms_norm_gemv,
                                     platforms=frozenset({"gpu"}), partitionable=False, applies=_norm_applies))
