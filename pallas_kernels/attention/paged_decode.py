"""Decode attention over a paged KV cache: the flash-decoding kernel of `decode.py` with the kv loop
walking the row's page table.

Pages: k_pages, v_pages [num_pages, kv_heads, page_size, head_dim] (codes with float32 scales
[num_pages, kv_heads, page_size] for an int8 / fp8 cache); sequence b's slot s lives in page
page_table[b, s // page_size] at row s % page_size (ferrum_jax.ops.paged_attention).

Each loop step covers `pages_per_step` pages as one [block_k, head_dim] tile of K and of V, block_k =
pages_per_step * page_size: every row of the tile looks up its page in the row's table (rows of
one page read the same entry, from L1) and is loaded from that page; rows are contiguous along
head_dim, so the loads stay vectorized, and the tile feeds the same online-softmax step as the
contiguous kernel. Small pages (16) are batched to the contiguous kernel's ~128-slot tile so the
loop does as few steps, dots and pipeline stages. Table entries outside the row's visible range
are never followed (they may be stale or -1); entries are clipped into [0, num_pages), so a bad
table cannot read outside the pool.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ferrum_jax import ops as ref_ops
from pallas_kernels.attention.decode import (
    MIN_BLOCK,
    TILE_BYTES,
    DecodeConfig,
    attend_tile,
    check_inputs,
    default_block,
    default_stages,
    split_call,
    default_splits,
    group_queries,
    init_state,
    masked_load,
    store_partials,
    visible_blocks,
)

MAX_PAGE_BYTES = 2 * TILE_BYTES  # one page is at least one tile: larger pages would need sub-page steps


def unsupported(q, k_pages, v_pages, page_table, q_positions, k_scale=None, v_scale=None) -> str | None:
    """None if `paged_decode_attention` runs these arguments, else why not."""
    reason = check_inputs(q, k_pages, v_pages, k_scale, v_scale)
    if reason is not None:
        return reason
    ps, d = k_pages.shape[2], max(k_pages.shape[3], v_pages.shape[3])
    if ps & (ps - 1):
        return f"page_size {ps} is not a power of two"
    if ps * d * jnp.dtype(k_pages.dtype).itemsize > MAX_PAGE_BYTES:
        return f"page_size {ps} x head_dim {d} is more than one {MAX_PAGE_BYTES}-byte tile"
    if page_table.ndim != 2 or page_table.shape[0] != q.shape[0] or not jnp.issubdtype(page_table.dtype, jnp.integer):
        return f"page_table {page_table.shape} {page_table.dtype} is not int [batch, pages_per_seq]"
    if q_positions.shape != (q.shape[0], 1) or not jnp.issubdtype(q_positions.dtype, jnp.integer):
        return f"q_positions {q_positions.shape} {q_positions.dtype} is not int [batch, 1]"
    return None


def choose_config(batch: int, kv_heads: int, pages_per_seq: int, page_size: int, head_dim: int, cache_dtype,
                  pages_per_step: int | None = None, num_splits: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None) -> DecodeConfig:
    """block_k = pages_per_step * page_size: by default the contiguous kernel's tile (at least 16
    slots), whole pages; splits as `decode.default_splits` over the table's slots."""
    slots = pages_per_seq * page_size
    if pages_per_step is None:
        target = default_block(head_dim, jnp.dtype(cache_dtype).itemsize, slots)
        pages_per_step = max(1, target // page_size, MIN_BLOCK // page_size)
    if pages_per_step & (pages_per_step - 1) or pages_per_step * page_size < MIN_BLOCK:
        raise ValueError(f"paged_decode_attention: pages_per_step {pages_per_step} is not a power of two with "
                         f"pages_per_step * page_size >= {MIN_BLOCK}")
    bk = pages_per_step * page_size
    splits = num_splits or default_splits(batch, kv_heads, slots, bk)
    if splits < 1:
        raise ValueError(f"paged_decode_attention: num_splits {splits} < 1")
    return DecodeConfig(block_k=bk, num_splits=splits, num_warps=num_warps or 4,
                        num_stages=num_stages or default_stages(cache_dtype))


def _paged_kernel(pos_ref, pt_ref, q_ref, k_ref, v_ref, *rest, scale, window, softcap, step, page_size, splits,
                  group, pages_per_seq, num_pages, quantized):
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref = rest
    else:
        (o_ref, m_ref, l_ref), ks_ref, vs_ref = rest, None, None
    bk = step * page_size
    lo, hi, start, stop = visible_blocks(pos_ref[0], pages_per_seq * page_size, bk, window, splits)
    q = q_ref[...]
    cols = lax.iota(jnp.int32, v_ref.shape[-1])[None, :]

    def body(i, carry):
        slot = i * bk + lax.iota(jnp.int32, bk)
        visible = (slot >= lo) & (slot < hi)
        # Each row's page: its table entry (rows of one page read the same entry, from L1), clamped
        # into the table and the pool; rows outside the visible range read page 0 and are masked.
        entry = pt_ref[jnp.minimum(slot // page_size, pages_per_seq - 1)]
        page = jnp.where(visible, jnp.clip(entry, 0, num_pages - 1), 0)
        row = slot % page_size
        k = k_ref[page, row, :]  # [bk, D]: a gather of whole page rows, contiguous along D
        # V outside the visible range reads as 0, so stale rows of a page never leak NaN into P V.
        v = masked_load(v_ref.at[page[:, None], row[:, None], cols], visible[:, None])
        ks = vs = None
        if quantized:
            ks, vs = ks_ref[page, row], vs_ref[page, row]
        return attend_tile(q, k, v, ks, vs, slot, lo, hi, carry, scale=scale, softcap=softcap)

    state = lax.fori_loop(start, stop, body, init_state(q.shape[0], v_ref.shape[-1]))
    store_partials(o_ref, m_ref, l_ref, state, group)


@partial(jax.jit, static_argnames=("scale", "window", "softcap", "pages_per_step", "num_splits", "num_warps",
                                   "num_stages", "interpret"))
def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                           q_positions: jax.Array, *, scale: float, window: int | None = None,
                           softcap: float | None = None, k_scale: jax.Array | None = None,
                           v_scale: jax.Array | None = None, pages_per_step: int | None = None,
                           num_splits: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, interpret: bool = False) -> jax.Array:
    """Attention of q [B, 1, H, D] at q_positions [B, 1] over the paged cache k_pages, v_pages
    [P, KVH, page_size, D] through page_table [B, pages_per_seq] -> [B, 1, H, Dv] in q's dtype.
    pages_per_step (a power of two), num_splits, num_warps, num_stages default to `choose_config`'s."""
    reason = unsupported(q, k_pages, v_pages, page_table, q_positions, k_scale, v_scale)
    if reason is not None:
        raise ValueError(f"paged_decode_attention: {reason}")
    b, _, h, d = q.shape
    num_pages, kvh, ps, dv = k_pages.shape[0], k_pages.shape[1], k_pages.shape[2], v_pages.shape[3]
    pps = page_table.shape[1]
    cfg = choose_config(b, kvh, pps, ps, d, k_pages.dtype, pages_per_step, num_splits, num_warps, num_stages)
    step = cfg.block_k // ps
    qg, g = group_queries(q, kvh)
    gp = qg.shape[2]
    quantized = k_scale is not None
    kernel = partial(_paged_kernel, scale=float(scale), window=window,
                     softcap=None if softcap is None else float(softcap), step=step, page_size=ps,
                     splits=cfg.num_splits, group=g, pages_per_seq=pps, num_pages=num_pages, quantized=quantized)
    in_specs = [
        pl.BlockSpec((None, 1), lambda i, j, s: (i, 0)),
        pl.BlockSpec((None, pps), lambda i, j, s: (i, 0)),
        pl.BlockSpec((None, None, gp, d), lambda i, j, s: (i, j, 0, 0)),
        pl.BlockSpec((num_pages, None, ps, d), lambda i, j, s: (0, j, 0, 0)),
        pl.BlockSpec((num_pages, None, ps, dv), lambda i, j, s: (0, j, 0, 0)),
    ]
    args = [q_positions.astype(jnp.int32), page_table.astype(jnp.int32), qg, k_pages, v_pages]
    if quantized:
        in_specs += [pl.BlockSpec((num_pages, None, ps), lambda i, j, s: (0, j, 0))] * 2
        args += [k_scale, v_scale]
    return split_call(kernel, in_specs, args, cfg=cfg, group=g, out_shape=(b, kvh, gp, dv), out_dtype=q.dtype,
                      name="paged_decode_attention", interpret=interpret)


def reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
              q_positions: jax.Array, *, scale: float, window: int | None = None, softcap: float | None = None,
              k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> jax.Array:
    """The oracle: ferrum_jax.ops.paged_attention (pages gathered into a contiguous cache)."""
    return ref_ops.paged_attention(q, k_pages, v_pages, page_table, q_positions, scale=scale, window=window,
                                   softcap=softcap, k_scale=k_scale, v_scale=v_scale)


__all__ = ["choose_config", "paged_decode_attention", "reference", "unsupported"]
