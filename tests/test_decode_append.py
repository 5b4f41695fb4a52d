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
