"""Ragged paged attention: one call for a batch that mixes prefill chunks and decode tokens.

The queries of all sequences are packed along one token axis: q [N, H, D], sequence s owning tokens
cu_q_lens[s] .. cu_q_lens[s+1]. Its keys and values (the new tokens' included: the cache's write
step stored them already) live in a paged cache k_pages, v_pages [P, KVH, page_size, D], slot j of
sequence s in page page_table[s, j // page_size] at row j % page_size. Token i of sequence s is at
position kv_lens[s] - q_len_s + i and sees slot j iff j <= position (and j > position - window).
Only the first `num_seqs` rows of the metadata are used (a dynamic scalar, so one compiled program
serves every batch of the same padded shape); tokens past cu_q_lens[num_seqs] are padding and come
out as zeros.

Kernel (Pallas, Triton lowering): the tokens are cut into query blocks of `block_q` tokens, each
inside one sequence (a sequence of q_len tokens takes ceil(q_len / block_q) blocks; a decode token
one block). The block table is computed on device with jnp before the call, at the static size
ceil(N / block_q) + min(S, N) (every non-empty sequence adds at most one partial block); unused
blocks load and store nothing. Grid: (blocks, kv heads). A program folds the G query heads of its kv
head into its tile rows (row = token * G' + head, G' = G rounded up to a power of two), so each K/V
slot is read once per group, and walks the sequence's slots in steps of `block_k` through the page
table, over the visible range only: from the window start of its first token to its last token's
position. K/V rows are gathered slot by slot (page id from the table, row in page), so block_k and
page_size are independent powers of two; loads outside the visible range are masked off, which also
keeps stale page-table entries from being dereferenced; the steps every row of the block sees whole
skip the masks. Online softmax in float32 with exp2. The output has block_q spare tokens and G'
heads per kv head, so padded rows store to addresses of their own; XLA slices them off.

`reference` is the pure-jnp oracle: per token, its sequence's pages gathered and dequantized to
float32, one masked softmax.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_LOG2E = math.log2(math.e)
# The running max starts finite so that a step where a row sees nothing (scores -inf) gives
# exp2(-inf - m) = 0 and a correction exp2(m - m) = 1 instead of NaN.
_M_INIT = -1e30
_QUANT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class RaggedConfig:
    block_q: int  # query tokens per block (tile rows = block_q * G rounded up to a power of two)
    block_k: int  # cache slots per step
    num_warps: int
    num_stages: int


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def default_config(num_tokens: int, max_seqs: int, group: int, head_dim: int) -> RaggedConfig:
    """Block sizes from the static shapes. The mix of a batch is only known on device, so the mean
    tokens per sequence decides: decode-heavy batches (about one token per sequence) get the smallest
    tile that still feeds the tensor cores (16 rows: a decode token wastes the other rows), long
    prefill chunks 128-row tiles. To be tuned on the GPU (the lead's sweep)."""
    gp = _pow2_ceil(group)
    mean_q = num_tokens / max(max_seqs, 1)
    target_rows = 16 if mean_q <= 2 else 64 if mean_q < 64 else 128
    block_q = max(1, target_rows // gp, 16 // gp)
    block_q = min(block_q, max(_pow2_ceil(num_tokens), max(1, 16 // gp)))
    rows = block_q * gp
    block_k = 64 if head_dim <= 128 else 32
    num_warps = 4 if rows <= 64 else 8
    return RaggedConfig(block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=2)


def check_inputs(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, k_scale, v_scale,
                 window: int | None = None) -> None:
    """Raise ValueError naming the argument for inputs no implementation can take."""
    if q.ndim != 3:
        raise ValueError(f"ragged_paged_attention: q must be [tokens, heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 4 or v_pages.shape[:3] != k_pages.shape[:3]:
        raise ValueError(f"ragged_paged_attention: k_pages, v_pages must be [pages, kv_heads, page_size, head_dim] "
                         f"with the same leading dims, got {k_pages.shape} and {v_pages.shape}")
    _, h, d = q.shape
    kvh = k_pages.shape[1]
    if k_pages.shape[3] != d:
        raise ValueError(f"ragged_paged_attention: key head_dim {k_pages.shape[3]} != query head_dim {d}")
    if h % kvh:
        raise ValueError(f"ragged_paged_attention: {h} query heads are not a multiple of {kvh} kv heads")
    if page_table.ndim != 2 or not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise ValueError(f"ragged_paged_attention: page_table must be integer [seqs, pages_per_seq], "
                         f"got {page_table.dtype}{list(page_table.shape)}")
    s = page_table.shape[0]
    if s == 0 or page_table.shape[1] == 0:
        raise ValueError(f"ragged_paged_attention: page_table {page_table.shape} has no rows or no columns")
    if kv_lens.shape != (s,) or cu_q_lens.shape != (s + 1,):
        raise ValueError(f"ragged_paged_attention: with {s} page-table rows, kv_lens must be [{s}] and cu_q_lens "
                         f"[{s + 1}], got {kv_lens.shape} and {cu_q_lens.shape}")
    if jnp.ndim(num_seqs) != 0:
        raise ValueError(f"ragged_paged_attention: num_seqs must be a scalar, got shape {jnp.shape(num_seqs)}")
    if window is not None and window < 1:
        raise ValueError(f"ragged_paged_attention: window must be >= 1, got {window}")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("ragged_paged_attention: pass both k_scale and v_scale, or neither")
    if k_scale is not None:
        for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
            if sc.shape != k_pages.shape[:3]:
                raise ValueError(f"ragged_paged_attention: {name} must be [pages, kv_heads, page_size] = "
                                 f"{k_pages.shape[:3]}, got {sc.shape}")
    elif k_pages.dtype in _QUANT_DTYPES:
        raise ValueError(f"ragged_paged_attention: a {k_pages.dtype} cache needs k_scale and v_scale")


def _clean_cu(cu_q_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
    """cu_q_lens with the unused rows (past num_seqs) pinned to cu_q_lens[num_seqs]: monotone, and
    the unused sequences empty, whatever the caller left there."""
    cu = cu_q_lens.astype(jnp.int32)
    return jnp.where(jnp.arange(cu.shape[0]) <= num_seqs, cu, cu[num_seqs])


def block_table(cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, *, num_tokens: int,
                block_q: int) -> jax.Array:
    """int32 [num_blocks, 4]: per query block (sequence, first token, valid rows, position of its
    first token); rows 0 for the unused tail. num_blocks = ceil(N / block_q) + min(S, N)."""
    s = kv_lens.shape[0]
    num_blocks = -(-num_tokens // block_q) + min(s, num_tokens)
    cu = _clean_cu(cu_q_lens, num_seqs)
    q_lens = jnp.maximum(cu[1:] - cu[:-1], 0)
    blocks = -(-q_lens // block_q)
    ends = jnp.cumsum(blocks)
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, b, side="right"), s - 1).astype(jnp.int32)
    local = (b - (ends[seq] - blocks[seq])) * block_q  # token offset of the block in its sequence
    rows = jnp.where(b < ends[-1], jnp.clip(q_lens[seq] - local, 0, block_q), 0)
    first = jnp.where(rows > 0, cu[seq] + local, 0)
    pos0 = jnp.where(rows > 0, kv_lens.astype(jnp.int32)[seq] - q_lens[seq] + local, 0)
    return jnp.stack([seq, first, rows, pos0], axis=1).astype(jnp.int32)


def _load(view, mask: jax.Array | None, dtype) -> jax.Array:
    """A gather from `view` in `dtype`, zero where `mask` is False (None: all lanes load). The masked
    load skips the memory traffic; zeroing after the cast (not through the load's `other`, which the
    Triton lowering cannot cast to float8) keeps stale non-finite codes out of p @ v."""
    if mask is None:
        return view[...].astype(dtype)
    from jax.experimental.pallas import triton as plgpu

    return jnp.where(mask, plgpu.load(view, mask=mask).astype(dtype), 0)


def _kernel(meta_ref, pt_ref, q_ref, k_ref, v_ref, *refs, scale: float, window: int | None,
            softcap: float | None, block_q: int, gp: int, group: int, block_k: int, quantized: bool,
            dot_dtype):
    from jax.experimental.pallas import triton as plgpu  # masked load/store (interpret mode takes them too)

    if quantized:
        ks_ref, vs_ref, o_ref = refs
    else:
        (o_ref,) = refs
    num_tokens = q_ref.shape[0]
    page_size = k_ref.shape[1]
    pages_per_seq = pt_ref.shape[1]
    seq, first, rows, pos0 = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]

    r = jnp.arange(block_q * gp, dtype=jnp.int32)
    t, g = r // gp, r % gp  # row -> (token in block, query head in group)
    row_ok = t < rows
    # Loads clamp padded rows into bounds; stores go to the output's own padding rows (it has
    # block_q spare tokens and G' heads), so no two lanes of a store share an address.
    tok = first + t
    head = jnp.minimum(g, group - 1)
    # Loads and stores index with broadcast integer arrays only (no slices mixed in): the form both
    # the Triton lowering (gathers) and interpret mode (masked loads) take.
    col = jnp.arange(q_ref.shape[2], dtype=jnp.int32)[None, :]
    q = plgpu.load(q_ref.at[jnp.minimum(tok, num_tokens - 1)[:, None], head[:, None], col], mask=row_ok[:, None],
                   other=0).astype(dot_dtype)
    q_pos = pos0 + t

    # Visible slots of the block: [lo, hi); steps are aligned to block_k. The steps in the middle,
    # [full_lo, full_hi), are visible to every row (below the first row's position, inside the last
    # row's window) and skip the masks; only the edge steps pay for them.
    hi = pos0 + rows
    lo = jnp.int32(0) if window is None else jnp.maximum(pos0 - (window - 1), 0)
    step_lo = lo // block_k
    step_hi = jnp.where(rows > 0, (hi + block_k - 1) // block_k, step_lo)
    full_lo = step_lo
    if window is not None:
        full_lo = jnp.clip((jnp.maximum(hi - window, 0) + block_k - 1) // block_k, step_lo, step_hi)
    full_hi = jnp.clip((pos0 + 1) // block_k, full_lo, step_hi)
    precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None

    def step(j, carry, masked: bool):
        acc, m, l = carry
        slot = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        live = ((slot >= lo) & (slot < hi)) if masked else None
        live2 = None if live is None else live[:, None]
        page_idx = jnp.minimum(slot // page_size, pages_per_seq - 1)
        page = _load(pt_ref.at[jnp.full_like(slot, seq), page_idx], live, jnp.int32)
        row = slot % page_size
        k = _load(k_ref.at[page[:, None], row[:, None], col], live2, dot_dtype)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                            precision=precision)  # [rows, block_k]
        if quantized:
            s = s * _load(ks_ref.at[page, row], live, jnp.float32)[None, :]
        if softcap is not None:
            s = (softcap * _LOG2E) * jnp.tanh(s * (scale / softcap))
        else:
            s = s * (scale * _LOG2E)
        if masked:
            visible = (slot[None, :] <= q_pos[:, None]) & live[None, :]
            if window is not None:
                visible &= slot[None, :] > q_pos[:, None] - window
            s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        if quantized:
            p = p * _load(vs_ref.at[page, row], live, jnp.float32)[None, :]
        v = _load(v_ref.at[page[:, None], row[:, None], col], live2, dot_dtype)
        pv = lax.dot_general(p.astype(dot_dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                             precision=precision)
        return acc * alpha[:, None] + pv, m_new, l

    n_rows, d = q.shape
    init = (jnp.zeros((n_rows, d), jnp.float32), jnp.full((n_rows,), _M_INIT, jnp.float32),
            jnp.zeros((n_rows,), jnp.float32))
    carry = lax.fori_loop(step_lo, full_lo, partial(step, masked=True), init)
    carry = lax.fori_loop(full_lo, full_hi, partial(step, masked=False), carry)
    acc, _, l = lax.fori_loop(full_hi, step_hi, partial(step, masked=True), carry)
    out = acc / jnp.where(l == 0, 1.0, l)[:, None]
    plgpu.store(o_ref.at[tok[:, None], g[:, None], col], out.astype(o_ref.dtype), mask=(row_ok & (g < group))[:, None])


def unsupported(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, *, k_scale=None, v_scale=None,
                config: RaggedConfig | None = None) -> str | None:
    """Why the kernel cannot take these (well-formed) inputs, or None."""
    n, h, d = q.shape
    page_size = k_pages.shape[2]
    group = h // k_pages.shape[1]
    if q.dtype not in _FLOAT_DTYPES:
        return f"query dtype {q.dtype}"
    cache_ok = _QUANT_DTYPES if k_scale is not None else (q.dtype,)
    if k_pages.dtype not in cache_ok or v_pages.dtype not in cache_ok:
        return f"cache dtypes {k_pages.dtype}/{v_pages.dtype} with queries {q.dtype}"
    if not _is_pow2(d) or d < 16:
        return f"head_dim {d} (needs a power of two >= 16)"
    if v_pages.shape[3] != d:
        return f"value head_dim {v_pages.shape[3]} != key head_dim {d}"
    if not _is_pow2(page_size):
        return f"page_size {page_size} (needs a power of two)"
    if n == 0:
        return "no tokens"
    if config is not None:
        if not (_is_pow2(config.block_q) and _is_pow2(config.block_k)):
            return f"block_q {config.block_q} / block_k {config.block_k} (need powers of two)"
        if config.block_q * _pow2_ceil(group) < 16 or config.block_k < 16:
            return (f"tile rows {config.block_q} x {_pow2_ceil(group)} heads / block_k {config.block_k} "
                    "(tensor-core dots need >= 16)")
    return None


@partial(jax.jit, static_argnames=("scale", "window", "softcap", "block_q", "block_k", "num_warps", "num_stages",
                                   "interpret"))
def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                           cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, *, scale: float,
                           window: int | None = None, softcap: float | None = None,
                           k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                           block_q: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, interpret: bool = False) -> jax.Array:
    """The Pallas kernel: q [N, H, D] -> [N, H, D] in q's dtype (layout in the module docstring).
    Block sizes left None come from `default_config`."""
    check_inputs(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, k_scale, v_scale, window)
    n, h, d = q.shape
    num_pages, kvh, page_size, _ = k_pages.shape
    group = h // kvh
    gp = _pow2_ceil(group)
    base = default_config(n, page_table.shape[0], group, d)
    config = RaggedConfig(block_q=block_q or base.block_q, block_k=block_k or base.block_k,
                          num_warps=num_warps or base.num_warps, num_stages=num_stages or base.num_stages)
    reason = unsupported(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, k_scale=k_scale,
                         v_scale=v_scale, config=config)
    if reason is not None:
        raise ValueError(f"ragged_paged_attention (pallas): {reason}")
    num_seqs = jnp.asarray(num_seqs, jnp.int32)
    meta = block_table(cu_q_lens, kv_lens, num_seqs, num_tokens=n, block_q=config.block_q)
    quantized = k_scale is not None
    dot_dtype = q.dtype
    q4 = q.reshape(n, kvh, group, d)
    s, pps = page_table.shape

    in_specs = [
        pl.BlockSpec((None, 4), lambda b, hd: (b, 0)),  # this block's row of the block table
        pl.BlockSpec((s, pps), lambda b, hd: (0, 0)),
        pl.BlockSpec((n, None, group, d), lambda b, hd: (0, hd, 0, 0)),
        pl.BlockSpec((num_pages, None, page_size, d), lambda b, hd: (0, hd, 0, 0)),
        pl.BlockSpec((num_pages, None, page_size, d), lambda b, hd: (0, hd, 0, 0)),
    ]
    args = [meta, page_table.astype(jnp.int32), q4, k_pages, v_pages]
    if quantized:
        in_specs += [pl.BlockSpec((num_pages, None, page_size), lambda b, hd: (0, hd, 0))] * 2
        args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton
        params["compiler_params"] = pl_triton.CompilerParams(num_warps=config.num_warps,
                                                             num_stages=config.num_stages)
    kernel = partial(_kernel, scale=float(scale), window=window, softcap=softcap, block_q=config.block_q, gp=gp,
                     group=group, block_k=config.block_k, quantized=quantized, dot_dtype=dot_dtype)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n + config.block_q, kvh, gp, d), q.dtype),
        # Blocks on CUDA's x axis (y and z stop at 65535), and the fastest: neighbouring programs are
        # blocks of one sequence and kv head, sharing its pages in L2.
        grid=(meta.shape[0], kvh),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((n + config.block_q, None, gp, d), lambda b, hd: (0, hd, 0, 0)),
        interpret=interpret,
        name=f"ragged_paged_attention_bq{config.block_q}_bk{config.block_k}",
        **params,
    )(*args)
    # Padding tokens belong to no block, so the kernel never writes them.
    out = out[:n, :, :group].reshape(n, h, d)
    return jnp.where(_token_valid(_clean_cu(cu_q_lens, num_seqs), num_seqs, n)[:, None, None], out, 0)


def _token_valid(cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int) -> jax.Array:
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    return (t >= cu_q_lens[0]) & (t < cu_q_lens[num_seqs])


def _dequantize(pages: jax.Array, scales: jax.Array | None) -> jax.Array:
    x = pages.astype(jnp.float32)
    return x if scales is None else x * scales.astype(jnp.float32)[..., None]


@partial(jax.jit, static_argnames=("scale", "window", "softcap"))
def reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array, cu_q_lens: jax.Array,
              kv_lens: jax.Array, num_seqs: jax.Array, *, scale: float, window: int | None = None,
              softcap: float | None = None, k_scale: jax.Array | None = None,
              v_scale: jax.Array | None = None) -> jax.Array:
    """Per token: gather its sequence's pages, dequantize to float32, one masked softmax. Tokens are
    mapped in chunks (lax.map) so memory stays at a chunk times one sequence's cache."""
    check_inputs(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, k_scale, v_scale, window)
    n, h, d = q.shape
    num_pages, kvh, page_size, _ = k_pages.shape
    s, pps = page_table.shape
    num_seqs = jnp.asarray(num_seqs, jnp.int32)
    cu = _clean_cu(cu_q_lens, num_seqs)
    t = jnp.arange(n, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), s - 1)  # first s with cu[s+1] > t
    pos = kv_lens.astype(jnp.int32)[seq] - (cu[seq + 1] - cu[seq]) + (t - cu[seq])
    pages = jnp.clip(page_table.astype(jnp.int32)[seq], 0, num_pages - 1)  # [N, pages_per_seq]
    slots = jnp.arange(pps * page_size, dtype=jnp.int32)

    def gather(x: jax.Array, idx: jax.Array) -> jax.Array:  # [pps, kvh, ps, ...] -> [kvh, slots, ...]
        g = jnp.moveaxis(jnp.take(x, idx, axis=0), 1, 0)
        return g.reshape(kvh, pps * page_size, *g.shape[3:])

    def one(args):
        qt, idx, p = args
        k = _dequantize(gather(k_pages, idx), None if k_scale is None else gather(k_scale, idx))
        v = _dequantize(gather(v_pages, idx), None if v_scale is None else gather(v_scale, idx))
        qg = qt.astype(jnp.float32).reshape(kvh, h // kvh, d)
        scores = jnp.einsum("kgd,ksd->kgs", qg, k, precision=lax.Precision.HIGHEST) * scale
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        visible = slots <= p
        if window is not None:
            visible &= slots > p - window
        scores = jnp.where(visible, scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = jnp.where(jnp.any(visible), probs, 0.0)  # a token that sees nothing: zeros, not NaN
        return jnp.einsum("kgs,ksd->kgd", probs, v, precision=lax.Precision.HIGHEST).reshape(h, -1)

    out = lax.map(one, (q, pages, pos), batch_size=16)
    return jnp.where(_token_valid(cu, num_seqs, n)[:, None, None], out, 0).astype(q.dtype)
