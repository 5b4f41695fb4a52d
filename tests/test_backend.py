"""Op dispatch (ferrum_jax.backend) and the XLA reference rope against transformers."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ferrum_jax as fj
from ferrum_jax import backend, ops
from ferrum_jax.backend import Impl, Ops, record_dispatch, register

OPS_OF_A_LLAMA = {"embed", "rms_norm", "add_rms_norm", "add_rms_norm_linear", "linear", "rope", "attention", "gated_mlp", "activation"}


@pytest.fixture
def clean_registry():
    """Snapshot the dispatch table and restore it, so fake kernels never leak into other tests."""
    saved = {op: list(impls) for op, impls in backend._TABLE.items()}
    yield
    backend._TABLE.clear()
    backend._TABLE.update(saved)


def _attention_args(b=1, t=5, heads=4, kv_heads=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, heads, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kv_heads, t, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kv_heads, t, d)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return (q, k, v, pos), dict(scale=d ** -0.5)


# ---------------------------------------------------------------------------------------------
# Dispatch through generate


def test_generate_records_dispatch_with_forced_attention(tiny_model):
    """Ops(force=...) runs end to end (its own compiled program: Ops is a static argument) and the
    implementation of every op that ran is reported, both in Stats.dispatch and record_dispatch()."""
    forced = dataclasses.replace(tiny_model, ops=Ops(force=(("attention", "xla"),)))
    # max_tokens=1: prefill only, so the new program costs one compile, not two.
    with record_dispatch() as choices:
        out = fj.generate(forced, "Hello world", max_tokens=1)
    assert {c.op for c in choices} == OPS_OF_A_LLAMA == set(out.stats.dispatch)
    assert out.stats.dispatch["attention"] == "xla" and {c.impl for c in choices if c.op == "attention"} == {"xla"}
    if jax.default_backend() == "cpu":  # on a GPU the other ops take their kernels
        assert out.stats.dispatch == {op: "xla" for op in OPS_OF_A_LLAMA}
        assert all(c.impl == "xla" for c in choices)
    assert out.token_ids == fj.generate(tiny_model, "Hello world", max_tokens=1).token_ids


def test_stats_dispatch_reported_for_cached_programs(tiny_model):
    fj.generate(tiny_model, "Hello world", max_tokens=2)  # compiles (or reuses) the programs
    again = fj.generate(tiny_model, "Hello world", max_tokens=2)
    assert again.stats.dispatch.get("attention") == "xla"


# ---------------------------------------------------------------------------------------------
# Forcing and registering implementations (eager calls: no model compile needed)


def test_force_reference_implementation():
    args, kw = _attention_args()
    with record_dispatch() as choices:
        out = Ops(force=(("attention", "xla"),)).attention(*args, **kw)
    assert [(c.op, c.impl) for c in choices] == [("attention", "xla")]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ops.attention(*args, **kw)))


def test_force_nonexistent_implementation_raises():
    args, kw = _attention_args()
    with pytest.raises(ValueError, match=r"attention.*nope"):
        Ops(force=(("attention", "nope"),)).attention(*args, **kw)


def test_force_unknown_op_name_raises():
    args, kw = _attention_args()
    try:
        Ops(force=(("atention", "xla"),)).attention(*args, **kw)
    except (ValueError, KeyError) as e:
        assert "atention" in str(e)
    else:
        raise AssertionError("force=(('atention', 'xla'),) was accepted")


def test_unknown_op():
    with pytest.raises(KeyError, match="no op named 'convolve'"):
        Ops().call("convolve", 1)


def _fake(x, w, *, eps, offset=0.0):
    return jnp.full_like(x, 42.0)


def test_fake_kernels_skipped_with_reasons(clean_registry, caplog):
    register("rms_norm", Impl("fake_tpu_kernel", _fake, platforms=frozenset({"tpu"})))
    register("rms_norm", Impl("fake_cpu_kernel", _fake, platforms=frozenset({"cpu"}),
                              applies=lambda x, w, **kw: f"width {x.shape[-1]} is below 128"))
    assert backend.implementations("rms_norm") == ["fake_tpu_kernel", "fake_cpu_kernel", "xla"]

    x = jnp.arange(12, dtype=jnp.float32).reshape(3, 4) + 1
    w = jnp.ones((4,), jnp.float32)
    with caplog.at_level(logging.DEBUG, logger="ferrum_jax.dispatch"), record_dispatch() as choices:
        out = Ops(platform="cpu").rms_norm(x, w, eps=1e-6)
    (choice,) = choices
    assert choice.impl == "xla"
    assert choice.skipped == (("fake_tpu_kernel", "not on cpu"), ("fake_cpu_kernel", "width 4 is below 128"))
    assert "not on cpu" in caplog.text and "width 4 is below 128" in caplog.text
    np.testing.assert_allclose(np.asarray(out), np.asarray(ops.rms_norm(x, w, eps=1e-6)))

    # The same table on another platform picks the fake kernel; forcing a declining kernel says why.
    with record_dispatch() as choices:
        out = Ops(platform="tpu").rms_norm(x, w, eps=1e-6)
    assert choices[0].impl == "fake_tpu_kernel" and float(out[0, 0]) == 42.0
    with pytest.raises(ValueError, match="forced implementation 'fake_cpu_kernel' does not apply: width 4"):
        Ops(platform="cpu", force=(("rms_norm", "fake_cpu_kernel"),)).rms_norm(x, w, eps=1e-6)
    with pytest.raises(ValueError, match="forced implementation 'fake_tpu_kernel' does not run on cpu"):
        Ops(platform="cpu", force=(("rms_norm", "fake_tpu_kernel"),)).rms_norm(x, w, eps=1e-6)
    with pytest.raises(ValueError, match="already has an implementation named 'fake_cpu_kernel'"):
        register("rms_norm", Impl("fake_cpu_kernel", _fake))


def test_accepting_cpu_kernel_runs(clean_registry):
    register("rms_norm", Impl("fake_cpu_kernel", _fake, platforms=frozenset({"cpu"}), applies=lambda *a, **k: None))
    x = jnp.ones((2, 4), jnp.float32)
    with record_dispatch() as choices:
        out = Ops(platform="cpu").rms_norm(x, jnp.ones((4,)), eps=1e-6)
    assert choices[0].impl == "fake_cpu_kernel" and choices[0].skipped == ()
    assert float(out[0, 0]) == 42.0
    # Forcing the reference skips the kernel, with that reason.
    with record_dispatch() as choices:
        Ops(force=(("rms_norm", "xla"),)).rms_norm(x, jnp.ones((4,)), eps=1e-6)
    assert choices[0].impl == "xla" and choices[0].skipped == (("fake_cpu_kernel", "forced xla"),)


# ---------------------------------------------------------------------------------------------
# Rope: the reference op vs a numpy rotate-half rope with transformers' inverse frequencies

ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 2048},
    "yarn-beta-mscale": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 32.0, "beta_fast": 16.0,
                         "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                         "original_max_position_embeddings": 256},
    "yarn-no-truncate": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "truncate": False,
                         "original_max_position_embeddings": 4096},
    "yarn-attention-factor": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "attention_factor": 0.9,
                              "original_max_position_embeddings": 2048},
}


def _hf_inv_freq(hf_config, rope_parameters):
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = rope_parameters["rope_type"]
    if kind == "default":
        dim = hf_config.head_dim
        theta = rope_parameters["rope_theta"]
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv.numpy(), 1.0
    inv, attention_factor = ROPE_INIT_FUNCTIONS[kind](hf_config, None)
    return inv.numpy(), float(attention_factor)


def _numpy_rope(x, positions, inv_freq, attention_factor):
    """transformers' apply_rotary_pos_emb (rotate_half) with its cos/sin, in float32."""
    freqs = positions.astype(np.float32)[..., None] * inv_freq.astype(np.float32)[None, None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos = (np.cos(emb) * attention_factor)[:, :, None, :]
    sin = (np.sin(emb) * attention_factor)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(np.float32)


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_matches_transformers(case):
    from transformers import LlamaConfig

    import models

    params = ROPE_CASES[case]
    hf_config = LlamaConfig(vocab_size=32, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                            rope_parameters=dict(params), architectures=["LlamaForCausalLM"])
    inv_ref, factor_ref = _hf_inv_freq(hf_config, params)

    # Through the real config path: config.json dict -> models.llama.Config -> Rope.
    cfg = models.config_from_hf(hf_config.to_dict())
    rope = cfg.attn[0].rope
    assert rope.kind == params["rope_type"]
    np.testing.assert_allclose(rope.inv_freq(), inv_ref, rtol=3e-7, atol=0)  # <= 2 ulp
    assert rope.attention_factor == pytest.approx(factor_ref, rel=1e-12)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 4, cfg.head_dim)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4, 5], [7, 100, 1023, 2049, 4000, 8191]], np.int32)
    got = np.asarray(ops.rope(jnp.asarray(x), jnp.asarray(positions), rope))
    # The op itself: rotate-half layout, cos/sin scaling, float32 angles. Tight, at every position.
    np.testing.assert_allclose(got, _numpy_rope(x, positions, rope.inv_freq(), factor_ref), rtol=0, atol=2e-5)
    # With transformers' own inv_freq: numpy's and torch's float32 pow differ by up to 2 ulp, an angle
    # error that grows with the position (~1e-3 rad at 8191), so the far positions get a looser bound.
    want = _numpy_rope(x, positions, inv_ref, factor_ref)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=2e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=5e-3)


