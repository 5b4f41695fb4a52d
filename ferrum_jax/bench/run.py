"""`run_bench`: one whole run, in order: the peer (before this process takes the device), the
ceilings, the weights, the prefill and decode sweeps, the compile-cache check, then the JSON and plots."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ferrum_jax.backend import DEFAULT_OPS, Ops
from ferrum_jax.bench.ceilings import device_ceilings, fits, memory_stats
from ferrum_jax.bench.compile_cache import compile_cache_check
from ferrum_jax.bench.config import (
    COMPILE_CHECK_RESERVE,
    PROMPT_MARGIN,
    REPO,
    BenchConfig,
    log_stderr,
    now,
)
from ferrum_jax.bench.peer import attach_peer, default_peer_points, run_peer
from ferrum_jax.bench.report import plot, write_json
from ferrum_jax.bench.sweeps import decode_sweep, prefill_sweep
from ferrum_jax.bench.weights import (
    estimate_weight_bytes,
    random_quantized_weights,
    weight_stats,
)
from ferrum_jax.compile_log import enable_persistent_cache
from ferrum_jax.errors import ConfigError
from ferrum_jax.shapes import SHAPES, shape_config


def _git_commit() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, cwd=REPO,
                              timeout=10)
        if head.returncode != 0:
            return {"commit": None}
        # --no-optional-locks: a read-only look (no index refresh written back).
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False, cwd=REPO, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def _hf_config(bc: BenchConfig) -> dict[str, Any] | None:
    """The HF config dict the peer builds its model from (None when there is none)."""
    if bc.model is None:
        return dict(SHAPES[bc.shape])
    from ferrum_jax.model import resolve_path

    path = resolve_path(bc.model)
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path.is_file() and path.suffix.lower() == ".gguf":
        from ferrum_jax.loading.gguf import gguf_config_dict, read_metadata

        return gguf_config_dict(read_metadata(path))
    return None


def _load_weights(bc: BenchConfig) -> tuple[Any, Any, Ops, dict[str, Any]]:
    """(cfg, weights, ops, description) for the run."""
    compute = jnp.dtype(bc.compute_dtype)
    if bc.model is None:
        need = estimate_weight_bytes(shape_config(bc.shape), bc.dtype)
        ok, why = fits(need)
        if not ok:
            raise ConfigError(f"{bc.shape} {bc.dtype_tag} weights do not fit on this device: {why}")
    if bc.model is not None:
        from ferrum_jax.model import load

        m = load(bc.model, dtype=compute, progress=False)
        return m.config, m.weights, m.ops, {"source": "model", "path": str(bc.model), "random": False,
                                            "format": "as loaded (GGUF types as stored, packed on accelerators)"}
    cfg = shape_config(bc.shape)
    if bc.quant_type is None:
        from ferrum_jax.shapes import random_weights

        return cfg, random_weights(cfg, compute, seed=bc.seed), DEFAULT_OPS, {
            "source": "shape", "random": True, "format": "dense", "quant_type": None}
    try:
        weights, types = random_quantized_weights(cfg, bc.quant_type, compute, seed=bc.seed)
    except ConfigError as e:
        raise ConfigError(f"--shape {bc.shape} --dtype {bc.dtype_tag}: {e}") from None
    return cfg, weights, DEFAULT_OPS, {"source": "shape", "random": True, "format": "gguf-packed",
                                       "quant_type": bc.quant_type, "tensor_types": types,
                                       "decoded_in": "the jitted step (kernel layout: Pallas quantized matmul on GPU, dequantize-once elsewhere)"}


def run_bench(bc: BenchConfig, log: Callable[[str], None] = log_stderr) -> dict[str, Any]:
    """Run the whole benchmark; returns the result dict (also written as JSON when bc.out is set)."""
    bc.validate()
    t0 = now()
    deadline = t0 + bc.time_budget if bc.time_budget else math.inf
    # Sweep points start only before sweep_deadline; the compile-cache check gets what is left.
    sweep_deadline = deadline - (COMPILE_CHECK_RESERVE if bc.compile_cache_check else 0.0)
    notes: list[str] = []
    result: dict[str, Any] = {
        "benchmark": "ferrum-jax bench", "command": bc.command,
        "timestamp_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(bc).items()},
    }
    git = _git_commit()
    result["commit"] = bc.commit or git.get("commit") or "unknown"
    result["commit_source"] = "--commit" if bc.commit else ("git" if git.get("commit") else "none")
    if "dirty" in git and not bc.commit:
        result["commit_dirty"] = git["dirty"]
    hf_config = _hf_config(bc)

    # The peer runs first, before this process takes the device (jax preallocates most of its memory).
    peer = None
    if bc.peer != "none":
        points = list(bc.peer_points) if bc.peer_points else default_peer_points(
            bc.batches, bc.contexts, bc.prefill, (hf_config or {}).get("max_position_embeddings"))
        peer = run_peer(bc.peer, hf_config, points, bc.steps, dtype=bc.compute_dtype, script=bc.peer_script,
                        extra_args=bc.peer_args, log=log,
                        budget=min(bc.peer_budget, 0.35 * bc.time_budget if bc.time_budget else math.inf))
        if peer.get("error"):
            log(f"peer {bc.peer}: {peer['error']}")

    if bc.compile_cache:
        enable_persistent_cache(bc.compile_cache)
    dev = jax.devices()[0]
    result["device"] = {"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count(),
                        "memory_bytes_limit": (memory_stats() or {}).get("bytes_limit")}
    import jaxlib

    result |= {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
               "persistent_cache_in_process": jax.config.jax_compilation_cache_dir}
    log(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")

    log("ceilings: copy bandwidth and bf16 matmul ...")
    ceil = device_ceilings(bc.copy_bytes, bc.matmul_n, bc.ceiling_reps)
    bw, peak = ceil["copy_bandwidth_bytes_per_s"], ceil["matmul_bf16_flops_per_s"]
    result["ceilings"] = ceil
    log(f"ceilings: copy {bw / 1e9:.1f} GB/s, bf16 matmul {peak / 1e12:.2f} TFLOP/s")

    log("weights ...")
    start = now()
    cfg, weights, ops, wdesc = _load_weights(bc)
    if bc.force:  # pinned implementations, e.g. a kernel against the reference it replaces
        ops = dataclasses.replace(ops, force=bc.force)
    jax.block_until_ready(weights)
    ws = weight_stats(weights, cfg, bc.batches)
    kv_dtype = jnp.dtype(bc.compute_dtype)
    name = bc.shape if bc.model is None else Path(str(bc.model)).stem
    result |= {"shape": name, "config": hf_config, "dtype": bc.dtype_tag, "compute_dtype": bc.compute_dtype,
               "kv_cache_dtype": kv_dtype.name, "quant_type": bc.quant_type,
               "weights": wdesc | ws | {"seconds": now() - start}}
    log(f"weights: {name} {bc.dtype_tag}: {ws['bytes'] / 1e9:.2f} GB ({ws['params'] / 1e9:.2f} G params), "
        f"{now() - start:.1f} s")
    if "moe" in ws:
        moe = ws["moe"]
        notes.append(
            f"MoE ({moe['num_experts']} experts, top {moe['top_k']}, {moe['moe_layers']} MoE layers): a decode "
            "step's weight bytes are the non-expert bytes + the expected distinct experts under uniform routing "
            "(E * (1 - (1 - k/E)^B) per MoE layer for B tokens) x bytes per expert; FLOPs count the top "
            f"{moe['top_k']} experts of each token (active parameters). That is what the step needs: the XLA "
            "reference MoE ops (CPU; quantized stacks on GPU) gather one expert copy per (token, slot) while "
            "B*k < E, and from there on the dense one computes every expert, the packed one scans them all")
        per_batch = ", ".join(f"b={b}: {v / 1e9:.2f} GB" for b, v in ws["bytes_read_per_decode_step"].items())
        log(f"weights: MoE decode step reads {per_batch} (expected distinct experts under uniform routing) of "
            f"{ws['bytes_read_per_decode_step_all_experts'] / 1e9:.2f} GB")
    if any(getattr(s, "window", None) for s in cfg.attn):
        notes.append("sliding-window layers: FLOPs and ideal KV bytes count only the keys inside the window; "
                     "the XLA reference attention still reads (and masks) every cache slot")

    # Prefill and time to first token.
    pre = prefill_sweep(weights, cfg, ops, ws, lengths=bc.prefill, runs=bc.runs, kv_dtype=kv_dtype, seed=bc.seed,
                        peak=peak, deadline=sweep_deadline, log=log)
    result["prefill"] = pre
    ok_pre = [r for r in pre if r.get("status") == "ok"]
    result["ttft"] = ({"prompt_tokens": ok_pre[0]["length"], "seconds": ok_pre[0]["seconds"],
                       "includes": "prefill of the prompt and sampling of the first token (device time)"}
                      if ok_pre else None)

    # Decode sweep.
    dec = decode_sweep(weights, cfg, ops, ws, batches=bc.batches, contexts=bc.contexts, steps=bc.steps,
                       runs=bc.runs, kv_dtype=kv_dtype, bw=bw, peak=peak, deadline=sweep_deadline, notes=notes,
                       log=log)
    result["decode"] = dec
    if "moe" in ws:
        result["decode_weight_bytes_note"] = (
            "MoE: weight_bytes_per_step = weights.bytes_read_per_decode_step[batch] = the non-expert weights + "
            "the expected distinct experts under uniform routing, E * (1 - (1 - k/E)^B) per MoE layer "
            "(expected_distinct_experts_per_layer), x bytes per expert (active_expert_bytes_per_step in all); "
            "bandwidth_fraction and the roofline use it")
    result["decode_kv_bytes_note"] = (
        "kv_bytes_per_step is the whole cache (capacity = context + steps + 16 slots): the XLA reference decode "
        "attention reads every slot, masked; kv_bytes_at_context is what a step at `context` needs, used for "
        "the roofline")

    ok_dec = [r for r in dec if r.get("status") == "ok"]
    first_dec = ok_dec[0] if ok_dec else None
    result["compile"] = {
        "cold": {"decode_seconds": first_dec and first_dec["compile_seconds"],
                 "decode_point": first_dec and [first_dec["batch"], first_dec["context"]],
                 "prefill_seconds": ok_pre[0]["compile_seconds"] if ok_pre else None,
                 "prefill_length": ok_pre[0]["length"] if ok_pre else None,
                 "note": "trace + lower + compile of the first call (count_compiles)"},
        "persistent_cache": None}

    timed = sum(r.get("compiles_during_timing", 0) for r in ok_dec + ok_pre)
    result["compiles_during_timing_total"] = timed
    result["zero_compiles_after_warmup"] = timed == 0

    mem = memory_stats()
    result["memory"] = {"peak_bytes_in_use": mem.get("peak_bytes_in_use") if mem else None,
                        "bytes_limit": mem.get("bytes_limit") if mem else None}

    if bc.compile_cache_check:
        if first_dec is None and not ok_pre:
            result["compile"]["persistent_cache"] = {"error": "no decode or prefill point ran"}
        else:
            b = first_dec["batch"] if first_dec else bc.batches[0]
            cap = first_dec["capacity"] if first_dec else bc.contexts[0] + bc.steps + PROMPT_MARGIN
            length = ok_pre[0]["length"] if ok_pre else min(bc.prefill)
            log(f"compile cache check: two fresh processes (decode batch {b} capacity {cap}, prefill {length}) ...")
            cc = compile_cache_check(cfg, weights, ops, batch=b, capacity=cap, length=length, kv_dtype=kv_dtype,
                                     timeout=min(max(deadline - now(), 90.0), 600.0))
            result["compile"]["persistent_cache"] = cc
            if "decode_speedup" in cc:
                log(f"compile cache: decode {cc['cold']['decode_seconds']:.1f} s cold -> "
                    f"{cc['warm']['decode_seconds']:.2f} s warm; prefill {cc['cold']['prefill_seconds']:.1f} s -> "
                    f"{cc['warm']['prefill_seconds']:.2f} s")
            else:
                log(f"compile cache check: {cc}")

    if peer is not None:
        attach_peer(result, peer)
    result["peer"] = peer
    result["notes"] = notes + [
        ("decode: the state is built on the host with every row at position `context` (no prefill): the cache "
         "contents do not change the work"),
        "weights are random" if wdesc.get("random") else "weights are the model's"]
    result["wall_seconds"] = now() - t0

    if bc.out:
        path = write_json(result, bc.out)
        result["json_path"] = str(path)
        log(f"wrote {path}")
        if bc.plot:
            for p in plot(result, bc.out, log=log):
                log(f"wrote {p}")
    return result
