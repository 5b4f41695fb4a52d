"""Ragged paged attention (pallas_kernels/attention/ragged.py, ferrum_jax/ragged_kernels.py): the Pallas
kernel in interpret mode and the jnp reference against a float64 numpy per-token oracle, on batches
mixing decode tokens, prefill chunks over existing caches, prompts from zero, empty sequences and
padding; the all-decode case against ferrum_jax.ops.paged_attention; dispatch; the CUDA lowering."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ferrum_jax.ops  # registers paged_attention's reference
import ferrum_jax.ragged_kernels  # noqa: F401  registers ragged_paged_attention
from ferrum_jax.backend import Ops, record_dispatch
from ferrum_jax.cache import quantize_kv
from pallas_kernels.attention import ragged

INTERPRET = jax.default_backend() != "gpu"  # the real kernels on a GPU, interpret mode elsewhere

# (cached tokens before this step, new tokens): a decode token, a chunk continuing a cache, a prompt
# from zero, an empty sequence, a long decode, a short prompt.
MIX = [(20, 1), (9, 11), (0, 13), (5, 0), (37, 1), (0, 3)]


@dataclasses.dataclass
class Case:
    args: tuple  # q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs
    scales: dict  # k_scale / v_scale for quantized caches
    q64: np.ndarray
    k64: np.ndarray  # dequantized pages, float64
    v64: np.ndarray
    page_table: np.ndarray
    cu: np.ndarray
    kv_lens: np.ndarray
    num_seqs: int


def build(seed: int, *, heads: int, kv_heads: int, head_dim: int, page_size: int, dtype=jnp.float32,
          cache_dtype=None, seqs=MIX, pad_tokens: int = 3, unused_rows: int = 2) -> Case:
    """A random batch over a cache of scattered pages (a random permutation). Every slot outside
    the sequences' visible ranges holds random data too, so a leak shows; the metadata rows past
    num_seqs and the page-table entries past a sequence's pages hold junk."""
    rng = np.random.default_rng(seed)
    num_seqs = len(seqs)
    rows = num_seqs + unused_rows
    kv_lens = np.array([c + n for c, n in seqs], np.int32)
    pages_per_seq = max(-(-int(kv_lens.max()) // page_size), 1) + 1
    used = [-(-int(k) // page_size) for k in kv_lens]
    num_pages = sum(used) + 5
    perm = rng.permutation(num_pages)
    table = rng.integers(-3, num_pages + 3, size=(rows, pages_per_seq)).astype(np.int32)  # junk
    at = 0
    for s, u in enumerate(used):
        table[s, :u] = perm[at:at + u]
        at += u
    cu = np.zeros(rows + 1, np.int32)
    cu[1:num_seqs + 1] = np.cumsum([n for _, n in seqs])
    cu[num_seqs + 1:] = rng.integers(0, 5, size=unused_rows)  # junk, not even monotone
    kv_all = np.concatenate([kv_lens, rng.integers(0, 50, size=unused_rows).astype(np.int32)])
    n_tok = int(cu[num_seqs]) + pad_tokens

    q = jnp.asarray(rng.standard_normal((n_tok, heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((num_pages, kv_heads, page_size, head_dim)) * 1.5, dtype)
    v = jnp.asarray(rng.standard_normal((num_pages, kv_heads, page_size, head_dim)), dtype)
    scales = {}
    if cache_dtype is not None:
        (k, ks), (v, vs) = quantize_kv(k, cache_dtype), quantize_kv(v, cache_dtype)
        scales = dict(k_scale=ks, v_scale=vs)
        k64 = np.asarray(k.astype(jnp.float32), np.float64) * np.asarray(ks, np.float64)[..., None]
        v64 = np.asarray(v.astype(jnp.float32), np.float64) * np.asarray(vs, np.float64)[..., None]
    else:
        k64, v64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (k, v))
    args = (q, k, v, jnp.asarray(table), jnp.asarray(cu), jnp.asarray(kv_all), jnp.int32(num_seqs))
    return Case(args, scales, np.asarray(q.astype(jnp.float32), np.float64), k64, v64, table, cu, kv_all, num_seqs)


def oracle(c: Case, *, scale: float, window=None, softcap=None) -> np.ndarray:
    """float64, one token at a time, straight from the definition."""
    n, h, _ = c.q64.shape
    kvh, page_size = c.k64.shape[1], c.k64.shape[2]
    out = np.zeros((n, h, c.v64.shape[-1]))
    for s in range(c.num_seqs):
        q_len = c.cu[s + 1] - c.cu[s]
        for i in range(q_len):
            t, pos = c.cu[s] + i, c.kv_lens[s] - q_len + i
            slots = np.array([j for j in range(pos + 1) if window is None or j > pos - window])
            pages, rows = c.page_table[s, slots // page_size], slots % page_size
            for head in range(h):
                kh = head // (h // kvh)
                keys, vals = c.k64[pages, kh, rows], c.v64[pages, kh, rows]  # [slots, D]
                x = keys @ c.q64[t, head] * scale
                if softcap is not None:
                    x = softcap * np.tanh(x / softcap)
                p = np.exp(x - x.max())
                out[t, head] = p @ vals / p.sum()
    return out


def run_kernel(c: Case, **kw) -> np.ndarray:
    out = ragged.ragged_paged_attention(*c.args, **c.scales, interpret=INTERPRET, **kw)
    assert out.shape == c.args[0].shape and out.dtype == c.args[0].dtype
    return np.asarray(out.astype(jnp.float32))


def run_reference(c: Case, **kw) -> np.ndarray:
    out = ragged.reference(*c.args, **c.scales, **kw)
    assert out.shape == c.args[0].shape and out.dtype == c.args[0].dtype
    return np.asarray(out.astype(jnp.float32))


# id: (heads, kv_heads, head_dim, page_size, dtype, cache dtype, window, softcap, block_q, block_k)
CASES = {
    "gqa4-ps16": (8, 2, 64, 16, jnp.float32, None, None, None, None, None),
    "gqa4-ps8-steps": (8, 2, 64, 8, jnp.float32, None, None, None, 4, 16),
    "mha-window": (4, 4, 64, 8, jnp.float32, None, 6, None, 16, 16),
    "mqa-softcap": (8, 1, 64, 16, jnp.float32, None, None, 5.0, 2, 32),
    "gqa3-window-softcap": (6, 2, 64, 8, jnp.float32, None, 10, 3.0, 8, 16),
    "bq1-bk-below-page": (16, 1, 64, 32, jnp.float32, None, 17, None, 1, 16),
    "hd128-bf16": (8, 2, 128, 16, jnp.bfloat16, None, None, None, None, None),
    "int8": (8, 2, 64, 16, jnp.float32, jnp.int8, None, None, 8, 16),
    "fp8-bf16-window": (8, 2, 128, 8, jnp.bfloat16, jnp.float8_e4m3fn, 9, None, None, 16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_oracle(name):
    heads, kvh, d, ps, dtype, cache_dtype, window, softcap, bq, bk = CASES[name]
    c = build(list(CASES).index(name), heads=heads, kv_heads=kvh, head_dim=d, page_size=ps, dtype=dtype,
              cache_dtype=cache_dtype)
    kw = dict(scale=d ** -0.5, window=window, softcap=softcap)
    want = oracle(c, **kw)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    ref = run_reference(c, **kw)
    np.testing.assert_allclose(ref, want, atol=tol, rtol=tol)
    got = run_kernel(c, block_q=bq, block_k=bk, **kw)
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    np.testing.assert_allclose(got, ref, atol=tol, rtol=tol)
    pad = slice(int(c.cu[c.num_seqs]), None)
    assert not got[pad].any() and not ref[pad].any(), "padding tokens must come out as zeros"


@pytest.mark.parametrize("window", [None, 40])
def test_long_contexts(window):
    """Contexts spanning many steps: unmasked middle steps between masked window and causal edges."""
    seqs = [(100, 1), (70, 20), (0, 45), (3, 0), (130, 2)]
    c = build(21, heads=8, kv_heads=2, head_dim=64, page_size=8, seqs=seqs, cache_dtype=jnp.int8)
    kw = dict(scale=0.125, window=window, softcap=None)
    want = oracle(c, **kw)
    np.testing.assert_allclose(run_kernel(c, block_q=4, block_k=16, **kw), want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(run_kernel(c, block_q=16, block_k=32, **kw), want, atol=1e-4, rtol=1e-4)


def test_num_seqs_is_dynamic():
    """One compiled program; a smaller num_seqs drops the later sequences' tokens to zeros."""
    c = build(7, heads=8, kv_heads=2, head_dim=64, page_size=8)
    f = jax.jit(lambda *a: ragged.ragged_paged_attention(*a, scale=0.125, block_q=4, block_k=16, interpret=INTERPRET))
    full = np.asarray(f(*c.args))
    fewer = dataclasses.replace(c, args=c.args[:6] + (jnp.int32(3),), num_seqs=3)
    part = np.asarray(f(*fewer.args))
    want = oracle(fewer, scale=0.125)
    np.testing.assert_allclose(part, want, atol=1e-4, rtol=1e-4)
    cut = int(c.cu[3])
    np.testing.assert_allclose(part[:cut], full[:cut], atol=1e-6)
    assert not part[cut:].any()


def test_block_table_covers_every_token_once():
    rng = np.random.default_rng(3)
    for block_q in (1, 4, 16):
        q_lens = rng.integers(0, 40, size=9)
        q_lens[rng.integers(0, 9, size=3)] = 0
        num_seqs = 7
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        kv = (q_lens + rng.integers(0, 30, size=9)).astype(np.int32)
        n = int(cu[num_seqs]) + 5
        table = jax.jit(ragged.block_table, static_argnames=("num_tokens", "block_q"))
        meta = np.asarray(table(jnp.asarray(cu), jnp.asarray(kv), jnp.int32(num_seqs), num_tokens=n, block_q=block_q))
        assert meta.shape[0] == -(-n // block_q) + min(9, n)
        hits = np.zeros(n, int)
        for seq, first, rows, pos0 in meta:
            assert 0 <= rows <= block_q
            if rows:
                assert seq < num_seqs and cu[seq] <= first and first + rows <= cu[seq + 1]
                assert pos0 == kv[seq] - q_lens[seq] + (first - cu[seq])
                hits[first:first + rows] += 1
        assert (hits[:cu[num_seqs]] == 1).all() and not hits[cu[num_seqs]:].any()


@pytest.mark.parametrize("cache_dtype", [None, jnp.int8])
def test_all_decode_matches_paged_attention(cache_dtype):
    """One token per sequence is paged_attention with q_len 1 at position kv_len - 1."""
    seqs = [(c, 1) for c in (0, 7, 30, 15, 63)]
    c = build(11, heads=8, kv_heads=2, head_dim=64, page_size=16, seqs=seqs, pad_tokens=0, unused_rows=0,
              cache_dtype=cache_dtype)
    q, k, v, table, _, kv_lens, _ = c.args
    kw = dict(scale=0.125, window=20, softcap=None)
    # paged_attention's reference gathers whole rows of the table (jnp.take fills NaN for the junk
    # entries past a sequence's pages), so it gets them clipped to real pages.
    in_range = jnp.clip(table, 0, k.shape[0] - 1)
    want = Ops().paged_attention(q[:, None], k, v, in_range, (kv_lens - 1)[:, None], **kw, **c.scales)[:, 0]
    np.testing.assert_allclose(run_kernel(c, **kw), np.asarray(want), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(run_reference(c, **kw), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_dispatch():
    c = build(5, heads=8, kv_heads=2, head_dim=64, page_size=16)
    kw = dict(scale=0.125)
    with record_dispatch() as choices:
        out = Ops().ragged_paged_attention(*c.args, **kw)
    assert choices[0].impl == ("pallas_ragged" if jax.default_backend() == "gpu" else "xla")
    np.testing.assert_allclose(np.asarray(out), oracle(c, **kw), atol=1e-4, rtol=1e-4)

    gpu = Ops(platform="gpu")
    assert gpu.choose("ragged_paged_attention", *c.args, **kw)[0].name == "pallas_ragged"
    odd = build(5, heads=4, kv_heads=2, head_dim=48, page_size=16)
    impl, choice = gpu.choose("ragged_paged_attention", *odd.args, **kw)
    assert impl.name == "xla" and "head_dim 48" in str(choice)
    odd_pages = build(5, heads=4, kv_heads=2, head_dim=64, page_size=12)
    assert "page_size 12" in str(gpu.choose("ragged_paged_attention", *odd_pages.args, **kw)[1])
    q, k, v, *rest = c.args
    mixed = (q.astype(jnp.bfloat16), k, v, *rest)  # f32 cache under bf16 queries
    assert gpu.choose("ragged_paged_attention", *mixed, **kw)[0].name == "xla"


def test_bad_input_is_reported():
    c = build(5, heads=8, kv_heads=2, head_dim=64, page_size=16)
    q, k, v, table, cu, kv_lens, n = c.args
    with pytest.raises(ValueError, match="kv_lens must be"):
        ragged.reference(q, k, v, table, cu, kv_lens[:-1], n, scale=0.1)
    with pytest.raises(ValueError, match="not a multiple"):
        ragged.ragged_paged_attention(q[:, :7], k, v, table, cu, kv_lens, n, scale=0.1, interpret=INTERPRET)
    with pytest.raises(ValueError, match="needs k_scale"):
        ragged.reference(q, k.astype(jnp.int8), v.astype(jnp.int8), table, cu, kv_lens, n, scale=0.1)
    with pytest.raises(ValueError, match="window must be >= 1"):
        ragged.reference(*c.args, scale=0.1, window=0)
    with pytest.raises(ValueError, match="powers of two"):
        ragged.ragged_paged_attention(*c.args, scale=0.1, block_q=3, interpret=INTERPRET)
    with pytest.raises(ValueError, match=">= 16"):
        ragged.ragged_paged_attention(*c.args, scale=0.1, block_q=2, interpret=INTERPRET)  # 2 tokens x 4 heads


def _cuda_lowering_available() -> str | None:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    x = jax.ShapeDtypeStruct((16,), jnp.float32)
    call = pl.pallas_call(copy, out_shape=x, compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2))
    try:
        jax.jit(call).trace(x).lower(lowering_platforms=("cuda",))
    except Exception as e:  # noqa: BLE001  any failure here means this jax cannot lower for CUDA on this host
        return f"this jax cannot lower Pallas for cuda here: {type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("cache_dtype,window,softcap,block_q,block_k", [
    (jnp.bfloat16, None, None, None, None),
    (jnp.bfloat16, 1024, 50.0, 4, 32),
    (jnp.bfloat16, None, None, 4, 128),  # decode-sized tiles (16 rows), wide steps
    (jnp.int8, None, None, None, None),
    (jnp.float8_e4m3fn, 512, None, 32, 64),
])
@pytest.mark.parametrize("num_seqs", [16, 2048])  # prefill-heavy and decode-heavy default blocks
def test_lowers_for_cuda(cache_dtype, window, softcap, block_q, block_k, num_seqs):
    reason = _cuda_lowering_available()
    if reason:
        pytest.skip(reason)
    n, h, kvh, d, ps, num_pages = 2048, 32, 8, 128, 16, 4096
    pages_per_seq = 4096 // ps if num_seqs == 16 else 128 // ps
    sd = jax.ShapeDtypeStruct
    args = (sd((n, h, d), jnp.bfloat16), sd((num_pages, kvh, ps, d), cache_dtype),
            sd((num_pages, kvh, ps, d), cache_dtype), sd((num_seqs, pages_per_seq), jnp.int32),
            sd((num_seqs + 1,), jnp.int32), sd((num_seqs,), jnp.int32), sd((), jnp.int32))
    scales = {}
    if cache_dtype != jnp.bfloat16:
        scales = dict(k_scale=sd((num_pages, kvh, ps), jnp.float32), v_scale=sd((num_pages, kvh, ps), jnp.float32))

    def f(*a, **s):
        return ragged.ragged_paged_attention(*a, **s, scale=d ** -0.5, window=window, softcap=softcap,
                                             block_q=block_q, block_k=block_k)

    text = jax.jit(f).trace(*args, **scales).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
