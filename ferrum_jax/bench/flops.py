"""FLOPs and bytes of the model's work (the roofline's numerator) and the device memory a sweep
point needs beyond the weights."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def _keys_seen(t: int, window: int | None) -> int:
    """Sum over query positions 0..t-1 of the keys each attends to (causal, optional window)."""
    if window is None or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


def attention_flops_prefill(cfg: Any, t: int) -> int:
    """QK^T and PV: 2 matmuls x 2 FLOPs per multiply-add, over the keys each query sees (causal:
    ~t^2/2; sliding-window layers: ~t * window)."""
    return sum(4 * s.num_heads * s.head_dim * _keys_seen(t, s.window) for s in cfg.attn)


def attention_flops_decode(cfg: Any, context: int) -> int:
    """Per token at position `context`: every layer attends to its visible keys."""
    return sum(4 * s.num_heads * s.head_dim * min(context + 1, s.window or context + 1) for s in cfg.attn)


def prefill_flops(cfg: Any, ws: dict[str, int], t: int) -> int:
    """2 * layer params * t (projections and MLP of every token; MoE: the top-k experts' parameters,
    `matmul_params_per_token`) + 2 * lm_head params (logits of the last position only) + causal
    attention FLOPs."""
    return 2 * ws["matmul_params_per_token"] * t + 2 * ws["lm_head_params"] + attention_flops_prefill(cfg, t)


def decode_flops_per_token(cfg: Any, ws: dict[str, int], context: int) -> int:
    """2 * (layer params + lm_head params) + attention over the visible keys; MoE: the layer params
    are the active ones (top-k experts of each token, `matmul_params_per_token`)."""
    return 2 * (ws["matmul_params_per_token"] + ws["lm_head_params"]) + attention_flops_decode(cfg, context)


def _kv_bytes_per_layer_token(cfg: Any, dtype: Any) -> int:
    return 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def kv_bytes_at_context(cfg: Any, batch: int, context: int, dtype: Any) -> int:
    """Bytes of the keys and values a step at position `context` needs (windowed layers: the window)."""
    per_layer_token = _kv_bytes_per_layer_token(cfg, dtype)
    return batch * sum(per_layer_token * min(context + 1, s.window or context + 1) for s in cfg.attn)


def decode_need(cfg: Any, batch: int, capacity: int, kv_dtype: Any) -> int:
    """Device bytes of a decode point: its whole KV cache, activations and state, and some slack."""
    kv_bytes = cfg.num_layers * _kv_bytes_per_layer_token(cfg, kv_dtype) * capacity * batch
    act = batch * (cfg.num_heads * capacity * 4 * 3 + cfg.vocab_size * 4 * 4
                   + max(cfg.intermediate_size, cfg.hidden_size) * 4 * 8)
    state = batch * (capacity * 4 + cfg.vocab_size)
    return kv_bytes + act + state + (64 << 20)


def prefill_need(cfg: Any, t: int, kv_dtype: Any) -> int:
    """Device bytes of a prefill of `t` tokens: its KV cache, scores, activations, and some slack."""
    kv_bytes = cfg.num_layers * _kv_bytes_per_layer_token(cfg, kv_dtype) * t
    scores = 3 * cfg.num_heads * t * t * 4  # the reference attention materialises f32 scores and probs
    act = t * (3 * cfg.intermediate_size + 4 * cfg.hidden_size + 3 * cfg.num_heads * cfg.head_dim) * 4 * 2
    return kv_bytes + scores + act + cfg.vocab_size * 4 * 4 + (64 << 20)
