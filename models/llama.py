"""The Llama family: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3 (one block, a few switches).

    h   = x + o( attn( rope(q_norm?(q(n1(x)))), rope(k_norm?(k(n1(x)))), v(n1(x)) ) )
    out = h + down( silu(gate(n2(h))) * up(n2(h)) )

Switches: qkv bias (Qwen2), per-head q/k RMSNorm (Qwen3), sliding windows per layer (Mistral,
Qwen2 layer_types), Llama-3 / linear / YaRN rope scaling, tied embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from ferrum_jax.backend import Ops
from ferrum_jax.cache import KVCache
from ferrum_jax.errors import ConfigError
from models.common import (Attention, AttnSpec, DecoderConfig, HFConfig, Mlp, attention_shapes, attention_weights,
                           final_logits, mlp_shapes, mlp_weights, self_attention)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclasses.dataclass(frozen=True)
class Config(DecoderConfig):
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False

    @staticmethod
    def from_hf(d: Mapping[str, Any], where: str = "config.json") -> Config:
        c = HFConfig(d, where)
        arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
        num_layers = c.positive("num_hidden_layers")
        heads, kv_heads, head_dim = c.heads()
        if c.get("mlp_bias", False):
            raise ConfigError(f"{where}: mlp_bias=true is not supported")
        qwen2, qwen3 = arch.startswith("Qwen2"), arch.startswith("Qwen3")
        bias = bool(c.get("attention_bias", False))
        windows = _layer_windows(c, arch, num_layers)
        eps = float(c.get("rms_norm_eps", 1e-6))
        rope = c.rope(head_dim)
        attn = tuple(AttnSpec(heads, kv_heads, head_dim, scale=head_dim ** -0.5, rope=rope, window=w, norm_eps=eps)
                     for w in windows)
        return Config(
            architecture=arch, vocab_size=c.positive("vocab_size"), hidden_size=c.positive("hidden_size"),
            intermediate_size=c.positive("intermediate_size"), num_layers=num_layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=eps,
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)), attn=attn,
            hidden_act=str(c.get("hidden_act", "silu")), qkv_bias=bias or qwen2, o_bias=bias,
            qk_norm=qwen3, tie_word_embeddings=bool(c.get("tie_word_embeddings", False)))


def _layer_windows(c: HFConfig, arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = c.get("sliding_window")
    if arch.startswith("Mistral"):
        return (window,) * num_layers
    if "layer_types" in c.d:
        types = c.layer_types(num_layers)
    elif c.get("use_sliding_window", False):  # transformers 4's Qwen2: layers from max_window_layers on
        first = int(c.get("max_window_layers", num_layers))
        types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))
    else:
        types = ("full_attention",) * num_layers
    if "sliding_attention" in types and not window:
        raise ConfigError(f"{c.where}: layer_types has sliding_attention but sliding_window is not set")
    return tuple(window if t == "sliding_attention" else None for t in types)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layer:
    attn_norm: jax.Array
    attn: Attention
    mlp_norm: jax.Array
    mlp: Mlp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    embed: Any
    layers: tuple[Layer, ...]
    norm: jax.Array
    lm_head: Any  # the embedding table itself when tied


def tensor_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape that this config implies (the loader checks the checkpoint against it)."""
    h = cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= attention_shapes(p, cfg, qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, qk_norm=cfg.qk_norm)
        shapes |= mlp_shapes(p, cfg)
    return shapes


def build_weights(cfg: Config, t: Mapping[str, Any]) -> Weights:
    def layer(p: str) -> Layer:
        return Layer(attn_norm=t[p + "input_layernorm.weight"], attn=attention_weights(t, p),
                     mlp_norm=t[p + "post_attention_layernorm.weight"], mlp=mlp_weights(t, p))

    embed = t["model.embed_tokens.weight"]
    return Weights(embed=embed, layers=tuple(layer(f"model.layers.{i}.") for i in range(cfg.num_layers)),
                   norm=t["model.norm.weight"], lm_head=embed if cfg.tie_word_embeddings else t["lm_head.weight"])


def forward(w: Weights, tokens: jax.Array, positions: jax.Array, cache: KVCache, cfg: Config, ops: Ops,
            kv_len: int | None = None, logits_at: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """tokens, positions [batch, T] -> float32 logits [batch, T or 1, vocab] and the updated cache."""
    eps = cfg.rms_norm_eps
    x = ops.embed(tokens, w.embed)
    # Every residual add is fused with the norm after it: the MLP's with the next layer's attention
    # norm and qkv projection (`add_rms_norm_linear`, inside self_attention), the attention's with
    # the MLP norm (`add_rms_norm`); the last one stays apart, because final_logits norms only the
    # positions it projects.
    m = None
    for i, layer in enumerate(w.layers):
        x, a, cache = self_attention(layer.attn, x, m, layer.attn_norm, positions, cache, i, cfg.attn[i], ops,
                                     kv_len, eps=eps)
        x, h = ops.add_rms_norm(x, a, layer.mlp_norm, eps=eps)
        m = ops.gated_mlp(h, layer.mlp.gate, layer.mlp.up, layer.mlp.down, cfg.hidden_act)
    x = x + m
    return final_logits(x, w.norm, w.lm_head, logits_at, eps=eps, ops=ops), cache
