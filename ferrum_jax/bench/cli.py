"""The command line: `ferrum-jax bench` (its flags, `add_arguments`) and `python -m ferrum_jax.bench`
(`main`, which also serves the internal `--compile-probe` of the compile-cache check)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferrum_jax.bench import config as defaults
from ferrum_jax.bench.compile_cache import compile_probe
from ferrum_jax.bench.config import BenchConfig
from ferrum_jax.bench.report import format_table, plot
from ferrum_jax.bench.run import run_bench
from ferrum_jax.bench.weights import QUANT_SCALES
from ferrum_jax.errors import FerrumError
from ferrum_jax.shapes import SHAPES


def _pins(text: str) -> tuple[tuple[str, str], ...]:
    pins = tuple(tuple(p.strip().split("=", 1)) for p in text.split(",") if p.strip())
    if not pins or any(len(p) != 2 or not all(p) for p in pins):
        raise argparse.ArgumentTypeError(f"expected OP=IMPL[,OP=IMPL...], got {text!r}")
    return pins


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _points(text: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"peer point {item!r}: expected BATCH:CONTEXT:PREFILL")
        out.append(tuple(int(p) for p in parts))
    return tuple(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="llama-3.1-8b", help=f"a named shape with random weights: {', '.join(SHAPES)}")
    p.add_argument("--model", default=None, help="a model path or alias instead of a shape (real weights)")
    p.add_argument("--dtype", default="bf16",
                   help=f"bf16, f16, f32, or a GGUF type for random packed weights: "
                        f"{', '.join(t.lower() for t in QUANT_SCALES)} (default bf16)")
    p.add_argument("--batch", type=_ints, default=defaults.DEFAULT_BATCHES,
                   help="decode batch sizes (default 1,8,32,128)")
    p.add_argument("--context", type=_ints, default=defaults.DEFAULT_CONTEXTS,
                   help="decode context lengths (default 1024,4096)")
    p.add_argument("--prefill", type=_ints, default=defaults.DEFAULT_PREFILL,
                   help="prefill lengths (default 512,2048,8192)")
    p.add_argument("--steps", type=int, default=defaults.DEFAULT_STEPS, help="decode steps per timed run (default 64)")
    p.add_argument("--runs", type=int, default=defaults.DEFAULT_RUNS,
                   help="timed runs per point; the median counts (default 3)")
    p.add_argument("--peer", default="none", choices=["none", *defaults.DEFAULT_PEER_SCRIPTS], help="a peer to run too")
    p.add_argument("--peer-script", default=None, help="the peer's script (default bench/peers/<peer>_peer.py)")
    p.add_argument("--peer-points", type=_points, default=None, metavar="B:C:L,...",
                   help="peer runs (batch:context:prefill); default: smallest batch with the shortest prefill and "
                        "largest batch with the longest, at the first context")
    p.add_argument("--peer-budget", type=float, default=defaults.DEFAULT_PEER_BUDGET,
                   help=f"seconds for all peer runs (default {defaults.DEFAULT_PEER_BUDGET:.0f})")
    p.add_argument("--peer-args", default="", metavar="ARGS",
                   help="extra arguments for the peer script, one string (e.g. '--device cpu --no-compile')")
    p.add_argument("--compile-cache-check", action="store_true",
                   help="also time compiles cold vs warm through the persistent cache (two fresh processes)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="use a persistent compilation cache in this process too (default off: cold compiles)")
    p.add_argument("--out", default=str(defaults.DEFAULT_OUT),
                   help="folder for the JSON and plots ('none': write nothing)")
    p.add_argument("--plot", action="store_true", help="draw PNGs (needs matplotlib)")
    p.add_argument("--commit", default=None, help="the git commit to record (default: git rev-parse HEAD)")
    p.add_argument("--time-budget", type=float, default=defaults.DEFAULT_TIME_BUDGET,
                   help=f"seconds; sweep points past it are skipped with a note "
                        f"(default {defaults.DEFAULT_TIME_BUDGET:.0f}; 0 = none)")
    p.add_argument("--copy-bytes", type=int, default=None, help="copy-bandwidth buffer (default 4 GiB, CPU 256 MiB)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 8192, CPU 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", type=_pins, default=(), metavar="OP=IMPL,...",
                   help="pin ops to named implementations (as Ops(force=...)), e.g. decode_attention_append=xla")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only draw the plots of an earlier result file (next to it); runs nothing")


def config_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None) -> BenchConfig:
    out = None if str(args.out).lower() in ("none", "") else args.out
    cmd = "ferrum-jax bench " + " ".join(argv if argv is not None else sys.argv[1:])
    return BenchConfig(shape=None if args.model else args.shape, model=args.model, dtype=args.dtype,
                       batches=tuple(args.batch), contexts=tuple(args.context), prefill=tuple(args.prefill),
                       steps=args.steps, runs=args.runs, peer=args.peer, peer_script=args.peer_script,
                       peer_points=args.peer_points, peer_budget=args.peer_budget,
                       peer_args=tuple(shlex.split(args.peer_args or "")),
                       compile_cache_check=args.compile_cache_check, compile_cache=args.compile_cache, out=out,
                       plot=args.plot, commit=args.commit, time_budget=args.time_budget or None,
                       copy_bytes=args.copy_bytes, matmul_n=args.matmul_n, seed=args.seed, force=args.force,
                       command=cmd.strip())


def run_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What `ferrum-jax bench` does: run, print the table on stdout; FerrumError if anything
    recompiled during a timed part (after the JSON is written)."""
    if args.replot:
        path = Path(args.replot)
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FerrumError(f"--replot {path}: {e}") from None
        for p in plot(result, path.parent):
            print(p, flush=True)
        return result
    result = run_bench(config_from_args(args, argv))
    print(format_table(result), flush=True)
    if not result["zero_compiles_after_warmup"]:
        raise FerrumError(f"{result['compiles_during_timing_total']} compilation(s) during timed parts "
                          f"(see 'compiles_during_timing' in the JSON)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compile-probe"]:  # internal: one fresh process of compile_cache_check
        print(json.dumps(compile_probe(argv[1], argv[2])), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m ferrum_jax.bench", description="ferrum-jax speed benchmark")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args, argv)
    except FerrumError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
