"""GPU kernel registrations for the prefill-shaped `attention` op.

Only `attention` (many query tokens over a contiguous cache) is registered here. The decode and
paged kernels register `decode_attention` / `paged_attention` from their own modules.

Order in the op's table (first that applies wins): `pallas_flash_hopper`
(pallas_kernels/attention/flash_hopper.py, Mosaic GPU: wgmma + TMA, Hopper only) takes bf16/f16
prefills from position 0 (also soft-cap, head_dim 256, a cache longer than the prompt); it is
registered ahead of `cudnn` (ferrum_jax.ops) because it measured faster on an H200 (1.04-1.12x at
2k-32k tokens, bench/results/attention_bench_*). `cudnn` then takes such prefills off Hopper;
`pallas_flash` (pallas_kernels/attention/flash.py) takes the rest it can: chunked prefill (queries
at any positions over a longer cache), soft-cap, head_dim 256, int8 / fp8 caches, float32; then
the XLA reference.
"""

from __future__ import annotations

from typing import Any

import jax

from ferrum_jax import ops as _ops  # noqa: F401  registers "cudnn" (and the reference) before ours
from ferrum_jax.backend import Impl, register
from pallas_kernels.attention import flash, flash_hopper


def flash_prefill(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
                  window: int | None = None, softcap: float | None = None, causal_from_zero: bool = False,
                  k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> jax.Array:
    """The op's signature over `flash.flash_attention` (default tiles). `causal_from_zero` needs no
    special path: the kernel's block skipping already derives the causal bounds from positions."""
    del causal_from_zero
    return flash.flash_attention(q, k, v, q_positions, scale=scale, window=window, softcap=softcap,
                                 k_scale=k_scale, v_scale=v_scale)


def _flash_applies(q: Any, k: Any, v: Any, q_positions: Any, *, scale: float, window: int | None = None,
                   softcap: float | None = None, causal_from_zero: bool = False, k_scale: Any = None,
                   v_scale: Any = None) -> str | None:
    return flash.unsupported(q, k, v, q_positions, scale=scale, window=window, softcap=softcap,
                             k_scale=k_scale, v_scale=v_scale)


def _hopper_applies(q: Any, k: Any, v: Any, q_positions: Any, *, scale: float, window: int | None = None,
                    softcap: float | None = None, causal_from_zero: bool = False, k_scale: Any = None,
                    v_scale: Any = None) -> str | None:
    """Arguments first (cheap), then the device: compute capability 9.x and Mosaic GPU importable."""
    return (flash_hopper.op_unsupported(q, k, v, q_positions, scale=scale, window=window, softcap=softcap,
                                        causal_from_zero=causal_from_zero, k_scale=k_scale, v_scale=v_scale)
            or flash_hopper.device_unsupported())


# Registration order is preference: the Hopper kernel ahead of cuDNN (measured faster), the Triton one after.
register("attention", Impl("pallas_flash_hopper", flash_hopper.hopper_prefill, platforms=frozenset({"gpu"}),
                           partitionable=False,
                           applies=_hopper_applies), before="cudnn")
register("attention", Impl("pallas_flash", flash_prefill, platforms=frozenset({"gpu"}),
                           partitionable=False, applies=_flash_applies))
