"""Tests of ferrum_jax.sampling against transformers' logits processors and a numpy reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ferrum_jax.errors import SamplingError
from ferrum_jax.sampling import (
    GREEDY,
    SamplingArrays,
    SamplingParams,
    process_logits,
    sample,
    update_seen,
)

process_jit = jax.jit(process_logits)
sample_jit = jax.jit(sample)


# ----------------------------------------------------------------------------------------------
# References


def hf_row(logits: np.ndarray, seen: np.ndarray | None, p: SamplingParams) -> np.ndarray:
    """One row through transformers' processors, added only when active (as generate() does)."""
    procs = LogitsProcessorList()
    seen_ids = np.flatnonzero(seen) if seen is not None else np.zeros(0, np.int64)
    if p.repetition_penalty != 1.0 and seen_ids.size:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if not p.greedy:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(p.temperature)))
        if p.top_k > 0:
            procs.append(TopKLogitsWarper(int(p.top_k)))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(float(p.top_p)))
        if p.min_p > 0.0:
            procs.append(MinPLogitsWarper(float(p.min_p)))
    input_ids = torch.from_numpy(seen_ids.astype(np.int64))[None, :]
    scores = torch.from_numpy(logits.astype(np.float32).copy())[None, :]
    with torch.no_grad():
        return procs(input_ids, scores)[0].numpy()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def numpy_row(logits: np.ndarray, seen: np.ndarray | None, p: SamplingParams) -> np.ndarray:
    """The same pipeline written from the HF docs with numpy: argsort + scatter, float32."""
    x = logits.astype(np.float32).copy()
    if seen is not None:
        r = np.float32(p.repetition_penalty)
        x[seen] = np.where(x[seen] < 0, x[seen] * r, x[seen] / r)
    if p.greedy:
        return x
    x = x / np.float32(p.temperature)
    if p.top_k > 0:
        k = min(p.top_k, x.size)
        kth = np.sort(x)[::-1][k - 1]
        x[x < kth] = -np.inf
    if p.top_p < 1.0:
        order = np.argsort(x)  # ascending
        cum = np.cumsum(_softmax(x[order]))
        remove_sorted = cum <= np.float32(1 - p.top_p)
        remove_sorted[-1] = False
        remove = np.zeros(x.size, bool)
        remove[order] = remove_sorted
        x[remove] = -np.inf
    if p.min_p > 0.0:
        probs = _softmax(x)
        x[probs < p.min_p * probs.max()] = -np.inf
    return x


def random_params(rng: np.random.Generator, vocab: int) -> SamplingParams:
    """A random mix of settings, with the edge cases (top_k=1, tiny top_p, min_p=1) well represented."""
    return SamplingParams(
        # Greedy rows keep their (ignored) filter settings: only the penalty may touch them.
        temperature=float(rng.choice([0.0, 1.0, 0.3, 0.7, 1.5, 2.0])),
        top_k=int(rng.choice([0, 0, 1, 2, 5, 17, vocab - 1, vocab, vocab + 10])),
        top_p=float(rng.choice([1.0, 1.0, 1e-6, 1e-8, 0.1, 0.5, 0.9, 0.95, rng.uniform(0.05, 1.0)])),
        min_p=float(rng.choice([0.0, 0.0, 0.02, 0.1, 0.5, 1.0, rng.uniform(0, 0.3)])),
        repetition_penalty=float(rng.choice([1.0, 1.0, 1.2, 2.0, 0.8])),
    )


def assert_same_survivors(got: np.ndarray, want: np.ndarray, what: str) -> None:
    kept_got, kept_want = np.isfinite(got), np.isfinite(want)
    np.testing.assert_array_equal(kept_got, kept_want, err_msg=f"{what}: kept sets differ")
    assert np.all(got[~kept_got] == -np.inf), what
    np.testing.assert_allclose(got[kept_got], want[kept_want], rtol=1e-5, atol=1e-5, err_msg=what)


