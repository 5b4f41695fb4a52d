"""`ferrum-jax bench` on the CPU with the tiny shape: the sweep end to end (JSON keys, zero compiles
while timing, skipped points, the peer hook with a stand-in peer script), random packed GGUF weights,
and the `bench` subcommand. Sizes are tiny: this checks the instrument, not the speed."""

from __future__ import annotations

import json
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ferrum_jax
from ferrum_jax.quant.qweight import QuantWeight
from ferrum_jax import bench
from ferrum_jax.cli import main
from ferrum_jax.quant import GGUFWeight
from ferrum_jax.shapes import shape_config

TINY = {"shape": "llama-tiny", "dtype": "f32", "batches": (1, 2), "contexts": (32, 8192), "prefill": (16, 8192),
        "steps": 4, "runs": 2, "copy_bytes": 1 << 20, "matmul_n": 128, "ceiling_reps": 2, "commit": "abc123",
        "time_budget": None}

FAKE_PEER = textwrap.dedent("""
    import argparse, json
    ap = argparse.ArgumentParser()
    for name in ("--config-json", "--batch", "--context", "--steps", "--prefill", "--dtype", "--device"):
        ap.add_argument(name)
    a = ap.parse_args()
    cfg = json.loads(a.config_json)
    print("some log line")
    print(json.dumps({"decode_tokens_per_second": 100.0 * int(a.batch), "prefill_tokens_per_second": 1000.0,
                      "device": "fake", "torch": "0", "hidden_size": cfg["hidden_size"], "dtype": a.dtype,
                      "device_arg": a.device}))
""")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    peer = tmp / "fake_peer.py"
    peer.write_text(FAKE_PEER)
    cfg = bench.BenchConfig(**TINY, peer="torch", peer_script=str(peer), peer_args=("--device", "cpu"), out=str(tmp))
    result = bench.run_bench(cfg, log=lambda msg: None)
    return result, tmp


def test_sweep_writes_json_with_the_required_keys(sweep):
    result, tmp = sweep
    path = tmp / "llama-tiny_f32_cpu.json"
    assert result["json_path"] == str(path)
    data = json.loads(path.read_text())
    for key in ("device", "jax", "jaxlib", "commit", "shape", "config", "dtype", "quant_type", "ceilings", "weights",
                "decode", "prefill", "ttft", "compile", "memory", "peer", "zero_compiles_after_warmup",
                "compiles_during_timing_total", "settings", "notes"):
        assert key in data, key
    assert data["device"]["kind"] == jax.devices()[0].device_kind
    assert data["jax"] == jax.__version__
    assert data["commit"] == "abc123" and data["commit_source"] == "--commit"
    assert data["shape"] == "llama-tiny" and data["config"]["hidden_size"] == 64 and data["dtype"] == "f32"
    c = data["ceilings"]
    assert c["copy_bandwidth_bytes_per_s"] > 0 and c["matmul_bf16_flops_per_s"] > 0 and c["copy_buffer_bytes"] == 1 << 20

    ok = [r for r in data["decode"] if r["status"] == "ok"]
    assert [(r["batch"], r["context"]) for r in ok] == [(1, 32), (2, 32)]
    for r in ok:
        assert r["tokens_per_second"] > 0 and r["steps_done_min"] == 4 and len(r["run_seconds"]) == 2
        assert r["capacity"] == 32 + 4 + bench.PROMPT_MARGIN
        assert r["bytes_per_step"] == r["weight_bytes_per_step"] + r["kv_bytes_per_step"]
        assert r["bandwidth_fraction"] > 0 and r["roofline_fraction"] > 0
        assert r["dispatch"]["decode_attention"]
    # Too long for llama-tiny (max_position_embeddings 4096): skipped with a note, not a crash.
    skipped = [r for r in data["decode"] if r["context"] == 8192]
    assert len(skipped) == 2 and all(r["status"] == "skipped" and "max_position" in r["note"] for r in skipped)

    pre = {r["length"]: r for r in data["prefill"]}
    assert pre[16]["status"] == "ok" and pre[16]["tokens_per_second"] > 0 and pre[16]["matmul_peak_fraction"] > 0
    assert pre[16]["flops"] == bench.prefill_flops(shape_config("llama-tiny"), data["weights"], 16)
    assert pre[8192]["status"] == "skipped"
    assert data["ttft"]["prompt_tokens"] == 16 and data["ttft"]["seconds"] == pre[16]["seconds"]
    assert data["compile"]["cold"]["decode_point"] == [1, 32]
    assert data["memory"].keys() >= {"peak_bytes_in_use", "bytes_limit"}
    assert data["weights"]["bytes"] > data["weights"]["bytes_read_per_decode_step"]  # untied embedding not read


