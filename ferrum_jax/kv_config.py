"""The user's choice of KV cache: layout (contiguous slots per sequence, or pages from a shared pool)
and storage dtype (the model's, or int8 / fp8 codes with a float32 scale per token and kv head).

    fj.generate(model, prompt, kv_cache=fj.KVCacheConfig(layout="paged", page_size=16, dtype="int8"))

`KVCacheConfig` is a frozen (hashable) dataclass validated when built: a bad field is a
ConfigError naming the field and what it may be. `create` builds the cache (`KVCache` or
`PagedKVCache`) for a batch; the arrays come out of one jitted call per shape, so each is its own
buffer (the cache is donated to every step, and a buffer cannot be donated twice).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.cache import KV_CODE_MAX, KVCache, kv_dtype
from ferrum_jax.errors import ConfigError
from ferrum_jax.paged_cache import PageAllocator, PagedKVCache, pages_for

LAYOUTS = ("contiguous", "paged")
KV_DTYPES = ("int8", "fp8")  # besides None: the model's own dtype
MAX_PAGE_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    """layout: "contiguous" (slot s of a sequence's own [kv_heads, capacity, head_dim] block holds
        position s) or "paged" (fixed-size pages from a pool shared by the batch, found through a
        page table; the capacity rounds up to whole pages).
    page_size: tokens per page (paged only): a power of two from 1 to 1024.
    dtype: None (or "auto") stores keys/values in the model's dtype; "int8" or "fp8" (e4m3) store
        codes with one float32 scale per (token, kv head): about half the bytes of bf16.
    num_pages: paged only, the pool's size (default: exactly what the batch needs).
    shuffle_seed: paged only; an int hands the pool's pages out in a random order from that seed
        (scattered, out-of-order pages: for tests; the output must not change)."""

    layout: str = "contiguous"
    page_size: int = 16
    dtype: str | None = None
    num_pages: int | None = None
    shuffle_seed: int | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"KVCacheConfig.layout={self.layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")
        ps = self.page_size
        if not _is_int(ps) or not 1 <= ps <= MAX_PAGE_SIZE or ps & (ps - 1):
            raise ConfigError(f"KVCacheConfig.page_size={ps!r} must be a power of two from 1 to {MAX_PAGE_SIZE} "
                              "(tokens per page)")
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", None)
        if self.dtype is not None and self.dtype not in KV_DTYPES:
            raise ConfigError(f"KVCacheConfig.dtype={self.dtype!r} is not one of None (the model's dtype), "
                              f"{', '.join(map(repr, KV_DTYPES))}")
        if self.num_pages is not None and (not _is_int(self.num_pages) or self.num_pages < 1):
            raise ConfigError(f"KVCacheConfig.num_pages={self.num_pages!r} must be a positive int (or None: "
                              "what the batch needs)")
        if self.shuffle_seed is not None and not _is_int(self.shuffle_seed):
            raise ConfigError(f"KVCacheConfig.shuffle_seed={self.shuffle_seed!r} must be an int or None")
        if self.layout != "paged" and (self.num_pages is not None or self.shuffle_seed is not None):
            raise ConfigError("KVCacheConfig.num_pages and shuffle_seed are for layout='paged' only")

    @property
    def paged(self) -> bool:
        return self.layout == "paged"

    @property
    def is_default(self) -> bool:
        """Contiguous, in the model's dtype: the layout every path (the sharded one too) supports."""
        return not self.paged and self.dtype is None

    def storage_dtype(self, compute_dtype: Any) -> jnp.dtype:
        return kv_dtype(self.dtype, compute_dtype)

    def quantized(self, compute_dtype: Any) -> bool:
        return self.storage_dtype(compute_dtype) in KV_CODE_MAX

    def capacity(self, capacity: int) -> int:
        """The capacity a cache asked for `capacity` tokens per sequence really has (whole pages)."""
        return pages_for(capacity, self.page_size) * self.page_size if self.paged else capacity

    def create(self, *, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
               dtype: Any, v_head_dim: int | None = None) -> KVCache | PagedKVCache:
        """A zero cache of this config for `batch` sequences of (at least) `capacity` tokens; `dtype`
        is the model's compute dtype (the storage dtype when this config's dtype is None)."""
        store = self.storage_dtype(dtype)
        if not self.paged:
            return _maker(KVCache, num_layers, batch, kv_heads, capacity, head_dim, v_head_dim, store)()
        pages_per_seq = pages_for(capacity, self.page_size)
        needed = batch * pages_per_seq
        num_pages = needed if self.num_pages is None else self.num_pages
        if num_pages < needed:
            raise ConfigError(f"KVCacheConfig.num_pages={num_pages} is too few: {batch} sequences x "
                              f"{pages_per_seq} pages of {self.page_size} tokens need {needed}")
        allocator = PageAllocator(num_pages, shuffle=self.shuffle_seed is not None, seed=self.shuffle_seed or 0)
        table = allocator.page_table(batch, pages_per_seq)
        make = _maker(PagedKVCache, num_layers, batch, kv_heads, pages_per_seq * self.page_size, head_dim, v_head_dim,
                      store, page_size=self.page_size, num_pages=num_pages)
        return make(jnp.asarray(table, jnp.int32))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@functools.cache
def _maker(kind: type, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
           v_head_dim: int | None, dtype: jnp.dtype, **paged: Any):
    """A jitted zero-cache constructor per shape (every array a distinct buffer, in one dispatch)."""
    shape = dict(num_layers=num_layers, batch=batch, kv_heads=kv_heads, capacity=capacity, head_dim=head_dim,
                 dtype=dtype, v_head_dim=v_head_dim)
    if kind is KVCache:
        return jax.jit(lambda: KVCache.create(**shape))
    return jax.jit(lambda table: PagedKVCache.create(**shape, **paged, page_table=table))
