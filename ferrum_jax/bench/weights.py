"""Weights for the benchmark: random packed GGUF blocks of one type (dense random weights come from
`ferrum_jax.shapes.random_weights`), their byte and parameter counts, and the bytes of a shape's
weights before drawing them.

Mixture of experts: a decode step of B tokens reads the non-expert weights and only the experts its
tokens pick. Random weights route near-uniformly, so a MoE layer with E experts, k per token, is
expected to read E * (1 - (1 - k/E)^B) distinct experts (`expected_distinct_experts`); the weight
bytes of a decode step are then a function of the batch (`decode_weight_bytes`), and the matmul
parameters per token count k experts, not E."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import models
from models.common import fuse_projections
from ferrum_jax.errors import ConfigError
from ferrum_jax.quant.gguf_blocks import LAYOUTS
from ferrum_jax.quant.packed import GGUFWeight
from ferrum_jax.quant.qweight import QuantWeight
from ferrum_jax.quant.repack import repack_weights
from ferrum_jax.shapes import tensor_shapes

DENSE_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f16": "float16", "float16": "float16",
                "f32": "float32", "float32": "float32"}

# Random GGUF blocks: every byte random except the f16 scale fields, set to these values so that a
# decoded weight has mean ~0 and standard deviation ~0.02 (like `shapes.random_weights`). The
# "mins" (m, dmin) cancel the mean of the unsigned codes.
QUANT_SCALES: dict[str, dict[str, float]] = {
    "Q8_0": {"d": 2.7e-4},
    "Q4_0": {"d": 4.3e-3},
    "Q4_1": {"d": 4.3e-3, "m": -7.5 * 4.3e-3},
    "Q5_0": {"d": 2.2e-3},
    "Q5_1": {"d": 2.2e-3, "m": -15.5 * 2.2e-3},
    "Q2_K": {"d": 1.4e-3, "dmin": 1.5 * 1.4e-3},
    "Q3_K": {"d": 4.7e-4},
    "Q4_K": {"d": 7.7e-5, "dmin": 7.5 * 7.7e-5},
    "Q5_K": {"d": 3.8e-5, "dmin": 15.5 * 3.8e-5},
    "Q6_K": {"d": 1.5e-5},
}
# A weight whose row length is not a multiple of the chosen type's block is stored in the first
# of these whose block divides it (as llama.cpp's quantizer falls back), else dense.
QUANT_FALLBACKS = ("Q8_0",)


@partial(jax.jit, static_argnames=("ggml_type", "shape"))
def _random_blocks(key: jax.Array, ggml_type: str, shape: tuple[int, ...]) -> jax.Array:
    layout = LAYOUTS[ggml_type]
    n_blocks = shape[-1] // layout.block_size
    data = jax.random.bits(key, (*shape[:-1], n_blocks, layout.type_size), jnp.uint8)
    for name, value in QUANT_SCALES[ggml_type].items():
        f = layout.field(name)
        raw = np.frombuffer(np.float16(value).tobytes(), np.uint8)  # little-endian f16
        data = data.at[..., f.offset: f.offset + f.size].set(jnp.asarray(raw))
    return data.reshape(*shape[:-1], n_blocks * layout.type_size)


def random_gguf_weight(key: jax.Array, ggml_type: str, shape: tuple[int, ...],
                       compute_dtype: Any = jnp.bfloat16) -> GGUFWeight:
    """A packed GGUF weight of logical `shape`: random block bytes with finite f16 scale fields
    (QUANT_SCALES), so it decodes to finite values of mean ~0 and std ~0.02."""
    ggml_type = ggml_type.upper()
    if ggml_type not in QUANT_SCALES:
        raise ConfigError(f"no random-weight recipe for ggml type {ggml_type}; choose one of {', '.join(QUANT_SCALES)}")
    shape = tuple(int(s) for s in shape)
    GGUFWeight.byte_shape(ggml_type, shape)  # the last dim must be whole blocks
    return GGUFWeight(_random_blocks(key, ggml_type, shape), ggml_type, shape, jnp.dtype(compute_dtype).name)


def _type_for(ggml_type: str, cols: int) -> str | None:
    for t in (ggml_type, *QUANT_FALLBACKS):
        if cols % LAYOUTS[t].block_size == 0:
            return t
    return None


def _is_router(name: str) -> bool:
    """A MoE router ([experts, hidden]) or Qwen2-MoE's shared-expert gate ([1, hidden]): GGUF files
    keep them unquantized (llama.cpp's quantizer skips ffn_gate_inp), and so do the random weights."""
    return name.endswith((".gate.weight", "shared_expert_gate.weight"))


def _has_experts(cfg: Any) -> bool:
    return int(getattr(cfg, "num_experts", 0) or 0) > 0


def random_quantized_weights(cfg: Any, ggml_type: str = "Q4_K", compute_dtype: Any = jnp.bfloat16, seed: int = 0
                             ) -> tuple[Any, dict[str, int]]:
    """Weights of `cfg`'s shape with every 2-D tensor (embedding, projections, lm_head) a random
    packed GGUFWeight of `ggml_type` (decoded to `compute_dtype` inside the jitted step, as the
    loader's packed weights are); norms are ones and biases N(0, 0.02) in `compute_dtype`. A tensor
    whose row length is not a multiple of the block falls back to Q8_0, else stays dense.
    MoE: each projection's experts are one packed [experts, out, in] stack (as GGUF files store
    them; `ferrum_jax.moe_ops` decodes only the experts it reads), drawn in one go; routers stay
    dense. Returns (weights, {storage type: tensor count}), a stack counting once."""
    ggml_type = ggml_type.upper()
    if ggml_type not in QUANT_SCALES:
        raise ConfigError(f"unknown quantized type {ggml_type!r}; choose one of {', '.join(QUANT_SCALES)}")
    family = models.family_of(cfg)
    shapes = tensor_shapes(cfg)
    if _has_experts(cfg) and any(re.search(r"\.experts\.\d+\.", n) for n in shapes):
        # Per-expert 2-D tensors would be drawn and packed one by one, then stacked (a second copy).
        raise ConfigError(f"{getattr(cfg, 'architecture', type(cfg).__name__)} with --dtype {ggml_type.lower()}: "
                          "random quantized MoE weights need the family's stacked expert tensors "
                          "(tensor_shapes(cfg, stacked=True)); use a dense --dtype (bf16, f16, f32)")
    key = jax.random.PRNGKey(seed)
    tensors, types = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        k = jax.random.fold_in(key, i)
        if (len(shape) == 2 and not _is_router(name) or len(shape) == 3) and \
                (t := _type_for(ggml_type, shape[-1])) is not None:
            tensors[name] = random_gguf_weight(k, t, shape, compute_dtype)
            types[t] = types.get(t, 0) + 1
        elif "norm" in name:
            tensors[name] = jnp.ones(shape, compute_dtype)
        else:
            tensors[name] = (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(compute_dtype)
            if len(shape) >= 2:
                types["dense"] = types.get("dense", 0) + 1
    # As the loader does: repacked into the kernel layout (expert stacks too: QuantWeight stacks
    # where the type has a layout), q/k/v and gate/up fused.
    return fuse_projections(repack_weights(family.build_weights(cfg, tensors)), free_inputs=True), types


def _is_weight_leaf(x: Any) -> bool:
    return isinstance(x, (GGUFWeight, QuantWeight))


def _unique(tree: Any) -> list:
    seen, out = set(), []
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=_is_weight_leaf):
        if id(leaf) not in seen:
            seen.add(id(leaf))
            out.append(leaf)
    return out


def _nbytes(leaf: Any) -> int:
    return int(leaf.nbytes) if _is_weight_leaf(leaf) else int(leaf.size * leaf.dtype.itemsize)


def _numel(leaf: Any) -> int:
    return math.prod(leaf.shape)


def expected_distinct_experts(num_experts: int, top_k: int, batch: int) -> Fraction:
    """Expected distinct experts one MoE layer reads for `batch` tokens that each pick `top_k` of
    `num_experts` uniformly at random: E * (1 - (1 - k/E)^B) (an expert is missed by one token with
    probability 1 - k/E). Exact (a Fraction): k at B = 1, -> E as B grows."""
    e, k, b = int(num_experts), int(top_k), int(batch)
    return e * (1 - (1 - Fraction(k, e)) ** b)


DISTINCT_EXPERTS_NOTE = ("expected distinct experts under uniform routing: E * (1 - (1 - k/E)^B) per MoE layer "
                         "for a decode step of B tokens (random weights route near-uniformly); a step reads "
                         "the non-expert weights plus that many experts of every MoE layer")


def _moe_blocks(weights: Any) -> list[Any]:
    from models.moe import Moe

    return [layer.mlp for layer in getattr(weights, "layers", ()) if isinstance(getattr(layer, "mlp", None), Moe)]


def weight_stats(weights: Any, cfg: Any = None, batches: Sequence[int] = (1,)) -> dict[str, Any]:
    """Bytes (unique leaves; packed bytes for GGUF weights) and matmul parameters.

    bytes_read_per_decode_step: every weight except an untied embedding table, of which a decode
    step only gathers a few rows. matmul_params_per_token: 2-D weights of the layers (each token
    goes through all of them). lm_head_params: the vocabulary projection (prefill applies it at one
    position only).

    MoE weights (needs `cfg` for top_k): the expert stacks [E, out, in] are read only for the experts
    a step's tokens pick, so bytes_read_per_decode_step is {str(batch): bytes} over `batches`
    (`decode_weight_bytes`: the non-expert bytes + the expected distinct experts' bytes), with
    bytes_read_per_decode_step_all_experts beside it; matmul_params_per_token counts top_k experts
    (the active parameters) and `moe` holds the expert counts and bytes."""
    leaves = _unique(weights)
    total = sum(_nbytes(x) for x in leaves)
    embed = getattr(weights, "embed", None)
    head = getattr(weights, "lm_head", None)
    head_ids = {id(x) for x in _unique(head)} if head is not None else set()
    embed_leaves = [x for x in _unique(embed) if id(x) not in head_ids] if embed is not None else []
    layers = getattr(weights, "layers", weights)
    blocks = _moe_blocks(weights)
    expert_leaves = _unique([(m.gate, m.up, m.down) for m in blocks])
    expert_ids = {id(x) for x in expert_leaves}
    read = total - sum(_nbytes(x) for x in embed_leaves)
    layer_params = sum(_numel(x) for x in _unique(layers) if len(x.shape) == 2 and id(x) not in expert_ids)
    stats: dict[str, Any] = {
        "bytes": total,
        "bytes_read_per_decode_step": read,
        "embedding_bytes_not_read": sum(_nbytes(x) for x in embed_leaves),
        "params": sum(_numel(x) for x in leaves),
        "matmul_params_per_token": layer_params,
        "lm_head_params": sum(_numel(x) for x in _unique(head)) if head is not None else 0,
    }
    if not blocks:
        return stats
    if cfg is None or not _has_experts(cfg):
        raise ConfigError("weight_stats: MoE weights need their config (num_experts, top_k) to count what a "
                          "decode step reads")
    e, k = int(cfg.num_experts), int(cfg.top_k)
    expert_bytes = sum(_nbytes(x) for x in expert_leaves)
    expert_params = sum(_numel(x) for x in expert_leaves)
    stats["moe"] = {
        "num_experts": e, "top_k": k, "moe_layers": len(blocks), "expert_bytes": expert_bytes,
        "expert_params": expert_params, "active_expert_params_per_token": expert_params * k // e,
        "non_expert_bytes_read_per_decode_step": read - expert_bytes,
        "expected_distinct_experts_per_layer": {str(b): float(expected_distinct_experts(e, k, b)) for b in batches},
        "note": DISTINCT_EXPERTS_NOTE}
    stats["bytes_read_per_decode_step"] = {str(b): decode_weight_bytes(stats, b) for b in batches}
    stats["bytes_read_per_decode_step_all_experts"] = read
    stats["matmul_params_per_token"] = layer_params + expert_params * k // e
    stats["matmul_params_per_token_all_experts"] = layer_params + expert_params
    return stats


def decode_weight_bytes(ws: dict[str, Any], batch: int) -> int:
    """Weight bytes a decode step of `batch` tokens reads: dense models every weight but an untied
    embedding (`bytes_read_per_decode_step`); MoE models the non-expert ones plus, per MoE layer,
    the expected distinct experts under uniform routing (B = 1: exactly k/E of the expert bytes)."""
    moe = ws.get("moe")
    if moe is None:
        return ws["bytes_read_per_decode_step"]
    distinct = expected_distinct_experts(moe["num_experts"], moe["top_k"], batch)
    return moe["non_expert_bytes_read_per_decode_step"] + round(moe["expert_bytes"] * distinct / moe["num_experts"])


def estimate_weight_bytes(cfg: Any, dtype: str = "bf16") -> int:
    """Device bytes of `cfg`'s random weights in `dtype` (a dense dtype or a GGUF type), before
    drawing them (MoE expert stacks as `random_weights` / `random_quantized_weights` draw them)."""
    d = dtype.lower()
    itemsize = jnp.dtype(DENSE_DTYPES.get(d, "bfloat16")).itemsize
    total = 0
    for name, shape in tensor_shapes(cfg).items():
        packed = d not in DENSE_DTYPES and (len(shape) == 2 and not _is_router(name) or len(shape) == 3)
        t = _type_for(d.upper(), shape[-1]) if packed else None
        total += math.prod(shape[:-1]) * LAYOUTS[t].bytes_per_row(shape[-1]) if t else math.prod(shape) * itemsize
    return total
