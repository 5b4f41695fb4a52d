"""The exact tensor-core variant for 5..64 rows of x: each step dequantizes a [block_n, block_k]
tile to x's dtype and feeds a dot. Tiles are 2-D with the inputs contiguous: field `a` of the codes
(the low / high nibble of each byte) pairs with the activations' view x_a, so no tile is reshaped;
per-column scale indices are gathers that hit L1."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ferrum_jax.quant.qweight import QuantWeight
from pallas_kernels.quant_matmul.common import GemvConfig, to_float, unpack_refs


def _dot_kernel(*refs, f, present: tuple[bool, ...], half: int, steps: int, dot_dtype):
    a_fields, b_fields, wd = f.split
    hb = f.bits - 4
    x_refs, wrefs, o_ref = unpack_refs(refs, present, a_fields)
    lo_ref, hi_ref, sc_ref = wrefs["lo"], wrefs.get("hi"), wrefs["sc"]
    ss_ref, of_ref, so_ref = wrefs.get("ss"), wrefs.get("of"), wrefs.get("so")
    block_m, block_n = x_refs[0].shape[0], lo_ref.shape[0]
    per_group = f.group // a_fields  # columns of one group in a field's view
    r = f.sub_per_super
    rows = jnp.arange(block_n, dtype=jnp.int32)[:, None]
    c_base = pl.program_id(2) * steps * half

    def step(t, acc):
        c0 = pl.multiple_of(c_base + t * half, half)
        col = c0 + jnp.arange(half, dtype=jnp.int32)
        g = (col // per_group)[None, :]
        s = sc_ref[rows, g].astype(jnp.float32)  # [block_n, half]: each column's group scale
        if ss_ref is not None:
            s = s * ss_ref[rows, g // r].astype(jnp.float32)
        o = None
        if f.offset == "const":
            o = f.const * s
        elif f.offset == "zero":
            o = of_ref[rows, g].astype(jnp.float32) * s
        elif f.offset == "min":
            o = -of_ref[rows, g].astype(jnp.float32)
        elif f.offset == "kmin":
            o = so_ref[rows, g // r].astype(jnp.float32) * of_ref[rows, g].astype(jnp.float32)
        lo = lo_ref[:, pl.ds(c0, half)].astype(jnp.int32)
        if hi_ref is not None:
            j = col % per_group  # = b * W + w inside the group
            h = hi_ref[rows, (col // per_group * wd + j % wd)[None, :]].astype(jnp.int32)
            field = (j // wd)[None, :]
        for a in range(a_fields):
            if f.bits == 8:
                w = lo.astype(jnp.float32) * s
            else:
                q = (lo >> (4 * a)) & 15
                if hi_ref is not None:
                    q = q | (((h >> (hb * (a * b_fields + field))) & ((1 << hb) - 1)) << 4)
                w = to_float(q) * s
            if o is not None:
                w = w - o
            xa = x_refs[a][:, pl.ds(c0, half)]  # [block_m, half]
            acc = acc + lax.dot_general(
                xa.astype(dot_dtype), w.astype(dot_dtype), (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
                precision=lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None)
        return acc

    o_ref[0] = lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), jnp.float32)).astype(o_ref.dtype)


def dot_call(x2: jax.Array, w: QuantWeight, config: GemvConfig, params: dict, interpret: bool,
             dot_dtype, out_dtype=jnp.float32) -> jax.Array:
    """[split_k, rows padded to block_m, N_pad] partial sums of x2 [M, K] @ W^T in `out_dtype`."""
    f = w.fmt
    n_pad, k = w.lo.shape[0], w.shape[1]
    m_rows = x2.shape[0]
    a_fields = f.split[0]
    bm, bn = config.block_m, config.block_n
    m_pad = -(-m_rows // bm) * bm
    x2 = jnp.pad(x2, ((0, m_pad - m_rows), (0, 0))).astype(dot_dtype)
    xg = x2.reshape(m_pad, k // f.group, a_fields, f.group // a_fields)
    x_views = [xg[:, :, a].reshape(m_pad, k // a_fields) for a in range(a_fields)]
    leaves = [w.lo.reshape(n_pad, k // a_fields)]
    if w.hi is not None:
        leaves.append(w.hi.reshape(n_pad, -1))
    leaves += [leaf for leaf in (w.scales, w.super_scales, w.offsets, w.super_offsets) if leaf is not None]
    present = tuple(leaf is not None for leaf in (w.hi, w.super_scales, w.offsets, w.super_offsets))
    half = config.block_k // a_fields
    steps = k // (config.block_k * config.split_k)
    in_specs = [pl.BlockSpec((bm, k // a_fields), lambda i, j, s: (j, 0)) for _ in x_views]
    in_specs += [pl.BlockSpec((bn, leaf.shape[1]), lambda i, j, s: (i, 0)) for leaf in leaves]
    return pl.pallas_call(
        partial(_dot_kernel, f=f, present=present, half=half, steps=steps, dot_dtype=dot_dtype),
        out_shape=jax.ShapeDtypeStruct((config.split_k, m_pad, n_pad), out_dtype),
        grid=(n_pad // bn, m_pad // bm, config.split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, j, i)),
        interpret=interpret,
        **params,
    )(*x_views, *leaves)