def test_zero_compiles_while_timing_is_recorded(sweep):
    result, _ = sweep
    timed = [r for r in result["decode"] + result["prefill"] if r["status"] == "ok"]
    assert timed and all(r["compiles_during_timing"] == 0 for r in timed)
    assert result["compiles_during_timing_total"] == 0 and result["zero_compiles_after_warmup"] is True


def test_peer_hook_runs_the_script_and_gives_ratios(sweep):
    result, _ = sweep
    peer = result["peer"]
    assert peer["name"] == "torch" and "error" not in peer
    assert [(r["batch"], r["context"], r["prefill"]) for r in peer["runs"]] == [(1, 32, 16), (2, 32, 16)]
    run = peer["runs"][0]
    assert run["hidden_size"] == 64 and run["dtype"] == "float32" and run["device_arg"] == "cpu"
    for r in (x for x in result["decode"] if x["status"] == "ok"):
        assert r["peer_tokens_per_second"] == 100.0 * r["batch"]
        assert r["ratio_to_peer"] == pytest.approx(r["tokens_per_second"] / r["peer_tokens_per_second"])
    pre = result["prefill"][0]
    assert pre["ratio_to_peer"] == pytest.approx(pre["tokens_per_second"] / 1000.0)
    table = bench.format_table(result)
    assert "decode b=2 ctx=32" in table and "TTFT 16" in table and "peer torch" in table


def test_peer_failures_are_recorded_not_raised(tmp_path):
    missing = bench.run_peer("torch", {"hidden_size": 1}, [(1, 8, 8)], 4, script=tmp_path / "nope.py")
    assert "not found" in missing["error"]
    bad = tmp_path / "bad.py"
    bad.write_text("import sys; print('boom', file=sys.stderr); sys.exit(3)")
    out = bench.run_peer("torch", {"hidden_size": 1}, [(1, 8, 8)], 4, script=bad, log=lambda m: None)
    assert "exit 3" in out["runs"][0]["error"] and "boom" in out["runs"][0]["error"]
    reported = tmp_path / "reported.py"
    reported.write_text("import json; print(json.dumps({'decode_tokens_per_second': None, 'error': 'OOM'}))")
    out = bench.run_peer("torch", {"hidden_size": 1}, [(1, 8, 8)], 4, script=reported, log=lambda m: None)
    assert out["runs"][0]["error"] == "OOM"


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_K"])
def test_random_gguf_blocks_decode_to_finite_small_values(ggml_type):
    w = bench.random_gguf_weight(jax.random.PRNGKey(0), ggml_type, (64, 512))
    assert isinstance(w, GGUFWeight) and w.compute_dtype == "bfloat16"
    x = np.asarray(w.dequantize(jnp.float32))
    assert x.shape == (64, 512) and np.isfinite(x).all()
    assert 0.01 < x.std() < 0.04 and abs(x.mean()) < 0.005


@pytest.fixture(scope="module")
def tiny_q4_k():
    """llama-tiny with "Q4_K" random packed weights (float32 compute, which the CPU runs at any batch)."""
    cfg = shape_config("llama-tiny")
    return cfg, *bench.random_quantized_weights(cfg, "Q4_K", jnp.float32)


