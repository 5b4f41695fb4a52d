"""The XLA reference of the mixture-of-experts ops: routing and the expert MLPs.

Two ops, so that a routing kernel and a grouped-matmul kernel can register separately:

  moe_route(x [..., H], router [E, H]; top_k, norm_topk_prob)
      -> weights float32 [..., k], ids int32 [..., k]
      softmax over all E router logits (in float32), the top k of them, and with `norm_topk_prob`
      divided by their sum. Mixtral's "softmax over the top-k logits" is the same as softmax, top k,
      renormalise, so it is this op with norm_topk_prob=True.

  moe_experts(x [..., H], ids, weights, gate [E, F, H], up [E, F, H] | None, down [E, H, F], act;
              expert_offset=0) -> [..., H]
      sum over the k slots of weights * down_e( act(gate_e(x)) * up_e(x) ), e = ids. With `up`
      None, `gate` is the fused [E, 2F, H] stack ([gate_e; up_e] along the rows of each expert).
      Expert parallel: the stacks may hold only the experts expert_offset .. expert_offset + E - 1
      (an int or a traced scalar, e.g. from `lax.axis_index` inside shard_map); slots routed to
      other experts contribute zero, so summing the outputs over the expert shards (a psum) gives
      the full result.

Expert weights are stacked [experts, out_features, in_features]: each expert in the checkpoint's
own [out, in] layout. The ids and weights never leave the device; all shapes are static.

Two references of moe_experts: "xla" for dense stacks, and "xla_dequant" for packed stacks with a
leading expert axis: `GGUFWeight`s (GGUF files; any ggml type the block dequantizers know) and
`QuantWeight`s (the kernel layout: GGUF stacks repacked at load, GPTQ experts stacked at load),
mixed with each other and with dense stacks. The packed one never holds more than the experts it
reads in dense form:
decode gathers the selected experts' packed blocks and dequantizes only those; more rows run a scan
over the experts, dequantizing one expert per step and skipping experts no row was routed to.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ferrum_jax.backend import Impl, register
from ferrum_jax.quant.packed import GGUFWeight
from ferrum_jax.quant.qweight import QuantWeight

PACKED = (GGUFWeight, QuantWeight)  # stacks that stay packed on device and decode where they are used


def moe_route(x: jax.Array, router: jax.Array, *, top_k: int, norm_topk_prob: bool, ops) -> tuple[jax.Array, jax.Array]:
    logits = ops.linear(x, router).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def _local_slots(x: jax.Array, ids: jax.Array, weights: jax.Array, expert_offset, e: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows x [n, H] (float32 on the CPU: XLA's CPU runtime has no batched bf16 dot), each slot's
    expert index in these stacks [n, k] (clipped) and its weight [n, k] (0 for a slot routed to an
    expert outside [expert_offset, expert_offset + e): another shard's)."""
    if jax.default_backend() == "cpu" and x.dtype != jnp.float32:
        x = x.astype(jnp.float32)
    k = ids.shape[-1]
    xs = x.reshape(-1, x.shape[-1])
    n = xs.shape[0]
    local = ids.reshape(n, k) - expert_offset
    mine = (local >= 0) & (local < e)
    weights = jnp.where(mine, weights.reshape(n, k).astype(jnp.float32), 0.0)
    return xs, jnp.clip(local, 0, e - 1), weights


