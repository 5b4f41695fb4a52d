"""The KV cache: a pytree of per-layer arrays, pre-allocated to a capacity and donated to every
jitted step so XLA updates it in place.

Slot s of a sequence holds the key/value of its token at position s, so the visibility mask is
simply `slot <= query position`: slots past a sequence's length (padding, or stale entries of an
earlier request) are never visible, and the next write overwrites them.

A cache may store int8 or float8 (e4m3) codes with one float32 scale per (token, kv head):
decode reads half the bytes of bf16; `quantize_kv` is the one place that rounds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ferrum_jax.errors import ConfigError
from ferrum_jax.ops import QKPrologue, write_kv

# The largest code of each quantized cache dtype: a vector's max |x| maps onto it.
KV_CODE_MAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


def kv_dtype(name: str | jnp.dtype | None, compute_dtype: jnp.dtype) -> jnp.dtype:
    """The cache storage dtype for a user's choice (None: the model's compute dtype)."""
    if name is None:
        return jnp.dtype(compute_dtype)
    aliases = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "float8_e4m3fn": jnp.float8_e4m3fn,
               "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f16": jnp.float16, "float16": jnp.float16,
               "f32": jnp.float32, "float32": jnp.float32}
    if isinstance(name, str):
        if name not in aliases:
            raise ConfigError(f"KV cache dtype {name!r} is not one of {sorted(aliases)}")
        return jnp.dtype(aliases[name])
    return jnp.dtype(name)


def quantize_kv(x: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """x [..., head_dim] -> (codes [..., head_dim] of `dtype`, float32 scales [...]), x ~= codes * scale."""
    code_max = KV_CODE_MAX[jnp.dtype(dtype)]
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / code_max
    codes = xf / jnp.where(scale == 0, 1.0, scale)[..., None]
    if jnp.issubdtype(dtype, jnp.integer):
        codes = jnp.clip(jnp.round(codes), -code_max, code_max)
    return codes.astype(dtype), scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer: [batch, kv_heads, capacity, head_dim]
    v: tuple[jax.Array, ...]
    k_scale: tuple[jax.Array, ...] | None = None  # per layer [batch, kv_heads, capacity] for int8/fp8 codes
    v_scale: tuple[jax.Array, ...] | None = None
    # The decode attention kernel's split counters, int32 [batch, kv_heads], all zero between calls:
    # a decode loop adds them once (`with_tickets`) and every layer of every step reuses them,
    # instead of each call zeroing its own (a memset per layer per step).
    tickets: jax.Array | None = None

    @staticmethod
    def create(*, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
               dtype: jnp.dtype, v_head_dim: int | None = None) -> KVCache:
        k_shape = (batch, kv_heads, capacity, head_dim)
        v_shape = (batch, kv_heads, capacity, v_head_dim or head_dim)
        k = tuple(jnp.zeros(k_shape, dtype) for _ in range(num_layers))
        v = tuple(jnp.zeros(v_shape, dtype) for _ in range(num_layers))
        if jnp.dtype(dtype) not in KV_CODE_MAX:
            return KVCache(k=k, v=v)
        def scales() -> tuple[jax.Array, ...]:  # one buffer each: the cache is donated
            return tuple(jnp.zeros(k_shape[:3], jnp.float32) for _ in range(num_layers))
        return KVCache(k=k, v=v, k_scale=scales(), v_scale=scales())

    def with_tickets(self) -> KVCache:
        """This cache carrying zeroed split counters for the decode kernel (see `tickets`)."""
        b, kvh = self.k[0].shape[:2]
        return dataclasses.replace(self, tickets=jnp.zeros((b, kvh), jnp.int32))

    def without_tickets(self) -> KVCache:
        return dataclasses.replace(self, tickets=None)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def nbytes(self) -> int:
        arrays = (*self.k, *self.v, *(self.k_scale or ()), *(self.v_scale or ()))
        return sum(a.size * a.dtype.itemsize for a in arrays)

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> KVCache:
        """Store k_new/v_new [batch, tokens, kv_heads, head_dim] at slots `positions` [batch, tokens].
        Positions past the capacity are dropped (the decode loop stops sequences before that)."""
        def put(arrays: tuple | None, new: jax.Array) -> tuple | None:
            return None if arrays is None else _replace(arrays, layer, write_kv(arrays[layer], new, positions))

        if not self.quantized:
            return dataclasses.replace(self, k=put(self.k, k_new), v=put(self.v, v_new))
        (kc, ks), (vc, vs) = quantize_kv(k_new, self.k[layer].dtype), quantize_kv(v_new, self.v[layer].dtype)
        return dataclasses.replace(self, k=put(self.k, kc), v=put(self.v, vc), k_scale=put(self.k_scale, ks),
                                   v_scale=put(self.v_scale, vs))

    def write_attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array, positions: jax.Array, *,
                     ops, scale: float, window: int | None, softcap: float | None, kv_len: int | None,
                     prologue: QKPrologue | None = None) -> tuple[jax.Array, KVCache]:
        """`prologue` (the projection's q, k_new -> attention's), `write`, then `attend`. A decode
        token over the whole cache is one op, `decode_attention_append` (on a GPU one kernel: no
        separate norm, rope, cache writes or split merge)."""
        if q.shape[1] != 1 or kv_len is not None or self.quantized:
            if prologue is not None:
                q, k_new = prologue(q, k_new, positions, ops)
            cache = self.write(layer, k_new, v_new, positions)
            return cache.attend(layer, q, positions, ops=ops, scale=scale, window=window, softcap=softcap,
                                kv_len=kv_len), cache
        out, k, v, *tickets = ops.decode_attention_append(
            q, k_new, v_new, self.k[layer], self.v[layer], positions, scale=scale, window=window, softcap=softcap,
            tickets=self.tickets, **(prologue.kwargs() if prologue is not None else {}))
        return out, KVCache(k=_replace(self.k, layer, k), v=_replace(self.v, layer, v),
                            tickets=tickets[0] if tickets else None)

    def attend(self, layer: int, q: jax.Array, positions: jax.Array, *, ops, scale: float,
               window: int | None, softcap: float | None, kv_len: int | None) -> jax.Array:
        """Attention of q [batch, tokens, heads, head_dim] at `positions` over this layer's first
        `kv_len` slots (all when None): the decode op for one token, else the prefill op
        (`kv_len == tokens` means a prefill of whole prompts into an empty cache)."""
        t, n = q.shape[1], kv_len or self.capacity
        keys, values = self.k[layer][:, :, :n], self.v[layer][:, :, :n]
        scales = {}
        if self.quantized:
            scales = dict(k_scale=self.k_scale[layer][:, :, :n], v_scale=self.v_scale[layer][:, :, :n])
        kw = dict(scale=scale, window=window, softcap=softcap, **scales)
        if t == 1:
            return ops.decode_attention(q, keys, values, positions, **kw)
        return ops.attention(q, keys, values, positions, causal_from_zero=n == t, **kw)


def _replace(items: tuple, i: int, value) -> tuple:
    return items[:i] + (value,) + items[i + 1:]
