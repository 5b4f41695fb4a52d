"""Decode attention (one query token per sequence) over a contiguous KV cache: flash-decoding.

Decode reads the whole visible cache once per token and does ~2 flops per byte, so the kernel is
a streaming read of K and V; everything else is arranged so the GPU keeps enough bytes in flight:

- Grid (batch, kv_heads, splits). A program owns the G = heads / kv_heads query heads of one kv
  head (GQA: each K/V tile is read once for its whole group) and one slice of the row's visible
  slots. The slice is cut at run time from the row's own visible range [q_pos - window + 1,
  q_pos] (block-aligned), so short rows and sliding windows spread over all the splits instead of
  leaving most programs idle; a split with nothing to do writes an empty partial.
- The G query rows are padded to 16 (the smallest tensor-core dot): Q K^T and P V are two dots per
  [block_k, head_dim] tile, exact in float32 accumulation; the dots are free next to the loads.
- Each split writes its unnormalized output, running max and sum; `combine` (plain jnp, tiny)
  merges the splits with a log-sum-exp.
- Quantized caches (int8 / float8_e4m3fn codes, one float32 scale per token and kv head) are read
  as codes: the tile is converted to the query's dtype (exact: codes fit bf16/f16), the k scale is
  folded into the scores and the v scale into the probabilities, so decode reads half the bytes.

`reference` (ferrum_jax.ops.attention) defines the semantics: slot s is visible to a query at
position p when s <= p and s > p - window. Rows with nothing visible return zeros here (the
reference returns the mean of all slots); both are finite, and such rows are padding.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from ferrum_jax import ops as ref_ops

# Hopper (H100 / H200): 132 SMs. Auto splits aim for WAVES programs per SM over the launch (a
# second program per SM covers the first one's pipeline start and the tail of uneven rows), each
# split at least MIN_BLOCKS_PER_SPLIT tiles of the capacity-sized cache long, so the pipeline
# prologue and the partial write amortize. Starting points for a GPU sweep, not measured yet.
SM_COUNT = 132
WAVES = 2
MIN_BLOCKS_PER_SPLIT = 4
# Bytes of one K (or V) tile: block_k = TILE_BYTES / (head_dim * code bytes). 32 KiB keeps
# 2 stages x (K + V) = 128 KiB of shared memory in flight per program.
TILE_BYTES = 32 * 1024
MIN_BLOCK = 16  # the smallest tensor-core dot dimension
MAX_HEAD_DIM = 256
QUANTIZED = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# Masked scores: finite, so an empty split (max stays MASKED, sum 0) never produces NaN.
MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_k: int  # cache slots per loop step (paged: pages_per_step * page_size)
    num_splits: int  # programs per (row, kv head), each on a slice of the visible slots
    num_warps: int = 4
    num_stages: int = 2


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def default_block(head_dim: int, itemsize: int, slots: int) -> int:
    """Slots per tile: TILE_BYTES of a 2-byte K (1-byte codes keep the same slots: converting a
    256-slot int8 tile is instruction-bound, 0.25 vs 0.61 of the copy bandwidth measured on an
    H200 at batch 64 / 4k), a power of two in [16, 256], no larger than the cache."""
    bk = _pow2_floor(TILE_BYTES // (head_dim * max(itemsize, 2)))
    bk = min(bk, 256, max(MIN_BLOCK, 1 << (max(slots, 1) - 1).bit_length()))
    return max(bk, MIN_BLOCK)


def default_splits(batch: int, kv_heads: int, slots: int, block_k: int) -> int:
    """Enough programs to fill the GPU WAVES times, each split MIN_BLOCKS_PER_SPLIT tiles or more:
    batch 1 / 32k context gets many splits, batch 64 few or one."""
    want = -(-WAVES * SM_COUNT // (batch * kv_heads))
    most = max(1, -(-slots // block_k) // MIN_BLOCKS_PER_SPLIT)
    return max(1, min(want, most))


def padded_group(group: int) -> int:
    """Query rows per program: the group padded to a power of two >= 16 (tensor-core dot rows)."""
    return max(MIN_BLOCK, 1 << (group - 1).bit_length())


def triton_params(num_warps: int, num_stages: int, interpret: bool) -> dict:
    if interpret:
        return {}
    return {"compiler_params": pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def masked_load(ref, mask: jax.Array | None):
    """Load a ref view; where `mask` is given, masked-out elements read as 0 (and no memory
    outside the mask is touched: the tail tile of a cache that is not a multiple of block_k)."""
    if mask is None:
        return ref[...]
    return pl_triton.load(ref, mask=mask, other=jnp.zeros((), ref.dtype))


def visible_blocks(pos: jax.Array, slots: int, block_k: int, window: int | None, splits: int,
                   own_slot: bool = True):
    """(lo, hi, first, stop): the visible slots [lo, hi) of a query at `pos` (its own slot `pos`
    included unless `own_slot` is False), and this program's tiles [first, stop) — the visible
    tiles cut into `splits` near-equal runs, run program_id(2)."""
    hi = jnp.minimum(pos + 1 if own_slot else pos, slots)
    lo = jnp.int32(0) if window is None else jnp.maximum(pos - window + 1, 0)
    first = lax.div(lo, block_k)
    end = lax.div(jnp.maximum(hi, 0) + block_k - 1, block_k)
    n = jnp.where(lo < hi, end - first, 0)
    per = lax.div(n + splits - 1, splits)
    start = first + pl.program_id(2) * per
    return lo, hi, start, jnp.minimum(start + per, first + n)


def attend_tile(q, k, v, ks, vs, slot, lo, hi, carry, *, scale: float, softcap: float | None):
    """One online-softmax step over a tile: q [Gp, D]; k [bk, D], v [bk, Dv] (codes or values);
    ks, vs [bk] float32 scales or None; slot [bk] the tile's slot numbers. Float32 state
    (acc [Gp, Dv], running max [Gp], running sum [Gp])."""
    acc, m, l = carry
    dt = q.dtype
    hp = lax.Precision.HIGHEST if dt == jnp.float32 else None
    s = lax.dot_general(q, k.astype(dt), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                        precision=hp)  # [Gp, bk]
    s = s * (scale if ks is None else ks[None, :] * scale)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    valid = (slot >= lo) & (slot < hi)
    s = jnp.where(valid[None, :], s, MASKED)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    if vs is not None:
        p = p * vs[None, :]  # the v scale of each slot, folded into its probability
    pv = lax.dot_general(p.astype(dt), v.astype(dt), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                         precision=hp)
    return acc * alpha[:, None] + pv, m_new, l


def init_state(gp: int, dv: int):
    return (jnp.zeros((gp, dv), jnp.float32), jnp.full((gp,), MASKED, jnp.float32), jnp.zeros((gp,), jnp.float32))


def store_partials(o_ref, m_ref, l_ref, state, group: int) -> None:
    """Write a split's partials; only the real query rows of the output (the padding rows are
    never read, so they are not written)."""
    acc, m, l = state
    rows = lax.broadcasted_iota(jnp.int32, acc.shape, 0) < group
    if acc.shape[0] == group:
        o_ref[...] = acc
    else:
        pl_triton.store(o_ref, acc, mask=rows)
    m_ref[...] = m
    l_ref[...] = l


def _decode_kernel(pos_ref, q_ref, k_ref, v_ref, *rest, scale, window, softcap, block_k, splits, group,
                   slots, quantized):
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref = rest
    else:
        (o_ref, m_ref, l_ref), ks_ref, vs_ref = rest, None, None
    lo, hi, start, stop = visible_blocks(pos_ref[0], slots, block_k, window, splits)
    q = q_ref[...]
    ragged = slots % block_k != 0  # only then can a tile reach past the cache

    def body(i, carry):
        off = pl.multiple_of(i * block_k, block_k)
        slot = off + lax.iota(jnp.int32, block_k)
        inside = (slot < slots) if ragged else None
        visible = (slot >= lo) & (slot < hi)  # V outside the visible range reads as 0: no NaN leaks
        k = masked_load(k_ref.at[pl.ds(off, block_k), :], None if inside is None else inside[:, None])
        v = masked_load(v_ref.at[pl.ds(off, block_k), :], visible[:, None])
        ks = vs = None
        if quantized:
            ks = masked_load(ks_ref.at[pl.ds(off, block_k)], inside)
            vs = masked_load(vs_ref.at[pl.ds(off, block_k)], visible)
        return attend_tile(q, k, v, ks, vs, slot, lo, hi, carry, scale=scale, softcap=softcap)

    state = lax.fori_loop(start, stop, body, init_state(q.shape[0], v_ref.shape[-1]))
    store_partials(o_ref, m_ref, l_ref, state, group)


def combine(o: jax.Array, m: jax.Array, l: jax.Array, group: int) -> jax.Array:
    """Merge the splits' partials (o [..., splits, Gp, Dv], m, l [..., splits, Gp]) with a log-sum-exp
    -> [..., group, Dv] float32. A row with nothing visible (every sum 0) gives 0."""
    o, m, l = o[..., :group, :], m[..., :group], l[..., :group]
    top = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp(m - top)
    total = jnp.sum(l * w, axis=-2)
    out = jnp.sum(o * w[..., None], axis=-3)
    return out / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, k_scale, v_scale) -> str | None:
    """None if the decode kernels take these arrays, else why not (shared by both layouts: the
    scales have the cache's leading three dims, [B, KVH, S] or [P, KVH, page_size])."""
    if q.ndim != 4 or q.shape[1] != 1:
        return f"query shape {q.shape} is not [batch, 1, heads, head_dim] (q_len must be 1)"
    if k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]:
        return f"cache shapes {k.shape}, {v.shape} differ"
    h, d, dv, kvh = q.shape[2], q.shape[3], v.shape[3], k.shape[1]
    if jnp.dtype(q.dtype) not in FLOATS:
        return f"query dtype {q.dtype}"
    if k.shape[3] != d:
        return f"key head_dim {k.shape[3]} != query head_dim {d}"
    for dim in (d, dv):
        if dim & (dim - 1) or not MIN_BLOCK <= dim <= MAX_HEAD_DIM:
            return f"head_dim {dim} is not a power of two in [{MIN_BLOCK}, {MAX_HEAD_DIM}]"
    if kvh == 0 or h % kvh:
        return f"{h} query heads do not group over {kvh} kv heads"
    if padded_group(h // kvh) > 64:
        return f"{h // kvh} query heads per kv head (at most 64)"
    if (k_scale is None) != (v_scale is None):
        return "only one of k_scale, v_scale given"
    if k_scale is None:
        if k.dtype != q.dtype or v.dtype != q.dtype:
            return f"cache dtype {k.dtype}/{v.dtype} != query dtype {q.dtype}"
        return None
    if jnp.dtype(k.dtype) not in QUANTIZED or v.dtype != k.dtype:
        return f"quantized cache dtype {k.dtype}/{v.dtype} (int8 or float8_e4m3fn)"
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if sc.shape != k.shape[:3] or sc.dtype != jnp.float32:
            return f"{name} {sc.shape} {sc.dtype} is not float32 {tuple(k.shape[:3])}"
    return None


def unsupported(q, k, v, q_positions, k_scale=None, v_scale=None) -> str | None:
    """None if `decode_attention` runs these arguments, else why not."""
    reason = check_inputs(q, k, v, k_scale, v_scale)
    if reason is not None:
        return reason
    if k.shape[0] != q.shape[0]:
        return f"cache batch {k.shape[0]} != query batch {q.shape[0]}"
    if q_positions.shape != (q.shape[0], 1) or not jnp.issubdtype(q_positions.dtype, jnp.integer):
        return f"q_positions {q_positions.shape} {q_positions.dtype} is not int [batch, 1]"
    return None


def group_queries(q: jax.Array, kv_heads: int) -> tuple[jax.Array, int]:
    """q [B, 1, H, D] -> ([B, KVH, Gp, D] with zero padding rows, G)."""
    b, _, h, d = q.shape
    g = h // kv_heads
    qg = q.reshape(b, kv_heads, g, d)
    return jnp.pad(qg, ((0, 0), (0, 0), (0, padded_group(g) - g), (0, 0))), g


@partial(jax.jit, static_argnames=("scale", "window", "softcap", "block_k", "num_splits", "num_warps",
                                   "num_stages", "interpret"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
                     window: int | None = None, softcap: float | None = None, k_scale: jax.Array | None = None,
                     v_scale: jax.Array | None = None, block_k: int | None = None, num_splits: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None,
                     interpret: bool = False) -> jax.Array:
    """Attention of q [B, 1, H, D] at q_positions [B, 1] over the cache k, v [B, KVH, S, D] (codes
    with float32 k_scale, v_scale [B, KVH, S] for an int8 / fp8 cache) -> [B, 1, H, Dv] in q's
    dtype. block_k (a power of two >= 16), num_splits, num_warps, num_stages default to
    `choose_config`'s."""
    reason = unsupported(q, k, v, q_positions, k_scale, v_scale)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}")
    b, _, h, d = q.shape
    kvh, slots, dv = k.shape[1], k.shape[2], v.shape[3]
    cfg = choose_config(b, kvh, slots, d, k.dtype, block_k, num_splits, num_warps, num_stages)
    qg, g = group_queries(q, kvh)
    gp = qg.shape[2]
    pos = q_positions.astype(jnp.int32)
    quantized = k_scale is not None
    kernel = partial(_decode_kernel, scale=float(scale), window=window,
                     softcap=None if softcap is None else float(softcap), block_k=cfg.block_k,
                     splits=cfg.num_splits, group=g, slots=slots, quantized=quantized)
    in_specs = [
        pl.BlockSpec((None, 1), lambda i, j, s: (i, 0)),
        pl.BlockSpec((None, None, gp, d), lambda i, j, s: (i, j, 0, 0)),
        pl.BlockSpec((None, None, slots, d), lambda i, j, s: (i, j, 0, 0)),
        pl.BlockSpec((None, None, slots, dv), lambda i, j, s: (i, j, 0, 0)),
    ]
    args = [pos, qg, k, v]
    if quantized:
        in_specs += [pl.BlockSpec((None, None, slots), lambda i, j, s: (i, j, 0))] * 2
        args += [k_scale, v_scale]
    return split_call(kernel, in_specs, args, cfg=cfg, group=g, out_shape=(b, kvh, gp, dv), out_dtype=q.dtype,
                      name="decode_attention", interpret=interpret)


def split_call(kernel, in_specs: list, args: list, *, cfg: DecodeConfig, group: int, out_shape: tuple[int, ...],
               out_dtype, name: str, interpret: bool) -> jax.Array:
    """Run a flash-decoding kernel over grid (batch, kv heads, splits), each program writing its
    split's partials (unnormalized out [Gp, Dv], running max and sum [Gp]), then merge the splits
    -> [batch, 1, kv_heads * group, Dv] in `out_dtype`. Shared by the contiguous and paged kernels."""
    b, kvh, gp, dv = out_shape
    splits = cfg.num_splits
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, kvh, splits),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, None, gp, dv), lambda i, j, s: (i, j, s, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kvh, splits, gp, dv), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, splits, gp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, splits, gp), jnp.float32)],
        interpret=interpret,
        name=name,
        **triton_params(cfg.num_warps, cfg.num_stages, interpret),
    )(*args)
    return combine(o, m, l, group).reshape(b, 1, kvh * group, dv).astype(out_dtype)


