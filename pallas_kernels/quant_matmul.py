"""Quantized matmul for decode (few rows of x): y = x @ W^T, W a `QuantWeight`, one pass over the codes.

Decode reads every weight once per token, so the kernel streams the packed bytes (4.5 bits a weight
for Q4_0, ~4.6 for Q4_K, 8.5 for Q8_0, ~4.2 for GPTQ-int4 g128) and never writes a dequantized
copy. It also keeps the arithmetic per element minimal, because at ~4.8 TB/s an H200 delivers
about 8e12 4-bit weights a second, close to what its integer and float pipes can unpack. So the
scale and offset are applied once per group, not per element:

    P[n, g] = sum_k q[n, k] x[k],  X[g] = sum_k x[k]            (k over group g)
    y[n]    = sum_g s[n, g] P[n, g] - o[n, g] X[g]              (o = c s, z s, -m or dmin m)

Per element that is: unpack the field (shift, mask, maybe merge the high bits), turn the integer
into a float with the exponent trick (OR it into the mantissa of 2^23 and subtract 2^23: two cheap
ops instead of the quarter-rate int-to-float conversion), one FMA. Codes are laid out by
`ferrum_jax.quant.qweight` so that each field of a group lines up with a contiguous slice of the
activations viewed as [M, K/G, A, B, W] (a free reshape): no shuffles in the kernel.

Grid: (output blocks of `block_n` rows, `split_k` slices of the inputs). Each program loops over its
slice `block_k` inputs at a time; the `split_k` partial sums are added by XLA afterwards (split-K
fills the GPU when there are few output blocks, e.g. a 1024-row k/v projection).

`reference(x, w)` is the pure-jnp oracle: the weight dequantized in float32, one float32 matmul.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ferrum_jax.quant.qweight import QuantWeight

MAGIC = 0x4B000000  # float32 2^23: OR-ing an integer below 2^23 into its mantissa gives 2^23 + q


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    variant: str = "dot"  # "dot": dequantize a tile to x's dtype, tensor-core dot; "fma": grouped sums
    block_m: int = 16  # rows of x per program ("dot"; "fma" takes all rows at once)
    block_n: int = 32  # output rows per program
    block_k: int = 1024  # inputs per loop step (a whole number of groups and super-blocks)
    split_k: int = 1  # slices of the inputs run by separate programs
    num_warps: int = 4
    num_stages: int = 3


MAX_ROWS = 16  # rows of x the kernel unrolls; more rows take the dequantize-once + matmul path
TARGET_PROGRAMS = 264  # split K until there are about this many programs (2 per H100/H200 SM)


def choose_config(w: QuantWeight, m_rows: int, variant: str = "dot") -> GemvConfig:
    """Block sizes for this weight and row count: the widest K step that divides the inputs, and
    split-K until the grid has TARGET_PROGRAMS programs."""
    f = w.fmt
    k = w.shape[1]
    unit = max(f.group, f.super_group)
    block_m = 16 if m_rows <= 16 else 32 if m_rows <= 32 else 64
    block_n = 32 if m_rows <= 32 else 64
    block_k = next((bk for bk in (1024, 512, 256, 128, 64, 32, 16) if bk >= unit and k % bk == 0), unit)
    m_blocks = -(-m_rows // block_m) if variant == "dot" else 1
    split_k = 1
    while (w.lo.shape[0] // block_n) * m_blocks * split_k < TARGET_PROGRAMS and k % (block_k * split_k * 2) == 0:
        split_k *= 2
    return GemvConfig(variant=variant, block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k)


def reference(x: jax.Array, w: QuantWeight) -> jax.Array:
    """x [..., K] @ dequantize(w)^T in float32, cast to x's dtype."""
    y = jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w.dequantize(jnp.float32),
                   precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def unsupported(x: jax.Array, w: QuantWeight, config: GemvConfig) -> str | None:
    """None if the kernel runs these shapes with `config`, else why not."""
    f = w.fmt
    if f.group & (f.group - 1) or f.group > 256:
        return f"group size {f.group} is not a power of two <= 256"
    groups_per_step = config.block_k // f.group
    if config.block_k % f.group or groups_per_step & (groups_per_step - 1):
        return f"block_k {config.block_k} is not a power-of-two number of {f.group}-groups"
    if f.super_group and config.block_k % f.super_group:
        return f"block_k {config.block_k} is not a multiple of the super-block {f.super_group}"
    if w.shape[1] % (config.block_k * config.split_k):
        return f"{w.shape[1]} inputs do not split into {config.split_k} x {config.block_k}"
    if w.lo.shape[0] % config.block_n:
        return f"{w.lo.shape[0]} rows are not a multiple of block_n {config.block_n}"
    return None


def _to_float(q: jax.Array) -> jax.Array:
    """Non-negative int32 codes (< 2^23) to float32 exactly, without an int-to-float conversion."""
    return lax.bitcast_convert_type(q | MAGIC, jnp.float32) - jnp.float32(2.0**23)


