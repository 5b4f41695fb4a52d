"""What a run leaves: the JSON file (<out>/<shape>_<dtype>_<device>.json), the printed table and the
PNG plots next to the JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ferrum_jax.bench.config import log_stderr


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "device"


def result_path(result: dict[str, Any], out: str | Path) -> Path:
    return Path(out) / f"{_slug(result['shape'])}_{result['dtype']}_{_slug(result['device']['kind'])}.json"


def write_json(result: dict[str, Any], out: str | Path) -> Path:
    path = result_path(result, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def _short(text: str, n: int = 64) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def format_table(result: dict[str, Any]) -> str:
    """figure | value | fraction of its ceiling | ratio ferrum / peer."""
    c = result["ceilings"]
    rows = [("figure", "value", "of ceiling", "/ peer"),
            ("copy bandwidth", _si(c["copy_bandwidth_bytes_per_s"], "B/s"), "ceiling", ""),
            ("bf16 matmul", _si(c["matmul_bf16_flops_per_s"], "FLOP/s"), "ceiling", "")]

    def ratio(r: dict) -> str:
        return f"{r['ratio_to_peer']:.2f}" if r.get("ratio_to_peer") else ""

    def not_ok(label: str, r: dict) -> tuple[str, str, str, str]:
        return label, r.get("status", "?"), _short(r.get("note") or r.get("error", "")), ""

    for r in result["prefill"]:
        label = f"prefill {r['length']}"
        if r.get("status") != "ok":
            rows.append(not_ok(label, r))
            continue
        rows.append((label, f"{r['tokens_per_second']:.1f} tok/s", f"{r['matmul_peak_fraction']:.1%} matmul", ratio(r)))
    if result.get("ttft"):
        t = result["ttft"]
        rows.append((f"TTFT {t['prompt_tokens']}", f"{t['seconds'] * 1e3:.1f} ms", "", ""))
    for r in result["decode"]:
        label = f"decode b={r['batch']} ctx={r['context']}"
        if r.get("status") != "ok":
            rows.append(not_ok(label, r))
            continue
        rows.append((label, f"{r['tokens_per_second']:.1f} tok/s",
                     f"{r['bandwidth_fraction']:.1%} BW, {r['roofline_fraction']:.1%} roof", ratio(r)))
    footer: list[str] = []
    moe = (result.get("weights") or {}).get("moe")
    if moe:  # the weight bytes the decode rows' fractions count
        e = moe["num_experts"]
        for b, nbytes in result["weights"]["bytes_read_per_decode_step"].items():
            rows.append((f"MoE weights read b={b}", f"{_si(nbytes, 'B')}/step",
                         f"{moe['expected_distinct_experts_per_layer'][b]:.1f}/{e} experts per layer", ""))
        footer.append(f"MoE: experts per layer = expected distinct experts under uniform routing, E(1-(1-k/E)^B) "
                      f"(E={e}, k={moe['top_k']}); decode BW fractions count those experts' bytes")
    cold = result["compile"]["cold"]
    if cold.get("decode_seconds") is not None:
        rows.append(("compile decode (cold)", f"{cold['decode_seconds']:.2f} s", "", ""))
    if cold.get("prefill_seconds") is not None:
        rows.append(("compile prefill (cold)", f"{cold['prefill_seconds']:.2f} s", "", ""))
    pc = result["compile"].get("persistent_cache")
    if pc and "decode_speedup" in pc:
        rows.append(("compile decode, fresh process", f"{pc['cold']['decode_seconds']:.2f} s cold",
                     f"{pc['warm']['decode_seconds']:.2f} s warm", ""))
        rows.append(("compile prefill, fresh process", f"{pc['cold']['prefill_seconds']:.2f} s cold",
                     f"{pc['warm']['prefill_seconds']:.2f} s warm", ""))
    elif pc:
        rows.append(("compile cache check", "failed", _short(str(pc.get("warm") or pc.get("cold") or pc)), ""))
    mem = result["memory"]
    if mem.get("peak_bytes_in_use") is not None:
        limit = mem.get("bytes_limit")
        rows.append(("peak device memory", _si(mem["peak_bytes_in_use"], "B"),
                     f"{mem['peak_bytes_in_use'] / limit:.1%} of limit" if limit else "", ""))
    else:
        rows.append(("peak device memory", "n/a", "", ""))
    rows.append(("compiles during timing", str(result["compiles_during_timing_total"]),
                 "ok" if result["zero_compiles_after_warmup"] else "RECOMPILED", ""))
    peer = result.get("peer")
    if peer and peer.get("error"):
        rows.append((f"peer {peer['name']}", "error", _short(peer["error"]), ""))
    elif peer:
        runs = peer.get("runs", [])
        bad = [r for r in runs if r.get("error")]
        device = next((r.get("device") for r in runs if r.get("device")), "")
        rows.append((f"peer {peer['name']}", f"{len(runs) - len(bad)}/{len(runs)} runs ok",
                     _short(bad[0]["error"]) if bad else _short(str(device)), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [(f"{result['shape']} {result['dtype']} on {result['device']['kind']} (jax {result['jax']}, "
              f"commit {str(result['commit'])[:12]})")]
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + footer)


def _batch_axis(ax: Any, points: list[dict]) -> None:
    batches = sorted({r["batch"] for r in points})
    ax.set_xscale("log", base=2)
    if batches:
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()


def plot(result: dict[str, Any], out: str | Path, log: Callable[[str], None] = log_stderr) -> list[Path]:
    """decode tokens/s vs batch (one line per context, dashed: its roofline; x: the peer) and the
    fraction of roofline of decode and of prefill. Needs matplotlib; says so and returns [] without."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot: matplotlib is not installed (pip install matplotlib): skipped")
        return []
    stem = result_path(result, out).with_suffix("")
    title = f"{result['shape']} {result['dtype']} on {result['device']['kind']}"
    ok = [r for r in result["decode"] if r.get("status") == "ok"]
    contexts = sorted({r["context"] for r in ok})
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(contexts):
        pts = sorted((r["batch"], r) for r in ok if r["context"] == c)
        xs = [b for b, _ in pts]
        color = f"C{i}"
        ax.plot(xs, [r["tokens_per_second"] for _, r in pts], "o-", color=color, label=f"context {c}")
        ax.plot(xs, [r["roofline_tokens_per_second"] for _, r in pts], "--", color=color, alpha=0.6,
                label=f"roofline, context {c}")
        peer = [(b, r["peer_tokens_per_second"]) for b, r in pts if r.get("peer_tokens_per_second")]
        if peer:
            ax.plot(*zip(*peer), "x", color=color, markersize=9, label=f"peer, context {c}")
    _batch_axis(ax, ok)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(stem.parent / (stem.name + "_decode.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, c in enumerate(contexts):
        pts = sorted((r["batch"], r) for r in ok if r["context"] == c)
        a1.plot([b for b, _ in pts], [r["roofline_fraction"] for _, r in pts], "o-", color=f"C{i}",
                label=f"roofline, context {c}")
        a1.plot([b for b, _ in pts], [r["bandwidth_fraction"] for _, r in pts], "s:", color=f"C{i}", alpha=0.6,
                label=f"copy BW, context {c}")
    _batch_axis(a1, ok)
    a1.set_ylim(0, max([1.05] + [1.1 * r[k] for r in ok for k in ("roofline_fraction", "bandwidth_fraction")]))
    a1.set_xlabel("batch")
    a1.set_ylabel("fraction")
    a1.set_title("decode")
    a1.grid(True, alpha=0.3)
    a1.legend(fontsize=8)
    pre = [r for r in result["prefill"] if r.get("status") == "ok"]
    a2.bar([str(r["length"]) for r in pre], [r["matmul_peak_fraction"] for r in pre], color="C3")
    a2.set_ylim(0, max([1.05] + [1.1 * r["matmul_peak_fraction"] for r in pre]))
    a2.set_xlabel("prompt tokens")
    a2.set_ylabel("fraction of bf16 matmul peak")
    a2.set_title("prefill")
    a2.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(stem.parent / (stem.name + "_roofline.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
