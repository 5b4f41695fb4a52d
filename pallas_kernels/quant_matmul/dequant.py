"""The GEMM path's first half: one Pallas pass that reads the packed bytes and writes the dense
weight in the activations' dtype (then XLA's dense matmul, compute-bound, does the rest)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ferrum_jax.quant.qweight import QuantWeight
from pallas_kernels.quant_matmul.common import (
    decode_tile,
    triton_params,
    unpack_refs,
    weight_views,
)


def _dequant_kernel(*refs, f, present: tuple[bool, ...], nsb: int):
    """One [BN, nsb super-rows] tile of the dense weight, written in the logical column order
    (out [BN, K/S, R, A, B, W] is the [BN, K] matrix)."""
    _, wrefs, o_ref = unpack_refs(refs, present, 0)
    blk = pl.ds(pl.multiple_of(pl.program_id(1) * nsb, nsb), nsb)
    for a, w in enumerate(decode_tile(f, wrefs, blk)):
        o_ref[:, :, :, a, :, :] = w.astype(o_ref.dtype)


@partial(jax.jit, static_argnames=("dtype", "block_n", "block_k", "interpret"))
def dequantize(w: QuantWeight, dtype=jnp.bfloat16, *, block_n: int = 32, block_k: int = 512,
               interpret: bool = False) -> jax.Array:
    """The dense [N, K] weight in `dtype` (perm undone), one pass: read the packed bytes, write the
    dense ones. The GEMM path for many rows of x: dequantize once, then a dense matmul."""
    f = w.fmt
    n_pad, k = w.lo.shape[0], w.shape[1]
    a_fields, b_fields, wd = f.split
    sup = f.super_group or f.group
    r, nsup = sup // f.group, k // sup
    nsb = 1 << (max(1, min(block_k // sup, nsup)).bit_length() - 1)  # a power of two (Triton's tiles)
    while nsup % nsb:
        nsb //= 2
    views, present = weight_views(w)
    zeros = lambda nd: (0,) * nd
    out = pl.pallas_call(
        partial(_dequant_kernel, f=f, present=present, nsb=nsb),
        out_shape=jax.ShapeDtypeStruct((n_pad, nsup, r, a_fields, b_fields, wd), dtype),
        grid=(n_pad // block_n, nsup // nsb),
        in_specs=[pl.BlockSpec((block_n, *v.shape[1:]), lambda i, j, nd=v.ndim: (i,) + zeros(nd - 1)) for v in views],
        out_specs=pl.BlockSpec((block_n, nsb, r, a_fields, b_fields, wd), lambda i, j: (i, j, 0, 0, 0, 0)),
        interpret=interpret,
        **triton_params(4, 1, interpret),
    )(*views)
    dense = out.reshape(n_pad, k)[: w.shape[0]]
    if w.perm is not None:
        dense = jnp.zeros_like(dense).at[:, w.perm].set(dense)
    return dense