def _kernel(*refs, f, present: tuple[bool, ...], m_rows: int, ng: int, steps: int, needs_xsum: bool):
    has_hi, has_ss, has_of, has_so = present
    a_fields, b_fields, _ = f.split
    hb = f.bits - 4
    it = iter(refs)
    x_ref = next(it)
    xs_ref = next(it) if needs_xsum else None
    lo_ref = next(it)
    hi_ref = next(it) if has_hi else None
    sc_ref = next(it)
    ss_ref = next(it) if has_ss else None
    of_ref = next(it) if has_of else None
    so_ref = next(it) if has_so else None
    o_ref = next(it)
    block_n = lo_ref.shape[0]
    r = f.sub_per_super
    g_base = pl.program_id(1) * steps * ng

    def group_sums(g0):
        """P[m]: float32 [block_n, ng] for every row m of x."""
        sums = [jnp.zeros((block_n, ng), jnp.float32) for _ in range(m_rows)]
        for b in range(b_fields):
            lo = lo_ref[:, pl.ds(g0, ng), b, :].astype(jnp.int32)  # [block_n, ng, W]
            hi = hi_ref[:, pl.ds(g0, ng), :].astype(jnp.int32) if hi_ref is not None else None
            for a in range(a_fields):
                if f.bits == 8:
                    qf = lo.astype(jnp.float32)
                else:
                    q = (lo >> (4 * a)) & 15
                    if hi is not None:
                        q = q | (((hi >> (hb * (a * b_fields + b))) & ((1 << hb) - 1)) << 4)
                    qf = _to_float(q)
                for m in range(m_rows):
                    xv = x_ref[m, pl.ds(g0, ng), a, b, :]  # [ng, W] float32
                    sums[m] = sums[m] + jnp.sum(qf * xv[None], axis=2)
        return sums

    def per_super(v):  # [block_n, ng] -> [block_n, ng / r]: sums over each super-block's groups
        return jnp.sum(v.reshape(block_n, ng // r, r), axis=2)

    def step(t, accs):
        g0 = g_base + t * ng
        sums = group_sums(g0)
        sc = sc_ref[:, pl.ds(g0, ng)].astype(jnp.float32)
        if ss_ref is not None:
            ss = ss_ref[:, pl.ds(g0 // r, ng // r)].astype(jnp.float32)
        if of_ref is not None:
            of = of_ref[:, pl.ds(g0, ng)].astype(jnp.float32)
        out = []
        for m in range(m_rows):
            p = sums[m]
            xs = xs_ref[m, pl.ds(g0, ng)][None] if xs_ref is not None else None  # [1, ng]
            if f.offset == "const":
                p = p - f.const * xs
            elif f.offset == "zero":
                p = p - of * xs
            if ss_ref is None:
                y = jnp.sum(sc * p, axis=1)
                if f.offset == "min":
                    y = y + jnp.sum(of * xs, axis=1)
            else:
                y = jnp.sum(ss * per_super(sc * p), axis=1)
                if f.offset == "kmin":
                    so = so_ref[:, pl.ds(g0 // r, ng // r)].astype(jnp.float32)
                    y = y - jnp.sum(so * per_super(of * xs), axis=1)
            out.append(accs[m] + y)
        return tuple(out)

    accs = lax.fori_loop(0, steps, step, tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(m_rows)))
    for m in range(m_rows):
        o_ref[0, m, :] = accs[m]


def _dot_kernel(*refs, f, present: tuple[bool, ...], ng: int, steps: int, dot_dtype):
    """acc[BM, BN] += x_tile @ dequantize(w_tile)^T, one dot per unpacked field."""
    has_hi, has_ss, has_of, has_so = present
    a_fields, b_fields, wd = f.split
    hb = f.bits - 4
    it = iter(refs)
    x_ref, lo_ref = next(it), next(it)
    hi_ref = next(it) if has_hi else None
    sc_ref = next(it)
    ss_ref = next(it) if has_ss else None
    of_ref = next(it) if has_of else None
    so_ref = next(it) if has_so else None
    o_ref = next(it)
    block_m, block_n = x_ref.shape[0], lo_ref.shape[0]
    r = f.sub_per_super
    g_base = pl.program_id(2) * steps * ng

    def expand(v):  # [block_n, ng / r] -> [block_n, ng]: each super-block value over its groups
        return jnp.broadcast_to(v[:, :, None], (block_n, ng // r, r)).reshape(block_n, ng)

    def step(t, acc):
        g0 = g_base + t * ng
        s = sc_ref[:, pl.ds(g0, ng)].astype(jnp.float32)
        if ss_ref is not None:
            s = s * expand(ss_ref[:, pl.ds(g0 // r, ng // r)].astype(jnp.float32))
        o = None
        if f.offset == "const":
            o = f.const * s
        elif f.offset == "zero":
            o = of_ref[:, pl.ds(g0, ng)].astype(jnp.float32) * s
        elif f.offset == "min":
            o = -of_ref[:, pl.ds(g0, ng)].astype(jnp.float32)
        elif f.offset == "kmin":
            o = expand(so_ref[:, pl.ds(g0 // r, ng // r)].astype(jnp.float32)) * of_ref[:, pl.ds(g0, ng)].astype(jnp.float32)
        for b in range(b_fields):
            lo = lo_ref[:, pl.ds(g0, ng), b, :].astype(jnp.int32)  # [block_n, ng, W]
            hi = hi_ref[:, pl.ds(g0, ng), :].astype(jnp.int32) if hi_ref is not None else None
            for a in range(a_fields):
                if f.bits == 8:
                    qf = lo.astype(jnp.float32)
                else:
                    q = (lo >> (4 * a)) & 15
                    if hi is not None:
                        q = q | (((hi >> (hb * (a * b_fields + b))) & ((1 << hb) - 1)) << 4)
                    qf = _to_float(q)
                w = qf * s[:, :, None]
                if o is not None:
                    w = w - o[:, :, None]
                w = w.astype(dot_dtype).reshape(block_n, ng * wd)
                xa = x_ref[:, pl.ds(g0, ng), a, b, :].reshape(block_m, ng * wd)
                acc = acc + lax.dot_general(xa, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                            precision=lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None)
        return acc

    acc = lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[0] = acc


@partial(jax.jit, static_argnames=("config", "interpret"))
def qmatmul(x: jax.Array, w: QuantWeight, *, config: GemvConfig = GemvConfig(), interpret: bool = False) -> jax.Array:
    """x [..., K] @ W^T -> [..., N] in x's dtype, for a few rows of x (decode). See the module doc."""
    reason = unsupported(x, w, config)
    if reason is not None:
        raise ValueError(f"qmatmul: {reason}")
    f = w.fmt
    n, k = w.shape
    n_pad = w.lo.shape[0]
    lead = x.shape[:-1]
    m_rows = math.prod(lead)
    x2 = x.reshape(m_rows, k).astype(jnp.float32)
    if w.perm is not None:
        x2 = jnp.take(x2, w.perm, axis=1)
    a, b, wd = f.split
    groups = k // f.group
    ng = config.block_k // f.group
    steps = groups // (ng * config.split_k)
    needs_xsum = f.offset != "none"
    bn = config.block_n
    present = tuple(leaf is not None for leaf in (w.hi, w.super_scales, w.offsets, w.super_offsets))
    leaves = [leaf for leaf in (w.lo, w.hi, w.scales, w.super_scales, w.offsets, w.super_offsets) if leaf is not None]
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton
        params["compiler_params"] = pl_triton.CompilerParams(num_warps=config.num_warps,
                                                             num_stages=config.num_stages)
    if config.variant == "dot":
        dot_dtype = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
        bm = config.block_m
        m_pad = -(-m_rows // bm) * bm
        xd = jnp.pad(x2, ((0, m_pad - m_rows), (0, 0))).astype(dot_dtype).reshape(m_pad, groups, a, b, wd)
        in_specs = [pl.BlockSpec((bm, groups, a, b, wd), lambda i, j, s: (j, 0, 0, 0, 0))]
        in_specs += [pl.BlockSpec((bn, *leaf.shape[1:]), lambda i, j, s, nd=leaf.ndim: (i,) + (0,) * (nd - 1))
                     for leaf in leaves]
        out = pl.pallas_call(
            partial(_dot_kernel, f=f, present=present, ng=ng, steps=steps, dot_dtype=dot_dtype),
            out_shape=jax.ShapeDtypeStruct((config.split_k, m_pad, n_pad), jnp.float32),
            grid=(n_pad // bn, m_pad // bm, config.split_k),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, j, i)),
            interpret=interpret,
            **params,
        )(xd, *leaves)
        y = jnp.sum(out, axis=0)[:m_rows, :n]
        return y.reshape(*lead, n).astype(x.dtype)

    whole = lambda arr: pl.BlockSpec(arr.shape, lambda i, s: (0,) * arr.ndim)
    rows = lambda arr: pl.BlockSpec((bn, *arr.shape[1:]), lambda i, s: (i,) + (0,) * (arr.ndim - 1))
    args, specs = [x2.reshape(m_rows, groups, a, b, wd)], []
    if needs_xsum:
        args.append(jnp.sum(x2.reshape(m_rows, groups, f.group), axis=2))
    specs = [whole(arg) for arg in args]
    for leaf in leaves:
        args.append(leaf)
        specs.append(rows(leaf))
    kernel = partial(_kernel, f=f, present=present, m_rows=m_rows, ng=ng, steps=steps, needs_xsum=needs_xsum)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((config.split_k, m_rows, n_pad), jnp.float32),
        grid=(n_pad // bn, config.split_k),
        in_specs=specs,
        out_specs=pl.BlockSpec((1, m_rows, bn), lambda i, s: (s, 0, i)),
        interpret=interpret,
        **params,
    )(*args)
    y = jnp.sum(out, axis=0)[:, :n]
    return y.reshape(*lead, n).astype(x.dtype)
