"""The paged KV cache (ferrum_jax.paged_cache), quantized caches and the user's cache choice
(ferrum_jax.kv_config.KVCacheConfig, the CLI's --kv-cache / --page-size / --kv-dtype).

Every generation here uses the tiny random fp32 Llama of conftest.py with three prompts of 5, 13
and 9 tokens (batch bucket 4, prompt bucket 16, capacity 128) unless a test says otherwise, so the
compiled programs are shared: one prefill/decode pair per kind of cache.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ferrum_jax as fj
from ferrum_jax.cache import KVCache, quantize_kv
from ferrum_jax.cli import main
from ferrum_jax.compile_log import count_compiles
from ferrum_jax.errors import ConfigError
from ferrum_jax.generate import Generation, _forward, decode, prefill
from ferrum_jax.kv_config import KVCacheConfig
from ferrum_jax.paged_cache import PageAllocator, PagedKVCache
from ferrum_jax.sampling import GREEDY
from ferrum_jax.sharding import make_mesh, shard_model

NEW_TOKENS = 20
FLOAT = KVCacheConfig()


PAGED_DECODE_IMPL = "pallas_paged_decode" if jax.default_backend() == "gpu" else "xla"


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() sets the ferrum_jax logger level (DEBUG with -v); put it back."""
    import logging

    logger = logging.getLogger("ferrum_jax")
    level = logger.level
    yield
    logger.setLevel(level)


def ids(n: int, start: int = 0) -> list[int]:
    """n ordinary (non-special) token ids of the tiny vocabulary (as in test_generate.py)."""
    return [4 + (start + 37 * i + 11) % 380 for i in range(n)]


PROMPTS = [ids(5), ids(13, start=3), ids(9, start=7)]


def paged(page_size: int = 16, **kw) -> KVCacheConfig:
    """A paged cache whose pages are scattered: a pool larger than needed, handed out shuffled."""
    kw.setdefault("shuffle_seed", page_size)
    return KVCacheConfig(layout="paged", page_size=page_size, **kw)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Greedy tokens of PROMPTS with the contiguous float cache (no row stops early)."""
    outs = fj.generate(tiny_model, PROMPTS, max_tokens=NEW_TOKENS)
    assert all(len(o.token_ids) == NEW_TOKENS for o in outs)
    return outs


@partial(jax.jit, static_argnames=("cfg", "ops"))
def _forced_logits(weights, cache, tokens, lengths, forced, *, cfg, ops):
    """float32 [steps + 1, batch, vocab]: the next-token logits after each prompt (a prefill into
    `cache`), then after each of `forced` [batch, steps] fed one token at a time (teacher forcing:
    every cache sees the same token history, so logits compare step by step)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    first, cache = _forward(weights, tokens, positions, cache, cfg, ops, kv_len=t, logits_at=lengths - 1)

    def step(cache, x):
        tok, pos = x
        logits, cache = _forward(weights, tok[:, None], pos[:, None], cache, cfg, ops)
        return cache, logits[:, 0]

    pos = lengths[None, :] + jnp.arange(forced.shape[1], dtype=jnp.int32)[:, None]
    _, rest = jax.lax.scan(step, cache, (forced.T, pos))
    return jnp.concatenate([first[:, 0][None], rest])


def forced_logits(model, kv_cache: KVCacheConfig, reference) -> np.ndarray:
    cfg = model.config
    tokens = np.zeros((len(PROMPTS), 16), np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in PROMPTS], np.int32)
    forced = np.array([o.token_ids[:-1] for o in reference], np.int32)
    cache = kv_cache.create(num_layers=cfg.num_layers, batch=len(PROMPTS), kv_heads=cfg.num_kv_heads, capacity=48,
                            head_dim=cfg.head_dim, dtype=model.dtype)
    return np.asarray(_forced_logits(model.weights, cache, tokens, lengths, forced, cfg=cfg, ops=model.ops))


@pytest.fixture(scope="module")
def float_logits(tiny_model, reference):
    logits = forced_logits(tiny_model, FLOAT, reference)
    assert (logits.argmax(-1).T == np.array([o.token_ids for o in reference])).all()  # the helper is greedy's run
    return logits


# ---------------------------------------------------------------------------------------------
# The page allocator and PagedKVCache against KVCache on random data


