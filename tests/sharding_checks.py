"""Sharded-vs-single-device checks, run by tests/test_sharding.py in a subprocess whose jax has 8
host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax starts,
so it cannot run inside the 1-device pytest process). Prints one JSON object of results; the test
module asserts on it.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py \
        --llama DIR --gemma DIR --gguf FILE > results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ferrum_jax as fj  # noqa: E402
import models  # noqa: E402
from ferrum_jax import sharding as sh  # noqa: E402
from ferrum_jax.cache import KVCache  # noqa: E402
from ferrum_jax.compile_log import count_compiles  # noqa: E402
from ferrum_jax.errors import FerrumError  # noqa: E402
from ferrum_jax.quant import GGUFWeight  # noqa: E402

MESHES = {"tp2": (2, 1), "tp4": (4, 1), "dp2": (1, 2), "tp2xdp2": (2, 2), "tp4xdp2": (4, 2)}
# MoE (8 experts): (tp, dp, ep).
MOE_MESHES = {"ep2": (1, 1, 2), "ep4": (1, 1, 4), "tp2": (2, 1, 1), "ep2xdp2": (1, 2, 2), "tp2xep2": (2, 1, 2)}
PROMPTS = [[4 + (37 * i + 11) % 380 for i in range(21)], [4 + (53 * i + 5) % 380 for i in range(13)]]
STEPS = 16  # decode steps of teacher-forced logits, and greedy tokens generated (+ the prefill token)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _step(weights, cache, tokens, positions, *, cfg):
    return models.family_of(cfg).forward(weights, tokens, positions, cache, cfg, fj.DEFAULT_OPS)


def cache_for(model: fj.Model, batch: int, capacity: int) -> KVCache:
    cfg = model.config
    shape = dict(num_layers=cfg.num_layers, batch=batch, kv_heads=cfg.num_kv_heads, capacity=capacity,
                 head_dim=cfg.head_dim, dtype=model.dtype)
    return KVCache.create(**shape) if model.mesh is None else sh.create_cache(model.mesh, **shape)


def stepped_logits(model: fj.Model, prompt: list[int], follow: list[int]) -> np.ndarray:
    """Logits of the prompt (prefill into the cache), then of each token of `follow` fed one at a
    time through the (sharded) KV cache: float32 [len(prompt) + len(follow), vocab]."""
    b, t = model.data_parallel, len(prompt)  # one row per data-parallel shard, all the same
    cache = cache_for(model, b, 64)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    out, cache = _step(model.weights, cache, jnp.asarray([prompt] * b), positions, cfg=model.config)
    rows = [np.asarray(out[0])]
    for i, tok in enumerate(follow):
        out, cache = _step(model.weights, cache, jnp.full((b, 1), tok), jnp.full((b, 1), t + i), cfg=model.config)
        rows.append(np.asarray(out[0]))
    return np.concatenate(rows)


def shard_facts(model: fj.Model) -> dict:
    per_device = {str(d.id): b for d, b in sh.device_bytes(model.weights).items()}
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.weights):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if name.startswith("layers.0.") or name in ("embed", "lm_head", "norm"):
            shapes[name] = {"global": list(leaf.shape), "shards": sorted({tuple(s.data.shape) for s in leaf.addressable_shards})}
    expected, seen = 0, set()
    for leaf in jax.tree_util.tree_leaves(model.weights):
        if id(leaf) not in seen:
            seen.add(id(leaf))
            splits = np.prod([model.mesh.shape[a] for a in leaf.sharding.spec if a is not None], dtype=int)
            expected += leaf.nbytes // int(splits)
    experts = {}  # MoE: the expert range [start, stop) each device holds of layer 0's gate stack
    gate = getattr(model.weights.layers[0].mlp, "gate", None)
    if gate is not None and gate.ndim == 3:
        experts = {str(s.device.id): [range(gate.shape[0])[s.index[0]].start, range(gate.shape[0])[s.index[0]].stop]
                   for s in gate.addressable_shards}
    return {"device_bytes": per_device, "expected_device_bytes": int(expected), "experts": experts,
            "total_bytes": sh.total_bytes(model.weights), "shapes": shapes,
            "num_kv_heads": model.config.num_kv_heads}


def run_case(ref: fj.Model, model: fj.Model, ref_out: dict) -> dict:
    gen = fj.generate(model, PROMPTS, max_tokens=STEPS + 1)
    logits = stepped_logits(model, PROMPTS[0], ref_out["tokens"][0][:STEPS])
    with count_compiles() as log:  # same buckets, other prompts: the warm programs are reused
        fj.generate(model, [PROMPTS[0][:17], PROMPTS[1][:12]], max_tokens=STEPS + 1)
    full = fj.logits(model, PROMPTS[1])
    return {"tokens": [c.token_ids for c in gen], "tokens_equal": [c.token_ids for c in gen] == ref_out["tokens"],
            "max_logit_diff": float(np.abs(logits - ref_out["logits"]).max()),
            "max_prompt_logit_diff": float(np.abs(full - ref_out["full"]).max()),
            "logit_scale": float(max(np.abs(ref_out["logits"]).max(), np.abs(ref_out["full"]).max())),
            "recompiles": log.compiles, **shard_facts(model)}


def reference(model: fj.Model) -> dict:
    gen = fj.generate(model, PROMPTS, max_tokens=STEPS + 1)
    tokens = [c.token_ids for c in gen]
    return {"tokens": tokens, "logits": stepped_logits(model, PROMPTS[0], tokens[0][:STEPS]),
            "full": fj.logits(model, PROMPTS[1]), "total_bytes": sh.total_bytes(model.weights),
            "max_abs_logit": float(np.abs(fj.logits(model, PROMPTS[0])).max())}


def error_of(fn) -> str | None:
    try:
        fn()
    except FerrumError as e:
        return f"{type(e).__name__}: {e}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama", required=True)
    ap.add_argument("--gemma", required=True)
    ap.add_argument("--gguf", required=True, help="a tiny Llama GGUF file with Q8_0 matrices")
    ap.add_argument("--qwen3-moe", help="a tiny Qwen3-MoE checkpoint (8 experts, one dense layer)")
    ap.add_argument("--qwen2-moe", help="a tiny Qwen2-MoE checkpoint (8 experts and a shared expert)")
    args = ap.parse_args()
    assert len(jax.devices()) == 8, jax.devices()
    results: dict = {"cases": {}, "errors": {}}
    load = partial(fj.load, dtype="float32", progress=False)

    for family, path in (("llama", args.llama), ("gemma3", args.gemma)):
        ref = load(path)
        ref_out = reference(ref)
        results[family] = {"max_abs_logit": ref_out["max_abs_logit"], "total_bytes": ref_out["total_bytes"]}
        for name, (tp, dp) in MESHES.items():
            results["cases"][f"{family}-{name}"] = run_case(ref, load(path, mesh=fj.make_mesh(tp=tp, dp=dp)), ref_out)
        # Sharding weights already on one device (`shard_model`) gives the loaded layout's results.
        results["cases"][f"{family}-tp4-shard_model"] = run_case(ref, fj.shard_model(ref, fj.make_mesh(tp=4)), ref_out)

    # GGUF (Q8_0 matrices): dequantized at load and packed, sharded, against the unsharded load.
    for mode, dequantize in (("dequantized", True), ("packed", False)):
        ref = load(args.gguf, dequantize=dequantize)
        ref_out = reference(ref)
        model = load(args.gguf, dequantize=dequantize, mesh=fj.make_mesh(tp=2, dp=2))
        case = run_case(ref, model, ref_out)
        case["packed_leaves"] = sum(isinstance(x, GGUFWeight) for x in jax.tree_util.tree_leaves(
            model.weights, is_leaf=lambda x: isinstance(x, GGUFWeight)))
        results["cases"][f"gguf-{mode}-tp2xdp2"] = case

    # MoE: expert parallel (routing replicated, local experts, psum), tensor parallel over the
    # expert FFN dim, and both with data parallel, loaded straight to shards and via shard_model.
    if args.qwen3_moe:
        ref = load(args.qwen3_moe)
        ref_out = reference(ref)
        results["qwen3-moe"] = {"total_bytes": ref_out["total_bytes"]}
        for name, (tp, dp, ep) in MOE_MESHES.items():
            model = load(args.qwen3_moe, mesh=fj.make_mesh(tp=tp, dp=dp, ep=ep))
            results["cases"][f"qwen3-moe-{name}"] = run_case(ref, model, ref_out)
    if args.qwen2_moe:
        ref = load(args.qwen2_moe)
        ref_out = reference(ref)
        results["qwen2-moe"] = {"total_bytes": ref_out["total_bytes"]}
        results["cases"]["qwen2-moe-tp2xep4"] = run_case(ref, load(args.qwen2_moe, mesh=fj.make_mesh(tp=2, ep=4)),
                                                         ref_out)
        results["cases"]["qwen2-moe-ep2xdp2-shard_model"] = run_case(
            ref, fj.shard_model(ref, fj.make_mesh(dp=2, ep=2)), ref_out)

    e = results["errors"]
    # Q8_0 blocks are 32 wide: wo's 64 input columns split in 2 but not in 4 whole blocks.
    e["packed_blocks"] = error_of(lambda: load(args.gguf, dequantize=False, mesh=fj.make_mesh(tp=4)))
    e["heads"] = error_of(lambda: load(args.llama, mesh=fj.make_mesh(tp=8)))  # 4 heads over 8 devices
    e["kv_heads"] = error_of(lambda: sh.kv_replicas(12, 3, 2))  # 3 kv heads over 2 devices
    e["devices"] = error_of(lambda: fj.make_mesh(tp=4, dp=4))
    e["expert"] = error_of(lambda: load(args.llama, mesh=fj.make_mesh(tp=2, ep=2)))
    e["vocab"] = error_of(lambda: sh.check_split("embed", (385, 64), sh.spec(("vocab", "embed")), fj.make_mesh(tp=2)))
    if args.qwen3_moe:  # 8 experts over 3 devices; 32 expert FFN units (moe_intermediate_size) over 3
        e["moe_experts"] = error_of(lambda: load(args.qwen3_moe, mesh=fj.make_mesh(ep=3)))
        e["moe_ffn"] = error_of(lambda: load(args.qwen3_moe, mesh=fj.make_mesh(tp=3)))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
