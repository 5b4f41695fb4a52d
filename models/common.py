"""Pieces every decoder family shares: the attention sub-layer, the gated MLP weights, and the
helpers that read an HF config.json. Built only from ferrum_jax ops; no platform branches here."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ferrum_jax.backend import Ops
from ferrum_jax.cache import KVCache
from ferrum_jax.errors import ConfigError
from ferrum_jax.ops import QKPrologue
from ferrum_jax.quant.qweight import QuantWeight
from ferrum_jax.rope import Rope

Array = Any  # a dense jax.Array or a packed quantized weight pytree


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Attention:
    wq: Array | None  # None once fused into wqkv
    wk: Array | None
    wv: Array | None
    wo: Array
    bq: Array | None = None
    bk: Array | None = None
    bv: Array | None = None
    bo: Array | None = None
    q_norm: Array | None = None  # per-head RMSNorm of queries and keys (Qwen3, Gemma 3)
    k_norm: Array | None = None
    wqkv: Array | None = None  # [q; k; v] stacked along out_features: one matmul instead of three
    bqkv: Array | None = None
    # Tensor parallel: wqkv/bqkv rows are [q_0; k_0; v_0; q_1; k_1; v_1; ...], one group per shard of
    # the "model" mesh axis, so a plain row split gives each device its own heads (ferrum_jax.sharding).
    shards: int = dataclasses.field(default=1, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mlp:
    gate: Array  # [gate; up] stacked along out_features once fused (then `up` is None)
    up: Array | None
    down: Array


# Packed expert stacks fuse gate/up up to this many rows a projection (Qwen3-30B-A3B's 768: faster
# fused; Mixtral's 14336: slower; see fuse_projections).
PACKED_EXPERTS_FUSE_MAX_F = 4096


def fuse_projections(weights: Any, *, free_inputs: bool = False) -> Any:
    """Stack q/k/v (and their biases) and gate/up into single weights, once at load time, so a
    decode step runs one larger matmul instead of several small ones (fewer kernels, better memory
    streaming). Dense weights of one dtype, or quantized weights of one format (`QuantWeight`), are
    fused; mixed ones (a Q4_K_M file stores some v/down projections as Q6_K) stay apart.

    A MoE block's gate and up expert stacks [E, F, H] become one [E, 2F, H] stack, [gate_e; up_e]
    rows per expert (`models.moe.Moe`; every MoE kernel and the reference take it): dense stacks
    always, packed `QuantWeight` stacks of one format where F <= PACKED_EXPERTS_FUSE_MAX_F. By
    measurement, H200, batch-1 decode in the model (bench/results/moe_fused_stacks_*): bf16
    Mixtral-8x7B -10% a step (its gate_up kernel 115 us vs 140 on separate stacks), bf16
    Qwen3-30B-A3B unchanged; Q4_K Qwen3-30B-A3B (F = 768) -3.5%, Q4_K Mixtral (F = 14336) +1.5%.

    free_inputs: delete each fused weight's inputs once it is built, for a caller that owns them
    (a loader): loading then peaks at the weights plus one fused projection, not plus all of them
    (Mixtral-8x7B in bf16: 93 GB, +60 GB of gate/up stacks otherwise)."""
    from models.moe import Moe  # models.moe builds on this module

    def release(ws, out) -> Any:
        leaves = jax.tree_util.tree_leaves(list(ws))
        if out is not None and free_inputs and not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):  # (eval_shape traces)
            jax.block_until_ready(out)
            for leaf in leaves:
                leaf.delete()
        return out

    def stack(ws, axis: int = 0) -> Any:
        if all(isinstance(a, jax.Array) for a in ws) and len({a.dtype for a in ws}) == 1:
            return release(ws, jnp.concatenate(ws, axis=axis))
        if all(isinstance(a, QuantWeight) for a in ws):
            return release(ws, QuantWeight.concat(list(ws)))
        return None

    def fusable(*ws) -> bool:
        if all(isinstance(a, jax.Array) for a in ws):
            return len({a.dtype for a in ws}) == 1
        return all(isinstance(a, QuantWeight) for a in ws) and QuantWeight.can_concat(list(ws))

    def fuse(node: Any) -> Any:
        if isinstance(node, Attention) and node.wqkv is None and fusable(node.wq, node.wk, node.wv):
            biases = (node.bq, node.bk, node.bv)
            bqkv = jnp.concatenate(biases) if all(b is not None for b in biases) else None
            if bqkv is None and any(b is not None for b in biases):
                return node
            return dataclasses.replace(node, wq=None, wk=None, wv=None, bq=None, bk=None, bv=None,
                                       wqkv=stack([node.wq, node.wk, node.wv]), bqkv=bqkv)
        if isinstance(node, Mlp) and node.up is not None and fusable(node.gate, node.up):
            return Mlp(gate=stack([node.gate, node.up]), up=None, down=node.down)
        if isinstance(node, Moe):
            if node.shared is not None:
                node = dataclasses.replace(node, shared=fuse(node.shared))
            dense = all(isinstance(w, jax.Array) for w in (node.gate, node.up))
            packed = all(isinstance(w, QuantWeight) for w in (node.gate, node.up))
            if dense and node.gate.dtype == node.up.dtype and node.gate.shape == node.up.shape:
                node = dataclasses.replace(node, gate=stack([node.gate, node.up], axis=1), up=None)
            elif packed and node.gate.ndim == 3 and node.gate.shape[1] <= PACKED_EXPERTS_FUSE_MAX_F:
                fused = QuantWeight.concat_experts(node.gate, node.up)
                if fused is not None:
                    node = dataclasses.replace(node, gate=release([node.gate, node.up], fused), up=None)
        return node

    return jax.tree_util.tree_map(fuse, weights, is_leaf=lambda n: isinstance(n, (Attention, Mlp, Moe)))


@dataclasses.dataclass(frozen=True)
class AttnSpec:
    """The static shape of one layer's attention."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    rope: Rope
    window: int | None = None  # sliding window: a key is visible when query_pos - key_pos < window
    softcap: float | None = None
    norm_eps: float = 1e-6  # q/k norm
    norm_offset: float = 0.0


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The fields every family's Config has (what the cache, the loaders and generate read)."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    attn: tuple[AttnSpec, ...]  # one per layer


