"""The KV cache: a pytree of per-layer arrays, pre-allocated to a capacity and donated to every
jitted step so XLA updates it in place.

Slot s of a sequence holds the key/value of its token at position s, so the visibility mask is
simply `slot <= query position`: slots past a sequence's length (padding, or stale entries of an
earlier request) are never visible, and the next write overwrites them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer: [batch, kv_heads, capacity, head_dim]
    v: tuple[jax.Array, ...]

    @staticmethod
    def create(*, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
               dtype: jnp.dtype, v_head_dim: int | None = None) -> KVCache:
        k_shape = (batch, kv_heads, capacity, head_dim)
        v_shape = (batch, kv_heads, capacity, v_head_dim or head_dim)
        return KVCache(k=tuple(jnp.zeros(k_shape, dtype) for _ in range(num_layers)),
                       v=tuple(jnp.zeros(v_shape, dtype) for _ in range(num_layers)))

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (*self.k, *self.v))

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> KVCache:
        """Store k_new/v_new [batch, tokens, kv_heads, head_dim] at slots `positions` [batch, tokens].
        Positions past the capacity are dropped (the decode loop stops sequences before that)."""
        rows = jnp.arange(k_new.shape[0])[:, None]
        k_layer = self.k[layer].at[rows, :, positions].set(k_new.astype(self.k[layer].dtype), mode="drop")
        v_layer = self.v[layer].at[rows, :, positions].set(v_new.astype(self.v[layer].dtype), mode="drop")
        return KVCache(k=_replace(self.k, layer, k_layer), v=_replace(self.v, layer, v_layer))


def _replace(items: tuple, i: int, value) -> tuple:
    return items[:i] + (value,) + items[i + 1:]
