"""`GGUFWeight`: a GGUF tensor kept packed on device, as a pytree node.

The raw ggml blocks stay on device as one uint8 array (the only pytree leaf); the ggml type and the
logical shape are static metadata in the treedef. The jitted forward calls `w.dequantize(dtype)`
right where the weight is used, so XLA fuses the block decoding into the consumer instead of a
dequantized copy ever being materialised at load time.

Layout: a GGUF row is the inputs of one output feature, so a linear weight of logical shape
`(out_features, in_features)` (HF / row-major order; GGUF lists the dims reversed) is stored as
`data: uint8 [out_features, in_features // block_size * type_size]`. Leading stacked dims are
allowed (`(experts, out, in)`, `(layers, out, in)`): only the last dim is blocked.

Inside `lax.scan` / `vmap` over a leading dim the leaf is sliced while the static `shape` is not,
so `dequantize` (and `logical_shape`) take the leading dims from `data.shape` and only the blocked
last dim from `shape`. F32/F16/BF16 tensors can be held the same way (their raw bytes, one element
per "block"), so one path serves every type.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ferrum_jax.errors import CheckpointError
from ferrum_jax.quant.gguf_blocks import LAYOUTS, BlockLayout, dequantize_blocks, layout_for


@dataclasses.dataclass(frozen=True)
class GGUFWeight:
    data: jax.Array  # uint8 [..., rows, n_blocks_per_row * type_size]
    ggml_type: str = dataclasses.field(default="F32", metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    # The model's activation dtype: what `embed` decodes gathered rows into (linear uses x's dtype).
    compute_dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

    def __post_init__(self) -> None:
        # Only touch the static fields: unflattening may put anything in `data` (tracers, None,
        # ShapeDtypeStructs, vmap axis specs), so it is not checked here.
        if self.ggml_type not in LAYOUTS:
            raise CheckpointError(f"GGUFWeight: ggml type {self.ggml_type!r} is not supported")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    # ---- static facts -------------------------------------------------------------------------

    @property
    def layout(self) -> BlockLayout:
        return LAYOUTS[self.ggml_type]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def cols(self) -> int:
        """Elements per row (the blocked dim, `in_features` for a linear weight)."""
        return self.shape[-1]

    @property
    def blocks_per_row(self) -> int:
        return self.cols // self.layout.block_size

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """Shape of `dequantize()`: leading dims from `data` (correct under scan/vmap)."""
        return (*self.data.shape[:-1], self.cols)

    @property
    def nbytes(self) -> int:
        """Bytes the packed weight occupies on device."""
        return math.prod(self.data.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.layout.type_size / self.layout.block_size

    # ---- compute ------------------------------------------------------------------------------

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The logical tensor, `dtype [..., rows, cols]`; traceable, meant to run inside jit."""
        layout = self.layout
        lead = self.data.shape[:-1]
        blocks = self.data.reshape(*lead, self.blocks_per_row, layout.type_size)
        out = dequantize_blocks(self.ggml_type, blocks)
        return out.astype(dtype)

    def __getitem__(self, idx: Any) -> GGUFWeight:
        """Index the leading (stacked) dims, e.g. `w[expert]`; the blocked last dim stays whole."""
        data = self.data[idx]
        if data.ndim < 2 or data.shape[-1] != self.data.shape[-1]:
            raise IndexError(f"GGUFWeight index {idx!r} must leave the last two dims whole")
        return GGUFWeight(data, self.ggml_type, (*data.shape[:-1], self.cols), self.compute_dtype)

    # ---- construction -------------------------------------------------------------------------

    @staticmethod
    def byte_shape(ggml_type: Any, shape: tuple[int, ...], tensor_name: str = "<tensor>"):
        layout = layout_for(ggml_type, tensor_name)
        if len(shape) < 1 or shape[-1] % layout.block_size:
            raise CheckpointError(
                f"tensor {tensor_name!r}: last dim of shape {tuple(shape)} is not a multiple of "
                f"the {layout.name} block size {layout.block_size}"
            )
        return (*shape[:-1], layout.bytes_per_row(shape[-1]))

    @staticmethod
    def from_numpy(
        raw: np.ndarray,
        ggml_type: Any,
        shape: tuple[int, ...],
        tensor_name: str = "<tensor>",
        device: Any = None,
        compute_dtype: Any = "float32",
    ) -> GGUFWeight:
        """Wrap the raw bytes of a GGUF tensor (as `GGUFReader` gives `tensor.data`: uint8 blocks
        for quantized types, float32/float16 for F32/F16). `ggml_type` is a type name, int or
        `gguf.GGMLQuantizationType`; `shape` is the logical row-major shape (GGUF dims reversed)."""
        layout = layout_for(ggml_type, tensor_name)
        shape = tuple(int(s) for s in shape)
        byte_shape = GGUFWeight.byte_shape(layout.name, shape, tensor_name)
        raw = np.ascontiguousarray(raw)
        if raw.nbytes != math.prod(byte_shape):
            raise CheckpointError(
                f"tensor {tensor_name!r}: {raw.nbytes} bytes of {layout.name} data do not hold "
                f"shape {shape} ({math.prod(byte_shape)} bytes expected)"
            )
        raw = raw.reshape(-1).view(np.uint8).reshape(byte_shape)
        data = jax.device_put(raw, device) if device is not None else jnp.asarray(raw)
        return GGUFWeight(data, layout.name, shape, jnp.dtype(compute_dtype).name)


jax.tree_util.register_dataclass(GGUFWeight, data_fields=["data"],
                                 meta_fields=["ggml_type", "shape", "compute_dtype"])
