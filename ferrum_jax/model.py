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
from ferrum_jax.backend import DEFAULT_OPS, Ops
from ferrum_jax.errors import ConfigError, ModelNotFoundError
from ferrum_jax.loading.safetensors import load_tensors
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

    @property
    def family(self):
        return models.family_of(self.config)

    @property
    def dtype(self) -> jnp.dtype:
        return jax.tree_util.tree_leaves(self.weights)[0].dtype

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


def load(path: str | Path, *, dtype: str | jnp.dtype | None = "auto", ops: Ops = DEFAULT_OPS,
         progress: bool = True) -> Model:
    """Load an HF checkpoint directory (config.json, *.safetensors, tokenizer files)."""
    start = time.perf_counter()
    model_dir = Path(path).expanduser()
    if not model_dir.exists():
        raise ModelNotFoundError(f"model path {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model path {model_dir} is not a directory of an HF checkpoint")
    cfg = read_config(model_dir)
    family = models.family_of(cfg)
    tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    tensors = load_tensors(model_dir, family.tensor_shapes(cfg), dtype=resolve_dtype(dtype), progress=progress)
    weights = family.build_weights(cfg, tensors)
    return Model(cfg, weights, tokenizer, name=model_dir.name, ops=ops, load_seconds=time.perf_counter() - start)