def moe_experts(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array | None,
                w_down: jax.Array, kind: str, *, expert_offset: int | jax.Array = 0, ops) -> jax.Array:
    """The reference picks one of two plain formulations by the (static) number of routed rows:

    - few rows (n * k < E, decode): gather each slot's expert weights and run them per row; only
      the selected experts' weights are read, which is what a memory-bound decode step needs.
    - otherwise: every expert on every row, combined with a dense [n, E] matrix of the routing
      weights (zero where a row did not pick that expert). E / k times the needed flops, but three
      plain einsums with nothing to sort. `jax.lax.ragged_dot` after sorting rows by expert would
      express the grouping, but on the CPU (and wherever XLA has no grouped kernel) it lowers to
      exactly this masked dense product over all experts, with a sort and an unsort on top; the
      grouped version is the Pallas kernel's job, and this is its oracle.
    """
    shape, out_dtype = x.shape, x.dtype
    e = w_gate.shape[0]
    xs, local, weights = _local_slots(x, ids, weights, expert_offset, e)
    n, k, dt = xs.shape[0], ids.shape[-1], xs.dtype

    def act_mul(g, u):
        return ops.activation(g, kind) * u

    if n * k < e:
        wg = jnp.take(w_gate, local, axis=0).astype(dt)  # [n, k, F or 2F, H]
        g = jnp.einsum("nh,nkfh->nkf", xs, wg, preferred_element_type=jnp.float32)
        if w_up is None:
            g, u = jnp.split(g, 2, axis=-1)
        else:
            u = jnp.einsum("nh,nkfh->nkf", xs, jnp.take(w_up, local, axis=0).astype(dt),
                           preferred_element_type=jnp.float32)
        a = act_mul(g, u).astype(dt)
        y = jnp.einsum("nkf,nkhf->nkh", a, jnp.take(w_down, local, axis=0).astype(dt),
                       preferred_element_type=jnp.float32)
        out = jnp.einsum("nkh,nk->nh", y, weights)
    else:
        combine = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], local].add(weights)
        g = jnp.einsum("nh,efh->nef", xs, w_gate.astype(dt), preferred_element_type=jnp.float32)
        if w_up is None:
            g, u = jnp.split(g, 2, axis=-1)
        else:
            u = jnp.einsum("nh,efh->nef", xs, w_up.astype(dt), preferred_element_type=jnp.float32)
        a = act_mul(g, u).astype(dt)
        y = jnp.einsum("nef,ehf->neh", a, w_down.astype(dt), preferred_element_type=jnp.float32)
        out = jnp.einsum("neh,ne->nh", y, combine)
    return out.astype(out_dtype).reshape(shape)


def _dense(w: Any, dtype: Any) -> jax.Array:
    """A stack, or experts taken from one, as a dense array of `dtype` (packed blocks decoded)."""
    return w.dequantize(dtype) if isinstance(w, PACKED) else w.astype(dtype)


def _take(w: Any, idx: jax.Array) -> Any:
    """The experts `idx` (int [...]) of a stack: [..., out, in]. Packed stacks gather their packed
    leaves (nothing is decoded here), dense ones their rows."""
    if isinstance(w, GGUFWeight):
        return GGUFWeight(jnp.take(w.data, idx, axis=0), w.ggml_type, (*idx.shape, *w.shape[-2:]), w.compute_dtype)
    if isinstance(w, QuantWeight):
        return w.take_experts(idx)
    return jnp.take(w, idx, axis=0)


def _num_experts(w: Any) -> int:
    if isinstance(w, GGUFWeight):
        return int(w.data.shape[0])
    return int(w.lo.shape[0] if isinstance(w, QuantWeight) else w.shape[0])


