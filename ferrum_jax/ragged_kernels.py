"""`ragged_paged_attention`: one call for a batch that mixes prefill chunks and decode tokens over a
paged KV cache (layout in `Ops.ragged_paged_attention` and pallas_kernels/attention/ragged.py).

  pallas_ragged  GPU: the Pallas kernel (Triton lowering), block sizes from `default_config`.
  xla            everywhere (the reference): per token, its sequence's pages gathered, one softmax.
"""

from __future__ import annotations

import jax

from ferrum_jax.backend import Impl, register
from pallas_kernels.attention import ragged


def _pallas_applies(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, *, scale: float,
                    window: int | None = None, softcap: float | None = None, k_scale=None, v_scale=None) -> str | None:
    try:
        ragged.check_inputs(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, k_scale, v_scale, window)
    except ValueError as e:
        return f"bad input, left to the reference to report ({e})"
    n, h, d = q.shape
    config = ragged.default_config(n, page_table.shape[0], h // k_pages.shape[1], d)
    return ragged.unsupported(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, k_scale=k_scale,
                              v_scale=v_scale, config=config)


def pallas_ragged(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, *, scale: float,
                  window: int | None = None, softcap: float | None = None, k_scale=None, v_scale=None) -> jax.Array:
    return ragged.ragged_paged_attention(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, scale=scale,
                                         window=window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)


register("ragged_paged_attention", Impl("pallas_ragged", pallas_ragged, platforms=frozenset({"gpu"}),
                                        partitionable=False,
                                        applies=_pallas_applies))
register("ragged_paged_attention", Impl("xla", ragged.reference, reference=True))
