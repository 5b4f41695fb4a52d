"""Quantized weights: GGUF block layouts, jnp dequantizers and the packed-weight pytree node."""

from ferrum_jax.quant.gguf_blocks import (
    LAYOUTS,
    SUPPORTED_TYPES,
    BlockField,
    BlockLayout,
    dequantize_blocks,
    layout_for,
)
from ferrum_jax.quant.packed import GGUFWeight

__all__ = [
    "LAYOUTS",
    "SUPPORTED_TYPES",
    "BlockField",
    "BlockLayout",
    "GGUFWeight",
    "dequantize_blocks",
    "layout_for",
]