def test_random_quantized_weights_of_a_shape(tiny_q4_k):
    cfg, weights, types = tiny_q4_k
    # llama-tiny's rows (64, 128) are not whole Q4_K blocks (256): every matrix falls back to Q8_0,
    # repacked into the kernel layout with q/k/v and gate/up fused, as the loader does.
    packed = [x for x in jax.tree_util.tree_leaves(weights, is_leaf=lambda x: isinstance(x, QuantWeight))
              if isinstance(x, QuantWeight)]
    assert types == {"Q8_0": 2 + 7 * cfg.num_layers} and len(packed) == 2 + 4 * cfg.num_layers
    assert all(w.fmt.name == "Q8_0" for w in packed)
    finite = jax.jit(lambda ws: jnp.stack([jnp.isfinite(w.dequantize(jnp.float32)).all() for w in ws]))
    assert np.asarray(finite(packed)).all()
    stats = bench.weight_stats(weights)
    assert all(w.compute_dtype == "float32" for w in packed)
    assert stats["bytes"] == sum(w.nbytes for w in packed) + 4 * (2 * cfg.num_layers + 1) * cfg.hidden_size
    streamed = sum(w.stream_bytes() for w in packed)  # without row padding: the GGUF bytes
    assert streamed == bench.estimate_weight_bytes(cfg, "q4_k") - 2 * (2 * cfg.num_layers + 1) * cfg.hidden_size
    with pytest.raises(ferrum_jax.FerrumError, match="unknown quantized type"):
        bench.random_quantized_weights(cfg, "Q9_9")


