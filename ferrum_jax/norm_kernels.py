"""GPU kernel registration for `add_rms_norm` (a residual add and the RMS norm after it).

`add_rms_norm` -> `pallas_add_rms_norm` (pallas_kernels/norm/add_rms_norm.py): one kernel for what
XLA compiles to three small ones (add, sum of squares, scaling), twice per layer. It declines, with
the reason, what it cannot take (mixed dtypes, rows wider than one block, ...), and the XLA
reference runs instead. Not partitionable: on a mesh the reference runs (GSPMD splits it freely).
"""

from __future__ import annotations

from typing import Any

import jax

from ferrum_jax import ops as _ops  # noqa: F401  registers the references first (register() keeps them last)
from ferrum_jax.backend import Impl, register
from pallas_kernels.norm import add_rms_norm as _kernel


def pallas_add_rms_norm(x: jax.Array, residual: jax.Array, w: jax.Array, *, eps: float,
                        offset: float = 0.0) -> tuple[jax.Array, jax.Array]:
    return _kernel.add_rms_norm(x, residual, w, eps=eps, offset=offset)


def _applies(x: Any, residual: Any, w: Any, *, eps: float, offset: float = 0.0) -> str | None:
    return _kernel.unsupported(x, residual, w)


register("add_rms_norm", Impl("pallas_add_rms_norm", pallas_add_rms_norm, platforms=frozenset({"gpu"}),
                              partitionable=False, applies=_applies))
