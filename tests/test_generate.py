"""End-to-end tests of ferrum_jax.generate / stream on the tiny random Llama of conftest.py.

Compilation dominates the run time on CPU, so nearly every test uses the same shapes: batch bucket 1,
prompt bucket 16 and the default cache capacity (128 = the tiny model's max_position_embeddings).
Other shapes, each used on purpose: prompt bucket 64 (the recompile test: keep it unique to that
test), prompt bucket 128 (cache-capacity test) and batch bucket 4 (batch tests). Chat prompts of the
CLI tests land in bucket 32.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ferrum_jax as fj
from ferrum_jax.cache import KVCache
from ferrum_jax.compile_log import count_compiles
from ferrum_jax.errors import (CheckpointError, FerrumError, ModelNotFoundError, PromptTooLongError,
                               SamplingError, UnsupportedArchitectureError)
from ferrum_jax.generate import Generation, decode, prefill
from ferrum_jax.sampling import GREEDY, SamplingParams

NEW_BUCKET_PROMPT_LEN = 40  # prompt bucket 64: used by test_new_prompt_bucket_compiles only
SAMPLED = dict(temperature=1.3, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=1.2)


def ids(n: int, start: int = 0) -> list[int]:
    """n ordinary (non-special) token ids of the tiny vocabulary (384 ids, 0-3 special)."""
    return [4 + (start + 37 * i + 11) % 380 for i in range(n)]


def greedy(model, prompt, n, **kw) -> fj.Completion:
    return fj.generate(model, prompt, max_tokens=n, **kw)


def drain(gen):
    """All chunks of a stream() generator and its return value."""
    parts = []
    while True:
        try:
            parts.append(next(gen))
        except StopIteration as end:
            return parts, end.value


# ---------------------------------------------------------------------------------------------
# Shape bucketing: no recompiles within a bucket


def test_same_bucket_does_not_recompile(tiny_model):
    greedy(tiny_model, ids(5), 4)  # warm-up: may compile (batch 1, prompt bucket 16)
    with count_compiles() as log:
        out = greedy(tiny_model, ids(9, start=3), 6)
    assert log.compiles == 0, f"a 9-token prompt after a 5-token one recompiled: {log}"
    assert out.stats.compiles == 0 and len(out.token_ids) <= 6

    # Other sampling settings, seed, stop ids and max_tokens are data, not shapes.
    with count_compiles() as log:
        fj.generate(tiny_model, "Hello there", max_tokens=3, stop_token_ids=[7, 8],
                    sampling=SamplingParams(seed=5, **SAMPLED))
    assert log.compiles == 0, f"new sampling settings / stop ids recompiled: {log}"


def test_new_prompt_bucket_compiles(tiny_model):
    greedy(tiny_model, ids(5), 2)  # make sure bucket 16 is warm, so only the new bucket can compile
    with count_compiles() as log:
        out = greedy(tiny_model, ids(NEW_BUCKET_PROMPT_LEN), 2)
    assert log.compiles >= 1, "a prompt in a new length bucket (64) compiled nothing: is the test order off?"
    assert out.stats.compiles >= 1 and out.stats.compile_seconds > 0


# ---------------------------------------------------------------------------------------------
# Correctness against transformers


def _torch_greedy(model_dir, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out, tokens = None, [list(prompt)]
    with torch.no_grad():
        for _ in range(n):  # plain argmax loop with transformers' own KV cache (no eos handling)
            out = hf(torch.tensor([tokens[-1]] if out else tokens), use_cache=True,
                     past_key_values=out.past_key_values if out else None)
            tokens.append([int(out.logits[0, -1].argmax())])
    return [t[0] for t in tokens[1:]]


def test_greedy_matches_transformers(tiny_model, tiny_model_dir):
    prompt = tiny_model.tokenizer.encode("The quick brown fox")
    out = greedy(tiny_model, prompt, 12)
    ref = _torch_greedy(tiny_model_dir, prompt, 12)
    eos = set(tiny_model.tokenizer.eos_token_ids)
    expected = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    assert out.token_ids == expected


def test_generation_up_to_cache_capacity(tiny_model, tiny_model_dir):
    """Capacity 128 < prompt + max_tokens: stops with "length" after the token at position 128 (the last
    one whose logits only need cache slots 0..127), and every token matches transformers."""
    prompt, capacity = ids(100), 128
    out = fj.generate(tiny_model, prompt, max_tokens=64, capacity=capacity)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == capacity - len(prompt) + 1
    assert out.token_ids == _torch_greedy(tiny_model_dir, prompt, len(out.token_ids))


# ---------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.parametrize("prompt", ["Hello world", "Café 日本語 😀"])
@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_stream_equals_generate(tiny_model, prompt, chunk):
    ref = greedy(tiny_model, prompt, 12)
    parts, done = drain(fj.stream(tiny_model, prompt, max_tokens=12, chunk=chunk))
    assert "".join(parts) == ref.text
    assert isinstance(done, fj.Completion)
    assert (done.text, done.token_ids, done.finish_reason) == (ref.text, ref.token_ids, ref.finish_reason)
    assert done.prompt_tokens == ref.prompt_tokens
    if chunk == 1:
        assert len(parts) > 2, "chunk=1 should stream text piece by piece"


def test_stream_equals_generate_sampled_and_stopped(tiny_model):
    sampling = SamplingParams(seed=11, **SAMPLED)
    ref = fj.generate(tiny_model, "Hello", max_tokens=10, sampling=sampling)
    parts, done = drain(fj.stream(tiny_model, "Hello", max_tokens=10, sampling=sampling, chunk=3))
    assert "".join(parts) == ref.text and done.token_ids == ref.token_ids

    full = greedy(tiny_model, "Hello", 10).token_ids
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i])
    parts, done = drain(fj.stream(tiny_model, "Hello", max_tokens=10, stop_token_ids=[full[k]], chunk=4))
    assert done.finish_reason == "stop" and done.token_ids == full[:k]
    assert "".join(parts) == done.text == tiny_model.tokenizer.decode(full[:k])


# ---------------------------------------------------------------------------------------------
# Batching


@pytest.mark.parametrize("n", [3, 4])
def test_batch_equals_single(tiny_model, n):
    prompts = [ids(3), "Hello world", ids(11, start=5), "Café 日本語"][:n]
    alone = [greedy(tiny_model, p, 8) for p in prompts]
    batch = fj.generate(tiny_model, prompts, max_tokens=8)
    assert isinstance(batch, list) and len(batch) == n
    for i, (b, a) in enumerate(zip(batch, alone)):
        assert (b.token_ids, b.text, b.finish_reason, b.prompt_tokens) == \
            (a.token_ids, a.text, a.finish_reason, a.prompt_tokens), f"row {i}"


def test_batch_row_stop_does_not_disturb_others(tiny_model):
    prompts = ["Hello world", ids(6), ids(9, start=2)]
    first = greedy(tiny_model, prompts[0], 8).token_ids
    stop = [first[2]] if first[2] not in first[:2] else [first[1]]
    alone = [greedy(tiny_model, p, 8, stop_token_ids=stop) for p in prompts]
    batch = fj.generate(tiny_model, prompts, max_tokens=8, stop_token_ids=stop)
    assert batch[0].finish_reason == "stop"
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    assert [b.finish_reason for b in batch] == [a.finish_reason for a in alone]


def test_batch_mixed_sampling_keeps_greedy_rows(tiny_model):
    prompts = ["Hello world", ids(6), ids(9, start=2)]
    alone = greedy(tiny_model, prompts[1], 8)
    mixed = fj.generate(tiny_model, prompts, max_tokens=8,
                        sampling=[SamplingParams(seed=1, **SAMPLED), GREEDY, SamplingParams(seed=2, **SAMPLED)])
    assert mixed[1].token_ids == alone.token_ids
    with pytest.raises(FerrumError, match="2 sampling settings for 3 prompts"):
        fj.generate(tiny_model, prompts, max_tokens=8, sampling=[GREEDY, GREEDY])


def test_batch_row_seed_is_used(tiny_model):
    def row1(seed):
        rows = [SamplingParams(seed=1, **SAMPLED), SamplingParams(seed=seed, **SAMPLED), GREEDY]
        return fj.generate(tiny_model, ["Hello world"] * 3, max_tokens=8, sampling=rows)[1].token_ids

    assert len({tuple(row1(s)) for s in (2, 3, 4, 5)}) > 1


# ---------------------------------------------------------------------------------------------
# Limits and stop tokens


def test_max_tokens_respected(tiny_model):
    for n in (1, 2, 7):
        out = greedy(tiny_model, "Hello world", n)
        assert len(out.token_ids) == n and out.finish_reason == "length"
        assert out.stats.generated_tokens == n
    assert greedy(tiny_model, "Hello world", 7).token_ids[:2] == greedy(tiny_model, "Hello world", 2).token_ids


def test_stop_token_ends_row(tiny_model):
    full = greedy(tiny_model, "Hello world", 10)
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    k = next(i for i in range(3, 10) if full.token_ids[i] not in full.token_ids[:i])
    stop = full.token_ids[k]
    out = greedy(tiny_model, "Hello world", 10, stop_token_ids=[stop])
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:k] and stop not in out.token_ids
    assert out.text == tiny_model.tokenizer.decode(full.token_ids[:k])
    assert out.stats.generated_tokens == k + 1  # the stop token was generated, just not returned


def test_stop_ids_include_generation_config_eos(tiny_model):
    assert tiny_model.tokenizer.eos_token_ids == (1,)  # generation_config.json's eos_token_id
    run = Generation(tiny_model, ["Hi"], max_tokens=4, sampling=GREEDY, chat=False, stop_token_ids=[9],
                     capacity=None, chunk=None)
    assert {1, 9} <= set(run.stop_ids.tolist())


# ---------------------------------------------------------------------------------------------
# Sampling


def test_seeded_sampling_is_reproducible(tiny_model):
    def run(seed):
        return fj.generate(tiny_model, "Hello world", max_tokens=16, sampling=SamplingParams(seed=seed, **SAMPLED))

    a, b = run(1), run(1)
    assert a.token_ids == b.token_ids and a.text == b.text
    others = [run(s).token_ids for s in (2, 3, 4)]
    assert any(o != a.token_ids for o in others), "different seeds gave identical samples"


# ---------------------------------------------------------------------------------------------
# Errors


def test_prompt_longer_than_capacity(tiny_model):
    with pytest.raises(PromptTooLongError, match=r"prompt of 20 tokens does not fit the KV cache capacity of 16"):
        fj.generate(tiny_model, ids(20), max_tokens=4, capacity=16)


def test_prompt_longer_than_context(tiny_model):
    with pytest.raises(PromptTooLongError, match=r"129 tokens exceeds .*128 \(max_position_embeddings\)"):
        fj.generate(tiny_model, ids(129), max_tokens=4)


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -3),
                                         ("min_p", 1.5), ("repetition_penalty", 0.0)])
def test_invalid_sampling(tiny_model, field, value):
    with pytest.raises(SamplingError, match=rf"{field}={value!r} is invalid"):
        fj.generate(tiny_model, "Hello", max_tokens=4, sampling=SamplingParams(**{field: value}))


def test_empty_prompts(tiny_model):
    with pytest.raises(FerrumError, match="prompt 0 is empty"):
        fj.generate(tiny_model, [[]], max_tokens=4)
    with pytest.raises(FerrumError, match="no prompts given"):
        fj.generate(tiny_model, [], max_tokens=4)
    with pytest.raises(FerrumError, match="max_tokens must be >= 1"):
        fj.generate(tiny_model, "Hello", max_tokens=0)


@pytest.mark.parametrize("bad", [384, -1, 10**9])
def test_token_id_out_of_vocabulary(tiny_model, bad):
    with pytest.raises(FerrumError, match=rf"token id {bad} is outside the vocabulary \[0, 384\)"):
        fj.generate(tiny_model, [5, bad, 6], max_tokens=4)


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        fj.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        fj.load(tmp_path / "empty")


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    d = _copy_with_config(tiny_model_dir, tmp_path / "m", architectures=["FancyNetForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError, match="'FancyNetForCausalLM' is not supported.*LlamaForCausalLM"):
        fj.load(d, progress=False)


def test_tensor_shape_mismatch(tiny_model_dir, tmp_path):
    d = _copy_with_config(tiny_model_dir, tmp_path / "m", intermediate_size=96)
    with pytest.raises(CheckpointError) as e:
        fj.load(d, progress=False)
    msg = str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and "(128, 64)" in msg and "(96, 64)" in msg, msg


# ---------------------------------------------------------------------------------------------
# Donation


def test_cache_and_state_are_donated(tiny_model):
    m, cfg = tiny_model, tiny_model.config
    run = Generation(m, [ids(5)], max_tokens=4, sampling=GREEDY, chat=False, stop_token_ids=(), capacity=None,
                     chunk=None)
    cache = KVCache.create(num_layers=cfg.num_layers, batch=run.batch, kv_heads=cfg.num_kv_heads,
                           capacity=run.capacity, head_dim=cfg.head_dim, dtype=m.dtype)
    state, cache2 = prefill(m.weights, cache, jnp.asarray(run.tokens), jnp.asarray(run.lengths), run.params,
                            jnp.asarray(run.max_new), jnp.asarray(run.stop_ids), run.key, cfg=cfg, ops=m.ops)
    jax.block_until_ready(cache2)
    assert all(a.is_deleted() for a in (*cache.k, *cache.v)), "prefill kept a copy of the input cache"
    assert not any(a.is_deleted() for a in (*cache2.k, *cache2.v))

    state2, cache3 = decode(m.weights, cache2, state, run.params, jnp.int32(3), cfg=cfg, ops=m.ops)
    jax.block_until_ready(cache3)
    assert all(a.is_deleted() for a in (*cache2.k, *cache2.v)), "decode kept a copy of the input cache"
    assert state.tokens.is_deleted() and state.seen.is_deleted(), "decode kept a copy of the decode state"
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(m.weights)), "weights were donated"
    assert int(np.asarray(state2.count)[0]) == 4


def test_weights_survive_generate(tiny_model):
    greedy(tiny_model, "Hello", 3)
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(tiny_model.weights))


def test_bfloat16_batch_runs_on_every_platform(tiny_model_dir):
    """bf16 weights with a batch of 2 (XLA's CPU runtime lacks batched bf16 dots with f32 output;
    the reference attention must not hit that)."""
    model = fj.load(tiny_model_dir, dtype="bfloat16", progress=False)
    outs = fj.generate(model, [[5, 6, 7], [8, 9, 10, 11, 12]], max_tokens=4)
    assert [len(o.token_ids) for o in outs] == [4, 4] or any(o.finish_reason == "stop" for o in outs)


def test_count_compiles_nests():
    a, b = jnp.arange(5.0).block_until_ready(), jnp.arange(7.0).block_until_ready()
    with count_compiles() as outer:
        with count_compiles() as inner:
            jax.jit(lambda x: x * 3 + 1)(a).block_until_ready()
        jax.jit(lambda x: x * 5 - 2)(b).block_until_ready()
    assert inner.compiles == 1 and outer.compiles == 2
