"""Sharded runs (ferrum_jax.sharding) on CPU.

The sharded checks need several devices, which jax only fakes on the CPU when
XLA_FLAGS=--xla_force_host_platform_device_count=8 is set before it starts: they run once, in a
subprocess (tests/sharding_checks.py), over tiny random Llama (GQA: 4 heads, 2 kv heads, so tp=4
replicates kv heads), Gemma 3, Qwen3-MoE and Qwen2-MoE (8 experts; expert parallel) checkpoints
and a Q8_0 Llama GGUF built here; the tests below
assert on its JSON. The rest runs in this (1-device) process: the tensor-parallel layout itself
(kv head replication, q/k/v fused per shard) on one device, the rule table, the CLI flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import build  # sets HF_HUB_OFFLINE before transformers is imported

import ferrum_jax as fj
import models
from ferrum_jax import sharding as sh
from ferrum_jax.cli import main as cli_main
from ferrum_jax.errors import ConfigError
from models.common import Attention

HERE = Path(__file__).resolve().parent
# fp32: sharded reductions only change the summation order. 1e-5 of the logits' scale (max |logit|
# of the reference, 6-20 for these models): measured 4e-6 .. 1.1e-5 absolute.
LOGIT_RTOL = 1e-5
MESHES = ("tp2", "tp4", "dp2", "tp2xdp2", "tp4xdp2")
MOE_MESHES = {"ep2": (1, 1, 2), "ep4": (1, 1, 4), "tp2": (2, 1, 1), "ep2xdp2": (1, 2, 2), "tp2xep2": (2, 1, 2)}
MOE_CASES = [f"qwen3-moe-{m}" for m in MOE_MESHES] + ["qwen2-moe-tp2xep4", "qwen2-moe-ep2xdp2-shard_model"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharding")
    from test_gguf_loading import convert, llama3 as gguf_llama3, write_gguf
    from test_moe import BUILDERS as MOE_BUILDERS

    arch, hf = gguf_llama3()
    meta, tensors = convert(hf, arch)
    gguf_path = root / "llama-q8_0.gguf"
    write_gguf(gguf_path, arch, meta, tensors, lambda name, shape: "Q8_0" if len(shape) == 2 else "F32")
    return {"llama": build("llama3", root / "llama3")[0], "gemma": build("gemma3", root / "gemma3")[0],
            "gguf": gguf_path, "qwen3-moe": MOE_BUILDERS["qwen3-moe"](root / "qwen3-moe")[0],
            "qwen2-moe": MOE_BUILDERS["qwen2-moe-shared"](root / "qwen2-moe")[0]}


@pytest.fixture(scope="module")
def results(checkpoints) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE / "sharding_checks.py"), "--llama", str(checkpoints["llama"]),
                           "--gemma", str(checkpoints["gemma"]), "--gguf", str(checkpoints["gguf"]),
                           "--qwen3-moe", str(checkpoints["qwen3-moe"]), "--qwen2-moe", str(checkpoints["qwen2-moe"])],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


# --- sharded == single device (8 host devices, in the subprocess) ----------------------------------


@pytest.mark.parametrize("case", [f"{f}-{m}" for f in ("llama", "gemma3") for m in MESHES]
                         + ["llama-tp4-shard_model", "gemma3-tp4-shard_model", "gguf-dequantized-tp2xdp2",
                            "gguf-packed-tp2xdp2"] + MOE_CASES)
def test_sharded_generation_matches_single_device(results, case):
    r = results["cases"][case]
    assert r["tokens_equal"], f"{case}: greedy tokens differ: {r['tokens']}"
    assert len(r["tokens"][0]) == 17
    tol = LOGIT_RTOL * max(1.0, r["logit_scale"])
    print(f"\n[sharding] {case:26s} max |logit diff| prefill+decode {r['max_logit_diff']:.2e}, prompt "
          f"{r['max_prompt_logit_diff']:.2e} (max |logit| {r['logit_scale']:.1f})")
    assert r["max_logit_diff"] <= tol, f"{case}: prefill + 16 decode steps, max |diff| {r['max_logit_diff']:.2e}"
    assert r["max_prompt_logit_diff"] <= tol
    assert r["recompiles"] == 0, f"{case}: a second generation in the same buckets compiled {r['recompiles']} programs"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("mesh", MESHES)
def test_each_device_holds_its_share(results, family, mesh):
    r = results["cases"][f"{family}-{mesh}"]
    tp, dp = {"tp2": (2, 1), "tp4": (4, 1), "dp2": (1, 2), "tp2xdp2": (2, 2), "tp4xdp2": (4, 2)}[mesh]
    per_device = list(r["device_bytes"].values())
    assert len(per_device) == tp * dp, r["device_bytes"]
    # Each device holds 1/tp of every split leaf and all of the (small) replicated ones, nothing more.
    assert per_device == [r["expected_device_bytes"]] * (tp * dp)
    shapes = r["shapes"]
    kv = r["num_kv_heads"]
    assert kv == (4 if (family, tp) in (("llama", 4), ("gemma3", 4)) else 2)  # kv heads replicated for tp=4
    vocab, hidden = shapes["embed"]["global"]
    assert shapes["embed"]["shards"] == [[vocab // tp, hidden]]
    attn = shapes["layers.0.attn.wqkv"]
    assert attn["shards"] == [[attn["global"][0] // tp, hidden]]
    assert shapes["layers.0.attn.wo"]["shards"] == [[hidden, shapes["layers.0.attn.wo"]["global"][1] // tp]]
    mlp = "layers.0.mlp.gate"
    assert shapes[mlp]["shards"] == [[shapes[mlp]["global"][0] // tp, hidden]]
    assert shapes["layers.0.attn_norm"]["shards"] == [[hidden]]  # replicated


def test_per_device_bytes_shrink_with_tp(results):
    for family in ("llama", "gemma3"):
        one = results[family]["total_bytes"]
        for mesh, tp in (("tp2", 2), ("tp4", 4)):
            got = list(results["cases"][f"{family}-{mesh}"]["device_bytes"].values())[0]
            assert got < one / tp * 1.25, f"{family} {mesh}: {got} bytes per device of {one}"
        dp_only = list(results["cases"][f"{family}-dp2"]["device_bytes"].values())[0]
        assert dp_only == one  # data parallel: full replicas


def test_gguf_packed_stays_packed(results):
    assert results["cases"]["gguf-packed-tp2xdp2"]["packed_leaves"] > 0
    assert results["cases"]["gguf-dequantized-tp2xdp2"]["packed_leaves"] == 0


def test_errors_name_the_tensor_and_mesh_axis(results):
    e = results["errors"]
    assert "CheckpointError" in e["packed_blocks"] and "attn.wo" in e["packed_blocks"], e["packed_blocks"]
    assert "blocks of 32" in e["packed_blocks"] and "'model' of size 4" in e["packed_blocks"]
    assert "num_attention_heads=4" in e["heads"] and "'model'" in e["heads"]
    assert "num_key_value_heads=3" in e["kv_heads"]
    assert "needs 16 devices" in e["devices"]
    assert "expert parallel needs an MoE model" in e["expert"]
    assert "CheckpointError" in e["vocab"] and "'embed'" in e["vocab"] and "'model'" in e["vocab"]


@pytest.mark.parametrize("mesh", list(MOE_MESHES))
def test_moe_each_device_holds_its_experts(results, mesh):
    """Expert parallel: device (d, e, t) of the (data, expert, model) mesh holds experts
    [e*E/ep, (e+1)*E/ep) of every stack and (tp > 1) its 1/tp of their FFN dim; the router and the
    attention / dense parts keep their layouts (replicated over "expert")."""
    r = results["cases"][f"qwen3-moe-{mesh}"]
    tp, dp, ep = MOE_MESHES[mesh]
    per_device = list(r["device_bytes"].values())
    assert len(per_device) == tp * dp * ep and per_device == [r["expected_device_bytes"]] * (tp * dp * ep)
    n = 8 // ep
    assert r["experts"] == {str(i): [(i // tp) % ep * n, ((i // tp) % ep + 1) * n] for i in range(tp * dp * ep)}
    shapes = r["shapes"]
    e, f, h = shapes["layers.0.mlp.gate"]["global"]
    assert (e, f) == (8, 32)
    assert shapes["layers.0.mlp.gate"]["shards"] == [[n, f // tp, h]]
    assert shapes["layers.0.mlp.up"]["shards"] == [[n, f // tp, h]]
    assert shapes["layers.0.mlp.down"]["shards"] == [[n, h, f // tp]]
    assert shapes["layers.0.mlp.router"]["shards"] == [[8, h]]  # routing replicated
    if ep > 1 and tp == 1:  # (the tiny model's embeddings, replicated, weigh as much as its experts)
        assert per_device[0] < results["qwen3-moe"]["total_bytes"]


def test_moe_errors_name_the_field_and_mesh_axis(results):
    e = results["errors"]
    assert "ConfigError" in e["moe_experts"] and "num_experts=8" in e["moe_experts"], e["moe_experts"]
    assert "'expert' of size 3" in e["moe_experts"]
    assert "moe_intermediate_size=32" in e["moe_ffn"] and "'model' of size 3" in e["moe_ffn"], e["moe_ffn"]


def test_moe_stack_axes():
    """Expert stacks (3-D gate/up/down) split experts over "expert" and their FFN dim over "model";
    a dense Mlp's 2-D gate/up/down keep the Megatron layout; the router is replicated."""
    gk = jax.tree_util.GetAttrKey
    stack, mat = jax.ShapeDtypeStruct((8, 32, 64), jnp.float32), jax.ShapeDtypeStruct((32, 64), jnp.float32)
    P = jax.sharding.PartitionSpec
    assert sh.spec(sh.logical_axes((gk("mlp"), gk("gate")), stack)) == P("expert", "model", None)
    assert sh.spec(sh.logical_axes((gk("mlp"), gk("down")), stack)) == P("expert", None, "model")
    assert sh.spec(sh.logical_axes((gk("mlp"), gk("gate")), mat)) == P("model", None)
    assert sh.spec(sh.logical_axes((gk("mlp"), gk("router")), mat)) == P(None, None)


