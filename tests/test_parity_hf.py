"""Parity with Hugging Face transformers (fp32, eager attention) on tiny random checkpoints of every
supported family (see hf_models.py): logits at every prompt position, logits along 16 decode steps
through the KV cache, and greedy generation of a right-padded batch. Also the loader's errors for a
config that disagrees with the tensors and for an unsupported architecture.

Run with `-s` to see the max abs logit difference per family (summarized at the end of the module).
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import BUILDERS, VOCAB, build  # sets HF_HUB_OFFLINE before transformers is imported

import ferrum_jax
import models
from ferrum_jax.cache import KVCache
from ferrum_jax.errors import CheckpointError, UnsupportedArchitectureError

FAMILIES = list(BUILDERS)
ATOL = 1e-4
PROMPT_LEN = 24  # longer than every sliding window (8) and than llama3's original context (16)
DECODE_STEPS = 16
GEN_PROMPT_LENS = (21, 13)  # different lengths: the shorter row is right-padded in the batch
GEN_TOKENS = 32

# family -> check -> max abs logit difference, printed at the end of the module.
FIGURES: dict[str, dict[str, float]] = {}


def _record(family: str, check: str, diff: float) -> None:
    FIGURES.setdefault(family, {})[check] = diff
    print(f"\n[parity] {family:20s} {check:12s} max|ferrum - hf| = {diff:.3e}")


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if FIGURES:
        checks = sorted({c for per in FIGURES.values() for c in per})
        print("\n\n[parity] max abs logit difference vs transformers (fp32, eager):")
        print("  " + f"{'family':20s}" + "".join(f"{c:>14s}" for c in checks))
        for family, per in FIGURES.items():
            print("  " + f"{family:20s}" + "".join(f"{per[c]:>14.3e}" if c in per else f"{'-':>14s}"
                                                   for c in checks))


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    # The models are tiny: intra-op threads only add contention (20x slower on a busy 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _full_precision():
    # On the CPU fp32 matmuls are exact anyway; elsewhere (TF32 on GPUs) 1e-4 needs this.
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (dir, torch model, ferrum model), built lazily once per module."""
    root = tmp_path_factory.mktemp("hf_parity")
    built: dict[str, tuple[Path, torch.nn.Module, ferrum_jax.Model]] = {}

    def get(family: str):
        if family not in built:
            path, hf = build(family, root / family)
            built[family] = (path, hf, ferrum_jax.load(path, dtype="float32", progress=False))
        return built[family]

    return get


def _prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def _hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


@partial(jax.jit, static_argnames=("cfg", "ops", "kv_len"))
def _forward(weights, tokens, positions, cache, logits_at=None, *, cfg, ops, kv_len=None):
    return models.family_of(cfg).forward(weights, tokens, positions, cache, cfg, ops, kv_len=kv_len,
                                         logits_at=logits_at)


def _cache(model: ferrum_jax.Model, batch: int, capacity: int) -> KVCache:
    cfg = model.config
    return KVCache.create(num_layers=cfg.num_layers, batch=batch, kv_heads=cfg.num_kv_heads, capacity=capacity,
                          head_dim=cfg.head_dim, dtype=model.dtype)