def test_page_allocator():
    alloc = PageAllocator(10, shuffle=True, seed=3)
    table = alloc.page_table(2, 3)
    assert table.shape == (2, 3) and table.dtype == np.int32
    assert len(set(table.ravel().tolist())) == 6 and alloc.num_free == 4
    assert table.ravel().tolist() != sorted(table.ravel().tolist()), "shuffled pages came out in order"
    assert PageAllocator(10).page_table(2, 3).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ConfigError, match="has 4 free pages of 10; 2 sequences x 3 pages need 6"):
        alloc.page_table(2, 3)
    alloc.release(table[0])
    free = {*table[0].tolist(), *set(range(10)) - set(table.ravel().tolist())}
    assert alloc.num_free == 7 and set(alloc.allocate(7)) == free
    with pytest.raises(ValueError, match="page 12 is not an allocated page"):
        alloc.release([12])


def _random_kv(key, b, t, kvh, d):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (b, t, kvh, d)) * 2.0, jax.random.normal(k2, (b, t, kvh, d))


@pytest.mark.parametrize("dtype", ["float32", "int8", "fp8"])
@pytest.mark.parametrize("page_size", [4, 16])
def test_write_attend_match_contiguous(dtype, page_size):
    """A prefill chunk, then single tokens (one row past the capacity: dropped), written to both
    caches: every slot holds the same codes/scales and every attend gives the same output."""
    b, kvh, h, d, capacity, layers = 3, 2, 4, 8, 32, 2
    store = KVCacheConfig(dtype=None if dtype == "float32" else dtype).storage_dtype(jnp.float32)
    shape = dict(num_layers=layers, batch=b, kv_heads=kvh, capacity=capacity, head_dim=d, dtype=store)
    ref = KVCache.create(**shape)
    cache = PagedKVCache.create(**shape, page_size=page_size, num_pages=3 * capacity // page_size + 5, shuffle=True,
                                seed=1)
    assert (cache.capacity, cache.batch, cache.quantized) == (capacity, b, dtype != "float32")
    ops, key = fj.DEFAULT_OPS, jax.random.PRNGKey(0)
    attn = dict(ops=ops, scale=d ** -0.5, window=None, softcap=None)

    # prefill of 11 tokens in rows of lengths 11, 7, 3 (padding slots written too, as generate does)
    k, v = _random_kv(key, b, 11, kvh, d)
    positions = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (b, 11))
    q = jax.random.normal(jax.random.PRNGKey(1), (b, 11, h, d))
    for layer in range(layers):
        ref, cache = ref.write(layer, k + layer, v, positions), cache.write(layer, k + layer, v, positions)
        for kv_len in (11, None):
            np.testing.assert_allclose(cache.attend(layer, q, positions, kv_len=kv_len, **attn),
                                       ref.attend(layer, q, positions, kv_len=kv_len, **attn), rtol=1e-6, atol=1e-6)

    # decode steps at each row's own position; row 2 also writes at the capacity (dropped)
    pos = jnp.array([11, 7, 3], jnp.int32)
    for i in range(4):
        k, v = _random_kv(jax.random.PRNGKey(10 + i), b, 1, kvh, d)
        step = jnp.stack([pos[0] + i, pos[1] + i, jnp.int32(capacity if i == 2 else 3 + i)])[:, None]
        q = jax.random.normal(jax.random.PRNGKey(20 + i), (b, 1, h, d))
        for layer in range(layers):
            ref, cache = ref.write(layer, k, v, step), cache.write(layer, k, v, step)
            np.testing.assert_allclose(cache.attend(layer, q, step, kv_len=None, **attn),
                                       ref.attend(layer, q, step, kv_len=None, **attn), rtol=1e-6, atol=1e-6)

    # the pages, gathered through the page table, are the contiguous slots exactly
    table = np.asarray(cache.page_table)
    for name in ("k", "v", "k_scale", "v_scale"):
        for layer in range(layers):
            if getattr(ref, name) is None:
                assert getattr(cache, name) is None
                continue
            pages = np.asarray(getattr(cache, name)[layer]).astype(np.float32)
            gathered = np.moveaxis(pages[table], 2, 1)  # [b, kv_heads, pages_per_seq, page_size, ...]
            gathered = gathered.reshape(b, kvh, capacity, *gathered.shape[4:])
            np.testing.assert_array_equal(gathered, np.asarray(getattr(ref, name)[layer]).astype(np.float32))
    # pages outside every sequence's table were never written
    unused = sorted(set(range(cache.num_pages)) - set(table.ravel().tolist()))
    assert len(unused) == 5 and not np.asarray(cache.k[0])[unused].any()


