"""The Pallas flash attention kernel for prefill (pallas_kernels/attention/flash.py), in interpret
mode on the CPU, its registration, and its lowering for CUDA at real shapes.

Oracles, both independent of the kernel: the op's XLA reference (`ferrum_jax.ops.attention`) and
a float64 numpy softmax(q k^T) v written here with explicit position / window masks. Only rows with
at least one visible key are compared against them (the kernel returns zeros for the others, the
reference an average; `test_rows_without_a_visible_key_are_zero` checks the kernel's side).
Small tiles (16 / 32) so that a few dozen rows already span several q and kv blocks: masked edge
blocks, unmasked interior blocks, skipped blocks and a partial last tile are all exercised.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import attention_kernels  # registers "pallas_flash"
from ferrum_jax import ops as xla_ops
from ferrum_jax.backend import Ops
from ferrum_jax.cache import quantize_kv
from pallas_kernels.attention import flash

INTERPRET = jax.default_backend() != "gpu"  # the real kernels on a GPU, interpret mode elsewhere

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
INT8, FP8 = jnp.int8, jnp.float8_e4m3fn


def naive_attention(q, k, v, positions, *, scale, window=None, softcap=None, k_scale=None, v_scale=None):
    """float64 numpy: (out [B, T, H, D], visible-row mask [B, T]); keys = codes * scale when quantized."""
    q = np.asarray(q, np.float64)
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    if k_scale is not None:
        k = k * np.asarray(k_scale, np.float64)[..., None]
        v = v * np.asarray(v_scale, np.float64)[..., None]
    positions = np.asarray(positions)
    b, t, h, d = q.shape
    group, slots = h // k.shape[1], np.arange(k.shape[2])
    out = np.zeros((b, t, h, d))
    visible = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
    if window is not None:
        visible &= slots[None, None, :] > positions[:, :, None] - window
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi] @ k[bi, hi // group].T * scale
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            s = np.where(visible[bi], s, -np.inf)
            m = np.max(s, axis=1, keepdims=True)
            p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
            p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-300)
            out[bi, :, hi] = p @ v[bi, hi // group]
    return out, visible.any(axis=2)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int = 2
    t: int = 37
    heads: int = 4
    kv_heads: int = 2
    d: int = 64
    s: int = 53
    offsets: tuple[int, ...] = (16, 5)  # each batch row's first query position (chunked prefill)
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None  # None: head_dim ** -0.5
    dtype: object = F32
    kv_dtype: object = None  # INT8 / FP8: a quantized cache
    block_q: int | None = 16
    block_k: int | None = 16


CASES = [
    Case("mha_d64"),
    Case("gqa2_d128_window_across_blocks", t=29, d=128, s=41, offsets=(12, 3), window=7),
    Case("gqa4_softcap_custom_scale", t=31, heads=8, kv_heads=2, s=47, offsets=(0, 9), softcap=5.0, scale=0.3,
         block_q=32),
    Case("group3_rows_straddle_tokens", t=19, heads=6, kv_heads=2, s=43, offsets=(24, 7), window=13),
    Case("mqa_window_softcap", b=1, t=23, heads=4, kv_heads=1, s=61, offsets=(38,), window=19, softcap=3.0),
    Case("t1_positions_per_row", b=3, t=1, s=37, offsets=(0, 17, 36), window=11),
    Case("s_multiple_of_block_k", t=32, s=48, offsets=(16, 0), window=20),
    Case("queries_past_the_cache", t=5, s=37, offsets=(50, 47)),  # every slot visible, the last tile partial
    Case("d256", b=1, t=17, heads=2, kv_heads=1, d=256, s=19, offsets=(2,)),
    Case("prefill_from_zero_default_tiles", b=1, t=67, s=67, offsets=(0,), block_q=None, block_k=None),
    Case("bf16_gqa2_window", dtype=BF16, d=128, window=11),
    Case("bf16_mqa_softcap", b=1, t=41, heads=4, kv_heads=1, s=59, offsets=(18,), softcap=4.0, dtype=BF16),
    Case("int8_f32", t=29, s=43, offsets=(14, 0), kv_dtype=INT8),
    Case("int8_bf16_window_softcap", dtype=BF16, kv_dtype=INT8, window=9, softcap=6.0),
    Case("fp8_bf16_gqa4", t=21, heads=8, kv_heads=2, d=128, s=31, offsets=(10, 3), dtype=BF16, kv_dtype=FP8),
    Case("fp8_f16_v_tile_dequantized", t=23, s=41, offsets=(18, 2), dtype=F16, kv_dtype=FP8, window=15),
]


def _inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((case.b, case.t, case.heads, case.d)).astype(np.float32)
    k = rng.standard_normal((case.b, case.kv_heads, case.s, case.d)).astype(np.float32)
    v = rng.standard_normal((case.b, case.kv_heads, case.s, case.d)).astype(np.float32)
    positions = jnp.asarray(np.asarray(case.offsets)[:, None] + np.arange(case.t)[None, :], jnp.int32)
    q = jnp.asarray(q, case.dtype)
    if case.kv_dtype is None:
        return q, jnp.asarray(k, case.dtype), jnp.asarray(v, case.dtype), positions, None, None
    (kc, ks), (vc, vs) = quantize_kv(jnp.asarray(k), case.kv_dtype), quantize_kv(jnp.asarray(v), case.kv_dtype)
    return q, kc, vc, positions, ks, vs


def _tolerance(case: Case) -> float:
    return {F32: 1e-5, F16: 4e-3, BF16: 3e-2}[case.dtype]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_references(case: Case):
    q, k, v, positions, ks, vs = _inputs(case)
    opts = dict(scale=case.scale or case.d ** -0.5, window=case.window, softcap=case.softcap, k_scale=ks, v_scale=vs)
    got = flash.flash_attention(q, k, v, positions, block_q=case.block_q, block_k=case.block_k, interpret=INTERPRET,
                                **opts)
    assert got.shape == q.shape and got.dtype == q.dtype
    got = np.asarray(got, np.float64)
    naive, rows = naive_attention(q, k, v, positions, **opts)
    assert rows.all()  # every case has a visible key in every row
    xla = np.asarray(xla_ops.attention(q, k, v, positions, **opts), np.float64)
    tol = _tolerance(case)
    np.testing.assert_allclose(got, naive, atol=tol, rtol=tol, err_msg="vs float64 numpy")
    np.testing.assert_allclose(got, xla, atol=tol, rtol=tol, err_msg="vs ferrum_jax.ops.attention")


def test_skips_blocks_outside_the_visible_range():
    """Cache slots no query can see are never read: NaN there (whole kv blocks below the window and
    above the last position) leaves the output finite and equal to the clean cache's."""
    case = Case("skip", b=2, t=20, heads=4, kv_heads=2, s=128, offsets=(60, 60), window=16)
    q, k, v, positions, _, _ = _inputs(case)
    first_seen = (60 - 16 + 1) // 16 * 16  # the first kv block any query visits
    past_last = -(-(60 + 20) // 16) * 16  # the end of the last kv block any query visits
    poison = np.zeros(case.s, bool)
    poison[:first_seen] = poison[past_last:] = True
    dirty_k, dirty_v = (jnp.where(jnp.asarray(poison)[None, None, :, None], jnp.nan, a) for a in (k, v))
    opts = dict(scale=0.125, window=case.window)
    got = np.asarray(flash.flash_attention(q, dirty_k, dirty_v, positions, block_q=16, block_k=16, interpret=INTERPRET,
                                           **opts))
    want, _ = naive_attention(q, k, v, positions, **opts)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_rows_without_a_visible_key_are_zero():
    """Documented difference from the reference (which averages there): padding rows at position -1,
    and a row past the cache whose window holds no slot, come out as zeros; the others are exact."""
    case = Case("empty_rows", b=2, t=5, heads=2, kv_heads=1, s=16, window=4)
    q, k, v, _, _, _ = _inputs(case)
    positions = jnp.asarray([[3, 4, 5, -1, -1], [6, 7, 30, 8, 9]], jnp.int32)
    opts = dict(scale=0.125, window=case.window)
    got = np.asarray(flash.flash_attention(q, k, v, positions, block_q=16, block_k=16, interpret=INTERPRET, **opts))
    want, rows = naive_attention(q, k, v, positions, **opts)
    assert rows.tolist() == [[True, True, True, False, False], [True, True, False, True, True]]
    np.testing.assert_array_equal(got[~rows], 0.0)
    np.testing.assert_allclose(got[rows], want[rows], atol=1e-4, rtol=1e-4)


def test_bad_input_is_refused_clearly():
    q = jnp.zeros((1, 4, 4, 64), F32)
    kv = jnp.zeros((1, 2, 8, 64), F32)
    pos = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="head_dim 96"):
        flash.flash_attention(jnp.zeros((1, 4, 4, 96)), jnp.zeros((1, 2, 8, 96)), jnp.zeros((1, 2, 8, 96)), pos,
                              scale=1.0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="3 kv heads"):
        flash.flash_attention(q, jnp.zeros((1, 3, 8, 64)), jnp.zeros((1, 3, 8, 64)), pos, scale=1.0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="differ from q's"):
        flash.flash_attention(q, kv.astype(BF16), kv.astype(BF16), pos, scale=1.0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="k_scale must be float32"):
        flash.flash_attention(q, kv.astype(INT8), kv.astype(INT8), pos, scale=1.0, k_scale=jnp.ones((1, 2, 7)),
                              v_scale=jnp.ones((1, 2, 8)), interpret=INTERPRET)
    with pytest.raises(ValueError, match="q_positions must be int32"):
        flash.flash_attention(q, kv, kv, pos.astype(F32), scale=1.0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_q 48"):
        flash.flash_attention(q, kv, kv, pos, scale=1.0, block_q=48, interpret=INTERPRET)


# ---------------------------------------------------------------------------------------------
# Dispatch

def _op_args(b=1, t=64, heads=8, kv_heads=2, d=128, s=None, dtype=BF16, kv_dtype=None):
    s = s or t
    q = jnp.zeros((b, t, heads, d), dtype)
    kv = jnp.zeros((b, kv_heads, s, d), kv_dtype or dtype)
    scales = jnp.ones((b, kv_heads, s), F32) if kv_dtype is not None else None
    return (q, kv, kv, jnp.zeros((b, t), jnp.int32)), dict(scale=d ** -0.5, k_scale=scales, v_scale=scales)


@pytest.mark.parametrize("desc,shape,opts,want", [
    ("prefill into an empty cache: cuDNN", {}, dict(causal_from_zero=True), "cudnn"),
    ("chunked prefill", dict(t=64, s=256), {}, "pallas_flash"),
    ("soft-cap", {}, dict(causal_from_zero=True, softcap=50.0), "pallas_flash"),
    ("head_dim 256", dict(d=256), dict(causal_from_zero=True), "pallas_flash"),
    ("int8 cache", dict(kv_dtype=INT8), dict(causal_from_zero=True), "pallas_flash"),
    ("fp8 cache, window", dict(kv_dtype=FP8, s=512), dict(window=128), "pallas_flash"),
    ("float32", dict(dtype=F32), dict(causal_from_zero=True), "pallas_flash"),
    ("head_dim 96: the reference", dict(d=96), {}, "xla"),
])
def test_dispatch_on_gpu(desc, shape, opts, want):
    args, kw = _op_args(**shape)
    kw = {"window": None, "softcap": None, "causal_from_zero": False, **kw, **opts}
    impl, choice = Ops(platform="gpu").choose("attention", *args, **kw)
    if impl.name == "pallas_flash_hopper" and want in ("pallas_flash", "cudnn"):
        # on a Hopper GPU the Mosaic GPU kernel takes prefills from zero ahead of the Triton one
        assert kw["causal_from_zero"], (desc, str(choice))
        return
    assert impl.name == want, (desc, str(choice))
    if want == "xla":
        assert "pallas_flash: head_dim 96" in str(choice)
    if want == "pallas_flash":
        assert impl.fn is attention_kernels.flash_prefill


def test_not_on_cpu():
    args, kw = _op_args()
    impl, choice = Ops(platform="cpu").choose("attention", *args, **kw)
    assert impl.name == "xla" and "pallas_flash: not on cpu" in str(choice)


# ---------------------------------------------------------------------------------------------
# Lowering for CUDA at real shapes (Triton's constraints: power-of-two tiles, dot sizes, casts)

def _cuda_lowering_available() -> str | None:
    try:
        jax.jit(lambda x: x + 1).trace(jax.ShapeDtypeStruct((8,), F32)).lower(lowering_platforms=("cuda",))
    except Exception as e:  # noqa: BLE001  any failure means this jax cannot cross-lower
        return f"this jax cannot lower for cuda on {jax.default_backend()}: {type(e).__name__}: {e}"
    return None


def _lower(b=1, t=2048, heads=32, kv_heads=8, d=128, s=2048, dtype=BF16, kv_dtype=None, **kw):
    kv_dtype = kv_dtype or dtype
    q = jax.ShapeDtypeStruct((b, t, heads, d), dtype)
    kv = jax.ShapeDtypeStruct((b, kv_heads, s, d), kv_dtype)
    pos = jax.ShapeDtypeStruct((b, t), jnp.int32)
    sc = jax.ShapeDtypeStruct((b, kv_heads, s), F32) if kv_dtype != dtype else None

    def f(q, k, v, pos, ks, vs):
        return flash.flash_attention(q, k, v, pos, scale=d ** -0.5, k_scale=ks, v_scale=vs, **kw)

    text = jax.jit(f).trace(q, kv, kv, pos, sc, sc).lower(lowering_platforms=("cuda",)).as_text()
    assert "flash_attention" in text


LOWERINGS = [
    dict(d=64),
    dict(d=128),
    dict(d=128, heads=28, kv_heads=4, s=3001),  # group 7, a cache not a multiple of the tile
    dict(d=256, heads=16, kv_heads=8, window=1024, softcap=50.0),
    dict(d=128, kv_dtype=INT8, s=4099),
    dict(d=128, kv_dtype=FP8),
    dict(d=64, dtype=F16, kv_dtype=FP8, s=2051),
    dict(d=256, dtype=F16, kv_dtype=INT8, softcap=30.0),
    dict(d=128, dtype=F32, t=1, s=77),
    dict(d=128, t=2048, s=8192, window=4096),
    dict(d=128, block_q=64, block_k=128, num_warps=4, num_stages=4),
]


def _lowering_id(kw: dict) -> str:
    return "-".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items())


@pytest.mark.parametrize("kw", LOWERINGS, ids=_lowering_id)
def test_lowers_for_cuda(kw):
    reason = _cuda_lowering_available()
    if reason:
        pytest.skip(reason)
    _lower(**kw)


def test_default_tiles_lower_for_cuda():
    """Every default_config row (each head_dim, dtype, plain or 1-byte cache) lowers at full size."""
    reason = _cuda_lowering_available()
    if reason:
        pytest.skip(reason)
    for d in flash.HEAD_DIMS:
        for dtype in (BF16, F16, F32):
            for kv_dtype in (None, INT8, FP8):
                _lower(d=d, dtype=dtype, kv_dtype=kv_dtype, heads=16, kv_heads=4, t=2048, s=2053)
