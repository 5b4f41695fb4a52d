"""Quantized matmul on GPU: y = x @ W^T with W a `QuantWeight` (ferrum_jax/quant/qweight.py, one
layout for GGUF, GPTQ and AWQ codes), and the pure-jnp reference beside it.

Decode reads every weight once per token, so the decode variants stream the packed bytes once and
never write a dequantized copy; at ~4 TB/s an H200 delivers ~7e12 4-bit weights a second, close to
what its integer and float pipes can unpack, so the arithmetic per weight is what the variants trade:

  dp4a.py     4-/8-bit codes, <= 4 rows: x quantized to int8 per group inside the kernel, integer
              dots (dp4a, inline PTX: 8 weights in 5 instructions), scale and offset once per group.
  fma.py      exact, <= 4 rows: unpack (exponent trick instead of int-to-float conversions), one
              FMA with the group scale, one with x; reduced once after the K loop.
  dot.py      exact, 5..64 rows: a dequantized tile into a tensor-core dot.
  dequant.py  more rows: the dense weight written once in x's dtype, then XLA's dense matmul.
  common.py   configs and the per-GPU-generation block table, shape checks, tile decoding.

Grid: (output blocks of `block_n` rows, row blocks of x, `split_k` slices of the inputs); the
split-K partial sums are added by XLA afterwards (split-K fills the GPU when there are few output
blocks, e.g. a 1024-row k/v projection). Pallas Triton lowering, on jax 0.10 and 0.11.

`reference(x, w)` is the oracle: the weight dequantized in float32, one float32 matmul.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from ferrum_jax.quant.qweight import QuantWeight
from pallas_kernels.quant_matmul.common import (
    BLOCKS,
    MAX_FMA_ROWS,
    Blocks,
    GemvConfig,
    choose_config,
    gpu_blocks,
    reference,
    triton_params,
    unsupported,
)
from pallas_kernels.quant_matmul.dequant import dequantize
from pallas_kernels.quant_matmul.dot import dot_call
from pallas_kernels.quant_matmul.dp4a import dp4a_call, quantize_activations
from pallas_kernels.quant_matmul.fma import fma_call

__all__ = ["BLOCKS", "MAX_FMA_ROWS", "Blocks", "GemvConfig", "choose_config", "dequantize", "gpu_blocks",
           "qmatmul", "quantize_activations", "reference", "unsupported"]


@partial(jax.jit, static_argnames=("config", "interpret"))
def qmatmul(x: jax.Array, w: QuantWeight, *, config: GemvConfig = GemvConfig(), interpret: bool = False) -> jax.Array:
    """x [..., K] @ W^T -> [..., N] in x's dtype, with the variant and blocks of `config`."""
    reason = unsupported(x, w, config)
    if reason is not None:
        raise ValueError(f"qmatmul: {reason}")
    n, k = w.shape
    lead = x.shape[:-1]
    m_rows = math.prod(lead)
    x2 = x.reshape(m_rows, k)
    if w.perm is not None:
        x2 = jnp.take(x2, w.perm, axis=1)
    params = triton_params(config.num_warps, config.num_stages, interpret)
    # One slice of the inputs: the kernel writes x's dtype itself (no separate convert kernel);
    # split-K partials stay float32 until XLA's sum.
    out_dtype = x.dtype if config.split_k == 1 else jnp.float32
    if config.variant == "dot":
        dot_dtype = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
        partials = dot_call(x2, w, config, params, interpret, dot_dtype, out_dtype)
    else:
        call = fma_call if config.variant == "fma" else dp4a_call
        partials = call(x2, w, config, params, interpret, out_dtype)
    y = (partials[0] if config.split_k == 1 else jnp.sum(partials, axis=0))[:m_rows, :n]
    return y.reshape(*lead, n).astype(x.dtype)