def attention_shapes(p: str, cfg: DecoderConfig, *, qkv_bias: bool = False, o_bias: bool = False,
                     qk_norm: bool = False) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of one layer's attention (`p` = "model.layers.{i}.")."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    a = p + "self_attn."
    shapes = {a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h),
              a + "o_proj.weight": (h, q)}
    if qkv_bias:
        shapes |= {a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)}
    if o_bias:
        shapes[a + "o_proj.bias"] = (h,)
    if qk_norm:
        shapes |= {a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)}
    return shapes


def mlp_shapes(p: str, cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    h, f = cfg.hidden_size, cfg.intermediate_size
    return {p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}


def attention_weights(t: Mapping[str, Any], p: str) -> Attention:
    """One layer's Attention from HF-named tensors; the optional ones (biases, q/k norms) may be absent."""
    a = p + "self_attn."
    return Attention(wq=t[a + "q_proj.weight"], wk=t[a + "k_proj.weight"], wv=t[a + "v_proj.weight"],
                     wo=t[a + "o_proj.weight"], bq=t.get(a + "q_proj.bias"), bk=t.get(a + "k_proj.bias"),
                     bv=t.get(a + "v_proj.bias"), bo=t.get(a + "o_proj.bias"), q_norm=t.get(a + "q_norm.weight"),
                     k_norm=t.get(a + "k_norm.weight"))


def mlp_weights(t: Mapping[str, Any], p: str) -> Mlp:
    return Mlp(gate=t[p + "mlp.gate_proj.weight"], up=t[p + "mlp.up_proj.weight"], down=t[p + "mlp.down_proj.weight"])


def self_attention(p: Attention, x: jax.Array, residual: jax.Array | None, norm: jax.Array, positions: jax.Array,
                   cache: KVCache, layer: int, spec: AttnSpec, ops: Ops, kv_len: int | None, *, eps: float,
                   norm_offset: float = 0.0) -> tuple[jax.Array, jax.Array, KVCache]:
    """The attention sub-layer from the residual stream: s = x + residual (x when residual is None,
    the add still pending from the layer before), its RMS norm (`norm`), then project, (q/k-norm),
    rotate, store K/V in the cache at `positions`, attend over the first `kv_len` cache slots (all
    of them when None), project out -> (s, attention output, cache). With the projections fused,
    the add, the norm and the qkv projection are one op (`add_rms_norm_linear`: one kernel at
    decode on GPU)."""
    b, t, _ = x.shape
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    h, kvh, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if p.wqkv is not None:
        s, qkv = ops.add_rms_norm_linear(x, residual, norm, p.wqkv, p.bqkv, eps=eps, offset=norm_offset)
        if p.shards == 1:
            # split along heads: the decode kernel's operand concatenates them back along the same
            # axis, which XLA folds into the projection's output (no copy)
            qkv = qkv.reshape(b, t, h + 2 * kvh, d)
            q, k, v = qkv[:, :, :h], qkv[:, :, h:h + kvh], qkv[:, :, h + kvh:]
        else:  # split each shard's [q_i; k_i; v_i] group
            qkv = qkv.reshape(b, t, p.shards, -1)
            qs, ks = q_size // p.shards, kv_size // p.shards
            q, k, v = qkv[..., :qs], qkv[..., qs:qs + ks], qkv[..., qs + ks:]
    else:
        if residual is None:
            s, normed = x, ops.rms_norm(x, norm, eps=eps, offset=norm_offset)
        else:
            s, normed = ops.add_rms_norm(x, residual, norm, eps=eps, offset=norm_offset)
        q, k, v = ops.linear(normed, p.wq, p.bq), ops.linear(normed, p.wk, p.bk), ops.linear(normed, p.wv, p.bv)
    q, k, v = q.reshape(b, t, h, d), k.reshape(b, t, kvh, d), v.reshape(b, t, kvh, d)
    # q/k norm and rope go with q, k to the cache: a decode step does them inside its attention kernel.
    prologue = QKPrologue(spec.rope, p.q_norm, p.k_norm, eps=spec.norm_eps, offset=spec.norm_offset)
    out, cache = cache.write_attend(layer, q, k, v, positions, ops=ops, scale=spec.scale, window=spec.window,
                                    softcap=spec.softcap, kv_len=kv_len, prologue=prologue)
    return s, ops.linear(out.reshape(b, t, -1), p.wo, p.bo), cache


def final_logits(x: jax.Array, norm: Array, lm_head: Array, logits_at: jax.Array | None, *, eps: float,
                 ops: Ops, norm_offset: float = 0.0, softcap: float | None = None) -> jax.Array:
    """Final norm and vocabulary projection, in float32. With `logits_at` [batch] only that position
    of each row is projected (the next-token logits of prefill), saving a [T, vocab] matmul."""
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)
    x = ops.rms_norm(x, norm, eps=eps, offset=norm_offset)
    logits = ops.linear(x, lm_head).astype(jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


class HFConfig:
    """Typed access to an HF config.json with errors that name the file and field."""

    def __init__(self, d: Mapping[str, Any], where: str):
        self.d, self.where = d, where

    def get(self, key: str, default: Any = None) -> Any:
        value = self.d.get(key)
        return default if value is None else value

    def req(self, key: str, kind: type = int) -> Any:
        if self.d.get(key) is None:
            raise ConfigError(f"{self.where}: required field {key!r} is missing")
        try:
            return kind(self.d[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{self.where}: field {key!r} = {self.d[key]!r} is not a valid {kind.__name__}")

    def positive(self, key: str) -> int:
        value = self.req(key)
        if value <= 0:
            raise ConfigError(f"{self.where}: field {key!r} must be positive, got {value}")
        return value

    def heads(self) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, head_dim), checked for GQA divisibility."""
        hidden, heads = self.positive("hidden_size"), self.positive("num_attention_heads")
        kv_heads = int(self.get("num_key_value_heads", heads))
        if kv_heads <= 0 or heads % kv_heads:
            raise ConfigError(f"{self.where}: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
        head_dim = self.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{self.where}: hidden_size={hidden} is not divisible by "
                                  f"num_attention_heads={heads} and head_dim is not given")
            head_dim = hidden // heads
        return heads, kv_heads, int(head_dim)

    def rope(self, head_dim: int, layer_type: str | None = None, theta_key: str = "rope_theta",
             default_theta: float = 10000.0) -> Rope:
        """Rope from transformers 5's `rope_parameters` (per layer type for Gemma 3) or 4's
        `rope_theta` + `rope_scaling`."""
        params = self.d.get("rope_parameters")
        if isinstance(params, Mapping) and layer_type is not None and layer_type in params:
            params = params[layer_type]
        if params is None:
            params = self.d.get("rope_scaling")
        theta = float(self.get(theta_key, default_theta))
        dim = int(head_dim * float(self.get("partial_rotary_factor", 1.0)))
        return Rope.from_hf(params, theta=theta, dim=dim, where=self.where,
                            max_positions=int(self.get("max_position_embeddings", 2048)))

    def layer_types(self, num_layers: int) -> tuple[str, ...]:
        types = self.d.get("layer_types")
        if types is None:
            return ("full_attention",) * num_layers
        if len(types) != num_layers:
            raise ConfigError(f"{self.where}: layer_types has {len(types)} entries for "
                              f"num_hidden_layers={num_layers}")
        unknown = set(types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ConfigError(f"{self.where}: unsupported layer_types {sorted(unknown)}")
        return tuple(types)