# --- the layout, on one device -------------------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_layout_computes_the_same_on_one_device(tiny_model, tp):
    """The rearranged weights (kv heads replicated for tp=4, q/k/v interleaved per shard, gate/up
    apart) run unsharded give the original logits: the layout is right before any sharding."""
    cfg = sh.sharded_config(tiny_model.config, fj.make_mesh(tp=1))
    assert cfg is tiny_model.config
    weights = sh.arrange(tiny_model.weights, tiny_model.config, tp, sh.DEVICE_ROWS)
    attn = weights.layers[0].attn
    assert isinstance(attn, Attention) and attn.shards == tp and attn.wq is None
    assert weights.layers[0].mlp.up is not None
    mesh_cfg = _replicated_kv_config(tiny_model.config, tp)
    ids = [5, 9, 17, 33, 65, 129, 200, 7]
    ref = _logits(tiny_model.config, tiny_model.weights, ids)
    got = _logits(mesh_cfg, weights, ids)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def _replicated_kv_config(cfg, tp):
    rep = sh.kv_replicas(cfg.num_heads, cfg.num_kv_heads, tp)
    import dataclasses
    kv = cfg.num_kv_heads * rep
    return dataclasses.replace(cfg, num_kv_heads=kv, attn=tuple(dataclasses.replace(a, num_kv_heads=kv) for a in cfg.attn))


