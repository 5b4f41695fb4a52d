"""The decode-step kernel that writes the new token's K/V and attends (pallas_kernels/attention/
decode_append.py): interpret mode on CPU, the real kernel on a GPU, against two independent oracles
(a float64 numpy softmax over a numpy-written cache, and ferrum_jax.ops' write_kv + attention).
Plus the model path: KVCache.write_attend picks the op for decode, and the op on a GPU picks the kernel."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import decode_kernels  # noqa: F401  registers pallas_decode_append
from ferrum_jax import ops as ref_ops
from ferrum_jax.backend import Ops, record_dispatch
from ferrum_jax.cache import KVCache
from ferrum_jax.ops import QKPrologue
from ferrum_jax.rope import Rope
from pallas_kernels.attention import decode_append
from tests.test_decode_attention import INTERPRET, _can_lower_for_cuda, _close, naive


def _inputs(seed: int, b: int, h: int, kvh: int, slots: int, d: int, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, 1, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, kvh, slots, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, kvh, slots, d), jnp.float32).astype(dtype)
    k_new = jax.random.normal(ks[3], (b, 1, kvh, d), jnp.float32).astype(dtype)
    v_new = jax.random.normal(ks[4], (b, 1, kvh, d), jnp.float32).astype(dtype)
    return q, k_new, v_new, k, v


def _numpy_write(cache, new, positions) -> np.ndarray:
    """The cache with new[b, 0] stored at slot positions[b] of each row (dropped past the end)."""
    out = np.array(cache, np.float32)
    for row, p in enumerate(np.asarray(positions)[:, 0]):
        if 0 <= p < out.shape[2]:
            out[row, :, p] = np.asarray(new, np.float32)[row, 0]
    return out


# (batch, heads, kv_heads, slots, head_dim, dtype, positions, window, softcap, block_k, splits)
CASES = [
    # GQA 4, three splits, a row at slot 0 (only the new token visible), a full row
    (3, 8, 2, 67, 64, jnp.float32, [0, 30, 66], None, None, 16, 3),
    # MHA, bf16, head_dim 128, a window across tile edges
    (2, 4, 4, 131, 128, jnp.bfloat16, [130, 44], 20, None, 16, 4),
    # GQA 8, soft-capping, one split (no partials: the program normalizes itself)
    (2, 16, 2, 97, 64, jnp.float32, [96, 52], None, 5.0, 32, 1),
    # a group of 3 (rows masked inside a 16-row tile), more splits than tiles, window and soft-cap
    (2, 6, 2, 53, 64, jnp.bfloat16, [52, 3], 33, 2.0, 16, 7),
    # head_dim 256: the merge takes the 5 splits 2 at a time (a masked tail chunk)
    (1, 4, 1, 80, 256, jnp.float32, [79], None, None, 16, 5),
    # default config; a row past the capacity (its write is dropped, as in KVCache.write)
    (4, 4, 2, 300, 64, jnp.float32, [299, 0, 151, 300], 64, None, None, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}s{c[3]}d{c[4]}")
def test_append_matches_references(case):
    b, h, kvh, slots, d, dtype, positions, window, softcap, block_k, splits = case
    q, k_new, v_new, k, v = _inputs(slots + b, b, h, kvh, slots, d, dtype)
    pos = jnp.asarray(positions, jnp.int32)[:, None]
    kw = dict(scale=d ** -0.5, window=window, softcap=softcap)
    want_k, want_v = _numpy_write(k, k_new, pos), _numpy_write(v, v_new, pos)
    got, got_k, got_v = decode_append.decode_attention_append(q, k_new, v_new, k, v, pos, **kw, block_k=block_k,
                                                             num_splits=splits, interpret=INTERPRET)
    assert got.shape == (b, 1, h, d) and got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got_k, np.float32), want_k)  # exact: a copy of the new token
    np.testing.assert_array_equal(np.asarray(got_v, np.float32), want_v)
    _close(got, naive(q, want_k, want_v, np.asarray(pos), **kw), dtype)
    ref, ref_k, ref_v = decode_append.reference(q, k_new, v_new, k, v, pos, **kw)
    _close(got, np.asarray(ref, np.float32), dtype)
    np.testing.assert_array_equal(np.asarray(ref_k, np.float32), want_k)


def _numpy_prologue(x, positions, rope: Rope, w=None, eps=1e-6, offset=0.0) -> np.ndarray:
    """float64 numpy from the definitions: x [B, 1, H, D] / rms(x) * (offset + w) per head (when w),
    then the HF rotate-half rope at each row's position over the first rope.dim dims."""
    x = np.asarray(x, np.float32).astype(np.float64)
    if w is not None:
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (offset + np.asarray(w, np.float64))
    half = rope.dim // 2
    inv = 1.0 / rope.theta ** (np.arange(0, rope.dim, 2) / rope.dim)
    if rope.kind == "linear":
        inv = inv / rope.factor
    ang = np.asarray(positions, np.float64)[:, :, None, None] * inv  # [B, 1, 1, dim/2]
    cos, sin = np.cos(ang) * rope.attention_factor, np.sin(ang) * rope.attention_factor
    lo, hi = x[..., :half], x[..., half:rope.dim]
    return np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin, x[..., rope.dim:]], axis=-1)


