"""GPU kernels of the MoE ops (the XLA references are in ferrum_jax/moe_ops.py).

  moe_experts  pallas_grouped  GPU; dense bf16/f16/f32 expert stacks, an activation the kernel
               epilogue computes (silu, gelu_pytorch_tanh, gelu_new, relu), block sizes that divide
               hidden and ff: routing alignment in jnp, then one grouped Pallas matmul per
               projection over (blocks of one expert's entries, output tiles), see
               pallas_kernels/moe/. Quantized stacks and exact "gelu" decline to the reference.

moe_route stays the XLA reference on every platform (see pallas_kernels/moe/align.py for why).
"""

from __future__ import annotations

from typing import Any

import jax

from ferrum_jax import moe_ops as _moe_ops  # noqa: F401  the references first: register() keeps them last
from ferrum_jax.backend import Impl, register
from pallas_kernels import moe


def _grouped_applies(x: Any, ids: Any, weights: Any, w_gate: Any, w_up: Any, w_down: Any, kind: str, *,
                     expert_offset: Any = 0, ops: Any = None) -> str | None:
    return moe.unsupported(x, ids, weights, w_gate, w_up, w_down, kind)


def grouped_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array | None,
                    w_down: jax.Array, kind: str, *, expert_offset: int | jax.Array = 0, ops: Any = None) -> jax.Array:
    return moe.moe_experts_pallas(x, ids, weights, w_gate, w_up, w_down, kind, expert_offset=expert_offset)


register("moe_experts", Impl("pallas_grouped", grouped_experts, platforms=frozenset({"gpu"}), partitionable=False,
                             applies=_grouped_applies))
