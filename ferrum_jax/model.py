"""`load(path)` -> a `Model`: config, weights pytree, tokenizer. The host-side handle; the hot path
only ever sees `model.weights` (a pytree) and `model.config` (static)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import models
from models.common import fuse_projections
from ferrum_jax.aliases import ALIASES, DEFAULT_MODEL
from ferrum_jax.aliases import resolve as resolve_alias
from ferrum_jax.backend import DEFAULT_OPS, Ops
from ferrum_jax.errors import ConfigError, ModelNotFoundError
from ferrum_jax.gguf_tokenizer import tokenizer_from_gguf
from ferrum_jax.loading.gguf import load_gguf
from ferrum_jax.loading.gptq import load_hf_tensors  # dense, or GPTQ / AWQ (quantization_config)
from ferrum_jax.loading.sharded import load_gguf_sharded, load_safetensors_sharded
from ferrum_jax.quant.packed import GGUFWeight
from ferrum_jax.quant.qweight import QuantWeight
from ferrum_jax.quant.repack import repack_weights
from ferrum_jax.tokenizer import Tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Model:
    config: Any  # a family's frozen Config
    weights: Any  # that family's Weights pytree
    tokenizer: Tokenizer | None
    name: str = "model"
    ops: Ops = DEFAULT_OPS
    load_seconds: float = 0.0
    mesh: jax.sharding.Mesh | None = None  # weights sharded over it (ferrum_jax.sharding), else one device

    def __post_init__(self) -> None:
        # GSPMD partitions the program of a sharded model: its ops know the mesh, so attention runs
        # on local shards in shard_map (kernels included) and other Pallas calls are skipped.
        if self.mesh is not None and self.ops.mesh is not self.mesh:
            self.ops = dataclasses.replace(self.ops, mesh=self.mesh)

    @property
    def data_parallel(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.shape["data"])

    @property
    def family(self):
        return models.family_of(self.config)

    @property
    def dtype(self) -> jnp.dtype:
        # The activation dtype: that of the dense leaves. Packed weights (GGUF blocks, the kernel
        # layout's codes and f16 scales) say theirs in `compute_dtype`.
        packed = (GGUFWeight, QuantWeight)
        for leaf in jax.tree_util.tree_leaves(self.weights, is_leaf=lambda x: isinstance(x, packed)):
            if isinstance(leaf, packed):
                return jnp.dtype(leaf.compute_dtype)
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                return leaf.dtype
        raise ConfigError("the model has no floating-point weights to take its activation dtype from")

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(_unique_leaves(self.weights)))


def _unique_leaves(tree: Any) -> list:
    seen, out = set(), []
    for leaf in jax.tree_util.tree_leaves(tree):
        if id(leaf) not in seen:  # tied embeddings appear twice
            seen.add(id(leaf))
            out.append(leaf)
    return out


def resolve_dtype(dtype: str | jnp.dtype | None) -> jnp.dtype:
    """"auto" (or None) is bfloat16 on accelerators and float32 on the CPU, where bf16 matmuls are slow."""
    if dtype is None or dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; choose one of auto, {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def read_config(model_dir: Path) -> Any:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{model_dir}: no config.json (expected an HF checkpoint directory)")
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return models.config_from_hf(d, where=str(path))


def resolve_path(path: str | Path) -> Path:
    """An alias (see `ferrum-jax models`), a .gguf file, or an HF checkpoint directory."""
    if isinstance(path, str) and path in ALIASES:
        return resolve_alias(path)
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ModelNotFoundError(f"model path {resolved} does not exist (and is not one of the aliases "
                                 f"{', '.join(ALIASES)})")
    return resolved


def load(path: str | Path = DEFAULT_MODEL, *, dtype: str | jnp.dtype | None = "auto", ops: Ops = DEFAULT_OPS,
         dequantize: bool | None = None, progress: bool = True, mesh: jax.sharding.Mesh | None = None) -> Model:
    """Load a model: an alias (the default is a small model that installs from the package index),
    a .gguf file, or an HF checkpoint directory (config.json, *.safetensors, tokenizer files).

    dequantize (GGUF only): True decodes every quantized weight to `dtype` at load time; False keeps
    them packed on device (decoded block-wise inside the jitted forward); None: packed on GPU/TPU,
    decoded on the CPU, where XLA's dense matmuls are much faster than decoding every step.

    mesh (`ferrum_jax.sharding.make_mesh`): load straight onto the mesh, each device reading only
    its slice of every tensor (tensor parallel over "model", replicated over "data"); the Model
    keeps the mesh and `generate` runs sharded.
    """
    start = time.perf_counter()
    resolved = resolve_path(path)
    name = path if isinstance(path, str) and path in ALIASES else resolved.stem
    if resolved.is_file():
        if resolved.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"model path {resolved} is a file but not a .gguf file; give a .gguf file "
                                     "or an HF checkpoint directory")
        if mesh is not None:
            cfg, weights, metadata = load_gguf_sharded(resolved, mesh, dtype=resolve_dtype(dtype),
                                                       dequantize=dequantize, progress=progress)
        else:
            cfg, weights, metadata = load_gguf(resolved, dtype=resolve_dtype(dtype), dequantize=dequantize,
                                               progress=progress)
            weights = fuse_projections(repack_weights(weights), free_inputs=True)
        # A file without tokenizer metadata still runs on token ids.
        has_tokenizer = "tokenizer.ggml.model" in metadata.reader.fields
        tokenizer = tokenizer_from_gguf(metadata.reader, str(resolved)) if has_tokenizer else None
        return Model(cfg, weights, tokenizer, name=name, ops=ops, load_seconds=time.perf_counter() - start, mesh=mesh)
    cfg = read_config(resolved)
    family = models.family_of(cfg)
    tokenizer = Tokenizer.from_dir(resolved) if (resolved / "tokenizer.json").is_file() else None
    if mesh is not None:
        cfg, weights = load_safetensors_sharded(resolved, cfg, mesh, dtype=resolve_dtype(dtype), progress=progress)
    else:
        tensors = load_hf_tensors(resolved, family.tensor_shapes(cfg), dtype=resolve_dtype(dtype), progress=progress)
        weights = fuse_projections(family.build_weights(cfg, tensors), free_inputs=True)
    return Model(cfg, weights, tokenizer, name=name, ops=ops, load_seconds=time.perf_counter() - start, mesh=mesh)