def _logits(cfg, weights, ids):
    from ferrum_jax.cache import KVCache
    cache = KVCache.create(num_layers=cfg.num_layers, batch=1, kv_heads=cfg.num_kv_heads, capacity=16,
                           head_dim=cfg.head_dim, dtype=jnp.float32)
    positions = jnp.arange(len(ids))[None]
    out, _ = models.family_of(cfg).forward(weights, jnp.asarray([ids]), positions, cache, cfg, fj.DEFAULT_OPS)
    return np.asarray(out[0])


def test_interleaved_rows():
    """wqkv rows for tp=2, 4 heads of 1 dim, 2 kv heads replicated to... none: [q0 q1 k0 v0 | q2 q3 k1 v1]."""
    class Cfg:  # the fields arrange reads
        architecture, num_heads, num_kv_heads, head_dim, intermediate_size = "test", 4, 2, 1, 2

    q, k, v = (jnp.arange(n, dtype=jnp.float32)[:, None] + base for n, base in ((4, 0), (2, 10), (2, 20)))
    attn = Attention(wq=q, wk=k, wv=v, wo=jnp.zeros((1, 4)))
    out = sh.arrange(attn, Cfg, 2, sh.DEVICE_ROWS)
    assert out.wqkv[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    out = sh.arrange(attn, Cfg, 4, sh.DEVICE_ROWS)  # 2 kv heads over 4 devices: each one twice
    assert out.wqkv[:, 0].tolist() == [0, 10, 20, 1, 10, 20, 2, 11, 21, 3, 11, 21]


def test_every_weight_has_logical_axes(tiny_model):
    shardings = sh.weight_shardings(tiny_model.weights, fj.make_mesh())
    assert all(isinstance(s, jax.sharding.NamedSharding) for s in jax.tree_util.tree_leaves(shardings))
    assert sh.spec(sh.CACHE_AXES) == jax.sharding.PartitionSpec("data", "model", None, None)
    assert sh.spec(sh.WEIGHT_AXES["wo"]) == jax.sharding.PartitionSpec(None, "model")


def test_mesh_needs_devices():
    with pytest.raises(ConfigError, match="needs 2 devices"):
        fj.make_mesh(tp=2)
    assert fj.make_mesh().axis_names == ("data", "expert", "model")


def test_cli_rejects_expert_parallel_on_dense_models(tiny_model_dir, capsys):
    code = cli_main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--ep", "2",
                     "--compile-cache", "none"])
    assert code == 2  # this 1-device process has no 2 devices; on a host with them, check_mesh refuses the dense model
    assert "needs 2 devices" in capsys.readouterr().err


def test_cli_tp1_dp1_runs_unsharded(tiny_model_dir, capsys):
    code = cli_main(["generate", "--model", str(tiny_model_dir), "--prompt", "Hello", "--max-tokens", "3",
                     "--tp", "1", "--dp", "1", "--compile-cache", "none"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_on_cpu(checkpoints, tmp_path):
    """examples/multihost.py as 2 local CPU processes (2 devices each) with a local coordinator:
    tp=2 x dp=2 over both processes gives the single-process greedy tokens."""
    script = HERE.parent / "examples" / "multihost.py"
    common = [sys.executable, str(script), "--model", str(checkpoints["llama"]), "--tp", "2", "--dp", "2",
              "--cpu-devices", "2", "--max-tokens", "8", "--prompt-ids", "5,9,17,33"]
    port = 20000 + os.getpid() % 10000
    procs = [subprocess.Popen(common + ["--coordinator", f"localhost:{port}", "--num-processes", "2",
                                        "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    single = fj.generate(fj.load(checkpoints["llama"], dtype="float32", progress=False), [5, 9, 17, 33], max_tokens=8)
    assert f"tokens: {single.token_ids}" in outs[0][0], outs[0][0]
