"""Repack GGUF blocks into the kernel layout (`QuantWeight`), once at load time, on device.

Each supported type's block is taken apart into its integer codes (in element order), its group
scales and offsets, exactly as ggml's `dequantize_row_*` reads them (the field helpers come from
`gguf_blocks`, the one definition of every block); `QuantWeight.from_codes` packs them. Nothing is
rounded: `QuantWeight.dequantize` gives ggml's values (tested against `gguf.quants.dequantize`).

MoE expert stacks (a `GGUFWeight` [experts, out, in], as GGUF files store them) become QuantWeight
stacks: the 2-D repack of each expert, one expert at a time (`lax.map`, so the split's transient
planes are one expert's, not the whole stack's), stacked along a leading expert axis.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ferrum_jax.quant.gguf_blocks import LAYOUTS, _field, _nibbles, _q5_high, _scale_min_k4
from ferrum_jax.quant.packed import GGUFWeight
from ferrum_jax.quant.qweight import GGUF_FORMATS, QuantWeight

log = logging.getLogger(__name__)


def _f16_raw(raw: jax.Array) -> jax.Array:
    """uint8 [..., 2k] little-endian -> float16 [..., k] (bit-exact, no float32 detour)."""
    u = raw[..., 0::2].astype(jnp.uint16) | (raw[..., 1::2].astype(jnp.uint16) << 8)
    return lax.bitcast_convert_type(u, jnp.float16)


@partial(jax.jit, static_argnums=0)
def _split(ggml_type: str, blocks: jax.Array) -> dict[str, jax.Array]:
    """uint8 [N, n_blocks, type_size] -> codes [N, K] and per-group / per-super-block fields."""
    L = LAYOUTS[ggml_type]
    n, nb = blocks.shape[:2]
    f = lambda name: _field(L, blocks, name)
    out: dict[str, jax.Array] = {}
    if ggml_type in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        q = _nibbles(f("qs")).reshape(n, nb, 32)
        if ggml_type.startswith("Q5"):
            q = q | _q5_high(L, blocks)
        out["scales"] = _f16_raw(f("d"))[..., 0]
        if ggml_type.endswith("_1"):
            out["mins"] = _f16_raw(f("m"))[..., 0]
    elif ggml_type == "Q8_0":
        q = lax.bitcast_convert_type(f("qs"), jnp.int8)
        out["scales"] = _f16_raw(f("d"))[..., 0]
    elif ggml_type in ("Q4_K", "Q5_K"):
        q = _nibbles(f("qs").reshape(n, nb, 4, 32)).reshape(n, nb, 8, 32)  # sub-block 2 (s // 2) + s % 2
        if ggml_type == "Q5_K":
            q = q | ((f("qh")[..., None, :] >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1) << 4
        sc, mn = _scale_min_k4(f("scales"))
        out.update(scales=sc.reshape(n, nb * 8), mins=mn.reshape(n, nb * 8),
                   super_scales=_f16_raw(f("d"))[..., 0], super_offsets=_f16_raw(f("dmin"))[..., 0])
    elif ggml_type == "Q6_K":
        ql = f("ql").reshape(n, nb, 2, 2, 32)  # [n, k % 2, l]
        ql = jnp.stack([ql & 15, ql >> 4], axis=-3).reshape(n, nb, 2, 4, 32)  # [n, k, l]
        qh = (f("qh").reshape(n, nb, 2, 1, 32) >> (2 * jnp.arange(4, dtype=jnp.uint8))[:, None]) & 3
        q = ql | (qh << 4)  # element 128 n + 32 k + l, unsigned (ggml subtracts 32)
        out.update(scales=lax.bitcast_convert_type(f("scales"), jnp.int8).reshape(n, nb * 16),
                   super_scales=_f16_raw(f("d"))[..., 0])
    else:  # pragma: no cover - guarded by can_repack
        raise NotImplementedError(ggml_type)
    out["codes"] = q.reshape(n, nb * L.block_size)
    for key in ("scales", "mins", "super_scales", "super_offsets"):
        if key in out:
            out[key] = out[key].reshape(n, -1)
    return out


def can_repack(w: GGUFWeight) -> str | None:
    """None if `w` has a kernel layout, else why not."""
    if w.ggml_type not in GGUF_FORMATS:
        return f"{w.ggml_type} has no kernel layout (layouts: {', '.join(GGUF_FORMATS)})"
    if w.ndim not in (2, 3) or w.data.ndim != w.ndim:
        return f"only 2-D [out, in] weights and 3-D [experts, out, in] stacks are repacked, not shape {w.shape}"
    return None


def _repack_rows(ggml_type: str, data: jax.Array, cols: int, compute_dtype: str) -> QuantWeight:
    """The kernel layout of one 2-D weight's raw blocks, data uint8 [N, bytes per row]."""
    L = LAYOUTS[ggml_type]
    n = data.shape[0]
    parts = _split(ggml_type, data.reshape(n, cols // L.block_size, L.type_size))
    return QuantWeight.from_codes(parts["codes"], parts["scales"], GGUF_FORMATS[ggml_type], mins=parts.get("mins"),
                                  super_scales=parts.get("super_scales"),
                                  super_offsets=parts.get("super_offsets"), compute_dtype=compute_dtype)


def repack_gguf(w: GGUFWeight) -> QuantWeight:
    """The kernel layout of a packed 2-D GGUF weight or [experts, out, in] stack (see `can_repack`)."""
    reason = can_repack(w)
    if reason is not None:
        raise ValueError(reason)
    one = partial(_repack_rows, w.ggml_type, cols=w.cols, compute_dtype=w.compute_dtype)
    if w.ndim == 2:
        return one(w.data)
    stack = lax.map(one, w.data)  # leaves [E, N_pad, ...]; the static shape is one expert's
    return dataclasses.replace(stack, shape=tuple(w.shape))


def repack_weights(weights: Any) -> Any:
    """Every packed 2-D GGUF weight and [experts, out, in] stack of a pytree in the kernel layout;
    the others (types without a layout, e.g. Q2_K / Q3_K) stay `GGUFWeight`s on the
    block-decoding path, said in a debug log."""

    def convert(node: Any) -> Any:
        if not isinstance(node, GGUFWeight):
            return node
        reason = can_repack(node)
        if reason is not None:
            log.debug("GGUF weight %s %s stays block-decoded: %s", node.ggml_type, node.shape, reason)
            return node
        return repack_gguf(node)

    return jax.tree_util.tree_map(convert, weights, is_leaf=lambda n: isinstance(n, GGUFWeight))