def test_sharded_ops_skip_pallas_calls():
    """GSPMD cannot partition a Pallas call: ops on a mesh skip it for an op without a layout
    (and say why), forcing one is refused; unsharded ops on a GPU would take the kernel."""
    import ferrum_jax as fj
    from ferrum_jax.quant.qweight import GGUF_FORMATS, QuantWeight
    mesh = fj.make_mesh(tp=1)
    rng = np.random.default_rng(0)
    w = QuantWeight.from_codes(rng.integers(-127, 128, (64, 256)), np.ones((64, 8)), GGUF_FORMATS["Q8_0"])
    x = jnp.ones((1, 256), jnp.float32)
    assert Ops(platform="gpu").choose("linear", x, w)[0].name.startswith("pallas")
    impl, choice = Ops(platform="gpu", mesh=mesh).choose("linear", x, w)
    assert not impl.name.startswith("pallas") and "operands are sharded over a mesh" in str(choice)
    forced = Ops(platform="gpu", mesh=mesh, force=(("linear", "pallas_qmatmul"),))
    with pytest.raises(ValueError, match="sharded over a mesh"):
        forced.choose("linear", x, w)


def test_attention_on_a_mesh_runs_kernels_on_local_shards():
    """Attention has a layout: on a mesh it runs in shard_map and picks the kernel on the local
    shards (traced only: the GPU kernel does not lower on the CPU)."""
    import ferrum_jax as fj
    from ferrum_jax.backend import record_dispatch
    mesh = fj.make_mesh(tp=1)
    (q, k, v, pos), kw = _attention_args(t=1, d=64)
    ops = Ops(platform="gpu", mesh=mesh)
    with record_dispatch() as choices:
        jaxpr = jax.make_jaxpr(lambda *a: ops.decode_attention(*a, **kw))(q, k, v, pos)
    assert [c.impl for c in choices] == ["pallas_decode"]
    assert "shard_map" in str(jaxpr)
    # On the CPU the reference runs in the shard_map and gives the unsharded result.
    got = Ops(mesh=mesh).decode_attention(q, k, v, pos, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(Ops().decode_attention(q, k, v, pos, **kw)), rtol=1e-6)


