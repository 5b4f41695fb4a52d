"""GGUF (ggml) block layouts and pure-jnp block dequantizers.

One `BlockLayout` per supported ggml type is the single definition of that type's block: its
element count and byte size (taken from `gguf.constants.GGML_QUANT_SIZES`, never retyped) and the
byte offset of every field inside the block (`BlockLayout.fields`). The loader, the jnp reference
dequantizers below and the Pallas kernels all read the block through this table.

`dequantize_blocks(name, data)` maps raw bytes `uint8 [..., n_blocks, type_size]` to
`float32 [..., n_blocks * block_size]`. It is written with jnp bit ops on the raw bytes (f16
scales are assembled little-endian into uint16 and reinterpreted with `lax.bitcast_convert_type`),
vectorised over every block at once, so inside a jitted forward XLA fuses it into the consumer
(typically the matmul). The arithmetic follows ggml's reference `dequantize_row_*` in
ggml-quants.c operation for operation (same products in the same order, all in float32), so the
result is bit-identical to ggml and to `gguf.quants.dequantize`.

Element order inside a block (`QK_K` = 256 for the K-quants):

* Q4_0/Q4_1/Q5_0/Q5_1: element `j` (< 16) is the low nibble of `qs[j]`, element `j + 16` the high
  nibble; for Q5_* bit `i` of the little-endian uint32 `qh` is the fifth bit of element `i`.
* Q2_K/Q3_K: element `128 n + 32 j + l` (n < 2, j < 4, l < 32) is bits `2j..2j+1` of
  `qs[32 n + l]`; Q3_K's third bit is bit `4 n + j` of `hmask[l]` (set = no offset, clear = -4).
  Scale index is `8 n + 2 j + l // 16` (16 sub-blocks of 16).
* Q4_K/Q5_K: sub-block `s` (< 8) of 32 elements is nibble `s % 2` of `qs[32 (s // 2) + l]`;
  Q5_K's fifth bit is bit `s` of `qh[l]`. Scales/mins are 6-bit, unpacked as `get_scale_min_k4`.
* Q6_K: element `128 n + 32 k + l` (k < 4) is nibble `k // 2` of `ql[64 n + 32 (k % 2) + l]`
  with bits `2k..2k+1` of `qh[32 n + l]` on top, minus 32; int8 scale `8 n + 2 k + l // 16`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import gguf
import jax
import jax.numpy as jnp
from gguf.constants import GGML_QUANT_SIZES, QK_K
from jax import lax

from ferrum_jax.errors import CheckpointError

GGMLType = gguf.GGMLQuantizationType


@dataclasses.dataclass(frozen=True)
class BlockField:
    """One field of a block: `size` bytes starting at byte `offset`."""

    name: str
    offset: int
    size: int


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Layout of one ggml block type: `block_size` elements stored in `type_size` bytes."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    block_size: int  # elements per block
    type_size: int  # bytes per block
    fields: tuple[BlockField, ...] = ()  # byte fields of one block, in storage order

    def field(self, name: str) -> BlockField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} block has no field {name!r}")

    def bytes_per_row(self, n_elements: int) -> int:
        """Bytes holding a row of `n_elements` (a multiple of `block_size`)."""
        return n_elements // self.block_size * self.type_size


# Field sizes per type (ggml's block_* structs, storage order). The total is checked against
# GGML_QUANT_SIZES below, so a mistake here fails at import rather than misreading weights.
_FIELDS: dict[str, tuple[tuple[str, int], ...]] = {
    "F32": (("v", 4),),
    "F16": (("v", 2),),
    "BF16": (("v", 2),),
    "Q4_0": (("d", 2), ("qs", 16)),
    "Q4_1": (("d", 2), ("m", 2), ("qs", 16)),
    "Q5_0": (("d", 2), ("qh", 4), ("qs", 16)),
    "Q5_1": (("d", 2), ("m", 2), ("qh", 4), ("qs", 16)),
    "Q8_0": (("d", 2), ("qs", 32)),
    "Q2_K": (("scales", QK_K // 16), ("qs", QK_K // 4), ("d", 2), ("dmin", 2)),
    "Q3_K": (("hmask", QK_K // 8), ("qs", QK_K // 4), ("scales", 12), ("d", 2)),
    "Q4_K": (("d", 2), ("dmin", 2), ("scales", 12), ("qs", QK_K // 2)),
    "Q5_K": (("d", 2), ("dmin", 2), ("scales", 12), ("qh", QK_K // 8), ("qs", QK_K // 2)),
    "Q6_K": (("ql", QK_K // 2), ("qh", QK_K // 4), ("scales", QK_K // 16), ("d", 2)),
}


def _make_layout(name: str) -> BlockLayout:
    ggml_type = GGMLType[name]
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    fields, offset = [], 0
    for fname, size in _FIELDS[name]:
        fields.append(BlockField(fname, offset, size))
        offset += size
    if offset != type_size:  # pragma: no cover - guards the table above
        raise AssertionError(f"{name}: fields cover {offset} bytes, ggml says {type_size}")
    return BlockLayout(name, ggml_type, block_size, type_size, tuple(fields))


LAYOUTS: dict[str, BlockLayout] = {name: _make_layout(name) for name in _FIELDS}
SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(l.ggml_type for l in LAYOUTS.values())
_BY_TYPE: dict[int, BlockLayout] = {int(l.ggml_type): l for l in LAYOUTS.values()}


def layout_for(ggml_type: int | gguf.GGMLQuantizationType | str, tensor_name: str) -> BlockLayout:
    """The block layout of a tensor's ggml type; CheckpointError naming tensor and type if unsupported."""
    if isinstance(ggml_type, str):
        layout = LAYOUTS.get(ggml_type)
        if layout is None:
            raise CheckpointError(
                f"tensor {tensor_name!r}: ggml type {ggml_type} is not supported "
                f"(supported: {', '.join(LAYOUTS)})"
            )
        return layout
    layout = _BY_TYPE.get(int(ggml_type))
    if layout is None:
        try:
            type_name = GGMLType(int(ggml_type)).name
        except ValueError:
            type_name = f"<unknown ggml type {int(ggml_type)}>"
        raise CheckpointError(
            f"tensor {tensor_name!r}: ggml type {type_name} is not supported "
            f"(supported: {', '.join(LAYOUTS)})"
        )
    return layout


