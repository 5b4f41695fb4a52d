"""The grouped expert matmuls over aligned blocks (see align.py), one pallas_call per projection.

Grid (N / block_n, max_blocks). Program (j, b) handles the block_m entries
sorted_ids[b*block_m : (b+1)*block_m], all routed to expert e = expert_of_block[b], and output
columns [j*block_n, (j+1)*block_n): it walks K in block_k steps, each step a tensor-core dot of
x's rows (gathered: row = entry // top_k) with the expert's weight tile [block_n, block_k], read
straight from the [E, N, K] stack (the checkpoint's [out, in] layout, so the dot contracts both
operands' last dims: no transposed copy of the weights). Programs of blocks past
num_valid_blocks exit at once (pl.when): the grid is static, the number of used blocks is not.
The column tile is the fastest grid axis (CUDA's x): the programs of one block run back to back,
so its gathered x rows (or act rows) come from L2 after the first tile, and consecutive blocks of
one expert are in flight together and share its weight tiles in L2. With the block axis fastest
instead, every block's rows would be fetched from HBM once per column tile (at T=4096 that is
N/block_n times 134 MB of x rows for gate_up).

  gate_up  x [T, H] -> act [P, F] (P = max_blocks * block_m, rows in sorted order):
           act = act_fn(x w_gate_e^T) * (x w_up_e^T), both accumulated in float32 in the same
           program (one pass over x's tile feeds both dots), stored in x's dtype. w_up may be the
           gate stack itself (the fused [E, 2F, H] layout: up rows start at F).
  down     act [P, F] -> y [P, H] in act's dtype: act_e w_down_e^T times the entry's routing
           weight (float32, in the epilogue). Rows stay in sorted order (contiguous block
           stores); the caller gathers each (token, slot) row back and sums over slots.

Decode (T*k <= E): one block per selected expert with one real row in block_m = 16, the smallest
tensor-core dot; the weight tile is loaded once, the 15 padding rows cost tensor-core cycles, not
bandwidth. For dense stacks at T*k <= E/4 the op runs `decode.py`'s GEMV kernels instead (no
alignment, no padding rows: 1.19x the batch-1 decode rate of Qwen3-30B-A3B on an H200, with the
routing kernel).

`gate_up_reference` / `down_reference` are the same contracts in jnp (gathered weights, float32).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.moe.align import Alignment

# Activations the kernel epilogue computes (the Triton lowering has no erf: exact "gelu" declines).
KERNEL_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": lambda g: g * jax.nn.sigmoid(g),
    "gelu_pytorch_tanh": lambda g: jax.nn.gelu(g, approximate=True),
    "gelu_new": lambda g: jax.nn.gelu(g, approximate=True),
    "relu": lambda g: jnp.maximum(g, 0.0),
}


DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def stack_shapes(x, ids, w_gate, w_up, w_down, kind: str) -> tuple[int, int, int, int, int] | str:
    """(entries T*k, experts, hidden, ff, top_k) of dense-stack arguments a kernel of this package
    takes (x [..., H], ids [..., k], stacks [E, F, H] or fused [E, 2F, H] and [E, H, F]), or why not."""
    ws = (w_gate, w_down) if w_up is None else (w_gate, w_up, w_down)
    bad = [type(w).__name__ for w in ws if not isinstance(w, jax.Array)]
    if bad:
        return f"expert weights are {', '.join(bad)}, not dense arrays"
    if kind not in KERNEL_ACTIVATIONS:
        return f"activation {kind!r} not in the kernel epilogue's {sorted(KERNEL_ACTIVATIONS)}"
    if jnp.dtype(x.dtype) not in DTYPES:
        return f"x is {x.dtype}, not bfloat16/float16/float32"
    if any(jnp.dtype(w.dtype) not in DTYPES for w in ws):
        return f"expert weights are {', '.join(str(w.dtype) for w in ws)}, not bfloat16/float16/float32"
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        return f"ids are {ids.dtype}, not integers"
    h = x.shape[-1]
    if w_gate.ndim != 3 or w_down.ndim != 3:
        return f"expert stacks must be [E, out, in], got gate {w_gate.shape}, down {w_down.shape}"
    e = w_gate.shape[0]
    f = w_gate.shape[1] // 2 if w_up is None else w_gate.shape[1]
    if w_gate.shape[2] != h or w_down.shape != (e, h, f) or (w_up is not None and w_up.shape != w_gate.shape):
        return (f"expert stacks gate {w_gate.shape}, up {None if w_up is None else w_up.shape}, down {w_down.shape} "
                f"do not fit hidden {h}")
    if ids.shape[:-1] != x.shape[:-1]:
        return f"ids {ids.shape} do not match x {x.shape}"
    return math.prod(ids.shape), e, h, f, ids.shape[-1]


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One projection's tiles: output columns and K step per program, Triton warps and stages."""
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3


