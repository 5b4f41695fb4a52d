"""GPU kernels of the MoE ops (the XLA references are in ferrum_jax/moe_ops.py).

moe_experts, tried in this order:

  pallas_grouped        GPU; dense bf16/f16/f32 expert stacks, an activation the kernel epilogue
                        computes (silu, gelu_pytorch_tanh, gelu_new, relu), block sizes that divide
                        hidden and ff: routing alignment in jnp, then one grouped Pallas matmul per
                        projection over (blocks of one expert's entries, output tiles), see
                        pallas_kernels/moe/.
  pallas_grouped_quant  GPU; quantized `QuantWeight` expert stacks: GGUF stacks of a type with a
                        kernel layout (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K, repacked at load)
                        and GPTQ / AWQ experts (stacked at load); gate, up and down may differ in
                        format. The same alignment and epilogues, each program decoding its
                        expert's weight tile into x's dtype before the dot
                        (pallas_kernels/moe/grouped_quant.py).

What neither takes runs on the references: GGUFWeight stacks (types without a kernel layout, e.g.
Q2_K / Q3_K) and GPTQ act-order stacks on "xla_dequant", exact "gelu" and shapes that are not whole
tiles on "xla" / "xla_dequant".

moe_route stays the XLA reference on every platform (see pallas_kernels/moe/align.py for why).
"""

from __future__ import annotations

from typing import Any

import jax

from ferrum_jax import moe_ops as _moe_ops  # noqa: F401  the references first: register() keeps them last
from ferrum_jax.backend import Impl, register
from ferrum_jax.quant.qweight import QuantWeight
from pallas_kernels import moe
from pallas_kernels.moe import grouped_quant


def _grouped_applies(x: Any, ids: Any, weights: Any, w_gate: Any, w_up: Any, w_down: Any, kind: str, *,
                     expert_offset: Any = 0, ops: Any = None) -> str | None:
    return moe.unsupported(x, ids, weights, w_gate, w_up, w_down, kind)


def grouped_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array | None,
                    w_down: jax.Array, kind: str, *, expert_offset: int | jax.Array = 0, ops: Any = None) -> jax.Array:
    return moe.moe_experts_pallas(x, ids, weights, w_gate, w_up, w_down, kind, expert_offset=expert_offset)


def _grouped_quant_applies(x: Any, ids: Any, weights: Any, w_gate: Any, w_up: Any, w_down: Any, kind: str, *,
                           expert_offset: Any = 0, ops: Any = None) -> str | None:
    return grouped_quant.unsupported(x, ids, weights, w_gate, w_up, w_down, kind)


def grouped_quant_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: QuantWeight,
                          w_up: QuantWeight | None, w_down: QuantWeight, kind: str, *,
                          expert_offset: int | jax.Array = 0, ops: Any = None) -> jax.Array:
    return grouped_quant.moe_experts_quant(x, ids, weights, w_gate, w_up, w_down, kind, expert_offset=expert_offset)


register("moe_experts", Impl("pallas_grouped", grouped_experts, platforms=frozenset({"gpu"}), partitionable=False,
                             applies=_grouped_applies))
register("moe_experts", Impl("pallas_grouped_quant", grouped_quant_experts, platforms=frozenset({"gpu"}),
                             partitionable=False, applies=_grouped_quant_applies))
