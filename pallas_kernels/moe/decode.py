"""Decode-sized MoE (a few tokens): GEMV kernels over the selected experts, no alignment step.

At decode every (token, slot) entry has its own expert and a single row: the grouped kernels'
alignment (a handful of tiny XLA kernels), their 16-row tensor-core tiles (15 rows padding) and the
gather-and-sum of the slots afterwards cost more than the matmuls at batch 1. Here:

  gate_up  grid (F / block_n, T*k). Program (j, i) streams rows [j*block_n, (j+1)*block_n) of entry
           i's expert's gate and up matrices (the [E, F, H] checkpoint layout: each row is H
           contiguous inputs) in block_k steps, multiplies them by the token's x (elementwise FMAs,
           float32) and reduces along the row: act[i, cols] = act_fn(g) * u, in x's dtype. An entry
           routed outside the local experts (expert parallel) reads nothing and stores zeros.
  down     grid (H / block_n, T). Program (j, t) streams rows [j*block_n, (j+1)*block_n) of the
           [E, H, F] down matrix of each of token t's k entries, times the entry's act row scaled
           by its routing weight, and sums them: out[t, cols] in x's dtype. The k slots are
           unrolled, so all k experts' tiles are in flight at once (a loop over the slots, one
           expert after another, measured 2x slower at batch 1 on an H200), and no XLA sum over
           the slots follows.

Both stream each selected expert's weights exactly once per token, with many programs (the grid's
second axis is the entry / token, the first the output tile) to keep enough bytes in flight. An
expert two tokens share is read twice (a few percent at the T*k <= E/4 where this path is chosen).
The references are `ferrum_jax.moe_ops.moe_experts` (its few-rows branch is the same product).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.moe.grouped_matmul import KERNEL_ACTIVATIONS, stack_shapes


@dataclasses.dataclass(frozen=True)
class GemvTiles:
    """One projection's tiles: weight rows (outputs) per program, inputs per load, warps, stages
    (the kernels have no loop to pipeline: 1)."""
    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 1


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    # H200, Qwen3-30B-A3B at batch 1, in a decode profile (bench/results/moe_decode_tiles_ab_*):
    # gate_up 15.2 us (15.8 at (8, 1024, 4), 18.9 with 8 warps); down, the slots summed in the
    # kernel, 8.8 us at one row and one warp a program (9.1 with 4 warps, 11.9-15.6 at 2-4 rows).
    gate_up: GemvTiles = GemvTiles(4, 1024, 2, 1)
    down: GemvTiles = GemvTiles(1, 256, 1, 1)


def _fit(dim: int, want: int) -> int:
    """The largest power of two <= want dividing dim (>= 1)."""
    v = want
    while v > 1 and dim % v:
        v //= 2
    return v


# Loads per expert row block the kernels unroll; wider inputs take wider block_k (compile time).
MAX_UNROLL = 16


def _fit_k(dim: int, want: int) -> int:
    v = _fit(dim, want)
    while dim // v > MAX_UNROLL and dim % (2 * v) == 0:
        v *= 2
    return v


# A down program has all its k slots' weight rows in flight at once (unrolled loads). The default
# one-row, one-warp program suits Qwen3-30B-A3B's 8 x 768 bf16 inputs (12 KB a program); where the
# k slots' rows pass WIDE_DOWN_BYTES (Mixtral's 2 x 14336: 56 KB a row) the default takes
# WIDE_DOWN_TILES instead. H200, Mixtral-8x7B shape at batch 1 (bench/results/moe_decode_mixtral_down_*):
# down 59.4 us at (4, 1024, 4) = 3.96 TB/s of the two experts' rows, 60.3 at (2, 1024, 4), 64.3 at
# (1, 256, 1), 67.4-68.0 at (1, 1024, 4).
WIDE_DOWN_BYTES = 16 * 1024
WIDE_DOWN_TILES = GemvTiles(4, 1024, 4, 1)


def choose_config(hidden: int, ff: int, config: DecodeConfig | None = None, *, top_k: int = 1,
                  itemsize: int = 2) -> DecodeConfig:
    """`config` (default: DecodeConfig()) with each tile cut down to divide the projection (and
    block_k grown where more than MAX_UNROLL loads would cover the input). The default's down
    tiles become WIDE_DOWN_TILES where a row's k slots (`itemsize` bytes an input) pass
    WIDE_DOWN_BYTES; a config given is kept as it is there."""
    c = config or DecodeConfig()
    down = c.down
    if config is None and top_k * ff * itemsize > WIDE_DOWN_BYTES:
        down = WIDE_DOWN_TILES
    gu = dataclasses.replace(c.gate_up, block_n=_fit(ff, c.gate_up.block_n), block_k=_fit_k(hidden, c.gate_up.block_k))
    dn = dataclasses.replace(down, block_n=_fit(hidden, down.block_n), block_k=_fit_k(ff, down.block_k))
    return DecodeConfig(gu, dn)


def unsupported(x, ids, weights, w_gate, w_up, w_down, kind: str) -> str | None:
    """None if `moe_experts_decode` takes these arguments, else why not."""
    shapes = stack_shapes(x, ids, w_gate, w_up, w_down, kind)
    if isinstance(shapes, str):
        return shapes
    nk, e, _, _, _ = shapes
    if weights.shape != ids.shape:
        return f"weights {weights.shape} and ids {ids.shape} differ"
    if nk == 0:
        return "no tokens"
    if nk * 4 > e:
        return f"{nk} (token, slot) entries > E/4 = {e / 4:g}: not decode-sized (the grouped kernels take it)"
    return None


def _gate_up_kernel(ids_ref, off_ref, x_ref, wg_ref, wu_ref, o_ref, *, top_k: int, experts: int, up_row: int,
                    block_k: int, steps: int, act: str):
    j, i = pl.program_id(0), pl.program_id(1)
    e = ids_ref[i] - off_ref[0]
    (bn,) = o_ref.shape
    n0 = pl.multiple_of(j * bn, bn)
    tok = lax.div(i, top_k)
    mine = (e >= 0) & (e < experts)

    @pl.when(mine)
    def _():
        # Unrolled (static steps): every tile's address is known up front, so its loads can all be
        # in flight at once; a loop would wait on each step's load (the pipeliner only overlaps
        # loads that feed a tensor-core dot).
        # Products accumulate elementwise across the steps, reduced along the rows once at the end.
        g = u = jnp.zeros((bn, block_k), jnp.float32)
        for t in range(steps):
            k0 = t * block_k
            xv = x_ref[tok, pl.ds(k0, block_k)].astype(jnp.float32)[None, :]
            wg = wg_ref[e, pl.ds(n0, bn), pl.ds(k0, block_k)].astype(jnp.float32)
            wu = wu_ref[e, pl.ds(up_row + n0, bn), pl.ds(k0, block_k)].astype(jnp.float32)
            g, u = g + wg * xv, u + wu * xv
        g, u = jnp.sum(g, axis=1), jnp.sum(u, axis=1)
        o_ref[...] = (KERNEL_ACTIVATIONS[act](g) * u).astype(o_ref.dtype)

    @pl.when(jnp.logical_not(mine))
    def _():
        o_ref[...] = jnp.zeros((bn,), o_ref.dtype)


def _down_kernel(ids_ref, rw_ref, off_ref, a_ref, w_ref, o_ref, *, experts: int, top_k: int, block_k: int,
                 chunks: int):
    from jax.experimental.pallas import triton as pl_triton

    j, t = pl.program_id(0), pl.program_id(1)
    (bn,) = o_ref.shape
    n0 = pl.multiple_of(j * bn, bn)
    acc = jnp.zeros((bn, block_k), jnp.float32)
    for s in range(top_k):  # unrolled, as the chunks: every slot's tiles in flight together
        i = t * top_k + s
        local = ids_ref[i] - off_ref[0]
        mine = (local >= 0) & (local < experts)
        e = jnp.clip(local, 0, experts - 1)  # in range; another shard's entry loads nothing (mask)
        scale = jnp.where(mine, rw_ref[i], 0.0)
        for c in range(chunks):
            a = a_ref[i, pl.ds(c * block_k, block_k)].astype(jnp.float32)[None, :] * scale
            w = pl_triton.load(w_ref.at[e, pl.ds(n0, bn), pl.ds(c * block_k, block_k)],
                               mask=jnp.full((bn, block_k), mine), other=jnp.zeros((), w_ref.dtype))
            acc = acc + w.astype(jnp.float32) * a
    o_ref[...] = jnp.sum(acc, axis=1).astype(o_ref.dtype)


def _params(tiles: GemvTiles, interpret: bool) -> dict:
    if interpret:
        return {}
    from jax.experimental.pallas import triton as pl_triton
    return {"compiler_params": pl_triton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)}


def _whole(a: jax.Array) -> pl.BlockSpec:
    return pl.BlockSpec(a.shape, lambda j, i: (0,) * a.ndim)


def gate_up(x: jax.Array, ids: jax.Array, expert_offset: jax.Array, w_gate: jax.Array, w_up: jax.Array | None,
            kind: str, *, top_k: int, tiles: GemvTiles, interpret: bool = False) -> jax.Array:
    """act [T*k, F] in x's dtype: act_fn(x_t w_gate_e^T) * (x_t w_up_e^T) for each entry (t, slot) of
    ids [T*k] (flat, e = ids - expert_offset local), zeros for entries of other shards. x [T, H];
    w_up None: w_gate is the fused [E, 2F, H] stack."""
    t, h = x.shape
    e = w_gate.shape[0]
    f = w_gate.shape[1] // 2 if w_up is None else w_gate.shape[1]
    bn, bk = tiles.block_n, tiles.block_k
    if f % bn or h % bk:
        raise ValueError(f"gate_up: tiles {bn} x {bk} do not divide F {f} x H {h}")
    kernel = partial(_gate_up_kernel, top_k=top_k, experts=e, up_row=f if w_up is None else 0, block_k=bk,
                     steps=h // bk, act=kind)
    w_up = w_gate if w_up is None else w_up
    return pl.pallas_call(
        kernel,
        grid=(f // bn, t * top_k),
        in_specs=[_whole(ids), _whole(expert_offset), _whole(x), _whole(w_gate), _whole(w_up)],
        out_specs=pl.BlockSpec((None, bn), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t * top_k, f), x.dtype),
        interpret=interpret,
        name="moe_decode_gate_up",
        **_params(tiles, interpret),
    )(ids, expert_offset, x, w_gate, w_up)


def down(act: jax.Array, ids: jax.Array, weights: jax.Array, expert_offset: jax.Array, w_down: jax.Array, *,
         top_k: int, out_dtype, tiles: GemvTiles, interpret: bool = False) -> jax.Array:
    """out [T, H] in out_dtype: sum over each token's k entries of weight * (act_row w_down_e^T)
    (other shards' entries add nothing). act [T*k, F] from `gate_up`; ids, weights [T*k] flat."""
    nk, f = act.shape
    e, h, _ = w_down.shape
    bn, bk = tiles.block_n, tiles.block_k
    if h % bn or f % bk:
        raise ValueError(f"down: tiles {bn} x {bk} do not divide H {h} x F {f}")
    return pl.pallas_call(
        partial(_down_kernel, experts=e, top_k=top_k, block_k=bk, chunks=f // bk),
        grid=(h // bn, nk // top_k),
        in_specs=[_whole(ids), _whole(weights), _whole(expert_offset), _whole(act), _whole(w_down)],
        out_specs=pl.BlockSpec((None, bn), lambda j, t: (t, j)),
        out_shape=jax.ShapeDtypeStruct((nk // top_k, h), out_dtype),
        interpret=interpret,
        name="moe_decode_down",
        **_params(tiles, interpret),
    )(ids, weights, expert_offset, act, w_down)


def moe_experts_decode(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array | None,
                       w_down: jax.Array, kind: str, *, expert_offset: int | jax.Array = 0, ops=None,
                       config: DecodeConfig | None = None, interpret: bool = False) -> jax.Array:
    """`ferrum_jax.moe_ops.moe_experts` for decode-sized batches (see `unsupported`): x [..., H],
    ids / weights [..., k], stacks [E, F, H] (or fused [E, 2F, H] with w_up None) and [E, H, F].
    `ops` is accepted for the op signature and unused."""
    del ops
    reason = unsupported(x, ids, weights, w_gate, w_up, w_down, kind)
    if reason is not None:
        raise ValueError(f"moe_experts_decode: {reason}")
    f = w_down.shape[2]
    cfg = choose_config(x.shape[-1], f, config, top_k=ids.shape[-1], itemsize=jnp.dtype(w_down.dtype).itemsize)
    return _run(x, ids, weights, w_gate, w_up, w_down, jnp.asarray(expert_offset, jnp.int32).reshape(1),
                kind=kind, config=cfg, interpret=interpret)


@partial(jax.jit, static_argnames=("kind", "config", "interpret"))
def _run(x, ids, weights, w_gate, w_up, w_down, expert_offset, *, kind: str, config: DecodeConfig,
         interpret: bool) -> jax.Array:
    return entries_moe(gate_up, down, x, ids, weights, w_gate, w_up, w_down, expert_offset, kind=kind, config=config,
                       down_sums=True, interpret=interpret)


def entries_moe(gate_up, down, x, ids, weights, w_gate, w_up, w_down, expert_offset, *, kind: str, config,
                down_sums: bool, interpret: bool) -> jax.Array:
    """The decode kernels' flow (also decode_quant.py's): `gate_up` over the flat (token, slot)
    entries, then `down` scaled by each entry's routing weight: summed over each token's k slots
    by the kernel (`down_sums`: out [T, H] in x's dtype) or by XLA (float32 rows [T*k, H])."""
    k, h = ids.shape[-1], x.shape[-1]
    xs = x.reshape(-1, h)
    flat_ids = ids.reshape(-1).astype(jnp.int32)
    act = gate_up(xs, flat_ids, expert_offset, w_gate, w_up, kind, top_k=k, tiles=config.gate_up,
                  interpret=interpret)
    flat_w = weights.reshape(-1).astype(jnp.float32)
    if down_sums:
        return down(act, flat_ids, flat_w, expert_offset, w_down, top_k=k, out_dtype=x.dtype, tiles=config.down,
                    interpret=interpret).reshape(x.shape)
    y = down(act, flat_ids, flat_w, expert_offset, w_down, tiles=config.down, interpret=interpret)
    return jnp.sum(y.reshape(-1, k, h), axis=1).astype(x.dtype).reshape(x.shape)


__all__ = ["DecodeConfig", "GemvTiles", "choose_config", "down", "entries_moe", "gate_up", "moe_experts_decode",
           "unsupported"]
