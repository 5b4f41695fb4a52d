"""Flash attention for prefill (Pallas, Triton lowering) over the KV cache layout, and its reference.

Semantics are exactly those of `ferrum_jax.ops.attention`: queries q [B, T, H, D] at positions
q_positions [B, T] (any positions: a chunked prefill's queries sit at p0..p0+T-1, each batch row
with its own p0) over cache slots k, v [B, KVH, S, D], slot s holding the key at position s and
visible to a query at position p iff s <= p and (window is None or s > p - window).

Tiling. One program owns one (batch row, kv head) and `block_q` query ROWS, where the rows are the
query tokens times the G = H / KVH query heads that share the kv head, folded: row r is token
r // G, head r % G. Each K/V tile is therefore read once for the whole group (GQA/MQA without a
repeated K/V), the dots are `block_q` rows tall whatever G is (G = 7 folds as well as G = 4), and
since every row carries its own position, a block may straddle tokens. q and the output are
addressed in place ([B, T*H, D] views, gathered by row): no transposed copies around the kernel.

Work skipping. A q block visits only the kv blocks in [max(0, min_pos - window + 1), max_pos]
(min / max over its rows' positions, dynamic loop bounds); the blocks every row sees entirely run
without a mask, only the edge blocks (the diagonal, the window's trailing edge, the cache's last
partial tile) build one. Blocks are launched heaviest first (under a causal mask the last q block
sees the most keys), which shortens the tail of the grid.

Numerics. Online softmax in float32 with exp2: log2(e) is folded into the scale (and into the
soft-cap's outer factor). A quantized cache (int8 / float8_e4m3fn codes, float32 per-slot scales)
is read as codes: each key's scale multiplies its column of scores (free: it rides on the scale
multiply), each value's scale multiplies its column of probabilities before the P @ V dot
(float16 dequantizes the V tile instead, as p * scale can underflow float16's range).

Rows with no visible key return zeros (the reference averages every slot there, having only a
finite mask value); the model never produces such rows.

`reference` is `ferrum_jax.ops.attention` itself: the oracle is the op's own definition.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from ferrum_jax import ops as _ops

LOG2E = math.log2(math.e)
# The running max starts finite: with it, a row whose every score so far is masked (-inf) gets
# exp2(-inf - M_INIT) = 0 instead of exp2(-inf + inf) = NaN.
M_INIT = -1e30

HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
CODE_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    block_q: int  # query rows per program (tokens x the group's heads, folded); power of two >= 16
    block_k: int  # cache slots per loop step; power of two >= 16
    num_warps: int
    num_stages: int


def default_config(head_dim: int, dtype: jnp.dtype, kv_dtype: jnp.dtype | None = None) -> FlashConfig:
    """Tiles for Hopper (H100 / H200), before measurement: the usual Triton flash-attention shapes.
    128 rows x 64 slots with 4 warps for head_dim 64 and 8 for 128 (the float32 accumulator of
    128 x 128 wants 256 threads); 64 x 64 with 8 warps for head_dim 256 (registers and shared
    memory: q 32 KiB + 2 stages of K and V at 32 KiB each); float32 inputs, twice the bytes, get
    half the tiles. 1-byte cache codes halve the K/V tiles; the same shapes leave room for a
    deeper pipeline. Every field is overridable per call; the GPU sweep should replace these."""
    quantized = kv_dtype is not None and jnp.dtype(kv_dtype) in CODE_DTYPES
    if jnp.dtype(dtype) == jnp.float32:
        return FlashConfig(64, 32, 4, 2) if head_dim <= 128 else FlashConfig(32, 32, 4, 2)
    if head_dim <= 64:
        return FlashConfig(128, 64, 4, 4 if quantized else 3)
    if head_dim <= 128:  # H200 sweep (bench/results/attention_sweep_flash_*): 256 x 64, 8 warps, 3 stages best
        return FlashConfig(256, 64, 8, 4 if quantized else 3)
    return FlashConfig(64, 64, 8, 3 if quantized else 2)


def reference(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
              window: int | None = None, softcap: float | None = None, k_scale: jax.Array | None = None,
              v_scale: jax.Array | None = None) -> jax.Array:
    """The oracle: the op's XLA reference (`ferrum_jax.ops.attention`)."""
    return _ops.attention(q, k, v, q_positions, scale=scale, window=window, softcap=softcap,
                          k_scale=k_scale, v_scale=v_scale)


