"""Plot quant_matmul bench JSONs: fraction of the roofline against M, one line per format (the best
path at each point, averaged over the shapes), and the dense bf16 matmul. Later files' points
replace earlier ones at the same (format, shape, M); the PNG goes next to the first file.

    python bench/plot_quant_matmul.py bench/results/quant_matmul_bench_NVIDIA-H200.json \
        bench/results/quant_matmul_bench_M1-dp4a_NVIDIA-H200.json

Roofline at each point: the larger of (weight bytes / copy bandwidth) and (2 M N K / bf16 matmul
peak); the fraction is that floor over the measured time."""
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(*paths: str) -> Path:
    files = [json.loads(Path(p).read_text()) for p in paths]
    data = files[0]
    ceil = data["result"]["ceilings"]
    bw, peak = ceil["copy_bandwidth_bytes_per_s"], ceil["matmul_bf16_flops_per_s"]
    merged = {}
    for f in files:
        for p in f["result"]["points"]:
            merged[p["format"], p["shape"], p["m"]] = p
    lines, dense = defaultdict(lambda: defaultdict(list)), defaultdict(list)
    for p in merged.values():
        flops = 2 * p["m"] * p["n"] * p["k"]
        floor = max(p["weight_bytes"] / bw, flops / peak)
        best = min(p[k]["seconds"] for k in ("kernel_dp4a", "kernel", "pallas_dequant", "xla_dequant") if k in p)
        lines[p["format"]][p["m"]].append(floor / best)
        dense_floor = max(2 * p["n"] * p["k"] / bw, flops / peak)
        dense[p["m"]].append(dense_floor / p["dense_bf16"]["seconds"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for fmt, by_m in lines.items():
        ms = sorted(by_m)
        ax.plot(ms, [sum(by_m[m]) / len(by_m[m]) for m in ms], marker="o", label=fmt)
    ms = sorted(dense)
    ax.plot(ms, [sum(dense[m]) / len(dense[m]) for m in ms], "k--", marker="s", label="dense bf16 (XLA)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows of x (M)")
    ax.set_ylabel("fraction of roofline (mean over Llama-3-8B shapes)")
    ax.set_title(f"Quantized matmul, {data['device']['kind']}, jax {data['jax']}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    out = Path(paths[0]).with_suffix(".png")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