def test_model_on_a_mesh_gets_sharded_ops(tiny_model):
    import dataclasses

    import ferrum_jax as fj
    assert not tiny_model.ops.sharded
    mesh = fj.make_mesh(tp=1)
    sharded = dataclasses.replace(tiny_model, mesh=mesh)
    assert sharded.ops.sharded and sharded.ops.mesh is mesh


# ---------------------------------------------------------------------------------------------
# XLA compiler options of the decode programs


def test_compiler_options_turn_triton_gemms_off_from_the_row_threshold_on_gpu_only():
    gpu = Ops(platform="gpu")
    assert gpu.compiler_options(gpu.cublas_from_rows) == {"xla_gpu_enable_triton_gemm": False}
    assert gpu.compiler_options(gpu.cublas_from_rows - 1) is None
    assert Ops(platform="cpu").compiler_options(1024) is None
    assert Ops(platform="gpu", cublas_from_rows=None).compiler_options(1024) is None
    assert Ops(platform="gpu", cublas_from_rows=1).compiler_options(1) == {"xla_gpu_enable_triton_gemm": False}


def test_decode_picks_one_jitted_program_per_compiler_options():
    from ferrum_jax.generate import DecodeProgram

    prog = DecodeProgram()
    state = lambda rows: type("S", (), {"last": jnp.zeros((rows,), jnp.int32)})()  # noqa: E731
    gpu = Ops(platform="gpu", cublas_from_rows=8)
    small, large, again = prog.program(state(4), gpu), prog.program(state(8), gpu), prog.program(state(16), gpu)
    assert small is not large and large is again
    assert prog.program(state(16), Ops(platform="cpu")) is small  # no options: the same program


def test_exact_ops_skip_approximate_implementations():
    """Ops(exact=True): the integer-dot kernels (int8 activations) decline with the reason and the
    exact kernel next in line runs; forcing an approximate one with exact=True is refused."""
    from ferrum_jax.quant.qweight import GGUF_FORMATS, QuantWeight

    w = QuantWeight.from_codes(jnp.zeros((64, 256), jnp.uint8), jnp.ones((64, 8), jnp.uint8), GGUF_FORMATS["Q4_K"],
                               mins=jnp.zeros((64, 8), jnp.uint8), super_scales=jnp.ones((64, 1), jnp.float32),
                               super_offsets=jnp.zeros((64, 1), jnp.float32))
    x = jnp.ones((1, 1, 256), jnp.bfloat16)
    assert Ops(platform="gpu").choose("linear", x, w, None)[0].name == "pallas_qmatmul_dp4a"
    impl, choice = Ops(platform="gpu", exact=True).choose("linear", x, w, None)
    assert impl.name == "pallas_qmatmul" and "approximate (int8 activations)" in str(choice)
    with pytest.raises(ValueError, match="pallas_qmatmul_dp4a.* is approximate"):
        Ops(exact=True, force=(("linear", "pallas_qmatmul_dp4a"),))
    assert all(i.approximate is None for op in ("attention", "rms_norm") for i in backend._TABLE[op])