def shape_problem(q, k, v) -> str | None:
    """None when q [B, T, H, D] and k, v [B, KVH, S, D] fit together (GQA, non-empty), else why not.
    Shared with the Hopper kernel."""
    for name, a in {"q": q, "k": k, "v": v}.items():
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            return f"{name} is a {type(a).__name__}, not an array"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return f"q must be [B, T, H, D] and k, v [B, KVH, S, D]; got q {q.shape}, k {k.shape}, v {v.shape}"
    b, t, h, d = q.shape
    if k.shape != v.shape:
        return f"k {k.shape} and v {v.shape} differ (a separate value head_dim is not supported)"
    if k.shape[0] != b or k.shape[3] != d:
        return f"k {k.shape} does not match q {q.shape} (batch and head_dim must agree)"
    kvh, s = k.shape[1], k.shape[2]
    if kvh == 0 or h % kvh:
        return f"{h} query heads do not group over {kvh} kv heads"
    if t == 0 or s == 0:
        return f"empty input: {t} queries, {s} cache slots"
    if d not in HEAD_DIMS:
        return f"head_dim {d} is not one of {HEAD_DIMS}"
    return None


def option_problem(scale, window, softcap) -> str | None:
    """scale, window and softcap are compiled into the kernel: they must be Python numbers."""
    if not isinstance(scale, numbers.Real):
        return f"scale must be a Python number, got {type(scale).__name__}"
    if window is not None and (not isinstance(window, numbers.Integral) or window < 1):
        return f"window must be a positive int, got {window!r}"
    if softcap is not None and (not isinstance(softcap, numbers.Real) or not softcap > 0):
        return f"softcap must be a positive number, got {softcap!r}"
    return None


def unsupported(q, k, v, q_positions, *, scale=1.0, window=None, softcap=None, k_scale=None,
                v_scale=None) -> str | None:
    """None when the kernel takes these arguments, else why not (shapes, dtypes, options)."""
    problem = shape_problem(q, k, v)
    if problem is not None:
        return problem
    if not hasattr(q_positions, "shape") or not hasattr(q_positions, "dtype"):
        return f"q_positions is a {type(q_positions).__name__}, not an array"
    b, t = q.shape[:2]
    kvh, s = k.shape[1], k.shape[2]
    if jnp.dtype(q.dtype) not in DTYPES:
        return f"q dtype {q.dtype} is not one of bfloat16, float16, float32"
    if q_positions.shape != (b, t) or q_positions.dtype != jnp.int32:
        return f"q_positions must be int32 [{b}, {t}], got {q_positions.dtype} {q_positions.shape}"
    if (k_scale is None) != (v_scale is None):
        return "k_scale and v_scale must be given together"
    if k_scale is None:
        if k.dtype != q.dtype or v.dtype != q.dtype:
            return f"k / v dtype {k.dtype} / {v.dtype} differ from q's {q.dtype} (and no scales given)"
    else:
        if jnp.dtype(k.dtype) not in CODE_DTYPES or v.dtype != k.dtype:
            return f"a quantized cache holds int8 or float8_e4m3fn codes, got k {k.dtype}, v {v.dtype}"
        for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
            if sc.shape != (b, kvh, s) or sc.dtype != jnp.float32:
                return f"{name} must be float32 [{b}, {kvh}, {s}], got {sc.dtype} {sc.shape}"
    return option_problem(scale, window, softcap)


