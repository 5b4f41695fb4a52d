"""The integer variant for 4- and 8-bit codes and a few rows of x: x quantized to int8 per weight
group inside the kernel (llama.cpp's q8_1 idea, ~1e-2 relative error of the output), every group's
sum(q * x) an int32 from dp4a instructions (inline PTX), scale and offset once per group."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ferrum_jax.quant.qweight import QuantWeight
from pallas_kernels.quant_matmul.common import (
    GemvConfig,
    group_scales,
    unpack_refs,
    weight_views,
)

# dp4a: four int8 products summed into an int32 in one instruction. A 32-bit word of a 4-bit plane
# holds the low nibbles of 4 elements and the high nibbles of 4 others: two masks, two dp4a cover 8
# weights. `pack=4` hands the asm 4 bytes of each input in one register; it must also return 4
# values, so the sum goes in the first and the other three are 0 (summed away with the group).
_DP4A_NIBBLES = """{
.reg .b32 lo, hi;
and.b32 lo, $4, 0x0F0F0F0F;
shr.u32 hi, $4, 4;
and.b32 hi, hi, 0x0F0F0F0F;
dp4a.u32.s32 $0, lo, $5, 0;
dp4a.u32.s32 $0, hi, $6, $0;
mov.b32 $1, 0;
mov.b32 $2, 0;
mov.b32 $3, 0;
}"""
_DP4A_BYTES = """{{
dp4a.{a}.s32 $0, $4, $5, 0;
mov.b32 $1, 0;
mov.b32 $2, 0;
mov.b32 $3, 0;
}}"""


def _dp4a(codes: jax.Array, xs: list[jax.Array], bits: int, signed: bool, interpret: bool) -> jax.Array:
    """int32 with the same shape as `codes`, whose sum over the last axis is sum(q * x): the codes'
    elements times the int8 activations `xs` (low/high nibble halves for 4 bits, else one)."""
    if interpret:  # the same sums, elementwise in jnp (inline PTX runs on the GPU only)
        c = codes.astype(jnp.int32)
        if bits == 4:
            return (c & 15) * xs[0].astype(jnp.int32) + (c >> 4) * xs[1].astype(jnp.int32)
        return c * xs[0].astype(jnp.int32)
    from jax.experimental.pallas import triton as pl_triton
    asm = _DP4A_NIBBLES if bits == 4 else _DP4A_BYTES.format(a="s32" if signed else "u32")
    constraints = "=r,=r,=r,=r," + ",".join("r" * (1 + len(xs)))
    [out] = pl_triton.elementwise_inline_asm(asm, args=[codes, *xs], constraints=constraints, pack=4,
                                             result_shape_dtypes=[jax.ShapeDtypeStruct(codes.shape, jnp.int32)])
    return out


def quantize_activations(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [M, K] -> (int8 codes [M, K], scale [M, K/group], exact sum [M, K/group]): symmetric int8
    per group of inputs (llama.cpp's q8_1 idea), so the weights' codes meet x in integer dots. The
    dp4a kernel does the same inside, step by step; this is its statement in jnp."""
    m, k = x.shape
    xg = x.astype(jnp.float32).reshape(m, k // group, group)
    amax = jnp.max(jnp.abs(xg), axis=2)
    d = jnp.where(amax > 0, amax / 127.0, 1.0)
    xq = jnp.floor(xg / d[:, :, None] + 0.5).astype(jnp.int8)
    return xq.reshape(m, k), d, jnp.sum(xg, axis=2)


def dp4a_rows(x_ref, wrefs: dict, f, *, nsb: int, steps: int, base, m_rows: int, interpret: bool,
              rows: tuple = (slice(None),), block_n: int | None = None, x_row=0) -> list[jax.Array]:
    """float32 [BN] per row m < m_rows of x_ref: x[m] @ W^T over super-rows [base, base + steps * nsb)
    of the weight views `wrefs` (a block of BN rows, the layout's own shape; see `weight_views`).
    Each step quantizes its slice of x to int8 per group (in the kernel: no extra launches), each
    group's sum(q * x) is an int32 from dp4a instructions (8 weights in 5 instructions for 4 bits),
    scale and offset apply once per group; the groups' results accumulate elementwise and are
    reduced across the block once, at the end. x_ref [M, K/S, R, A, 1, W] in x's dtype, rows
    x_row + m; `rows` and `block_n` pick the weight rows as in `common.decode_tile` (default: the
    whole first axis of the refs)."""
    a_fields = f.split[0]
    block_n = block_n or wrefs["lo"].shape[0]

    def step(t, acc):
        blk = pl.ds(pl.multiple_of(base + t * nsb, nsb), nsb)
        s, o = group_scales(f, wrefs, blk, rows)  # [BN, nsb, R]
        codes = wrefs["lo"][(*rows, blk, slice(None), 0, slice(None))]  # [BN, nsb, R, W]
        out = []
        for m in range(m_rows):
            xa = [x_ref[x_row + m, blk, :, a, 0, :].astype(jnp.float32) for a in range(a_fields)]  # [nsb, R, W]
            amax = jnp.max(jnp.abs(xa[0]), axis=2)
            xsum = jnp.sum(xa[0], axis=2)
            for v in xa[1:]:
                amax = jnp.maximum(amax, jnp.max(jnp.abs(v), axis=2))
                xsum = xsum + jnp.sum(v, axis=2)
            d = jnp.where(amax > 0, amax / 127.0, 1.0)  # [nsb, R]
            xq = [jnp.floor(v / d[:, :, None] + 0.5).astype(jnp.int8) for v in xa]
            xq = [jnp.broadcast_to(v[None], codes.shape) for v in xq]
            p = jnp.sum(_dp4a(codes, xq, f.bits, f.signed, interpret), axis=3).astype(jnp.float32)
            y = s * (p * d[None])
            if o is not None:
                y = y - o * xsum[None]
            out.append(acc[m] + y)  # per group: the reduction across threads waits for the end
        return tuple(out)

    shape = (block_n, nsb, wrefs["sc"].shape[-1])
    acc = lax.fori_loop(0, steps, step, tuple(jnp.zeros(shape, jnp.float32) for _ in range(m_rows)))
    return [jnp.sum(jnp.sum(a, axis=2), axis=1) for a in acc]


def _dp4a_kernel(*refs, f, present: tuple[bool, ...], nsb: int, steps: int, m_rows: int, interpret: bool):
    (x_ref,), wrefs, o_ref = unpack_refs(refs, present, 1)
    rows = dp4a_rows(x_ref, wrefs, f, nsb=nsb, steps=steps, base=pl.program_id(2) * steps * nsb, m_rows=m_rows,
                     interpret=interpret)
    for m in range(m_rows):
        o_ref[0, m, :] = rows[m].astype(o_ref.dtype)


def dp4a_call(x2: jax.Array, w: QuantWeight, config: GemvConfig, params: dict, interpret: bool,
              out_dtype=jnp.float32) -> jax.Array:
    f = w.fmt
    n_pad, k = w.lo.shape[0], w.shape[1]
    m_rows = x2.shape[0]
    a_fields, b_fields, wd = f.split
    sup = f.super_group or f.group
    r, nsup = sup // f.group, k // sup
    views, present = weight_views(w)
    views = [x2.reshape(m_rows, nsup, r, a_fields, b_fields, wd)] + views
    nsb = config.block_k // sup
    steps = nsup // (nsb * config.split_k)
    bn = config.block_n
    zeros = lambda nd: (0,) * nd
    in_specs = [pl.BlockSpec(views[0].shape, lambda i, j, s: zeros(6))]
    in_specs += [pl.BlockSpec((bn, *v.shape[1:]), lambda i, j, s, nd=v.ndim: (i,) + zeros(nd - 1)) for v in views[1:]]
    return pl.pallas_call(
        partial(_dp4a_kernel, f=f, present=present, nsb=nsb, steps=steps, m_rows=m_rows, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((config.split_k, m_rows, n_pad), out_dtype),
        grid=(n_pad // bn, 1, config.split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, m_rows, bn), lambda i, j, s: (s, 0, i)),
        interpret=interpret,
        **params,
    )(*views)
