"""The kernel layout (`QuantWeight`) and the Pallas quantized matmul (interpret mode on CPU).

Oracles: `gguf.quants.dequantize` for the GGUF formats (bit-exact repack), an independent numpy
dequantizer of the GPTQ-style (q - z) * s formula, and float64 numpy matmuls for the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gguf_dequant import _random_bytes, _reference

import ferrum_jax as fj
from ferrum_jax.quant import GGUFWeight
from ferrum_jax.quant.qweight import GGUF_FORMATS, QuantWeight, gptq_format
from ferrum_jax.quant.repack import repack_gguf, repack_weights
from pallas_kernels import quant_matmul as qm

INTERPRET = jax.default_backend() != "gpu"  # the real kernels on a GPU, interpret mode elsewhere

GGUF_TYPES = list(GGUF_FORMATS)


def _gguf(rng, ggml_type: str, shape: tuple[int, int]) -> tuple[QuantWeight, np.ndarray]:
    raw = _random_bytes(rng, ggml_type, shape)
    return repack_gguf(GGUFWeight.from_numpy(raw, ggml_type, shape)), _reference(raw, ggml_type)


def _gptq(rng, bits: int, n: int, k: int, group: int, perm: bool) -> tuple[QuantWeight, np.ndarray]:
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (n, k // group)).astype(np.float16)
    zeros = rng.integers(0, 1 << bits, (n, k // group)).astype(np.uint8)
    order = rng.permutation(k).astype(np.int32) if perm else None
    w = QuantWeight.from_codes(codes, scales, gptq_format(bits, group), zeros=zeros, perm=order)
    g = np.arange(k) // group
    dense_sorted = (codes.astype(np.float32) - zeros[:, g]) * scales[:, g].astype(np.float32)
    dense = np.empty_like(dense_sorted)
    dense[:, order if perm else np.arange(k)] = dense_sorted  # stored column j feeds input perm[j]
    return w, dense


@pytest.mark.parametrize("ggml_type", GGUF_TYPES)
def test_repack_is_bit_exact(ggml_type):
    w, want = _gguf(np.random.default_rng(0), ggml_type, (40, 512))  # 40 rows: padded to 64
    got = np.asarray(w.dequantize(jnp.float32))
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    assert w.lo.shape[0] % 64 == 0 and w.shape == (40, 512)


def test_gptq_layout_with_act_order():
    w, want = _gptq(np.random.default_rng(1), 4, 24, 256, 32, perm=True)
    np.testing.assert_allclose(np.asarray(w.dequantize()), want, rtol=1e-6, atol=1e-7)


def _check_kernel(w: QuantWeight, dense: np.ndarray, m: int, config: qm.GemvConfig, seed: int = 0) -> None:
    x = np.random.default_rng(seed).standard_normal((m, dense.shape[1])).astype(np.float32)
    got = np.asarray(qm.qmatmul(jnp.asarray(x), w, config=config, interpret=INTERPRET), np.float64)
    want = x.astype(np.float64) @ dense.astype(np.float64).T
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert got.shape == want.shape and err < 1e-5, err


@pytest.mark.parametrize("ggml_type", GGUF_TYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_kernel_gguf(ggml_type, m):
    w, dense = _gguf(np.random.default_rng(2), ggml_type, (40, 1024))
    variant = "fma" if m <= qm.MAX_FMA_ROWS else "dot"
    cfg = qm.GemvConfig(variant=variant, block_m=16, block_n=16, block_k=512, split_k=2)
    _check_kernel(w, dense, m, cfg, seed=m)


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("m", [1, 3])
def test_kernel_dp4a(ggml_type, m):
    """int8 activations per group: within ~1e-2 of the exact product (llama.cpp's q8_1 trade)."""
    w, dense = _gguf(np.random.default_rng(8), ggml_type, (40, 1024))
    x = np.random.default_rng(m).standard_normal((m, 1024)).astype(np.float32)
    got = np.asarray(qm.qmatmul(jnp.asarray(x), w, config=qm.choose_config(w, m, "dp4a"), interpret=INTERPRET), np.float64)
    want = x.astype(np.float64) @ dense.astype(np.float64).T
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2
    xq, d, xsum = qm.quantize_activations(jnp.asarray(x), 32)  # the activations it used, checked apart
    np.testing.assert_allclose(np.asarray(xq, np.float32).reshape(m, 32, 32) * np.asarray(d)[..., None],
                               x.reshape(m, 32, 32), atol=float(np.abs(x).max()) / 254 + 1e-7)
    np.testing.assert_allclose(np.asarray(xsum), x.reshape(m, 32, 32).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group,perm", [(4, 128, False), (4, 32, True), (8, 64, False)])
@pytest.mark.parametrize("m", [1, 128])
def test_kernel_gptq(bits, group, perm, m):
    w, dense = _gptq(np.random.default_rng(3), bits, 72, 384, group, perm)  # 384 = 3 x 128: ragged K
    _check_kernel(w, dense, m, qm.choose_config(w, m), seed=m)


def test_choose_config_fits_every_llama_shape():
    """The default block sizes divide every projection of the common model shapes."""
    for n, k in [(6144, 4096), (1024, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (3072, 8192)]:
        for fmt in (GGUF_FORMATS["Q4_K"], GGUF_FORMATS["Q6_K"], gptq_format(4, 128)):
            w = jax.eval_shape(lambda: QuantWeight.from_codes(jnp.zeros((n, k), jnp.uint8),
                                                              jnp.ones((n, k // fmt.group)), fmt,
                                                              zeros=jnp.zeros((n, k // fmt.group), jnp.uint8)
                                                              if fmt.offset == "zero" else None,
                                                              mins=jnp.zeros((n, k // fmt.group), jnp.uint8)
                                                              if fmt.offset == "kmin" else None,
                                                              super_scales=jnp.ones((n, k // 256))
                                                              if fmt.super_group else None,
                                                              super_offsets=jnp.ones((n, k // 256))
                                                              if fmt.offset == "kmin" else None))
            x = jax.ShapeDtypeStruct((1, k), jnp.bfloat16)
            for m in (1, 8):
                assert qm.unsupported(x if m == 1 else jax.ShapeDtypeStruct((m, k), jnp.bfloat16), w,
                                      qm.choose_config(w, m)) is None, (n, k, fmt.name, m)


def test_dispatch_and_fusion():
    """Packed GGUF weights are repacked at load, q/k/v of one format fuse, and on the CPU linear
    runs the reference (the kernel entry says why it was skipped)."""
    rng = np.random.default_rng(4)
    ws = [repack_gguf(GGUFWeight.from_numpy(_random_bytes(rng, "Q4_K", (n, 256)), "Q4_K", (n, 256))) for n in (64, 32, 32)]
    fused = QuantWeight.concat(ws)
    np.testing.assert_array_equal(np.asarray(fused.dequantize()),
                                  np.concatenate([np.asarray(w.dequantize()) for w in ws]))
    q6 = repack_gguf(GGUFWeight.from_numpy(_random_bytes(rng, "Q6_K", (32, 256)), "Q6_K", (32, 256)))
    assert QuantWeight.concat([ws[0], q6]) is None
    tree = repack_weights({"a": GGUFWeight.from_numpy(_random_bytes(rng, "Q2_K", (8, 256)), "Q2_K", (8, 256)),
                           "b": GGUFWeight.from_numpy(_random_bytes(rng, "Q8_0", (8, 256)), "Q8_0", (8, 256))})
    assert isinstance(tree["a"], GGUFWeight) and isinstance(tree["b"], QuantWeight)
    with fj.record_dispatch() as log:
        fj.Ops(platform="cpu").linear(jnp.ones((1, 256)), ws[0])
    assert log[0].impl == "xla_qweight"
    impl, choice = fj.Ops(platform="gpu").choose("linear", jnp.ones((4096, 256), jnp.bfloat16), ws[0])
    assert impl.name == "pallas_dequant_matmul" and "dequantize once" in str(choice)
    impl, _ = fj.Ops(platform="gpu").choose("linear", jnp.ones((1, 256), jnp.bfloat16), ws[0])
    assert impl.name == "pallas_qmatmul_dp4a"  # 4-bit codes, one row: integer dots
    impl, _ = fj.Ops(platform="gpu").choose("linear", jnp.ones((8, 256), jnp.bfloat16), ws[0])
    assert impl.name == "pallas_qmatmul"
    impl, _ = fj.Ops(platform="gpu").choose("linear", jnp.ones((1, 256), jnp.bfloat16), q6)
    assert impl.name == "pallas_qmatmul"  # 6-bit codes: the float variant


def test_model_dtype_ignores_the_scales_of_packed_weights():
    """The activation (and KV cache) dtype comes from dense leaves or a packed weight's compute
    dtype, never from a QuantWeight's float16 scales (that once made f32 models run an f16 cache)."""
    rng = np.random.default_rng(5)
    g = GGUFWeight.from_numpy(_random_bytes(rng, "Q8_0", (8, 256)), "Q8_0", (8, 256), compute_dtype="float32")
    q = repack_gguf(g)
    assert q.scales.dtype == jnp.float16
    assert fj.Model(None, {"a": q, "b": jnp.ones(3, jnp.float32)}, None).dtype == jnp.float32
    assert fj.Model(None, {"a": jnp.ones(3, jnp.bfloat16), "b": q}, None).dtype == jnp.bfloat16


@pytest.mark.parametrize("ggml_type", GGUF_TYPES)
def test_pallas_dequantize_gguf(ggml_type):
    w, want = _gguf(np.random.default_rng(6), ggml_type, (40, 1024))
    got = np.asarray(qm.dequantize(w, jnp.float32, interpret=INTERPRET))
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_pallas_dequantize_gptq_act_order():
    w, want = _gptq(np.random.default_rng(7), 4, 72, 384, 32, perm=True)
    np.testing.assert_allclose(np.asarray(qm.dequantize(w, jnp.float32, interpret=INTERPRET)), want, rtol=1e-6, atol=1e-7)


def test_pallas_dequantize_lowers_for_cuda_with_a_group_count_not_a_power_of_two():
    """12 groups of 32 inputs: the kernel's tile takes a power-of-two number of them (Triton's
    lowering rejects other tile sizes; interpret mode does not notice)."""
    from test_decode_attention import _can_lower_for_cuda

    reason = _can_lower_for_cuda()
    if reason is not None:
        pytest.skip(reason)
    w, _ = _gptq(np.random.default_rng(7), 4, 72, 384, 32, perm=False)
    lowered = jax.jit(lambda w: qm.dequantize(w, jnp.bfloat16)).trace(w).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()[:200000]
