"""MoE routing in one kernel: router logits -> softmax -> top k -> (renormalised) weights and ids.

XLA compiles `ferrum_jax.moe_ops.moe_route` (its reference) to a softmax kernel, a sort (lax.top_k
over E values is a full sort on GPU), a memset and a renormalising softmax: ~7 us of launches per
layer at decode on an H200, for 512 bytes of logits a token. Here each program takes a block of rows
whole (E padded to a power of two, masked): the softmax in float32, then k rounds of "largest
remaining probability, lowest index among equals" (lax.top_k's order: descending, ties by index),
each round masking the winner, then the division by the sum of the k weights.

The router matmul itself stays outside (`ops.linear`, whatever format the router weight is in).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# A program holds a [block_rows, E] tile in registers; past this many experts it would spill.
MAX_EXPERTS = 1024
ROW_BLOCK_ELEMENTS = 1024  # rows per program: this many (padded) logits, at least one row
MAX_ELEMENTS = 2**31 - 1


def _pow2_ceil(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def unsupported(logits, top_k: int) -> str | None:
    """None if `route_topk` takes these arguments, else why not."""
    if not hasattr(logits, "shape") or logits.ndim < 1:
        return f"logits are {type(logits).__name__} of no rank, not an array [..., experts]"
    e = logits.shape[-1]
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        return f"logits are {logits.dtype}, not floating point"
    if not 1 <= e <= MAX_EXPERTS:
        return f"{e} experts (1 to {MAX_EXPERTS} in one block)"
    if not 1 <= top_k <= e:
        return f"top_k {top_k} is not in 1..{e} experts"
    if logits.size == 0 or logits.size > MAX_ELEMENTS:
        return f"{logits.size} logits (1 to {MAX_ELEMENTS}: 32-bit indexing)"
    return None


def _kernel(l_ref, w_ref, i_ref, *, rows: int, experts: int, top_k: int, norm: bool):
    from jax.experimental.pallas import triton as pl_triton

    br, ep = l_ref.shape
    kp = w_ref.shape[1]
    col = lax.broadcasted_iota(jnp.int32, (br, ep), 1)
    ok = col < experts
    row_ok = None
    if rows % br:
        row_ok = pl.program_id(0) * br + lax.broadcasted_iota(jnp.int32, (br, 1), 0) < rows
        ok = ok & row_ok
    logits = pl_triton.load(l_ref, mask=ok, other=jnp.full((), -jnp.inf, l_ref.dtype)).astype(jnp.float32)
    # Masked rows are all -inf: give them a finite max so they stay NaN-free (never stored).
    m = jnp.maximum(jnp.max(logits, axis=1, keepdims=True), -1e30)
    p = jnp.where(ok, jnp.exp(logits - m), 0.0)
    probs = p / jnp.sum(p, axis=1, keepdims=True)
    # Probabilities are >= 0: -1 marks padding and the experts already taken.
    left = jnp.where(col < experts, probs, -1.0)
    slot = lax.broadcasted_iota(jnp.int32, (br, kp), 1)
    weights = jnp.zeros((br, kp), jnp.float32)
    ids = jnp.zeros((br, kp), jnp.int32)
    for s in range(top_k):
        best = jnp.max(left, axis=1, keepdims=True)
        pick = jnp.min(jnp.where(left == best, col, ep), axis=1, keepdims=True)
        weights = jnp.where(slot == s, best, weights)
        ids = jnp.where(slot == s, pick, ids)
        left = jnp.where(col == pick, -1.0, left)
    if norm:
        weights = weights / jnp.sum(weights, axis=1, keepdims=True)  # slots past k hold 0
    out_ok = slot < top_k if row_ok is None else (slot < top_k) & row_ok
    pl_triton.store(w_ref, weights, mask=out_ok)
    pl_triton.store(i_ref, ids, mask=out_ok)


@partial(jax.jit, static_argnames=("top_k", "norm_topk_prob", "block_rows", "interpret"))
def route_topk(logits: jax.Array, *, top_k: int, norm_topk_prob: bool, block_rows: int | None = None,
               interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """logits [..., E] -> (weights float32 [..., k], ids int32 [..., k]): the top k of softmax(logits)
    in descending order (ties: lower expert first), divided by their sum with `norm_topk_prob`."""
    reason = unsupported(logits, top_k)
    if reason is not None:
        raise ValueError(f"route_topk: {reason}")
    e = logits.shape[-1]
    rows = logits.size // e
    ep, kp = _pow2_ceil(e), _pow2_ceil(top_k)
    br = block_rows or min(_pow2_ceil(rows), max(1, ROW_BLOCK_ELEMENTS // ep))
    if br & (br - 1):
        raise ValueError(f"route_topk: block_rows {br} is not a power of two")
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton
        params["compiler_params"] = pl_triton.CompilerParams(num_warps=4 if br * ep >= 1024 else 1, num_stages=1)
    weights, ids = pl.pallas_call(
        partial(_kernel, rows=rows, experts=e, top_k=top_k, norm=norm_topk_prob),
        grid=(pl.cdiv(rows, br),),
        in_specs=[pl.BlockSpec((br, ep), lambda r: (r, 0))],
        out_specs=[pl.BlockSpec((br, kp), lambda r: (r, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((rows, top_k), jnp.float32), jax.ShapeDtypeStruct((rows, top_k), jnp.int32)],
        interpret=interpret,
        name="moe_route",
        **params,
    )(logits.reshape(rows, e))
    lead = logits.shape[:-1]
    return weights.reshape(*lead, top_k), ids.reshape(*lead, top_k)


def reference(logits: jax.Array, *, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """The oracle: softmax in float32, lax.top_k, renormalised (ferrum_jax.moe_ops.moe_route's steps)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


__all__ = ["MAX_EXPERTS", "reference", "route_topk", "unsupported"]
