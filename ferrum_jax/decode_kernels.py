"""GPU kernel registrations for decode-shaped attention (one query token per sequence).

`decode_attention` (contiguous cache) -> `pallas_decode` (pallas_kernels/attention/decode.py),
`decode_attention_append` (the decode step's q/k norm and rope, cache write and attention) ->
`pallas_decode_append` (.../decode_append.py: one kernel, splits merged in it),
`paged_attention` (paged cache, q_len 1) -> `pallas_paged_decode` (.../paged_decode.py): both
flash-decoding kernels (the visible slots split over many programs, partials merged by a small
log-sum-exp), reading int8 / fp8 caches as codes. Each declines, with the reason, what it cannot
take (prefill-shaped queries, head_dim not a power of two in [16, 256], mixed dtypes, ...), and the
XLA reference runs instead. Launch configs are the kernels' defaults (`choose_config`).
"""

from __future__ import annotations

from typing import Any

import jax

from ferrum_jax import ops as _ops  # noqa: F401  registers the references first (register() keeps them last)
from ferrum_jax.backend import Impl, register
from ferrum_jax.rope import Rope
from pallas_kernels.attention import decode, decode_append, paged_decode

# Triton's pointer arithmetic is 32-bit: every array the kernel indexes must have fewer elements.
MAX_ELEMENTS = 2**31 - 1


def _too_large(*arrays: Any) -> str | None:
    for a in arrays:
        if a is not None and a.size > MAX_ELEMENTS:
            return f"an array of {a.size} elements (32-bit indexing)"
    return None


def pallas_decode(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
                  window: int | None = None, softcap: float | None = None, k_scale: jax.Array | None = None,
                  v_scale: jax.Array | None = None) -> jax.Array:
    return decode.decode_attention(q, k, v, q_positions, scale=scale, window=window, softcap=softcap,
                                   k_scale=k_scale, v_scale=v_scale)


def _decode_applies(q: Any, k: Any, v: Any, q_positions: Any, *, scale: float, window: int | None = None,
                    softcap: float | None = None, k_scale: Any = None, v_scale: Any = None) -> str | None:
    return decode.unsupported(q, k, v, q_positions, k_scale, v_scale) or _too_large(q, k, v)


def pallas_decode_append(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k: jax.Array, v: jax.Array,
                         q_positions: jax.Array, *, scale: float, window: int | None = None,
                         softcap: float | None = None, rope: Rope | None = None, q_norm: jax.Array | None = None,
                         k_norm: jax.Array | None = None, norm_eps: float = 1e-6, norm_offset: float = 0.0,
                         tickets: jax.Array | None = None, ops: Any = None) -> tuple[jax.Array, ...]:
    return decode_append.decode_attention_append(q, k_new, v_new, k, v, q_positions, scale=scale, window=window,
                                                 softcap=softcap, rope=rope, q_norm=q_norm, k_norm=k_norm,
                                                 norm_eps=norm_eps, norm_offset=norm_offset, tickets=tickets)


def _append_applies(q: Any, k_new: Any, v_new: Any, k: Any, v: Any, q_positions: Any, *, scale: float,
                    window: int | None = None, softcap: float | None = None, rope: Rope | None = None,
                    q_norm: Any = None, k_norm: Any = None, norm_eps: float = 1e-6, norm_offset: float = 0.0,
                    tickets: Any = None, ops: Any = None) -> str | None:
    return (decode_append.unsupported(q, k_new, v_new, k, v, q_positions, rope, q_norm, k_norm, tickets)
            or _too_large(q, k, v))


def pallas_paged_decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                        q_positions: jax.Array, *, scale: float, window: int | None = None,
                        softcap: float | None = None, k_scale: jax.Array | None = None,
                        v_scale: jax.Array | None = None) -> jax.Array:
    return paged_decode.paged_decode_attention(q, k_pages, v_pages, page_table, q_positions, scale=scale,
                                               window=window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)


def _paged_applies(q: Any, k_pages: Any, v_pages: Any, page_table: Any, q_positions: Any, *, scale: float,
                   window: int | None = None, softcap: float | None = None, k_scale: Any = None,
                   v_scale: Any = None) -> str | None:
    if q.ndim == 4 and q.shape[1] != 1:
        return f"q_len {q.shape[1]} != 1 (a decode kernel)"
    return (paged_decode.unsupported(q, k_pages, v_pages, page_table, q_positions, k_scale, v_scale)
            or _too_large(q, k_pages, v_pages))


register("decode_attention", Impl("pallas_decode", pallas_decode, platforms=frozenset({"gpu"}), partitionable=False,
                                  applies=_decode_applies))
register("decode_attention_append", Impl("pallas_decode_append", pallas_decode_append, platforms=frozenset({"gpu"}),
                                         partitionable=False, applies=_append_applies))
register("paged_attention", Impl("pallas_paged_decode", pallas_paged_decode, platforms=frozenset({"gpu"}),
                                 partitionable=False,
                                 applies=_paged_applies))