# ---------------------------------------------------------------------------------------------
# Byte helpers. `blocks` is uint8 [..., n_blocks, type_size] throughout.


def _field(layout: BlockLayout, blocks: jax.Array, name: str) -> jax.Array:
    f = layout.field(name)
    return blocks[..., f.offset : f.offset + f.size]


def _f16(raw: jax.Array) -> jax.Array:
    """uint8 [..., 2k] (little-endian f16s) -> float32 [..., k]."""
    lo = raw[..., 0::2].astype(jnp.uint16)
    hi = raw[..., 1::2].astype(jnp.uint16)
    return lax.bitcast_convert_type(lo | (hi << 8), jnp.float16).astype(jnp.float32)


def _nibbles(qs: jax.Array) -> jax.Array:
    """uint8 [..., m] -> uint8 [..., 2, m]: low nibbles, then high nibbles."""
    return jnp.stack([qs & 0x0F, qs >> 4], axis=-2)


def _bits(x: jax.Array, n_bits: int, width: int) -> jax.Array:
    """uint8 [..., m] -> uint8 [..., 8 // width, m]: the `width`-bit groups, lowest first."""
    shifts = jnp.arange(0, 8, width, dtype=jnp.uint8)[:, None]
    return (x[..., None, :] >> shifts) & jnp.uint8((1 << n_bits) - 1)


# ---------------------------------------------------------------------------------------------
# Dequantizers, one per type. Each returns float32 [..., n_blocks, block_size].


def _deq_f32(L: BlockLayout, b: jax.Array) -> jax.Array:
    u = b.astype(jnp.uint32)
    bits = u[..., 0] | (u[..., 1] << 8) | (u[..., 2] << 16) | (u[..., 3] << 24)
    return lax.bitcast_convert_type(bits, jnp.float32)[..., None]


def _deq_f16(L: BlockLayout, b: jax.Array) -> jax.Array:
    return _f16(b)


def _deq_bf16(L: BlockLayout, b: jax.Array) -> jax.Array:
    u = b.astype(jnp.uint32)
    return lax.bitcast_convert_type((u[..., 0] << 16) | (u[..., 1] << 24), jnp.float32)[..., None]


def _deq_q4_0(L: BlockLayout, b: jax.Array) -> jax.Array:
    d = _f16(_field(L, b, "d"))
    q = _nibbles(_field(L, b, "qs")).reshape(*b.shape[:-1], 32)
    return (q.astype(jnp.int32) - 8).astype(jnp.float32) * d