def tiles_unsupported(tiles: Tiles, n: int, k: int, what: str) -> str | None:
    """None if `tiles` fits a projection of n outputs and k inputs, else why not."""
    for name, v, dim in (("block_n", tiles.block_n, n), ("block_k", tiles.block_k, k)):
        if v < 16 or v & (v - 1):
            return f"{what} {name} {v} is not a power of two >= 16 (the smallest tensor-core dot)"
        if dim % v:
            return f"{what}: {dim} is not a multiple of {name} {v}"
    return None


def _triton_params(tiles: Tiles, interpret: bool) -> dict:
    if interpret:
        return {}
    from jax.experimental.pallas import triton as pl_triton
    return {"compiler_params": pl_triton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)}


def _whole(a: jax.Array) -> pl.BlockSpec:
    """The whole array as one block (indexed dynamically inside the kernel)."""
    return pl.BlockSpec(a.shape, lambda j, b: (0,) * a.ndim)


def _dot(a: jax.Array, w: jax.Array) -> jax.Array:
    """a [m, k] . w [n, k]^T in float32 (HIGHEST for float32 operands: no silent TF32)."""
    exact = a.dtype == jnp.float32
    return lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=lax.Precision.HIGHEST if exact else None)


def _dot_dtype(x: jax.Array):
    return x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32


def _gate_up_kernel(ids_ref, eob_ref, nvb_ref, x_ref, wg_ref, wu_ref, o_ref, *, top_k: int, n_tokens: int,
                    up_row: int, block_k: int, steps: int, act: str, dot_dtype):
    j, b = pl.program_id(0), pl.program_id(1)

    @pl.when(b < nvb_ref[0])
    def _():
        e = eob_ref[b]
        block_m, block_n = o_ref.shape
        # Padding entries (the sentinel T*k) read the last token's row; their outputs are never used.
        tok = jnp.minimum(ids_ref[...] // top_k, n_tokens - 1)[:, None]  # [block_m, 1]
        n0 = pl.multiple_of(j * block_n, block_n)

        def step(t, acc):
            g, u = acc
            k0 = pl.multiple_of(t * block_k, block_k)
            cols = (k0 + jnp.arange(block_k, dtype=jnp.int32))[None, :]
            xt = x_ref[tok, cols].astype(dot_dtype)  # gathered rows [block_m, block_k]
            wg = wg_ref[e, pl.ds(n0, block_n), pl.ds(k0, block_k)].astype(dot_dtype)
            wu = wu_ref[e, pl.ds(up_row + n0, block_n), pl.ds(k0, block_k)].astype(dot_dtype)
            return g + _dot(xt, wg), u + _dot(xt, wu)

        zero = jnp.zeros((block_m, block_n), jnp.float32)
        g, u = lax.fori_loop(0, steps, step, (zero, zero))
        o_ref[...] = (KERNEL_ACTIVATIONS[act](g) * u).astype(o_ref.dtype)


def _down_kernel(eob_ref, nvb_ref, a_ref, rw_ref, w_ref, o_ref, *, block_k: int, steps: int, dot_dtype):
    j, b = pl.program_id(0), pl.program_id(1)

    @pl.when(b < nvb_ref[0])
    def _():
        e = eob_ref[b]
        block_m, block_n = o_ref.shape
        n0 = pl.multiple_of(j * block_n, block_n)

        def step(t, acc):
            k0 = pl.multiple_of(t * block_k, block_k)
            a = a_ref[:, pl.ds(k0, block_k)].astype(dot_dtype)  # this block's rows, contiguous
            w = w_ref[e, pl.ds(n0, block_n), pl.ds(k0, block_k)].astype(dot_dtype)
            return acc + _dot(a, w)

        acc = lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), jnp.float32))
        o_ref[...] = (acc * rw_ref[...][:, None]).astype(o_ref.dtype)


def _check_align(align: Alignment, what: str) -> None:
    bm = align.block_m
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"{what}: block_m {bm} is not a power of two >= 16 (the smallest tensor-core dot)")


