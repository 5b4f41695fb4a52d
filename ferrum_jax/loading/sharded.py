"""Load a checkpoint straight onto a device mesh: every device receives only its slice.

The family's weights pytree is first built from lazy *sources* (nothing read yet): one per
checkpoint tensor, then rearranged for tensor parallelism by `ferrum_jax.sharding.arrange` (kv
heads replicated, q/k/v fused per shard) as row selections and concatenations of those sources.
Each leaf is then created with `jax.make_array_from_callback` under its NamedSharding: the callback
of a device reads just that device's rows (and columns) from the memory-mapped file, so host memory
stays about one slice and no device ever holds a tensor it does not own.

Safetensors: dense tensors, converted to the target dtype slice by slice. GGUF: packed quantized
weights stay packed (`GGUFWeight`; they split along rows, or along the blocked last dim only at
block boundaries), the rest is dense; with `dequantize=True` quantized slices are decoded on the
host's CPU device by the same jnp dequantizers as the unsharded loader (bit-identical).
A dim that does not split evenly over its mesh axis is a CheckpointError naming the tensor and axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open
from tqdm.auto import tqdm

import models
from ferrum_jax import sharding as sh
from ferrum_jax.errors import CheckpointError, ConfigError, FerrumError
from ferrum_jax.loading import gguf as gg
from ferrum_jax.loading.safetensors import SUPPORTED_DTYPES, _validate, read_tensor_infos
from ferrum_jax.quant import LAYOUTS, GGUFWeight


# --- lazy sources: `rows(idx)` reads those rows (all columns) as numpy ----------------------------


@dataclasses.dataclass(eq=False)
class SafetensorsTensor:
    name: str
    file: Path
    shape: tuple[int, ...]
    target: np.dtype
    files: Any  # _Files: open handles
    packed: str | None = None  # ggml type of packed bytes (never, here)

    @property
    def logical_shape(self) -> tuple[int, ...]:
        return self.shape

    def rows(self, idx: np.ndarray) -> np.ndarray:
        lo, hi = int(idx.min()), int(idx.max()) + 1
        block = self.files.get(self.file).get_slice(self.name)[lo:hi]
        if len(idx) != hi - lo or np.any(idx != np.arange(lo, hi)):
            block = block[idx - lo]
        return np.asarray(block).astype(self.target, copy=False)


@dataclasses.dataclass(eq=False)
class GGUFTensor:
    plan: Any  # loading.gguf._Plan
    target: np.dtype

    @property
    def packed(self) -> str | None:
        return self.plan.ggml_type if self.plan.packed else None

    @property
    def logical_shape(self) -> tuple[int, ...]:
        return self.plan.shape

    @property
    def shape(self) -> tuple[int, ...]:  # of the array placed: uint8 blocks when packed
        p = self.plan
        return GGUFWeight.byte_shape(p.ggml_type, p.shape, p.hf_name) if p.packed else p.shape

    def rows(self, idx: np.ndarray) -> np.ndarray:
        p = self.plan
        raw = np.asarray(p.tensor.data).reshape(-1).view(np.uint8)
        src = idx if p.rows is None else p.rows[idx]
        if len(p.shape) == 1:
            if p.ggml_type in gg._FLOAT_TYPES:
                values = raw.view(gg._HOST_DTYPES[p.ggml_type])[src].astype(np.float32)
            else:  # a quantized 1-D tensor: decode it whole (small), then pick
                values = _decode(raw, p.ggml_type, p.shape, np.float32, 0.0)[src]
            return (values - np.float32(p.norm_shift)).astype(self.target) if p.norm_shift else values.astype(self.target)
        data = raw.reshape(GGUFWeight.byte_shape(p.ggml_type, p.shape, p.hf_name))[src]  # copies these rows
        if p.packed:
            return data
        shape = (len(idx), *p.shape[1:])
        if p.ggml_type in gg._FLOAT_TYPES:
            host = data.reshape(-1).view(gg._HOST_DTYPES[p.ggml_type]).reshape(shape)
            if p.norm_shift:
                host = host.astype(np.float32) - np.float32(p.norm_shift)
            return host.astype(self.target)
        return _decode(data, p.ggml_type, shape, self.target, p.norm_shift)


def _decode(data: np.ndarray, ggml_type: str, shape: tuple[int, ...], target: np.dtype, shift: float) -> np.ndarray:
    """Quantized rows -> dense, with the unsharded loader's jnp dequantizer, on the host's CPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        w = GGUFWeight(jnp.asarray(np.ascontiguousarray(data).reshape(-1)).reshape(
            GGUFWeight.byte_shape(ggml_type, shape)), ggml_type, shape)
        return np.asarray(gg._dequant_fn(jnp.dtype(target), shift)(w))