def choose_config(batch: int, kv_heads: int, slots: int, head_dim: int, cache_dtype, block_k: int | None = None,
                  num_splits: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None) -> DecodeConfig:
    """The launch config: given values are checked and kept, the rest default (`default_block`,
    `default_splits`, 4 warps, 2 stages)."""
    bk = block_k or default_block(head_dim, jnp.dtype(cache_dtype).itemsize, slots)
    if bk & (bk - 1) or bk < MIN_BLOCK:
        raise ValueError(f"decode_attention: block_k {bk} is not a power of two >= {MIN_BLOCK}")
    splits = num_splits or default_splits(batch, kv_heads, slots, bk)
    if splits < 1:
        raise ValueError(f"decode_attention: num_splits {splits} < 1")
    return DecodeConfig(block_k=bk, num_splits=splits, num_warps=num_warps or 4,
                        num_stages=num_stages or default_stages(cache_dtype))


def default_stages(cache_dtype) -> int:
    """2 for 2-byte caches, 3 for 1-byte codes (measured best on an H200: bench/results/attention_*)."""
    return 3 if jnp.dtype(cache_dtype).itemsize == 1 else 2


def reference(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
              window: int | None = None, softcap: float | None = None, k_scale: jax.Array | None = None,
              v_scale: jax.Array | None = None) -> jax.Array:
    """The oracle: ferrum_jax.ops.attention (dequantized cache, one softmax over all slots)."""
    return ref_ops.attention(q, k, v, q_positions, scale=scale, window=window, softcap=softcap,
                             k_scale=k_scale, v_scale=v_scale)


__all__ = ["DecodeConfig", "choose_config", "combine", "decode_attention", "reference", "unsupported"]
