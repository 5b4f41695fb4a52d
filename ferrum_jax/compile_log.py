"""Count XLA compilations (and their time) inside a block, through jax.monitoring events.

Used by `generate` to report compile time apart from run time, by the benchmarks to assert that
nothing recompiles after warm-up, and by the tests of shape bucketing."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"


@dataclasses.dataclass
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
