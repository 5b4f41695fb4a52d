"""Routing alignment (vLLM's moe_align_block_size) in jnp, static shapes, no host sync.

The top-k expert ids [T, k] of a batch become a list of "entries" (entry = token * k + slot)
sorted by expert, each expert's run padded with a sentinel to a multiple of `block_m`, so that
every block of `block_m` consecutive entries belongs to one expert: the grouped matmul runs one
program per (block, output tile) and loads exactly one expert's weight tile per program.

    sorted_ids       int32 [max_blocks * block_m]  entries grouped by expert; padding = T * k
    positions        int32 [T * k]   where each entry sits in sorted_ids; max_blocks * block_m
                                     (out of range) for an entry routed outside the local experts
    expert_of_block  int32 [max_blocks]  the local expert of each block (clipped into range for
                                     the blocks past num_valid_blocks, which the kernels skip)
    num_valid_blocks int32 [1]

Static sizes: at most min(E, T*k) experts are non-empty and each pads by at most block_m - 1, so
max_blocks = (T*k + min(E, T*k) * (block_m - 1)) // block_m. At decode (T*k <= E) that is T*k
blocks, one per selected expert when the picks are distinct: the grid has no programs for experts
nobody picked, and each picked expert's weights are read by one block.

Expert parallel: only ids in [expert_offset, expert_offset + E) are kept (the local stack holds
those E experts); the others get no position, so they contribute zero, as in the reference.

Decode-sized batches (`align_for` picks it when T*k <= E / 4): `align_unsorted` gives every
entry its own block (row 0 the entry, the rest padding) with no sort: a cumulative sum moves the
local entries to the front. Top-k ids of one token are distinct, so at one token no expert is
read twice; at a few tokens an expert two tokens share is read twice (a few percent of the bytes
at T*k <= E/4) instead of paying the sort, scatters and prefix sums of the grouped alignment,
a handful of tiny kernels per layer that cost more than those bytes at decode.

Routing itself (softmax over E router logits, top k, renormalise) is `route.py`'s kernel on GPU
(XLA's softmax + sort + divide were ~7 us of launches per layer at decode). Decode-sized batches on
dense stacks skip this module altogether: `decode.py`'s GEMV kernels read the top-k ids directly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Sorting one packed int32 key (expert * entries + entry) needs (E + 1) * entries below this.
PACKED_SORT_LIMIT = 2**31


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Alignment:
    sorted_ids: jax.Array  # int32 [max_blocks * block_m]
    positions: jax.Array  # int32 [num_entries]
    expert_of_block: jax.Array  # int32 [max_blocks]
    num_valid_blocks: jax.Array  # int32 [1]
    block_m: int = dataclasses.field(metadata=dict(static=True), default=16)
    num_entries: int = dataclasses.field(metadata=dict(static=True), default=0)  # T * k, also the sentinel

    @property
    def max_blocks(self) -> int:
        return self.expert_of_block.shape[0]


def max_blocks(num_entries: int, num_experts: int, block_m: int) -> int:
    """The static bound on the number of blocks (see the module docstring)."""
    return (num_entries + min(num_experts, num_entries) * (block_m - 1)) // block_m


def align_block_size(ids: jax.Array, *, num_experts: int, block_m: int,
                     expert_offset: int | jax.Array = 0) -> Alignment:
    """Group the (token, slot) entries of ids [T, k] (or any shape: entries are its flat order) by
    local expert, each expert's run padded to a multiple of block_m. See the module docstring."""
    if block_m < 1:
        raise ValueError(f"align_block_size: block_m must be positive, got {block_m}")
    if num_experts < 1:
        raise ValueError(f"align_block_size: num_experts must be positive, got {num_experts}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"align_block_size: ids must be integers, got {ids.dtype}")
    e, nk = num_experts, ids.size
    if nk == 0:
        raise ValueError("align_block_size: no entries (ids is empty)")
    nb = max_blocks(nk, e, block_m)
    padded_len = nb * block_m

    local = ids.reshape(nk).astype(jnp.int32) - jnp.asarray(expert_offset, jnp.int32)
    key = jnp.where((local >= 0) & (local < e), local, e)  # e: not on this shard, sorted last
    counts = jnp.zeros((e + 1,), jnp.int32).at[key].add(1)[:e]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = jnp.cumsum(padded) - padded  # exclusive prefix sums
    start = jnp.cumsum(counts) - counts

    # Sort entries by expert, stable in the entry index. One int32 key (expert * nk + entry) sorts
    # faster than a two-operand stable sort; fall back when that key could overflow.
    entry = jnp.arange(nk, dtype=jnp.int32)
    if (e + 1) * nk < PACKED_SORT_LIMIT:
        packed = jnp.sort(key * nk + entry)
        sorted_key, order = packed // nk, packed % nk
    else:
        sorted_key, order = jax.lax.sort((key, entry), num_keys=1, is_stable=True)
    home = jnp.minimum(sorted_key, e - 1)
    dest = jnp.where(sorted_key < e, padded_start[home] + entry - start[home], padded_len)

    sorted_ids = jnp.full((padded_len,), nk, jnp.int32).at[dest].set(order, mode="drop")
    positions = jnp.zeros((nk,), jnp.int32).at[order].set(dest)
    block_end = jnp.cumsum(padded // block_m)  # blocks of experts 0..e, inclusive
    blocks = jnp.arange(nb, dtype=jnp.int32)
    expert_of_block = jnp.minimum(jnp.sum(block_end[None, :] <= blocks[:, None], axis=1, dtype=jnp.int32), e - 1)
    return Alignment(sorted_ids=sorted_ids, positions=positions, expert_of_block=expert_of_block,
                     num_valid_blocks=block_end[-1:], block_m=block_m, num_entries=nk)


def align_unsorted(ids: jax.Array, *, num_experts: int, block_m: int,
                   expert_offset: int | jax.Array = 0) -> Alignment:
    """One block per entry of ids [T, k] (entries in flat order, local ones first), no sort: the
    decode-sized alignment (see the module docstring). Same contract as `align_block_size`; its
    static size is max_blocks(T*k, E, block_m) = T*k blocks when T*k <= E."""
    if block_m < 1 or num_experts < 1:
        raise ValueError(f"align_unsorted: block_m ({block_m}) and num_experts ({num_experts}) must be positive")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"align_unsorted: ids must be integers, got {ids.dtype}")
    e, nk = num_experts, ids.size
    if nk == 0 or nk > e:
        raise ValueError(f"align_unsorted: needs 1 <= T*k <= num_experts, got {nk} entries for {e} experts")
    local = ids.reshape(nk).astype(jnp.int32) - jnp.asarray(expert_offset, jnp.int32)
    mine = (local >= 0) & (local < e)
    num_mine = jnp.sum(mine, dtype=jnp.int32)
    # Block of each entry: local entries first in entry order, then the others (never run).
    block = jnp.where(mine, jnp.cumsum(mine) - 1, num_mine + jnp.cumsum(~mine) - 1).astype(jnp.int32)
    entry = jnp.arange(nk, dtype=jnp.int32)
    order = jnp.zeros((nk,), jnp.int32).at[block].set(entry)  # the entry of each block
    sorted_ids = jnp.full((nk, block_m), nk, jnp.int32).at[:, 0].set(
        jnp.where(jnp.arange(nk) < num_mine, order, nk)).reshape(nk * block_m)
    positions = jnp.where(mine, block * block_m, nk * block_m)
    expert_of_block = jnp.clip(jnp.take(local, order), 0, e - 1)
    return Alignment(sorted_ids=sorted_ids, positions=positions, expert_of_block=expert_of_block,
                     num_valid_blocks=num_mine[None], block_m=block_m, num_entries=nk)


def align_for(ids: jax.Array, *, num_experts: int, block_m: int, expert_offset: int | jax.Array = 0) -> Alignment:
    """The alignment the grouped kernels run on: `align_unsorted` for decode-sized batches
    (T*k <= E / 4), else `align_block_size`."""
    if ids.size * 4 <= num_experts:
        return align_unsorted(ids, num_experts=num_experts, block_m=block_m, expert_offset=expert_offset)
    return align_block_size(ids, num_experts=num_experts, block_m=block_m, expert_offset=expert_offset)


def sorted_routing(align: Alignment, weights: jax.Array) -> jax.Array:
    """float32 [P]: the routing weight of each aligned row's entry (weights [T*k] flat), 0 for padding."""
    nk = align.num_entries
    flat = weights.reshape(nk).astype(jnp.float32)
    return jnp.where(align.sorted_ids < nk, jnp.take(flat, jnp.minimum(align.sorted_ids, nk - 1)), 0.0)


def combine_slots(y: jax.Array, align: Alignment, top_k: int) -> jax.Array:
    """float32 [T, H]: each (token, slot) row of y [P, H] (sorted order) gathered back by `positions`
    and summed over the k slots; slots of other shards have no position and add zero."""
    nk, h = align.num_entries, y.shape[-1]
    rows = jnp.take(y, align.positions, axis=0, mode="fill", fill_value=0)
    return jnp.sum(rows.reshape(nk // top_k, top_k, h).astype(jnp.float32), axis=1)


def grouped_moe(x: jax.Array, ids: jax.Array, weights: jax.Array, expert_offset: jax.Array, *, num_experts: int,
                block_m: int, gate_up, down) -> jax.Array:
    """An MoE layer on grouped kernels (the dense and the quantized ones share it): x [..., H], ids /
    weights [..., k] -> [..., H] in x's dtype. `gate_up(xs [T, H], align, top_k)` -> act rows;
    `down(act, align, routing)` -> routing-weighted rows, summed back per token here."""
    shape, h, k = x.shape, x.shape[-1], ids.shape[-1]
    xs = x.reshape(-1, h)
    align = align_for(ids.reshape(xs.shape[0], k), num_experts=num_experts, block_m=block_m,
                      expert_offset=expert_offset)
    y = down(gate_up(xs, align, k), align, sorted_routing(align, weights))
    return combine_slots(y, align, k).astype(x.dtype).reshape(shape)
