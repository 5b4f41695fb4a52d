"""The exact elementwise variant for a few rows of x (<= MAX_FMA_ROWS): tiles in the layout's own
shape [BN, super-rows, R, B, W], each scale and offset loaded once per group and broadcast,
products with x accumulated elementwise across the K loop and reduced once at the end."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ferrum_jax.quant.qweight import QuantWeight
from pallas_kernels.quant_matmul.common import (
    GemvConfig,
    decode_tile,
    unpack_refs,
    weight_views,
)


def fma_rows(x_ref, wrefs: dict, f, *, nsb: int, steps: int, base, m_rows: int, rows: tuple = (slice(None),),
             block_n: int | None = None, x_row=0) -> list[jax.Array]:
    """float32 [BN] per row m < m_rows of x_ref: x[m] @ W^T over super-rows [base, base + steps * nsb)
    of the weight views `wrefs` (a block of BN rows in the layout's own shape): products with x
    accumulate elementwise across the loop and are reduced once at the end. x_ref
    [M, K/S, R, A, B, W] float32, rows x_row + m; `rows` and `block_n` as in `dp4a.dp4a_rows`."""
    _, b_fields, wd = f.split
    block_n, r = block_n or wrefs["lo"].shape[0], wrefs["lo"].shape[-3]

    def step(t, acc):
        blk = pl.ds(pl.multiple_of(base + t * nsb, nsb), nsb)
        acc = list(acc)
        for a, w in enumerate(decode_tile(f, wrefs, blk, rows)):
            for m in range(m_rows):
                acc[m] = acc[m] + w * x_ref[x_row + m, blk, :, a, :, :].astype(jnp.float32)[None]
        return tuple(acc)

    shape = (block_n, nsb, r, b_fields, wd)
    acc = lax.fori_loop(0, steps, step, tuple(jnp.zeros(shape, jnp.float32) for _ in range(m_rows)))
    return [jnp.sum(jnp.sum(jnp.sum(jnp.sum(a, axis=4), axis=3), axis=2), axis=1) for a in acc]


def _fma_kernel(*refs, f, present: tuple[bool, ...], nsb: int, steps: int, m_rows: int):
    (x_ref,), wrefs, o_ref = unpack_refs(refs, present, 1)
    rows = fma_rows(x_ref, wrefs, f, nsb=nsb, steps=steps, base=pl.program_id(2) * steps * nsb, m_rows=m_rows)
    for m in range(m_rows):
        o_ref[0, m, :] = rows[m].astype(o_ref.dtype)


def fma_call(x2: jax.Array, w: QuantWeight, config: GemvConfig, params: dict, interpret: bool,
              out_dtype=jnp.float32) -> jax.Array:
    f = w.fmt
    n_pad, k = w.lo.shape[0], w.shape[1]
    m_rows = x2.shape[0]
    a_fields, b_fields, wd = f.split
    sup = f.super_group or f.group
    r, nsup = sup // f.group, k // sup
    views, present = weight_views(w)
    views = [x2.astype(jnp.float32).reshape(m_rows, nsup, r, a_fields, b_fields, wd)] + views
    nsb = config.block_k // sup
    steps = nsup // (nsb * config.split_k)
    bn = config.block_n
    zeros = lambda nd: (0,) * nd
    in_specs = [pl.BlockSpec(views[0].shape, lambda i, j, s: zeros(6))]
    in_specs += [pl.BlockSpec((bn, *v.shape[1:]), lambda i, j, s, nd=v.ndim: (i,) + zeros(nd - 1)) for v in views[1:]]
    return pl.pallas_call(
        partial(_fma_kernel, f=f, present=present, nsb=nsb, steps=steps, m_rows=m_rows),
        out_shape=jax.ShapeDtypeStruct((config.split_k, m_rows, n_pad), out_dtype),
        grid=(n_pad // bn, 1, config.split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, m_rows, bn), lambda i, j, s: (s, 0, i)),
        interpret=interpret,
        **params,
    )(*views)