def _check_config(config: FlashConfig) -> None:
    for name in ("block_q", "block_k"):
        n = getattr(config, name)
        if not isinstance(n, int) or n < 16 or n & (n - 1):
            raise ValueError(f"flash_attention: {name} {n!r} must be a power of two >= 16 (Triton tiles, dot sizes)")
    if config.num_warps not in (1, 2, 4, 8, 16) or not 1 <= config.num_stages <= 8:
        raise ValueError(f"flash_attention: num_warps {config.num_warps} / num_stages {config.num_stages} out of range")


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
                    window: int | None = None, softcap: float | None = None, k_scale: jax.Array | None = None,
                    v_scale: jax.Array | None = None, block_q: int | None = None, block_k: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None,
                    interpret: bool = False) -> jax.Array:
    """softmax(q k^T * scale) v over cache slots, as `ferrum_jax.ops.attention`: [B, T, H, D] in q's
    dtype. Tiles default to `default_config` (block_q counts folded rows: tokens x group heads),
    shrunk to the problem when it is smaller than one tile; any of them can be given."""
    reason = unsupported(q, k, v, q_positions, scale=scale, window=window, softcap=softcap, k_scale=k_scale,
                         v_scale=v_scale)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    _, t, h, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    base = default_config(d, q.dtype, k.dtype)
    config = FlashConfig(
        block_q=block_q or min(base.block_q, _pow2_at_least(t * (h // kvh))),
        block_k=block_k or min(base.block_k, _pow2_at_least(s)),
        num_warps=num_warps or base.num_warps,
        num_stages=num_stages or base.num_stages)
    _check_config(config)
    return _flash(q, k, v, q_positions, k_scale, v_scale, scale=float(scale),
                  window=None if window is None else int(window),
                  softcap=None if softcap is None else float(softcap), config=config, interpret=interpret)


@partial(jax.jit, static_argnames=("scale", "window", "softcap", "config", "interpret"))
def _flash(q, k, v, q_positions, k_scale, v_scale, *, scale: float, window: int | None, softcap: float | None,
           config: FlashConfig, interpret: bool) -> jax.Array:
    b, t, h, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    group = h // kvh
    quantized = k_scale is not None
    n_q_blocks = pl.cdiv(t * group, config.block_q)
    kernel = partial(
        _kernel, group=group, heads=h, tokens=t, kv_len=s, block_q=config.block_q, block_k=config.block_k,
        scale=scale, window=window, softcap=softcap, quantized=quantized, n_q_blocks=n_q_blocks)
    # Programs with adjacent ids (axis 0 varies fastest) share a kv head: its K/V stays in L2.
    grid = (n_q_blocks, kvh, b)
    in_specs = [
        pl.BlockSpec((None, t * h, d), lambda i, j, n: (n, 0, 0)),  # q rows, gathered in the kernel
        pl.BlockSpec((None, None, s, d), lambda i, j, n: (n, j, 0, 0)),  # k of one (batch, kv head)
        pl.BlockSpec((None, None, s, d), lambda i, j, n: (n, j, 0, 0)),  # v
        pl.BlockSpec((None, t), lambda i, j, n: (n, 0)),  # positions
    ]
    args = [q.reshape(b, t * h, d), k, v, q_positions]
    if quantized:
        in_specs += [pl.BlockSpec((None, None, s), lambda i, j, n: (n, j, 0))] * 2
        args += [k_scale, v_scale]
    params = {} if interpret else {
        "compiler_params": pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)}
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, t * h, d), q.dtype),
        grid=grid,
        in_specs=in_specs,
        # Every program of a batch row writes its own rows of this block (scattered by row).
        out_specs=pl.BlockSpec((None, t * h, d), lambda i, j, n: (n, 0, 0)),
        interpret=interpret,
        name="flash_attention",
        **params,
    )(*args)
    return out.reshape(b, t, h, d)