def _padded(prompts: list[list[int]], t: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Right-padded tokens [B, t] (padding id 0), positions [B, t] and lengths [B]."""
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
    return jnp.asarray(tokens), positions, jnp.asarray([len(p) for p in prompts], jnp.int32)


# Both logit tests use the same right-padded batch of two prompts, the longer one filling the block.
LOGIT_PROMPTS = [(10, PROMPT_LEN), (11, PROMPT_LEN - 7)]
CAPACITY = 64  # larger than prompt + decode steps: the empty slots must stay invisible


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_hf(family, checkpoints):
    """Logits at every prompt position, for a right-padded batch of two prompts, in a cache larger
    than the prompts (attending over all of it); then the generate-path prefill (kv_len = the
    block, only each row's last real position projected)."""
    _, hf, model = checkpoints(family)
    cfg = model.config
    prompts = [_prompt(seed, n) for seed, n in LOGIT_PROMPTS]
    tokens, positions, lengths = _padded(prompts, PROMPT_LEN)
    logits, _ = _forward(model.weights, tokens, positions, _cache(model, 2, CAPACITY), cfg=cfg, ops=model.ops)
    logits = np.asarray(logits)
    assert logits.dtype == np.float32 and logits.shape == (2, PROMPT_LEN, cfg.vocab_size)

    refs = [_hf_logits(hf, p) for p in prompts]
    diff = max(float(np.abs(logits[i, : len(p)] - ref).max()) for i, (p, ref) in enumerate(zip(prompts, refs)))
    _record(family, "prefill", diff)
    assert diff < ATOL

    last, _ = _forward(model.weights, tokens, positions, _cache(model, 2, CAPACITY), lengths - 1, cfg=cfg,
                       ops=model.ops, kv_len=PROMPT_LEN)
    last = np.asarray(last)
    assert last.shape == (2, 1, cfg.vocab_size)
    diff = max(float(np.abs(last[i, 0] - ref[-1]).max()) for i, ref in enumerate(refs))
    _record(family, "prefill last", diff)
    assert diff < ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_logits_match_hf(family, checkpoints):
    """Prefill a right-padded batch of two prompts (as `generate` does), then feed each row HF's
    greedy continuation one token at a time, each row at its own position (the shorter row first
    overwrites the cache slots its padding filled); the logits of every decode step, attending over
    the whole cache, match HF's."""
    _, hf, model = checkpoints(family)
    cfg = model.config
    prompts = [_prompt(seed, n) for seed, n in LOGIT_PROMPTS]
    continuations = [_hf_greedy(hf, p, DECODE_STEPS) for p in prompts]
    # Logits at position j depend on seq[: j + 1] only: one HF forward per row covers every step.
    refs = [_hf_logits(hf, p + c)[len(p) - 1: len(p) - 1 + DECODE_STEPS] for p, c in zip(prompts, continuations)]

    tokens, positions, lengths = _padded(prompts, PROMPT_LEN)
    logits, cache = _forward(model.weights, tokens, positions, _cache(model, 2, CAPACITY), lengths - 1, cfg=cfg,
                             ops=model.ops, kv_len=PROMPT_LEN)
    got = [np.asarray(logits)[:, 0]]
    for step in range(DECODE_STEPS - 1):
        fed = jnp.asarray([[c[step]] for c in continuations], jnp.int32)
        logits, cache = _forward(model.weights, fed, (lengths + step)[:, None], cache, cfg=cfg, ops=model.ops)
        assert logits.shape == (2, 1, cfg.vocab_size)
        got.append(np.asarray(logits)[:, 0])
    got = np.stack(got, axis=1)  # [row, step, vocab]: after the prompt, then after each fed token
    diff = max(float(np.abs(got[i] - refs[i]).max()) for i in range(len(prompts)))
    _record(family, "decode", diff)
    assert diff < ATOL
    # Feeding HF's tokens kept us on HF's greedy path: our own argmax agrees at every step.
    assert [g.argmax(-1).tolist() for g in got] == continuations


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hf(family, checkpoints):
    """`ferrum_jax.generate` on a right-padded batch of two prompts == HF greedy per prompt."""
    _, hf, model = checkpoints(family)
    assert model.tokenizer is None  # no stop ids: both sides generate exactly GEN_TOKENS
    prompts = [_prompt(30 + i, n) for i, n in enumerate(GEN_PROMPT_LENS)]
    completions = ferrum_jax.generate(model, prompts, max_tokens=GEN_TOKENS)
    assert len(completions) == len(prompts)
    for prompt, completion in zip(prompts, completions):
        want = _hf_greedy(hf, prompt, GEN_TOKENS)
        assert completion.token_ids == want, (
            f"first divergence at token {next(i for i, (a, b) in enumerate(zip(completion.token_ids, want)) if a != b)}"
            if len(completion.token_ids) == len(want) else f"got {len(completion.token_ids)} tokens")
        print(f"\n[parity] {family:20s} generate: {len(set(want))} distinct of {len(want)} tokens")
        assert completion.finish_reason == "length"
        assert completion.prompt_tokens == len(prompt)


# --- loader errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, tensor, found, expected", [
    ("intermediate_size", 96, "model.layers.0.mlp.gate_proj.weight", (128, 64), (96, 64)),
    ("num_key_value_heads", 1, "model.layers.0.self_attn.k_proj.weight", (32, 64), (16, 64)),
    ("vocab_size", 512, "model.embed_tokens.weight", (384, 64), (512, 64)),
])
def test_config_tensor_shape_mismatch_raises(field, value, tensor, found, expected, checkpoints, tmp_path):
    src, _, _ = checkpoints("llama3")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg[field] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        ferrum_jax.load(bad, dtype="float32", progress=False)
    msg = str(err.value)
    assert tensor in msg and str(found) in msg and str(expected) in msg, msg


def test_unsupported_architecture_raises(tmp_path):
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert json.loads((tmp_path / "gpt2" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    with pytest.raises(UnsupportedArchitectureError) as err:
        ferrum_jax.load(tmp_path / "gpt2", dtype="float32", progress=False)
    msg = str(err.value)
    assert "GPT2LMHeadModel" in msg
    for arch in models.ARCHITECTURES:
        assert arch in msg, msg
