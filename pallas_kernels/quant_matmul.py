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
    variant: str = "dot"  # "dot": dequantized tile, tensor-core dot; "fma": elementwise; "dp4a": int8 dots
    block_m: int = 16  # rows of x per program ("dot"; "fma" takes all rows at once)
    block_n: int = 32  # output rows per program
    block_k: int = 1024  # inputs per loop step (a whole number of groups and super-blocks)
    split_k: int = 1  # slices of the inputs run by separate programs
    num_warps: int = 4
    num_stages: int = 3


MAX_FMA_ROWS = 4  # rows of x the "fma" variant unrolls


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Per-variant block sizes of one GPU generation: (rows of W per program, widest K step,
    warps), and the grid size split-K aims for."""
    fma: tuple[int, int, int]
    dp4a: tuple[int, int, int]
    dot: tuple[int, int, int]
    target_programs: int


# Chosen by measurement (bench/quant_matmul.py sweep; results in bench/results/). Hopper: H200
# sweeps of Q4_K / Q8_0 / GPTQ-int4 at Llama-3-8B shapes (132 SMs: 2 programs per SM). Other GPUs
# fall back to the same shapes until measured there.
BLOCKS = {
    "hopper": Blocks(fma=(8, 512, 4), dp4a=(16, 1024, 4), dot=(64, 256, 4), target_programs=264),
}
GENERATIONS = (("H100", "hopper"), ("H200", "hopper"), ("H800", "hopper"), ("GH200", "hopper"))


def gpu_blocks() -> Blocks:
    """The table row of the default device's generation (hopper when unknown or not a GPU)."""
    kind = jax.devices()[0].device_kind
    return BLOCKS[next((gen for name, gen in GENERATIONS if name in kind), "hopper")]


