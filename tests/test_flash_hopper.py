"""The Hopper flash attention kernel (pallas_kernels/attention/flash_hopper.py, Mosaic GPU).

Where it runs:
  - CPU (CI): the kernel in Mosaic GPU interpret mode (wgmma replaced by jnp dots there: this
    checks the pipeline, barriers, block ranges and masks), its lowering for CUDA at real shapes
    (Mosaic GPU lowers without a GPU: this checks the wgmma / TMA / layout side), and the dispatch.
  - GPU with compute capability 9.x: the same cases on the real kernel, plus real-size shapes and
    the op's dispatch under jit.
Oracles: the op's XLA reference (`ferrum_jax.ops.attention`) and a float64 numpy softmax written
here with explicit position / window masks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import attention_kernels
from ferrum_jax import ops as xla_ops
from ferrum_jax.backend import Ops, record_dispatch
from pallas_kernels.attention import flash_hopper as fh

F16, BF16, F32 = jnp.float16, jnp.bfloat16, jnp.float32
ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU

MOSAIC = fh.mosaic_gpu_unavailable()
needs_mosaic = pytest.mark.skipif(MOSAIC is not None, reason=str(MOSAIC))
# Real-kernel runs: a Hopper GPU. Elsewhere the kernel runs in interpret mode (on the CPU only).
runs_kernel = pytest.mark.skipif(
    MOSAIC is not None or (ON_GPU and fh.device_unsupported() is not None) or (not ON_GPU and jax.default_backend() != "cpu"),
    reason=f"needs Mosaic GPU and a Hopper GPU, or the CPU for interpret mode: {MOSAIC or fh.device_unsupported()}")
hopper_only = pytest.mark.skipif(not ON_GPU or fh.device_unsupported() is not None,
                                 reason=f"needs a Hopper GPU: {fh.device_unsupported()}")


def naive_attention(q, k, v, positions, *, scale, window=None, softcap=None):
    """float64 numpy oracle: [B, T, H, D]."""
    q, k, v = (np.asarray(jnp.asarray(a, F32), np.float64) for a in (q, k, v))
    positions = np.asarray(positions)
    b, t, h, d = q.shape
    group, slots = h // k.shape[1], np.arange(k.shape[2])
    visible = slots[None, None, :] <= positions[:, :, None]
    if window is not None:
        visible &= slots[None, None, :] > positions[:, :, None] - window
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi] @ k[bi, hi // group].T * scale
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            s = np.where(visible[bi], s, -np.inf)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[bi, :, hi] = (p / p.sum(axis=1, keepdims=True)) @ v[bi, hi // group]
    return out


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int = 1
    t: int = 128
    heads: int = 2
    kv_heads: int = 1
    d: int = 64
    s: int = 128
    offsets: tuple[int, ...] | None = None  # None: prefill from zero (q_offset=None)
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None
    dtype: object = F16
    block_kv: int | None = 64
    mcs: int | None = None


# Small, for interpret mode (each case a few seconds to ~20 s on a CPU): with block_q 64 a CTA
# owns 128 tokens, so these span the unmasked, diagonal, window-edge and flushed steps.
CASES = [
    Case("from_zero_mha_d64", kv_heads=2),
    Case("offsets_gqa4_odd_t_s_bf16", b=2, t=77, heads=4, s=200, offsets=(0, 101), dtype=BF16),
    Case("window_d128_3_buffers", heads=2, kv_heads=2, d=128, t=256, s=256, window=50, mcs=3),
    Case("window_offsets_gqa2", b=2, t=130, s=390, offsets=(64, 250), window=70),
    Case("softcap_custom_scale_bf16", t=100, s=100, softcap=5.0, scale=0.3, dtype=BF16, block_kv=128),
    Case("d256_cache_longer_than_prompt", heads=1, d=256, t=100, s=300),
]


def _inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((case.b, case.t, case.heads, case.d)), case.dtype)
    k = jnp.asarray(rng.standard_normal((case.b, case.kv_heads, case.s, case.d)), case.dtype)
    v = jnp.asarray(rng.standard_normal((case.b, case.kv_heads, case.s, case.d)), case.dtype)
    offset = None if case.offsets is None else jnp.asarray(case.offsets, jnp.int32)
    return q, k, v, offset


def _tol(dtype) -> float:
    return {F16: 5e-3, BF16: 4e-2}[dtype]


@runs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_references(case: Case):
    q, k, v, offset = _inputs(case)
    scale = case.scale or case.d ** -0.5
    out = fh.flash_attention_hopper(q, k, v, offset, scale=scale, window=case.window, softcap=case.softcap,
                                    block_kv=case.block_kv, max_concurrent_steps=case.mcs, interpret=INTERPRET)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(jnp.asarray(out, F32))
    positions = fh.contiguous_positions(jnp.zeros((case.b,), jnp.int32) if offset is None else offset, case.t)
    ref = xla_ops.attention(q, k, v, positions, scale=scale, window=case.window, softcap=case.softcap)
    np.testing.assert_allclose(out, np.asarray(jnp.asarray(ref, F32)), atol=_tol(case.dtype), rtol=_tol(case.dtype))
    oracle = naive_attention(q, k, v, positions, scale=scale, window=case.window, softcap=case.softcap)
    np.testing.assert_allclose(out, oracle, atol=_tol(case.dtype), rtol=_tol(case.dtype))


# ---------------------------------------------------------------------------------------------
# Lowering for CUDA at real shapes (Mosaic GPU lowers on the CPU: wgmma, TMA, layouts, smem).

def _cuda_lowering_unavailable() -> str | None:
    if MOSAIC is not None:
        return MOSAIC
    try:
        jax.jit(lambda x: x + 1).trace(jax.ShapeDtypeStruct((8,), F32)).lower(lowering_platforms=("cuda",))
    except Exception as e:  # noqa: BLE001
        return f"this jax cannot lower for cuda on {jax.default_backend()}: {type(e).__name__}: {e}"
    return None


@pytest.mark.skipif(_cuda_lowering_unavailable() is not None, reason=str(_cuda_lowering_unavailable()))
@pytest.mark.parametrize("shape,opts", [
    (dict(t=8192, d=128), {}),  # the benchmark shape: 32 q heads / 8 kv heads, bf16
    (dict(t=2048, d=64, dtype=F16), {}),
    (dict(t=1024, d=256), {}),
    (dict(t=1000, s=3000, d=128, offset=True), dict(window=512, softcap=30.0)),  # padded T, offsets, all options
    (dict(t=4096, d=128), dict(block_q=128, block_kv=64, max_concurrent_steps=3)),
])
def test_lowers_for_cuda(shape, opts):
    b, t, d, dtype = 2, shape["t"], shape["d"], shape.get("dtype", BF16)
    s = shape.get("s", t)
    args = [jax.ShapeDtypeStruct((b, t, 32, d), dtype), jax.ShapeDtypeStruct((b, 8, s, d), dtype),
            jax.ShapeDtypeStruct((b, 8, s, d), dtype)]
    if shape.get("offset"):
        args.append(jax.ShapeDtypeStruct((b,), jnp.int32))

    def f(*a):
        return fh.flash_attention_hopper(*a, scale=d ** -0.5, **opts)

    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


# ---------------------------------------------------------------------------------------------
# Argument checks and dispatch

def _op_args(b=1, t=64, heads=8, kv_heads=2, d=128, s=None, dtype=BF16):
    q = jnp.zeros((b, t, heads, d), dtype)
    kv = jnp.zeros((b, kv_heads, s or t, d), dtype)
    return (q, kv, kv, jnp.zeros((b, t), jnp.int32)), dict(scale=d ** -0.5)


@pytest.mark.parametrize("shape,opts,reason", [
    ({}, dict(causal_from_zero=False), "not a prefill from position 0"),
    (dict(d=96), dict(causal_from_zero=True), "head_dim 96"),
    (dict(dtype=F32), dict(causal_from_zero=True), "dtype float32"),
    ({}, dict(causal_from_zero=True, k_scale=jnp.ones((1, 2, 64)), v_scale=jnp.ones((1, 2, 64))), "quantized"),
    ({}, dict(causal_from_zero=True, window=0), "window"),
])
def test_op_declines_with_reasons(shape, opts, reason):
    args, kw = _op_args(**shape)
    got = fh.op_unsupported(*args, **kw, **opts)
    assert got is not None and reason in got, got


def test_op_checks_concrete_positions():
    (q, k, v, _), kw = _op_args(b=2, t=8)
    good = np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))
    assert fh.op_unsupported(q, k, v, good, causal_from_zero=True, **kw) is None
    assert "not 0..T-1" in fh.op_unsupported(q, k, v, good + 3, causal_from_zero=True, **kw)


def test_bad_tunables_raise():
    q, k, v, _ = _inputs(CASES[0])
    with pytest.raises(ValueError, match="multiple of 64"):
        fh.flash_attention_hopper(q, k, v, scale=0.1, block_q=32)
    with pytest.raises(ValueError, match="shared memory"):
        kv = jnp.zeros((1, 1, 128, 256), F16)
        fh.flash_attention_hopper(jnp.zeros((1, 128, 1, 256), F16), kv, kv, scale=0.1, block_kv=256)
    with pytest.raises(ValueError, match="q_offset"):
        fh.flash_attention_hopper(q, k, v, jnp.zeros((3,), jnp.int32), scale=0.1)


def test_registered_ahead_of_cudnn_and_triton():
    from ferrum_jax.backend import implementations
    names = implementations("attention")
    assert names.index("pallas_flash_hopper") < names.index("cudnn") < names.index("pallas_flash")


@pytest.mark.skipif(ON_GPU, reason="the device check passes on a Hopper GPU")
def test_dispatch_declines_without_hopper():
    args, kw = _op_args(d=256)  # the Hopper kernel declines off Hopper, cuDNN declines head_dim 256
    impl, choice = Ops(platform="gpu").choose("attention", *args, **kw, causal_from_zero=True)
    assert impl.name == "pallas_flash"
    assert "pallas_flash_hopper:" in str(choice)


# ---------------------------------------------------------------------------------------------
# Hopper GPU only: real sizes, the op's dispatch under jit, tunables.

@hopper_only
@pytest.mark.parametrize("t,heads,kv_heads,d,dtype,window,softcap", [
    (1024, 32, 8, 128, BF16, None, None),
    (1000, 8, 2, 64, F16, None, None),
    (777, 4, 4, 256, BF16, None, None),
    (1024, 8, 2, 128, BF16, 300, None),
    (513, 8, 1, 128, BF16, None, 50.0),
])
def test_gpu_prefill_matches_reference(t, heads, kv_heads, d, dtype, window, softcap):
    rng = np.random.default_rng(1)
    b = 2
    q = jnp.asarray(rng.standard_normal((b, t, heads, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, kv_heads, t, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, kv_heads, t, d)), dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kw = dict(scale=d ** -0.5, window=window, softcap=softcap, causal_from_zero=True)
    with record_dispatch() as choices:
        out = jax.jit(lambda *a: Ops().attention(*a, **kw))(q, k, v, pos)
    if softcap is not None or d == 256:  # cuDNN declines these
        assert choices[0].impl == "pallas_flash_hopper", str(choices[0])
    out2 = attention_kernels.flash_hopper.hopper_prefill(q, k, v, pos, **kw)
    ref = Ops(force=(("attention", "xla"),)).attention(q.astype(F32), k.astype(F32), v.astype(F32), pos, **kw)
    for o in (out, out2):
        np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(ref), atol=_tol(dtype), rtol=_tol(dtype))


@hopper_only
@pytest.mark.parametrize("block_q,block_kv,mcs", [(64, 64, 2), (64, 64, 3), (128, 64, 2), (64, 128, 2)])
def test_gpu_tunables_and_chunked_offsets(block_q, block_kv, mcs):
    rng = np.random.default_rng(2)
    b, t, s, heads, kv_heads, d = 3, 300, 1100, 8, 2, 128
    q = jnp.asarray(rng.standard_normal((b, t, heads, d)), BF16)
    k = jnp.asarray(rng.standard_normal((b, kv_heads, s, d)), BF16)
    v = jnp.asarray(rng.standard_normal((b, kv_heads, s, d)), BF16)
    offset = jnp.asarray([0, 417, 800], jnp.int32)
    for window in (None, 200):
        out = fh.flash_attention_hopper(q, k, v, offset, scale=d ** -0.5, window=window, block_q=block_q,
                                        block_kv=block_kv, max_concurrent_steps=mcs)
        ref = xla_ops.attention(q.astype(F32), k.astype(F32), v.astype(F32), fh.contiguous_positions(offset, t),
                                scale=d ** -0.5, window=window)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=4e-2, rtol=4e-2)
