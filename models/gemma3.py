"""Gemma 3 (text): sandwich norms around attention and MLP, per-head q/k norms, GeGLU,
alternating local (sliding-window, own rope base) and global layers.

    x0  = embed(tokens) * sqrt(hidden)
    h   = x + post_attn_norm( o( attn_l(rope_l(q_norm(q(n1(x)))), rope_l(k_norm(k(n1(x)))), v(n1(x))) ) )
    out = h + post_ffw_norm( down( gelu_tanh(gate(n2(h))) * up(n2(h)) ) )

Every RMSNorm scales by (1 + w); attention scale is query_pre_attn_scalar^-1/2; optional logit
soft-capping of attention scores and of the final logits; embeddings are tied.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ferrum_jax.backend import Ops
from ferrum_jax.cache import KVCache
from ferrum_jax.rope import Rope
from models.common import (Attention, AttnSpec, DecoderConfig, HFConfig, Mlp, attention_shapes, attention_weights,
                           final_logits, mlp_shapes, mlp_weights, self_attention)

ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")


@dataclasses.dataclass(frozen=True)
class Config(DecoderConfig):
    hidden_act: str = "gelu_pytorch_tanh"
    final_logit_softcap: float | None = None
    tie_word_embeddings: bool = True
    prefix: str = "model."  # "language_model.model." in the multimodal checkpoints

    @staticmethod
    def from_hf(d: Mapping[str, Any], where: str = "config.json") -> Config:
        arch = (d.get("architectures") or ["Gemma3ForCausalLM"])[0]
        prefix = "model."
        if arch == "Gemma3ForConditionalGeneration":  # text tower of the multimodal checkpoints
            d, where, prefix = d.get("text_config") or {}, where + ": text_config", "language_model.model."
        c = HFConfig(d, where)
        num_layers = c.positive("num_hidden_layers")
        heads, kv_heads, head_dim = c.heads()
        if "layer_types" in d:
            types = c.layer_types(num_layers)
        else:  # transformers 4: every `sliding_window_pattern`-th layer is global
            pattern = int(c.get("sliding_window_pattern", 6))
            types = tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                          for i in range(num_layers))
        eps = float(c.get("rms_norm_eps", 1e-6))
        scale = float(c.get("query_pre_attn_scalar", head_dim)) ** -0.5
        softcap = c.get("attn_logit_softcapping")
        window = int(c.get("sliding_window", 4096))
        ropes = {"full_attention": c.rope(head_dim, "full_attention", default_theta=1e6),
                 "sliding_attention": _local_rope(c, head_dim)}
        attn = tuple(AttnSpec(heads, kv_heads, head_dim, scale=scale, rope=ropes[t], softcap=softcap,
                              window=window if t == "sliding_attention" else None, norm_eps=eps,
                              norm_offset=1.0)
                     for t in types)
        return Config(
            architecture=arch, vocab_size=c.positive("vocab_size"), hidden_size=c.positive("hidden_size"),
            intermediate_size=c.positive("intermediate_size"), num_layers=num_layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=eps,
            max_position_embeddings=int(c.get("max_position_embeddings", 131072)), attn=attn,
            hidden_act=str(c.get("hidden_activation", c.get("hidden_act", "gelu_pytorch_tanh"))),
            final_logit_softcap=c.get("final_logit_softcapping"), prefix=prefix)


def _local_rope(c: HFConfig, head_dim: int) -> Rope:
    if isinstance(c.d.get("rope_parameters"), Mapping) and "sliding_attention" in c.d["rope_parameters"]:
        return c.rope(head_dim, "sliding_attention")
    return Rope(theta=float(c.get("rope_local_base_freq", 10000.0)), dim=head_dim)  # transformers 4


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layer:
    attn_norm: jax.Array
    attn: Attention
    post_attn_norm: jax.Array
    mlp_norm: jax.Array
    mlp: Mlp
    post_mlp_norm: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    embed: Any
    layers: tuple[Layer, ...]
    norm: jax.Array
    lm_head: Any


_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


def tensor_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    h = cfg.hidden_size
    shapes = {cfg.prefix + "embed_tokens.weight": (cfg.vocab_size, h), cfg.prefix + "norm.weight": (h,)}
    for i in range(cfg.num_layers):
        p = f"{cfg.prefix}layers.{i}."
        shapes |= {p + n + ".weight": (h,) for n in _LAYER_NORMS}
        shapes |= attention_shapes(p, cfg, qk_norm=True) | mlp_shapes(p, cfg)
    return shapes


def build_weights(cfg: Config, t: Mapping[str, Any]) -> Weights:
    def layer(p: str) -> Layer:
        return Layer(attn_norm=t[p + "input_layernorm.weight"], attn=attention_weights(t, p),
                     post_attn_norm=t[p + "post_attention_layernorm.weight"],
                     mlp_norm=t[p + "pre_feedforward_layernorm.weight"], mlp=mlp_weights(t, p),
                     post_mlp_norm=t[p + "post_feedforward_layernorm.weight"])

    embed = t[cfg.prefix + "embed_tokens.weight"]
    return Weights(embed=embed, layers=tuple(layer(f"{cfg.prefix}layers.{i}.") for i in range(cfg.num_layers)),
                   norm=t[cfg.prefix + "norm.weight"], lm_head=embed)


def forward(w: Weights, tokens: jax.Array, positions: jax.Array, cache: KVCache, cfg: Config, ops: Ops,
            kv_len: int | None = None, logits_at: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """tokens, positions [batch, T] -> float32 logits [batch, T or 1, vocab] and the updated cache."""
    eps = cfg.rms_norm_eps
    x = ops.embed(tokens, w.embed)
    x = x * jnp.asarray(math.sqrt(cfg.hidden_size), x.dtype)  # rounded to the weight dtype, as HF does
    # Residual adds fused with the norm after them, as in models.llama.forward.
    m = None
    for i, layer in enumerate(w.layers):
        x, a, cache = self_attention(layer.attn, x, m, layer.attn_norm, positions, cache, i, cfg.attn[i], ops,
                                     kv_len, eps=eps, norm_offset=1.0)
        a = ops.rms_norm(a, layer.post_attn_norm, eps=eps, offset=1.0)
        x, h = ops.add_rms_norm(x, a, layer.mlp_norm, eps=eps, offset=1.0)
        m = ops.gated_mlp(h, layer.mlp.gate, layer.mlp.up, layer.mlp.down, cfg.hidden_act)
        m = ops.rms_norm(m, layer.post_mlp_norm, eps=eps, offset=1.0)
    x = x + m
    return final_logits(x, w.norm, w.lm_head, logits_at, eps=eps, ops=ops, norm_offset=1.0,
                        softcap=cfg.final_logit_softcap), cache
