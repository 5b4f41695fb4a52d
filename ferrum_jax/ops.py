"""The XLA reference of every op: plain jnp, the CPU path and the oracle for every kernel.

Layouts (shared by every implementation of an op):
  activations x      [..., features]
  dense weight w     [out_features, in_features]  (the checkpoint's own layout: no transpose at load)
  queries q          [batch, q_len, heads, head_dim]
  keys, values k, v  [batch, kv_heads, kv_len, head_dim]  (the KV cache's layout)
  positions          int32 [batch, q_len] for queries; cache slot s holds the key at position s
A key is visible to a query when key_pos <= query_pos (and key_pos > query_pos - window).
Quantized weight types register their own `linear`/`embed` entries (see ferrum_jax.quant).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ferrum_jax.backend import Impl, register
from ferrum_jax.rope import Rope

# Masked scores use a large finite value rather than -inf so a row with nothing visible (padding)
# yields a harmless average instead of NaN.
_MASKED = -1e30


def embed(tokens: jax.Array, table: jax.Array) -> jax.Array:
    return jnp.take(table, tokens, axis=0)


def linear(x: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    y = jnp.einsum("...k,nk->...n", x, w.astype(x.dtype))
    return y if bias is None else y + bias.astype(y.dtype)


def rms_norm(x: jax.Array, w: jax.Array, *, eps: float, offset: float = 0.0) -> jax.Array:
    """x / rms(x) * (offset + w), in float32. Gemma stores w - 1 and uses offset 1."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (offset + w.astype(jnp.float32))).astype(x.dtype)


def add_rms_norm(x: jax.Array, residual: jax.Array, w: jax.Array, *, eps: float,
                 offset: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """A residual add and the norm after it: (s, rms_norm(s, w)) with s = x + residual. One op so a
    GPU kernel can do both in one pass (XLA compiles them to three small kernels)."""
    s = x + residual
    return s, rms_norm(s, w, eps=eps, offset=offset)


def add_rms_norm_linear(x: jax.Array, residual: jax.Array | None, norm_w: jax.Array, w, bias=None, *, eps: float,
                        offset: float = 0.0, ops) -> tuple[jax.Array, jax.Array]:
    """A residual add, the norm after it and the projection of the normed sum: (s, linear(rms_norm(s,
    norm_w), w, bias)) with s = x + residual (x when residual is None). One op so a GPU kernel can
    do all three at decode; here `add_rms_norm` (or `rms_norm`) and `linear` through `ops`."""
    if residual is None:
        s, normed = x, ops.rms_norm(x, norm_w, eps=eps, offset=offset)
    else:
        s, normed = ops.add_rms_norm(x, residual, norm_w, eps=eps, offset=offset)
    return s, ops.linear(normed, w, bias)


def rope(x: jax.Array, positions: jax.Array, rope: Rope) -> jax.Array:
    """Rotate-half rotary embedding (the HF layout) on x [B, T, H, D] at positions [B, T]."""
    inv_freq = jnp.asarray(rope.inv_freq())
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, dim/2]
    cos = jnp.cos(angles) * rope.attention_factor
    sin = jnp.sin(angles) * rope.attention_factor
    cos, sin = (jnp.concatenate([c, c], axis=-1)[:, :, None, :] for c in (cos, sin))
    rot, rest = x[..., : rope.dim].astype(jnp.float32), x[..., rope.dim:]
    half = rope.dim // 2
    rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = (rot * cos + rotated_half * sin).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


_rotate = rope  # for functions whose `rope` argument hides it


def prepare_qk(q: jax.Array, k: jax.Array, positions: jax.Array, *, rope: Rope | None, q_norm: jax.Array | None = None,
               k_norm: jax.Array | None = None, eps: float = 1e-6, offset: float = 0.0,
               ops=None) -> tuple[jax.Array, jax.Array]:
    """The projection's q [B, T, H, D], k [B, T, KVH, D] -> attention's: a per-head RMSNorm when
    q_norm, k_norm are given (Qwen3, Gemma 3), then rope (when given). Through `ops` when given."""
    norm_fn, rope_fn = (rms_norm, _rotate) if ops is None else (ops.rms_norm, ops.rope)
    if q_norm is not None:
        q, k = norm_fn(q, q_norm, eps=eps, offset=offset), norm_fn(k, k_norm, eps=eps, offset=offset)
    if rope is not None:
        q, k = rope_fn(q, positions, rope), rope_fn(k, positions, rope)
    return q, k


