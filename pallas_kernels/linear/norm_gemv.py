"""s = x + residual; y = rms_norm(s, norm_w) @ w^T (+ bias): a layer's residual add, its input norm
and the projection after it (the attention's fused qkv) in one GEMV kernel, for a few rows of x.

At decode the add and the norm are a separate kernel of ~2 us (pallas_kernels/norm/add_rms_norm.py)
whose output, a few KB, only feeds the projection. Here every program of the GEMV (gemv.py's grid
and tiles) issues its weight loads first, then reads the whole row of x (and the residual) from L2,
reduces its sum of squares while the weight bytes are in flight, and multiplies the weight tiles
by the normalized row. Program (0, i) writes row i of s, the residual stream the layer goes on with.

The normalized row is rounded to x's dtype before the products, as `ops.rms_norm` hands it to
`ops.linear`; only the reduction orders differ from `reference` (ferrum_jax.ops' add_rms_norm or
rms_norm, then linear, in jnp). The op's XLA implementation (`ferrum_jax.ops.add_rms_norm_linear`)
calls the same two ops through the dispatch, so each takes its own kernel where this one declines.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ferrum_jax import ops as ref_ops
from pallas_kernels.linear.gemv import FLOATS, GemvConfig, choose_config
from pallas_kernels.linear.gemv import unsupported as gemv_unsupported


def unsupported(x, residual, norm_w, w, bias=None) -> str | None:
    """None if `add_rms_norm_gemv` takes these arguments, else why not."""
    reason = gemv_unsupported(x, w, bias)
    if reason is not None:
        return reason
    if residual is not None and (getattr(residual, "shape", None) != x.shape or residual.dtype != x.dtype):
        return f"residual {getattr(residual, 'shape', type(residual).__name__)} is not x's shape and dtype {x.shape}"
    if getattr(norm_w, "shape", None) != (x.shape[-1],) or jnp.dtype(norm_w.dtype) not in FLOATS:
        return f"norm weight {getattr(norm_w, 'shape', type(norm_w).__name__)} is not a float ({x.shape[-1]},)"
    return None


def _kernel(*refs, block_k: int, steps: int, eps: float, offset: float, has_residual: bool, has_bias: bool):
    it = iter(refs)
    x_ref = next(it)
    r_ref = next(it) if has_residual else None
    nw_ref, w_ref = next(it), next(it)
    b_ref = next(it) if has_bias else None
    o_ref = next(it)
    s_ref = next(it) if has_residual else None
    j, i = pl.program_id(0), pl.program_id(1)
    (bn,) = o_ref.shape
    n0 = pl.multiple_of(j * bn, bn)
    cols = [pl.ds(t * block_k, block_k) for t in range(steps)]
    # The weight tiles first: they do not depend on the norm, so their loads are in flight while it
    # is computed.
    tiles = [w_ref[pl.ds(n0, bn), c] for c in cols]

    def row(c):  # a slice of s in x's dtype, rounded as jnp rounds x + residual
        return x_ref[i, c] + r_ref[i, c] if has_residual else x_ref[i, c]

    squares = jnp.zeros((block_k,), jnp.float32)
    for c in cols:
        sf = row(c).astype(jnp.float32)
        squares = squares + sf * sf
    inv = jax.lax.rsqrt(jnp.sum(squares) / (steps * block_k) + eps)
    acc = jnp.zeros((bn, block_k), jnp.float32)
    for c, w in zip(cols, tiles):
        normed = (row(c).astype(jnp.float32) * inv * (offset + nw_ref[c].astype(jnp.float32))).astype(x_ref.dtype)
        acc = acc + w.astype(jnp.float32) * normed.astype(jnp.float32)[None, :]
    y = jnp.sum(acc, axis=1).astype(o_ref.dtype)
    if has_bias:  # as the reference: the bias added in the output dtype
        y = y + b_ref[pl.ds(n0, bn)].astype(o_ref.dtype)
    o_ref[...] = y
    if has_residual:
        @pl.when(j == 0)
        def _():
            for c in cols:
                s_ref[i, c] = row(c)


@partial(jax.jit, static_argnames=("eps", "offset", "config", "interpret"))
def add_rms_norm_gemv(x: jax.Array, residual: jax.Array | None, norm_w: jax.Array, w: jax.Array,
                      bias: jax.Array | None = None, *, eps: float, offset: float = 0.0,
                      config: GemvConfig | None = None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(s, rms_norm(s, norm_w) @ w^T (+ bias)) with s = x + residual (x when residual is None);
    x [..., K] of at most gemv.MAX_ROWS rows, w [N, K], norm_w [K]."""
    reason = unsupported(x, residual, norm_w, w, bias)
    if reason is not None:
        raise ValueError(f"add_rms_norm_gemv: {reason}")
    n, k = w.shape
    cfg = choose_config(n, k, config)
    xs = x.reshape(-1, k)
    rows = xs.shape[0]
    whole = lambda a: pl.BlockSpec(a.shape, lambda j, i: (0,) * a.ndim)  # noqa: E731
    args = [xs] + ([residual.reshape(rows, k)] if residual is not None else []) + [norm_w, w]
    args += [bias] if bias is not None else []
    out_specs = [pl.BlockSpec((None, cfg.block_n), lambda j, i: (i, j))]
    out_shape = [jax.ShapeDtypeStruct((rows, n), x.dtype)]
    if residual is not None:
        out_specs.append(pl.BlockSpec((rows, k), lambda j, i: (0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((rows, k), x.dtype))
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton
        params = {"compiler_params": pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=1)}
    outs = pl.pallas_call(
        partial(_kernel, block_k=cfg.block_k, steps=k // cfg.block_k, eps=float(eps), offset=float(offset),
                has_residual=residual is not None, has_bias=bias is not None),
        grid=(n // cfg.block_n, rows),
        in_specs=[whole(a) for a in args],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        name="add_rms_norm_gemv",
        **params,
    )(*args)
    s = outs[1].reshape(x.shape) if residual is not None else x
    return s, outs[0].reshape(*x.shape[:-1], n)


def reference(x: jax.Array, residual: jax.Array | None, norm_w: jax.Array, w, bias=None, *, eps: float,
              offset: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """The oracle: `ops.add_rms_norm` (or `rms_norm`), then `ops.linear`, in jnp."""
    if residual is None:
        s, normed = x, ref_ops.rms_norm(x, norm_w, eps=eps, offset=offset)
    else:
        s, normed = ref_ops.add_rms_norm(x, residual, norm_w, eps=eps, offset=offset)
    return s, ref_ops.linear(normed, w, bias)


__all__ = ["add_rms_norm_gemv", "reference", "unsupported"]
