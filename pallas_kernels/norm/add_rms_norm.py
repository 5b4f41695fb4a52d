"""The residual add and the following RMS norm of a transformer layer in one kernel.

`x = x + h; h = rms_norm(x, w)` is what every layer does twice (attention output, MLP output). XLA
on GPU compiles it to three small kernels (the add, the sum of squares, the scaling), each reading
the row again and each a launch: at decode (a few rows of a few thousand features) each is ~1.4 us
of mostly launch and latency. Here one program loads its rows of x and the residual once, writes
the sum and the normalized sum, and keeps the sum of squares in registers. Measured on an H200
(Llama-3.1-8B bf16, batch 1): 63 fewer kernels per decode step, 2.2 us each instead of three of
~1.45 us, but only ~0.4% of the step, since the split-K reduction of the matmul before it (which
XLA fused into its add) is now a kernel of its own.

- Grid over blocks of `block_rows` rows; a program holds whole rows (the reduction stays in the
  program), padded to a power of two of columns (Triton blocks must be): H = 5376 (Gemma-3-27B)
  loads an 8192-wide block with a column mask, padding reads as 0 and is never stored.
- `s = x + residual` in x's dtype, exactly as jnp rounds it; `normed` follows
  `ferrum_jax.ops.rms_norm` of that rounded s in float32 (the same operation order; only the sum of
  squares is reduced in another order). XLA, allowed excess precision by default, may norm the
  unrounded float32 sum instead when it fuses the two (the interpret mode on CPU does): either way a
  bf16 / f16 output is within one unit in the last place of the other.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from ferrum_jax import ops as ref_ops

FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# A program holds whole rows in registers: past this width it would spill (and no model needs it).
MAX_FEATURES = 16384
# Rows per program: one row for any real model's width, several rows of a narrow one up to this
# many (padded) elements. At batch 1 the launch dominates; at 8192 x 4096 bf16 one row per program
# runs at ~3.7 TB/s on an H200 (XLA's three kernels: ~2.9). H = 64 measured best at 8 rows.
ROW_BLOCK_ELEMENTS = 512
# Triton's pointer arithmetic is 32-bit where the lowering does not widen it.
MAX_ELEMENTS = 2**31 - 1


def _pow2_ceil(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def default_block_rows(rows: int, features: int) -> int:
    """Rows per program: ROW_BLOCK_ELEMENTS of padded columns (1 row at H >= 512, 8 at H = 64), no
    more than the rows there are."""
    per = max(1, ROW_BLOCK_ELEMENTS // _pow2_ceil(features))
    return min(per, _pow2_ceil(rows))


def default_num_warps(block_rows: int, features: int) -> int:
    """One warp per 512 elements of the (padded) block, 2 to 8 (H200 sweeps: 4 at H = 2048, 8 at
    4096 and 5376, 2 for 8 rows of 64; the differences are a few tenths of a microsecond)."""
    return max(2, min(8, block_rows * _pow2_ceil(features) // 512))


def unsupported(x, residual, w) -> str | None:
    """None if `add_rms_norm` takes these arguments, else why not."""
    for name, a in (("x", x), ("residual", residual), ("w", w)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            return f"{name} is {type(a).__name__}, not an array"
    if x.ndim < 1 or x.shape != residual.shape:
        return f"x {x.shape} and residual {residual.shape} differ (or are scalars)"
    if x.dtype != residual.dtype:
        return f"x dtype {x.dtype} != residual dtype {residual.dtype}"
    if jnp.dtype(x.dtype) not in FLOATS or jnp.dtype(w.dtype) not in FLOATS:
        return f"dtypes {x.dtype} / {w.dtype} (bfloat16, float16 or float32)"
    h = x.shape[-1]
    if w.shape != (h,):
        return f"weight shape {w.shape} != ({h},)"
    if not 0 < h <= MAX_FEATURES:
        return f"{h} features (1 to {MAX_FEATURES} in one block)"
    if x.size == 0 or x.size > MAX_ELEMENTS:
        return f"{x.size} elements (1 to {MAX_ELEMENTS}: 32-bit indexing)"
    return None


def _kernel(x_ref, r_ref, w_ref, s_ref, o_ref, *, rows: int, features: int, block_rows: int, eps: float,
            offset: float):
    shape = x_ref.shape  # [block_rows, padded features]
    mask = None
    if features != shape[1]:
        mask = lax.broadcasted_iota(jnp.int32, shape, 1) < features
    if rows % block_rows:  # only then can the last block reach past the rows
        row = pl.program_id(0) * block_rows + lax.broadcasted_iota(jnp.int32, shape, 0)
        mask = row < rows if mask is None else mask & (row < rows)

    def load(ref, m):
        return ref[...] if m is None else pl_triton.load(ref, mask=m, other=jnp.zeros((), ref.dtype))

    def store(ref, val):
        if mask is None:
            ref[...] = val
        else:
            pl_triton.store(ref, val, mask=mask)

    s = load(x_ref, mask) + load(r_ref, mask)  # in x's dtype, as jnp rounds x + residual
    store(s_ref, s)
    sf = s.astype(jnp.float32)
    w = load(w_ref, None if features == shape[1] else lax.iota(jnp.int32, shape[1]) < features)
    # The padding columns are 0: they add nothing to the sum of squares, which is divided by the real width.
    inv = lax.rsqrt(jnp.sum(sf * sf, axis=1, keepdims=True) / features + eps)
    store(o_ref, ((sf * inv) * (offset + w.astype(jnp.float32))[None, :]).astype(s.dtype))


@partial(jax.jit, static_argnames=("eps", "offset", "block_rows", "num_warps", "interpret"))
def add_rms_norm(x: jax.Array, residual: jax.Array, w: jax.Array, *, eps: float, offset: float = 0.0,
                 block_rows: int | None = None, num_warps: int | None = None,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(s, rms_norm(s, w)) with s = x + residual, for x, residual [..., H] of one float dtype and
    w [H]. block_rows (a power of two) and num_warps default to `default_block_rows` /
    `default_num_warps`."""
    reason = unsupported(x, residual, w)
    if reason is not None:
        raise ValueError(f"add_rms_norm: {reason}")
    h = x.shape[-1]
    rows = x.size // h
    br = block_rows or default_block_rows(rows, h)
    if br & (br - 1):
        raise ValueError(f"add_rms_norm: block_rows {br} is not a power of two")
    hp = _pow2_ceil(h)
    kernel = partial(_kernel, rows=rows, features=h, block_rows=br, eps=float(eps), offset=float(offset))
    row_block = pl.BlockSpec((br, hp), lambda i: (i, 0))
    params = {} if interpret else {
        "compiler_params": pl_triton.CompilerParams(num_warps=num_warps or default_num_warps(br, h), num_stages=1)}
    s, normed = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(rows, br),),
        in_specs=[row_block, row_block, pl.BlockSpec((hp,), lambda i: (0,))],
        out_specs=[row_block, row_block],
        out_shape=[jax.ShapeDtypeStruct((rows, h), x.dtype)] * 2,
        interpret=interpret,
        name="add_rms_norm",
        **params,
    )(x.reshape(rows, h), residual.reshape(rows, h), w)
    return s.reshape(x.shape), normed.reshape(x.shape)


def reference(x: jax.Array, residual: jax.Array, w: jax.Array, *, eps: float,
              offset: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """The oracle: x + residual, then ferrum_jax.ops.rms_norm of the sum."""
    s = x + residual
    return s, ref_ops.rms_norm(s, w, eps=eps, offset=offset)


__all__ = ["add_rms_norm", "default_block_rows", "default_num_warps", "reference", "unsupported"]