# (dtype, rope, q/k norm, norm offset)
PROLOGUES = [
    (jnp.float32, Rope(theta=10000.0, dim=64), False, 0.0),  # Llama: rope only
    (jnp.float32, Rope(theta=1e6, dim=64), True, 0.0),  # Qwen3: per-head RMSNorm, then rope
    (jnp.bfloat16, Rope(theta=10000.0, dim=64, kind="linear", factor=4.0), True, 1.0),  # Gemma 3: w - 1 stored
    (jnp.float32, Rope(theta=10000.0, dim=32), False, 0.0),  # partial rotary: dims 32.. pass through
]


@pytest.mark.parametrize("dtype,rope,norm,offset", PROLOGUES, ids=["rope", "qk_norm", "bf16_offset", "partial"])
def test_prologue_norms_and_rotates_q_and_k_in_the_kernel(dtype, rope, norm, offset):
    """Given the projection's q, k_new, the kernel normalizes and rotates them: the cache gets the
    rotated key, and the output is attention of the rotated query (float64 numpy oracle)."""
    b, h, kvh, slots, d = 3, 6, 2, 70, 64
    q, k_new, v_new, k, v = _inputs(11, b, h, kvh, slots, d, dtype)
    pos = jnp.asarray([[69], [0], [33]], jnp.int32)
    wq, wk = (None, None) if not norm else (1 + 0.2 * jax.random.normal(jax.random.PRNGKey(i), (d,)) for i in (1, 2))
    kw = dict(scale=d ** -0.5, window=40, rope=rope, q_norm=wq, k_norm=wk, norm_eps=1e-6, norm_offset=offset)
    got, got_k, got_v = decode_append.decode_attention_append(q, k_new, v_new, k, v, pos, **kw, block_k=16,
                                                             num_splits=3, interpret=INTERPRET)
    q_rot = _numpy_prologue(q, pos, rope, wq, offset=offset)
    k_rot = _numpy_prologue(k_new, pos, rope, wk, offset=offset)
    want_k = _numpy_write(k, k_rot, pos)
    _close(got_k, want_k, dtype)
    np.testing.assert_array_equal(np.asarray(got_v, np.float32), _numpy_write(v, v_new, pos))
    _close(got, naive(q_rot, want_k, _numpy_write(v, v_new, pos), np.asarray(pos), scale=kw["scale"], window=40), dtype)
    # and the reference (ops.prepare_qk, then write and attend) agrees with the kernel
    ref, ref_k, _ = decode_append.reference(q, k_new, v_new, k, v, pos, **kw)
    _close(got, np.asarray(ref, np.float32), dtype)
    _close(got_k, np.asarray(ref_k, np.float32), dtype)


