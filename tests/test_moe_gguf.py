"""GGUF mixture-of-experts files: tiny random Qwen3-MoE (one dense `mlp_only_layers` layer), Qwen2-MoE
(shared expert, its gate stored 1-D as llama.cpp's converter squeezes it) and Mixtral (arch "llama":
q/k rows permuted, sliding window) models converted the way llama.cpp's convert_hf_to_gguf.py does it
(gguf's own name map, experts stacked [experts, out, in]), expert stacks stored as Q8_0, Q4_K, Q6_K,
Q5_K, Q4_0, Q2_K and F32/F16/BF16, then loaded with `ferrum_jax.load` (stacks kept packed):

* against the HF transformers model whose weights are the file's tensors dequantized by
  `gguf.quants.dequantize` (fp32, eager): logits at every prompt position and along 16 decode steps
  within 1e-4, and 20 greedy tokens from `ferrum_jax.generate` equal;
* skewed routing (the router biased so every token picks the same expert first);
* the packed `moe_experts` reference against the dense one on the dequantized stacks (decode's
  gather and prefill's per-expert scan, fused gate/up, an expert range), and that neither ever
  holds the dense stack;
* dequantize=True (dense stacks) and old per-expert Mixtral files (`blk.N.ffn_gate.E.weight`) load
  to the same model;
* errors naming the tensor or metadata key: missing stacks, missing expert keys, a stack that
  contradicts expert_count, mixed per-expert types.

K-quants, which gguf cannot quantize, are random valid blocks of about the weight's spread.
"""

from __future__ import annotations

import dataclasses

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
import models  # noqa: E402
from ferrum_jax.backend import DEFAULT_OPS, record_dispatch, summarize  # noqa: E402
from ferrum_jax.cache import KVCache  # noqa: E402
from ferrum_jax.errors import CheckpointError, ConfigError  # noqa: E402
from ferrum_jax.quant import LAYOUTS, GGUFWeight  # noqa: E402
from ferrum_jax.quant.qweight import GGUF_FORMATS, QuantWeight  # noqa: E402
from models.moe import Moe  # noqa: E402

T = gguf.GGMLQuantizationType
ATOL = 1e-4
# The implementations of `moe_experts` that run quantized stacks as they are stored (the reference
# dequantizing per call on CPU, the kernels on a GPU), and those of dense stacks.
PACKED = {"xla_dequant", "pallas_grouped_quant", "pallas_decode_quant"}
DENSE = {"xla", "pallas_grouped", "pallas_decode"}
VOCAB = 384
HIDDEN = 256  # K-quant blocks are 256 wide: every projection's input is a multiple
PROMPT_LEN = 20
DECODE_STEPS = 16
GEN_TOKENS = 20


@pytest.fixture(autouse=True)
def _full_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- tiny HF models ----------------------------------------------------------------------------------


def _common(**kw: Any) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=128, rms_norm_eps=1e-6,
                dtype="float32", bos_token_id=None, eos_token_id=None, pad_token_id=None) | kw


def _hf(cls: type, config: Any, seed: int) -> Any:
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = cls(config).to(torch.float32)
    randomize(model, seed=seed, std=0.08, embed_std=0.25)
    return model.eval()


