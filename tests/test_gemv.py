"""The dense decode GEMV (pallas_kernels/linear/gemv.py) and its `linear` registration: interpret
mode on CPU, the real kernel on a GPU, against float64 numpy; the dispatch rule; CUDA lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import linear_kernels  # noqa: F401  registers pallas_gemv
from ferrum_jax.backend import Ops
from pallas_kernels.linear import gemv
from tests.test_decode_attention import INTERPRET, _can_lower_for_cuda


def _numpy_linear(x, w, b=None) -> np.ndarray:
    y = np.asarray(x, np.float32).astype(np.float64) @ np.asarray(w, np.float32).astype(np.float64).T
    return y if b is None else y + np.asarray(b, np.float32)


# (rows shape, N, K, dtype, bias, config)
CASES = [
    ((1, 1), 48, 256, jnp.float32, False, gemv.GemvConfig(16, 64, 4)),  # 4 unrolled steps, 3 row blocks
    ((2, 1), 40, 96, jnp.float32, True, gemv.GemvConfig(8, 32, 4)),  # two rows (batch 2), bias
    ((4,), 64, 128, jnp.bfloat16, True, None),  # 4 rows, default config cut to the shape
    ((1, 1), 24, 2048, jnp.bfloat16, False, gemv.GemvConfig(8, 64, 4)),  # K/64 = 32 steps: block_k grows
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[2]}->{c[1]}_{jnp.dtype(c[3]).name}")
def test_gemv_matches_numpy(case):
    lead, n, k, dtype, bias, config = case
    keys = jax.random.split(jax.random.PRNGKey(n + k), 3)
    x = jax.random.normal(keys[0], (*lead, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(keys[1], (n, k), jnp.float32) / np.sqrt(k)).astype(dtype)
    b = jax.random.normal(keys[2], (n,), jnp.float32).astype(dtype) if bias else None
    got = gemv.gemv(x, w, b, config=config, interpret=INTERPRET)
    assert got.shape == (*lead, n) and got.dtype == dtype
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got, np.float32), _numpy_linear(x, w, b), **tol)


def test_choose_config_divides_the_weight():
    c = gemv.choose_config(40, 96, gemv.GemvConfig(16, 512, 4))
    assert (c.block_n, c.block_k) == (8, 32)
    c = gemv.choose_config(5120, 14336, gemv.GemvConfig(8, 512, 8))
    assert 5120 % c.block_n == 0 and 14336 % c.block_k == 0 and 14336 // c.block_k <= gemv.MAX_UNROLL


def test_declines_with_reasons():
    x, w = jnp.ones((1, 64), jnp.bfloat16), jnp.ones((32, 64), jnp.bfloat16)
    assert gemv.unsupported(x, w) is None
    for args, why in [((jnp.ones((5, 64), jnp.bfloat16), w), "5 rows"),
                      ((x, w.astype(jnp.float32)), "dtypes"),
                      ((x, jnp.ones((32, 48), jnp.bfloat16)), "x features 64"),
                      ((x, w, jnp.ones((31,), jnp.bfloat16)), "bias shape"),
                      ((jnp.ones((1, 40), jnp.bfloat16), jnp.ones((32, 40), jnp.bfloat16)), "multiple of"),
                      ((x, {"packed": w}), "not a dense")]:
        assert why in gemv.unsupported(*args), args
    with pytest.raises(ValueError, match="gemv: 5 rows"):
        gemv.gemv(jnp.ones((5, 64), jnp.bfloat16), w, interpret=INTERPRET)


def test_linear_dispatch_takes_wide_decode_projections_only():
    gpu = Ops(platform="gpu")
    x1 = jnp.ones((1, 1, 256), jnp.bfloat16)
    impl, _ = gpu.choose("linear", x1, jnp.ones((640, 256), jnp.bfloat16), None)  # qkv-like: N = 2.5 K
    assert impl.name == "pallas_gemv"
    impl, choice = gpu.choose("linear", x1, jnp.ones((256, 256), jnp.bfloat16), None)  # o-like
    assert impl.name == "xla" and "narrower" in str(choice)
    impl, choice = gpu.choose("linear", jnp.ones((1, 64, 256), jnp.bfloat16), jnp.ones((640, 256), jnp.bfloat16), None)
    assert impl.name == "xla" and "64 rows" in str(choice)
    assert Ops(platform="cpu").choose("linear", x1, jnp.ones((640, 256), jnp.bfloat16), None)[0].name == "xla"


def test_linear_dispatch_leaves_large_weights_to_xla(monkeypatch):
    monkeypatch.setattr(linear_kernels, "MAX_BYTES", 1 << 10)  # as a vocabulary projection past the limit
    impl, choice = Ops(platform="gpu").choose("linear", jnp.ones((1, 1, 256), jnp.bfloat16),
                                              jnp.ones((640, 256), jnp.bfloat16), None)
    assert impl.name == "xla" and "MiB" in str(choice)


def test_lowers_for_cuda_at_qwen3_30b_shapes():
    reason = _can_lower_for_cuda()
    if reason is not None:
        pytest.skip(reason)
    sds = jax.ShapeDtypeStruct
    for n, k in [(5120, 2048), (151936, 2048)]:
        lowered = jax.jit(gemv.gemv).trace(sds((1, 1, k), jnp.bfloat16), sds((n, k), jnp.bfloat16)).lower(
            lowering_platforms=("cuda",))
        assert "triton" in lowered.as_text()[:100000]