def gate_up(x: jax.Array, align: Alignment, w_gate: jax.Array, w_up: jax.Array | None, kind: str, *, top_k: int,
            tiles: Tiles = Tiles(), interpret: bool = False) -> jax.Array:
    """act [P, F] in x's dtype, rows in align's sorted order: act_fn(x w_gate^T) * (x w_up^T) of
    each entry's token and expert. x [T, H]; w_gate, w_up [E, F, H], or w_up None and w_gate the
    fused [E, 2F, H] stack."""
    _check_align(align, "gate_up")
    if kind not in KERNEL_ACTIVATIONS:
        raise ValueError(f"gate_up: activation {kind!r} not in the kernel's {sorted(KERNEL_ACTIVATIONS)}")
    n_tokens, h = x.shape
    if align.num_entries != n_tokens * top_k:
        raise ValueError(f"gate_up: the alignment has {align.num_entries} entries, x has {n_tokens} tokens x {top_k}")
    fused = w_up is None
    f = w_gate.shape[1] // 2 if fused else w_gate.shape[1]
    if w_gate.shape[2] != h or (fused and w_gate.shape[1] % 2) or (not fused and w_up.shape != w_gate.shape):
        raise ValueError(f"gate_up: weights {w_gate.shape} / {None if fused else w_up.shape} do not fit x [.., {h}]")
    reason = tiles_unsupported(tiles, f, h, "gate_up")
    if reason is not None:
        raise ValueError(reason)
    w_up = w_gate if fused else w_up
    bm, bn, bk = align.block_m, tiles.block_n, tiles.block_k
    ids, eob, nvb = align.sorted_ids, align.expert_of_block, align.num_valid_blocks
    kernel = partial(_gate_up_kernel, top_k=top_k, n_tokens=n_tokens, up_row=f if fused else 0, block_k=bk,
                     steps=h // bk, act=kind, dot_dtype=_dot_dtype(x))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((ids.shape[0], f), x.dtype),
        grid=(f // bn, align.max_blocks),
        in_specs=[pl.BlockSpec((bm,), lambda j, b: (b,)), _whole(eob), _whole(nvb), _whole(x), _whole(w_gate),
                  _whole(w_up)],
        out_specs=pl.BlockSpec((bm, bn), lambda j, b: (b, j)),
        interpret=interpret,
        **_triton_params(tiles, interpret),
    )(ids, eob, nvb, x, w_gate, w_up)


def down(act: jax.Array, align: Alignment, routing: jax.Array, w_down: jax.Array, *, tiles: Tiles = Tiles(),
         interpret: bool = False) -> jax.Array:
    """y [P, H] in act's dtype, rows in sorted order: (act_row w_down_e^T) * routing weight.
    act [P, F] from `gate_up`; routing float32 [P], the routing weight of each sorted entry (0 for
    padding); w_down [E, H, F]."""
    _check_align(align, "down")
    p, f = act.shape
    _, h, f_w = w_down.shape
    if f_w != f or p != align.sorted_ids.shape[0] or routing.shape != (p,):
        raise ValueError(f"down: act {act.shape}, routing {routing.shape}, w_down {w_down.shape} and "
                         f"{align.sorted_ids.shape[0]} aligned rows do not fit")
    reason = tiles_unsupported(tiles, h, f, "down")
    if reason is not None:
        raise ValueError(reason)
    bm, bn, bk = align.block_m, tiles.block_n, tiles.block_k
    eob, nvb = align.expert_of_block, align.num_valid_blocks
    return pl.pallas_call(
        partial(_down_kernel, block_k=bk, steps=f // bk, dot_dtype=_dot_dtype(act)),
        out_shape=jax.ShapeDtypeStruct((p, h), act.dtype),
        grid=(h // bn, align.max_blocks),
        in_specs=[_whole(eob), _whole(nvb), pl.BlockSpec((bm, f), lambda j, b: (b, 0)),
                  pl.BlockSpec((bm,), lambda j, b: (b,)), _whole(w_down)],
        out_specs=pl.BlockSpec((bm, bn), lambda j, b: (b, j)),
        interpret=interpret,
        **_triton_params(tiles, interpret),
    )(eob, nvb, act, routing.astype(jnp.float32), w_down)


def _row_experts(align: Alignment) -> tuple[jax.Array, jax.Array]:
    """(expert of every aligned row, whether the row is a real entry of a valid block)."""
    rows = jnp.arange(align.sorted_ids.shape[0])
    valid = (rows // align.block_m < align.num_valid_blocks[0]) & (align.sorted_ids < align.num_entries)
    return jnp.repeat(align.expert_of_block, align.block_m), valid


def gate_up_reference(x: jax.Array, align: Alignment, w_gate: jax.Array, w_up: jax.Array | None, kind: str, *,
                      top_k: int) -> jax.Array:
    """`gate_up` in jnp (float32, weights gathered per row); rows that are not entries are zero."""
    experts, valid = _row_experts(align)
    xs = jnp.take(x, jnp.minimum(align.sorted_ids // top_k, x.shape[0] - 1), axis=0).astype(jnp.float32)
    hp = lax.Precision.HIGHEST
    g = jnp.einsum("ph,pfh->pf", xs, jnp.take(w_gate, experts, axis=0).astype(jnp.float32), precision=hp)
    if w_up is None:
        g, u = jnp.split(g, 2, axis=-1)
    else:
        u = jnp.einsum("ph,pfh->pf", xs, jnp.take(w_up, experts, axis=0).astype(jnp.float32), precision=hp)
    return jnp.where(valid[:, None], KERNEL_ACTIVATIONS[kind](g) * u, 0.0).astype(x.dtype)


def down_reference(act: jax.Array, align: Alignment, routing: jax.Array, w_down: jax.Array) -> jax.Array:
    """`down` in jnp (float32, weights gathered per row); rows that are not entries are zero."""
    experts, valid = _row_experts(align)
    y = jnp.einsum("pf,phf->ph", act.astype(jnp.float32), jnp.take(w_down, experts, axis=0).astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
    return jnp.where(valid[:, None], y * routing[:, None], 0.0).astype(act.dtype)