def choose_config(w: QuantWeight, m_rows: int, variant: str | None = None) -> GemvConfig:
    """Block sizes for this weight and row count from the generation's `BLOCKS` row: the exact "fma"
    variant for up to MAX_FMA_ROWS rows, the tensor-core "dot" variant above ("dp4a", int8
    activations, when asked); the widest K step that divides the inputs; split-K until the grid
    has the row's target number of programs."""
    variant = variant or ("fma" if m_rows <= MAX_FMA_ROWS else "dot")
    table = gpu_blocks()
    k = w.shape[1]
    sup = w.fmt.super_group or w.fmt.group
    block_n, widest, warps = getattr(table, variant)
    block_m = 1 if variant != "dot" else 16 if m_rows <= 16 else 32 if m_rows <= 32 else 64
    fits = lambda bk: k % bk == 0 and (variant == "dot" or (bk % sup == 0 and (bk // sup) & (bk // sup - 1) == 0))
    block_k = next((bk for bk in (1024, 512, 256, 128, 64, 32) if bk <= widest and fits(bk)), sup)
    m_blocks = -(-m_rows // block_m) if variant == "dot" else 1
    split_k = 1
    while (w.lo.shape[0] // block_n) * m_blocks * split_k < table.target_programs and k % (block_k * split_k * 2) == 0:
        split_k *= 2
    return GemvConfig(variant=variant, block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                      num_warps=warps)


def reference(x: jax.Array, w: QuantWeight) -> jax.Array:
    """x [..., K] @ dequantize(w)^T in float32, cast to x's dtype."""
    y = jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w.dequantize(jnp.float32),
                   precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def unsupported(x: jax.Array, w: QuantWeight, config: GemvConfig) -> str | None:
    """None if the kernel runs these shapes with `config`, else why not."""
    bk = config.block_k
    if bk & (bk - 1) or bk < 32:
        return f"block_k {bk} is not a power of two >= 32"
    if w.shape[1] % (bk * config.split_k):
        return f"{w.shape[1]} inputs do not split into {config.split_k} x {bk}"
    if w.lo.shape[0] % config.block_n:
        return f"{w.lo.shape[0]} rows are not a multiple of block_n {config.block_n}"
    if config.variant == "dp4a" and (w.fmt.bits not in (4, 8) or w.fmt.split[1] != 1):
        return f"the dp4a variant reads 4- and 8-bit codes, not {w.fmt.bits}-bit"
    if config.variant in ("fma", "dp4a"):
        if math.prod(x.shape[:-1]) > MAX_FMA_ROWS:
            return f"the {config.variant} variant takes at most {MAX_FMA_ROWS} rows"
        sup = w.fmt.super_group or w.fmt.group
        if bk % sup or (bk // sup) & (bk // sup - 1):
            return f"block_k {bk} is not a power-of-two number of {sup}-blocks"
    return None


def _to_float(q: jax.Array) -> jax.Array:
    """Non-negative int32 codes (< 2^23) to float32 exactly, without an int-to-float conversion."""
    return lax.bitcast_convert_type(q | MAGIC, jnp.float32) - jnp.float32(2.0**23)


def _kernel(*refs, f, present: tuple[bool, ...], half: int, steps: int, variant: str, dot_dtype):
    """One (rows of W) x (rows of x) x (K slice) program. All tiles are 2-D with the inputs
    contiguous: field `a` of the codes (the low / high nibble of each byte) pairs with the
    activations' view x_a, so no tile is reshaped; per-column scale indices are gathers that hit L1."""
    has_hi, has_ss, has_of, has_so = present
    a_fields, b_fields, wd = f.split
    hb = f.bits - 4
    it = iter(refs)
    x_refs = [next(it) for _ in range(a_fields)]
    lo_ref = next(it)
    hi_ref = next(it) if has_hi else None
    sc_ref = next(it)
    ss_ref = next(it) if has_ss else None
    of_ref = next(it) if has_of else None
    so_ref = next(it) if has_so else None
    o_ref = next(it)
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
                w = _to_float(q) * s
            if o is not None:
                w = w - o
            if variant == "dot":
                xa = x_refs[a][:, pl.ds(c0, half)]  # [block_m, half]
                acc = acc + lax.dot_general(
                    xa.astype(dot_dtype), w.astype(dot_dtype), (((1,), (1,)), ((), ())),
                    preferred_element_type=jnp.float32,
                    precision=lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None)
            else:  # elementwise products, reduced once after the loop
                acc = tuple(acc[m] + w * x_refs[a][m, pl.ds(c0, half)].astype(jnp.float32)[None, :]
                            for m in range(block_m))
        return acc

    if variant == "dot":
        acc = lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), jnp.float32))
        o_ref[0] = acc
    else:
        acc = lax.fori_loop(0, steps, step, tuple(jnp.zeros((block_n, half), jnp.float32) for _ in range(block_m)))
        for m in range(block_m):
            o_ref[0, m, :] = jnp.sum(acc[m], axis=1)


def _unpack_refs(refs, present: tuple[bool, ...], n_in: int):
    """(inputs before the weight, weight refs by name, output ref) from a kernel's ref list."""
    has_hi, has_ss, has_of, has_so = present
    it = iter(refs)
    head = [next(it) for _ in range(n_in)]
    names = ["lo"] + ["hi"] * has_hi + ["sc"] + ["ss"] * has_ss + ["of"] * has_of + ["so"] * has_so
    wrefs = {name: next(it) for name in names}
    return head, wrefs, next(it)


def _decode_tile(f, wrefs: dict, blk) -> list[jax.Array]:
    """The weights of super-rows `blk` of a row block, one float32 [BN, nsb, R, B, W] per field a
    (refs in the layout's own shape: lo [BN, K/S, R, B, W], hi [BN, K/S, R, 1, W], scales and
    offsets [BN, K/S, R], super-block values [BN, K/S]); each scale and offset is loaded once per
    group and broadcast: no gathers, no reshapes."""
    a_fields, b_fields, _ = f.split
    hb = f.bits - 4
    s, o = _group_scales(f, wrefs, blk)
    s = s[:, :, :, None, None]
    o = None if o is None else o[:, :, :, None, None]
    lo = wrefs["lo"][:, blk, :, :, :].astype(jnp.int32)  # [BN, nsb, R, B, W]
    h = wrefs["hi"][:, blk, :, :, :].astype(jnp.int32) if "hi" in wrefs else None
    field = jnp.arange(b_fields, dtype=jnp.int32)[None, None, None, :, None]
    out = []
    for a in range(a_fields):
        if f.bits == 8:
            w = lo.astype(jnp.float32) * s
        else:
            q = (lo >> (4 * a)) & 15
            if h is not None:
                q = q | (((h >> (hb * (a * b_fields + field))) & ((1 << hb) - 1)) << 4)
            w = _to_float(q) * s
        out.append(w if o is None else w - o)
    return out


def _group_scales(f, wrefs: dict, blk) -> tuple[jax.Array, jax.Array | None]:
    """(s, o) of every group of super-rows `blk`: float32 [BN, nsb, R] each (o None for "none")."""
    s = wrefs["sc"][:, blk, :].astype(jnp.float32)  # [BN, nsb, R]
    if "ss" in wrefs:
        s = s * wrefs["ss"][:, blk].astype(jnp.float32)[:, :, None]
    o = None
    if f.offset == "const":
        o = f.const * s
    elif f.offset == "zero":
        o = wrefs["of"][:, blk, :].astype(jnp.float32) * s
    elif f.offset == "min":
        o = -wrefs["of"][:, blk, :].astype(jnp.float32)
    elif f.offset == "kmin":
        o = wrefs["so"][:, blk].astype(jnp.float32)[:, :, None] * wrefs["of"][:, blk, :].astype(jnp.float32)
    return s, o


def _fma_kernel(*refs, f, present: tuple[bool, ...], nsb: int, steps: int, m_rows: int):
    """Elementwise variant: products with x accumulate elementwise across the loop and are reduced
    once at the end."""
    (x_ref,), wrefs, o_ref = _unpack_refs(refs, present, 1)  # x [M, K/S, R, A, B, W]
    _, b_fields, wd = f.split
    block_n, r = wrefs["lo"].shape[0], wrefs["lo"].shape[2]
    base = pl.program_id(2) * steps * nsb

    def step(t, acc):
        blk = pl.ds(pl.multiple_of(base + t * nsb, nsb), nsb)
        acc = list(acc)
        for a, w in enumerate(_decode_tile(f, wrefs, blk)):
            for m in range(m_rows):
                acc[m] = acc[m] + w * x_ref[m, blk, :, a, :, :].astype(jnp.float32)[None]
        return tuple(acc)

    shape = (block_n, nsb, r, b_fields, wd)
    acc = lax.fori_loop(0, steps, step, tuple(jnp.zeros(shape, jnp.float32) for _ in range(m_rows)))
    for m in range(m_rows):
        o_ref[0, m, :] = jnp.sum(jnp.sum(jnp.sum(jnp.sum(acc[m], axis=4), axis=3), axis=2), axis=1)


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


def _dp4a_kernel(*refs, f, present: tuple[bool, ...], nsb: int, steps: int, m_rows: int, interpret: bool):
    """Integer variant (4- and 8-bit codes, few rows): each step quantizes its slice of x to int8 per
    group (in the kernel: no extra launches), each group's sum(q * x) is an int32 from dp4a
    instructions (8 weights in 5 instructions for 4 bits), and scale and offset apply once per group."""
    (x_ref,), wrefs, o_ref = _unpack_refs(refs, present, 1)  # x [M, K/S, R, A, 1, W] in x's dtype
    a_fields = f.split[0]
    block_n = wrefs["lo"].shape[0]
    base = pl.program_id(2) * steps * nsb

    def step(t, acc):
        blk = pl.ds(pl.multiple_of(base + t * nsb, nsb), nsb)
        s, o = _group_scales(f, wrefs, blk)  # [BN, nsb, R]
        codes = wrefs["lo"][:, blk, :, 0, :]  # [BN, nsb, R, W]
        out = []
        for m in range(m_rows):
            xa = [x_ref[m, blk, :, a, 0, :].astype(jnp.float32) for a in range(a_fields)]  # [nsb, R, W]
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
            out.append(acc[m] + jnp.sum(jnp.sum(y, axis=2), axis=1))
        return tuple(out)

    acc = lax.fori_loop(0, steps, step, tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(m_rows)))
    for m in range(m_rows):
        o_ref[0, m, :] = acc[m]


def _dp4a_call(x2: jax.Array, w: QuantWeight, config: GemvConfig, params: dict, interpret: bool) -> jax.Array:
    f = w.fmt
    n_pad, k = w.lo.shape[0], w.shape[1]
    m_rows = x2.shape[0]
    a_fields, b_fields, wd = f.split
    sup = f.super_group or f.group
    r, nsup = sup // f.group, k // sup
    views, present = _weight_views(w)
    views = [x2.reshape(m_rows, nsup, r, a_fields, b_fields, wd)] + views
    nsb = config.block_k // sup
    steps = nsup // (nsb * config.split_k)
    bn = config.block_n
    zeros = lambda nd: (0,) * nd
    in_specs = [pl.BlockSpec(views[0].shape, lambda i, j, s: zeros(6))]
    in_specs += [pl.BlockSpec((bn, *v.shape[1:]), lambda i, j, s, nd=v.ndim: (i,) + zeros(nd - 1)) for v in views[1:]]
    return pl.pallas_call(
        partial(_dp4a_kernel, f=f, present=present, nsb=nsb, steps=steps, m_rows=m_rows, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((config.split_k, m_rows, n_pad), jnp.float32),
        grid=(n_pad // bn, 1, config.split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, m_rows, bn), lambda i, j, s: (s, 0, i)),
        interpret=interpret,
        **params,
    )(*views)


def _dequant_kernel(*refs, f, present: tuple[bool, ...], nsb: int):
    """One [BN, nsb super-rows] tile of the dense weight, written in the logical column order
    (out [BN, K/S, R, A, B, W] is the [BN, K] matrix)."""
    _, wrefs, o_ref = _unpack_refs(refs, present, 0)
    blk = pl.ds(pl.multiple_of(pl.program_id(1) * nsb, nsb), nsb)
    for a, w in enumerate(_decode_tile(f, wrefs, blk)):
        o_ref[:, :, :, a, :, :] = w.astype(o_ref.dtype)


def _weight_views(w: QuantWeight) -> tuple[list[jax.Array], tuple[bool, ...]]:
    """The weight's leaves viewed in the layout's own tile shape (see `_decode_tile`)."""
    f = w.fmt
    n_pad, k = w.lo.shape[0], w.shape[1]
    _, b_fields, wd = f.split
    sup = f.super_group or f.group
    r, nsup = sup // f.group, k // sup
    views = [w.lo.reshape(n_pad, nsup, r, b_fields, wd)]
    if w.hi is not None:
        views.append(w.hi.reshape(n_pad, nsup, r, 1, wd))
    views.append(w.scales.reshape(n_pad, nsup, r))
    if w.super_scales is not None:
        views.append(w.super_scales)
    if w.offsets is not None:
        views.append(w.offsets.reshape(n_pad, nsup, r))
    if w.super_offsets is not None:
        views.append(w.super_offsets)
    present = tuple(leaf is not None for leaf in (w.hi, w.super_scales, w.offsets, w.super_offsets))
    return views, present


def _triton_params(num_warps: int, num_stages: int, interpret: bool) -> dict:
    if interpret:
        return {}
    from jax.experimental.pallas import triton as pl_triton
    return {"compiler_params": pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


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
    nsb = max(1, min(block_k // sup, nsup))
    while nsup % nsb:
        nsb //= 2
    views, present = _weight_views(w)
    zeros = lambda nd: (0,) * nd
    out = pl.pallas_call(
        partial(_dequant_kernel, f=f, present=present, nsb=nsb),
        out_shape=jax.ShapeDtypeStruct((n_pad, nsup, r, a_fields, b_fields, wd), dtype),
        grid=(n_pad // block_n, nsup // nsb),
        in_specs=[pl.BlockSpec((block_n, *v.shape[1:]), lambda i, j, nd=v.ndim: (i,) + zeros(nd - 1)) for v in views],
        out_specs=pl.BlockSpec((block_n, nsb, r, a_fields, b_fields, wd), lambda i, j: (i, j, 0, 0, 0, 0)),
        interpret=interpret,
        **_triton_params(4, 1, interpret),
    )(*views)
    dense = out.reshape(n_pad, k)[: w.shape[0]]
    if w.perm is not None:
        dense = jnp.zeros_like(dense).at[:, w.perm].set(dense)
    return dense


def _fma_call(x2: jax.Array, w: QuantWeight, config: GemvConfig, params: dict, interpret: bool) -> jax.Array:
    f = w.fmt
    n_pad, k = w.lo.shape[0], w.shape[1]
    m_rows = x2.shape[0]
    a_fields, b_fields, wd = f.split
    sup = f.super_group or f.group
    r, nsup = sup // f.group, k // sup
    views, present = _weight_views(w)
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


@partial(jax.jit, static_argnames=("config", "interpret"))
def qmatmul(x: jax.Array, w: QuantWeight, *, config: GemvConfig = GemvConfig(), interpret: bool = False) -> jax.Array:
    """x [..., K] @ W^T -> [..., N] in x's dtype. See the module docstring."""
    reason = unsupported(x, w, config)
    if reason is not None:
        raise ValueError(f"qmatmul: {reason}")
    f = w.fmt
    n, k = w.shape
    n_pad = w.lo.shape[0]
    lead = x.shape[:-1]
    m_rows = math.prod(lead)
    a_fields = f.split[0]
    x2 = x.reshape(m_rows, k)
    if w.perm is not None:
        x2 = jnp.take(x2, w.perm, axis=1)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton
        params["compiler_params"] = pl_triton.CompilerParams(num_warps=config.num_warps,
                                                             num_stages=config.num_stages)
    if config.variant in ("fma", "dp4a"):
        call = _fma_call if config.variant == "fma" else _dp4a_call
        y = jnp.sum(call(x2, w, config, params, interpret), axis=0)[:, :n]
        return y.reshape(*lead, n).astype(x.dtype)
    dot_dtype = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    bm = config.block_m if config.variant == "dot" else m_rows
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
    bn = config.block_n
    in_specs = [pl.BlockSpec((bm, k // a_fields), lambda i, j, s: (j, 0)) for _ in x_views]
    in_specs += [pl.BlockSpec((bn, leaf.shape[1]), lambda i, j, s: (i, 0)) for leaf in leaves]
    out = pl.pallas_call(
        partial(_kernel, f=f, present=present, half=half, steps=steps, variant=config.variant,
                dot_dtype=dot_dtype),
        out_shape=jax.ShapeDtypeStruct((config.split_k, m_pad, n_pad), jnp.float32),
        grid=(n_pad // bn, m_pad // bm, config.split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, j, i)),
        interpret=interpret,
        **params,
    )(*x_views, *leaves)
    y = jnp.sum(out, axis=0)[:m_rows, :n]
    return y.reshape(*lead, n).astype(x.dtype)
