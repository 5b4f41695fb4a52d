"""Sparse mixture-of-experts decoders: Qwen3-MoE, Qwen2-MoE and Mixtral (one block, a few switches).

    h   = x + o( attn( rope(q_norm?(q(n1(x)))), rope(k_norm?(k(n1(x)))), v(n1(x)) ) )
    out = h + sum_{e in topk} w_e * down_e( silu(gate_e(n2(h))) * up_e(n2(h)) )
            [ + sigmoid(shared_gate(n2(h))) * shared_mlp(n2(h))   Qwen2-MoE's shared expert ]

Routing (`ops.moe_route`): softmax over the router logits in float32, the top k, renormalised to
sum 1 when `norm_topk_prob` (Qwen configs say; Mixtral always, its "softmax over the top-k logits").
Qwen layers in `mlp_only_layers`, or not on the `decoder_sparse_step` grid, have a dense MLP of
`intermediate_size`. Attention is Llama's: q/k norm (Qwen3-MoE), qkv bias (Qwen2-MoE), sliding
window (Mixtral's `sliding_window`, Qwen's layer_types). Per-expert checkpoint tensors are stacked
into [experts, out, in] arrays when the weights are built (GPTQ / AWQ experts into a `QuantWeight`
stack); GGUF files store the stacks themselves (`tensor_shapes(cfg, stacked=True)` names them), and
a quantized stack stays packed with a leading expert axis (a `GGUFWeight`, repacked into a
`QuantWeight` at load where its type has a kernel layout; `ferrum_jax.moe_ops` decodes only what
it reads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ferrum_jax.backend import Ops
from ferrum_jax.cache import KVCache
from ferrum_jax.errors import CheckpointError, ConfigError
from ferrum_jax.quant.packed import GGUFWeight
from ferrum_jax.quant.qweight import QuantWeight
from models.common import (Array, Attention, AttnSpec, DecoderConfig, HFConfig, Mlp, attention_shapes,
                           attention_weights, final_logits, mlp_shapes, mlp_weights, self_attention)
from models.llama import _layer_windows

ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM")

# Per-expert tensor names under the layer prefix: (block, gate, up, down).
_NAMES = {"qwen": ("mlp.", "gate_proj", "up_proj", "down_proj"), "mixtral": ("block_sparse_moe.", "w1", "w3", "w2")}


@dataclasses.dataclass(frozen=True)
class Config(DecoderConfig):
    num_experts: int = 0
    top_k: int = 1
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    sparse: tuple[bool, ...] = ()  # per layer: a MoE block (else a dense MLP of intermediate_size)
    naming: str = "qwen"  # key of _NAMES
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    # The device mesh the expert stacks are split over (set by ferrum_jax.sharding.sharded_config):
    # the experts then run in a shard_map with a psum over "expert" / "model". None: one device.
    mesh: Any = None

    @staticmethod
    def from_hf(d: Mapping[str, Any], where: str = "config.json") -> Config:
        c = HFConfig(d, where)
        arch = (d.get("architectures") or ["Qwen3MoeForCausalLM"])[0]
        mixtral = arch.startswith("Mixtral")
        num_layers = c.positive("num_hidden_layers")
        heads, kv_heads, head_dim = c.heads()
        num_experts = c.get("num_experts", c.get("num_local_experts"))  # transformers 5 writes the latter
        if num_experts is None or int(num_experts) <= 0:
            raise ConfigError(f"{where}: num_experts / num_local_experts must be a positive number of experts")
        num_experts, top_k = int(num_experts), c.positive("num_experts_per_tok")
        if top_k > num_experts:
            raise ConfigError(f"{where}: num_experts_per_tok={top_k} exceeds the {num_experts} experts")
        if mixtral:
            sparse = (True,) * num_layers
            window = c.get("sliding_window")
            windows = (int(window) if window else None,) * num_layers
            moe_size = c.positive("intermediate_size")
            norm_topk, qkv_bias, o_bias = True, False, False
        else:
            step = int(c.get("decoder_sparse_step", 1))
            if step <= 0:
                raise ConfigError(f"{where}: field 'decoder_sparse_step' must be positive, got {step}")
            dense_only = set(c.get("mlp_only_layers", []))
            sparse = tuple(i not in dense_only and (i + 1) % step == 0 for i in range(num_layers))
            windows = _layer_windows(c, arch, num_layers)
            moe_size = c.positive("moe_intermediate_size")
            norm_topk = bool(c.get("norm_topk_prob", False))
            if arch.startswith("Qwen2"):
                qkv_bias, o_bias = bool(c.get("qkv_bias", True)), False
            else:
                qkv_bias = o_bias = bool(c.get("attention_bias", False))
        shared = int(c.get("shared_expert_intermediate_size", 0)) if arch.startswith("Qwen2") else 0
        eps = float(c.get("rms_norm_eps", 1e-6))
        rope = c.rope(head_dim)
        attn = tuple(AttnSpec(heads, kv_heads, head_dim, scale=head_dim ** -0.5, rope=rope, window=w, norm_eps=eps)
                     for w in windows)
        return Config(
            architecture=arch, vocab_size=c.positive("vocab_size"), hidden_size=c.positive("hidden_size"),
            intermediate_size=int(c.get("intermediate_size", moe_size)), num_layers=num_layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=eps,
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)), attn=attn,
            num_experts=num_experts, top_k=top_k, moe_intermediate_size=moe_size, norm_topk_prob=norm_topk,
            shared_expert_intermediate_size=shared, sparse=sparse, naming="mixtral" if mixtral else "qwen",
            hidden_act=str(c.get("hidden_act", "silu")), qkv_bias=qkv_bias, o_bias=o_bias,
            qk_norm=arch.startswith("Qwen3"), tie_word_embeddings=bool(c.get("tie_word_embeddings", False)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Moe:
    router: Array  # [experts, hidden]
    # Stacks: dense arrays, or packed GGUFWeight / QuantWeight stacks with a leading expert axis.
    gate: Array  # [experts, moe_intermediate, hidden]
    up: Array | None  # same; None when fused into gate ([gate_e; up_e] rows per expert)
    down: Array  # [experts, hidden, moe_intermediate]
    shared: Mlp | None = None  # Qwen2-MoE's shared expert, on every token
    shared_gate: Array | None = None  # [1, hidden]: sigmoid gate of the shared expert's output


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layer:
    attn_norm: jax.Array
    attn: Attention
    mlp_norm: jax.Array
    mlp: Mlp | Moe


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    embed: Any
    layers: tuple[Layer, ...]
    norm: jax.Array
    lm_head: Any  # the embedding table itself when tied


def _expert_names(cfg: Config, p: str, e: int) -> tuple[str, str, str]:
    block, gate, up, down = _NAMES[cfg.naming]
    x = f"{p}{block}experts.{e}."
    return x + gate + ".weight", x + up + ".weight", x + down + ".weight"


def stack_names(cfg: Config, p: str) -> tuple[str, str, str]:
    """Names of one layer's stacked expert tensors (gate, up, down): the per-expert names without the
    expert index, e.g. `model.layers.0.mlp.experts.gate_proj.weight` (gguf's name map knows them)."""
    block, gate, up, down = _NAMES[cfg.naming]
    x = f"{p}{block}experts."
    return x + gate + ".weight", x + up + ".weight", x + down + ".weight"


def moe_shapes(p: str, cfg: Config, *, stacked: bool = False) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of one layer's MoE block: per expert, as HF checkpoints store them,
    or (`stacked`) one [experts, out, in] tensor per projection, as GGUF files do."""
    h, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    shapes = {p + _NAMES[cfg.naming][0] + "gate.weight": (e, h)}
    if stacked:
        gate, up, down = stack_names(cfg, p)
        shapes |= {gate: (e, f, h), up: (e, f, h), down: (e, h, f)}
    else:
        for i in range(e):
            gate, up, down = _expert_names(cfg, p, i)
            shapes |= {gate: (f, h), up: (f, h), down: (h, f)}
    if cfg.shared_expert_intermediate_size:
        s, fs = p + "mlp.shared_expert.", cfg.shared_expert_intermediate_size
        shapes |= {s + "gate_proj.weight": (fs, h), s + "up_proj.weight": (fs, h), s + "down_proj.weight": (h, fs),
                   p + "mlp.shared_expert_gate.weight": (1, h)}
    return shapes


def tensor_shapes(cfg: Config, *, stacked: bool = False) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape that this config implies (the loader checks the checkpoint against it).
    `stacked`: the experts of each MoE layer as three [experts, out, in] tensors (`stack_names`)."""
    h = cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= attention_shapes(p, cfg, qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, qk_norm=cfg.qk_norm)
        shapes |= moe_shapes(p, cfg, stacked=stacked) if cfg.sparse[i] else mlp_shapes(p, cfg)
    return shapes


def _stack(t: Mapping[str, Any], names: list[str]) -> Any:
    """One projection's per-expert tensors as an [experts, out, in] stack: dense arrays stacked, packed
    GGUF tensors of one ggml type stacked block for block (a `GGUFWeight` with a leading expert axis),
    GPTQ / AWQ experts (`QuantWeight`s of one format) stacked leaf for leaf (a `QuantWeight` stack)."""
    ws = [t[n] for n in names]
    if all(isinstance(w, jax.Array) for w in ws):
        return jnp.stack(ws)
    if all(isinstance(w, QuantWeight) for w in ws):
        first = ws[0]
        for name, w in zip(names, ws):
            if w.fmt != first.fmt or w.shape != first.shape or (w.perm is None) != (first.perm is None):
                raise CheckpointError(f"{name!r} is {w.fmt.name} {w.shape} but {names[0]!r} is {first.fmt.name} "
                                      f"{first.shape}; the experts of one projection must share one quantization")
        return QuantWeight.stack(ws)
    if all(isinstance(w, GGUFWeight) for w in ws):
        types = {w.ggml_type for w in ws}
        if len(types) > 1:
            raise CheckpointError(f"{names[0]} .. {names[-1]}: the experts of one projection have different ggml "
                                  f"types ({', '.join(sorted(types))}); one type per stack is supported")
        first = ws[0]
        return GGUFWeight(jnp.stack([w.data for w in ws]), first.ggml_type, (len(ws), *first.shape),
                          first.compute_dtype)
    odd = next((n for n, w in zip(names, ws) if type(w) is not type(ws[0])), names[0])
    raise CheckpointError(f"{odd!r} is a {type(t[odd]).__name__} but {names[0]!r} is a {type(ws[0]).__name__}: "
                          "one projection's experts must all be dense, all GGUF or all GPTQ / AWQ")


def moe_weights(cfg: Config, t: Mapping[str, Any], p: str) -> Moe:
    """The layer's MoE block. Stacked tensors (`stack_names`, from GGUF files: dense arrays or packed
    `GGUFWeight`s [experts, out, in]) are taken as they are; per-expert tensors (HF checkpoints) are
    stacked (each layer's copies are dropped with `t` once the weights are built)."""
    stacked = stack_names(cfg, p)
    if stacked[0] in t:
        gate, up, down = (t[n] for n in stacked)
    else:
        names = [_expert_names(cfg, p, e) for e in range(cfg.num_experts)]
        gate, up, down = (_stack(t, [n[j] for n in names]) for j in range(3))
    shared = shared_gate = None
    if cfg.shared_expert_intermediate_size:
        s = p + "mlp.shared_expert."
        shared = Mlp(gate=t[s + "gate_proj.weight"], up=t[s + "up_proj.weight"], down=t[s + "down_proj.weight"])
        shared_gate = t[p + "mlp.shared_expert_gate.weight"]
    return Moe(router=t[p + _NAMES[cfg.naming][0] + "gate.weight"], gate=gate, up=up, down=down, shared=shared,
               shared_gate=shared_gate)


def build_weights(cfg: Config, t: Mapping[str, Any]) -> Weights:
    def layer(i: int) -> Layer:
        p = f"model.layers.{i}."
        return Layer(attn_norm=t[p + "input_layernorm.weight"], attn=attention_weights(t, p),
                     mlp_norm=t[p + "post_attention_layernorm.weight"],
                     mlp=moe_weights(cfg, t, p) if cfg.sparse[i] else mlp_weights(t, p))

    embed = t["model.embed_tokens.weight"]
    return Weights(embed=embed, layers=tuple(layer(i) for i in range(cfg.num_layers)), norm=t["model.norm.weight"],
                   lm_head=embed if cfg.tie_word_embeddings else t["lm_head.weight"])


def moe_block(m: Moe, x: jax.Array, cfg: Config, ops: Ops) -> jax.Array:
    if cfg.mesh is None:
        out = ops.moe(x, m.router, m.gate, m.up, m.down, cfg.hidden_act, top_k=cfg.top_k,
                      norm_topk_prob=cfg.norm_topk_prob)
    else:  # routing replicated, each device runs its experts (and F slice), psum (ferrum_jax.sharding)
        from ferrum_jax.sharding import moe_experts_sharded

        weights, ids = ops.moe_route(x, m.router, top_k=cfg.top_k, norm_topk_prob=cfg.norm_topk_prob)
        out = moe_experts_sharded(cfg.mesh, ops, x, ids, weights, m.gate, m.up, m.down, cfg.hidden_act)
    if m.shared is not None:
        shared = ops.gated_mlp(x, m.shared.gate, m.shared.up, m.shared.down, cfg.hidden_act)
        out = out + jax.nn.sigmoid(ops.linear(x, m.shared_gate)) * shared
    return out


def forward(w: Weights, tokens: jax.Array, positions: jax.Array, cache: KVCache, cfg: Config, ops: Ops,
            kv_len: int | None = None, logits_at: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """tokens, positions [batch, T] -> float32 logits [batch, T or 1, vocab] and the updated cache."""
    eps = cfg.rms_norm_eps
    x = ops.embed(tokens, w.embed)
    # Residual adds fused with the norm after them, as in models.llama.forward.
    m = None
    for i, layer in enumerate(w.layers):
        x, a, cache = self_attention(layer.attn, x, m, layer.attn_norm, positions, cache, i, cfg.attn[i], ops,
                                     kv_len, eps=eps)
        x, h = ops.add_rms_norm(x, a, layer.mlp_norm, eps=eps)
        if isinstance(layer.mlp, Moe):
            m = moe_block(layer.mlp, h, cfg, ops)
        else:
            m = ops.gated_mlp(h, layer.mlp.gate, layer.mlp.up, layer.mlp.down, cfg.hidden_act)
    x = x + m
    return final_logits(x, w.norm, w.lm_head, logits_at, eps=eps, ops=ops), cache