@dataclasses.dataclass(frozen=True)
class QKPrologue:
    """What `prepare_qk` does to one layer's q and k, handed to the cache with the projection's
    q, k: a decode step then does it inside its attention kernel (`decode_attention_append`)."""
    rope: Rope | None
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None
    eps: float = 1e-6
    offset: float = 0.0

    def __call__(self, q: jax.Array, k: jax.Array, positions: jax.Array, ops=None) -> tuple[jax.Array, jax.Array]:
        return prepare_qk(q, k, positions, rope=self.rope, q_norm=self.q_norm, k_norm=self.k_norm, eps=self.eps,
                          offset=self.offset, ops=ops)

    def kwargs(self) -> dict:
        """As keyword arguments of `decode_attention_append`."""
        return dict(rope=self.rope, q_norm=self.q_norm, k_norm=self.k_norm, norm_eps=self.eps,
                    norm_offset=self.offset)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(x: jax.Array, kind: str) -> jax.Array:
    return ACTIVATIONS[kind](x)


def gated_mlp(x: jax.Array, w_gate, w_up, w_down, kind: str, *, ops) -> jax.Array:
    """down(act(gate(x)) * up(x)): SwiGLU for silu, GeGLU for gelu. With w_up None, w_gate is the
    fused [gate; up] weight (one matmul, split in halves)."""
    if w_up is None:
        gate, up = jnp.split(ops.linear(x, w_gate), 2, axis=-1)
    else:
        gate, up = ops.linear(x, w_gate), ops.linear(x, w_up)
    return ops.linear(ops.activation(gate, kind) * up, w_down)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
              window: int | None = None, softcap: float | None = None, causal_from_zero: bool = False,
              k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T * scale) v over cache slots: slot s holds the key at position s, and is visible
    to a query at position p when s <= p (and s > p - window). GQA groups query heads over their kv
    head (no repeated K/V is materialized). A quantized cache (int8 / fp8 codes) passes its scales
    k_scale, v_scale [batch, kv_heads, kv_len]: key = code * scale. `causal_from_zero` is only a hint
    for faster paths (queries and keys are the same tokens at positions 0..T-1)."""
    b, t, h, d = q.shape
    kv_heads, kv_len, out_dtype = k.shape[1], k.shape[2], q.dtype
    k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
    if jax.default_backend() == "cpu" and q.dtype != jnp.float32:
        # XLA's CPU runtime has no batched bf16 x bf16 -> f32 dot ("DotThunk: Unsupported element type").
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    qp, kp = q_positions[:, :, None], jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
    visible = kp <= qp
    if window is not None:
        visible &= kp > qp - window
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, v.shape[-1]).astype(out_dtype)


def write_kv(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Store new [batch, tokens, kv_heads, ...] in cache [batch, kv_heads, slots, ...] at slots
    `positions` [batch, tokens]; positions past the capacity are dropped."""
    rows = jnp.arange(new.shape[0])[:, None]
    return cache.at[rows, :, positions].set(new.astype(cache.dtype), mode="drop")


def decode_attention_append(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k: jax.Array, v: jax.Array,
                            q_positions: jax.Array, *, scale: float, window: int | None = None,
                            softcap: float | None = None, rope: Rope | None = None, q_norm: jax.Array | None = None,
                            k_norm: jax.Array | None = None, norm_eps: float = 1e-6, norm_offset: float = 0.0,
                            tickets: jax.Array | None = None, ops=None) -> tuple[jax.Array, ...]:
    """One decode token: `prepare_qk` (when rope or q_norm/k_norm are given: q and k_new are then
    the projection's), store k_new, v_new [batch, 1, kv_heads, head_dim] at q_positions [batch, 1]
    of the cache k, v, then `decode_attention` of q over the whole cache -> (out, k, v). Here
    separate ops and cache writes; on a GPU one kernel does all. `tickets` (zeroed int32
    [batch, kv_heads]) are the kernel's split counters, kept by the caller so that they are zeroed
    once per decode loop rather than per call: given, they come back (zeros) as a fourth output."""
    q, k_new = prepare_qk(q, k_new, q_positions, rope=rope, q_norm=q_norm, k_norm=k_norm, eps=norm_eps,
                          offset=norm_offset, ops=ops)
    k, v = write_kv(k, k_new, q_positions), write_kv(v, v_new, q_positions)
    attend = attention if ops is None else ops.decode_attention
    out = attend(q, k, v, q_positions, scale=scale, window=window, softcap=softcap)
    return (out, k, v) if tickets is None else (out, k, v, tickets)


