"""Count XLA compilations (and their time) inside a block, through jax.monitoring events.

Used by `generate` to report compile time apart from run time, by the benchmarks to assert that
nothing recompiles after warm-up, and by the tests of shape bucketing."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import jax

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"


@dataclasses.dataclass(eq=False)  # compared by identity: nested logs must not remove each other
class CompileLog:
    compiles: int = 0  # XLA backend compilations
    traces: int = 0  # Python traces of jitted functions
    seconds: float = 0.0  # trace + lower + compile time


_ACTIVE: list[CompileLog] = []
_installed = False


def _listener(event: str, duration: float, **_: object) -> None:
    for log in _ACTIVE:
        if event == _BACKEND_COMPILE:
            log.compiles += 1
        elif event == _TRACE:
            log.traces += 1
        if event.startswith("/jax/core/compile/"):
            log.seconds += duration


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileLog]:
    global _installed
    if not _installed:
        jax.monitoring.register_event_duration_secs_listener(_listener)
        _installed = True
    log = CompileLog()
    _ACTIVE.append(log)
    try:
        yield log
    finally:
        _ACTIVE.remove(log)


DEFAULT_CACHE_DIR = Path.home() / ".cache" / "ferrum-jax" / "xla"


def enable_persistent_cache(path: str | Path | None = DEFAULT_CACHE_DIR) -> Path | None:
    """Keep compiled programs on disk (JAX's persistent compilation cache) so a second process
    skips XLA compilation. None turns it off. Applies to programs compiled from now on."""
    if path is None:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program, however small or quick to compile: decode programs are both.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