def _deq_q4_1(L: BlockLayout, b: jax.Array) -> jax.Array:
    d = _f16(_field(L, b, "d"))
    m = _f16(_field(L, b, "m"))
    q = _nibbles(_field(L, b, "qs")).reshape(*b.shape[:-1], 32)
    return q.astype(jnp.float32) * d + m


def _q5_high(L: BlockLayout, b: jax.Array) -> jax.Array:
    """Bit i of the little-endian uint32 qh, as bit 4 of element i: uint8 [..., 32]."""
    qh = _field(L, b, "qh")  # [..., 4]: byte k holds the bits of elements 8k .. 8k+7
    bits = (qh[..., :, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1  # [..., 4, 8]
    return bits.reshape(*b.shape[:-1], 32) << 4


def _deq_q5_0(L: BlockLayout, b: jax.Array) -> jax.Array:
    d = _f16(_field(L, b, "d"))
    ql = _nibbles(_field(L, b, "qs")).reshape(*b.shape[:-1], 32)
    q = ql | _q5_high(L, b)
    return (q.astype(jnp.int32) - 16).astype(jnp.float32) * d


def _deq_q5_1(L: BlockLayout, b: jax.Array) -> jax.Array:
    d = _f16(_field(L, b, "d"))
    m = _f16(_field(L, b, "m"))
    ql = _nibbles(_field(L, b, "qs")).reshape(*b.shape[:-1], 32)
    q = ql | _q5_high(L, b)
    return q.astype(jnp.float32) * d + m


def _deq_q8_0(L: BlockLayout, b: jax.Array) -> jax.Array:
    d = _f16(_field(L, b, "d"))
    q = lax.bitcast_convert_type(_field(L, b, "qs"), jnp.int8)
    return q.astype(jnp.float32) * d


def _deq_q2_k(L: BlockLayout, b: jax.Array) -> jax.Array:
    lead = b.shape[:-1]
    d = _f16(_field(L, b, "d"))[..., None]  # [..., 1, 1]
    dmin = _f16(_field(L, b, "dmin"))[..., None]
    sc = _field(L, b, "scales")  # [..., 16]
    dl = d * (sc & 0x0F).astype(jnp.float32)[..., None]  # [..., 16, 1]
    ml = dmin * (sc >> 4).astype(jnp.float32)[..., None]
    qs = _field(L, b, "qs").reshape(*lead, 2, 32)  # [..., n, l]
    q = _bits(qs, 2, 2)  # [..., n, j, l]
    q = q.reshape(*lead, 16, 16).astype(jnp.float32)  # [..., 8n + 2j + l//16, l%16]
    return (dl * q - ml).reshape(*lead, QK_K)


def _q3_k_scales(sc: jax.Array) -> jax.Array:
    """The 16 6-bit scales of a Q3_K block (12 bytes), minus 32: int32 [..., 16]."""
    lead = sc.shape[:-1]
    low = _nibbles(sc[..., 0:8]).reshape(*lead, 16)  # scale i: nibble i // 8 of byte i % 8
    high = _bits(sc[..., 8:12], 2, 2).reshape(*lead, 16)  # bits 2(i // 4).. of byte 8 + i % 4
    return (low | (high << 4)).astype(jnp.int32) - 32


def _deq_q3_k(L: BlockLayout, b: jax.Array) -> jax.Array:
    lead = b.shape[:-1]
    d = _f16(_field(L, b, "d"))[..., None]  # [..., 1, 1]
    dl = d * _q3_k_scales(_field(L, b, "scales")).astype(jnp.float32)[..., None]  # [..., 16, 1]
    qs = _field(L, b, "qs").reshape(*lead, 2, 32)
    ql = _bits(qs, 2, 2).reshape(*lead, 8, 32)  # [..., 4n + j, l]
    hm = _bits(_field(L, b, "hmask"), 1, 1)  # [..., 8, 32]: bit 4n + j of hmask[l]
    q = ql.astype(jnp.int32) - jnp.where(hm != 0, 0, 4)
    q = q.reshape(*lead, 16, 16).astype(jnp.float32)
    return (dl * q).reshape(*lead, QK_K)


def _scale_min_k4(sc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ggml's get_scale_min_k4 for j = 0..7 at once: 12 bytes -> (scales, mins), uint8 [..., 8]."""
    a, m, md = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scales = jnp.concatenate([a & 63, (md & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mins = jnp.concatenate([m & 63, (md >> 4) | ((m >> 6) << 4)], axis=-1)
    return scales, mins


def _k4_scales(L: BlockLayout, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    d = _f16(_field(L, b, "d"))  # [..., 1]
    dmin = _f16(_field(L, b, "dmin"))
    sc, mn = _scale_min_k4(_field(L, b, "scales"))
    d1 = (d * sc.astype(jnp.float32))[..., None]  # [..., 8, 1]
    m1 = (dmin * mn.astype(jnp.float32))[..., None]
    return d1, m1


def _deq_q4_k(L: BlockLayout, b: jax.Array) -> jax.Array:
    lead = b.shape[:-1]
    d1, m1 = _k4_scales(L, b)
    qs = _field(L, b, "qs").reshape(*lead, 4, 32)
    q = _nibbles(qs).reshape(*lead, 8, 32).astype(jnp.float32)  # sub-block 2 (s//2) + s%2
    return (d1 * q - m1).reshape(*lead, QK_K)


def _deq_q5_k(L: BlockLayout, b: jax.Array) -> jax.Array:
    lead = b.shape[:-1]
    d1, m1 = _k4_scales(L, b)
    qs = _field(L, b, "qs").reshape(*lead, 4, 32)
    ql = _nibbles(qs).reshape(*lead, 8, 32)
    qh = _bits(_field(L, b, "qh"), 1, 1)  # [..., 8, 32]: bit s of qh[l]
    q = (ql | (qh << 4)).astype(jnp.float32)
    return (d1 * q - m1).reshape(*lead, QK_K)


def _deq_q6_k(L: BlockLayout, b: jax.Array) -> jax.Array:
    lead = b.shape[:-1]
    d = _f16(_field(L, b, "d"))[..., None]  # [..., 1, 1]
    sc = lax.bitcast_convert_type(_field(L, b, "scales"), jnp.int8).astype(jnp.float32)
    dl = d * sc[..., None]  # [..., 16, 1]
    ql = _field(L, b, "ql").reshape(*lead, 2, 2, 32)  # [..., n, k % 2, l]
    ql = jnp.stack([ql & 0x0F, ql >> 4], axis=-3)  # [..., n, k // 2, k % 2, l]
    qh = _bits(_field(L, b, "qh").reshape(*lead, 2, 32), 2, 2)  # [..., n, k, l]
    q = (ql.reshape(*lead, 2, 4, 32) | (qh << 4)).astype(jnp.int32) - 32
    q = q.reshape(*lead, 16, 16).astype(jnp.float32)  # [..., 8n + 2k + l//16, l%16]
    return (dl * q).reshape(*lead, QK_K)


_DEQUANTIZERS: dict[str, Callable[[BlockLayout, jax.Array], jax.Array]] = {
    "F32": _deq_f32,
    "F16": _deq_f16,
    "BF16": _deq_bf16,
    "Q4_0": _deq_q4_0,
    "Q4_1": _deq_q4_1,
    "Q5_0": _deq_q5_0,
    "Q5_1": _deq_q5_1,
    "Q8_0": _deq_q8_0,
    "Q2_K": _deq_q2_k,
    "Q3_K": _deq_q3_k,
    "Q4_K": _deq_q4_k,
    "Q5_K": _deq_q5_k,
    "Q6_K": _deq_q6_k,
}
assert set(_DEQUANTIZERS) == set(LAYOUTS)


def dequantize_blocks(layout_name: str, data: jax.Array) -> jax.Array:
    """uint8 [..., n_blocks, type_size] -> float32 [..., n_blocks * block_size] (ggml-exact)."""
    layout = LAYOUTS[layout_name]
    data = jnp.asarray(data)
    if data.dtype != jnp.uint8:
        raise TypeError(f"{layout_name} blocks must be uint8, got {data.dtype}")
    if data.ndim < 2 or data.shape[-1] != layout.type_size:
        raise ValueError(
            f"{layout_name} blocks must have shape [..., n_blocks, {layout.type_size}], "
            f"got {data.shape}"
        )
    out = _DEQUANTIZERS[layout_name](layout, data)
    return out.reshape(*data.shape[:-2], data.shape[-2] * layout.block_size)
