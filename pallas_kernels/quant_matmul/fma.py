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


def _fma_kernel(*refs, f, present: tuple[bool, ...], nsb: int, steps: int, m_rows: int):
    """Elementwise variant: products with x accumulate elementwise across the loop and are reduced
    once at the end."""
    (x_ref,), wrefs, o_ref = unpack_refs(refs, present, 1)  # x [M, K/S, R, A, B, W]
    _, b_fields, wd = f.split
    block_n, r = wrefs["lo"].shape[0], wrefs["lo"].shape[2]
    base = pl.program_id(2) * steps * nsb

    def step(t, acc):
        blk = pl.ds(pl.multiple_of(base + t * nsb, nsb), nsb)
        acc = list(acc)
        for a, w in enumerate(decode_tile(f, wrefs, blk)):
            for m in range(m_rows):
                acc[m] = acc[m] + w * x_ref[m, blk, :, a, :, :].astype(jnp.float32)[None]
        return tuple(acc)

    shape = (block_n, nsb, r, b_fields, wd)
    acc = lax.fori_loop(0, steps, step, tuple(jnp.zeros(shape, jnp.float32) for _ in range(m_rows)))
    for m in range(m_rows):
        o_ref[0, m, :] = jnp.sum(jnp.sum(jnp.sum(jnp.sum(acc[m], axis=4), axis=3), axis=2), axis=1)


def fma_call(x2: jax.Array, w: QuantWeight, config: GemvConfig, params: dict, interpret: bool) -> jax.Array:
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
        out_shape=jax.ShapeDtypeStruct((config.split_k, m_rows, n_pad), jnp.float32),
        grid=(n_pad // bn, 1, config.split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, m_rows, bn), lambda i, j, s: (s, 0, i)),
        interpret=interpret,
        **params,
    )(*views)
