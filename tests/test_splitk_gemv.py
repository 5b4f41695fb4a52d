"""The split-K GEMV (pallas_kernels/linear/splitk_gemv.py), the add-and-norm kernel summing its
partials (pallas_kernels/norm/add_rms_norm.add_partials_rms_norm) and their `project_add_rms_norm`
registration: interpret mode on CPU, the real kernels on a GPU, against float64 numpy; the dispatch
rule; CUDA lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import norm_kernels
from ferrum_jax.backend import Ops, record_dispatch
from ferrum_jax.ops import Projection
from pallas_kernels.linear import splitk_gemv
from pallas_kernels.norm import add_rms_norm as norm_kernel
from tests.test_decode_attention import INTERPRET, _can_lower_for_cuda

f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731


def _gated_input(x, act, dtype):
    """float64 numpy of the gated input, rounded to `dtype` where the model rounds it: act(gate),
    then its product with up."""
    gate, up = np.split(f64(x), 2, axis=-1)
    acts = {"silu": lambda g: g / (1 + np.exp(-g)),
            "gelu_pytorch_tanh": lambda g: 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))}
    a = f64(jnp.asarray(acts[act](gate), jnp.float32).astype(dtype))
    return f64(jnp.asarray(a * up, jnp.float32).astype(dtype))


def _inputs(n, k, dtype, act, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    x = jax.random.normal(keys[0], (1, 1, 2 * k if act else k), jnp.float32).astype(dtype)
    w = (jax.random.normal(keys[1], (n, k), jnp.float32) / np.sqrt(k)).astype(dtype)
    return x, w


# (N, K, dtype, act, config)
CASES = [
    (64, 512, jnp.bfloat16, None, splitk_gemv.SplitKConfig(32, 64, 4)),  # 2 row blocks x 4 splits of 2 steps
    (48, 256, jnp.float16, None, splitk_gemv.SplitKConfig(64, 128, 4)),  # block_n cut to 16, splits to 2
    (64, 512, jnp.bfloat16, "silu", splitk_gemv.SplitKConfig(64, 128, 2)),  # gated: 1024 inputs gate | up
    (32, 256, jnp.bfloat16, "gelu_pytorch_tanh", None),  # default config cut to the shape
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}->{c[0]}_{jnp.dtype(c[2]).name}_{c[3]}")
def test_splitk_gemv_partials_sum_to_numpy(case):
    n, k, dtype, act, config = case
    x, w = _inputs(n, k, dtype, act, seed=n + k)
    parts = splitk_gemv.splitk_gemv(x, w, act=act, config=config, interpret=INTERPRET)
    cfg = splitk_gemv.choose_config(n, k, config)
    assert parts.shape == (cfg.splits, n) and parts.dtype == jnp.float32
    if config is not None and config.splits > 1 and k // config.block_k >= config.splits:
        assert cfg.splits > 1  # the K range really is split
    xin = _gated_input(x.reshape(-1), act, dtype) if act else f64(x.reshape(-1))
    want = xin @ f64(w).T
    np.testing.assert_allclose(np.asarray(parts, np.float64).sum(0), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(splitk_gemv.reference(x, w, act=act)), want, rtol=2e-2 if act else 1e-5,
                               atol=2e-2 if act else 1e-5)


def test_splitk_gemv_declines_with_reasons():
    w = jnp.ones((64, 128), jnp.bfloat16)
    assert "rows" in splitk_gemv.unsupported(jnp.ones((2, 128), jnp.bfloat16), w)
    assert "dtypes" in splitk_gemv.unsupported(jnp.ones((1, 128), jnp.float32), w.astype(jnp.float32))
    assert "gate | up" in splitk_gemv.unsupported(jnp.ones((1, 128), jnp.bfloat16), w, "silu")
    assert "activation" in splitk_gemv.unsupported(jnp.ones((1, 256), jnp.bfloat16), w, "swish9")
    assert "multiples of 16" in splitk_gemv.unsupported(jnp.ones((1, 120), jnp.bfloat16), jnp.ones((64, 120),
                                                                                                   jnp.bfloat16))
    with pytest.raises(ValueError, match="splitk_gemv: 2 rows"):
        splitk_gemv.splitk_gemv(jnp.ones((2, 128), jnp.bfloat16), w, interpret=True)


@pytest.mark.parametrize("splits,h,offset", [(4, 256, 0.0), (2, 96, 1.0), (1, 64, 0.0)])
def test_add_partials_rms_norm_matches_numpy(splits, h, offset):
    keys = jax.random.split(jax.random.PRNGKey(h), 3)
    x = jax.random.normal(keys[0], (1, 1, h), jnp.float32).astype(jnp.bfloat16)
    parts = jax.random.normal(keys[1], (splits, 1, 1, h), jnp.float32)
    w = (1 + 0.1 * jax.random.normal(keys[2], (h,), jnp.float32)).astype(jnp.bfloat16)
    s, normed = norm_kernel.add_partials_rms_norm(x, parts, w, eps=1e-6, offset=offset, interpret=INTERPRET)
    r = f64(jnp.asarray(np.asarray(parts, np.float64).sum(0), jnp.float32).astype(jnp.bfloat16))
    want_s = f64(jnp.asarray(f64(x) + r, jnp.float32).astype(jnp.bfloat16))  # the add rounded as x's dtype
    np.testing.assert_array_equal(f64(s), want_s)
    want = want_s / np.sqrt(np.mean(want_s ** 2, axis=-1, keepdims=True) + 1e-6) * (offset + f64(w))
    np.testing.assert_allclose(f64(normed), want, rtol=1e-2, atol=1e-2)
    assert "splits" in norm_kernel.unsupported_partials(x, jnp.zeros((3, 1, 1, h), jnp.float32), w)
    assert "float32" in norm_kernel.unsupported_partials(x, jnp.zeros((2, 1, 1, h), jnp.bfloat16), w)


@pytest.mark.parametrize("act", [None, "silu"])
def test_splitk_add_rms_norm_matches_the_op_reference(act):
    """The registered GPU implementation (here in interpret mode) against numpy and against the op's
    reference (the projection through `linear`, then `add_rms_norm`)."""
    n, k = 128, 512
    x_in, w = _inputs(n, k, jnp.bfloat16, act, seed=3)
    x = jax.random.normal(jax.random.PRNGKey(5), (1, 1, n), jnp.float32).astype(jnp.bfloat16)
    nw = (1 + 0.1 * jax.random.normal(jax.random.PRNGKey(6), (n,), jnp.float32)).astype(jnp.bfloat16)
    proj = Projection(x_in, w, act=act)
    s, normed = norm_kernels.pallas_splitk_add_rms_norm(x, proj, nw, eps=1e-6, interpret=INTERPRET)
    xin = _gated_input(x_in.reshape(-1), act, jnp.bfloat16) if act else f64(x_in.reshape(-1))
    y = f64(jnp.asarray(xin @ f64(w).T, jnp.float32).astype(jnp.bfloat16))
    want_s = f64(jnp.asarray(f64(x).reshape(-1) + y, jnp.float32).astype(jnp.bfloat16))
    np.testing.assert_allclose(f64(s).reshape(-1), want_s, rtol=1e-2, atol=2e-2)
    ref_s, ref_n = Ops(platform="cpu").add_rms_norm(x, proj, nw, eps=1e-6)
    np.testing.assert_allclose(f64(s), f64(ref_s), rtol=1e-2, atol=2e-2)
    np.testing.assert_allclose(f64(normed), f64(ref_n), rtol=2e-2, atol=3e-2)


def test_dispatch_rule():
    sds = jax.ShapeDtypeStruct
    x, nw = sds((1, 1, 4096), jnp.bfloat16), sds((4096,), jnp.bfloat16)
    gpu = Ops(platform="gpu")
    down = Projection(sds((1, 1, 2 * 14336), jnp.bfloat16), sds((4096, 14336), jnp.bfloat16), act="silu")
    impl, _ = gpu.choose("project_add_rms_norm", x, down, nw, eps=1e-5, ops=gpu)
    assert impl.name == "pallas_splitk_add_rms_norm"
    declined = {  # what the kernel pair declines, and why
        "rows": (sds((8, 1, 4096), jnp.bfloat16), Projection(sds((8, 1, 4096), jnp.bfloat16),
                                                             sds((4096, 4096), jnp.bfloat16))),
        "reduction fusion": (sds((1, 1, 2048), jnp.bfloat16), Projection(sds((1, 1, 4096), jnp.bfloat16),
                                                                         sds((2048, 4096), jnp.bfloat16))),
        "bias": (x, Projection(sds((1, 1, 4096), jnp.bfloat16), sds((4096, 4096), jnp.bfloat16),
                               sds((4096,), jnp.bfloat16))),
    }
    for why, (xx, proj) in declined.items():
        impl, choice = gpu.choose("project_add_rms_norm", xx, proj, sds((xx.shape[-1],), jnp.bfloat16), eps=1e-5,
                                  ops=gpu)
        assert impl.name == "xla" and why in dict(choice.skipped)["pallas_splitk_add_rms_norm"], why
    impl, _ = Ops(platform="cpu").choose("project_add_rms_norm", x, down, nw, eps=1e-5, ops=gpu)
    assert impl.name == "xla"


def test_add_rms_norm_of_a_projection_dispatches_to_the_fused_op():
    x = jnp.ones((1, 1, 64), jnp.float32)
    proj = Projection(jnp.ones((1, 1, 32), jnp.float32), jnp.full((64, 32), 0.5, jnp.float32))
    with record_dispatch() as choices:
        s, _ = Ops(platform="cpu").add_rms_norm(x, proj, jnp.ones((64,), jnp.float32), eps=1e-6)
    assert [c.op for c in choices][:2] == ["project_add_rms_norm", "linear"]
    np.testing.assert_array_equal(np.asarray(s), np.full((1, 1, 64), 17.0, np.float32))  # 1 + 32 * 0.5


def test_lowers_for_cuda():
    reason = _can_lower_for_cuda()
    if reason is not None:
        pytest.skip(reason)
    sds = jax.ShapeDtypeStruct
    x, nw = sds((1, 1, 4096), jnp.bfloat16), sds((4096,), jnp.bfloat16)
    fn = lambda x, gu, w, nw: norm_kernels.pallas_splitk_add_rms_norm(  # noqa: E731
        x, Projection(gu, w, act="silu"), nw, eps=1e-5)
    lowered = jax.jit(fn).trace(x, sds((1, 1, 28672), jnp.bfloat16), sds((4096, 14336), jnp.bfloat16), nw).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text()[:200000].count("triton") >= 2
