"""Decode attention that also appends the new token's K/V to the cache, in one kernel.

A decode step's attention was five small XLA kernels around the flash-decoding kernel (two cache
writes, a query pad, the split combine) — each one a launch that costs more than its work at batch
1. This kernel takes the new token's k, v straight from the projection and does all of it:

- Grid (batch, kv_heads, splits), as `decode.py`: a program owns one kv head's query group and a
  run of the cache's visible slots [q_pos - window + 1, q_pos) — the query's own slot excluded:
  the new token comes from the kernel's inputs, folded into the online softmax of split 0, which
  also stores it into the cache at slot q_pos (the cache is aliased in place; every program masks
  that slot, so no program reads it half-written).
- q, k_new and v_new reach the kernel as one [B, H + 2 KVH, D] operand (XLA writes it in one fusion
  with the rope and the projection slices that produce them); the query group is read from it with
  a row mask (no padded copy).
- Splits merge in the kernel: each program writes its partials (the group's rows only), then takes
  a ticket from a counter per (row, kv head) (an acquire-release atomic after a CTA barrier); the
  program that draws the last ticket reads every split's partials and writes the normalized output,
  and leaves the counter at zero. With one split there are no partials at all.
- The counters are a zeroed [B, KVH] int32 operand, aliased to an output: a caller that passes
  `tickets` (and threads the returned ones to the next call, as `KVCache` does through a decode
  loop) zeroes them once, not per call (a memset per layer and step: ~0.9 us each on an H200).
- Optionally the kernel also does what turns the projection's q, k into attention's (`rope`, and
  before it Qwen3's / Gemma 3's per-head RMSNorm `q_norm`, `k_norm`): each program normalizes and
  rotates its query rows, split 0 the new key, before storing it. That was one or two XLA fusions
  per layer (~2 us for Llama, ~5 us for Qwen3 on an H200) between the projection and this kernel;
  now the projection's output reaches the kernel untouched. Rotate-half needs each element's
  partner half a head away: it is loaded straight from memory with a permuted column index (a
  gather of the same cache lines), so no register shuffle is needed; cos and sin come as one small
  [B, 2, D] table (XLA computes it once per step for all layers).

`reference` is the semantics: `ferrum_jax.ops.prepare_qk` (norm, rope) when asked, write k_new,
v_new at q_positions (dropped past the capacity), then `ferrum_jax.ops.attention` over the whole cache.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from ferrum_jax import ops as ref_ops
from ferrum_jax.rope import Rope
from pallas_kernels.attention.decode import (MASKED, SM_COUNT, DecodeConfig, _pow2_floor, attend_tile, check_inputs,
                                             choose_config, init_state, masked_load, padded_group, triton_params,
                                             visible_blocks)


def unsupported(q, k_new, v_new, k, v, q_positions, rope: Rope | None = None, q_norm=None, k_norm=None,
                tickets=None) -> str | None:
    """None if `decode_attention_append` runs these arguments, else why not."""
    reason = check_inputs(q, k, v, None, None)
    if reason is not None:
        return reason
    b, _, _, d = q.shape
    kvh, dv = k.shape[1], v.shape[3]
    if k.shape[0] != b:
        return f"cache batch {k.shape[0]} != query batch {b}"
    if dv != d:
        return f"value head_dim {dv} != key head_dim {d} (q, k, v travel as one operand)"
    if k_new.shape != (b, 1, kvh, d) or v_new.shape != (b, 1, kvh, dv):
        return f"new k/v {k_new.shape}, {v_new.shape} are not [batch, 1, kv_heads, head_dim] = {(b, 1, kvh, d)}"
    if k_new.dtype != k.dtype or v_new.dtype != v.dtype:
        return f"new k/v dtype {k_new.dtype}/{v_new.dtype} != cache dtype {k.dtype}/{v.dtype}"
    if q_positions.shape != (b, 1) or not jnp.issubdtype(q_positions.dtype, jnp.integer):
        return f"q_positions {q_positions.shape} {q_positions.dtype} is not int [batch, 1]"
    if (q_norm is None) != (k_norm is None):
        return "q_norm and k_norm come together"
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is not None and w.shape != (d,):
            return f"{name} shape {w.shape} != (head_dim,) = {(d,)}"
    if rope is not None and (rope.dim % 2 or not 0 < rope.dim <= d):
        return f"rope dim {rope.dim} is not even and within head_dim {d}"
    if tickets is not None and (tickets.shape != (b, kvh) or tickets.dtype != jnp.int32):
        return f"tickets {tickets.shape} {tickets.dtype} are not int32 [batch, kv_heads] = {(b, kvh)}"
    return None


def _prologue(x_ref, first, n, valid, cs_ref, w_ref, *, rope_dim, eps, offset):
    """Rows first .. first + n of x_ref (rows past `valid` read as zeros), per-head RMS-normalized
    by w_ref (when given) and rotated by cs_ref's [cos; signed sin] (when given), rounded to x's
    dtype after each step as `ferrum_jax.ops.prepare_qk` does -> [n, D]."""
    r = first + lax.iota(jnp.int32, n)
    inside = r < valid
    r = jnp.minimum(r, x_ref.shape[0] - 1)[:, None]  # gathers: in range, so no mask needed
    d = x_ref.shape[1]
    col = lax.iota(jnp.int32, d)
    x = x_ref[r, col[None, :]]
    if cs_ref is None and w_ref is None:
        return jnp.where(inside[:, None], x, 0)
    dt = x.dtype
    half = rope_dim // 2
    partner = jnp.where(col < rope_dim, lax.rem(col + half, rope_dim), col)  # rotate-half's source column
    xf = x.astype(jnp.float32)
    xp = x_ref[r, partner[None, :]].astype(jnp.float32) if cs_ref is not None else None
    if w_ref is not None:
        inv = lax.rsqrt(jnp.mean(xf * xf, axis=1, keepdims=True) + eps)
        xf = (xf * inv * (offset + w_ref[...].astype(jnp.float32))[None, :]).astype(dt).astype(jnp.float32)
        if xp is not None:
            wp = w_ref[partner].astype(jnp.float32)
            xp = (xp * inv * (offset + wp)[None, :]).astype(dt).astype(jnp.float32)
    if cs_ref is not None:
        xf = xf * cs_ref[0, :][None, :] + xp * cs_ref[1, :][None, :]
    return jnp.where(inside[:, None], xf, 0.0).astype(dt)


def _append_kernel(pos_ref, qkv_ref, k_ref, v_ref, _cnt_in, *refs, scale, window, softcap, block_k, splits, group,
                   kv_heads, slots, rope_dim, norm, norm_eps, norm_offset, interpret):
    cs_ref, refs = (refs[0], refs[1:]) if rope_dim else (None, refs)
    (qn_ref, kn_ref), refs = (refs[:2], refs[2:]) if norm else ((None, None), refs)
    o_ref, k_out, v_out, cnt_ref, *partials = refs
    prologue = partial(_prologue, cs_ref=cs_ref, rope_dim=rope_dim, eps=norm_eps, offset=norm_offset)
    j, split = pl.program_id(1), pl.program_id(2)
    pos = pos_ref[0]
    gp = padded_group(group)
    rows = lax.iota(jnp.int32, gp) < group
    q = prologue(qkv_ref, j * group, gp, (j + 1) * group, w_ref=qn_ref)
    lo, hi, start, stop = visible_blocks(pos, slots, block_k, window, splits, own_slot=False)
    ragged = slots % block_k != 0

    def body(i, carry):
        off = pl.multiple_of(i * block_k, block_k)
        slot = off + lax.iota(jnp.int32, block_k)
        visible = (slot >= lo) & (slot < hi)  # V outside the visible range reads as 0: no NaN leaks
        k = masked_load(k_ref.at[pl.ds(off, block_k), :], (slot < slots)[:, None] if ragged else None)
        v = masked_load(v_ref.at[pl.ds(off, block_k), :], visible[:, None])
        return attend_tile(q, k, v, None, None, slot, lo, hi, carry, scale=scale, softcap=softcap)

    acc, m, l = lax.fori_loop(start, stop, body, init_state(gp, v_ref.shape[-1]))

    # The new token (visible to itself under any window), in split 0 only; dropped past the capacity.
    own = (split == 0) & (pos < slots)
    heads = kv_heads * group  # qkv rows: [q heads; k heads; v heads]
    kn = prologue(qkv_ref, heads + j, 1, heads + j + 1, w_ref=kn_ref).reshape(qkv_ref.shape[1])
    vn = qkv_ref[heads + kv_heads + j, :]
    s_new = jnp.sum(q.astype(jnp.float32) * kn.astype(jnp.float32)[None, :], axis=1) * scale
    if softcap is not None:
        s_new = softcap * jnp.tanh(s_new / softcap)
    s_new = jnp.where(own, s_new, MASKED)
    m_new = jnp.maximum(m, s_new)
    alpha = jnp.exp(m - m_new)
    p_new = jnp.where(own, jnp.exp(s_new - m_new), 0.0)
    acc = acc * alpha[:, None] + p_new[:, None] * vn.astype(jnp.float32)[None, :]
    l, m = l * alpha + p_new, m_new

    @pl.when(own)
    def _():
        k_out[pl.ds(pos, 1), :] = kn[None, :]
        v_out[pl.ds(pos, 1), :] = vn[None, :]

    out_rows = o_ref.at[pl.ds(j * group, gp), :]
    tiny = jnp.finfo(jnp.float32).tiny
    if splits == 1:
        pl_triton.store(out_rows, (acc / jnp.maximum(l, tiny)[:, None]).astype(o_ref.dtype), mask=rows[:, None])
        return
    # Partials keep only the group's rows (padded to a power of two, not to the dot's 16): the
    # merging program reads every split's partials through one SM, so bytes here are time.
    po_ref, pm_ref, pl_ref = partials
    pl_triton.store(po_ref.at[split, pl.ds(0, gp), :], acc, mask=rows[:, None])
    pl_triton.store(pm_ref.at[split, pl.ds(0, gp)], m, mask=rows)
    pl_triton.store(pl_ref.at[split, pl.ds(0, gp)], l, mask=rows)
    if not interpret:
        pl_triton.debug_barrier()  # every thread's partial stores precede the ticket's release
    ticket = pl_triton.atomic_add(cnt_ref, (jnp.int32(0),), jnp.int32(1))

    @pl.when(ticket == splits - 1)
    def _():
        # One pass over the splits, `chunk` at a time: each chunk's loads are issued together (one
        # round trip to L2 per chunk, not three per split), folded in with a running max.
        gr, dv = pm_ref.shape[1], acc.shape[1]
        chunk = merge_chunk(splits, gr, dv)
        idx = lax.iota(jnp.int32, chunk)

        def merge(c, carry):
            out, top, total = carry
            first = c * chunk
            valid = first + idx < splits
            # Plain loads: after the acquiring ticket the other programs' partials are visible, and
            # no line of them can sit stale in this SM's L1 (nothing in this launch read them before).
            m_c = pl_triton.load(pm_ref.at[pl.ds(first, chunk), :], mask=valid[:, None], other=MASKED)
            l_c = pl_triton.load(pl_ref.at[pl.ds(first, chunk), :], mask=valid[:, None], other=0.0)
            o_c = pl_triton.load(po_ref.at[pl.ds(first, chunk), :, :], mask=valid[:, None, None], other=0.0)
            new_top = jnp.maximum(top, jnp.max(m_c, axis=0))
            a = jnp.exp(top - new_top)
            w = jnp.exp(m_c - new_top[None, :])
            return (out * a[:, None] + jnp.sum(o_c * w[:, :, None], axis=0), new_top,
                    total * a + jnp.sum(l_c * w, axis=0))

        init = (jnp.zeros((gr, dv), jnp.float32), jnp.full((gr,), MASKED, jnp.float32),
                jnp.zeros((gr,), jnp.float32))
        out, _, total = lax.fori_loop(0, -(-splits // chunk), merge, init)
        out = (out / jnp.maximum(total, tiny)[:, None]).astype(o_ref.dtype)
        pl_triton.store(o_ref.at[pl.ds(j * group, gr), :], out, mask=(lax.iota(jnp.int32, gr) < group)[:, None])
        cnt_ref[0] = jnp.int32(0)


# Defaults from an H200 sweep at batch 1 (bench/results/attention_sweep_append_*): 64-slot bf16
# tiles, about two tiles per split, at most 16 splits (the merge reads every split's partials
# through one SM), 3 stages. Batch 1 at 2k context: 16 splits 7.4 us, 4 splits 10.7 us.
TILE_BYTES = 16 * 1024
MIN_BLOCKS_PER_SPLIT = 2
MAX_SPLITS = 16
FEW_PROGRAM_WARPS = 8


def default_config(batch: int, kv_heads: int, slots: int, head_dim: int, cache_dtype, block_k: int | None = None,
                   num_splits: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None) -> DecodeConfig:
    """The launch config: given values kept (and checked by `decode.choose_config`), the rest from
    the constants above."""
    itemsize = jnp.dtype(cache_dtype).itemsize
    fit = 1 << (max(slots, 2) - 1).bit_length()  # no tile longer than the cache
    bk = block_k or max(16, min(_pow2_floor(TILE_BYTES // (head_dim * itemsize)), fit))
    want = -(-2 * SM_COUNT // (batch * kv_heads))  # two programs per SM
    splits = num_splits or max(1, min(want, -(-slots // bk) // MIN_BLOCKS_PER_SPLIT, MAX_SPLITS))
    # A grid of at most half as many programs as SMs leaves SMs idle: 8 warps then shorten each
    # program (Qwen3-30B-A3B at 1k, 32 programs: 9.7 -> 8.5 us in the model on an H200), while a
    # fuller grid keeps 4 (Llama-3.1-8B at 2k, 128 programs: 8.8 us, 9.3 with 8).
    warps = num_warps or (FEW_PROGRAM_WARPS if batch * kv_heads * splits <= SM_COUNT // 2 else None)
    return choose_config(batch, kv_heads, slots, head_dim, cache_dtype, bk, splits, warps, num_stages or 3)


def merge_chunk(splits: int, rows: int, dv: int) -> int:
    """Splits merged per step: a power of two covering all of them where 8192 float32 partial
    values (64 registers a thread at 4 warps) allow, fewer for long splits x wide heads."""
    return max(1, min(1 << (splits - 1).bit_length(), _pow2_floor(8192 // (rows * dv))))


def rope_table(q_positions: jax.Array, rope: Rope, head_dim: int) -> jax.Array:
    """[B, 2, head_dim] float32: cos, and sin signed for rotate-half (-sin on the first half of
    the rotated dims), at each row's position; columns past rope.dim pass through (cos 1, sin 0).
    The same formulas as `ferrum_jax.ops.rope`, so the values are the same."""
    angles = q_positions[:, 0].astype(jnp.float32)[:, None] * jnp.asarray(rope.inv_freq())  # [B, dim/2]
    cos, sin = jnp.cos(angles) * rope.attention_factor, jnp.sin(angles) * rope.attention_factor
    rest = head_dim - rope.dim
    pad = lambda x, value: jnp.pad(x, ((0, 0), (0, rest)), constant_values=value)  # noqa: E731
    return jnp.stack([pad(jnp.concatenate([cos, cos], axis=1), 1.0), pad(jnp.concatenate([-sin, sin], axis=1), 0.0)],
                     axis=1)


@partial(jax.jit, static_argnames=("scale", "window", "softcap", "rope", "norm_eps", "norm_offset", "block_k",
                                   "num_splits", "num_warps", "num_stages", "interpret"))
def decode_attention_append(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k: jax.Array, v: jax.Array,
                            q_positions: jax.Array, *, scale: float, window: int | None = None,
                            softcap: float | None = None, rope: Rope | None = None, q_norm: jax.Array | None = None,
                            k_norm: jax.Array | None = None, norm_eps: float = 1e-6, norm_offset: float = 0.0,
                            block_k: int | None = None, num_splits: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None,
                            tickets: jax.Array | None = None, interpret: bool = False) -> tuple[jax.Array, ...]:
    """Store k_new, v_new [B, 1, KVH, D] at q_positions [B, 1] of the cache k, v [B, KVH, S, D]
    (in place where the caller donates it), and attend q [B, 1, H, D] over it -> (out [B, 1, H, Dv]
    in q's dtype, k, v). With `q_norm`, `k_norm` [D] and/or `rope`, q and k_new are the projection's
    and the kernel applies `ferrum_jax.ops.prepare_qk` to them first. `tickets`: zeroed int32
    [B, KVH] split counters, returned (zeroed again) as a fourth output for the next call; without
    them the kernel zeroes its own. The launch config defaults as `default_config`."""
    reason = unsupported(q, k_new, v_new, k, v, q_positions, rope, q_norm, k_norm, tickets)
    if reason is not None:
        raise ValueError(f"decode_attention_append: {reason}")
    b, _, h, d = q.shape
    kvh, slots, dv = k.shape[1], k.shape[2], v.shape[3]
    cfg = default_config(b, kvh, slots, d, k.dtype, block_k, num_splits, num_warps, num_stages)
    g, splits = h // kvh, cfg.num_splits
    gr = 1 << (g - 1).bit_length()  # partial rows: the group, padded to a power of two
    # One operand for the new token's q, k, v: XLA fuses their producers (the rope of q and k, the
    # slices of the fused projection) into the one fusion that writes it.
    # Concatenated along the heads axis before any reshape: slices of one projection along that
    # axis concatenate back into it (XLA folds the copy away).
    qkv = jnp.concatenate([q, k_new, v_new], axis=2).reshape(b, h + 2 * kvh, d)
    kernel = partial(_append_kernel, scale=float(scale), window=window,
                     softcap=None if softcap is None else float(softcap), block_k=cfg.block_k, splits=splits,
                     group=g, kv_heads=kvh, slots=slots, rope_dim=0 if rope is None else rope.dim,
                     norm=q_norm is not None, norm_eps=float(norm_eps), norm_offset=float(norm_offset),
                     interpret=interpret)
    cache_k = pl.BlockSpec((None, None, slots, d), lambda i, j, s: (i, j, 0, 0))
    cache_v = pl.BlockSpec((None, None, slots, dv), lambda i, j, s: (i, j, 0, 0))
    counter = pl.BlockSpec((None, None, 1), lambda i, j, s: (i, j, 0))
    in_specs = [
        pl.BlockSpec((None, 1), lambda i, j, s: (i, 0)),
        pl.BlockSpec((None, h + 2 * kvh, d), lambda i, j, s: (i, 0, 0)),
        cache_k, cache_v, counter,
    ]
    extra = []  # after the aliased operands, so their indices stay put
    if rope is not None:
        extra.append(rope_table(q_positions, rope, d))
        in_specs.append(pl.BlockSpec((None, 2, d), lambda i, j, s: (i, 0, 0)))
    if q_norm is not None:
        extra += [q_norm, k_norm]
        in_specs += [pl.BlockSpec((d,), lambda i, j, s: (0,))] * 2
    out_specs = [pl.BlockSpec((None, h, dv), lambda i, j, s: (i, 0, 0)), cache_k, cache_v, counter]
    out_shape = [jax.ShapeDtypeStruct((b, h, dv), q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b, kvh, 1), jnp.int32)]
    if splits > 1:  # partials: unnormalized out [gr, Dv], running max and sum [gr] per split
        out_specs += [pl.BlockSpec((None, None, splits, gr, dv), lambda i, j, s: (i, j, 0, 0, 0)),
                      pl.BlockSpec((None, None, splits, gr), lambda i, j, s: (i, j, 0, 0)),
                      pl.BlockSpec((None, None, splits, gr), lambda i, j, s: (i, j, 0, 0))]
        out_shape += [jax.ShapeDtypeStruct((b, kvh, splits, gr, dv), jnp.float32),
                      jax.ShapeDtypeStruct((b, kvh, splits, gr), jnp.float32),
                      jax.ShapeDtypeStruct((b, kvh, splits, gr), jnp.float32)]
    counters = jnp.zeros((b, kvh), jnp.int32) if tickets is None else tickets
    out, k, v, counters, *_ = pl.pallas_call(
        kernel,
        grid=(b, kvh, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={2: 1, 3: 2, 4: 3},
        interpret=interpret,
        name="decode_attention_append",
        **triton_params(cfg.num_warps, cfg.num_stages, interpret),
    )(q_positions.astype(jnp.int32), qkv, k, v, counters.reshape(b, kvh, 1), *extra)
    if tickets is None:
        return out.reshape(b, 1, h, dv), k, v
    return out.reshape(b, 1, h, dv), k, v, counters.reshape(b, kvh)


def reference(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
              *, scale: float, window: int | None = None, softcap: float | None = None, rope: Rope | None = None,
              q_norm: jax.Array | None = None, k_norm: jax.Array | None = None, norm_eps: float = 1e-6,
              norm_offset: float = 0.0, tickets: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """The oracle: ferrum_jax.ops.prepare_qk, write_kv, then ferrum_jax.ops.attention over the whole cache
    (and the tickets back as they came: zeros)."""
    q, k_new = ref_ops.prepare_qk(q, k_new, q_positions, rope=rope, q_norm=q_norm, k_norm=k_norm, eps=norm_eps,
                                  offset=norm_offset)
    k, v = ref_ops.write_kv(k, k_new, q_positions), ref_ops.write_kv(v, v_new, q_positions)
    out = ref_ops.attention(q, k, v, q_positions, scale=scale, window=window, softcap=softcap)
    return (out, k, v) if tickets is None else (out, k, v, tickets)


__all__ = ["decode_attention_append", "reference", "unsupported"]
