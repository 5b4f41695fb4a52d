"""Named model shapes with random weights, for benchmarks: the configs of real models (as their
HF config.json has them) and a weights pytree of that shape drawn on device."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

import models
from models.common import fuse_projections
from ferrum_jax.errors import ConfigError

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_parameters=_LLAMA3_ROPE),
    "llama-3.1-70b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=8192,
                          intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
                          rope_parameters=_LLAMA3_ROPE),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "gemma-3-27b": dict(architectures=["Gemma3ForCausalLM"], vocab_size=262208, hidden_size=5376,
                        intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                        num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
                        rms_norm_eps=1e-6, max_position_embeddings=131072, sliding_window_pattern=6,
                        rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "llama-tiny": dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096),
    # Mixture of experts: 128 experts, 8 per token, every layer sparse (HF config of Qwen/Qwen3-30B-A3B).
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                          hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          hidden_act="silu", attention_bias=False, rms_norm_eps=1e-6, rope_theta=1000000.0,
                          rope_scaling=None, max_position_embeddings=40960, use_sliding_window=False,
                          sliding_window=None, max_window_layers=48, tie_word_embeddings=False),
    # Mixture of experts with wide experts: 8 experts, 2 per token (HF config of mistralai/Mixtral-8x7B-v0.1).
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000,
                         hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                         rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768, sliding_window=None,
                         tie_word_embeddings=False),
    # For CPU tests: 8 experts, top 2; layer 0 has a dense MLP (mlp_only_layers), layers 1 and 2 are MoE.
    "qwen3-moe-tiny": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=512,
                           hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                           num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0],
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=4096,
                           tie_word_embeddings=False),
}


def shape_config(name: str) -> Any:
    if name not in SHAPES:
        raise ConfigError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return models.config_from_hf(SHAPES[name], where=f"shape {name}")


def tensor_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of `cfg`'s weights, the experts of a MoE layer as [experts, out, in]
    stacks (one tensor per projection) where the family can build its weights from stacks
    (`tensor_shapes(cfg, stacked=True)`, models/moe.py), else as the family names them."""
    fn = models.family_of(cfg).tensor_shapes
    if "stacked" in inspect.signature(fn).parameters:
        return fn(cfg, stacked=True)
    return fn(cfg)


@partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """N(0, 0.02) in `dtype`, fused (no float32 copy of a large tensor is kept)."""
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_weights(cfg: Any, dtype: jnp.dtype = jnp.bfloat16, seed: int = 0) -> Any:
    """Weights of `cfg`'s shape, N(0, 0.02) (norms 1), drawn on the default device one tensor at a
    time (so a 16 GB model never needs a host copy). MoE expert weights are drawn as whole
    [experts, out, in] stacks (one draw per stack: no per-expert tensors, no concatenated copy)."""
    family = models.family_of(cfg)
    key = jax.random.PRNGKey(seed)
    dtype = jnp.dtype(dtype)
    tensors = {}
    for i, (name, shape) in enumerate(tensor_shapes(cfg).items()):
        if "norm" in name:
            tensors[name] = jnp.ones(shape, dtype)
        else:
            tensors[name] = _normal(jax.random.fold_in(key, i), tuple(int(s) for s in shape), dtype)
    return fuse_projections(family.build_weights(cfg, tensors), free_inputs=True)  # as `load` does