# ----------------------------------------------------------------------------------------------
# process_logits


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_process_logits_matches_transformers_and_numpy(seed):
    rng = np.random.default_rng(seed)
    batch, vocab = 96, 160
    scale = rng.choice([0.5, 2.0, 5.0], size=(batch, 1))
    logits = (rng.standard_normal((batch, vocab)) * scale).astype(np.float32)
    seen = rng.random((batch, vocab)) < 0.2
    params = [random_params(rng, vocab) for _ in range(batch)]
    arrays = SamplingArrays.from_params(params)

    got = np.asarray(process_jit(jnp.asarray(logits), arrays, jnp.asarray(seen)))
    assert got.shape == (batch, vocab) and got.dtype == np.float32
    for i, p in enumerate(params):
        what = f"row {i} {p}"
        assert np.isfinite(got[i]).any(), what
        assert_same_survivors(got[i], hf_row(logits[i], seen[i], p), "transformers " + what)
        assert_same_survivors(got[i], numpy_row(logits[i], seen[i], p), "numpy " + what)


def test_process_logits_without_seen_and_edge_settings():
    rng = np.random.default_rng(7)
    vocab = 50
    params = [
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0),
        SamplingParams(top_k=vocab + 5, top_p=1.0, min_p=0.0),
        SamplingParams(temperature=0.5, top_k=3, top_p=0.5, min_p=0.2),
        GREEDY,
        SamplingParams(top_p=1e-8),  # 1 - top_p rounds to 1 in float32: only the keep-one rule is left
    ]
    logits = rng.standard_normal((len(params), vocab)).astype(np.float32)
    logits[3] *= 80  # most probabilities underflow to 0, which top_p=1 (off) must not remove
    got = np.asarray(process_jit(jnp.asarray(logits), SamplingArrays.from_params(params), None))
    for i, p in enumerate(params):
        assert_same_survivors(got[i], hf_row(logits[i], None, p), f"row {i} {p}")
    # top_k=1, tiny top_p and min_p=1 all leave exactly the argmax.
    for i in [0, 1, 2, 6]:
        assert np.flatnonzero(np.isfinite(got[i])).tolist() == [int(np.argmax(logits[i]))]
    assert np.isfinite(got[3]).all()  # everything off
    np.testing.assert_array_equal(got[5], logits[5])  # greedy rows are untouched without a penalty


# ----------------------------------------------------------------------------------------------
# sample: distribution


def _check_frequencies(tokens: np.ndarray, expected: np.ndarray, what: str) -> None:
    n = tokens.size
    freq = np.bincount(tokens, minlength=expected.size) / n
    assert np.all(freq[expected == 0] == 0), f"{what}: drew a masked token"
    # Each frequency is a binomial mean: allow 5 standard deviations (plus a hair for float error).
    tol = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-6
    bad = np.abs(freq - expected) > tol
    assert not bad.any(), f"{what}: freq {freq[bad]} vs expected {expected[bad]} (tol {tol[bad]})"


def test_sample_distribution_matches_renormalised_probs():
    rng = np.random.default_rng(11)
    vocab, n = 24, 60_000
    row = (rng.standard_normal(vocab) * 1.5).astype(np.float32)
    seen_row = np.zeros(vocab, bool)
    seen_row[[int(np.argmax(row)), 3, 5]] = True
    configs = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
    ]
    # One big batch, rows cycling through the configs: exercises per-row params and per-row keys.
    which = np.arange(n) % len(configs)
    params = SamplingArrays.from_params([configs[j] for j in which])
    logits = jnp.broadcast_to(jnp.asarray(row), (n, vocab))
    seen = jnp.broadcast_to(jnp.asarray(seen_row), (n, vocab))
    tokens = np.asarray(sample_jit(logits, jax.random.key(0), params, seen))
    assert tokens.dtype == np.int32 and tokens.shape == (n,)

    for j, p in enumerate(configs):
        expected = np.exp(np.float64(hf_row(row, seen_row, p)))
        if p.greedy:
            expected = np.eye(vocab)[np.argmax(expected)]
        expected /= expected.sum()
        _check_frequencies(tokens[which == j], expected, f"config {p}")


