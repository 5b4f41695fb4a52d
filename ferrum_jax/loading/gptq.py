"""Load GPTQ / AWQ HF checkpoints: each quantized linear becomes a `QuantWeight` on device.

`load_hf_tensors` is `load_tensors` for every HF checkpoint directory: a config.json without a
`quantization_config` goes straight to `load_tensors`; with one (GPTQ or AWQ, see
`ferrum_jax.quant.gptq`), every expected `<prefix>.weight` for which the checkpoint holds
`<prefix>.qweight` is read from its published tensors instead, and everything else (embeddings,
norms, biases, an unquantized lm_head) loads as usual. All headers are checked before any byte moves.
The families need no change: models call `ops.linear(x, w)` and QuantWeight has its own `linear`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm

from ferrum_jax.errors import CheckpointError, ConfigError, FerrumError
from ferrum_jax.loading.safetensors import Placement, TensorInfo, _resolve, load_tensors, read_tensor_infos
from ferrum_jax.quant.gptq import QuantConfig, to_codes
from ferrum_jax.quant.qweight import QuantWeight, gptq_format

# Safetensors dtypes of the published tensors (scales are float16 as written; bf16 / f32 also read).
DTYPES = {"qweight": ("I32",), "qzeros": ("I32",), "scales": ("F16", "BF16", "F32"), "g_idx": ("I32", "I64")}


def read_quant_config(model_dir: str | Path) -> QuantConfig | None:
    """The checkpoint's `quantization_config`, or None for a dense checkpoint."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None  # not an HF directory: load_tensors names what is missing
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from None
    q = d.get("quantization_config")
    return None if q is None else QuantConfig.from_hf(q, where=f"{path}: quantization_config")


def packed_shapes(cfg: QuantConfig, prefix: str, n: int, k: int) -> dict[str, tuple[int, ...]]:
    """Published tensor name -> shape of one quantized [N=out, K=in] linear (g_idx optional)."""
    p, groups = cfg.pack, cfg.num_groups(k)
    if cfg.method == "gptq":
        if k % p or n % p:
            raise CheckpointError(f"{prefix}: shape ({n}, {k}) cannot be GPTQ-packed ({p} codes per int32 word)")
        return {f"{prefix}.qweight": (k // p, n), f"{prefix}.qzeros": (groups, n // p),
                f"{prefix}.scales": (groups, n), f"{prefix}.g_idx": (k,)}
    if n % p:
        raise CheckpointError(f"{prefix}: {n} output features cannot be AWQ-packed ({p} codes per int32 word)")
    return {f"{prefix}.qweight": (k, n // p), f"{prefix}.qzeros": (groups, n // p), f"{prefix}.scales": (groups, n)}


def _check(infos: Mapping[str, TensorInfo], cfg: QuantConfig, prefix: str, shape: tuple[int, ...]) -> list[str]:
    """Names, shapes and dtypes of one linear's published tensors against the config; their names."""
    if len(shape) != 2:
        raise CheckpointError(f"{prefix}: a quantized tensor of shape {shape} is not a 2-D linear weight")
    if prefix + ".weight" in infos:
        raise CheckpointError(f"{prefix}: the checkpoint holds both a dense .weight and a quantized .qweight")
    names = []
    for name, want in packed_shapes(cfg, prefix, *shape).items():
        info = infos.get(name)
        if info is None:
            if name.endswith(".g_idx") and not cfg.desc_act:
                continue  # old GPTQ checkpoints without act-order omit it: groups are then contiguous
            raise CheckpointError(f"checkpoint has {prefix}.qweight but no tensor {name!r} (expected shape {want})")
        if info.shape != want:
            raise CheckpointError(f"tensor {name!r} in {info.file} has shape {info.shape}, expected {want} for a "
                                  f"{cfg.bits}-bit {cfg.method.upper()} layer of shape {tuple(shape)} "
                                  f"(group_size {cfg.group_size})")
        allowed = DTYPES[name.rsplit(".", 1)[1]]
        if info.dtype not in allowed:
            raise CheckpointError(f"tensor {name!r} in {info.file} has dtype {info.dtype}; expected {', '.join(allowed)}")
        names.append(name)
    return names


def load_hf_tensors(model_dir: str | Path, expected: Mapping[str, tuple[int, ...]], *, dtype: Any,
                    optional: Collection[str] = (), placement: Placement = None,
                    progress: bool = True) -> dict[str, jax.Array | QuantWeight]:
    """`load_tensors` (same arguments) for a dense or a GPTQ / AWQ checkpoint (see the module docstring)."""
    model_dir = Path(model_dir)
    cfg = read_quant_config(model_dir)
    if cfg is None:
        return load_tensors(model_dir, expected, dtype=dtype, optional=optional, placement=placement,
                            progress=progress)
    infos = read_tensor_infos(model_dir)
    quantized = {name[: -len(".weight")]: tuple(shape) for name, shape in expected.items()
                 if name.endswith(".weight") and name[: -len(".weight")] + ".qweight" in infos}
    parts = {prefix: _check(infos, cfg, prefix, shape) for prefix, shape in quantized.items()}
    quant_names = {prefix + ".weight" for prefix in quantized}
    dense = load_tensors(model_dir, {n: s for n, s in expected.items() if n not in quant_names},
                         dtype=dtype, optional=optional, placement=placement, progress=progress)
    out: dict[str, Any] = dict(dense)
    prefix = None
    try:
        with contextlib.ExitStack() as stack:
            files = {}

            def read(name: str) -> np.ndarray:
                file = infos[name].file
                if file not in files:
                    files[file] = stack.enter_context(safe_open(file, framework="numpy"))
                return files[file].get_tensor(name)

            for prefix in tqdm(quantized, desc=f"{cfg.method} {model_dir.resolve().name}", disable=not progress):
                tensors = {name.rsplit(".", 1)[1]: read(name) for name in parts[prefix]}
                _check_stray_bias(infos, expected, prefix, read)
                codes, scales, zeros, perm = to_codes(tensors, cfg, name=prefix)
                k = codes.shape[1]
                w = QuantWeight.from_codes(codes, scales, gptq_format(cfg.bits, cfg.group(k)), zeros=zeros, perm=perm,
                                           compute_dtype=dtype, device=_resolve(placement, prefix + ".weight"))
                jax.block_until_ready(w)  # one layer's host copies at a time; a device OOM surfaces here
                out[prefix + ".weight"] = w
    except BaseException as e:
        for leaf in jax.tree_util.tree_leaves(out):
            with contextlib.suppress(Exception):
                leaf.delete()
        if isinstance(e, FerrumError) or not isinstance(e, Exception):
            raise
        raise CheckpointError(f"failed to load quantized layer {prefix!r} from {model_dir}: "
                              f"{type(e).__name__}: {e}") from e
    return {name: out[name] for name in expected if name in out}


def _check_stray_bias(infos: Mapping[str, TensorInfo], expected: Mapping[str, Any], prefix: str, read) -> None:
    """Some GPTQ exports write a `.bias` for every quantized layer, also where the model has none:
    fine when it is all zeros, else the model would silently drop it."""
    name = prefix + ".bias"
    if name in infos and name not in expected and np.any(read(name).astype(np.float32) != 0):
        raise CheckpointError(f"tensor {name!r} is nonzero but the model's {prefix} has no bias")
