"""`QuantWeight`: a quantized linear weight in the layout the Pallas kernels read.

GGUF blocks, GPTQ and AWQ tensors all describe the same thing: integer codes `q` of `bits` bits,
one scale (and maybe an offset) per group of `group` consecutive inputs of an output row. They are
repacked once at load time into one layout (the formats differ only in static `QFormat` facts):

    w[n, k] = q[n, k] * s[n, g] - o[n, g],   g = k // group

    s: "direct"    f16 per group                                   (legacy GGUF, GPTQ, AWQ)
       two-level   f32(super[n, g // R]) * sub[n, g], R = super_group // group; sub is uint8,
                   or int8 for Q6_K                                (K-quants, exact as in ggml)
    o: "none" 0 (Q8_0) | "const" c * s (Q4_0, Q5_0, Q6_K) | "min" -m, m f16 (Q4_1, Q5_1)
       | "kmin" dmin[n, g // R] * m[n, g], m uint8 (Q4_K, Q5_K) | "zero" z * s, z uint8 (GPTQ, AWQ)

Codes are stored as byte planes, row-major by output row, so a tile of rows is a contiguous
stream of bytes and a group's codes sit next to its scale. Element `e` of a group is split as
`e = a * (B * W) + b * W + w` (a < A, b < B, w < W):

    bits 8     A = 1, B = 1, W = G:    lo[n, g, 0, w] is the code (int8 when signed)
    bits 4     A = 2, B = 1, W = G/2:  nibble a of lo[n, g, 0, w]
    bits 5, 6  A = 2, B = 4 // (bits - 4), W = G / (2B): the low 4 bits are nibble a of
               lo[n, g, b, w]; the high bits are bits (bits-4) * (a B + b) .. of hi[n, g, w]

so the kernel never shuffles elements: it views the activations as [M, K/G, A, B, W] (a free
reshape), multiplies each unpacked field with its slice and reduces. Rows are padded to a multiple
of `ROW_PAD` (zero codes, zero scales); `shape` keeps the logical [out, in].

GPTQ act-order (`g_idx`) becomes a column permutation: the codes are stored with the columns
sorted by group, and `perm` (int32 [K]) says which input feeds each stored column, so
y = x[..., perm] @ W_sorted^T.

Expert stacks (MoE): every leaf has a leading expert axis (lo [E, N_pad, K/G, B, W], scales
[E, N_pad, K/G], ..., perm [E, K]: each expert its own) and `shape` is the logical (E, out, in).
Each expert's rows are padded on their own, so expert e's leaves are exactly the 2-D QuantWeight
of that expert (`stack` builds one from those, `take_experts` / `w[a:b]` pick experts). As for
`GGUFWeight`, `lax.scan` / `vmap` over the expert axis slice the leaves but not the static
`shape`, so the leading dims are always read from the leaves (`lead`), the last two from `shape`.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ferrum_jax.errors import CheckpointError

ROW_PAD = 64  # rows are padded to this multiple, so every kernel block size up to it divides N
OFFSETS = ("none", "const", "min", "kmin", "zero")


@dataclasses.dataclass(frozen=True)
class QFormat:
    """Static facts of a quantized format (hashable: part of the jit cache key)."""

    name: str
    bits: int  # code width: 4, 5, 6 or 8
    group: int  # inputs sharing one scale
    signed: bool = False  # 8-bit codes read as int8 (Q8_0)
    offset: str = "none"  # one of OFFSETS, see the module docstring
    const: int = 0  # offset "const": w = (q - const) * s
    super_group: int = 0  # > 0: two-level scales over super-blocks of this many inputs
    sub_signed: bool = False  # two-level sub-scales are int8 (Q6_K), else uint8

    def __post_init__(self) -> None:
        if self.bits not in (4, 5, 6, 8):
            raise ValueError(f"{self.name}: {self.bits}-bit codes are not supported (4, 5, 6, 8)")
        if self.offset not in OFFSETS:
            raise ValueError(f"{self.name}: offset {self.offset!r} is not one of {OFFSETS}")
        if self.offset == "kmin" and not self.super_group:
            raise ValueError(f"{self.name}: offset 'kmin' needs two-level scales")
        if self.group % (2 * self.split[1]) or (self.super_group and self.super_group % self.group):
            raise ValueError(f"{self.name}: group {self.group} does not fit {self.bits}-bit packing")

    @property
    def split(self) -> tuple[int, int, int]:
        """(A, B, W): how one group's elements are laid over the byte planes."""
        if self.bits == 8:
            return 1, 1, self.group
        b = 1 if self.bits == 4 else 4 // (self.bits - 4)
        return 2, b, self.group // (2 * b)

    @property
    def sub_per_super(self) -> int:
        return self.super_group // self.group if self.super_group else 1

    @property
    def bits_per_weight(self) -> float:
        """Bytes of codes, scales and offsets per element, times 8 (what a matmul streams)."""
        per_group = 2 if not self.super_group else 1  # f16 scale, or a byte sub-scale
        per_group += {"none": 0, "const": 0, "min": 2, "kmin": 1, "zero": 1}[self.offset]
        per_super = 2 * (1 + (self.offset == "kmin")) if self.super_group else 0
        return self.bits + 8 * per_group / self.group + (8 * per_super / self.super_group if per_super else 0)