def moe_experts_packed(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: Any, w_up: Any | None, w_down: Any,
                       kind: str, *, expert_offset: int | jax.Array = 0, ops) -> jax.Array:
    """`moe_experts` over packed stacks (`GGUFWeight` or `QuantWeight` [E, out, in]; dense stacks
    also work), same semantics as the dense reference, with memory bounded by what is read:

    - few rows (n * k < E, decode): gather the n * k selected experts' packed leaves, dequantize
      those ([n, k, out, in] in x's dtype), then the same per-row products as the dense reference;
    - otherwise: `lax.scan` over the E experts, each step dequantizing one expert's three matrices
      and running it on every row, weighted by that expert's column of the [n, E] routing matrix
      (zero for rows that did not pick it); an expert no row picked is skipped (`lax.cond`). The
      dense weights alive at a time are one expert's, never the whole stack.
    """
    shape, h, out_dtype = x.shape, x.shape[-1], x.dtype
    e = _num_experts(w_gate)
    xs, local, weights = _local_slots(x, ids, weights, expert_offset, e)
    n, k, dt = xs.shape[0], ids.shape[-1], xs.dtype

    if n * k < e:
        g = jnp.einsum("nh,nkfh->nkf", xs, _dense(_take(w_gate, local), dt), preferred_element_type=jnp.float32)
        if w_up is None:
            g, u = jnp.split(g, 2, axis=-1)
        else:
            u = jnp.einsum("nh,nkfh->nkf", xs, _dense(_take(w_up, local), dt), preferred_element_type=jnp.float32)
        a = (ops.activation(g, kind) * u).astype(dt)
        y = jnp.einsum("nkf,nkhf->nkh", a, _dense(_take(w_down, local), dt), preferred_element_type=jnp.float32)
        out = jnp.einsum("nkh,nk->nh", y, weights)
        return out.astype(out_dtype).reshape(shape)

    combine = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], local].add(weights)

    def one_expert(acc: jax.Array, per_expert: tuple) -> tuple[jax.Array, None]:
        wg, wu, wd, c = per_expert  # one expert's packed (or dense) matrices, its routing column [n]

        def run(acc: jax.Array) -> jax.Array:
            g = jnp.einsum("nh,fh->nf", xs, _dense(wg, dt), preferred_element_type=jnp.float32)
            if wu is None:
                g, u = jnp.split(g, 2, axis=-1)
            else:
                u = jnp.einsum("nh,fh->nf", xs, _dense(wu, dt), preferred_element_type=jnp.float32)
            a = (ops.activation(g, kind) * u).astype(dt)
            y = jnp.einsum("nf,hf->nh", a, _dense(wd, dt), preferred_element_type=jnp.float32)
            return acc + y * c[:, None]

        return lax.cond(jnp.any(c != 0), run, lambda acc: acc, acc), None

    out, _ = lax.scan(one_expert, jnp.zeros((n, h), jnp.float32), (w_gate, w_up, w_down, combine.T))
    return out.astype(out_dtype).reshape(shape)


def _stacks(w_gate: Any, w_up: Any, w_down: Any) -> tuple:
    return (w_gate, w_down) if w_up is None else (w_gate, w_up, w_down)


def _dense_experts(x, ids, weights, w_gate, w_up, w_down, kind, **kwargs) -> str | None:
    bad = [type(w).__name__ for w in _stacks(w_gate, w_up, w_down) if not isinstance(w, jax.Array)]
    return f"expert weights are {', '.join(bad)}, not dense arrays" if bad else None


def _packed_experts(x, ids, weights, w_gate, w_up, w_down, kind, **kwargs) -> str | None:
    ws = _stacks(w_gate, w_up, w_down)
    bad = [type(w).__name__ for w in ws if not isinstance(w, (jax.Array, *PACKED))]
    if bad:
        return f"expert weights are {', '.join(bad)}, not GGUFWeight / QuantWeight stacks or dense arrays"
    for w in ws:
        if isinstance(w, GGUFWeight) and w.data.ndim != 3:
            return f"GGUFWeight of shape {w.logical_shape} is not an [experts, out, in] stack"
        if isinstance(w, QuantWeight) and (w.ndim != 3 or len(w.lead) != 1):
            return f"{w.fmt.name} QuantWeight of shape {w.logical_shape} is not an [experts, out, in] stack"
    return None


register("moe_route", Impl("xla", moe_route, reference=True))
register("moe_experts", Impl("xla", moe_experts, applies=_dense_experts, reference=True))
register("moe_experts", Impl("xla_dequant", moe_experts_packed, applies=_packed_experts, reference=True))