def test_write_attend_with_a_prologue_is_prepare_then_write_then_attend():
    """The model's entry point with the q/k norm and rope handed over: decode takes the op with
    them; a prefill-shaped call applies them before writing (the same result either way)."""
    q, k_new, v_new, _, _ = _inputs(4, 2, 8, 2, 1, 64, jnp.float32)
    cache = KVCache.create(num_layers=1, batch=2, kv_heads=2, capacity=32, head_dim=64, dtype=jnp.float32)
    pos = jnp.asarray([[5], [31]], jnp.int32)
    prologue = QKPrologue(Rope(theta=1e6, dim=64), jnp.linspace(0.5, 1.5, 64), jnp.linspace(1.5, 0.5, 64))
    refs = Ops(force=(("decode_attention_append", "xla"), ("decode_attention", "xla")))
    kw = dict(ops=refs, scale=0.125, window=None, softcap=None)
    with record_dispatch() as log:
        got, new_cache = cache.write_attend(0, q, k_new, v_new, pos, kv_len=None, prologue=prologue, **kw)
    assert log[0].op == "decode_attention_append"
    q_rot, k_rot = prologue(q, k_new, pos)
    np.testing.assert_allclose(np.asarray(q_rot), _numpy_prologue(q, pos, prologue.rope, prologue.q_norm), atol=1e-5)
    want_cache = cache.write(0, k_rot, v_new, pos)
    np.testing.assert_array_equal(np.asarray(new_cache.k[0]), np.asarray(want_cache.k[0]))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want_cache.attend(0, q_rot, pos, kv_len=None, **kw)))
    # kv_len given (a prefill's path): the prologue runs first, then write + attend
    got2, cache2 = cache.write_attend(0, q, k_new, v_new, pos, kv_len=32, prologue=prologue, **kw)
    np.testing.assert_array_equal(np.asarray(cache2.k[0]), np.asarray(want_cache.k[0]))
    np.testing.assert_allclose(np.asarray(got2), np.asarray(got), atol=1e-6)


def test_prologue_declines_with_reasons():
    gpu = Ops(platform="gpu")
    q, k_new, v_new, k, v = _inputs(0, 1, 8, 2, 32, 64, jnp.bfloat16)
    pos = jnp.zeros((1, 1), jnp.int32)
    w = jnp.ones((64,), jnp.bfloat16)
    impl, _ = gpu.choose("decode_attention_append", q, k_new, v_new, k, v, pos, scale=0.1,
                         rope=Rope(theta=1e4, dim=64), q_norm=w, k_norm=w)
    assert impl.name == "pallas_decode_append"
    for kw, why in [(dict(rope=Rope(theta=1e4, dim=66)), "rope dim 66"),
                    (dict(rope=Rope(theta=1e4, dim=63)), "rope dim 63"),
                    (dict(q_norm=w[:32], k_norm=w), "q_norm shape"),
                    (dict(q_norm=w), "come together")]:
        impl, choice = gpu.choose("decode_attention_append", q, k_new, v_new, k, v, pos, scale=0.1, **kw)
        assert impl.name == "xla" and why in str(choice), (kw, str(choice))


def test_splits_merge_in_the_kernel_whatever_their_count():
    q, k_new, v_new, k, v = _inputs(5, 2, 4, 2, 200, 64, jnp.float32)
    pos = jnp.asarray([[199], [80]], jnp.int32)
    want = naive(q, _numpy_write(k, k_new, pos), _numpy_write(v, v_new, pos), np.asarray(pos), scale=0.125,
                 window=150)
    for splits in (1, 2, 5, 13):
        got, _, _ = decode_append.decode_attention_append(q, k_new, v_new, k, v, pos, scale=0.125, window=150,
                                                          block_k=16, num_splits=splits, interpret=INTERPRET)
        _close(got, want, jnp.float32)


def test_repeated_calls_reset_the_counters():
    """A decode loop calls the kernel again and again: every call's merge must be the last split's
    (a counter left non-zero would make the next call merge early, or never)."""
    q, k_new, v_new, k, v = _inputs(7, 1, 8, 2, 96, 64, jnp.float32)
    step = jax.jit(partial(decode_append.decode_attention_append, scale=0.125, block_k=16, num_splits=4,
                           interpret=INTERPRET))
    for p in (40, 41, 42):
        pos = jnp.full((1, 1), p, jnp.int32)
        want = naive(q, _numpy_write(k, k_new, pos), _numpy_write(v, v_new, pos), np.asarray(pos), scale=0.125)
        got, k, v = step(q, k_new, v_new, k, v, pos)
        _close(got, want, jnp.float32)
        k_new, v_new = k_new * 0.5, v_new + 1.0