def gptq_format(bits: int, group: int) -> QFormat:
    """GPTQ / AWQ: unsigned codes, an f16 scale and a uint8 zero point per group: w = (q - z) * s."""
    if bits not in (4, 8):
        raise CheckpointError(f"quantization_config.bits = {bits}: only 4 and 8 bits are supported")
    return QFormat(f"int{bits}-g{group}", bits, group, offset="zero")


GGUF_FORMATS: dict[str, QFormat] = {
    "Q4_0": QFormat("Q4_0", 4, 32, offset="const", const=8),
    "Q4_1": QFormat("Q4_1", 4, 32, offset="min"),
    "Q5_0": QFormat("Q5_0", 5, 32, offset="const", const=16),
    "Q5_1": QFormat("Q5_1", 5, 32, offset="min"),
    "Q8_0": QFormat("Q8_0", 8, 32, signed=True),
    "Q4_K": QFormat("Q4_K", 4, 32, offset="kmin", super_group=256),
    "Q5_K": QFormat("Q5_K", 5, 32, offset="kmin", super_group=256),
    "Q6_K": QFormat("Q6_K", 6, 16, offset="const", const=32, super_group=256, sub_signed=True),
}


@dataclasses.dataclass(frozen=True)
class QuantWeight:
    """A quantized [out, in] linear weight, or an [experts, out, in] stack of them, in the kernel
    layout (see the module docstring; the leaf shapes below are those of one 2-D weight, a stack
    has one more leading expert axis on each)."""

    lo: jax.Array  # uint8 (int8 for signed 8-bit) [N_pad, K/G, B, W]
    hi: jax.Array | None  # uint8 [N_pad, K/G, W] for 5- and 6-bit codes
    scales: jax.Array  # [N_pad, K/G]: f16, or uint8/int8 sub-scales (two-level)
    super_scales: jax.Array | None  # f16 [N_pad, K/S] (two-level)
    offsets: jax.Array | None  # [N_pad, K/G]: f16 min ("min"), uint8 ("kmin", "zero")
    super_offsets: jax.Array | None  # f16 [N_pad, K/S] ("kmin")
    perm: jax.Array | None  # int32 [K]: input column feeding each stored column (act-order)
    fmt: QFormat = dataclasses.field(default=GGUF_FORMATS["Q8_0"], metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(default=(0, 0), metadata=dict(static=True))  # (E,) out, in
    compute_dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[-2]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def groups(self) -> int:
        return self.shape[-1] // self.fmt.group

    @property
    def lead(self) -> tuple[int, ...]:
        """The leading (expert) dims as the leaves have them: (E,) for a stack; () for a 2-D weight,
        and for one expert of a stack inside a scan over its experts."""
        return tuple(self.lo.shape[:-4])

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """Shape of `dequantize()`: leading dims from the leaves (correct under scan / vmap)."""
        return (*self.lead, self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        leaves = jax.tree_util.tree_leaves(self)
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves)

    def stream_bytes(self) -> int:
        """Bytes a matmul reads (the logical rows, without the perm vector); a stack's: all experts'."""
        return int(math.prod(self.shape) * self.fmt.bits_per_weight / 8)

    # ---- the pure-jnp reference ---------------------------------------------------------------

    def codes(self) -> jax.Array:
        """int32 [..., N_pad, K/G, A, B, W]: every element's integer code (before scale and offset)."""
        f = self.fmt
        lo = self.lo.astype(jnp.int32)
        if f.bits == 8:
            return lo[..., None, :, :]
        q = jnp.stack([lo & 15, lo >> 4], axis=-3)  # [..., N, K/G, A, B, W]
        if self.hi is None:
            return q
        hb = f.bits - 4
        _, b, _ = f.split
        field = jnp.arange(2 * b, dtype=jnp.int32).reshape(2, b, 1)  # a * B + b
        high = (self.hi.astype(jnp.int32)[..., None, None, :] >> (hb * field)) & ((1 << hb) - 1)
        return q | (high << 4)

    def group_scales(self) -> jax.Array:
        """float32 [..., N_pad, K/G]: s per group."""
        f = self.fmt
        s = self.scales.astype(jnp.float32)
        if f.super_group:
            s = jnp.repeat(self.super_scales.astype(jnp.float32), f.sub_per_super, axis=-1) * s
        return s

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The logical [..., out, in] weight in the original column order; traceable."""
        f = self.fmt
        lead, n_pad = self.lead, self.lo.shape[-4]
        q = self.codes().reshape(*lead, n_pad, self.groups, f.group)
        s = self.group_scales()[..., None]
        if f.offset in ("const", "zero"):
            z = f.const if f.offset == "const" else self.offsets.astype(jnp.int32)[..., None]
            w = (q - z).astype(jnp.float32) * s  # ggml / GPTQ order of operations
        else:
            w = q.astype(jnp.float32) * s
            if f.offset == "min":
                w = w + self.offsets.astype(jnp.float32)[..., None]
            elif f.offset == "kmin":
                dmin = jnp.repeat(self.super_offsets.astype(jnp.float32), f.sub_per_super, axis=-1)
                w = w - (dmin * self.offsets.astype(jnp.float32))[..., None]
        w = w.reshape(*lead, n_pad, self.cols)[..., : self.rows, :]
        if self.perm is not None:
            w = _unpermute(w, self.perm)
        return w.astype(dtype)

    def take_rows(self, rows: jax.Array) -> QuantWeight:
        """The rows `rows` (any int shape [...]) as a QuantWeight of shape [prod(...), K] (for embed)."""
        if self.ndim != 2:
            raise ValueError(f"take_rows: a {self.fmt.name} stack of shape {self.shape} has no rows to take; "
                             "take_experts first")
        flat = rows.reshape(-1)
        pick = lambda a: None if a is None else jnp.take(a, flat, axis=0)
        n = flat.shape[0]
        return QuantWeight(pick(self.lo), pick(self.hi), pick(self.scales), pick(self.super_scales),
                           pick(self.offsets), pick(self.super_offsets), self.perm, self.fmt,
                           (n, self.shape[1]), self.compute_dtype)

    # ---- expert stacks ------------------------------------------------------------------------

    def take_experts(self, idx: jax.Array) -> QuantWeight:
        """The experts `idx` (int [...]) of a stack: a QuantWeight of shape (*idx.shape, out, in);
        only the packed leaves are gathered (nothing is decoded)."""
        if self.ndim != 3:
            raise ValueError(f"take_experts: the {self.fmt.name} weight of shape {self.shape} is not an "
                             "[experts, out, in] stack")
        pick = lambda a: None if a is None else jnp.take(a, idx, axis=0)
        return QuantWeight(*(pick(getattr(self, name)) for name in _LEAVES), self.fmt,
                           (*idx.shape, *self.shape[-2:]), self.compute_dtype)

    def __getitem__(self, idx: Any) -> QuantWeight:
        """Index a stack's expert axis, e.g. `w[4:8]` (an expert-parallel shard) or `w[e]`."""
        if self.ndim != 3:
            raise IndexError(f"QuantWeight of shape {self.shape}: only [experts, out, in] stacks are indexed")
        lo = self.lo[idx]
        if lo.ndim not in (4, 5) or lo.shape[-4:] != self.lo.shape[-4:]:
            raise IndexError(f"QuantWeight index {idx!r} must pick experts and leave the rows and columns whole")
        pick = lambda a: None if a is None else a[idx]
        lead = lo.shape[:-4]
        return QuantWeight(*(pick(getattr(self, name)) for name in _LEAVES), self.fmt,
                           (*lead, *self.shape[-2:]), self.compute_dtype)

    @staticmethod
    def stack(weights: list[QuantWeight]) -> QuantWeight:
        """One [experts, out, in] stack of 2-D weights of one format, shape and compute dtype
        (each expert's leaves as they are: exact); act-order perms are stacked too ([E, K])."""
        first = weights[0]
        for i, w in enumerate(weights):
            if w.ndim != 2 or w.fmt != first.fmt or w.shape != first.shape or w.compute_dtype != first.compute_dtype:
                raise ValueError(f"QuantWeight.stack: weight {i} is {w.fmt.name} {w.shape} ({w.compute_dtype}), "
                                 f"weight 0 is {first.fmt.name} {first.shape} ({first.compute_dtype})")
            if (w.perm is None) != (first.perm is None):
                raise ValueError(f"QuantWeight.stack: weight {i} {'has' if w.perm is not None else 'lacks'} an "
                                 "act-order permutation and weight 0 does not")

        def stacked(name: str) -> jax.Array | None:
            leaves = [getattr(w, name) for w in weights]
            return None if leaves[0] is None else jnp.stack(leaves)

        return QuantWeight(*(stacked(name) for name in _LEAVES), first.fmt, (len(weights), *first.shape),
                           first.compute_dtype)

    # ---- construction -------------------------------------------------------------------------

    @staticmethod
    def from_codes(codes: Any, scales: Any, fmt: QFormat, *, zeros: Any = None, mins: Any = None,
                   super_scales: Any = None, super_offsets: Any = None, perm: Any = None,
                   compute_dtype: Any = "float32", device: Any = None) -> QuantWeight:
        """Pack integer codes [N, K] (unsigned, or int8 for a signed 8-bit format) with their per-group
        scales [N, K/G] (f16 direct scales, or the uint8/int8 sub-scales of a two-level format) and the
        offsets the format names: `zeros` uint8 [N, K/G] ("zero"), `mins` ("min": f16 [N, K/G];
        "kmin": uint8 [N, K/G] with `super_offsets` f16 [N, K/S]). `perm`: see the module docstring."""
        codes = jnp.asarray(codes, device=device)
        n, k = codes.shape
        if k % fmt.group:
            raise CheckpointError(f"{fmt.name}: {k} inputs are not a multiple of the group size {fmt.group}")
        if fmt.super_group and k % fmt.super_group:
            raise CheckpointError(f"{fmt.name}: {k} inputs are not a multiple of {fmt.super_group}")
        offsets = {"none": None, "const": None, "min": mins, "kmin": mins, "zero": zeros}[fmt.offset]
        if fmt.offset in ("min", "kmin", "zero") and offsets is None:
            raise ValueError(f"{fmt.name}: offset {fmt.offset!r} needs its per-group values")
        f16 = lambda a: None if a is None else jnp.asarray(a, device=device).astype(jnp.float16)
        sub_dtype = jnp.float16 if not fmt.super_group else (jnp.int8 if fmt.sub_signed else jnp.uint8)
        off_dtype = jnp.float16 if fmt.offset == "min" else jnp.uint8
        parts = (_pack_codes(codes, fmt), jnp.asarray(scales, device=device).astype(sub_dtype),
                 f16(super_scales), None if offsets is None else jnp.asarray(offsets, device=device).astype(off_dtype),
                 f16(super_offsets))
        (lo, hi), scales_, sup, off, sup_off = jax.tree_util.tree_map(partial(_pad_rows, n), parts)
        perm_ = None if perm is None else jnp.asarray(perm, dtype=jnp.int32, device=device)
        return QuantWeight(lo, hi, scales_, sup, off, sup_off, perm_, fmt, (n, k), jnp.dtype(compute_dtype).name)

    @staticmethod
    def concat_experts(gate: QuantWeight, up: QuantWeight) -> QuantWeight | None:
        """Two [E, F, K] stacks of one format as one [E, 2F, K] stack, [gate_e; up_e] rows per expert
        (each leaf concatenated along its row axis); None where that layout cannot hold them: other
        formats, shapes or compute dtypes, act-order permutations, or padded rows (F not a multiple
        of ROW_PAD: the up rows would not start at row F)."""
        if not (gate.ndim == up.ndim == 3 and gate.fmt == up.fmt and gate.shape == up.shape
                and gate.compute_dtype == up.compute_dtype and gate.perm is None and up.perm is None
                and gate.lo.shape[1] == gate.shape[1]):
            return None
        leaves = [None if getattr(gate, name) is None else jnp.concatenate([getattr(gate, name), getattr(up, name)], axis=1)
                  for name in _LEAVES]
        e, f, k = gate.shape
        return QuantWeight(*leaves, gate.fmt, (e, 2 * f, k), gate.compute_dtype)

    @staticmethod
    def can_concat(weights: list[QuantWeight]) -> bool:
        first = weights[0]
        return all(w.ndim == 2 and w.fmt == first.fmt and w.shape[1] == first.shape[1] and w.perm is None
                   and w.compute_dtype == first.compute_dtype for w in weights)

    @staticmethod
    def concat(weights: list[QuantWeight]) -> QuantWeight | None:
        """Stack weights of one format along the output rows (fused q/k/v, gate/up); None if they
        differ in format, inputs or permutation."""
        first = weights[0]
        if not QuantWeight.can_concat(weights):
            return None

        def cat(*arrays):
            if arrays[0] is None:
                return None
            rows = [a[: w.shape[0]] for a, w in zip(arrays, weights)]
            return _pad_rows(sum(w.shape[0] for w in weights), jnp.concatenate(rows))

        fields = [cat(*[getattr(w, name) for w in weights]) for name in _LEAVES[:-1]]
        n = sum(w.shape[0] for w in weights)
        return QuantWeight(*fields, None, first.fmt, (n, first.shape[1]), first.compute_dtype)


_LEAVES = ["lo", "hi", "scales", "super_scales", "offsets", "super_offsets", "perm"]
jax.tree_util.register_dataclass(QuantWeight, data_fields=_LEAVES, meta_fields=["fmt", "shape", "compute_dtype"])


def _unpermute(w: jax.Array, perm: jax.Array) -> jax.Array:
    """w [..., N, K] with stored column j moved to input column perm[..., j] (perm [..., K], the
    same leading dims as w's, one permutation per expert of a stack)."""
    if perm.ndim == 1:
        return jnp.zeros_like(w).at[..., perm].set(w)
    return jax.vmap(_unpermute)(w, perm)


def _pad_rows(n: int, a: jax.Array | None) -> jax.Array | None:
    if a is None:
        return None
    pad = -n % ROW_PAD
    return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if pad else a


@partial(jax.jit, static_argnums=1)
def _pack_codes(codes: jax.Array, fmt: QFormat) -> tuple[jax.Array, jax.Array | None]:
    """codes [N, K] -> (lo [N, K/G, B, W], hi [N, K/G, W] or None)."""
    n, k = codes.shape
    a, b, w = fmt.split
    if fmt.bits == 8:
        dtype = jnp.int8 if fmt.signed else jnp.uint8
        return codes.astype(dtype).reshape(n, k // fmt.group, 1, w), None
    q = codes.astype(jnp.uint8).reshape(n, k // fmt.group, a, b, w)
    lo = (q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)
    if fmt.bits == 4:
        return lo, None
    hb = fmt.bits - 4
    shifts = (hb * jnp.arange(a * b, dtype=jnp.uint32)).reshape(a, b, 1)
    hi = jnp.sum((q >> 4).astype(jnp.uint32) << shifts, axis=(2, 3), dtype=jnp.uint32)
    return lo, hi.astype(jnp.uint8)
