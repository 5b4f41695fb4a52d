"""The run's settings: defaults, paths and `BenchConfig` (what `run_bench` takes)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from ferrum_jax.backend import Ops
from ferrum_jax.bench.weights import DENSE_DTYPES, QUANT_SCALES
from ferrum_jax.errors import ConfigError
from ferrum_jax.shapes import SHAPES

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "bench" / "results"
DEFAULT_PEER_SCRIPTS = {"torch": REPO / "bench" / "peers" / "torch_peer.py"}

DEFAULT_BATCHES = (1, 8, 32, 128)
DEFAULT_CONTEXTS = (1024, 4096)
DEFAULT_PREFILL = (512, 2048, 8192)
DEFAULT_STEPS = 64
DEFAULT_RUNS = 3
DEFAULT_TIME_BUDGET = 450.0  # seconds for the whole run: sweep points past it are skipped, with a note
DEFAULT_PEER_BUDGET = 150.0  # seconds for all peer subprocesses together (at most 35% of the time budget)
COMPILE_CHECK_RESERVE = 100.0  # seconds of the time budget kept for the compile-cache check
PROMPT_MARGIN = 16  # cache slots beyond context + steps


def now() -> float:
    return time.perf_counter()


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tail(text: str, n: int = 800) -> str:
    text = text.strip()
    return text[-n:] if len(text) > n else text


@dataclasses.dataclass
class BenchConfig:
    shape: str | None = "llama-3.1-8b"  # a name in ferrum_jax.shapes.SHAPES (random weights)
    model: str | None = None  # or a model path / alias for ferrum_jax.load (overrides shape)
    dtype: str = "bf16"  # bf16 | f16 | f32 (dense) or a GGUF block type: q8_0, q4_k, ...
    batches: tuple[int, ...] = DEFAULT_BATCHES
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    prefill: tuple[int, ...] = DEFAULT_PREFILL
    steps: int = DEFAULT_STEPS
    runs: int = DEFAULT_RUNS
    peer: str = "none"  # "torch" or "none"
    peer_script: str | None = None  # default: bench/peers/<peer>_peer.py
    peer_points: tuple[tuple[int, int, int], ...] | None = None  # (batch, context, prefill); default: one per batch
    peer_budget: float = DEFAULT_PEER_BUDGET
    peer_args: tuple[str, ...] = ()  # passed on to the peer, e.g. ("--device", "cpu")
    compile_cache_check: bool = False
    compile_cache: str | None = None  # enable the persistent cache in this process too (then "cold" is not cold)
    out: str | None = str(DEFAULT_OUT)  # folder for the JSON (and plots); None: write nothing
    plot: bool = False
    commit: str | None = None  # default: git rev-parse HEAD
    time_budget: float | None = DEFAULT_TIME_BUDGET
    copy_bytes: int | None = None  # ceilings' sizes (default by device)
    matmul_n: int | None = None
    ceiling_reps: int | None = None
    seed: int = 0
    force: tuple[tuple[str, str], ...] = ()  # (op, implementation) pins, as Ops(force=...)
    command: str | None = None  # recorded in the JSON

    def validate(self) -> None:
        try:
            Ops(force=self.force)
        except ValueError as e:
            raise ConfigError(f"--force: {e}") from None
        if self.model is None and self.shape is None:
            raise ConfigError("give a --shape or a --model")
        if self.model is None and self.shape not in SHAPES:
            raise ConfigError(f"unknown model shape {self.shape!r}; known: {', '.join(SHAPES)}")
        d = self.dtype.lower()
        if d not in DENSE_DTYPES and d.upper() not in QUANT_SCALES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose bf16, f16, f32 or one of "
                              f"{', '.join(t.lower() for t in QUANT_SCALES)}")
        if self.model is not None and d not in DENSE_DTYPES:
            raise ConfigError("--dtype with --model is the activation dtype (bf16, f16 or f32); a GGUF file "
                              "keeps its own quantized types")
        for name in ("batches", "contexts", "prefill"):
            if any(int(v) < 1 for v in getattr(self, name)):
                raise ConfigError(f"{name}: every value must be >= 1, got {getattr(self, name)}")
        if self.steps < 1 or self.runs < 1:
            raise ConfigError(f"steps and runs must be >= 1 (got {self.steps}, {self.runs})")
        if self.peer not in ("none", *DEFAULT_PEER_SCRIPTS):
            raise ConfigError(f"--peer {self.peer!r}: choose none or {', '.join(DEFAULT_PEER_SCRIPTS)}")

    @property
    def quant_type(self) -> str | None:
        d = self.dtype.lower()
        return None if d in DENSE_DTYPES else d.upper()

    @property
    def compute_dtype(self) -> str:
        return DENSE_DTYPES.get(self.dtype.lower(), "bfloat16")

    @property
    def dtype_tag(self) -> str:
        d = self.dtype.lower()
        return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(d, d)
