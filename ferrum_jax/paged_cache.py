"""The paged KV cache: a pool of fixed-size pages shared by every sequence, and a page table per
sequence saying which pages hold its tokens. The same interface as `ferrum_jax.cache.KVCache`
(`create`, `batch`, `capacity`, `nbytes`, `quantized`, `write`, `attend`), so every model family
runs on it unchanged.

Per layer, k and v are pages [num_pages, kv_heads, page_size, head_dim] (int8 / fp8 codes carry
float32 scales [num_pages, kv_heads, page_size], rounded by `cache.quantize_kv` exactly as the
contiguous cache does); one int32 page table [batch, pages_per_seq] is shared by all layers.
Sequence b's slot s (the token at position s) lives in page `page_table[b, s // page_size]` at row
`s % page_size`, so a sequence's capacity is pages_per_seq * page_size and the visibility rule is
the contiguous cache's (`slot <= query position`). Page size and counts are array shapes, hence
static under jit; the page table is data: new page assignments never recompile.

`PageAllocator` is the host side: a free list over the pool that hands each sequence its pages
(in order, or shuffled for tests: the result must not depend on where the pages are).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.cache import KV_CODE_MAX, quantize_kv
from ferrum_jax.errors import ConfigError
from ferrum_jax.ops import QKPrologue, gather_pages


def pages_for(tokens: int, page_size: int) -> int:
    """How many pages of `page_size` tokens hold `tokens` tokens."""
    return -(-tokens // page_size)


class PageAllocator:
    """A host-side free list over a pool of `num_pages` pages. `shuffle` hands the pages out in a
    random order (from `seed`) instead of 0, 1, 2, ...: sequences then own scattered, out-of-order
    pages, which is what a long-running server's pool looks like."""

    def __init__(self, num_pages: int, *, shuffle: bool = False, seed: int = 0):
        if num_pages < 1:
            raise ConfigError(f"a page pool needs at least one page, got num_pages={num_pages}")
        self.num_pages = num_pages
        order = np.random.default_rng(seed).permutation(num_pages) if shuffle else np.arange(num_pages)
        self._free: deque[int] = deque(int(p) for p in order)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n free pages (taken off the free list)."""
        if n > len(self._free):
            raise ConfigError(f"the KV cache page pool has {len(self._free)} free pages of {self.num_pages}; "
                              f"{n} are needed")
        return [self._free.popleft() for _ in range(n)]

    def release(self, pages: Iterable[int]) -> None:
        """Give pages back to the pool (they are handed out again after the pages already free)."""
        for p in pages:
            p = int(p)
            if not 0 <= p < self.num_pages or p in self._free:
                raise ValueError(f"page {p} is not an allocated page of this pool of {self.num_pages}")
            self._free.append(p)

    def page_table(self, batch: int, pages_per_seq: int) -> np.ndarray:
        """int32 [batch, pages_per_seq]: `pages_per_seq` pages for each of `batch` sequences."""
        if batch * pages_per_seq > len(self._free):
            raise ConfigError(f"the KV cache page pool has {len(self._free)} free pages of {self.num_pages}; "
                              f"{batch} sequences x {pages_per_seq} pages need {batch * pages_per_seq}")
        return np.array([self.allocate(pages_per_seq) for _ in range(batch)], np.int32).reshape(batch, pages_per_seq)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    k: tuple[jax.Array, ...]  # per layer: [num_pages, kv_heads, page_size, head_dim]
    v: tuple[jax.Array, ...]
    page_table: jax.Array  # int32 [batch, pages_per_seq], shared by every layer
    k_scale: tuple[jax.Array, ...] | None = None  # per layer [num_pages, kv_heads, page_size] for int8/fp8 codes
    v_scale: tuple[jax.Array, ...] | None = None

    @staticmethod
    def create(*, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: jnp.dtype,
               v_head_dim: int | None = None, page_size: int = 16, num_pages: int | None = None,
               page_table: np.ndarray | jax.Array | None = None, shuffle: bool = False,
               seed: int = 0) -> PagedKVCache:
        """A zero cache for `batch` sequences of `capacity` tokens each, rounded up to whole pages.
        The pool has `num_pages` pages (default: exactly what the batch needs); the page table is
        given, or allocated from the pool by a `PageAllocator` (`shuffle`, `seed`)."""
        pages_per_seq = pages_for(capacity, page_size)
        needed = batch * pages_per_seq
        num_pages = needed if num_pages is None else num_pages
        if page_table is None:
            if num_pages < needed:
                raise ConfigError(f"num_pages={num_pages} is too few: {batch} sequences x {pages_per_seq} pages of "
                                  f"{page_size} tokens (capacity {capacity}) need {needed}")
            page_table = PageAllocator(num_pages, shuffle=shuffle, seed=seed).page_table(batch, pages_per_seq)
        page_table = jnp.asarray(page_table, jnp.int32)
        if page_table.shape != (batch, pages_per_seq):
            raise ConfigError(f"page_table has shape {tuple(page_table.shape)}; {batch} sequences of capacity "
                              f"{capacity} in pages of {page_size} need ({batch}, {pages_per_seq})")
        k_shape = (num_pages, kv_heads, page_size, head_dim)
        v_shape = (num_pages, kv_heads, page_size, v_head_dim or head_dim)
        k = tuple(jnp.zeros(k_shape, dtype) for _ in range(num_layers))
        v = tuple(jnp.zeros(v_shape, dtype) for _ in range(num_layers))
        if jnp.dtype(dtype) not in KV_CODE_MAX:
            return PagedKVCache(k=k, v=v, page_table=page_table)
        k_scale = tuple(jnp.zeros(k_shape[:3], jnp.float32) for _ in range(num_layers))
        v_scale = tuple(jnp.zeros(k_shape[:3], jnp.float32) for _ in range(num_layers))
        return PagedKVCache(k=k, v=v, page_table=page_table, k_scale=k_scale, v_scale=v_scale)

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def pages_per_seq(self) -> int:
        return self.page_table.shape[1]

    @property
    def capacity(self) -> int:
        return self.pages_per_seq * self.page_size

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def nbytes(self) -> int:
        arrays = (*self.k, *self.v, *(self.k_scale or ()), *(self.v_scale or ()), self.page_table)
        return sum(a.size * a.dtype.itemsize for a in arrays)

    def slots(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(page, row) of each position [batch, tokens]; positions outside [0, capacity) get page
        `num_pages`, past the pool, so a scatter with mode="drop" skips them."""
        ps = self.page_size
        inside = (positions >= 0) & (positions < self.capacity)
        index = jnp.clip(positions // ps, 0, self.pages_per_seq - 1)
        page = jnp.take_along_axis(self.page_table, index, axis=1)
        return jnp.where(inside, page, self.num_pages), positions % ps

    def write(self, layer: int, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> PagedKVCache:
        """Store k_new/v_new [batch, tokens, kv_heads, head_dim] at `positions` [batch, tokens] (in
        their sequences' pages). Positions past the capacity are dropped, as in KVCache."""
        page, row = self.slots(positions)

        def put(arrays: tuple | None, new: jax.Array) -> tuple | None:
            if arrays is None:
                return None
            updated = arrays[layer].at[page, :, row].set(new.astype(arrays[layer].dtype), mode="drop")
            return arrays[:layer] + (updated,) + arrays[layer + 1:]

        if not self.quantized:
            return dataclasses.replace(self, k=put(self.k, k_new), v=put(self.v, v_new))
        (kc, ks), (vc, vs) = quantize_kv(k_new, self.k[layer].dtype), quantize_kv(v_new, self.v[layer].dtype)
        return dataclasses.replace(self, k=put(self.k, kc), v=put(self.v, vc), k_scale=put(self.k_scale, ks),
                                   v_scale=put(self.v_scale, vs))

    def write_attend(self, layer: int, q: jax.Array, k_new: jax.Array, v_new: jax.Array, positions: jax.Array, *,
                     ops, scale: float, window: int | None, softcap: float | None,
                     kv_len: int | None, prologue: QKPrologue | None = None) -> tuple[jax.Array, PagedKVCache]:
        """`prologue` (the projection's q, k_new -> attention's), `write`, then `attend` (the
        interface models call; KVCache fuses them for decode)."""
        if prologue is not None:
            q, k_new = prologue(q, k_new, positions, ops)
        cache = self.write(layer, k_new, v_new, positions)
        return cache.attend(layer, q, positions, ops=ops, scale=scale, window=window, softcap=softcap,
                            kv_len=kv_len), cache

    def attend(self, layer: int, q: jax.Array, positions: jax.Array, *, ops, scale: float,
               window: int | None, softcap: float | None, kv_len: int | None) -> jax.Array:
        """Attention of q [batch, tokens, heads, head_dim] at `positions` over the pages holding the
        first `kv_len` slots (all pages when None; rounded up to whole pages, the rest is masked anyway).
        One token (decode) goes through `ops.paged_attention`, which reads the pages in place; a
        prefill or chunk gathers its sequences' pages into a contiguous view first (a copy of the
        prompt's K/V, small next to the attention itself) so that it takes the prefill kernels."""
        table = self.page_table
        if kv_len is not None:
            table = table[:, : min(pages_for(kv_len, self.page_size), self.pages_per_seq)]
        pages = [self.k[layer], self.v[layer]]
        if self.quantized:
            pages += [self.k_scale[layer], self.v_scale[layer]]
        kw = dict(scale=scale, window=window, softcap=softcap)
        if q.shape[1] == 1:
            scales = dict(zip(("k_scale", "v_scale"), pages[2:]))
            return ops.paged_attention(q, pages[0], pages[1], table, positions, **kw, **scales)
        k, v, *scales = (gather_pages(p, table) for p in pages)
        n = kv_len or k.shape[2]
        k, v, scales = k[:, :, :n], v[:, :, :n], dict(zip(("k_scale", "v_scale"), (x[:, :, :n] for x in scales)))
        return ops.attention(q, k, v, positions, causal_from_zero=n == q.shape[1], **kw, **scales)
