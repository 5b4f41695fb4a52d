"""Mixture of experts: the routing and expert ops against an independent numpy computation (both of
the reference's formulations, fused and separate gate/up, skewed routing, an expert range), and
parity with HF transformers (fp32, eager) on tiny random Qwen3-MoE (norm_topk_prob true and false,
one dense `mlp_only_layers` layer), Qwen2-MoE (shared expert) and Mixtral (sliding window)
checkpoints: logits at every prompt position, along 16 decode steps, and 32 greedy tokens.

Run with `-s` to see the max abs logit difference per model.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import _common, _make, transformers  # sets HF_HUB_OFFLINE before transformers loads

import ferrum_jax
import models
from ferrum_jax.backend import DEFAULT_OPS, Ops, record_dispatch, summarize
from ferrum_jax.cache import KVCache
from ferrum_jax.errors import ConfigError
from models.moe import Moe

ATOL = 1e-4
VOCAB = 384
PROMPT_LEN = 24  # longer than Mixtral's window (8)
DECODE_STEPS = 16
GEN_TOKENS = 32


# --- the ops against numpy ---------------------------------------------------------------------------


def _silu(a):
    return a / (1.0 + np.exp(-a))


def _np_route(x, router, top_k, norm):
    logits = x.astype(np.float64) @ router.T.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[..., :top_k]
    w = np.take_along_axis(p, ids, -1)
    if norm:
        w /= w.sum(-1, keepdims=True)
    return w, ids


def _np_experts(x, ids, w, gate, up, down, offset=0):
    """Row by row, slot by slot, float64; slots routed outside [offset, offset + E) skipped."""
    xs = x.reshape(-1, x.shape[-1]).astype(np.float64)
    ids, w = ids.reshape(len(xs), -1), w.reshape(len(xs), -1)
    out = np.zeros_like(xs)
    for n in range(len(xs)):
        for s in range(ids.shape[1]):
            e = int(ids[n, s]) - offset
            if 0 <= e < len(gate):
                a = _silu(gate[e] @ xs[n]) * (up[e] @ xs[n])
                out[n] += w[n, s] * (down[e] @ a)
    return out.reshape(x.shape)


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _stacks(rng, e, f, h):
    return _rand(rng, e, f, h, scale=h ** -0.5), _rand(rng, e, f, h, scale=h ** -0.5), _rand(rng, e, h, f, scale=f ** -0.5)


@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_numpy(norm):
    rng = np.random.default_rng(0)
    x, router = _rand(rng, 3, 5, 32), _rand(rng, 16, 32, scale=0.3)
    weights, ids = jax.jit(partial(DEFAULT_OPS.moe_route, top_k=4, norm_topk_prob=norm))(x, router)
    assert weights.dtype == jnp.float32 and ids.dtype == jnp.int32 and ids.shape == (3, 5, 4)
    want_w, want_ids = _np_route(x, router, 4, norm)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_w, rtol=1e-5, atol=1e-6)
    if norm:
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


# rows: 2 x 1 tokens, k=2 -> 4 routed rows < 8 experts: the gather formulation; 2 x 9 -> dense.
@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("fused", [False, True])
def test_experts_match_numpy(tokens, fused):
    rng = np.random.default_rng(1)
    e, f, h, k = 8, 24, 32, 2
    gate, up, down = _stacks(rng, e, f, h)
    x = _rand(rng, 2, tokens, h)
    w, ids = _np_route(x, _rand(rng, e, h), k, norm=False)
    w_gate, w_up = (np.concatenate([gate, up], axis=1), None) if fused else (gate, up)
    got = jax.jit(partial(DEFAULT_OPS.moe_experts, kind="silu"))(x, jnp.asarray(ids, jnp.int32), w, w_gate, w_up,
                                                                  down)
    np.testing.assert_allclose(np.asarray(got), _np_experts(x, ids, w, gate, up, down), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 40])
def test_skewed_routing(tokens):
    """Every token to the same two experts (5 and 6), the other six get no tokens: through the router
    (positive activations, two router rows far larger than the rest) and the experts."""
    rng = np.random.default_rng(2)
    e, f, h = 8, 16, 32
    gate, up, down = _stacks(rng, e, f, h)
    x = np.abs(_rand(rng, 1, tokens, h)) + 0.1
    router = _rand(rng, e, h, scale=0.01)
    router[5] += 1.0
    router[6] += 0.5
    refs = Ops(force=(("moe_route", "xla"), ("moe_experts", "xla")))  # the reference path, on a GPU too
    with record_dispatch() as log:
        weights, ids = refs.moe_route(jnp.asarray(x), jnp.asarray(router), top_k=2, norm_topk_prob=True)
        got = refs.moe_experts(jnp.asarray(x), ids, weights, *map(jnp.asarray, (gate, up, down)), "silu")
    assert summarize(log) == {"linear": "xla", "moe_route": "xla", "moe_experts": "xla", "activation": "xla"}
    assert (np.asarray(ids)[..., 0] == 5).all() and (np.asarray(ids)[..., 1] == 6).all()
    np.testing.assert_allclose(np.asarray(got), _np_experts(x, np.asarray(ids), np.asarray(weights), gate, up, down),
                               rtol=1e-4, atol=1e-5)
    # All of them on one expert (both slots, half the weight each) == that expert's MLP alone.
    ids = np.full((1, tokens, 2), 3, np.int32)
    got = DEFAULT_OPS.moe_experts(jnp.asarray(x), jnp.asarray(ids), jnp.full((1, tokens, 2), 0.5),
                                  *map(jnp.asarray, (gate, up, down)), "silu")
    want = (_silu(x @ gate[3].T) * (x @ up[3].T)) @ down[3].T
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 12])
def test_expert_range_sums_to_whole(tokens):
    """Expert parallel: each half of the experts with its offset; the two partial outputs add up to
    the full one and each matches numpy over its own range."""
    rng = np.random.default_rng(3)
    e, f, h, k = 8, 16, 32, 3
    gate, up, down = _stacks(rng, e, f, h)
    x = _rand(rng, 1, tokens, h)
    w, ids = _np_route(x, _rand(rng, e, h), k, norm=True)
    ids = jnp.asarray(ids, jnp.int32)
    full = jax.jit(partial(DEFAULT_OPS.moe_experts, kind="silu"))(x, ids, w, gate, up, down)
    parts = []
    for lo in (0, e // 2):
        sl = slice(lo, lo + e // 2)
        part = jax.jit(partial(DEFAULT_OPS.moe_experts, kind="silu"))(x, ids, w, gate[sl], up[sl], down[sl],
                                                                      expert_offset=jnp.int32(lo))
        np.testing.assert_allclose(np.asarray(part), _np_experts(x, np.asarray(ids), w, gate[sl], up[sl], down[sl],
                                                                 offset=lo), rtol=1e-4, atol=1e-5)
        parts.append(part)
    np.testing.assert_allclose(np.asarray(parts[0] + parts[1]), np.asarray(full), rtol=1e-5, atol=1e-5)


# --- parity with transformers ------------------------------------------------------------------------


def qwen3_moe(path: Path, *, norm: bool, seed: int):
    """Qwen3-MoE: 8 experts, top 2, q/k norm; without norm_topk_prob a third layer that is dense
    (mlp_only_layers) with a different intermediate size."""
    layers, dense = (2, []) if norm else (3, [1])
    cfg = transformers.Qwen3MoeConfig(**_common(
        num_hidden_layers=layers, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=norm, decoder_sparse_step=1, mlp_only_layers=dense, use_sliding_window=False,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
    return _make(transformers.Qwen3MoeForCausalLM, cfg, path, seed=seed)


def qwen2_moe(path: Path, *, seed: int):
    """Qwen2-MoE: qkv biases, 8 experts top 2 plus a sigmoid-gated shared expert on every token."""
    cfg = transformers.Qwen2MoeConfig(**_common(
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, norm_topk_prob=False, use_sliding_window=False,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
    return _make(transformers.Qwen2MoeForCausalLM, cfg, path, seed=seed)


def mixtral(path: Path, *, seed: int):
    """Mixtral: 8 experts top 2 (softmax over the top-k logits), sliding_window 8."""
    cfg = transformers.MixtralConfig(**_common(
        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    return _make(transformers.MixtralForCausalLM, cfg, path, seed=seed)


BUILDERS = {
    "qwen3-moe-norm": partial(qwen3_moe, norm=True, seed=25),
    "qwen3-moe": partial(qwen3_moe, norm=False, seed=22),
    "qwen2-moe-shared": partial(qwen2_moe, seed=23),
    "mixtral-swa": partial(mixtral, seed=24),
}
FIGURES: dict[str, dict[str, float]] = {}


def _record(name: str, check: str, diff: float) -> None:
    FIGURES.setdefault(name, {})[check] = diff
    print(f"\n[moe parity] {name:18s} {check:8s} max|ferrum - hf| = {diff:.3e}")


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if FIGURES:
        print("\n[moe parity] max abs logit difference vs transformers (fp32, eager):")
        for name, per in FIGURES.items():
            print(f"  {name:18s} " + "  ".join(f"{c} {v:.3e}" for c, v in per.items()))


@pytest.fixture(autouse=True)
def _full_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe")
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            path, hf = BUILDERS[name](root / name)
            built[name] = (path, hf, ferrum_jax.load(path, dtype="float32", progress=False))
        return built[name]

    return get


def _prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def _hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@partial(jax.jit, static_argnames=("cfg", "ops", "kv_len"))
def _forward(weights, tokens, positions, cache, logits_at=None, *, cfg, ops, kv_len=None):
    return models.family_of(cfg).forward(weights, tokens, positions, cache, cfg, ops, kv_len=kv_len,
                                         logits_at=logits_at)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_loads_as_moe(name, checkpoints):
    _, _, model = checkpoints(name)
    cfg = model.config
    assert models.family_of(cfg) is models.moe and cfg.num_experts == 8 and cfg.top_k == 2
    kinds = [type(layer.mlp) for layer in model.weights.layers]
    assert kinds == [Moe if s else models.common.Mlp for s in cfg.sparse] and any(cfg.sparse)
    if name == "qwen3-moe":
        assert cfg.sparse == (True, False, True) and not cfg.norm_topk_prob
    m = model.weights.layers[0].mlp
    f = cfg.moe_intermediate_size
    # HF's per-expert tensors stacked, gate and up fused per expert ([gate_e; up_e] rows) at load
    assert m.gate.shape == (8, 2 * f, 64) and m.up is None and m.down.shape == (8, 64, f)
    assert (m.shared is not None) == (name == "qwen2-moe-shared")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_logits_match_hf(name, checkpoints):
    """Prefill logits at every position of two right-padded prompts, then 16 decode steps (HF's
    greedy continuation fed one token at a time, each row at its own position)."""
    _, hf, model = checkpoints(name)
    cfg = model.config
    prompts = [_prompt(10, PROMPT_LEN), _prompt(11, PROMPT_LEN - 7)]
    tokens = np.zeros((2, PROMPT_LEN), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    positions = jnp.broadcast_to(jnp.arange(PROMPT_LEN, dtype=jnp.int32), tokens.shape)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)

    def cache():
        return KVCache.create(num_layers=cfg.num_layers, batch=2, kv_heads=cfg.num_kv_heads, capacity=64,
                              head_dim=cfg.head_dim, dtype=model.dtype)

    logits, _ = _forward(model.weights, jnp.asarray(tokens), positions, cache(), cfg=cfg, ops=model.ops)
    logits = np.asarray(logits)
    diff = max(float(np.abs(logits[i, : len(p)] - _hf_logits(hf, p)).max()) for i, p in enumerate(prompts))
    _record(name, "prefill", diff)
    assert diff < ATOL

    continuations = [_hf_greedy(hf, p, DECODE_STEPS) for p in prompts]
    refs = [_hf_logits(hf, p + c)[len(p) - 1: len(p) - 1 + DECODE_STEPS] for p, c in zip(prompts, continuations)]
    logits, kv = _forward(model.weights, jnp.asarray(tokens), positions, cache(), lengths - 1, cfg=cfg,
                          ops=model.ops, kv_len=PROMPT_LEN)
    got = [np.asarray(logits)[:, 0]]
    for step in range(DECODE_STEPS - 1):
        fed = jnp.asarray([[c[step]] for c in continuations], jnp.int32)
        logits, kv = _forward(model.weights, fed, (lengths + step)[:, None], kv, cfg=cfg, ops=model.ops)
        got.append(np.asarray(logits)[:, 0])
    got = np.stack(got, axis=1)
    diff = max(float(np.abs(got[i] - refs[i]).max()) for i in range(len(prompts)))
    _record(name, "decode", diff)
    assert diff < ATOL
    assert [g.argmax(-1).tolist() for g in got] == continuations


@pytest.mark.parametrize("name", list(BUILDERS))
def test_greedy_generation_matches_hf(name, checkpoints):
    """`ferrum_jax.generate` on a right-padded batch of two prompts == HF greedy per prompt, 32 tokens."""
    _, hf, model = checkpoints(name)
    prompts = [_prompt(30, 21), _prompt(31, 13)]
    completions = ferrum_jax.generate(model, prompts, max_tokens=GEN_TOKENS)
    for prompt, completion in zip(prompts, completions):
        want = _hf_greedy(hf, prompt, GEN_TOKENS)
        assert completion.token_ids == want
        assert completion.finish_reason == "length"
        print(f"\n[moe parity] {name:18s} generate: {len(set(want))} distinct of {len(want)} tokens")


def test_one_device_mesh_matches_unsharded(checkpoints):
    """A 1-device mesh runs the sharded MoE path (shard_map, psum over size-1 axes): same logits.
    The multi-device expert/tensor parallel checks are in tests/test_sharding.py."""
    path, _, _ = checkpoints("mixtral-swa")
    ids = _prompt(3, 12)
    ref = ferrum_jax.logits(ferrum_jax.load(path, dtype="float32", progress=False), ids)
    got = ferrum_jax.logits(ferrum_jax.load(path, dtype="float32", progress=False, mesh=ferrum_jax.make_mesh()), ids)
    np.testing.assert_allclose(got, ref, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_fuse_projections_fuses_dense_expert_stacks_and_frees_what_it_owns():
    """Dense gate and up stacks [E, F, H] become [gate_e; up_e] rows per expert ([E, 2F, H], numpy's
    concatenate the oracle), the shared expert's gate/up fuse too, packed stacks stay apart; with
    free_inputs the inputs are deleted (a loader's peak: one fused projection more), without it they stay."""
    from models.common import Mlp, fuse_projections

    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    shared = Mlp(gate=arr(6, 4), up=arr(6, 4), down=arr(4, 6))
    moe = Moe(router=arr(3, 4), gate=arr(3, 5, 4), up=arr(3, 5, 4), down=arr(3, 4, 5), shared=shared,
              shared_gate=arr(1, 4))
    gate, up, sgate, sup = (np.asarray(a) for a in (moe.gate, moe.up, shared.gate, shared.up))
    kept = fuse_projections([moe])[0]
    assert kept.up is None and kept.shared.up is None and not moe.gate.is_deleted()
    np.testing.assert_array_equal(np.asarray(kept.gate), np.concatenate([gate, up], axis=1))
    np.testing.assert_array_equal(np.asarray(kept.shared.gate), np.concatenate([sgate, sup], axis=0))
    owned = fuse_projections([moe], free_inputs=True)[0]
    assert moe.gate.is_deleted() and moe.up.is_deleted() and shared.gate.is_deleted()
    assert not moe.down.is_deleted() and not moe.router.is_deleted()
    np.testing.assert_array_equal(np.asarray(owned.gate), np.asarray(kept.gate))
    # Traced (jax.eval_shape of a loader): shapes only, nothing deleted.
    fresh = Moe(router=arr(3, 4), gate=arr(3, 5, 4), up=arr(3, 5, 4), down=arr(3, 4, 5))
    abstract = jax.eval_shape(lambda m: fuse_projections([m], free_inputs=True)[0], fresh)
    assert abstract.gate.shape == (3, 10, 4) and abstract.up is None and not fresh.gate.is_deleted()
    # Stacks that are not both dense arrays of one dtype stay apart.
    mixed = Moe(router=arr(3, 4), gate=arr(3, 5, 4), up=arr(3, 5, 4).astype(jnp.bfloat16), down=arr(3, 4, 5))
    assert fuse_projections([mixed])[0].up is not None


def test_fuse_projections_fuses_narrow_packed_expert_stacks():
    """QuantWeight stacks of one format fuse per expert up to PACKED_EXPERTS_FUSE_MAX_F rows (the
    fused stack dequantizes to the per-expert concatenation of the two), wider ones and stacks of
    two formats stay apart."""
    from ferrum_jax.quant.qweight import GGUF_FORMATS, QuantWeight
    from models.common import PACKED_EXPERTS_FUSE_MAX_F, fuse_projections

    rng = np.random.default_rng(1)

    def stack(fmt: str, e: int, f: int, k: int = 32) -> QuantWeight:
        q = GGUF_FORMATS[fmt]
        codes = lambda: (rng.integers(-127, 128, (f, k)).astype(np.int8) if fmt == "Q8_0"
                         else rng.integers(0, 16, (f, k)).astype(np.uint8))
        return QuantWeight.stack([QuantWeight.from_codes(codes(), rng.uniform(0.01, 0.1, (f, k // q.group))
                                                         .astype(np.float16), q) for _ in range(e)])

    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    gate, up = stack("Q8_0", 2, 64), stack("Q8_0", 2, 64)
    expect = np.concatenate([np.asarray(gate.dequantize()), np.asarray(up.dequantize())], axis=1)
    fused = fuse_projections([Moe(router=arr(2, 32), gate=gate, up=up, down=arr(2, 32, 64))], free_inputs=True)[0]
    assert fused.up is None and fused.gate.shape == (2, 128, 32) and gate.lo.is_deleted() and up.scales.is_deleted()
    np.testing.assert_array_equal(np.asarray(fused.gate.dequantize()), expect)
    wide = PACKED_EXPERTS_FUSE_MAX_F + 64
    apart = Moe(router=arr(1, 32), gate=stack("Q8_0", 1, wide), up=stack("Q8_0", 1, wide), down=arr(1, 32, wide))
    assert fuse_projections([apart])[0].up is not None
    mixed = Moe(router=arr(2, 32), gate=stack("Q8_0", 2, 64), up=stack("Q4_0", 2, 64), down=arr(2, 32, 64))
    assert fuse_projections([mixed])[0].up is not None