def test_paged_cache_is_a_pytree_with_static_shapes():
    cache = PagedKVCache.create(num_layers=2, batch=2, kv_heads=2, capacity=20, head_dim=4, dtype=jnp.int8,
                                page_size=8)
    assert cache.capacity == 24 and cache.pages_per_seq == 3 and cache.num_pages == 6  # whole pages
    leaves, tree = jax.tree_util.tree_flatten(cache)
    assert len(leaves) == 9  # k, v, k_scale, v_scale per layer + the shared page table
    assert cache.nbytes == sum(a.nbytes for a in leaves)
    again = jax.tree_util.tree_unflatten(tree, leaves)
    assert again.page_table is cache.page_table
    assert jax.jit(lambda c: c.capacity + 0 * c.page_table.sum())(cache) == 24


# ---------------------------------------------------------------------------------------------
# generate: paged equals contiguous


@pytest.mark.parametrize("kv_cache", [paged(16, num_pages=40), paged(4, num_pages=150)], ids=["page16", "page4"])
def test_paged_generate_equals_contiguous(tiny_model, reference, float_logits, kv_cache):
    outs = fj.generate(tiny_model, PROMPTS, max_tokens=NEW_TOKENS, kv_cache=kv_cache)
    for row, (o, r) in enumerate(zip(outs, reference)):
        assert (o.token_ids, o.text, o.finish_reason) == (r.token_ids, r.text, r.finish_reason), f"row {row}"
    logits = forced_logits(tiny_model, kv_cache, reference)
    np.testing.assert_allclose(logits, float_logits, rtol=0, atol=1e-5)


def test_paged_capacity_rounds_to_whole_pages(tiny_model):
    """capacity=50 in pages of 16 is 64 slots: generation runs to the token at position 64, as the
    contiguous cache of capacity 64 does, token for token."""
    prompt, kv_cache = ids(13, start=3), paged(16)
    run = Generation(tiny_model, [prompt], max_tokens=100, sampling=GREEDY, chat=False, stop_token_ids=(),
                     capacity=50, chunk=None, kv_cache=kv_cache)
    assert run.capacity == 64
    out = fj.generate(tiny_model, prompt, max_tokens=100, capacity=50, kv_cache=kv_cache)
    ref = fj.generate(tiny_model, prompt, max_tokens=100, capacity=64)
    assert out.token_ids == ref.token_ids and out.finish_reason == ref.finish_reason
    if out.finish_reason == "length":
        assert len(out.token_ids) == 64 - len(prompt) + 1


def test_paged_stream_equals_generate(tiny_model):
    kv_cache = paged(4, num_pages=200)
    ref = fj.generate(tiny_model, "Hello world", max_tokens=12, kv_cache=kv_cache)
    assert ref.token_ids == fj.generate(tiny_model, "Hello world", max_tokens=12).token_ids
    parts = list(fj.stream(tiny_model, "Hello world", max_tokens=12, chunk=3, kv_cache=kv_cache))
    assert "".join(parts) == ref.text


def test_paged_cache_is_donated_and_page_order_does_not_recompile(tiny_model, reference):
    m, cfg = tiny_model, tiny_model.config
    run = Generation(m, PROMPTS, max_tokens=4, sampling=GREEDY, chat=False, stop_token_ids=(), capacity=None,
                     chunk=None, kv_cache=paged(16))
    cache = paged(16).create(num_layers=cfg.num_layers, batch=run.batch, kv_heads=cfg.num_kv_heads,
                             capacity=run.capacity, head_dim=cfg.head_dim, dtype=m.dtype)
    table = np.asarray(cache.page_table).tolist()
    state, cache2 = prefill(m.weights, cache, jnp.asarray(run.tokens), jnp.asarray(run.lengths), run.params,
                            jnp.asarray(run.max_new), jnp.asarray(run.stop_ids), run.key, cfg=cfg, ops=m.ops)
    jax.block_until_ready(cache2)
    assert all(a.is_deleted() for a in jax.tree_util.tree_leaves(cache)), "prefill kept a copy of the paged cache"
    _, cache3 = decode(m.weights, cache2, state, run.params, jnp.int32(3), cfg=cfg, ops=m.ops)
    jax.block_until_ready(cache3)
    assert all(a.is_deleted() for a in jax.tree_util.tree_leaves(cache2)), "decode kept a copy of the paged cache"
    assert isinstance(cache3, PagedKVCache)
    assert np.asarray(cache3.page_table).tolist() == table, "the page table changed"

    fj.generate(m, PROMPTS, max_tokens=6, kv_cache=paged(16, num_pages=40))  # warm (or compile) these shapes
    with count_compiles() as log:
        out = fj.generate(m, PROMPTS[::-1], max_tokens=9, kv_cache=paged(16, num_pages=40, shuffle_seed=99))
    assert log.compiles == 0, f"another page order / prompt set recompiled: {log}"
    assert out[2].token_ids == reference[0].token_ids[:9]
    assert out[0].stats.dispatch.get("paged_attention") == PAGED_DECODE_IMPL