def test_attention_flops_match_the_causal_formula():
    cfg = shape_config("llama-3.1-8b")
    t = 512
    expected = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t * (t + 1) // 2
    assert bench.attention_flops_prefill(cfg, t) == expected
    gemma = shape_config("gemma-3-27b")  # 52 sliding-window layers (1024 keys at most), 10 global ones
    per_key = 4 * gemma.num_heads * gemma.head_dim
    local = 1024 * 1025 // 2 + (t - 1024) * 1024 if t > 1024 else t * (t + 1) // 2
    assert bench.attention_flops_prefill(gemma, t) == per_key * (10 * t * (t + 1) // 2 + 52 * local)
    t = 8192
    local = 1024 * 1025 // 2 + (t - 1024) * 1024
    assert bench.attention_flops_prefill(gemma, t) == per_key * (10 * t * (t + 1) // 2 + 52 * local)


def test_cli_bench_runs_the_tiny_case(sweep, tmp_path, capsys):
    # The same shapes as the sweep fixture: its compiled programs are reused, so this is quick.
    code = main(["bench", "--shape", "llama-tiny", "--dtype", "f32", "--batch", "1,2", "--context", "32",
                 "--prefill", "16", "--steps", "4", "--runs", "1", "--copy-bytes", str(1 << 20), "--matmul-n", "128",
                 "--out", str(tmp_path), "--commit", "deadbeef", "--plot"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "decode b=1 ctx=32" in out and "compiles during timing" in out
    data = json.loads((tmp_path / "llama-tiny_f32_cpu.json").read_text())
    assert data["commit"] == "deadbeef" and data["peer"] is None
    assert data["command"].startswith("ferrum-jax bench --shape llama-tiny")
    assert data["settings"]["batches"] == [1, 2] and data["settings"]["runs"] == 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in err
    else:
        assert (tmp_path / "llama-tiny_f32_cpu_decode.png").stat().st_size > 0
        assert (tmp_path / "llama-tiny_f32_cpu_roofline.png").stat().st_size > 0
        (tmp_path / "llama-tiny_f32_cpu_decode.png").unlink()
        assert main(["bench", "--replot", str(tmp_path / "llama-tiny_f32_cpu.json")]) == 0
        assert (tmp_path / "llama-tiny_f32_cpu_decode.png").is_file()


def test_cli_bench_rejects_bad_flags(capsys):
    assert main(["bench", "--shape", "llama-tiny", "--dtype", "q9_9", "--out", "none"]) == 2
    assert "--dtype" in capsys.readouterr().err
    assert main(["bench", "--shape", "no-such-shape", "--out", "none"]) == 2
    assert "unknown model shape" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--batch", "one"])


def test_quantized_decode_runs(tiny_q4_k):
    """Packed weights through the jitted decode (decoded in the step): all steps run, no recompiles."""
    cfg, weights, _ = tiny_q4_k
    rec = bench.bench_decode(weights, cfg, ferrum_jax.DEFAULT_OPS, batch=1, context=16, steps=2, runs=1,
                             kv_dtype=jnp.float32)
    assert rec["steps_done_min"] == 2 and rec["compiles_during_timing"] == 0
    assert rec["dispatch"]["linear"] == "xla_qweight" and np.isfinite(rec["tokens_per_second"])


# ---- mixture of experts ------------------------------------------------------------------------

MOE_TINY = TINY | {"shape": "qwen3-moe-tiny", "batches": (1, 4), "contexts": (32,), "prefill": (16,), "runs": 1}


def _moe_stacks(weights):
    from models.moe import Moe

    return [w for layer in weights.layers if isinstance(layer.mlp, Moe) for w in (layer.mlp.gate, layer.mlp.up,
                                                                               layer.mlp.down) if w is not None]


@pytest.fixture(scope="module")
def moe_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_moe")
    result = bench.run_bench(bench.BenchConfig(**MOE_TINY, out=str(tmp)), log=lambda msg: None)
    return result, tmp


def test_moe_shape_configs():
    big = shape_config("qwen3-30b-a3b")
    assert (big.num_experts, big.top_k, big.moe_intermediate_size, big.num_layers) == (128, 8, 768, 48)
    assert all(big.sparse) and big.norm_topk_prob and big.qk_norm and not big.tie_word_embeddings
    assert (big.num_heads, big.num_kv_heads, big.head_dim) == (32, 4, 128)
    # Abstract weights (nothing drawn): ~30.5 G params, ~3.0 G active per token; 61 GB in bf16.
    w = jax.eval_shape(lambda: ferrum_jax.shapes.random_weights(big, jnp.bfloat16))
    ws = bench.weight_stats(w, big, (1, 8))
    assert ws["bytes"] == bench.estimate_weight_bytes(big, "bf16") == 2 * ws["params"]
    assert 30.4e9 < ws["params"] < 30.6e9 and 3.0e9 < ws["matmul_params_per_token"] + ws["lm_head_params"] < 3.1e9
    # gate and up fused per expert at load: [gate_e; up_e] rows ([128, 1536, 2048]), down [128, 2048, 768]
    assert sorted({s.shape for s in _moe_stacks(w)}) == [(128, 1536, 2048), (128, 2048, 768)]
    tiny = shape_config("qwen3-moe-tiny")
    assert (tiny.num_experts, tiny.top_k, tiny.sparse) == (8, 2, (False, True, True))


def test_mixtral_shape_config():
    """Mixtral-8x7B's published sizes: 46.7 G parameters, 12.9 G active per token (embedding included).
    Derived: each expert is 3 x 4096 x 14336 = 176.2 M, so 6 idle experts x 32 layers leave 33.8 G."""
    cfg = shape_config("mixtral-8x7b")
    assert (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.num_layers) == (8, 2, 14336, 32)
    assert all(cfg.sparse) and cfg.norm_topk_prob and not cfg.qk_norm and cfg.naming == "mixtral"
    w = jax.eval_shape(lambda: ferrum_jax.shapes.random_weights(cfg, jnp.bfloat16))
    ws = bench.weight_stats(w, cfg, (1, 32))
    expert = 3 * 4096 * 14336
    assert ws["moe"]["expert_params"] == 32 * 8 * expert
    assert 46.6e9 < ws["params"] < 46.8e9
    active = ws["params"] - 32 * 6 * expert
    assert 12.8e9 < active < 13.0e9
    assert active == ws["matmul_params_per_token"] + ws["lm_head_params"] + 32000 * 4096 + (2 * 32 + 1) * 4096
    assert ws["moe"]["expected_distinct_experts_per_layer"]["1"] == 2.0


def test_moe_sweep_counts_the_active_experts(moe_sweep):
    result, tmp = moe_sweep
    data = json.loads((tmp / "qwen3-moe-tiny_f32_cpu.json").read_text())
    cfg = shape_config("qwen3-moe-tiny")
    ws = data["weights"]
    moe = ws["moe"]
    e, k = 8, 2
    assert (moe["num_experts"], moe["top_k"], moe["moe_layers"]) == (e, k, 2)
    assert set(ws["bytes_read_per_decode_step"]) == {"1", "4"}
    assert moe["expected_distinct_experts_per_layer"] == {"1": 2.0, "4": 8 * (1 - 0.75 ** 4)}
    # Active parameters: the non-expert 2-D layer weights (attention, routers, layer 0's dense MLP) + k experts.
    h, f, ff = cfg.hidden_size, cfg.moe_intermediate_size, cfg.intermediate_size
    attn = h * cfg.num_heads * cfg.head_dim * 2 + h * cfg.num_kv_heads * cfg.head_dim * 2
    expected = 3 * attn + 3 * h * ff + 2 * (e * h + k * 3 * h * f)
    assert ws["matmul_params_per_token"] == expected
    assert ws["matmul_params_per_token_all_experts"] == expected + 2 * (e - k) * 3 * h * f
    ok = [r for r in data["decode"] if r["status"] == "ok"]
    assert [r["batch"] for r in ok] == [1, 4]
    for r in ok:
        b = r["batch"]
        assert r["weight_bytes_per_step"] == ws["bytes_read_per_decode_step"][str(b)]
        assert r["weight_bytes_per_step"] == bench.decode_weight_bytes(ws, b)
        non_expert = moe["non_expert_bytes_read_per_decode_step"]
        assert r["active_expert_bytes_per_step"] == r["weight_bytes_per_step"] - non_expert
        assert r["expected_distinct_experts_per_layer"] == moe["expected_distinct_experts_per_layer"][str(b)]
        assert r["bytes_per_step"] == r["weight_bytes_per_step"] + r["kv_bytes_per_step"]
        assert r["bandwidth_fraction"] == pytest.approx(
            r["bytes_per_step"] / r["seconds_per_step"] / data["ceilings"]["copy_bandwidth_bytes_per_s"])
        assert r["flops_per_step"] == b * bench.decode_flops_per_token(cfg, ws, 32)
        assert r["steps_done_min"] == 4 and r["compiles_during_timing"] == 0
        assert r["dispatch"]["moe_experts"] and r["dispatch"]["moe_route"]
    all_experts = ws["bytes_read_per_decode_step_all_experts"]
    assert ok[0]["weight_bytes_per_step"] < ok[1]["weight_bytes_per_step"] < all_experts
    assert data["prefill"][0]["flops"] == bench.prefill_flops(cfg, ws, 16)
    assert "expected distinct experts under uniform routing" in moe["note"]
    assert "expected distinct experts under uniform routing" in data["decode_weight_bytes_note"]
    assert any(n.startswith("MoE (8 experts, top 2") for n in data["notes"])
    table = bench.format_table(result)
    assert "MoE weights read b=4" in table and "expected distinct experts under uniform routing" in table


@pytest.mark.parametrize("e, k, b", [(8, 2, 1), (8, 2, 4), (128, 8, 8), (128, 8, 32), (60, 4, 16)])
def test_expected_distinct_experts_matches_monte_carlo(e, k, b):
    rng = np.random.default_rng(e * 1000 + b)
    trials = 4000
    picks = np.argpartition(rng.random((trials, b, e)), k, axis=-1)[..., :k]  # k distinct experts per token
    hit = np.zeros((trials, e), bool)
    hit[np.arange(trials)[:, None], picks.reshape(trials, -1)] = True
    counts = hit.sum(axis=1)
    expected = float(bench.expected_distinct_experts(e, k, b))
    assert abs(counts.mean() - expected) < 4 * counts.std() / np.sqrt(trials) + 1e-9
    assert bench.expected_distinct_experts(e, k, 1) == k
    assert k <= expected <= min(e, b * k)


def test_moe_active_bytes_at_batch_1_are_exactly_k_of_e_experts():
    cfg = shape_config("qwen3-moe-tiny")
    # Dense stacks: gate and up fused at load (2 MoE layers x [gate; up], down); packed: apart.
    for weights, count in ((ferrum_jax.shapes.random_weights(cfg, jnp.float32), 4),
                           (bench.random_quantized_weights(cfg, "Q8_0", jnp.float32)[0], 6)):
        ws = bench.weight_stats(weights, cfg, (1, 2, 64))
        stacks = _moe_stacks(weights)
        assert len(stacks) == count and all(len(s.shape) == 3 and s.shape[0] == 8 for s in stacks)
        expert = sum(int(s.nbytes) for s in stacks)
        non_expert = ws["bytes"] - ws["embedding_bytes_not_read"] - expert
        assert ws["moe"]["expert_bytes"] == expert
        assert ws["moe"]["non_expert_bytes_read_per_decode_step"] == non_expert
        assert ws["bytes_read_per_decode_step"]["1"] == non_expert + expert * 2 // 8 == bench.decode_weight_bytes(ws, 1)
        assert expert * 2 % 8 == 0
        assert ws["bytes_read_per_decode_step"]["2"] == non_expert + round(expert * 3.5 / 8)
        assert ws["bytes_read_per_decode_step"]["64"] <= ws["bytes_read_per_decode_step_all_experts"]
    with pytest.raises(ferrum_jax.FerrumError, match="config"):
        bench.weight_stats(weights)  # MoE without its config: top_k unknown


def test_moe_quantized_random_weights_decode():
    """Packed GGUF expert stacks drawn whole ([experts, out, in], routers dense, repacked into
    QuantWeight stacks as the loader does), through the decode."""
    cfg = shape_config("qwen3-moe-tiny")
    weights, types = bench.random_quantized_weights(cfg, "Q4_K", jnp.float32)
    # Rows of 64 / 32 are not whole Q4_K blocks: Q8_0; each stack counts once; 2 routers stay dense.
    assert types == {"Q8_0": 2 + 4 * 3 + 3 + 3 * 2, "dense": 2}  # embed, lm_head; attention; dense MLP; stacks
    stacks = _moe_stacks(weights)
    # Repacked as the loader does: QuantWeight stacks [experts, out, in].
    assert all(isinstance(s, QuantWeight) and s.ndim == 3 and s.fmt.name == "Q8_0" for s in stacks)
    ws = bench.weight_stats(weights, cfg, (1, 4))
    assert ws["moe"]["expert_bytes"] == sum(s.nbytes for s in stacks)
    assert bench.estimate_weight_bytes(cfg, "q4_k") > 0
    for batch in (1, 4):  # B*k < E (gather the picked experts) and B*k >= E (scan over the experts)
        rec = bench.bench_decode(weights, cfg, ferrum_jax.DEFAULT_OPS, batch=batch, context=16, steps=2, runs=1,
                                 kv_dtype=jnp.float32)
        assert rec["steps_done_min"] == 2 and rec["compiles_during_timing"] == 0
        assert rec["dispatch"]["moe_experts"] == "xla_dequant" and np.isfinite(rec["tokens_per_second"])


def test_moe_quantized_without_stacks_is_refused_before_drawing(monkeypatch):
    import models
    from ferrum_jax.bench import weights as bw

    cfg = shape_config("qwen3-moe-tiny")
    monkeypatch.setattr(bw, "tensor_shapes", lambda c: models.family_of(c).tensor_shapes(c))  # per-expert names
    monkeypatch.setattr(bw, "random_gguf_weight", lambda *a, **k: pytest.fail("drew weights"))
    with pytest.raises(ferrum_jax.FerrumError, match="Qwen3MoeForCausalLM with --dtype q4_k"):
        bench.random_quantized_weights(cfg, "Q4_K")
    from ferrum_jax.bench.run import _load_weights

    with pytest.raises(ferrum_jax.FerrumError, match="--shape qwen3-moe-tiny --dtype q4_k: "):
        _load_weights(bench.BenchConfig(shape="qwen3-moe-tiny", dtype="q4_k"))


def test_dense_shapes_are_unchanged(sweep):
    result, _ = sweep
    cfg = shape_config("llama-tiny")
    ws = result["weights"]
    assert "moe" not in ws and isinstance(ws["bytes_read_per_decode_step"], int)
    assert ws["bytes_read_per_decode_step"] == ws["bytes"] - ws["embedding_bytes_not_read"]
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128
    assert ws["matmul_params_per_token"] == cfg.num_layers * per_layer
    for r in (x for x in result["decode"] if x["status"] == "ok"):
        assert r["weight_bytes_per_step"] == ws["bytes_read_per_decode_step"]
        assert r["weight_bytes_per_step"] == bench.decode_weight_bytes(ws, r["batch"])
        assert "expected_distinct_experts_per_layer" not in r and "active_expert_bytes_per_step" not in r
    assert "decode_weight_bytes_note" not in result and "MoE" not in bench.format_table(result)
    # Figures of the real shapes, as before MoE accounting (bytes of the random weights).
    assert bench.estimate_weight_bytes(shape_config("llama-3.1-8b"), "bf16") == 16060522496
    assert bench.estimate_weight_bytes(shape_config("llama-3.1-8b"), "q4_k") == 4517404672
    assert bench.estimate_weight_bytes(shape_config("qwen3-8b"), "bf16") == 16381470720


# ---- bench/sharded.py: expert parallel against tensor parallel ---------------------------------


def _run_sharded_bench(*argv: str):
    """bench/sharded.py in a subprocess whose jax fakes 8 CPU devices (the flag must be set before
    jax starts, so not in this process)."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "sharded.py"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_sharded_bench_moe_expert_parallel_smoke(tmp_path):
    proc = _run_sharded_bench("--shape", "qwen3-moe-tiny", "--meshes", "tp1,ep2,tp2ep2,ep16", "--dtype", "f32",
                              "--context", "32", "--steps", "4", "--runs", "1", "--batches", "1,4",
                              "--copy-bytes", str(1 << 20), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ep2 (tp=1 ep=2 dp=1) batch=4:" in proc.stderr and "ep16: needs 16 devices, only 8, skipped" in proc.stderr
    data = json.loads((tmp_path / "sharded_qwen3-moe-tiny_f32_cpu_tp1-ep2-tp2ep2-ep16.json").read_text())
    assert data["meshes"] == ["tp1", "ep2", "tp2ep2", "ep16"]
    points = data["points"]
    assert [(p["mesh"], p["tp"], p["ep"], p["dp"], p["batch"]) for p in points] == [
        ("tp1", 1, 1, 1, 1), ("tp1", 1, 1, 1, 4), ("ep2", 1, 2, 1, 1), ("ep2", 1, 2, 1, 4),
        ("tp2ep2", 2, 2, 1, 1), ("tp2ep2", 2, 2, 1, 4)]
    cfg = shape_config("qwen3-moe-tiny")
    # The expert stacks: 2 MoE layers x (gate, up, down) of 8 experts [32, 64], float32.
    expert_bytes = 2 * 3 * cfg.num_experts * cfg.moe_intermediate_size * cfg.hidden_size * 4
    bw = data["ceilings"]["copy_bandwidth_bytes_per_s"]
    for p in points:
        assert p["steps_done_min"] == 4 and p["compiles_per_call"][2:] == [0] and p["tokens_per_second"] > 0
        distinct = bench.expected_distinct_experts(cfg.num_experts, cfg.top_k, p["batch"])
        assert p["expected_distinct_experts_per_layer"] == pytest.approx(float(distinct))
        # The experts a step is expected to read, spread over the ep * tp devices that hold them.
        assert p["expert_bytes_per_device"] == pytest.approx(
            float(expert_bytes * distinct / cfg.num_experts) / (p["ep"] * p["tp"]), abs=1)
        assert p["weight_bytes_per_device"] == p["non_expert_weight_bytes_per_device"] + p["expert_bytes_per_device"]
        assert p["step_bytes_per_device"] == pytest.approx(p["weight_bytes_per_device"] + p["kv_bytes_per_device"])
        assert p["fraction_of_aggregate_copy_bandwidth"] == pytest.approx(
            p["step_bytes_per_device"] / p["seconds_per_step"] / bw)
        base = next(q for q in points if q["mesh"] == "tp1" and q["batch"] == p["batch"])
        assert p["scaling_efficiency"] == pytest.approx(
            p["tokens_per_second"] / (p["devices"] * base["tokens_per_second"]))
    # Non-expert weights: replicated over "expert", split over "model".
    non_expert = {p["mesh"]: p["non_expert_weight_bytes_per_device"] for p in points}
    assert non_expert["ep2"] == non_expert["tp1"] > non_expert["tp2ep2"]
    assert "expected distinct experts under uniform routing" in data["bytes_note"]


def test_sharded_bench_refuses_expert_parallel_on_a_dense_shape():
    proc = _run_sharded_bench("--shape", "llama-tiny", "--meshes", "tp1,ep2", "--out", "")
    assert proc.returncode == 2
    assert "--meshes ep2" in proc.stderr and "--shape llama-tiny is dense" in proc.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# ---- bench/decode_ab.py: decode variants side by side in one process ---------------------------

def test_ops_xla_options_join_the_decode_compiler_options():
    from ferrum_jax.backend import Ops
    assert Ops(platform="cpu").compiler_options(1) is None
    assert Ops(platform="cpu", xla_options=(("xla_gpu_enable_pdl", True),)).compiler_options(1) == {
        "xla_gpu_enable_pdl": True}
    assert Ops(platform="gpu", xla_options=(("xla_gpu_enable_pdl", True),)).compiler_options(64) == {
        "xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_pdl": True}


def test_decode_ab_smoke(tmp_path):
    """Two variants of llama-tiny (one pinning linear to XLA, one with an XLA option) on the CPU: the
    JSON names both with their rounds, a bad variant is refused with the item that is wrong."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "decode_ab.py"
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, str(script), "--shape", "llama-tiny", "--dtype", "f32", "--context", "16",
                           "--steps", "2", "--runs", "1", "--rounds", "2", "--variant", "base=",
                           "--variant", "ref=force:linear=xla,xla:xla_gpu_enable_pdl=true", "--out", str(out),
                           "--commit", "abc123"], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["commit"] == "abc123" and data["shape"] == "llama-tiny" and list(data["variants"]) == ["base", "ref"]
    assert data["variants"]["ref"]["spec"] == "force:linear=xla,xla:xla_gpu_enable_pdl=true"
    for row in data["variants"].values():
        assert len(row["ms_per_step"]) == 2 and min(row["ms_per_step"]) > 0
    assert "x1.000 of the first" in proc.stdout
    bad = subprocess.run([sys.executable, str(script), "--variant", "x=force:linear"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert bad.returncode == 2 and "'force:linear' is not force:OP=IMPL" in bad.stderr