@dataclasses.dataclass(eq=False)
class Rows:
    """Rows `idx` of `src`, in that order (a kv head replicated, a shard's block of q rows, ...)."""
    src: Any
    idx: np.ndarray

    @property
    def packed(self) -> str | None:
        return self.src.packed

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.idx), *self.src.shape[1:])

    @property
    def logical_shape(self) -> tuple[int, ...]:
        return (len(self.idx), *self.src.logical_shape[1:])

    @property
    def target(self) -> np.dtype:
        return self.src.target

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.src.rows(self.idx[idx])


@dataclasses.dataclass(eq=False)
class Concat:
    """Sources stacked along rows (dense only)."""
    parts: list

    packed = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])

    logical_shape = shape

    @property
    def target(self) -> np.dtype:
        return self.parts[0].target

    def rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), self.target)
        start = 0
        for part in self.parts:
            n = part.shape[0]
            mine = (idx >= start) & (idx < start + n)
            if mine.any():
                out[mine] = part.rows(idx[mine] - start)
            start += n
        return out


@dataclasses.dataclass(eq=False)
class Stack:
    """Per-expert sources [out, in] stacked along a new leading expert axis ([experts, out, in]),
    dense only. `block` reads just the experts (and rows) of one device's slice: a device of an
    expert-parallel mesh opens only its own experts' tensors."""
    parts: list

    packed = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    logical_shape = shape

    @property
    def target(self) -> np.dtype:
        return self.parts[0].target

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.block((idx,))

    def block(self, index: tuple) -> np.ndarray:
        """The slice `index` (per dim: slices, or an index array for the experts) as numpy."""
        experts = np.arange(len(self.parts))[index[0]]
        inner = (index + (slice(None),) * 3)[1:3]
        n = self.parts[0].shape[0]
        out = [self.parts[e].rows(np.arange(n)[inner[0]])[:, inner[1]] for e in experts]
        return np.stack(out) if out else np.empty((0, *self.shape[1:]), self.target)


def stack_experts(cfg: Any, sources: dict[str, Any]) -> None:
    """Add the MoE layers' stacked expert sources (`models.moe.stack_names`) to `sources`, built from
    the checkpoint's per-expert tensors, so that `build_weights` takes them as they are."""
    from models import moe

    if not getattr(cfg, "num_experts", 0):
        return
    for i, sparse in enumerate(cfg.sparse):
        p = f"model.layers.{i}."
        if not sparse or moe.stack_names(cfg, p)[0] in sources:
            continue
        per_expert = [moe._expert_names(cfg, p, e) for e in range(cfg.num_experts)]
        for j, name in enumerate(moe.stack_names(cfg, p)):
            parts = [sources[n[j]] for n in per_expert]
            if any(x.packed for x in parts) or len({x.target for x in parts}) > 1:
                raise ConfigError(f"{name}: the experts of one projection must be dense of one dtype to load "
                                  "onto a mesh")
            sources[name] = Stack(parts)


SOURCE = (SafetensorsTensor, GGUFTensor, Rows, Concat, Stack)
SOURCE_ROWS = sh.RowOps(take=Rows, concat=Concat,
                        fusable=lambda *xs: all(x.packed is None for x in xs) and len({x.target for x in xs}) == 1)


class _Files:
    """safetensors handles, opened on first use and closed together."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack, self.handles = stack, {}

    def get(self, file: Path) -> Any:
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(safe_open(file, framework="numpy"))
        return self.handles[file]


# --- placing ------------------------------------------------------------------------------------


def place(name: str, src: Any, axes: tuple[str, ...], mesh: Mesh) -> jax.Array | GGUFWeight:
    """One source onto the mesh: each device's callback reads only its slice."""
    sharding = NamedSharding(mesh, sh.spec(axes))
    block = LAYOUTS[src.packed].block_size if src.packed else 1
    sh.check_split(name, src.logical_shape, sharding.spec, mesh, block)
    n, memo = src.shape[0], {}

    def read(index: tuple) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in memo:  # devices that replicate a slice share one read
            if isinstance(src, Stack):  # only this device's experts (and rows) are read
                memo[key] = src.block(index)
            else:
                memo[key] = src.rows(np.arange(n)[index[0]])[(slice(None), *index[1:])]
        return memo[key]

    arr = jax.make_array_from_callback(src.shape, sharding, read)
    if src.packed:
        return GGUFWeight(arr, src.packed, src.logical_shape, jnp.dtype(src.target).name)
    return arr