def test_sample_distribution_vmapped_over_keys():
    rng = np.random.default_rng(12)
    vocab, n = 12, 40_000
    row = rng.standard_normal(vocab).astype(np.float32)
    p = SamplingParams(temperature=0.9, top_k=8, min_p=0.1)
    params = SamplingArrays.from_params([p])
    keys = jax.random.split(jax.random.key(3), n)
    draw = jax.jit(jax.vmap(lambda k: sample(jnp.asarray(row)[None], k, params)[0]))
    tokens = np.asarray(draw(keys))
    expected = np.exp(np.float64(hf_row(row, None, p)))
    _check_frequencies(tokens, expected / expected.sum(), f"vmapped {p}")


# ----------------------------------------------------------------------------------------------
# sample: determinism and greedy


def test_seeded_reproducibility():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.standard_normal((64, 50)).astype(np.float32))
    params = SamplingArrays.from_params([SamplingParams(temperature=1.0, top_p=0.95)] * 64)
    a = np.asarray(sample_jit(logits, jax.random.key(1), params))
    b = np.asarray(sample_jit(logits, jax.random.key(1), params))
    c = np.asarray(sample_jit(logits, jax.random.key(2), params))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # Legacy uint32 keys work too.
    d = np.asarray(sample_jit(logits, jax.random.PRNGKey(1), params))
    np.testing.assert_array_equal(d, np.asarray(sample_jit(logits, jax.random.PRNGKey(1), params)))


def test_greedy_is_argmax_of_penalised_logits_and_fast_path_agrees():
    rng = np.random.default_rng(6)
    batch, vocab = 16, 40
    logits = rng.standard_normal((batch, vocab)).astype(np.float32)
    seen = rng.random((batch, vocab)) < 0.3
    greedy = [SamplingParams(temperature=0.0, repetition_penalty=float(r)) for r in rng.choice([1.0, 1.5, 3.0], batch)]
    want = np.array([np.argmax(numpy_row(logits[i], seen[i], p)) for i, p in enumerate(greedy)])

    # All greedy: the cond's fast path.
    fast = np.asarray(sample_jit(jnp.asarray(logits), jax.random.key(0), SamplingArrays.from_params(greedy), jnp.asarray(seen)))
    np.testing.assert_array_equal(fast, want)

    # One sampled row added: the general path, whose greedy rows must agree.
    extra = rng.standard_normal((1, vocab)).astype(np.float32)
    mixed = SamplingArrays.from_params(greedy + [SamplingParams(temperature=1.0)])
    general = sample_jit(
        jnp.asarray(np.concatenate([logits, extra])),
        jax.random.key(0),
        mixed,
        jnp.asarray(np.concatenate([seen, np.zeros((1, vocab), bool)])),
    )
    np.testing.assert_array_equal(np.asarray(general)[:batch], want)

    # No penalty: plain argmax.
    plain = sample_jit(jnp.asarray(logits), jax.random.key(0), SamplingArrays.from_params([GREEDY] * batch))
    np.testing.assert_array_equal(np.asarray(plain), logits.argmax(-1))


# ----------------------------------------------------------------------------------------------
# update_seen


def test_update_seen():
    seen = jnp.zeros((2, 6), bool)
    seen = update_seen(seen, jnp.array([1, 4], jnp.int32))
    assert np.argwhere(np.asarray(seen)).tolist() == [[0, 1], [1, 4]]

    prompt = jnp.array([[0, 2, 2, 9], [5, -1, 3, 3]], jnp.int32)  # 9 and -1 are out of range
    valid = jnp.array([[True, True, True, True], [True, True, False, False]])
    got = np.asarray(update_seen(jnp.zeros((2, 6), bool), prompt, valid))
    want = np.zeros((2, 6), bool)
    want[0, [0, 2]] = True
    want[1, 5] = True
    np.testing.assert_array_equal(got, want)

    masked = update_seen(jnp.zeros((2, 6), bool), jnp.array([1, 2]), jnp.array([False, True]))
    assert np.argwhere(np.asarray(masked)).tolist() == [[1, 2]]


