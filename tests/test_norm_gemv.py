"""The fused residual add + RMS norm + GEMV (pallas_kernels/linear/norm_gemv.py) and its
`add_rms_norm_linear` registration: interpret mode on CPU, the real kernel on a GPU, against float64
numpy; the op's reference against the separate ops; the dispatch rule; CUDA lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import linear_kernels  # noqa: F401  registers pallas_add_rms_norm_gemv
from ferrum_jax.backend import Ops
from pallas_kernels.linear import gemv, norm_gemv
from tests.test_decode_attention import INTERPRET, _can_lower_for_cuda


def _numpy_norm_linear(x, r, nw, w, b, eps, offset, dtype):
    """float64 numpy of the reference's steps, with the sum and the normed row rounded to `dtype`
    where the reference rounds them (x + residual, the norm's output)."""
    f = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731
    s = f(x) if r is None else f((x + r))  # the add in x's dtype, as the reference
    normed = s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + eps) * (offset + f(nw))
    normed = f(jnp.asarray(normed, jnp.float32).astype(dtype))
    y = normed @ f(w).T
    return s, (y if b is None else y + f(b))


# (rows shape, N, K, dtype, residual, bias, offset, config)
CASES = [
    ((1, 1), 48, 256, jnp.float32, True, False, 0.0, gemv.GemvConfig(16, 64, 4)),  # 4 unrolled steps, 3 row blocks
    ((2, 1), 40, 96, jnp.float32, True, True, 1.0, gemv.GemvConfig(8, 32, 4)),  # 2 rows, bias, Gemma's offset
    ((1, 1), 64, 128, jnp.float32, False, False, 0.0, gemv.GemvConfig(8, 64, 4)),  # no residual (the first layer)
    ((4,), 64, 128, jnp.bfloat16, True, True, 0.0, None),  # 4 rows, default config cut to the shape
    ((1, 1), 24, 2048, jnp.bfloat16, True, False, 0.0, gemv.GemvConfig(8, 64, 4)),  # block_k grows to 128
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[2]}->{c[1]}_{jnp.dtype(c[3]).name}_r{int(c[4])}")
def test_add_rms_norm_gemv_matches_numpy(case):
    lead, n, k, dtype, residual, bias, offset, config = case
    keys = jax.random.split(jax.random.PRNGKey(n + k), 5)
    x = jax.random.normal(keys[0], (*lead, k), jnp.float32).astype(dtype)
    r = (0.5 * jax.random.normal(keys[1], (*lead, k), jnp.float32)).astype(dtype) if residual else None
    nw = (1.0 + 0.1 * jax.random.normal(keys[2], (k,), jnp.float32)).astype(dtype)
    w = (jax.random.normal(keys[3], (n, k), jnp.float32) / np.sqrt(k)).astype(dtype)
    b = jax.random.normal(keys[4], (n,), jnp.float32).astype(dtype) if bias else None
    s, y = norm_gemv.add_rms_norm_gemv(x, r, nw, w, b, eps=1e-6, offset=offset, config=config, interpret=INTERPRET)
    assert s.shape == x.shape and y.shape == (*lead, n) and y.dtype == dtype
    want_s, want_y = _numpy_norm_linear(x, r, nw, w, b, 1e-6, offset, dtype)
    np.testing.assert_array_equal(np.asarray(s, np.float32), want_s.astype(np.float32))  # the sum is exact
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), want_y, **tol)
    # and the op's reference (add_rms_norm, then linear) agrees with the same numpy
    ref_s, ref_y = norm_gemv.reference(x, r, nw, w, b, eps=1e-6, offset=offset)
    np.testing.assert_array_equal(np.asarray(ref_s), np.asarray(s))
    np.testing.assert_allclose(np.asarray(ref_y, np.float32), want_y, **tol)


def test_declines_with_reasons():
    x, w = jnp.ones((1, 64), jnp.bfloat16), jnp.ones((32, 64), jnp.bfloat16)
    nw = jnp.ones((64,), jnp.bfloat16)
    assert norm_gemv.unsupported(x, x, nw, w) is None and norm_gemv.unsupported(x, None, nw, w) is None
    for args, why in [((jnp.ones((5, 64), jnp.bfloat16), None, nw, w), "5 rows"),
                      ((x, jnp.ones((2, 64), jnp.bfloat16), nw, w), "residual"),
                      ((x, x.astype(jnp.float32), nw, w), "residual"),
                      ((x, x, jnp.ones((32,), jnp.bfloat16), w), "norm weight"),
                      ((x, x, nw, {"packed": w}), "not a dense")]:
        assert why in norm_gemv.unsupported(*args), args
    with pytest.raises(ValueError, match="add_rms_norm_gemv: 5 rows"):
        norm_gemv.add_rms_norm_gemv(jnp.ones((5, 64), jnp.bfloat16), None, nw, w, eps=1e-6, interpret=INTERPRET)


def test_dispatch_follows_the_gemv_rules(monkeypatch):
    gpu = Ops(platform="gpu")
    x1, nw = jnp.ones((1, 1, 256), jnp.bfloat16), jnp.ones((256,), jnp.bfloat16)
    w = jnp.ones((640, 256), jnp.bfloat16)  # Qwen3-30B-A3B-like qkv: N = 2.5 K
    impl, _ = gpu.choose("add_rms_norm_linear", x1, x1, nw, w, None, eps=1e-6, ops=gpu)
    assert impl.name == "pallas_add_rms_norm_gemv"
    impl, choice = gpu.choose("add_rms_norm_linear", x1, x1, nw, jnp.ones((384, 256), jnp.bfloat16), None,
                              eps=1e-6, ops=gpu)  # Llama-like qkv, N = 1.5 K: measured no faster
    assert impl.name == "xla" and "narrower" in str(choice)
    impl, choice = gpu.choose("add_rms_norm_linear", jnp.ones((1, 64, 256), jnp.bfloat16), None, nw, w, None,
                              eps=1e-6, ops=gpu)
    assert impl.name == "xla" and "64 rows" in str(choice)
    monkeypatch.setattr(linear_kernels, "MAX_BYTES", 1 << 10)
    impl, choice = gpu.choose("add_rms_norm_linear", x1, x1, nw, w, None, eps=1e-6, ops=gpu)
    assert impl.name == "xla" and "MiB" in str(choice)
    cpu = Ops(platform="cpu")
    assert cpu.choose("add_rms_norm_linear", x1, x1, nw, w, None, eps=1e-6, ops=cpu)[0].name == "xla"


def test_lowers_for_cuda_at_llama_shapes():
    reason = _can_lower_for_cuda()
    if reason is not None:
        pytest.skip(reason)
    sds = jax.ShapeDtypeStruct
    x = sds((1, 1, 4096), jnp.bfloat16)
    fn = lambda x, r, nw, w: norm_gemv.add_rms_norm_gemv(x, r, nw, w, eps=1e-5)  # noqa: E731
    lowered = jax.jit(fn).trace(x, x, sds((4096,), jnp.bfloat16), sds((6144, 4096), jnp.bfloat16)).lower(
        lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()[:100000]