def place_all(weights: Any, mesh: Mesh, where: str, progress: bool) -> Any:
    """Every source leaf of `weights` onto the mesh (a leaf used twice, tied embeddings, once). On
    failure every array already placed is deleted before the error propagates."""
    leaves = {id(x) for x in jax.tree_util.tree_leaves(weights, is_leaf=lambda x: isinstance(x, SOURCE))}
    placed: list[Any] = []
    bar = tqdm(total=len(leaves), unit="tensor", desc=f"loading {where} sharded", disable=not progress)
    current = None

    def put(path: tuple, src: Any) -> Any:
        nonlocal current
        current = sh._path_name(path)
        out = place(current, src, sh.logical_axes(path, src), mesh)
        jax.block_until_ready(out)
        placed.append(out)
        bar.update(1)
        return out

    try:
        return sh._unique_map(put, weights, is_leaf=lambda x: isinstance(x, SOURCE))
    except BaseException as e:
        for leaf in jax.tree_util.tree_leaves(placed):
            with contextlib.suppress(Exception):
                leaf.delete()
        if isinstance(e, FerrumError) or not isinstance(e, Exception):
            raise
        raise CheckpointError(f"{where}: failed to load tensor {current!r}: {gg._one_line(e)}") from e
    finally:
        bar.close()


def load_safetensors_sharded(model_dir: str | Path, cfg: Any, mesh: Mesh, *, dtype: Any, progress: bool = True
                             ) -> tuple[Any, Any]:
    """(sharded config, weights on the mesh) of an HF checkpoint directory."""
    model_dir = Path(model_dir)
    sharded_cfg = sh.sharded_config(cfg, mesh)  # config errors before any read
    config = model_dir / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        raise ConfigError(f"{model_dir}: sharded loading of quantized (GPTQ/AWQ) HF checkpoints is not supported yet; "
                          "load it without a mesh")
    family = models.family_of(cfg)
    target = np.dtype(jnp.dtype(dtype))
    infos = _validate(model_dir, read_tensor_infos(model_dir), family.tensor_shapes(cfg), ())
    with contextlib.ExitStack() as stack:
        files = _Files(stack)
        sources = {i.name: SafetensorsTensor(i.name, i.file, i.shape, target, files) for i in infos
                   if i.dtype in SUPPORTED_DTYPES}
        stack_experts(cfg, sources)
        weights = sh.arrange(family.build_weights(cfg, sources), cfg, sh.axis_size(mesh, "model"), SOURCE_ROWS)
        return sharded_cfg, place_all(weights, mesh, str(model_dir), progress)


def load_gguf_sharded(path: str | Path, mesh: Mesh, *, dtype: Any, dequantize: bool | None = None,
                      progress: bool = True) -> tuple[Any, Any, gg.GGUFMetadata]:
    """(sharded config, weights on the mesh, metadata) of a GGUF file; `dequantize` as in
    `load_gguf` (None: dequantized when the mesh's devices are CPUs, packed otherwise)."""
    path = Path(path).expanduser()
    meta = gg.read_metadata(path)
    cfg = gg.read_config(meta)
    sharded_cfg = sh.sharded_config(cfg, mesh)
    if getattr(cfg, "num_experts", 0):
        raise ConfigError(f"{path}: GGUF MoE files ({cfg.architecture}) do not load onto a mesh yet; load it "
                          "without a mesh (dequantize=True) and shard it with ferrum_jax.shard_model, or use "
                          "the HF safetensors checkpoint")
    if dequantize is None:
        dequantize = mesh.devices.flat[0].platform == "cpu"
    target = np.dtype(jnp.dtype(dtype))
    sources = {p.hf_name: GGUFTensor(p, target) for p in gg.plan_tensors(meta, cfg, dequantize=dequantize)}
    family = models.family_of(cfg)
    weights = sh.arrange(family.build_weights(cfg, sources), cfg, sh.axis_size(mesh, "model"), SOURCE_ROWS)
    return sharded_cfg, place_all(weights, mesh, str(path), progress), meta
