"""XLA reference ops for packed GGUF weights ("xla_dequant"): `linear` and `embed` on `GGUFWeight`.

Registered with the backend next to the dense XLA references (reference=True, so any kernel for
GGUFWeight registered later is tried first); the `applies` checks accept only a GGUFWeight, and
the dense "xla" entries refuse one, so each weight type gets its own path.

  linear(x, w, bias)   x [..., in] @ dequantize(w) [out, in]^T (+ bias). The blocks are decoded
                       inside the jitted program into x's dtype, right where the matmul uses them,
                       so XLA fuses the decoding with its consumer; nothing dense is kept around.
  embed(tokens, table) gathers the packed rows of the requested tokens first and dequantizes only
                       those rows (never the whole [vocab, hidden] table), into the weight's
                       compute_dtype (the model's activation dtype, set by the loader).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ferrum_jax.backend import Impl, register
from ferrum_jax.quant.packed import GGUFWeight

NAME = "xla_dequant"


def _gguf_only(x: Any, w: Any, *args: Any, **kwargs: Any) -> str | None:
    return None if isinstance(w, GGUFWeight) else f"weight is {type(w).__name__}, not a GGUFWeight"


def linear(x: jax.Array, w: GGUFWeight, bias: jax.Array | None = None) -> jax.Array:
    if w.ndim != 2:
        raise ValueError(f"linear: GGUFWeight of shape {w.shape} is not a 2-D [out, in] weight")
    if x.shape[-1] != w.cols:
        raise ValueError(f"linear: x has {x.shape[-1]} features, weight {w.shape} expects {w.cols}")
    dense = w.dequantize(x.dtype)
    y = jnp.einsum("...k,nk->...n", x, dense)
    return y if bias is None else y + bias.astype(y.dtype)


def embed(tokens: jax.Array, table: GGUFWeight) -> jax.Array:
    if table.ndim != 2:
        raise ValueError(f"embed: GGUFWeight of shape {table.shape} is not a 2-D [vocab, hidden] table")
    rows = jnp.take(table.data, tokens, axis=0)  # uint8 [..., bytes_per_row]: only the tokens' rows
    return GGUFWeight(rows, table.ggml_type, (*rows.shape[:-1], table.cols)).dequantize(table.compute_dtype)


register("linear", Impl(NAME, linear, applies=_gguf_only, reference=True))
register("embed", Impl(NAME, embed, applies=lambda tokens, table: _gguf_only(tokens, table), reference=True))
