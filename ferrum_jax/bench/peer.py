"""The peer: another runtime (PyTorch, bench/peers/torch_peer.py) measured at some of the same points,
one subprocess per point, and the ferrum / peer ratios put on the matching sweep points."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ferrum_jax.bench.config import (
    DEFAULT_PEER_BUDGET,
    DEFAULT_PEER_SCRIPTS,
    REPO,
    log_stderr,
    now,
    tail,
)


def run_peer(peer: str, config: dict[str, Any] | None, points: Sequence[tuple[int, int, int]], steps: int, *,
             dtype: str = "bfloat16", script: str | Path | None = None, extra_args: Sequence[str] = (),
             budget: float = DEFAULT_PEER_BUDGET, log: Callable[[str], None] = log_stderr) -> dict[str, Any]:
    """Run the peer once per (batch, context, prefill length) point, each in its own process:

        python <script> --config-json '<HF config dict as JSON>' --batch B --context C --steps N
                        --prefill L --dtype <dense dtype> [extra_args...]

    which prints one JSON object on stdout: {"decode_tokens_per_second", "prefill_tokens_per_second",
    "device", "torch", ...} (with "error" when its measurement failed). A missing script, a failure,
    a timeout or spent budget is recorded and the run goes on."""
    script = Path(script) if script is not None else DEFAULT_PEER_SCRIPTS.get(peer)
    out: dict[str, Any] = {"name": peer, "script": str(script) if script else None, "runs": []}
    if script is None:
        out["error"] = f"unknown peer {peer!r}; known: {', '.join(DEFAULT_PEER_SCRIPTS)}"
        return out
    if not script.is_file():
        out["error"] = f"peer script {script} not found"
        return out
    if config is None:
        out["error"] = "no HF config dict for this model: the peer needs one"
        return out
    out["dtype"], out["extra_args"] = dtype, list(extra_args)
    deadline = now() + budget
    for b, c, length in points:
        rec: dict[str, Any] = {"batch": b, "context": c, "prefill": length, "steps": steps}
        out["runs"].append(rec)
        left = deadline - now()
        if left < 5:
            rec["error"] = "skipped: peer time budget spent"
            continue
        cmd = [sys.executable, str(script), "--config-json", json.dumps(config), "--batch", str(b), "--context",
               str(c), "--steps", str(steps), "--prefill", str(length), "--dtype", dtype, *extra_args]
        log(f"peer {peer}: batch {b} context {c} prefill {length} ...")
        start = now()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO, timeout=left)
        except subprocess.TimeoutExpired:
            rec["error"] = f"timed out after {left:.0f} s"
            log(f"peer {peer}: {rec['error']}")
            continue
        rec["seconds"] = now() - start
        parsed = _last_json_object(proc.stdout)
        if parsed is not None:
            rec |= {k: v for k, v in parsed.items() if k not in ("batch", "context", "prefill", "steps")}
            if parsed.get("error") is None:
                rec.pop("error", None)
        if proc.returncode != 0 and "error" not in rec:
            rec["error"] = f"exit {proc.returncode}: {tail(proc.stderr)}"
        elif parsed is None and "error" not in rec:
            rec["error"] = f"no JSON object on stdout: {tail(proc.stdout + proc.stderr)}"
        log(f"peer {peer}: " + (str(rec["error"])[:300] if rec.get("error") else
                                f"decode {rec.get('decode_tokens_per_second')} tok/s, "
                                f"prefill {rec.get('prefill_tokens_per_second')} tok/s"))
    return out


def _last_json_object(text: str) -> dict | None:
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, dict) else None
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def default_peer_points(batches: Sequence[int], contexts: Sequence[int], lengths: Sequence[int],
                        max_positions: int | None = None) -> list[tuple[int, int, int]]:
    """Two peer runs (each one process that builds and compiles the model: they are not cheap), at the
    first context: the smallest batch with the shortest prefill and the largest batch with the
    longest prefill (of the lengths within `max_positions`)."""
    if max_positions:
        contexts = [c for c in contexts if c < max_positions]
        lengths = [n for n in lengths if n <= max_positions]
    if not batches or not contexts:
        return []
    lengths = sorted(lengths) or [min(512, contexts[0])]
    points = [(min(batches), contexts[0], lengths[0]), (max(batches), contexts[0], lengths[-1])]
    return list(dict.fromkeys(points))


def attach_peer(result: dict[str, Any], peer: dict[str, Any]) -> None:
    """Put the peer's tokens/s, and ferrum / peer, on the decode and prefill points it also ran."""
    runs = [r for r in peer.get("runs", []) if "error" not in r]

    def attach(rec: dict[str, Any], match: list[dict[str, Any]], key: str) -> None:
        if match and rec.get("status") == "ok":
            p = float(match[0][key])
            rec["peer_tokens_per_second"] = p
            rec["ratio_to_peer"] = rec["tokens_per_second"] / p if p else None

    for rec in result["decode"]:
        attach(rec, [r for r in runs if r["batch"] == rec["batch"] and r["context"] == rec["context"]
                     and r.get("decode_tokens_per_second")], "decode_tokens_per_second")
    for rec in result["prefill"]:
        attach(rec, [r for r in runs if r["prefill"] == rec["length"] and r.get("prefill_tokens_per_second")],
               "prefill_tokens_per_second")