# ---------------------------------------------------------------------------------------------
# Quantized caches (int8, fp8): contiguous and paged
#
# The bound. A cached key/value vector x (one token, one kv head) is stored as codes * scale with
# scale = max|x| / code_max. The rounding error per element, as RMS over a vector:
#   int8: uniform over a step of max|x| / 127: RMS = max|x| / (127 * sqrt(12)) ~= max|x| / 440;
#   fp8 e4m3 (3 mantissa bits): relative to the element itself, RMS ~= 2^-3 / sqrt(12) * 0.72 ~= |x| / 38
#     (0.72: the mean of 1/mantissa over [1, 2)), and for 16-wide heads rms|x| ~= max|x| / 2.5, so
#     ~= max|x| / 95.
# (test_kv_rounding_error checks these e on Gaussian vectors; this model's cached K/V give 1/457, 1/97.)
# To first order the logits move linearly in these errors: |logits_q - logits| <= G * e * max|logits|
# per step and row, where G is the network's gain from a relative K/V change to a relative logit
# change (the error enters the scores through q.k * scale and the output through the convex
# combination of values, then wo, the MLP, the second layer and lm_head). G has no closed form for a
# random network; on this model it measures 17 (int8) and 23 (fp8): close, which supports the error
# model. G = 40 leaves a 1.7x margin, and still fails on a real bug: a misplaced or mis-scaled entry
# changes logits by O(max|logits|), i.e. G of order 1/e >= 95.
# A greedy token can flip only at a step whose float top-2 margin is below twice the error; this
# random model has such near-ties (margins down to 0.01), so "most steps" agree: >= 85% (int8),
# >= 75% (fp8) of the 63 teacher-forced steps (measured 94% and 89%).
KV_ERROR = {"int8": 1 / 440, "fp8": 1 / 95}
GAIN = 40
MIN_AGREEMENT = {"int8": 0.85, "fp8": 0.75}


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_kv_rounding_error(dtype):
    """The RMS rounding error of quantize_kv on 16-wide Gaussian vectors, relative to max|x|, is the
    e the bound below uses (within 15%)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4096, 16))
    codes, scale = quantize_kv(x, KVCacheConfig(dtype=dtype).storage_dtype(jnp.float32))
    err = codes.astype(jnp.float32) * scale[:, None] - x
    e = float(jnp.mean(jnp.sqrt(jnp.mean(err ** 2, axis=-1))) / jnp.mean(jnp.max(jnp.abs(x), axis=-1)))
    assert 0.85 * KV_ERROR[dtype] <= e <= 1.15 * KV_ERROR[dtype], f"e = 1/{1 / e:.0f}"


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_quantized_cache_close_to_float(tiny_model, reference, float_logits, dtype, layout):
    kv_cache = paged(16, dtype=dtype) if layout == "paged" else KVCacheConfig(dtype=dtype)
    logits = forced_logits(tiny_model, kv_cache, reference)
    scale = np.abs(float_logits).max(axis=-1, keepdims=True)
    error = np.abs(logits - float_logits)
    assert (error <= GAIN * KV_ERROR[dtype] * scale).all(), \
        f"max error {error.max():.3f} = {(error / scale).max() / KV_ERROR[dtype]:.1f} x e x max|logits|"
    agree = (logits.argmax(-1) == float_logits.argmax(-1)).mean()
    assert agree >= MIN_AGREEMENT[dtype], f"greedy agrees with the float cache at {agree:.0%} of the steps"

    # Free running: the first tokens equal the float run's (later ones may diverge after a near-tie).
    outs = fj.generate(tiny_model, PROMPTS, max_tokens=NEW_TOKENS, kv_cache=kv_cache)
    for o, r in zip(outs, reference):
        assert o.token_ids[:8] == r.token_ids[:8]
    if layout == "paged":  # the same codes in scattered pages: equal to the contiguous quantized cache
        contiguous = fj.generate(tiny_model, PROMPTS, max_tokens=NEW_TOKENS, kv_cache=KVCacheConfig(dtype=dtype))
        assert [o.token_ids for o in outs] == [c.token_ids for c in contiguous]
        np.testing.assert_allclose(logits, forced_logits(tiny_model, KVCacheConfig(dtype=dtype), reference),
                                   rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Configuration errors and the CLI


@pytest.mark.parametrize("kw,message", [
    (dict(layout="blocked"), "KVCacheConfig.layout='blocked' is not one of 'contiguous', 'paged'"),
    (dict(layout="paged", page_size=12), "KVCacheConfig.page_size=12 must be a power of two from 1 to 1024"),
    (dict(layout="paged", page_size=0), "KVCacheConfig.page_size=0 must be a power of two"),
    (dict(layout="paged", page_size=2048), "KVCacheConfig.page_size=2048 must be a power of two from 1 to 1024"),
    (dict(layout="paged", page_size=16.0), "KVCacheConfig.page_size=16.0 must be a power of two"),
    (dict(dtype="int4"), "KVCacheConfig.dtype='int4' is not one of None \\(the model's dtype\\), 'int8', 'fp8'"),
    (dict(dtype="bf16"), "KVCacheConfig.dtype='bf16' is not one of"),
    (dict(layout="paged", num_pages=0), "KVCacheConfig.num_pages=0 must be a positive int"),
    (dict(num_pages=8), "num_pages and shuffle_seed are for layout='paged' only"),
])
def test_bad_cache_config(kw, message):
    with pytest.raises(ConfigError, match=message):
        KVCacheConfig(**kw)


def test_cache_config_values():
    assert KVCacheConfig(dtype="auto") == KVCacheConfig() and KVCacheConfig().is_default
    assert hash(paged(16)) == hash(paged(16))
    assert KVCacheConfig(layout="paged", page_size=16).capacity(50) == 64 and KVCacheConfig().capacity(50) == 50
    assert KVCacheConfig(dtype="fp8").storage_dtype(jnp.bfloat16) == jnp.float8_e4m3fn
    assert KVCacheConfig().storage_dtype(jnp.bfloat16) == jnp.bfloat16


def test_bad_cache_config_in_generate(tiny_model):
    with pytest.raises(ConfigError, match="KVCacheConfig.num_pages=10 is too few: 4 sequences x 8 pages of 16"):
        fj.generate(tiny_model, PROMPTS, max_tokens=4, kv_cache=paged(16, num_pages=10))
    with pytest.raises(ConfigError, match="kv_cache must be a KVCacheConfig, got str"):
        fj.generate(tiny_model, "Hello", max_tokens=4, kv_cache="paged")


def test_mesh_refuses_paged_and_quantized_caches(tiny_model):
    sharded = shard_model(tiny_model, make_mesh(tp=1, dp=1))
    for kv_cache in (paged(16), KVCacheConfig(dtype="int8")):
        with pytest.raises(ConfigError, match="a model on a device mesh runs only the contiguous cache in the "
                                              "model's dtype"):
            fj.generate(sharded, "Hello", max_tokens=4, kv_cache=kv_cache)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_paged_int8(tiny_model, tiny_model_dir, capsys):
    expected = fj.generate(tiny_model, "Hello world", max_tokens=8,
                           kv_cache=KVCacheConfig(layout="paged", page_size=8, dtype="int8")).text
    code, out, err = _cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "Hello world", "--max-tokens", 8,
                          "--dtype", "float32", "--kv-cache", "paged", "--page-size", 8, "--kv-dtype", "int8", "-v")
    assert code == 0, err
    assert out == expected + "\n"
    assert f"paged_attention={PAGED_DECODE_IMPL}" in err


@pytest.mark.parametrize("flags,fragment", [
    (["--kv-cache", "paged", "--page-size", "24"], "--page-size=24 must be a power of two from 1 to 1024"),
    (["--kv-cache", "paged", "--tp", "2"], "a sharded model (--tp/--dp/--ep) runs only the contiguous cache"),
    (["--kv-dtype", "int8", "--dp", "2"], "--kv-cache contiguous --kv-dtype int8: a sharded model"),
])
def test_cli_bad_cache_flags(tiny_model_dir, capsys, flags, fragment):
    code, out, err = _cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "Hi", "--dtype", "float32", *flags)
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err


def test_cli_rejects_unknown_layout_and_dtype(tiny_model_dir, capsys):
    for flags in (["--kv-cache", "blocked"], ["--kv-dtype", "int4"]):
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(tiny_model_dir), "--prompt", "Hi", *flags])
        assert e.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
