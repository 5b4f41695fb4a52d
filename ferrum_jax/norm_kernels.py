"""GPU kernel registrations for `add_rms_norm` (a residual add and the RMS norm after it) and
`project_add_rms_norm` (the same, of a residual still to be projected).

`add_rms_norm` -> `pallas_add_rms_norm` (pallas_kernels/norm/add_rms_norm.py): one kernel for what
XLA compiles to three small ones (add, sum of squares, scaling), twice per layer. It declines, with
the reason, what it cannot take (mixed dtypes, rows wider than one block, ...), and the XLA
reference runs instead. Not partitionable: on a mesh the reference runs (GSPMD splits it freely).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ferrum_jax import ops as _ops  # noqa: F401  registers the references first (register() keeps them last)
from ferrum_jax.backend import Impl, register
from pallas_kernels.linear import splitk_gemv
from pallas_kernels.norm import add_rms_norm as _kernel

MIN_OUT_FEATURES = 4096


def pallas_add_rms_norm(x: jax.Array, residual: jax.Array, w: jax.Array, *, eps: float,
                        offset: float = 0.0) -> tuple[jax.Array, jax.Array]:
    return _kernel.add_rms_norm(x, residual, w, eps=eps, offset=offset)


def _applies(x: Any, residual: Any, w: Any, *, eps: float, offset: float = 0.0) -> str | None:
    return _kernel.unsupported(x, residual, w)


register("add_rms_norm", Impl("pallas_add_rms_norm", pallas_add_rms_norm, platforms=frozenset({"gpu"}),
                              partitionable=False, applies=_applies))


def pallas_splitk_add_rms_norm(x: jax.Array, residual: Any, w: jax.Array, *, eps: float, offset: float = 0.0,
                               ops: Any = None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    partials = splitk_gemv.splitk_gemv(residual.x, residual.w, act=residual.act, interpret=interpret)
    partials = partials.reshape(partials.shape[0], *x.shape)
    return _kernel.add_partials_rms_norm(x, partials, w, eps=eps, offset=offset, interpret=interpret)


def _splitk_applies(x: Any, residual: Any, w: Any, *, eps: float, offset: float = 0.0, ops: Any = None) -> str | None:
    if residual.bias is not None:
        return "the projection has a bias"
    reason = splitk_gemv.unsupported(residual.x, residual.w, residual.act)
    if reason is not None:
        return reason
    n = residual.w.shape[0]
    if n < MIN_OUT_FEATURES:
        return f"{n} output features < {MIN_OUT_FEATURES} (XLA's reduction fusion measured faster)"
    if x.shape[-1] != n or x.size != n:
        return f"x {x.shape} is not one row of the projection's {n} outputs"
    splits = splitk_gemv.choose_config(n, residual.w.shape[1]).splits
    return _kernel.unsupported_partials(x, jax.ShapeDtypeStruct((splits, *x.shape), jnp.float32), w)


register("project_add_rms_norm", Impl("pallas_splitk_add_rms_norm", pallas_splitk_add_rms_norm,
                                      platforms=frozenset({"gpu"}), partitionable=False, applies=_splitk_applies))