def test_kv_cache_write_attend_is_write_then_attend():
    """The model's entry point: decode (one token, whole cache) takes the op; the cache and the
    output equal `write` followed by `attend` (the path prefill and quantized caches keep)."""
    q, k_new, v_new, _, _ = _inputs(3, 2, 8, 2, 1, 64, jnp.float32)
    cache = KVCache.create(num_layers=2, batch=2, kv_heads=2, capacity=48, head_dim=64, dtype=jnp.float32)
    cache = cache.write(1, *(jax.random.normal(jax.random.PRNGKey(i), (2, 40, 2, 64)) for i in (1, 2)),
                        jnp.broadcast_to(jnp.arange(40), (2, 40)))
    pos = jnp.asarray([[40], [17]], jnp.int32)
    refs = Ops(force=(("decode_attention_append", "xla"), ("decode_attention", "xla")))  # same on CPU and GPU
    kw = dict(ops=refs, scale=0.125, window=None, softcap=None, kv_len=None)
    with record_dispatch() as log:
        got, new_cache = cache.write_attend(1, q, k_new, v_new, pos, **kw)
    assert [c.op for c in log] == ["decode_attention_append", "decode_attention"]
    want_cache = cache.write(1, k_new, v_new, pos)
    want = want_cache.attend(1, q, pos, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for a, b in zip(jax.tree.leaves(new_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dispatch_picks_the_kernel_on_gpu():
    gpu = Ops(platform="gpu")
    q, k_new, v_new, k, v = _inputs(0, 2, 8, 2, 64, 128, jnp.bfloat16)
    pos = jnp.zeros((2, 1), jnp.int32)
    impl, _ = gpu.choose("decode_attention_append", q, k_new, v_new, k, v, pos, scale=0.1)
    assert impl.name == "pallas_decode_append"
    impl, choice = gpu.choose("decode_attention_append", q, k_new.astype(jnp.float32), v_new, k, v, pos, scale=0.1)
    assert impl.name == "xla" and "new k/v dtype" in str(choice)
    impl, choice = gpu.choose("decode_attention_append", q, k_new[:, :, :1], v_new, k, v, pos, scale=0.1)
    assert impl.name == "xla" and "new k/v" in str(choice)


def test_bad_arguments_raise_clear_errors():
    q, k_new, v_new, k, v = _inputs(0, 1, 4, 2, 32, 64, jnp.float32)
    with pytest.raises(ValueError, match="q_positions"):
        decode_append.decode_attention_append(q, k_new, v_new, k, v, jnp.zeros((1,), jnp.int32), scale=0.1,
                                              interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_k 24"):
        decode_append.decode_attention_append(q, k_new, v_new, k, v, jnp.zeros((1, 1), jnp.int32), scale=0.1,
                                              block_k=24, interpret=INTERPRET)


def test_prologue_lowers_for_cuda_at_qwen3_shapes():
    """Qwen3-30B-A3B's attention (32/4 heads, head_dim 128, q/k norm, rope theta 1e6) at 1k."""
    reason = _can_lower_for_cuda()
    if reason is not None:
        pytest.skip(reason)
    sds = jax.ShapeDtypeStruct
    q, new = sds((1, 1, 32, 128), jnp.bfloat16), sds((1, 1, 4, 128), jnp.bfloat16)
    kv, pos, w = sds((1, 4, 1024, 128), jnp.bfloat16), sds((1, 1), jnp.int32), sds((128,), jnp.bfloat16)
    f = partial(decode_append.decode_attention_append, scale=128 ** -0.5, rope=Rope(theta=1e6, dim=128))
    lowered = jax.jit(f).trace(q, new, new, kv, kv, pos, q_norm=w, k_norm=w).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()[:100000]


@pytest.mark.parametrize("batch,slots", [(1, 2128), (1, 32768), (64, 4096)])
def test_lowers_for_cuda_at_real_shapes(batch, slots):
    """Llama-3-8B decode shapes with their default configs (several splits at batch 1, one at 64)."""
    reason = _can_lower_for_cuda()
    if reason is not None:
        pytest.skip(reason)
    sds = jax.ShapeDtypeStruct
    q, new = sds((batch, 1, 32, 128), jnp.bfloat16), sds((batch, 1, 8, 128), jnp.bfloat16)
    kv, pos = sds((batch, 8, slots, 128), jnp.bfloat16), sds((batch, 1), jnp.int32)
    f = partial(decode_append.decode_attention_append, scale=128 ** -0.5)
    lowered = jax.jit(f).trace(q, new, new, kv, kv, pos).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()[:100000]


def test_reference_is_ops_write_then_attention():
    q, k_new, v_new, k, v = _inputs(9, 1, 4, 2, 16, 32, jnp.float32)
    pos = jnp.asarray([[9]], jnp.int32)
    out, k2, v2 = ref_ops.decode_attention_append(q, k_new, v_new, k, v, pos, scale=0.2)
    np.testing.assert_array_equal(np.asarray(k2), _numpy_write(k, k_new, pos))
    _close(out, naive(q, np.asarray(k2), np.asarray(v2), np.asarray(pos), scale=0.2), jnp.float32)


def test_tickets_thread_through_calls():
    """Counters the caller keeps (`tickets`, zeroed once, as a decode loop's KVCache carries them)
    serve call after call: each call merges right and hands them back zeroed. Counters that start
    non-zero make the merge fire before the last split's partials are in (the check can fail; in
    interpret mode, where the programs run in order)."""
    q, k_new, v_new, k, v = _inputs(9, 2, 8, 2, 96, 64, jnp.float32)
    step = jax.jit(partial(decode_append.decode_attention_append, scale=0.125, block_k=16, num_splits=4,
                           interpret=INTERPRET))
    tickets = jnp.zeros((2, 2), jnp.int32)
    for p in (40, 41, 42):
        pos = jnp.asarray([[p], [p - 20]], jnp.int32)
        want = naive(q, _numpy_write(k, k_new, pos), _numpy_write(v, v_new, pos), np.asarray(pos), scale=0.125)
        got, k, v, tickets = step(q, k_new, v_new, k, v, pos, tickets=tickets)
        _close(got, want, jnp.float32)
        np.testing.assert_array_equal(np.asarray(tickets), 0)
        k_new, v_new = k_new * 0.5, v_new + 1.0
    if INTERPRET:  # programs run one after another: the early merge is certain (on a GPU, a race)
        pos = jnp.asarray([[50], [30]], jnp.int32)
        want = naive(q, _numpy_write(k, k_new, pos), _numpy_write(v, v_new, pos), np.asarray(pos), scale=0.125)
        got, *_ = step(q, k_new, v_new, k, v, pos, tickets=jnp.ones((2, 2), jnp.int32))
        assert not np.allclose(np.asarray(got), want, atol=1e-3)


def test_tickets_through_the_op_and_the_cache():
    """The op returns the tickets as a fourth output (the reference: as they came); a cache that
    carries them (`with_tickets`) writes and attends as one that does not, and keeps them."""
    q, k_new, v_new, k, v = _inputs(4, 2, 8, 2, 48, 64, jnp.float32)
    pos = jnp.asarray([[40], [17]], jnp.int32)
    tickets = jnp.zeros((2, 2), jnp.int32)
    out = ref_ops.decode_attention_append(q, k_new, v_new, k, v, pos, scale=0.125, tickets=tickets)
    assert len(out) == 4 and out[3] is tickets
    gpu = Ops(platform="gpu")
    impl, choice = gpu.choose("decode_attention_append", q, k_new, v_new, k, v, pos, scale=0.1,
                              tickets=jnp.zeros((2, 3), jnp.int32))
    assert impl.name == "xla" and "tickets" in str(choice)
    cache = KVCache.create(num_layers=2, batch=2, kv_heads=2, capacity=48, head_dim=64, dtype=jnp.float32)
    kw = dict(ops=Ops(), scale=0.125, window=None, softcap=None, kv_len=None)
    got, plain = cache.write_attend(1, q, k_new, v_new, pos, **kw)
    got_t, carried = cache.with_tickets().write_attend(1, q, k_new, v_new, pos, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(got_t))
    assert plain.tickets is None and carried.tickets.shape == (2, 2)
    assert jax.tree.structure(carried.without_tickets()) == jax.tree.structure(plain)
