"""What every variant shares: configs and the per-generation block table, the shape checks, the
exponent-trick int-to-float, and decoding a tile of the layout in its own shape."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

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


def to_float(q: jax.Array) -> jax.Array:
    """Non-negative int32 codes (< 2^23) to float32 exactly, without an int-to-float conversion."""
    return lax.bitcast_convert_type(q | MAGIC, jnp.float32) - jnp.float32(2.0**23)


def unpack_refs(refs, present: tuple[bool, ...], n_in: int):
    """(inputs before the weight, weight refs by name, output ref) from a kernel's ref list."""
    has_hi, has_ss, has_of, has_so = present
    it = iter(refs)
    head = [next(it) for _ in range(n_in)]
    names = ["lo"] + ["hi"] * has_hi + ["sc"] + ["ss"] * has_ss + ["of"] * has_of + ["so"] * has_so
    wrefs = {name: next(it) for name in names}
    return head, wrefs, next(it)


def decode_tile(f, wrefs: dict, blk, rows: tuple = (slice(None),)) -> list[jax.Array]:
    """The weights of super-rows `blk` of a row block, one float32 [BN, nsb, R, B, W] per field a
    (refs in the layout's own shape: lo [BN, K/S, R, B, W], hi [BN, K/S, R, 1, W], scales and
    offsets [BN, K/S, R], super-block values [BN, K/S]; `rows` indexes the block's rows within the
    refs: all of them, or e.g. (expert, pl.ds(n0, BN)) in an expert stack); each scale and offset
    is loaded once per group and broadcast: no gathers, no reshapes."""
    a_fields, b_fields, _ = f.split
    hb = f.bits - 4
    s, o = group_scales(f, wrefs, blk, rows)
    s = s[:, :, :, None, None]
    o = None if o is None else o[:, :, :, None, None]
    lo = wrefs["lo"][(*rows, blk, slice(None), slice(None), slice(None))].astype(jnp.int32)  # [BN, nsb, R, B, W]
    h = wrefs["hi"][(*rows, blk, slice(None), slice(None), slice(None))].astype(jnp.int32) if "hi" in wrefs else None
    field = jnp.arange(b_fields, dtype=jnp.int32)[None, None, None, :, None]
    out = []
    for a in range(a_fields):
        if f.bits == 8:
            w = lo.astype(jnp.float32) * s
        else:
            q = (lo >> (4 * a)) & 15
            if h is not None:
                q = q | (((h >> (hb * (a * b_fields + field))) & ((1 << hb) - 1)) << 4)
            w = to_float(q) * s
        out.append(w if o is None else w - o)
    return out


def group_scales(f, wrefs: dict, blk, rows: tuple = (slice(None),)) -> tuple[jax.Array, jax.Array | None]:
    """(s, o) of every group of super-rows `blk`: float32 [BN, nsb, R] each (o None for "none");
    `rows` as in `decode_tile`."""
    grp = (*rows, blk, slice(None))  # [BN, nsb, R] of a per-group leaf
    sup = (*rows, blk)  # [BN, nsb] of a per-super-block leaf
    s = wrefs["sc"][grp].astype(jnp.float32)
    if "ss" in wrefs:
        s = s * wrefs["ss"][sup].astype(jnp.float32)[:, :, None]
    o = None
    if f.offset == "const":
        o = f.const * s
    elif f.offset == "zero":
        o = wrefs["of"][grp].astype(jnp.float32) * s
    elif f.offset == "min":
        o = -wrefs["of"][grp].astype(jnp.float32)
    elif f.offset == "kmin":
        o = wrefs["so"][sup].astype(jnp.float32)[:, :, None] * wrefs["of"][grp].astype(jnp.float32)
    return s, o


def weight_views(w: QuantWeight) -> tuple[list[jax.Array], tuple[bool, ...]]:
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


def triton_params(num_warps: int, num_stages: int, interpret: bool) -> dict:
    if interpret:
        return {}
    from jax.experimental.pallas import triton as pl_triton
    return {"compiler_params": pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)}
