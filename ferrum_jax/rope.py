"""Rotary position embedding parameters: the static description of one rope, and its inverse
frequencies (computed on the host in float32, once per trace, with transformers' formulas; numpy's
float32 power may differ from torch's by an ulp or two)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ferrum_jax.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class Rope:
    theta: float
    dim: int  # rotated dimensions (head_dim, or a fraction of it)
    kind: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0  # multiplies cos and sin (yarn's mscale)
    truncate: bool = True

    def inv_freq(self) -> np.ndarray:
        base = self.theta ** (np.arange(0, self.dim, 2, dtype=np.int64).astype(np.float32) / self.dim)
        inv = (1.0 / base).astype(np.float32)
        if self.kind == "linear":
            return inv / np.float32(self.factor)
        if self.kind == "llama3":
            low_wavelen = self.original_max_positions / self.low_freq_factor
            high_wavelen = self.original_max_positions / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_positions / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        if self.kind == "yarn":
            def correction_dim(rotations: float) -> float:
                return (self.dim * math.log(self.original_max_positions / (rotations * 2 * math.pi))) / (
                    2 * math.log(self.theta))
            low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
            if self.truncate:
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, self.dim - 1)
            if low == high:
                high += 0.001
            ramp = np.clip((np.arange(self.dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
            extrapolation = 1 - ramp
            interpolated = 1.0 / (self.factor * base)
            return (interpolated * (1 - extrapolation) + inv * extrapolation).astype(np.float32)
        return inv

    @staticmethod
    def from_hf(params: Mapping[str, Any] | None, *, theta: float, dim: int, max_positions: int,
                where: str = "config.json") -> Rope:
        """Build from an HF rope dict (`rope_scaling` of transformers 4, `rope_parameters` of 5)."""
        params = dict(params or {})
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        theta = float(params.get("rope_theta", theta))
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{where}: rope type {kind!r} is not supported (supported: "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)})")
        if kind == "default":
            return Rope(theta=theta, dim=dim)
        factor = float(params.get("factor", 1.0))
        if kind == "linear":
            return Rope(theta=theta, dim=dim, kind=kind, factor=factor)
        if kind == "llama3":
            return Rope(theta=theta, dim=dim, kind=kind, factor=factor,
                        low_freq_factor=float(params["low_freq_factor"]),
                        high_freq_factor=float(params["high_freq_factor"]),
                        original_max_positions=int(params["original_max_position_embeddings"]))
        original = int(params.get("original_max_position_embeddings") or max_positions)
        if "original_max_position_embeddings" in params and "factor" not in params:
            factor = max_positions / original

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        return Rope(theta=theta, dim=dim, kind=kind, factor=factor, original_max_positions=original,
                    beta_fast=float(params.get("beta_fast") or 32.0),
                    beta_slow=float(params.get("beta_slow") or 1.0),
                    attention_factor=float(attention_factor), truncate=bool(params.get("truncate", True)))