def dequantize_kv(x: jax.Array, scale: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
    """Cache codes [..., slots, head_dim] times their per-slot scales [..., slots] (identity when None)."""
    if scale is None:
        return x
    return (x.astype(jnp.float32) * scale[..., None].astype(jnp.float32)).astype(dtype)


def gather_pages(pages: jax.Array, table: jax.Array) -> jax.Array:
    """Pages [num_pages, kv_heads, page_size, ...] through table [batch, n] -> the contiguous
    [batch, kv_heads, n * page_size, ...] view. Entries past a sequence's pages may hold anything:
    they are clipped into range, and their slots are masked by position anyway."""
    g = jnp.moveaxis(jnp.take(pages, table, axis=0, mode="clip"), 2, 1)  # [batch, kv_heads, n, page_size, ...]
    return g.reshape(g.shape[0], g.shape[1], g.shape[2] * g.shape[3], *g.shape[4:])


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                    q_positions: jax.Array, *, scale: float, window: int | None = None,
                    softcap: float | None = None, k_scale: jax.Array | None = None,
                    v_scale: jax.Array | None = None) -> jax.Array:
    """`attention` over a paged cache: k_pages, v_pages [num_pages, kv_heads, page_size, head_dim]
    (scales [num_pages, kv_heads, page_size]); sequence b's slot s lives in page
    page_table[b, s // page_size] at row s % page_size. The reference gathers the pages into a
    contiguous [batch, kv_heads, pages_per_seq * page_size, head_dim] view."""
    def gather(pages: jax.Array | None) -> jax.Array | None:
        return None if pages is None else gather_pages(pages, page_table)
    return attention(q, gather(k_pages), gather(v_pages), q_positions, scale=scale, window=window,
                     softcap=softcap, k_scale=gather(k_scale), v_scale=gather(v_scale))


def _dense_only(x, w, *args, **kwargs) -> str | None:
    return None if isinstance(w, jax.Array) else f"weight is {type(w).__name__}, not a dense array"


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
                    window: int | None = None, softcap: float | None = None, causal_from_zero: bool = False,
                    k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> jax.Array:
    """cuDNN's fused flash attention (through jax.nn.dot_product_attention) for a prefill into an
    empty cache: a plain causal mask, GQA handled by cuDNN, no [T, T] scores in memory."""
    k, v = (jnp.swapaxes(a, 1, 2) for a in (k, v))  # cache layout -> [batch, kv_len, kv_heads, head_dim]
    local = None if window is None else (window - 1, 0)  # visible when q - k < window
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local,
                                        implementation="cudnn")


def _cudnn_applies(q, k, v, q_positions, *, scale, window=None, softcap=None, causal_from_zero=False,
                   k_scale=None, v_scale=None) -> str | None:
    if not causal_from_zero:
        return "not a prefill into an empty cache"
    if softcap is not None:
        return "logit soft-capping"
    if k_scale is not None or v_scale is not None:
        return "quantized cache"
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        return f"dtype {q.dtype}"
    if q.shape[-1] not in (64, 128) or q.shape[1] != k.shape[2]:
        return f"head_dim {q.shape[-1]} / query and key lengths {q.shape[1]}, {k.shape[2]}"
    return None


register("attention", Impl("cudnn", cudnn_attention, platforms=frozenset({"gpu"}), applies=_cudnn_applies))

for _op, _fn, _applies in [
    ("embed", embed, lambda tokens, table: _dense_only(tokens, table)),
    ("linear", linear, _dense_only),
    ("rms_norm", rms_norm, None),
    ("add_rms_norm", add_rms_norm, None),
    ("add_rms_norm_linear", add_rms_norm_linear, None),
    ("rope", rope, None),
    ("activation", activation, None),
    ("gated_mlp", gated_mlp, None),
    ("attention", attention, None),
    ("decode_attention", attention, None),
    ("decode_attention_append", decode_attention_append, None),
    ("paged_attention", paged_attention, None),
]:
    register(_op, Impl("xla", _fn, applies=_applies, reference=True))