# ----------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("top_k", 2**31),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.2),
        ("top_p", math.nan),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("min_p", math.nan),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", math.nan),
        ("seed", -1),
        ("seed", 2**32),
        ("seed", 1.0),
    ],
)
def test_validation_errors(field, value):
    p = SamplingParams(**{field: value})
    with pytest.raises(SamplingError) as err:
        p.validate()
    msg = str(err.value)
    assert field in msg and repr(value) in msg and "allowed" in msg and "\n" not in msg
    with pytest.raises(SamplingError):
        SamplingArrays.from_params([SamplingParams(), p])


def test_valid_params():
    for p in [
        SamplingParams(),
        GREEDY,
        SamplingParams(temperature=0, top_k=0, top_p=1, min_p=1, repetition_penalty=0.5, seed=2**32 - 1),
        SamplingParams(temperature=np.float32(0.5), top_k=np.int64(4), top_p=np.float64(0.3)),
    ]:
        assert p.validate() is p
    assert GREEDY.greedy and SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    arrays = SamplingArrays.from_params([SamplingParams(top_k=3), GREEDY])
    assert arrays.top_k.dtype == jnp.int32 and arrays.temperature.dtype == jnp.float32
    assert all(leaf.shape == (2,) for leaf in jax.tree_util.tree_leaves(arrays))
    assert len(jax.tree_util.tree_leaves(arrays)) == 5


# ----------------------------------------------------------------------------------------------
# Inside a jitted decode loop, without recompiling


def test_sample_in_while_loop_does_not_recompile():
    batch, vocab, steps = 4, 64, 6
    table = jax.random.normal(jax.random.key(0), (vocab, vocab), jnp.float32) * 3

    @jax.jit
    def decode(table, first, params, key):
        seen0 = update_seen(jnp.zeros((batch, vocab), bool), first)
        out0 = jnp.zeros((batch, steps), jnp.int32)

        def body(state):
            i, last, seen, key, out = state
            key, sub = jax.random.split(key)
            tok = sample(table[last], sub, params, seen)
            return i + 1, tok, update_seen(seen, tok), key, out.at[:, i].set(tok)

        state = (jnp.int32(0), first, seen0, key, out0)
        return jax.lax.while_loop(lambda s: s[0] < steps, body, state)[4]

    first = jnp.array([0, 5, 9, 63], jnp.int32)
    key = jax.random.key(42)
    settings = [
        [SamplingParams(), GREEDY, SamplingParams(top_k=5, top_p=0.9), SamplingParams(min_p=0.2, repetition_penalty=1.3)],
        [GREEDY] * batch,  # the all-greedy branch, at run time
        [SamplingParams(temperature=0.3, top_k=1)] * batch,
        [SamplingParams(temperature=2.0, top_p=0.5, min_p=0.1, repetition_penalty=0.7)] * 2 + [GREEDY] * 2,
    ]
    all_arrays = [SamplingArrays.from_params(s) for s in settings]
    jax.block_until_ready(all_arrays)

    compiles = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outs = [np.asarray(decode(table, first, arrays, key)) for arrays in all_arrays]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiles) == 1, f"decode compiled {len(compiles)} times"

    # The all-greedy run follows the argmax chain (with no penalty, GREEDY's default).
    t = np.asarray(table)
    last = np.asarray(first)
    for i in range(steps):
        last = t[last].argmax(-1)
        np.testing.assert_array_equal(outs[1][:, i], last)
    # top_k=1 is greedy too, whatever the temperature.
    np.testing.assert_array_equal(outs[2], outs[1])
    assert outs[0].min() >= 0 and outs[0].max() < vocab
