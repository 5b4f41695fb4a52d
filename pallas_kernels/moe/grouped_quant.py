"""The grouped expert matmuls over quantized expert stacks (`QuantWeight` [E, out, in]: GGUF
K-quants and legacy quants repacked at load, GPTQ / AWQ experts stacked at load), and their jnp
references. Same grid, alignment and epilogues as grouped_matmul.py (read that first); what differs
is where each program's weight tile comes from:

    program (j, b): expert e = expert_of_block[b], output rows [j*block_n, (j+1)*block_n); every
    K step decodes the expert's [block_n, block_k] tile from the packed stack (codes, group scales,
    offsets: the layout of ferrum_jax/quant/qweight.py) into x's dtype and feeds a tensor-core dot
    with the block's gathered rows (block_m >= 16), accumulating in float32.

The tile decode is the one of pallas_kernels/quant_matmul/dot.py (its tensor-core variant): a byte
of `lo` holds field a = 0, 1 (low, high nibble) of two elements (8-bit codes: one field), so each
step works on the field views of the layout, [rows, K/A] with a group's codes of one field
contiguous, and decodes A 2-D tiles [block_n, block_k / A] without reshaping any tile; each
column's group scale / offset is a gather that hits L1. The stacks are passed flattened to [E * N_pad, ...] (a free reshape), so the
expert is a dynamic row offset e * N_pad: the same dynamic indexing as the dense kernels'
`w_ref[e, ...]`. The activations' columns that meet field a are picked by the same gather that
already picks the block's token rows (gate_up) or by a column gather of the block's act rows
(down): x is never rearranged in HBM.

  gate_up  x [T, H] -> act [P, F] in x's dtype (P = max_blocks * block_m, rows in sorted order):
           act_fn(x gate_e^T) * (x up_e^T); gate and up may be different formats (a Q4_K_M file
           mixes Q4_K and Q6_K stacks), or one fused [E, 2F, H] stack (up rows start at F).
  down     act [P, F] -> y [P, H] in act's dtype: (act_e down_e^T) times the entry's routing weight.

Declined (the XLA reference "xla_dequant" runs them): GPTQ act-order stacks (each expert permutes
x's columns differently), GGUF types without a kernel layout (they stay `GGUFWeight`), shapes that
are not whole tiles (see `unsupported`).

`moe_experts_quant` has the signature and semantics of `ferrum_jax.moe_ops.moe_experts` (including
`expert_offset`); `ferrum_jax/moe_kernels.py` registers it as "pallas_grouped_quant". The
references `gate_up_reference` / `down_reference` are grouped_matmul's on the dequantized stacks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ferrum_jax.quant.qweight import QFormat, QuantWeight
from pallas_kernels.moe.align import Alignment, grouped_moe
from pallas_kernels.moe.grouped_matmul import KERNEL_ACTIVATIONS, Tiles
from pallas_kernels.moe.grouped_matmul import down_reference as _dense_down_reference
from pallas_kernels.moe.grouped_matmul import gate_up_reference as _dense_gate_up_reference
from pallas_kernels.quant_matmul.common import to_float, triton_params

__all__ = ["QuantMoeConfig", "choose_config", "down", "down_reference", "gate_up", "gate_up_reference",
           "moe_experts_quant", "tiles_unsupported", "unsupported"]

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MAX_PLANE = 2**31  # elements of one flattened plane: the kernels' element offsets are int32


@dataclasses.dataclass(frozen=True)
class QuantMoeConfig:
    """block_m: entries per block (the alignment's padding unit, rows of every dot); the tiles of
    the gate+up and the down kernels (block_k counts elements of K, all fields together)."""
    block_m: int = 16
    gate_up: Tiles = Tiles(64, 256, 4, 3)
    down: Tiles = Tiles(64, 256, 4, 3)


# ---- shapes and checks ------------------------------------------------------------------------------

def _fields(f: QFormat) -> int:
    return f.split[0]


def _fit(dim: int, want: int, least: int) -> int:
    """The largest power of two in [least, want] dividing dim, else want (unsupported says why)."""
    v = want
    while v >= least:
        if dim % v == 0:
            return v
        v //= 2
    return want


def choose_config(num_entries: int, num_experts: int, hidden: int, ff: int,
                  formats: tuple[QFormat, ...] = ()) -> QuantMoeConfig:
    """Defaults by the mean entries per expert (T*k / E), as the dense kernels': block_m 16 for
    decode and small batches, larger blocks when experts get many rows. Tiles for one-block experts:
    gate_up 32 x 256, 4 warps, 2 stages, the best of an H200 sweep at T = 1 over Q4_K stacks of
    Qwen3-30B-A3B's shape (45.1 us vs 57.2 us for the 64 x 256 / 3 stages start,
    bench/results/moe_sweep_q4k_T1_NVIDIA-H200.log); down 64 x 256 (not swept). Bigger blocks:
    64 x 128 (a [block_m, 64] float32 accumulator pair beside the decoded tile), not swept."""
    per_expert = num_entries / num_experts
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64
    want = Tiles(64, 256, 4, 3) if block_m == 16 else Tiles(64, 128, 4, 3)
    want_gu = Tiles(32, 256, 4, 2) if block_m == 16 else want
    least_k = 16 * max((_fields(f) for f in formats), default=1)
    gu = dataclasses.replace(want_gu, block_n=_fit(ff, want_gu.block_n, 16),
                             block_k=_fit(hidden, want_gu.block_k, least_k))
    dn = dataclasses.replace(want, block_n=_fit(hidden, want.block_n, 16), block_k=_fit(ff, want.block_k, least_k))
    return QuantMoeConfig(block_m=block_m, gate_up=gu, down=dn)


def _stack_unsupported(name: str, w: Any) -> str | None:
    if not isinstance(w, QuantWeight):
        what = f"{type(w).__name__} {getattr(w, 'ggml_type', '')}".strip()
        return f"the {name} stack is a {what}, not a QuantWeight stack (no kernel layout)"
    if w.ndim != 3 or len(w.lead) != 1:
        return f"the {name} {w.fmt.name} QuantWeight of shape {w.logical_shape} is not an [experts, out, in] stack"
    if w.perm is not None:
        return (f"the {name} {w.fmt.name} stack has GPTQ act-order permutations (each expert permutes x's "
                "columns differently)")
    if math.prod(w.lo.shape) >= MAX_PLANE:
        return (f"the {name} {w.fmt.name} stack's code plane has {math.prod(w.lo.shape)} bytes, past the int32 "
                f"element offsets of the kernels ({MAX_PLANE})")
    return None


def tiles_unsupported(tiles: Tiles, n: int, k: int, formats: tuple[QFormat, ...], what: str) -> str | None:
    """None if `tiles` fits a projection of n outputs and k inputs in these formats, else why not."""
    for name, v, dim in (("block_n", tiles.block_n, n), ("block_k", tiles.block_k, k)):
        if v < 16 or v & (v - 1):
            return f"{what} {name} {v} is not a power of two >= 16 (the smallest tensor-core dot)"
        if dim % v:
            return f"{what}: {dim} is not a multiple of {name} {v}"
    for f in formats:
        if tiles.block_k // _fields(f) < 16:
            return (f"{what}: block_k {tiles.block_k} gives {f.name}'s {_fields(f)} code fields "
                    f"{tiles.block_k // _fields(f)} columns each, fewer than 16 (the smallest tensor-core dot)")
    return None


def _shapes(x, ids, w_gate, w_up, w_down) -> tuple[int, int, int, int] | str:
    """(entries, experts, hidden, ff) of QuantWeight stacks, or why the shapes do not fit together."""
    h = x.shape[-1]
    e = w_gate.shape[0]
    fused = w_up is None
    f = w_gate.shape[1] // 2 if fused else w_gate.shape[1]
    if (w_gate.shape[2] != h or w_down.shape != (e, h, f) or (fused and w_gate.shape[1] % 2)
            or (not fused and w_up.shape != w_gate.shape)):
        return (f"expert stacks gate {w_gate.shape}, up {None if fused else w_up.shape}, down {w_down.shape} "
                f"do not fit hidden {h}")
    stacks = (w_gate, w_down) if fused else (w_gate, w_up, w_down)
    if any(w.lead != (e,) for w in stacks):
        return f"expert stacks hold {[w.lead[0] for w in stacks]} experts' leaves, their shapes say {e}"
    if ids.shape[:-1] != x.shape[:-1]:
        return f"ids {ids.shape} do not match x {x.shape}"
    return math.prod(ids.shape), e, h, f


def operands_unsupported(x: Any, ids: Any, weights: Any, w_gate: Any, w_up: Any, w_down: Any,
                         kind: str) -> str | tuple[int, int, int, int]:
    """Why these stacks, routing and activation cannot go to a quantized MoE kernel (a string), else
    (entries, experts, hidden, ff). The tiles are each kernel's own check."""
    named = [("gate", w_gate), ("down", w_down)] + ([] if w_up is None else [("up", w_up)])
    for name, w in named:
        reason = _stack_unsupported(name, w)
        if reason is not None:
            return reason
    if kind not in KERNEL_ACTIVATIONS:
        return f"activation {kind!r} not in the kernel epilogue's {sorted(KERNEL_ACTIVATIONS)}"
    if x.dtype not in DTYPES:
        return f"x is {x.dtype}, not bfloat16/float16/float32"
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        return f"ids are {ids.dtype}, not integers"
    if weights.shape != ids.shape:
        return f"routing weights {weights.shape} and ids {ids.shape} differ"
    shapes = _shapes(x, ids, w_gate, w_up, w_down)
    if isinstance(shapes, str):
        return shapes
    if shapes[0] == 0:
        return "no tokens"
    return shapes


