"""Mixture-of-experts on GPU: routing alignment and grouped expert matmuls (Pallas, Triton lowering).

    align.py           (token, slot) entries sorted by expert, padded per expert to block_m (jnp);
                       one block per entry, no sort, for decode-sized batches
    grouped_matmul.py  gate+up with the activation epilogue, down with the routing weight in the
                       epilogue: one pallas_call each over (aligned blocks, output tiles)
    grouped_quant.py   the same over quantized (QuantWeight) stacks: each program decodes its
                       expert's weight tile into x's dtype before the tensor-core dot
    decode.py          decode-sized batches (T*k <= E/4, dense stacks): GEMV kernels over the
                       top-k ids, no alignment (`moe_experts_decode`)
    route.py           softmax + top-k + renormalisation of router logits in one kernel

`moe_experts_pallas` has the signature and semantics of `ferrum_jax.moe_ops.moe_experts` (the XLA
reference and oracle), including `expert_offset` for expert parallel; `ferrum_jax/moe_kernels.py`
registers it (and grouped_quant's `moe_experts_quant`). A layer is: align (a sort of T*k int32
keys, or none at decode), gate_up, down, then a gather of each
(token, slot) row and a float32 sum over the k slots in jnp. The intermediate act and the
per-slot rows are stored in x's dtype (as vLLM does; half the bytes of float32 rows at prefill),
so with bf16 each slot's row is rounded once before the sum; the reference keeps them float32.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.moe.align import (
    Alignment,
    align_block_size,
    align_for,
    align_unsorted,
    combine_slots,
    grouped_moe,
    max_blocks,
    sorted_routing,
)
from pallas_kernels.moe.grouped_matmul import (
    KERNEL_ACTIVATIONS,
    Tiles,
    down,
    down_reference,
    gate_up,
    gate_up_reference,
    stack_shapes,
    tiles_unsupported,
)

__all__ = ["KERNEL_ACTIVATIONS", "Alignment", "MoeConfig", "Tiles", "align_block_size", "align_for", "align_unsorted", "choose_config",
           "combine_slots", "down", "grouped_moe",
           "down_reference", "gate_up", "gate_up_reference", "max_blocks", "moe_experts_pallas", "sorted_routing", "unsupported"]



@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """block_m: entries per block (the alignment's padding unit, rows of every dot); the tiles of
    the gate+up and the down kernels."""
    block_m: int = 16
    gate_up: Tiles = Tiles()
    down: Tiles = Tiles()


def _fit(dim: int, want: int) -> int:
    """The largest power of two <= want (and >= 16) dividing dim, else want (unsupported says why)."""
    v = want
    while v >= 16:
        if dim % v == 0:
            return v
        v //= 2
    return want


def choose_config(num_entries: int, num_experts: int, hidden: int, ff: int) -> MoeConfig:
    """Defaults by the mean entries per expert (T*k / E): block_m 16 for decode and small batches
    (one block per expert), larger blocks when experts get many rows (fewer re-reads of each weight
    tile). Starting points for the GPU sweep in bench/moe.py; only the decode gate_up tile is measured."""
    per_expert = num_entries / num_experts
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64
    if block_m == 16:  # weight-bandwidth bound; gate_up: the best of an H200 sweep at T = 1 (34.7 vs
        # 61.8 us for 32 x 128 at Qwen3-30B-A3B shapes, bench/results/moe_sweep_*); down: not yet swept
        gu, dn = Tiles(64, 256, 4, 4), Tiles(32, 128, 4, 4)
    else:
        gu, dn = Tiles(64, 64, 4, 3), Tiles(64, 64, 4, 3)
    gu = dataclasses.replace(gu, block_n=_fit(ff, gu.block_n), block_k=_fit(hidden, gu.block_k))
    dn = dataclasses.replace(dn, block_n=_fit(hidden, dn.block_n), block_k=_fit(ff, dn.block_k))
    return MoeConfig(block_m=block_m, gate_up=gu, down=dn)


def unsupported(x, ids, weights, w_gate, w_up, w_down, kind: str, config: MoeConfig | None = None) -> str | None:
    """None if the kernels take these arguments, else why not."""
    shapes = stack_shapes(x, ids, w_gate, w_up, w_down, kind)
    if isinstance(shapes, str):
        return shapes
    nk, e, h, f, _ = shapes
    if nk == 0:
        return "no tokens"
    cfg = config or choose_config(nk, e, h, f)
    bm = cfg.block_m
    if bm < 16 or bm & (bm - 1):
        return f"block_m {bm} is not a power of two >= 16"
    return tiles_unsupported(cfg.gate_up, f, h, "gate_up") or tiles_unsupported(cfg.down, h, f, "down")


def moe_experts_pallas(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array | None,
                       w_down: jax.Array, kind: str, *, expert_offset: int | jax.Array = 0, ops=None,
                       config: MoeConfig | None = None, interpret: bool = False) -> jax.Array:
    """`ferrum_jax.moe_ops.moe_experts` on the grouped kernels: x [..., H], ids / weights [..., k],
    stacks [E, F, H] (w_up None: gate is [E, 2F, H]) and [E, H, F], experts
    [expert_offset, expert_offset + E) local. `ops` is accepted for the op signature and unused;
    `config` defaults to `choose_config`."""
    del ops
    reason = unsupported(x, ids, weights, w_gate, w_up, w_down, kind, config)
    if reason is not None:
        raise ValueError(f"moe_experts_pallas: {reason}")
    if weights.shape != ids.shape:
        raise ValueError(f"moe_experts_pallas: weights {weights.shape} and ids {ids.shape} differ")
    nk, e, h, f, _ = stack_shapes(x, ids, w_gate, w_up, w_down, kind)
    cfg = config or choose_config(nk, e, h, f)
    return _moe_experts(x, ids, weights, w_gate, w_up, w_down, jnp.asarray(expert_offset, jnp.int32), kind=kind,
                        config=cfg, interpret=interpret)


@partial(jax.jit, static_argnames=("kind", "config", "interpret"))
def _moe_experts(x, ids, weights, w_gate, w_up, w_down, expert_offset, *, kind: str, config: MoeConfig,
                 interpret: bool) -> jax.Array:
    return grouped_moe(
        x, ids, weights, expert_offset, num_experts=w_gate.shape[0], block_m=config.block_m,
        gate_up=lambda xs, al, k: gate_up(xs, al, w_gate, w_up, kind, top_k=k, tiles=config.gate_up,
                                          interpret=interpret),
        down=lambda act, al, r: down(act, al, r, w_down, tiles=config.down, interpret=interpret))
