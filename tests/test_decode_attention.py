"""Flash-decoding kernels (pallas_kernels/attention/decode.py, paged_decode.py) in interpret mode on
CPU, against two independent oracles: ferrum_jax.ops (attention / paged_attention) and a naive
float64 numpy softmax(q k^T) v with the visibility mask written out here. Plus dispatch (the GPU
table picks the kernels, with reasons when it does not) and CUDA lowering at real shapes."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import decode_kernels  # noqa: F401  registers pallas_decode / pallas_paged_decode
from ferrum_jax import ops as ref_ops
from ferrum_jax.backend import Ops
from ferrum_jax.cache import quantize_kv
from pallas_kernels.attention import decode, paged_decode

INTERPRET = jax.default_backend() != "gpu"  # the real kernels on a GPU, interpret mode elsewhere


def naive(q, k, v, pos, *, scale, window=None, softcap=None, k_scale=None, v_scale=None) -> np.ndarray:
    """float64 numpy: per row and head, softmax over the visible slots s (s <= p, s > p - window)."""
    q, k, v = (np.asarray(a, np.float32).astype(np.float64) for a in (q, k, v))
    if k_scale is not None:
        k = k * np.asarray(k_scale, np.float64)[..., None]
        v = v * np.asarray(v_scale, np.float64)[..., None]
    b, _, h, _ = q.shape
    kvh, slots = k.shape[1], k.shape[2]
    g = h // kvh
    out = np.zeros((b, 1, h, v.shape[-1]))
    for row in range(b):
        p = int(pos[row, 0])
        s_idx = np.arange(slots)
        visible = s_idx <= p
        if window is not None:
            visible &= s_idx > p - window
        for head in range(h):
            kh = head // g
            scores = k[row, kh] @ q[row, 0, head] * scale
            if softcap is not None:
                scores = softcap * np.tanh(scores / softcap)
            scores = np.where(visible, scores, -np.inf)
            w = np.exp(scores - scores.max())
            out[row, 0, head] = (w / w.sum()) @ v[row, kh]
    return out


def _inputs(seed: int, b: int, h: int, kvh: int, slots: int, d: int, dtype):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, 1, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, kvh, slots, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, kvh, slots, d), jnp.float32).astype(dtype)
    return q, k, v


def _tol(dtype) -> dict:
    # bf16: inputs are exact in both oracles; the kernel (like ops.attention) rounds the
    # probabilities to bf16 before the PV dot and the output to bf16 (2^-9 relative each).
    return dict(atol=2e-5, rtol=2e-5) if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)


def _close(got, want, dtype) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float32).astype(np.float64), np.asarray(want, np.float64),
                               **_tol(dtype))


# (batch, heads, kv_heads, slots, head_dim, dtype, positions, window, softcap, block_k, splits)
CONTIGUOUS = [
    # lengths 1 / prime / full in one batch; GQA 4; float32; explicit small tiles and 3 splits
    (3, 8, 2, 67, 64, jnp.float32, [0, 30, 66], None, None, 16, 3),
    # MHA (group 1), bf16, head_dim 128, a window crossing tile edges (16-slot tiles)
    (2, 4, 4, 131, 128, jnp.bfloat16, [130, 44], 20, None, 16, 4),
    # GQA 8 with soft-capping, prime length past a tile edge, one split
    (2, 16, 2, 97, 64, jnp.float32, [96, 52], None, 5.0, 32, 1),
    # MQA (one kv head, 8 query heads), bf16, window and soft-cap, more splits than tiles
    (2, 8, 1, 53, 64, jnp.bfloat16, [52, 3], 33, 2.0, 16, 7),
    # head_dim 256 once, default config
    (1, 2, 1, 40, 256, jnp.float32, [39], None, None, None, None),
    # defaults (tile and splits from choose_config), mixed lengths
    (4, 4, 2, 300, 64, jnp.float32, [299, 0, 151, 17], 64, None, None, None),
]


@pytest.mark.parametrize("case", CONTIGUOUS, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}s{c[3]}d{c[4]}")
def test_decode_matches_references(case):
    b, h, kvh, slots, d, dtype, positions, window, softcap, block_k, splits = case
    q, k, v = _inputs(len(positions) + slots, b, h, kvh, slots, d, dtype)
    pos = jnp.asarray(positions, jnp.int32)[:, None]
    kw = dict(scale=d ** -0.5, window=window, softcap=softcap)
    got = decode.decode_attention(q, k, v, pos, **kw, block_k=block_k, num_splits=splits, interpret=INTERPRET)
    assert got.shape == (b, 1, h, d) and got.dtype == dtype
    _close(got, naive(q, k, v, np.asarray(pos), **kw), dtype)
    _close(got, np.asarray(ref_ops.attention(q, k, v, pos, **kw), np.float32), dtype)


def test_split_count_does_not_change_the_result():
    q, k, v = _inputs(5, 2, 4, 2, 200, 64, jnp.float32)
    pos = jnp.asarray([[199], [80]], jnp.int32)
    want = naive(q, k, v, np.asarray(pos), scale=0.125, window=150)
    for splits in (1, 2, 13):
        got = decode.decode_attention(q, k, v, pos, scale=0.125, window=150, block_k=16, num_splits=splits,
                                      interpret=INTERPRET)
        _close(got, want, jnp.float32)


def test_row_with_nothing_visible_is_finite_zero():
    q, k, v = _inputs(6, 2, 4, 2, 32, 64, jnp.float32)
    pos = jnp.asarray([[-1], [31]], jnp.int32)  # row 0 sees no slot (padding)
    got = np.asarray(decode.decode_attention(q, k, v, pos, scale=0.125, block_k=16, num_splits=2, interpret=INTERPRET))
    assert np.all(got[0] == 0)
    _close(got[1:], naive(q[1:], k[1:], v[1:], np.asarray(pos)[1:], scale=0.125), jnp.float32)


def _quantized(seed: int, b: int, h: int, kvh: int, slots: int, d: int, code_dtype, dtype=jnp.float32):
    q, k, v = _inputs(seed, b, h, kvh, slots, d, jnp.float32)
    (kc, ks), (vc, vs) = quantize_kv(k, code_dtype), quantize_kv(v, code_dtype)
    return q.astype(dtype), k, v, kc, ks, vc, vs


@pytest.mark.parametrize("code_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype,window,softcap", [(jnp.float32, None, None), (jnp.bfloat16, 45, 4.0)],
                         ids=["f32", "bf16-window-softcap"])
def test_quantized_cache_matches_references(code_dtype, dtype, window, softcap):
    q, _, _, kc, ks, vc, vs = _quantized(7, 3, 8, 2, 113, 64, code_dtype, dtype)
    pos = jnp.asarray([[112], [0], [77]], jnp.int32)
    kw = dict(scale=0.125, window=window, softcap=softcap)
    got = decode.decode_attention(q, kc, vc, pos, **kw, k_scale=ks, v_scale=vs, block_k=32, num_splits=3,
                                  interpret=INTERPRET)
    # the same codes and scales: the kernel only reorders float32 sums (and bf16 rounding of q and p)
    _close(got, naive(q, kc, vc, np.asarray(pos), **kw, k_scale=ks, v_scale=vs), dtype)
    _close(got, np.asarray(ref_ops.attention(q, kc, vc, pos, **kw, k_scale=ks, v_scale=vs), np.float32), dtype)


# Relative L2 error of the output against the unquantized float32 cache. Per-token absmax codes:
# int8 rounds each element by at most max|x|/254, an rms of ~0.6% of sigma for Gaussian rows of 128
# (max|x| ~ 2.8 sigma); the K error moves scores by about that much (scale * |q| * err) and the V
# error averages like V, so the output is off by ~1%: bound 3%. fp8 e4m3 keeps 3 mantissa bits:
# ~2.5% rms relative per element, ~3.5% on the output: bound 10%.
@pytest.mark.parametrize("code_dtype,bound", [(jnp.int8, 0.03), (jnp.float8_e4m3fn, 0.10)], ids=["int8", "fp8"])
def test_quantized_cache_quality(code_dtype, bound):
    q, k, v, kc, ks, vc, vs = _quantized(8, 2, 8, 2, 256, 128, code_dtype)
    pos = jnp.asarray([[255], [100]], jnp.int32)
    got = np.asarray(decode.decode_attention(q, kc, vc, pos, scale=128 ** -0.5, k_scale=ks, v_scale=vs,
                                             interpret=INTERPRET), np.float64)
    exact = naive(q, k, v, np.asarray(pos), scale=128 ** -0.5)
    err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert err < bound, err
    assert err > 1e-4  # the codes really were read (not the float cache)


def _paginate(k, v, page_size: int, seed: int, k_scale=None, v_scale=None, spare: int = 3):
    """Scatter a contiguous cache [B, KVH, S, D] into a pool of pages in a random order (plus spare
    pages holding garbage): returns (pages..., page_table)."""
    b, kvh, slots, _ = k.shape
    pps = -(-slots // page_size)
    num_pages = b * pps + spare
    order = np.random.default_rng(seed).permutation(num_pages)
    table = order[: b * pps].reshape(b, pps).astype(np.int32)

    def pool(x):
        x = np.asarray(x)
        pad = pps * page_size - slots
        x = np.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        pages = x.reshape(b, kvh, pps, page_size, *x.shape[3:]).swapaxes(1, 2)  # [B, pps, KVH, ps, ...]
        out = np.full((num_pages, *pages.shape[2:]), 7, x.dtype)  # spare pages: finite garbage
        out[table.reshape(-1)] = pages.reshape(b * pps, *pages.shape[2:])
        return jnp.asarray(out)

    scales = [None if s is None else pool(s) for s in (k_scale, v_scale)]
    return pool(k), pool(v), *scales, jnp.asarray(table)


# (page_size, pages_per_step, dtype, code dtype, window, softcap)
PAGED = [
    (16, None, jnp.float32, None, None, None),  # default: several pages per step
    (16, 1, jnp.bfloat16, None, 21, None),  # one page per step, window crossing pages
    (16, 4, jnp.float32, jnp.int8, None, 3.0),  # int8 pages, 4 pages per step (table not a multiple of 4)
    (64, None, jnp.bfloat16, jnp.float8_e4m3fn, 70, None),  # fp8, large pages, window crossing a page
    (64, 2, jnp.float32, None, None, None),
]


@pytest.mark.parametrize("case", PAGED, ids=lambda c: f"ps{c[0]}-step{c[1]}-{jnp.dtype(c[3] or c[2]).name}")
def test_paged_matches_contiguous_reference(case):
    page_size, step, dtype, code_dtype, window, softcap = case
    b, h, kvh, slots, d = 3, 8, 2, 211, 64  # 211: the last page is partly filled
    q, k, v = _inputs(page_size + (step or 0), b, h, kvh, slots, d, jnp.float32)
    q = q.astype(dtype)
    ks = vs = None
    if code_dtype is None:
        k, v = k.astype(dtype), v.astype(dtype)
    else:
        (k, ks), (v, vs) = quantize_kv(k, code_dtype), quantize_kv(v, code_dtype)
    kp, vp, ksp, vsp, table = _paginate(k, v, page_size, seed=page_size, k_scale=ks, v_scale=vs)
    pos = jnp.asarray([[210], [0], [133]], jnp.int32)
    kw = dict(scale=d ** -0.5, window=window, softcap=softcap)
    got = paged_decode.paged_decode_attention(q, kp, vp, table, pos, **kw, k_scale=ksp, v_scale=vsp,
                                              pages_per_step=step, num_splits=3, interpret=INTERPRET)
    assert got.shape == (b, 1, h, d) and got.dtype == dtype
    _close(got, naive(q, k, v, np.asarray(pos), **kw, k_scale=ks, v_scale=vs), dtype)
    want = ref_ops.attention(q, k, v, pos, **kw, k_scale=ks, v_scale=vs)  # the contiguous reference
    _close(got, np.asarray(want, np.float32), dtype)
    paged_want = ref_ops.paged_attention(q, kp, vp, table, pos, **kw, k_scale=ksp, v_scale=vsp)
    _close(got, np.asarray(paged_want, np.float32), dtype)


def test_paged_default_config_and_groups():
    """GQA 1 and 8 through the paged kernel with the default launch config."""
    for h, kvh in ((4, 4), (16, 2)):
        q, k, v = _inputs(h, 2, h, kvh, 96, 64, jnp.float32)
        kp, vp, _, _, table = _paginate(k, v, 16, seed=h)
        pos = jnp.asarray([[95], [40]], jnp.int32)
        got = paged_decode.paged_decode_attention(q, kp, vp, table, pos, scale=0.125, interpret=INTERPRET)
        _close(got, naive(q, k, v, np.asarray(pos), scale=0.125), jnp.float32)


def test_dispatch_picks_the_kernels_on_gpu():
    gpu = Ops(platform="gpu")
    q, k, v = _inputs(0, 2, 8, 2, 64, 128, jnp.bfloat16)
    pos = jnp.zeros((2, 1), jnp.int32)
    impl, _ = gpu.choose("decode_attention", q, k, v, pos, scale=0.1, window=None, softcap=None)
    assert impl.name == "pallas_decode"
    kc, ks = quantize_kv(k, jnp.int8)
    impl, _ = gpu.choose("decode_attention", q, kc, kc, pos, scale=0.1, k_scale=ks, v_scale=ks)
    assert impl.name == "pallas_decode"
    kp, vp, _, _, table = _paginate(k, v, 16, seed=0)
    impl, _ = gpu.choose("paged_attention", q, kp, vp, table, pos, scale=0.1)
    assert impl.name == "pallas_paged_decode"
    # declined, with reasons: a prefill-shaped query, an odd head_dim, a cache of another dtype
    q2 = jnp.zeros((2, 3, 8, 128), jnp.bfloat16)
    impl, choice = gpu.choose("paged_attention", q2, kp, vp, table, jnp.zeros((2, 3), jnp.int32), scale=0.1)
    assert impl.name == "xla" and "q_len 3" in str(choice)
    q96, k96 = jnp.zeros((2, 1, 8, 96), jnp.bfloat16), jnp.zeros((2, 2, 64, 96), jnp.bfloat16)
    impl, choice = gpu.choose("decode_attention", q96, k96, k96, pos, scale=0.1)
    assert impl.name == "xla" and "head_dim 96" in str(choice)
    impl, choice = gpu.choose("decode_attention", q, k.astype(jnp.float32), v, pos, scale=0.1)
    assert impl.name == "xla" and "dtype" in str(choice)
    impl, _ = Ops(platform="cpu").choose("decode_attention", q, k, v, pos, scale=0.1)
    assert impl.name == "xla"


def test_bad_arguments_raise_clear_errors():
    q, k, v = _inputs(0, 1, 4, 2, 32, 64, jnp.float32)
    pos = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="block_k 24"):
        decode.decode_attention(q, k, v, pos, scale=0.1, block_k=24, interpret=INTERPRET)
    with pytest.raises(ValueError, match="only one of k_scale"):
        decode.decode_attention(q, k, v, pos, scale=0.1, k_scale=jnp.ones((1, 2, 32)), interpret=INTERPRET)
    with pytest.raises(ValueError, match="3 query heads"):
        decode.decode_attention(q[:, :, :3], k, v, pos, scale=0.1, interpret=INTERPRET)
    kp, vp, _, _, table = _paginate(k, v, 16, seed=0)
    with pytest.raises(ValueError, match="pages_per_step 3"):
        paged_decode.paged_decode_attention(q, kp, vp, table, pos, scale=0.1, pages_per_step=3, interpret=INTERPRET)


def test_auto_splits_fill_the_gpu():
    """Batch 1 at 32k context splits the sequence many ways; batch 64 at 2k barely."""
    long = decode.choose_config(1, 8, 32768, 128, jnp.bfloat16)
    # 256 tiles of 128 slots: 33 splits (8 tiles each), 264 programs = 2 per SM of 132
    assert long.block_k == 128 and long.num_splits == 33
    wide = decode.choose_config(64, 8, 2048, 128, jnp.bfloat16)
    assert wide.num_splits == 1  # 512 programs already
    # 1-byte codes keep 128-slot tiles (a 256-slot int8 tile is conversion-bound: H200 sweep) and 3 stages
    int8 = decode.choose_config(1, 8, 32768, 128, jnp.int8)
    assert (int8.block_k, int8.num_stages) == (128, 3)
    paged = paged_decode.choose_config(1, 8, 2048, 16, 128, jnp.bfloat16)
    assert paged.block_k == long.block_k and paged.num_splits == long.num_splits


def _can_lower_for_cuda() -> str | None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton  # registers the Triton lowering

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    try:
        f = lambda x: pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                                     compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1))(x)
        jax.jit(f).trace(jax.ShapeDtypeStruct((16, 16), jnp.float32)).lower(lowering_platforms=("cuda",))
    except Exception as e:  # noqa: BLE001  any failure means this jax cannot lower Pallas for CUDA here
        return f"this jax cannot lower Pallas for cuda on {jax.default_backend()}: {type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("cache", ["bf16", "int8"])
@pytest.mark.parametrize("batch,slots", [(1, 32768), (64, 4096)])
def test_lowers_for_cuda_at_real_shapes(paged, cache, batch, slots):
    """Llama-3-8B decode shapes (32 query heads over 8 kv heads, head_dim 128): the Triton lowering
    (power-of-two tiles, dot shapes, dtype casts) must accept the kernels with their default configs."""
    reason = _can_lower_for_cuda()
    if reason is not None:
        pytest.skip(reason)
    h, kvh, d = 32, 8, 128
    code = jnp.bfloat16 if cache == "bf16" else jnp.int8
    sds = jax.ShapeDtypeStruct
    q, pos = sds((batch, 1, h, d), jnp.bfloat16), sds((batch, 1), jnp.int32)
    if paged:
        page_size = 16
        pps = slots // page_size
        kv = sds((batch * pps, kvh, page_size, d), code)
        scales = sds((batch * pps, kvh, page_size), jnp.float32)
        args = [q, kv, kv, sds((batch, pps), jnp.int32), pos]
        fn = partial(paged_decode.paged_decode_attention, scale=d ** -0.5)
    else:
        kv, scales = sds((batch, kvh, slots, d), code), sds((batch, kvh, slots), jnp.float32)
        args = [q, kv, kv, pos]
        fn = partial(decode.decode_attention, scale=d ** -0.5)
    if cache == "int8":
        f = lambda *a: fn(*a[:-2], k_scale=a[-2], v_scale=a[-1])
        args += [scales, scales]
    else:
        f = fn
    lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()[:100000]


def test_window_and_softcap_lower_for_cuda():
    reason = _can_lower_for_cuda()
    if reason is not None:
        pytest.skip(reason)
    sds = jax.ShapeDtypeStruct
    q, kv, pos = sds((2, 1, 16, 256), jnp.bfloat16), sds((2, 8, 1000, 256), jnp.float8_e4m3fn), sds((2, 1), jnp.int32)
    scales = sds((2, 8, 1000), jnp.float32)
    f = lambda q, k, v, p, a, b: decode.decode_attention(q, k, v, p, scale=0.0625, window=512, softcap=50.0,
                                                        k_scale=a, v_scale=b)
    jax.jit(f).trace(q, kv, kv, pos, scales, scales).lower(lowering_platforms=("cuda",))
    assert math.isfinite(decode.MASKED)