def unsupported(x: Any, ids: Any, weights: Any, w_gate: Any, w_up: Any, w_down: Any, kind: str,
                config: QuantMoeConfig | None = None) -> str | None:
    """None if the quantized grouped kernels take these arguments, else why not."""
    shapes = operands_unsupported(x, ids, weights, w_gate, w_up, w_down, kind)
    if isinstance(shapes, str):
        return shapes
    nk, e, h, f = shapes
    up_formats = (w_gate.fmt,) if w_up is None else (w_gate.fmt, w_up.fmt)
    cfg = config or choose_config(nk, e, h, f, (*up_formats, w_down.fmt))
    bm = cfg.block_m
    if bm < 16 or bm & (bm - 1):
        return f"block_m {bm} is not a power of two >= 16"
    return (tiles_unsupported(cfg.gate_up, f, h, up_formats, "gate_up")
            or tiles_unsupported(cfg.down, h, f, (w_down.fmt,), "down"))


# ---- the stack as kernel operands -----------------------------------------------------------------

_NAMES = ("lo", "hi", "sc", "ss", "of", "so")


def _views(w: QuantWeight) -> tuple[list[jax.Array], tuple[str, ...]]:
    """The stack's leaves flattened over (expert, row) and viewed per field (free reshapes):
    lo [E*N_pad, K/A], hi [E*N_pad, K/G * W], scales / offsets [E*N_pad, K/G], super-block values
    [E*N_pad, K/S]; and the names of the present ones (see `_decode_fields`)."""
    rows, k, a = w.lo.shape[0] * w.lo.shape[1], w.cols, _fields(w.fmt)
    leaves = (w.lo, w.hi, w.scales, w.super_scales, w.offsets, w.super_offsets)
    views, names = [], []
    for name, leaf in zip(_NAMES, leaves):
        if leaf is not None:
            views.append(leaf.reshape(rows, k // a if name == "lo" else -1))
            names.append(name)
    return views, tuple(names)


def _whole(a: jax.Array) -> pl.BlockSpec:
    """The whole array as one block (indexed dynamically inside the kernel)."""
    return pl.BlockSpec(a.shape, lambda j, b: (0,) * a.ndim)


def _refs(it: Iterator, names: tuple[str, ...]) -> dict:
    return {name: next(it) for name in names}


# ---- inside the kernels ---------------------------------------------------------------------------

def _decode_fields(f: QFormat, w: dict, row0: jax.Array, c0: jax.Array, block_n: int, half: int,
                   dtype) -> list[jax.Array]:
    """The weight tile of rows row0 .. row0 + block_n (flattened expert rows) and field-view columns
    c0 .. c0 + half, decoded: one [block_n, half] array in `dtype` per code field a (column c of
    field a is element (c // pg) * G + a * pg + c % pg of the row, pg = G / A)."""
    a_fields, b_fields, wd = f.split
    hb = f.bits - 4
    pg = f.group // a_fields
    rows = row0 + jnp.arange(block_n, dtype=jnp.int32)[:, None]
    col = c0 + jnp.arange(half, dtype=jnp.int32)
    g = (col // pg)[None, :]
    s = w["sc"][rows, g].astype(jnp.float32)  # each column's group scale
    if "ss" in w:
        s = s * w["ss"][rows, g // f.sub_per_super].astype(jnp.float32)
    o = None
    if f.offset == "const":
        o = f.const * s
    elif f.offset == "zero":
        o = w["of"][rows, g].astype(jnp.float32) * s
    elif f.offset == "min":
        o = -w["of"][rows, g].astype(jnp.float32)
    elif f.offset == "kmin":
        o = w["so"][rows, g // f.sub_per_super].astype(jnp.float32) * w["of"][rows, g].astype(jnp.float32)
    lo = w["lo"][pl.ds(row0, block_n), pl.ds(c0, half)].astype(jnp.int32)
    if "hi" in w:
        j = col % pg  # = b * W + w inside the group's field
        h = w["hi"][rows, (col // pg * wd + j % wd)[None, :]].astype(jnp.int32)
        field = (j // wd)[None, :]
    out = []
    for a in range(a_fields):
        if f.bits == 8:
            t = lo.astype(jnp.float32) * s
        else:
            q = (lo >> (4 * a)) & 15
            if "hi" in w:
                q = q | (((h >> (hb * (a * b_fields + field))) & ((1 << hb) - 1)) << 4)
            t = to_float(q) * s
        if o is not None:
            t = t - o
        out.append(t.astype(dtype))
    return out


def _field_cols(f: QFormat, c0: jax.Array, half: int) -> list[jax.Array]:
    """For each code field a, the activation columns [half] that meet field-view columns c0 .. c0 + half."""
    a_fields = _fields(f)
    pg = f.group // a_fields
    col = c0 + jnp.arange(half, dtype=jnp.int32)
    base = col // pg * f.group + col % pg
    return [base + a * pg for a in range(a_fields)]


def _dot(a: jax.Array, w: jax.Array) -> jax.Array:
    """a [m, k] . w [n, k]^T in float32 (HIGHEST for float32 operands: no silent TF32)."""
    exact = a.dtype == jnp.float32
    return lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=lax.Precision.HIGHEST if exact else None)


def _row0(e: jax.Array, n_pad: int, offset: int, n0: jax.Array, block_n: int) -> jax.Array:
    row0 = e * n_pad + offset + n0
    return pl.multiple_of(row0, block_n) if (n_pad % block_n == 0 and offset % block_n == 0) else row0


def _gate_up_kernel(*refs, fg: QFormat, fu: QFormat, names_g: tuple[str, ...], names_u: tuple[str, ...] | None,
                    pad_g: int, pad_u: int, up_row: int, top_k: int, n_tokens: int, block_k: int, steps: int,
                    act: str, dot_dtype):
    it = iter(refs)
    ids_ref, eob_ref, nvb_ref, x_ref = (next(it) for _ in range(4))
    wg = _refs(it, names_g)
    wu = wg if names_u is None else _refs(it, names_u)
    o_ref = next(it)
    j, b = pl.program_id(0), pl.program_id(1)

    @pl.when(b < nvb_ref[0])
    def _():
        e = eob_ref[b]
        block_m, block_n = o_ref.shape
        # Padding entries (the sentinel T*k) read the last token's row; their outputs are never used.
        tok = jnp.minimum(ids_ref[...] // top_k, n_tokens - 1)[:, None]  # [block_m, 1]
        n0 = j * block_n
        g_row, u_row = _row0(e, pad_g, 0, n0, block_n), _row0(e, pad_u, up_row, n0, block_n)

        def project(f: QFormat, w: dict, row0, t, acc, xs: dict):
            half = block_k // _fields(f)
            c0 = pl.multiple_of(t * half, half)
            key = (f.group, _fields(f))  # gate and up of one field layout share the gathered x tiles
            if key not in xs:
                xs[key] = [x_ref[tok, cols[None, :]].astype(dot_dtype) for cols in _field_cols(f, c0, half)]
            for xa, wa in zip(xs[key], _decode_fields(f, w, row0, c0, block_n, half, dot_dtype)):
                acc = acc + _dot(xa, wa)
            return acc

        def step(t, acc):
            g, u = acc
            xs: dict = {}
            return project(fg, wg, g_row, t, g, xs), project(fu, wu, u_row, t, u, xs)

        zero = jnp.zeros((block_m, block_n), jnp.float32)
        g, u = lax.fori_loop(0, steps, step, (zero, zero))
        o_ref[...] = (KERNEL_ACTIVATIONS[act](g) * u).astype(o_ref.dtype)


def _down_kernel(*refs, f: QFormat, names: tuple[str, ...], n_pad: int, block_k: int, steps: int, dot_dtype):
    it = iter(refs)
    eob_ref, nvb_ref, a_ref, rw_ref = (next(it) for _ in range(4))
    w = _refs(it, names)
    o_ref = next(it)
    j, b = pl.program_id(0), pl.program_id(1)

    @pl.when(b < nvb_ref[0])
    def _():
        e = eob_ref[b]
        block_m, block_n = o_ref.shape
        row0 = _row0(e, n_pad, 0, j * block_n, block_n)
        rows = jnp.arange(block_m, dtype=jnp.int32)[:, None]
        half = block_k // _fields(f)

        def step(t, acc):
            c0 = pl.multiple_of(t * half, half)
            acts = [a_ref[rows, cols[None, :]].astype(dot_dtype) for cols in _field_cols(f, c0, half)]
            for aa, wa in zip(acts, _decode_fields(f, w, row0, c0, block_n, half, dot_dtype)):
                acc = acc + _dot(aa, wa)
            return acc

        acc = lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), jnp.float32))
        o_ref[...] = (acc * rw_ref[...][:, None]).astype(o_ref.dtype)


# ---- the two pallas_calls ---------------------------------------------------------------------------

def _dot_dtype(x: jax.Array):
    return x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32


def _check_align(align: Alignment, what: str) -> None:
    bm = align.block_m
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"{what}: block_m {bm} is not a power of two >= 16 (the smallest tensor-core dot)")


def gate_up(x: jax.Array, align: Alignment, w_gate: QuantWeight, w_up: QuantWeight | None, kind: str, *,
            top_k: int, tiles: Tiles = Tiles(64, 256, 4, 3), interpret: bool = False) -> jax.Array:
    """act [P, F] in x's dtype, rows in align's sorted order: act_fn(x gate_e^T) * (x up_e^T) of each
    entry's token and expert. x [T, H]; w_gate, w_up QuantWeight stacks [E, F, H], or w_up None and
    w_gate the fused [E, 2F, H] stack."""
    _check_align(align, "gate_up")
    if kind not in KERNEL_ACTIVATIONS:
        raise ValueError(f"gate_up: activation {kind!r} not in the kernel's {sorted(KERNEL_ACTIVATIONS)}")
    for name, w in (("gate", w_gate), ("up", w_up)):
        reason = None if w is None else _stack_unsupported(name, w)
        if reason is not None:
            raise ValueError(f"gate_up: {reason}")
    n_tokens, h = x.shape
    if align.num_entries != n_tokens * top_k:
        raise ValueError(f"gate_up: the alignment has {align.num_entries} entries, x has {n_tokens} tokens x {top_k}")
    fused = w_up is None
    f = w_gate.shape[1] // 2 if fused else w_gate.shape[1]
    if w_gate.shape[2] != h or (fused and w_gate.shape[1] % 2) or (not fused and w_up.shape != w_gate.shape):
        raise ValueError(f"gate_up: stacks {w_gate.shape} / {None if fused else w_up.shape} do not fit x [.., {h}]")
    w_up_ = w_gate if fused else w_up
    reason = tiles_unsupported(tiles, f, h, (w_gate.fmt, w_up_.fmt), "gate_up")
    if reason is not None:
        raise ValueError(reason)
    views_g, names_g = _views(w_gate)
    views_u, names_u = ([], None) if fused else _views(w_up)
    bm, bn, bk = align.block_m, tiles.block_n, tiles.block_k
    ids, eob, nvb = align.sorted_ids, align.expert_of_block, align.num_valid_blocks
    kernel = partial(_gate_up_kernel, fg=w_gate.fmt, fu=w_up_.fmt, names_g=names_g, names_u=names_u,
                     pad_g=w_gate.lo.shape[1], pad_u=w_up_.lo.shape[1], up_row=f if fused else 0, top_k=top_k,
                     n_tokens=n_tokens, block_k=bk, steps=h // bk, act=kind, dot_dtype=_dot_dtype(x))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((ids.shape[0], f), x.dtype),
        grid=(f // bn, align.max_blocks),
        in_specs=[pl.BlockSpec((bm,), lambda j, b: (b,)), _whole(eob), _whole(nvb), _whole(x)]
        + [_whole(v) for v in views_g + views_u],
        out_specs=pl.BlockSpec((bm, bn), lambda j, b: (b, j)),
        interpret=interpret,
        **triton_params(tiles.num_warps, tiles.num_stages, interpret),
    )(ids, eob, nvb, x, *views_g, *views_u)


def down(act: jax.Array, align: Alignment, routing: jax.Array, w_down: QuantWeight, *,
         tiles: Tiles = Tiles(64, 256, 4, 3), interpret: bool = False) -> jax.Array:
    """y [P, H] in act's dtype, rows in sorted order: (act_row down_e^T) * routing weight. act [P, F]
    from `gate_up`; routing float32 [P], the routing weight of each sorted entry (0 for padding);
    w_down a QuantWeight stack [E, H, F]."""
    _check_align(align, "down")
    reason = _stack_unsupported("down", w_down)
    if reason is not None:
        raise ValueError(f"down: {reason}")
    p, f = act.shape
    _, h, f_w = w_down.shape
    if f_w != f or p != align.sorted_ids.shape[0] or routing.shape != (p,):
        raise ValueError(f"down: act {act.shape}, routing {routing.shape}, w_down {w_down.shape} and "
                         f"{align.sorted_ids.shape[0]} aligned rows do not fit")
    reason = tiles_unsupported(tiles, h, f, (w_down.fmt,), "down")
    if reason is not None:
        raise ValueError(reason)
    views, names = _views(w_down)
    bm, bn, bk = align.block_m, tiles.block_n, tiles.block_k
    eob, nvb = align.expert_of_block, align.num_valid_blocks
    kernel = partial(_down_kernel, f=w_down.fmt, names=names, n_pad=w_down.lo.shape[1], block_k=bk, steps=f // bk,
                     dot_dtype=_dot_dtype(act))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((p, h), act.dtype),
        grid=(h // bn, align.max_blocks),
        in_specs=[_whole(eob), _whole(nvb), pl.BlockSpec((bm, f), lambda j, b: (b, 0)),
                  pl.BlockSpec((bm,), lambda j, b: (b,))] + [_whole(v) for v in views],
        out_specs=pl.BlockSpec((bm, bn), lambda j, b: (b, j)),
        interpret=interpret,
        **triton_params(tiles.num_warps, tiles.num_stages, interpret),
    )(eob, nvb, act, routing.astype(jnp.float32), *views)


# ---- the references -----------------------------------------------------------------------------

def gate_up_reference(x: jax.Array, align: Alignment, w_gate: QuantWeight, w_up: QuantWeight | None, kind: str, *,
                      top_k: int) -> jax.Array:
    """`gate_up` in jnp: the dense kernel's reference on the stacks dequantized in float32."""
    return _dense_gate_up_reference(x, align, w_gate.dequantize(jnp.float32),
                                    None if w_up is None else w_up.dequantize(jnp.float32), kind, top_k=top_k)


def down_reference(act: jax.Array, align: Alignment, routing: jax.Array, w_down: QuantWeight) -> jax.Array:
    """`down` in jnp: the dense kernel's reference on the stack dequantized in float32."""
    return _dense_down_reference(act, align, routing, w_down.dequantize(jnp.float32))


# ---- the op ---------------------------------------------------------------------------------------

def moe_experts_quant(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: QuantWeight,
                      w_up: QuantWeight | None, w_down: QuantWeight, kind: str, *,
                      expert_offset: int | jax.Array = 0, ops: Any = None, config: QuantMoeConfig | None = None,
                      interpret: bool = False) -> jax.Array:
    """`ferrum_jax.moe_ops.moe_experts` on the quantized grouped kernels: x [..., H], ids / weights
    [..., k], QuantWeight stacks [E, F, H] (w_up None: gate is [E, 2F, H]) and [E, H, F], experts
    [expert_offset, expert_offset + E) local. `ops` is accepted for the op signature and unused;
    `config` defaults to `choose_config`."""
    del ops
    reason = unsupported(x, ids, weights, w_gate, w_up, w_down, kind, config)
    if reason is not None:
        raise ValueError(f"moe_experts_quant: {reason}")
    nk, e, h, f = _shapes(x, ids, w_gate, w_up, w_down)
    formats = (w_gate.fmt, w_down.fmt) + (() if w_up is None else (w_up.fmt,))
    cfg = config or choose_config(nk, e, h, f, formats)
    return _moe_experts(x, ids, weights, w_gate, w_up, w_down, jnp.asarray(expert_offset, jnp.int32), kind=kind,
                        config=cfg, interpret=interpret)


@partial(jax.jit, static_argnames=("kind", "config", "interpret"))
def _moe_experts(x, ids, weights, w_gate, w_up, w_down, expert_offset, *, kind: str, config: QuantMoeConfig,
                 interpret: bool) -> jax.Array:
    return grouped_moe(
        x, ids, weights, expert_offset, num_experts=w_gate.shape[0], block_m=config.block_m,
        gate_up=lambda xs, al, k: gate_up(xs, al, w_gate, w_up, kind, top_k=k, tiles=config.gate_up,
                                          interpret=interpret),
        down=lambda act, al, r: down(act, al, r, w_down, tiles=config.down, interpret=interpret))
