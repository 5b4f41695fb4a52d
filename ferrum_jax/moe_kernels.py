"""GPU kernels of the MoE ops (the XLA references are in ferrum_jax/moe_ops.py).

moe_experts, tried in this order:

  pallas_decode         GPU; decode-sized batches (T*k <= E/4) of dense expert stacks: GEMV kernels
                        over the selected experts straight from the top-k ids
                        (pallas_kernels/moe/decode.py): no alignment, no padding rows.
  pallas_grouped        GPU; dense bf16/f16/f32 expert stacks, an activation the kernel epilogue
                        computes (silu, gelu_pytorch_tanh, gelu_new, relu), block sizes that divide
                        hidden and ff: routing alignment in jnp, then one grouped Pallas matmul per
                        projection over (blocks of one expert's entries, output tiles), see
                        pallas_kernels/moe/.
  pallas_decode_quant   GPU; decode-sized batches of quantized `QuantWeight` expert stacks (the
                        formats of pallas_grouped_quant below): the same GEMV grid, each program
                        decoding its rows straight from the packed stack, integer dots for 4-/8-bit
                        codes, exact float math for 5-/6-bit (pallas_kernels/moe/decode_quant.py);
                        `Ops(exact=True)` skips it (the grouped kernel is exact).
  pallas_grouped_quant  GPU; quantized `QuantWeight` expert stacks: GGUF stacks of a type with a
                        kernel layout (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K, repacked at load)
                        and GPTQ / AWQ experts (stacked at load); gate, up and down may differ in
                        format. The same alignment and epilogues, each program decoding its
                        expert's weight tile into x's dtype before the dot
                        (pallas_kernels/moe/grouped_quant.py).

What none of them takes runs on the references: GGUFWeight stacks (types without a kernel layout, e.g.
Q2_K / Q3_K) and GPTQ act-order stacks on "xla_dequant", exact "gelu" and shapes that are not whole
tiles on "xla" / "xla_dequant".

moe_route -> pallas_route on GPU: the router matmul (`ops.linear`), then softmax, top k and the
renormalisation in one kernel (pallas_kernels/moe/route.py) instead of XLA's softmax + sort + divide.
"""

from __future__ import annotations

from typing import Any

import jax

from ferrum_jax import moe_ops as _moe_ops  # noqa: F401  the references first: register() keeps them last
from ferrum_jax.backend import Impl, register
from ferrum_jax.quant.qweight import QuantWeight
from pallas_kernels import moe
from pallas_kernels.moe import decode as moe_decode
from pallas_kernels.moe import grouped_quant
from pallas_kernels.moe import decode_quant
from pallas_kernels.moe import route as moe_route


def _grouped_applies(x: Any, ids: Any, weights: Any, w_gate: Any, w_up: Any, w_down: Any, kind: str, *,
                     expert_offset: Any = 0, ops: Any = None) -> str | None:
    return moe.unsupported(x, ids, weights, w_gate, w_up, w_down, kind)


def grouped_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array | None,
                    w_down: jax.Array, kind: str, *, expert_offset: int | jax.Array = 0, ops: Any = None) -> jax.Array:
    return moe.moe_experts_pallas(x, ids, weights, w_gate, w_up, w_down, kind, expert_offset=expert_offset)


def _decode_applies(x: Any, ids: Any, weights: Any, w_gate: Any, w_up: Any, w_down: Any, kind: str, *,
                    expert_offset: Any = 0, ops: Any = None) -> str | None:
    return moe_decode.unsupported(x, ids, weights, w_gate, w_up, w_down, kind)


def decode_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array | None,
                   w_down: jax.Array, kind: str, *, expert_offset: int | jax.Array = 0, ops: Any = None) -> jax.Array:
    return moe_decode.moe_experts_decode(x, ids, weights, w_gate, w_up, w_down, kind, expert_offset=expert_offset)


def _router_experts(router: Any) -> int:
    shape = router.logical_shape if hasattr(router, "logical_shape") else router.shape
    return int(shape[0])


def _route_applies(x: Any, router: Any, *, top_k: int, norm_topk_prob: bool, ops: Any = None) -> str | None:
    e = _router_experts(router)
    if not 1 <= e <= moe_route.MAX_EXPERTS:
        return f"{e} experts (1 to {moe_route.MAX_EXPERTS} in one block)"
    if not 1 <= top_k <= e:
        return f"top_k {top_k} is not in 1..{e} experts"
    return None


def pallas_route(x: jax.Array, router: Any, *, top_k: int, norm_topk_prob: bool, ops: Any) -> tuple[jax.Array, jax.Array]:
    return moe_route.route_topk(ops.linear(x, router), top_k=top_k, norm_topk_prob=norm_topk_prob)


def _decode_quant_applies(x: Any, ids: Any, weights: Any, w_gate: Any, w_up: Any, w_down: Any, kind: str, *,
                          expert_offset: Any = 0, ops: Any = None) -> str | None:
    return decode_quant.unsupported(x, ids, weights, w_gate, w_up, w_down, kind)


def decode_quant_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: QuantWeight,
                         w_up: QuantWeight | None, w_down: QuantWeight, kind: str, *,
                         expert_offset: int | jax.Array = 0, ops: Any = None) -> jax.Array:
    return decode_quant.moe_experts_decode_quant(x, ids, weights, w_gate, w_up, w_down, kind,
                                                 expert_offset=expert_offset)


def _grouped_quant_applies(x: Any, ids: Any, weights: Any, w_gate: Any, w_up: Any, w_down: Any, kind: str, *,
                           expert_offset: Any = 0, ops: Any = None) -> str | None:
    return grouped_quant.unsupported(x, ids, weights, w_gate, w_up, w_down, kind)


def grouped_quant_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: QuantWeight,
                          w_up: QuantWeight | None, w_down: QuantWeight, kind: str, *,
                          expert_offset: int | jax.Array = 0, ops: Any = None) -> jax.Array:
    return grouped_quant.moe_experts_quant(x, ids, weights, w_gate, w_up, w_down, kind, expert_offset=expert_offset)


register("moe_route", Impl("pallas_route", pallas_route, platforms=frozenset({"gpu"}), partitionable=False,
                           applies=_route_applies))
register("moe_experts", Impl("pallas_decode", decode_experts, platforms=frozenset({"gpu"}), partitionable=False,
                             applies=_decode_applies))
register("moe_experts", Impl("pallas_grouped", grouped_experts, platforms=frozenset({"gpu"}), partitionable=False,
                             applies=_grouped_applies))
register("moe_experts", Impl("pallas_decode_quant", decode_quant_experts, platforms=frozenset({"gpu"}),
                             partitionable=False, applies=_decode_quant_applies,
                             approximate="int8 activations for 4-/8-bit codes"))
register("moe_experts", Impl("pallas_grouped_quant", grouped_quant_experts, platforms=frozenset({"gpu"}),
                             partitionable=False, applies=_grouped_quant_applies))