def qwen3moe(seed: int = 31, layers: int = 3, dense: tuple[int, ...] = (1,)):
    cfg = transformers.Qwen3MoeConfig(**_common(
        num_hidden_layers=layers, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=list(dense), use_sliding_window=False,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    return "qwen3moe", _hf(transformers.Qwen3MoeForCausalLM, cfg, seed)


def qwen2moe(seed: int = 32):
    cfg = transformers.Qwen2MoeConfig(**_common(
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        shared_expert_intermediate_size=128, norm_topk_prob=False, use_sliding_window=False,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    return "qwen2moe", _hf(transformers.Qwen2MoeForCausalLM, cfg, seed)


def mixtral(seed: int = 33):
    cfg = transformers.MixtralConfig(**_common(
        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=256, sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    return "llama", _hf(transformers.MixtralForCausalLM, cfg, seed)


# Each file's ggml type per tensor: by GGUF name (without "blk.N."), per layer; F32 otherwise.
TYPES: dict[str, dict[int, dict[str, str]]] = {
    "qwen3moe": {0: {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q6_K", "ffn_down_exps": "Q8_0", "attn_q": "Q8_0",
                     "attn_output": "Q4_K"},
                 1: {"ffn_gate": "Q8_0", "ffn_up": "Q4_K", "ffn_down": "Q8_0"},  # the dense layer
                 2: {"ffn_gate_exps": "Q8_0", "ffn_up_exps": "Q4_K", "ffn_down_exps": "Q6_K", "attn_v": "Q6_K"}},
    "qwen2moe": {0: {"ffn_gate_exps": "F16", "ffn_up_exps": "BF16", "ffn_down_exps": "F32",
                     "ffn_gate_shexp": "Q8_0", "ffn_down_shexp": "Q8_0"},
                 1: {"ffn_gate_exps": "Q5_K", "ffn_up_exps": "Q4_0", "ffn_down_exps": "Q2_K",
                     "ffn_up_shexp": "Q4_K"}},
    "llama": {0: {"ffn_gate_exps": "Q8_0", "ffn_up_exps": "Q8_0", "ffn_down_exps": "Q8_0", "attn_k": "Q8_0"},
              1: {"ffn_gate_exps": "Q6_K", "ffn_up_exps": "Q4_K", "ffn_down_exps": "Q6_K", "attn_q": "Q4_K"}},
}


def _type_of(arch: str, name: str) -> str:
    parts = name.split(".")
    if parts[0] != "blk":
        return "Q8_0" if name == "output.weight" else "F32"
    return TYPES[arch].get(int(parts[1]), {}).get(parts[2], "F32")


# --- HF <-> GGUF, as llama.cpp's converter does it ---------------------------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotate-half rows -> interleaved rows, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _name_map(arch: str, layers: int):
    return gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), layers)


def _tensor_plan(hf: Any, arch: str) -> list[tuple[str, list[str]]]:
    """(HF state-dict key, the GGUF tensors it becomes). transformers keeps the experts fused in
    memory (`experts.gate_up_proj` [E, 2F, H], `experts.down_proj` [E, H, F]); checkpoints and
    gguf's name map know the stacked `experts.gate_proj` / `up_proj` / `down_proj`."""
    layers = hf.config.num_hidden_layers
    names, dense_names = _name_map(arch, layers), _name_map("llama", layers)

    def gguf_name(hf_name: str) -> str:
        # gguf's qwen3moe map has no dense FFN (llama.cpp knows no dense layers there): llama's names
        g = names.get_name(hf_name) or dense_names.get_name(hf_name)
        assert g is not None, hf_name
        return g

    plan = []
    for key in hf.state_dict():
        if key.endswith("experts.gate_up_proj"):
            stem = key[: -len("gate_up_proj")]
            plan.append((key, [gguf_name(stem + "gate_proj") + ".weight", gguf_name(stem + "up_proj") + ".weight"]))
        elif key.endswith("experts.down_proj"):
            plan.append((key, [gguf_name(key) + ".weight"]))
        else:
            base, suffix = key.rsplit(".", 1)
            plan.append((key, [f"{gguf_name(base)}.{suffix}"]))
    return plan


def to_gguf(hf: Any, arch: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, GGUF name -> float32 array in GGUF conventions)."""
    c = hf.config
    a = arch + "."
    meta: dict[str, Any] = {
        a + "context_length": c.max_position_embeddings, a + "embedding_length": c.hidden_size,
        a + "feed_forward_length": c.intermediate_size, a + "block_count": c.num_hidden_layers,
        a + "attention.head_count": c.num_attention_heads, a + "attention.head_count_kv": c.num_key_value_heads,
        a + "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), a + "attention.key_length": c.head_dim,
        a + "attention.value_length": c.head_dim, a + "rope.dimension_count": c.head_dim,
        a + "rope.freq_base": float(c.rope_parameters["rope_theta"]), a + "vocab_size": c.vocab_size,
        a + "expert_count": int(getattr(c, "num_experts", None) or c.num_local_experts),
        a + "expert_used_count": c.num_experts_per_tok,
    }
    if arch != "llama":
        meta[a + "expert_feed_forward_length"] = c.moe_intermediate_size
    if arch == "qwen2moe":
        meta[a + "expert_shared_feed_forward_length"] = c.shared_expert_intermediate_size
    if arch == "llama":
        meta[a + "attention.sliding_window"] = c.sliding_window  # our Mistral-style extension, as dense llama
    sd = {k: v.detach().to(torch.float32).numpy().copy() for k, v in hf.state_dict().items()}
    tensors: dict[str, np.ndarray] = {}
    for key, gnames in _tensor_plan(hf, arch):
        w = sd[key]
        if len(gnames) == 2:  # gate_up_proj: the first F rows of each expert are the gate
            f = w.shape[1] // 2
            tensors[gnames[0]], tensors[gnames[1]] = w[:, :f], w[:, f:]
            continue
        if arch == "llama" and key.endswith("q_proj.weight"):
            w = _permute(w, c.num_attention_heads)
        if arch == "llama" and key.endswith("k_proj.weight"):
            w = _permute(w, c.num_key_value_heads)
        tensors[gnames[0]] = w.squeeze() if w.ndim > 1 else w  # the converter squeezes [1, H] gates
    return meta, tensors


def from_gguf(hf: Any, arch: str, tensors: dict[str, np.ndarray]) -> None:
    """Load float32 GGUF tensors (e.g. dequantized) into the HF model, undoing `to_gguf`."""
    c = hf.config
    sd = hf.state_dict()
    new = {}
    for key, gnames in _tensor_plan(hf, arch):
        w = np.concatenate([tensors[g] for g in gnames], axis=1) if len(gnames) == 2 else tensors[gnames[0]]
        if arch == "llama" and key.endswith("q_proj.weight"):
            w = _unpermute(w, c.num_attention_heads)
        if arch == "llama" and key.endswith("k_proj.weight"):
            w = _unpermute(w, c.num_key_value_heads)
        new[key] = torch.from_numpy(np.ascontiguousarray(w, np.float32).reshape(sd[key].shape))
    hf.load_state_dict(new, strict=True)


# K-quants with a per-sub-block min (w = d * sc * q - dmin * m): random blocks whose scale bytes are all
# one value 0x11 * n make sc == m in every sub-block, so dmin = mean(q) * d centres the weights.
_K_CENTRE = {"Q2_K": 1.5, "Q4_K": 7.5, "Q5_K": 15.5}


def _quantize(x: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """The stored data of x [..., cols] as type qtype (raw uint8 blocks [..., bytes] when quantized):
    gguf's quantizer where it has one, else (K-quants) random valid blocks of about x's spread."""
    if qtype == "F32":
        return x.astype(np.float32)
    if qtype == "F16":
        return x.astype(np.float16)
    try:
        return gguf.quants.quantize(x, T[qtype])
    except NotImplementedError:
        pass
    layout = LAYOUTS[qtype]
    *lead, cols = x.shape
    raw = rng.integers(0, 256, size=(*lead, cols // layout.block_size, layout.type_size), dtype=np.uint8)
    if qtype in _K_CENTRE:
        f = layout.field("scales")
        raw[..., f.offset: f.offset + f.size] = 0x11 * rng.integers(1, 4, size=(*raw.shape[:-1], 1), dtype=np.uint8)

    def set_scales(v: float) -> None:
        for name, factor in (("d", 1.0), ("dmin", _K_CENTRE.get(qtype, 0.0))):
            if any(f.name == name for f in layout.fields):
                f = layout.field(name)
                raw[..., f.offset: f.offset + 2] = np.frombuffer(np.float16(v * factor).tobytes(), np.uint8)

    set_scales(1.0)
    spread = gguf.quants.dequantize(raw.reshape(*lead, -1), T[qtype]).std()
    set_scales(float(x.std()) / float(spread))
    return raw.reshape(*lead, -1)


def dequantized(stored: dict[str, tuple[np.ndarray, str]]) -> dict[str, np.ndarray]:
    out = {}
    for name, (data, qtype) in stored.items():
        if qtype in ("F32", "F16"):
            out[name] = data.astype(np.float32)
        else:
            out[name] = gguf.quants.dequantize(data, T[qtype]).astype(np.float32)
    return out


def write_gguf(path: Path, arch: str, meta: dict[str, Any], stored: dict[str, tuple[np.ndarray, str]]) -> Path:
    w = gguf.GGUFWriter(path, arch)
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    for name, (data, qtype) in stored.items():
        if qtype in ("F32", "F16"):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=T[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_case(root: Path, builder, name: str, *, seed: int = 0, tweak=None):
    """(GGUF path, the HF model holding the file's dequantized weights, metadata, stored tensors)."""
    arch, hf = builder()
    if tweak is not None:
        tweak(hf)
    meta, tensors = to_gguf(hf, arch)
    rng = np.random.default_rng(seed)
    stored = {}
    for g, x in tensors.items():
        qtype = _type_of(arch, g)
        stored[g] = (_quantize(x, qtype, rng), qtype)
    path = write_gguf(root / f"{name}.gguf", arch, meta, stored)
    from_gguf(hf, arch, dequantized(stored))
    return path, hf, meta, stored


# --- running both ------------------------------------------------------------------------------------


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


def _cache(model, batch: int = 2):
    cfg = model.config
    return KVCache.create(num_layers=cfg.num_layers, batch=batch, kv_heads=cfg.num_kv_heads, capacity=64,
                          head_dim=cfg.head_dim, dtype=model.dtype)


def _batch(prompts: list[list[int]]):
    tokens = np.zeros((len(prompts), PROMPT_LEN), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    positions = jnp.broadcast_to(jnp.arange(PROMPT_LEN, dtype=jnp.int32), tokens.shape)
    return jnp.asarray(tokens), positions, jnp.asarray([len(p) for p in prompts], jnp.int32)


def prefill_logits(model, prompts: list[list[int]]) -> np.ndarray:
    tokens, positions, _ = _batch(prompts)
    logits, _ = _forward(model.weights, tokens, positions, _cache(model, len(prompts)), cfg=model.config,
                         ops=model.ops)
    return np.asarray(logits)


def check_against_hf(model, hf, label: str, *, generate: bool = True) -> None:
    """Prefill logits at every position of two right-padded prompts, then 16 decode steps fed with
    HF's greedy continuation (each row at its own position; their argmax must be those tokens), then
    (`generate`) `ferrum_jax.generate`'s greedy tokens."""
    # The integer-dot kernels a GPU runs by default at decode round the activations to int8 (~1e-2
    # relative, tests/test_moe_decode_quant.py): parity within ATOL is the exact path's promise.
    model = dataclasses.replace(model, ops=dataclasses.replace(model.ops, exact=True))
    prompts = [_prompt(10, PROMPT_LEN), _prompt(11, PROMPT_LEN - 7)]
    with record_dispatch() as log:
        logits = prefill_logits(model, prompts)
    assert set(summarize(log)["moe_experts"].split(",")) & PACKED, summarize(log)  # a packed stack ran packed
    diff = max(float(np.abs(logits[i, : len(p)] - _hf_logits(hf, p)).max()) for i, p in enumerate(prompts))
    print(f"\n[gguf moe] {label:14s} prefill max|ferrum - hf| = {diff:.2e}")
    assert diff < ATOL

    tokens, positions, lengths = _batch(prompts)
    continuations = [_hf_greedy(hf, p, DECODE_STEPS) for p in prompts]
    refs = [_hf_logits(hf, p + c)[len(p) - 1: len(p) - 1 + DECODE_STEPS] for p, c in zip(prompts, continuations)]
    cfg, ops = model.config, model.ops
    logits, kv = _forward(model.weights, tokens, positions, _cache(model), lengths - 1, cfg=cfg, ops=ops,
                          kv_len=PROMPT_LEN)
    got = [np.asarray(logits)[:, 0]]
    for step in range(DECODE_STEPS - 1):
        fed = jnp.asarray([[c[step]] for c in continuations], jnp.int32)
        logits, kv = _forward(model.weights, fed, (lengths + step)[:, None], kv, cfg=cfg, ops=ops)
        got.append(np.asarray(logits)[:, 0])
    got = np.stack(got, axis=1)
    diff = max(float(np.abs(got[i] - refs[i]).max()) for i in range(len(prompts)))
    print(f"[gguf moe] {label:14s} decode  max|ferrum - hf| = {diff:.2e}")
    assert diff < ATOL
    assert [g.argmax(-1).tolist() for g in got] == continuations
    if not generate:
        return

    gen_prompts = [_prompt(30, 17), _prompt(31, 9)]
    for prompt, completion in zip(gen_prompts, ferrum_jax.generate(model, gen_prompts, max_tokens=GEN_TOKENS)):
        want = _hf_greedy(hf, prompt, GEN_TOKENS)
        assert completion.token_ids == want
        print(f"[gguf moe] {label:14s} generate: {len(set(want))} distinct of {len(want)} tokens")


BUILDERS = {"qwen3moe": qwen3moe, "qwen2moe": qwen2moe, "mixtral": mixtral}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_moe")
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            path, hf, meta, stored = make_case(root, BUILDERS[name], name)
            model = ferrum_jax.load(path, dtype="float32", dequantize=False, progress=False)
            built[name] = (path, hf, meta, stored, model)
        return built[name]

    return get


# --- against transformers ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_gguf_moe_matches_hf(name, cases):
    _, hf, _, stored, model = cases(name)
    cfg = model.config
    assert models.family_of(cfg) is models.moe
    assert cfg.architecture == {"qwen3moe": "Qwen3MoeForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM",
                                "mixtral": "MixtralForCausalLM"}[name]
    assert cfg.norm_topk_prob == (name != "qwen2moe")
    if name == "qwen3moe":
        assert cfg.sparse == (True, False, True)
    if name == "qwen2moe":
        assert cfg.shared_expert_intermediate_size == 128
        assert stored["blk.0.ffn_gate_inp_shexp.weight"][0].shape == (HIDDEN,)  # squeezed, as llama.cpp's
    if name == "mixtral":
        assert cfg.attn[0].window == 8
    # Quantized stacks stay packed on device: repacked into the kernel layout (QuantWeight) where
    # their type has one, else the file's blocks (GGUFWeight); dense ones (F32/F16/BF16) are arrays.
    for i, layer in enumerate(model.weights.layers):
        if not cfg.sparse[i]:
            continue
        moe = layer.mlp
        assert isinstance(moe, Moe)
        if moe.up is None:  # fused at load: [gate_e; up_e] rows per expert (dense, or packed of one format)
            names = [f"blk.{i}.ffn_{proj}_exps.weight" for proj in ("gate", "up")]
            types = {stored[n][1] for n in names}
            values = dequantized({n: stored[n] for n in names})  # the gguf package's decoding
            want = np.concatenate([values[n] for n in names], axis=1)
            if types <= {"F32", "F16", "BF16"}:
                np.testing.assert_array_equal(np.asarray(moe.gate), want)
            else:
                assert len(types) == 1 and isinstance(moe.gate, QuantWeight) and moe.gate.fmt.name in types
                np.testing.assert_allclose(np.asarray(moe.gate.dequantize()), want, rtol=1e-6, atol=1e-6)
        for stack, proj in ((moe.gate, "gate"), (moe.up, "up"), (moe.down, "down")):
            if stack is None or (proj == "gate" and moe.up is None):
                continue
            data, qtype = stored[f"blk.{i}.ffn_{proj}_exps.weight"]
            if qtype in ("F32", "F16", "BF16"):
                assert isinstance(stack, jax.Array) and stack.dtype == jnp.float32
            elif qtype in GGUF_FORMATS:
                assert isinstance(stack, QuantWeight) and stack.fmt.name == qtype
                assert stack.shape[:2] == data.shape[:2] and stack.lo.shape[0] == cfg.num_experts
            else:
                assert isinstance(stack, GGUFWeight) and stack.ggml_type == qtype
                assert stack.data.dtype == jnp.uint8 and stack.data.nbytes == data.nbytes
                assert stack.shape[0] == cfg.num_experts and stack.data.shape[0] == cfg.num_experts
    check_against_hf(model, hf, name, generate=name != "qwen2moe")  # (the time of a compile)


def _skew(hf) -> None:
    """Every token to expert 5 first (6 second): embedding channel 0 large and positive for every token,
    so the post-norm hidden state's channel 0 is too, and router rows 5 and 6 weigh that channel."""
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 0] = 6.0
        for layer in hf.model.layers:
            router = layer.mlp.gate.weight
            router[:, 1:] *= 0.3
            router[5, 0] += 3.0
            router[6, 0] += 2.0


def test_skewed_routing(tmp_path):
    """Prefill (the per-expert scan: six of eight experts get no token and are skipped) and decode (the
    gathered experts) on a Qwen3-MoE whose router sends every token to expert 5 first and 6 second."""
    path, hf, _, _ = make_case(tmp_path, partial(qwen3moe, seed=34, layers=2, dense=()), "skewed", tweak=_skew)
    ids = _prompt(12, PROMPT_LEN)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=False, output_router_logits=True)
    for logits in out.router_logits:
        top = torch.topk(logits, 2, dim=-1).indices
        assert (top[:, 0] == 5).all() and (top[:, 1] == 6).all(), top
    model = ferrum_jax.load(path, dtype="float32", dequantize=False, progress=False)
    check_against_hf(model, hf, "qwen3moe-skewed", generate=False)


def test_dense_stacks_and_per_expert_files(cases, tmp_path):
    """dequantize=True (every stack dense: the "xla" reference) and an old per-expert Mixtral file
    (`blk.N.ffn_gate.E.weight`, stacked at load) give the packed model's logits."""
    path, _, meta, stored, model = cases("mixtral")
    prompts = [_prompt(13, PROMPT_LEN), _prompt(14, PROMPT_LEN - 3)]
    want = prefill_logits(model, prompts)

    dense = ferrum_jax.load(path, dtype="float32", dequantize=True, progress=False)
    assert isinstance(dense.weights.layers[1].mlp.gate, jax.Array)
    with record_dispatch() as log:
        got = prefill_logits(dense, prompts)
    assert set(summarize(log)["moe_experts"].split(",")) <= DENSE, summarize(log)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # all experts at once vs one by one

    split = {}
    for name, (data, qtype) in stored.items():
        parts = name.split(".")
        if parts[-2].endswith("_exps"):
            for e in range(data.shape[0]):
                split[f"blk.{parts[1]}.{parts[2][:-len('_exps')]}.{e}.weight"] = (data[e], qtype)
        else:
            split[name] = (data, qtype)
    legacy = ferrum_jax.load(write_gguf(tmp_path / "per-expert.gguf", "llama", meta, split), dtype="float32",
                             dequantize=False, progress=False)
    g = legacy.weights.layers[1].mlp.gate  # stacked at load, then repacked (Q6_K has a kernel layout)
    assert isinstance(g, QuantWeight) and g.fmt.name == "Q6_K" and g.lo.shape[0] == 4
    np.testing.assert_array_equal(prefill_logits(legacy, prompts), want)

    # one expert of another type: no stack
    name = "blk.1.ffn_up.2.weight"
    x = dequantized({name: split[name]})[name]
    bad = dict(split, **{name: (_quantize(x, "Q8_0", np.random.default_rng(0)), "Q8_0")})
    with pytest.raises(CheckpointError, match=r"'blk\.1\.ffn_up\.2\.weight' is Q8_0 but 'blk\.1\.ffn_up\.0\.weight' "
                                              "is Q4_K"):
        ferrum_jax.load(write_gguf(tmp_path / "mixed.gguf", "llama", meta, bad), dtype="float32",
                        dequantize=False, progress=False)


# --- the packed reference against the dense one ------------------------------------------------------


def _packed_stack(rng, qtype: str, e: int, rows: int, cols: int) -> tuple[GGUFWeight, np.ndarray]:
    x = (rng.standard_normal((e, rows, cols)) * cols ** -0.5).astype(np.float32)
    data = _quantize(x, qtype, rng)
    if qtype in ("F32", "F16"):
        return jnp.asarray(data.astype(np.float32)), data.astype(np.float32)
    w = GGUFWeight.from_numpy(data, qtype, (e, rows, cols))
    return w, gguf.quants.dequantize(data, T[qtype]).astype(np.float32)


@pytest.mark.parametrize("tokens", [1, 40])
@pytest.mark.parametrize("fused", [False, True])
def test_packed_experts_match_dense(tokens, fused):
    rng = np.random.default_rng(5)
    e, f, h, k = 8, 256, 256, 2
    gate, gate_d = _packed_stack(rng, "Q6_K" if fused else "Q4_K", e, 2 * f if fused else f, h)
    up, up_d = (None, None) if fused else _packed_stack(rng, "Q8_0", e, f, h)
    down, down_d = _packed_stack(rng, "F32" if fused else "Q6_K", e, h, f)  # fused: a dense stack mixed in
    x = rng.standard_normal((2, tokens, h)).astype(np.float32)
    weights, ids = DEFAULT_OPS.moe_route(jnp.asarray(x), jnp.asarray(rng.standard_normal((e, h)), jnp.float32),
                                         top_k=k, norm_topk_prob=True)
    run = jax.jit(partial(DEFAULT_OPS.moe_experts, kind="silu"))
    with record_dispatch() as log:
        got = run(x, ids, weights, gate, up, down)
    assert set(summarize(log)["moe_experts"].split(",")) <= PACKED, summarize(log)
    want = run(x, ids, weights, jnp.asarray(gate_d), None if up_d is None else jnp.asarray(up_d), jnp.asarray(down_d))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)

    # Expert parallel: the two halves of the stack with their offsets add up to the whole.
    halves = [run(x, ids, weights, *[None if w is None else w[lo: lo + e // 2] for w in (gate, up, down)],
                  expert_offset=jnp.int32(lo)) for lo in (0, e // 2)]
    np.testing.assert_allclose(np.asarray(halves[0] + halves[1]), np.asarray(got), rtol=1e-5, atol=1e-5)


def _largest_float(jaxpr) -> int:
    """The most elements of any floating-point value computed anywhere in a jaxpr (sub-jaxprs of
    scan / cond / pjit included)."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            if jnp.issubdtype(v.aval.dtype, jnp.floating):
                biggest = max(biggest, int(np.prod(v.aval.shape)))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _largest_float(inner))
    return biggest


@pytest.mark.parametrize("tokens", [1, 64])
def test_packed_experts_never_hold_the_dense_stack(tokens):
    """Decode dequantizes only the gathered experts (k of E); prefill one expert at a time."""
    rng = np.random.default_rng(6)
    e, f, h, k = 16, 256, 256, 2
    gate, up, down = (_packed_stack(rng, "Q8_0", e, f, h)[0], _packed_stack(rng, "Q4_K", e, f, h)[0],
                      _packed_stack(rng, "Q8_0", e, h, f)[0])
    x = jnp.ones((1, tokens, h), jnp.float32)
    ids = jnp.zeros((1, tokens, k), jnp.int32)
    weights = jnp.full((1, tokens, k), 0.5, jnp.float32)
    jaxpr = jax.make_jaxpr(partial(DEFAULT_OPS.moe_experts, kind="silu"))(x, ids, weights, gate, up, down)
    biggest = _largest_float(jaxpr.jaxpr)
    if tokens == 1:
        assert biggest <= k * f * h  # the two gathered experts
    else:
        assert biggest <= max(f * h, tokens * max(f, h))  # one expert's matrix, or the activations


# --- errors ------------------------------------------------------------------------------------------


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def test_errors_name_the_tensor_or_key(cases, tmp_path):
    _, _, meta, stored, _ = cases("qwen2moe")
    load = partial(ferrum_jax.load, dtype="float32", dequantize=False, progress=False)

    bad = write_gguf(tmp_path / "no-up.gguf", "qwen2moe", meta, _without(stored, "blk.1.ffn_up_exps.weight"))
    with pytest.raises(CheckpointError, match=r"no tensor 'blk\.1\.ffn_up_exps\.weight'.*\(8, 256, 256\)") as e:
        load(bad)
    assert str(bad) in str(e.value)

    bad = write_gguf(tmp_path / "no-shexp.gguf", "qwen2moe", meta, _without(stored, "blk.0.ffn_gate_inp_shexp.weight"))
    with pytest.raises(CheckpointError, match=r"no tensor 'blk\.0\.ffn_gate_inp_shexp\.weight'"):
        load(bad)

    for key in ("qwen2moe.expert_used_count", "qwen2moe.expert_feed_forward_length",
                "qwen2moe.expert_shared_feed_forward_length", "qwen2moe.expert_count"):
        bad = write_gguf(tmp_path / "no-key.gguf", "qwen2moe", _without(meta, key), stored)
        with pytest.raises(ConfigError, match=f"'{key}' is missing") as e:
            load(bad)
        assert str(bad) in str(e.value)

    bad = write_gguf(tmp_path / "count.gguf", "qwen2moe", meta | {"qwen2moe.expert_count": 6}, stored)
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_gate_inp\.weight' has shape \(8, 256\).*\(6, 256\)"):
        load(bad)

    bad = write_gguf(tmp_path / "used.gguf", "qwen2moe", meta | {"qwen2moe.expert_used_count": 9}, stored)
    with pytest.raises(ConfigError, match="num_experts_per_tok=9 exceeds the 8 experts"):
        load(bad)