def _kernel(q_ref, k_ref, v_ref, pos_ref, *refs, group: int, heads: int, tokens: int, kv_len: int,
            block_q: int, block_k: int, scale: float, window: int | None, softcap: float | None,
            quantized: bool, n_q_blocks: int):
    if quantized:
        ks_ref, vs_ref, o_ref = refs
    else:
        (o_ref,) = refs
    d = q_ref.shape[-1]
    kv_head = pl.program_id(1)
    q_block = n_q_blocks - 1 - pl.program_id(0)  # heaviest (latest) blocks first
    n_rows = tokens * group

    rows = q_block * block_q + jnp.arange(block_q, dtype=jnp.int32)  # folded rows: token * group + head
    # Rows past the end load the last real row again (no masked loads; they are not stored), so
    # they also leave the block's min / max position unchanged.
    rows_in = jnp.minimum(rows, n_rows - 1)
    tok = lax.div(rows_in, group)
    q_rows = tok * heads + kv_head * group + lax.rem(rows_in, group)  # rows of the [T*H, D] view
    cols_d = jnp.arange(d, dtype=jnp.int32)
    q = q_ref[q_rows[:, None], cols_d[None, :]]  # [block_q, D]
    pos = pos_ref[tok]  # [block_q] int32
    dot_dtype = q.dtype

    # Scores in the log2 domain: s2 = log2(e) * scale * q.k, or with the soft-cap
    # log2(e) * cap * tanh(scale * q.k / cap).
    if softcap is None:
        inner, outer = scale * LOG2E, None
    else:
        inner, outer = scale / softcap, softcap * LOG2E

    def dot(a, b_, contract_b: int):
        return lax.dot_general(a, b_, (((1,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32,
                               precision=lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None)

    def step(j, carry, masked: bool):
        acc, m, l = carry
        s0 = pl.multiple_of(j * block_k, block_k)
        slots = s0 + jnp.arange(block_k, dtype=jnp.int32)
        tile = pl.ds(s0, block_k)
        inside = slots < kv_len
        if masked and kv_len % block_k:
            # The cache's last tile runs past S: read zeros there (finite, and masked below).
            zero = lambda ref: jnp.zeros((), ref.dtype)  # typed: Triton cannot cast an int to float8
            load = lambda ref: pl_triton.load(ref.at[tile, :], mask=inside[:, None], other=zero(ref))
            load_scale = lambda ref: pl_triton.load(ref.at[tile], mask=inside, other=zero(ref))
        else:
            load = lambda ref: ref[tile, :]
            load_scale = lambda ref: ref[tile]
        kt = load(k_ref)
        c = inner
        if quantized:
            c = load_scale(ks_ref)[None, :] * inner  # each key's scale rides on the score scale
        sc = dot(q, kt.astype(dot_dtype), 1) * c
        if outer is not None:
            sc = jnp.tanh(sc) * outer
        if masked:
            visible = slots[None, :] <= pos[:, None]
            if kv_len % block_k:
                visible &= inside[None, :]
            if window is not None:
                visible &= slots[None, :] > pos[:, None] - window
            sc = jnp.where(visible, sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(sc - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        vt = load(v_ref)
        if quantized:
            vs = load_scale(vs_ref)
            if dot_dtype == jnp.float16:
                vt = vt.astype(jnp.float32) * vs[:, None]
            else:
                p = p * vs[None, :]
        acc = acc * alpha[:, None] + dot(p.astype(dot_dtype), vt.astype(dot_dtype), 0)
        return acc, m_new, l

    # The kv blocks this q block can see, and among them those every row sees in full.
    p_min, p_max = jnp.min(pos), jnp.max(pos)
    hi = jnp.clip(p_max + 1, 0, kv_len)  # slots < hi
    lo = jnp.int32(0) if window is None else jnp.clip(p_min - window + 1, 0, kv_len)
    j_lo = lax.div(lo, block_k)
    j_hi = jnp.maximum(lax.div(hi + block_k - 1, block_k), j_lo)
    full_lo = jnp.int32(0) if window is None else lax.div(jnp.maximum(p_max - window + 1, 0) + block_k - 1, block_k)
    full_hi = jnp.minimum(lax.div(jnp.maximum(p_min + 1, 0), block_k), kv_len // block_k)
    mid_lo = jnp.clip(full_lo, j_lo, j_hi)
    mid_hi = jnp.clip(full_hi, mid_lo, j_hi)

    carry = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), M_INIT, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(j_lo, mid_lo, partial(step, masked=True), carry)  # the window's trailing edge
    carry = lax.fori_loop(mid_lo, mid_hi, partial(step, masked=False), carry)
    acc, _, l = lax.fori_loop(mid_hi, j_hi, partial(step, masked=True), carry)  # the diagonal, the cache's end

    out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]  # l == 0: no visible key, acc is 0: zeros
    out_rows = lax.div(rows, group) * heads + kv_head * group + lax.rem(rows, group)
    pl_triton.store(o_ref.at[out_rows[:, None], cols_d[None, :]], out.astype(o_ref.dtype),
                    mask=(rows < n_rows)[:, None])
