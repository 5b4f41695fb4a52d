"""`linear` and `embed` for `QuantWeight` (the kernel layout of GGUF, GPTQ and AWQ weights).

  pallas_qmatmul_dp4a  GPU, 4- and 8-bit codes, up to 4 rows of x (batch-1 decode): x is quantized
                  to int8 per weight group (as llama.cpp does; ~1e-2 relative error of the output)
                  and every group's dot is integer (dp4a), ~2x the float variants' speed.
                  `Ops(exact=True)` skips it (as every approximate implementation), keeping
                  activations exact.
  pallas_qmatmul  GPU, up to `KERNEL_MAX_ROWS` rows of x (decode, small batches): the Pallas kernel streams the
                  packed codes once (pallas_kernels/quant_matmul/), block sizes from its table.
  pallas_dequant_matmul  GPU, more rows (prefill): a Pallas pass writes the dense weight in x's
                  dtype (reads the packed bytes once, writes the dense ones), then XLA's dense
                  matmul; the decoding is small next to a compute-bound matmul.
  xla_qweight     everywhere else (the reference): the same in jnp. An optimization barrier keeps
                  XLA from fusing the decoding into the matmul's operand, which it does slowly.
  embed           gathers the token rows of every plane, then dequantizes only those rows.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ferrum_jax.backend import Impl, register
from ferrum_jax.quant.qweight import QuantWeight
from pallas_kernels import quant_matmul

KERNEL_MAX_ROWS = 64  # above this, dequantize once + dense matmul wins (H200, bench/quant_matmul.py)


def _check(x: jax.Array, w: QuantWeight) -> None:
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the {w.fmt.name} weight {w.shape} expects {w.shape[1]}")


def _qweight_only(x: Any, w: Any, *args: Any, **kwargs: Any) -> str | None:
    if not isinstance(w, QuantWeight):
        return f"weight is {type(w).__name__}, not a QuantWeight"
    return None if w.ndim == 2 else f"QuantWeight of shape {w.shape} is an expert stack, not an [out, in] weight"


def _kernel_applies(x: jax.Array, w: Any, bias: Any = None) -> str | None:
    reason = _qweight_only(x, w)
    if reason is not None:
        return reason
    rows = math.prod(x.shape[:-1])
    if rows > KERNEL_MAX_ROWS:
        return f"{rows} rows > {KERNEL_MAX_ROWS}: dequantize once + matmul is faster"
    return quant_matmul.unsupported(x, w, quant_matmul.choose_config(w, rows))


def _dp4a_applies(x: jax.Array, w: Any, bias: Any = None) -> str | None:
    reason = _qweight_only(x, w)
    if reason is not None:
        return reason
    rows = math.prod(x.shape[:-1])
    if rows > quant_matmul.MAX_FMA_ROWS:
        return f"{rows} rows > {quant_matmul.MAX_FMA_ROWS}"
    return quant_matmul.unsupported(x, w, quant_matmul.choose_config(w, rows, "dp4a"))


def dp4a_linear(x: jax.Array, w: QuantWeight, bias: jax.Array | None = None) -> jax.Array:
    _check(x, w)
    y = quant_matmul.qmatmul(x, w, config=quant_matmul.choose_config(w, math.prod(x.shape[:-1]), "dp4a"))
    return y if bias is None else y + bias.astype(y.dtype)


def kernel_linear(x: jax.Array, w: QuantWeight, bias: jax.Array | None = None) -> jax.Array:
    _check(x, w)
    y = quant_matmul.qmatmul(x, w, config=quant_matmul.choose_config(w, math.prod(x.shape[:-1])))
    return y if bias is None else y + bias.astype(y.dtype)


def _dequant_applies(x: jax.Array, w: Any, bias: Any = None) -> str | None:
    return _qweight_only(x, w)


def dequant_linear(x: jax.Array, w: QuantWeight, bias: jax.Array | None = None) -> jax.Array:
    _check(x, w)
    y = jnp.einsum("...k,nk->...n", x, quant_matmul.dequantize(w, x.dtype))
    return y if bias is None else y + bias.astype(y.dtype)


def linear(x: jax.Array, w: QuantWeight, bias: jax.Array | None = None) -> jax.Array:
    _check(x, w)
    dense = lax.optimization_barrier(w.dequantize(x.dtype))
    y = jnp.einsum("...k,nk->...n", x, dense)
    return y if bias is None else y + bias.astype(y.dtype)


def embed(tokens: jax.Array, table: QuantWeight) -> jax.Array:
    rows = table.take_rows(tokens)
    return rows.dequantize(table.compute_dtype).reshape(*tokens.shape, table.shape[1])


register("linear", Impl("pallas_qmatmul_dp4a", dp4a_linear, platforms=frozenset({"gpu"}),
                        partitionable=False, applies=_dp4a_applies, approximate="int8 activations"))
register("linear", Impl("pallas_qmatmul", kernel_linear, platforms=frozenset({"gpu"}),
                        partitionable=False, applies=_kernel_applies))
register("linear", Impl("pallas_dequant_matmul", dequant_linear, platforms=frozenset({"gpu"}),
                        partitionable=False, applies=_dequant_applies))
register("linear", Impl("xla_qweight", linear, applies=_qweight_only, reference=True))
register("embed", Impl("xla_qweight", embed, applies=lambda tokens, table: _qweight_only(tokens, table), reference=True))
