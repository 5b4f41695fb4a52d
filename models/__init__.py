"""Model families. Each module defines `Config` (frozen, hashable, with `from_hf`), `Weights`
(a registered dataclass pytree), `tensor_shapes(cfg)` (HF tensor name -> shape), `build_weights`
and the pure function `forward(weights, tokens, positions, cache, cfg, ops, kv_len, logits_at)`."""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ferrum_jax.errors import UnsupportedArchitectureError
from models import gemma3, llama, moe

FAMILIES: tuple[ModuleType, ...] = (llama, gemma3, moe)
ARCHITECTURES: dict[str, ModuleType] = {arch: fam for fam in FAMILIES for arch in fam.ARCHITECTURES}


def family_of(cfg: Any) -> ModuleType:
    """The family module that defines this config's type."""
    for fam in FAMILIES:
        if isinstance(cfg, fam.Config):
            return fam
    raise TypeError(f"{type(cfg).__name__} is not a config of any model family")


def config_from_hf(d: Mapping[str, Any], where: str = "config.json") -> Any:
    archs = d.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError(f"{where}: no 'architectures' field; supported: {', '.join(ARCHITECTURES)}")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{where}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch].Config.from_hf(d, where)
