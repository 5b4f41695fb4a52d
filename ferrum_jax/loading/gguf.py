"""Load GGUF checkpoints (llama.cpp's format) into a model family's config and weights pytree.

    cfg, weights, metadata = load_gguf("model.Q4_K_M.gguf", dtype=jnp.bfloat16)

The file is read through `gguf.GGUFReader` (memory-mapped: only the tensor being placed is paged
in). The whole file is checked from its header first (architecture, hyper-parameters, every
expected tensor present with the shape the metadata implies, every ggml type supported) before a
single tensor is moved; then tensors are placed one at a time with a progress bar, and if anything
fails midway every array already placed is deleted before the error propagates.

Config. `general.architecture` and the `<arch>.*` keys become an HF-style config dict
(`gguf_config_dict`) handed to `models.config_from_hf`, so a GGUF and an HF checkpoint of the same
model give the same Config. Supported: llama (Llama 2/3.x, Mistral, SmolLM, ...), qwen2, qwen3,
gemma3, and the MoE architectures (models.moe) qwen3moe, qwen2moe (shared expert) and llama files
with `llama.expert_count` > 0 (Mixtral). What llama.cpp hard-codes rather than stores is
reproduced here: Gemma 3's every-6th-layer-global pattern, its local rope base 10000 and its
attention scale (head_dim^-1/2, hidden/heads for the 62-layer 27B); Llama 3.x rope scaling, which
the converter stores only as the `rope_freqs.weight` tensor of per-frequency divisors, is recovered
as HF's "llama3" rope parameters (and checked to reproduce it); the top-k routing weights are
renormalised for qwen3moe and Mixtral, not for qwen2moe.

Tensors. GGUF names (`blk.N.attn_q.weight`, ...) map onto the HF names of the family's
`tensor_shapes(cfg)`; GGUF lists dims innermost first, so our [out, in] is the reversed GGUF
shape. Two conventions of llama.cpp's converter are undone at load (both as transformers' GGUF
loader does, `LlamaTensorProcessor` and `Gemma2TensorProcessor`):
  * arch "llama": the rows of attn_q / attn_k (weights and biases) are permuted per head from HF's
    rotate-half order to the interleaved order of ggml's rope. The inverse row permutation is
    applied here; rows are whole ggml blocks, so it works on quantized data as well.
  * arch "gemma3": every `*norm.weight` is stored as 1 + w (ggml's RMSNorm multiplies by w, Gemma's
    by 1 + w). We subtract 1 (in float32) since our Gemma model applies the + 1 itself.
qwen2 / qwen3 / gemma3 rope already uses the rotate-half (NEOX) order: no permutation.

MoE tensors. Each sparse layer has the router `ffn_gate_inp` [experts, hidden] and the expert stacks
`ffn_{gate,up,down}_exps` (numpy shape [experts, out, in]); qwen2moe adds the shared expert
`ffn_{gate,up,down}_shexp` and its gate `ffn_gate_inp_shexp` (stored 1-D [hidden]: the converter
squeezes HF's [1, hidden]). They map onto models.moe's stacked names (`tensor_shapes(cfg,
stacked=True)`). Old Mixtral files with one tensor per expert (`blk.N.ffn_gate.E.weight`) load too,
stacked at load. A qwen moe layer that has a dense `ffn_gate` and no router is a dense layer
(`mlp_only_layers`).

Storage. Quantized 2-D tensors (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K) stay packed on device as
`ferrum_jax.quant.GGUFWeight` (uint8 blocks, dequantized inside the jitted matmul / embedding
gather), and so do quantized 3-D expert stacks (a GGUFWeight [experts, out, in]: the file's blocks
with a leading expert axis; `moe_ops` decodes only the experts it reads); F32/F16/BF16 tensors
become dense arrays of the target dtype, and so do 1-D tensors (norm weights, biases) whatever
their type. Other types (IQ*, TQ*, ...) are refused up front with a
CheckpointError naming the tensor and its type. `dequantize=True` turns every weight into a dense
array at load instead (faster on the CPU, where XLA does not fuse the block decoding into the
matmul as well; needs the memory of a dense model).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

import models
from ferrum_jax.errors import (
    CheckpointError,
    ConfigError,
    FerrumError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from ferrum_jax.quant import GGUFWeight, layout_for
from ferrum_jax.rope import Rope

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# GGUF architecture -> the HF architecture its config dict gets. Only those whose HF architecture is
# in `models.ARCHITECTURES` load.
HF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",  # also Mistral (llama.cpp writes it as "llama"), and Mixtral (with experts)
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}

_FLOAT_TYPES = ("F32", "F16", "BF16")
_HOST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}

# HF tensor names (after the "model." / "layers.N." prefix) -> GGUF names (after "blk.N.").
_GLOBAL_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
_ATTN_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# models.moe (stacked names, see models.moe.stack_names); the same in gguf's own name map.
_MOE_NAMES = {
    "mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.gate_proj.weight": "ffn_gate_exps.weight",
    "block_sparse_moe.experts.w1.weight": "ffn_gate_exps.weight",
    "mlp.experts.up_proj.weight": "ffn_up_exps.weight", "block_sparse_moe.experts.w3.weight": "ffn_up_exps.weight",
    "mlp.experts.down_proj.weight": "ffn_down_exps.weight",
    "block_sparse_moe.experts.w2.weight": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
# Per-expert HF names -> the per-expert tensors of old Mixtral GGUF files (`blk.N.ffn_gate.E.weight`).
_EXPERT_NAME = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
_EXPERT_PROJ = {"gate_proj": "ffn_gate", "w1": "ffn_gate", "up_proj": "ffn_up", "w3": "ffn_up",
                "down_proj": "ffn_down", "w2": "ffn_down"}
_LAYER_NAMES = {
    "llama": _ATTN_NAMES | _MOE_NAMES | {"input_layernorm.weight": "attn_norm.weight",
                                         "post_attention_layernorm.weight": "ffn_norm.weight"},
    "gemma3": _ATTN_NAMES | {"input_layernorm.weight": "attn_norm.weight",
                             "post_attention_layernorm.weight": "post_attention_norm.weight",
                             "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                             "post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
}


# --- reading the file ------------------------------------------------------------------------------


class _Reader(gguf.GGUFReader):
    """`gguf.GGUFReader` with a fast parse of array fields. The stock reader makes one recursive call
    and one `np.memmap` slice (with the subclass's per-slice bookkeeping) per array element, which
    takes ~20 s for a 262k-token vocabulary (its tokens, scores and types); here `_get` slices a
    plain ndarray view of the same memmap and arrays of strings / scalars are read in one loop:
    under a second. The resulting fields and tensors are identical (same parts, data indices and
    types; tensor `data` are ndarray views of the same mapping), so it is a drop-in GGUFReader."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        buf = self.__dict__.get("_buf")
        if buf is None:
            buf = self._buf = self.data.view(np.ndarray)
        count = int(count)
        dtype = np.dtype(dtype)
        arr = buf[offset: offset + dtype.itemsize * count].view(dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
        # Arrays (the vocabulary, its scores and types, the merges) in one tight loop instead of one
        # recursive call per element; the parts, indices and types are exactly those the generic
        # path builds (one part per scalar element, a [length, bytes] pair per string).
        if raw_type != _ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        itype = int(raw_itype[0])
        alen = self._get(orig_offs + 4, np.uint64)
        n = int(alen[0])
        buf, offs = self._buf, orig_offs + 12
        parts: list[np.ndarray] = [raw_itype, alen]
        if itype == _STRING:
            idxs: list[int] = []
            for _ in range(n):
                slen = buf[offs: offs + 8].view(_U64)
                size = int(slen[0])
                if offs + 8 + size > len(buf):
                    raise ValueError(f"string at offset {offs} runs past the end of the file")
                parts.append(slen)
                parts.append(buf[offs + 8: offs + 8 + size])
                idxs.append(len(parts) - 1)
                offs += 8 + size
        elif itype in _SCALARS:
            dtype = _SCALARS[itype]
            values = buf[offs: offs + n * dtype.itemsize].view(dtype)
            if len(values) != n:
                raise ValueError(f"array at offset {orig_offs} runs past the end of the file")
            parts += [values[i: i + 1] for i in range(n)]
            idxs = list(range(2, 2 + n))
            offs += n * dtype.itemsize
        else:  # nested arrays: the generic path
            return super()._get_field_parts(orig_offs, raw_type)
        types = [gguf.GGUFValueType.ARRAY] + ([gguf.GGUFValueType(itype)] if n else [])
        return offs - orig_offs, parts, idxs, types


_ARRAY, _STRING = int(gguf.GGUFValueType.ARRAY), int(gguf.GGUFValueType.STRING)
_U64 = np.dtype(np.uint64)
_SCALARS = {int(k): np.dtype(v) for k, v in gguf.GGUFReader.gguf_scalar_to_np.items()}


def open_reader(path: str | Path) -> gguf.GGUFReader:
    """A `gguf.GGUFReader` over the file (memory-mapped), with clean errors: ModelNotFoundError for
    a missing path, CheckpointError naming the file for anything that is not a readable GGUF file
    (bad magic, unsupported version, truncated header or tensor data, offsets past the end)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF path {path} is not a file")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({_one_line(e)})") from e
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return _Reader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, OSError) as e:
        # The reader slices its memmap and reshapes: data cut short shows up as a failed reshape or
        # view, an out-of-range read as an index error.
        msg = _one_line(e)
        hint = ""
        if any(s in msg for s in ("reshape", "view", "index", "out of bounds", "size", "past the end")):
            hint = " (truncated or corrupt: a tensor's data or a header field runs past the end of the file)"
        raise CheckpointError(f"{path}: unreadable GGUF file of {size} bytes{hint}: {msg}") from e


class GGUFMetadata(Mapping[str, Any]):
    """The GGUF key/values of a file as Python values (str, int, float, bool, lists), parsed on first
    access. `reader` is the underlying `gguf.GGUFReader` (its `fields` keep the raw parts, e.g.
    for the tokenizer's big arrays); `config` is the HF-style config dict the model was built from."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.reader = reader
        self.path = path
        self.config: dict[str, Any] = {}
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            field = self.reader.fields[key]  # KeyError for a missing key, as a Mapping should
            try:
                self._cache[key] = field.contents()
            except (ValueError, UnicodeDecodeError) as e:
                raise ConfigError(f"{self.path}: GGUF metadata key {key!r} cannot be decoded ({_one_line(e)})")
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.fields)

    def __len__(self) -> int:
        return len(self.reader.fields)

    def __contains__(self, key: object) -> bool:
        return key in self.reader.fields

    def __repr__(self) -> str:
        return f"GGUFMetadata({str(self.path)!r}, {len(self)} keys)"

    @property
    def architecture(self) -> str:
        return self.req("general.architecture", str)

    def array_len(self, key: str) -> int | None:
        """Length of an array-valued key without decoding it (None if absent)."""
        field = self.reader.fields.get(key)
        return None if field is None else len(field.data)

    # Typed access with errors naming the file and key.

    def get_as(self, key: str, kind: type, default: Any = None) -> Any:
        if key not in self:
            return default
        value = self[key]
        if isinstance(value, list) and kind is not list:
            # Some converters write per-layer arrays; a constant one is the scalar.
            if value and all(v == value[0] for v in value):
                value = value[0]
            else:
                raise ConfigError(f"{self.path}: GGUF metadata key {key!r} has per-layer values {value!r:.80}; "
                                  "only one value for all layers is supported")
        try:
            if kind is int and (isinstance(value, bool) or not float(value).is_integer()):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.path}: GGUF metadata key {key!r} = {value!r:.80} is not a valid "
                              f"{kind.__name__}") from None

    def req(self, key: str, kind: type = int) -> Any:
        if key not in self:
            raise ConfigError(f"{self.path}: required GGUF metadata key {key!r} is missing")
        return self.get_as(key, kind)


def read_metadata(path: str | Path) -> GGUFMetadata:
    """Open the file and wrap its key/values (see `GGUFMetadata`)."""
    path = Path(path).expanduser()
    return GGUFMetadata(open_reader(path), path)


# --- config ----------------------------------------------------------------------------------------


def gguf_config_dict(meta: GGUFMetadata, tensors: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The HF-style config dict (transformers 5 layout, `rope_parameters`) the GGUF metadata
    describes. `tensors` (GGUF name -> ReaderTensor; the reader's by default) decides
    tie_word_embeddings (no `output.weight`) and Llama 3 rope scaling (`rope_freqs.weight`)."""
    if tensors is None:
        tensors = {t.name: t for t in meta.reader.tensors}
    arch = meta.architecture
    if arch not in HF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{meta.path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(a for a, hf in HF_ARCHITECTURES.items() if hf in models.ARCHITECTURES)}")
    a = arch + "."
    hidden = meta.req(a + "embedding_length")
    heads = meta.req(a + "attention.head_count")
    kv_heads = meta.get_as(a + "attention.head_count_kv", int, heads)
    head_dim = meta.get_as(a + "attention.key_length", int)
    if head_dim is None:
        if heads <= 0 or hidden % heads:
            raise ConfigError(f"{meta.path}: {a}embedding_length={hidden} is not divisible by "
                              f"{a}attention.head_count={heads} and {a}attention.key_length is not given")
        head_dim = hidden // heads
    value_dim = meta.get_as(a + "attention.value_length", int, head_dim)
    if value_dim != head_dim:
        raise ConfigError(f"{meta.path}: {a}attention.value_length={value_dim} differs from key_length={head_dim}; "
                          "only equal key and value head sizes are supported")
    vocab = meta.get_as(a + "vocab_size", int)
    if vocab is None:
        vocab = meta.array_len("tokenizer.ggml.tokens")
        if vocab is None:
            raise ConfigError(f"{meta.path}: required GGUF metadata key {a + 'vocab_size'!r} is missing "
                              "(and there is no tokenizer.ggml.tokens to count)")
    num_layers = meta.req(a + "block_count")
    max_pos = meta.req(a + "context_length")
    experts = meta.get_as(a + "expert_count", int, 0)
    if experts and a + "feed_forward_length" not in meta:  # the dense MLP size: unused without dense layers
        ffn = meta.req(a + "expert_feed_forward_length")
    else:
        ffn = meta.req(a + "feed_forward_length")

    d: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta.req(a + "attention.layer_norm_rms_epsilon", float),
        "max_position_embeddings": max_pos,
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    rope_dim = meta.get_as(a + "rope.dimension_count", int, head_dim)
    if rope_dim != head_dim:
        d["partial_rotary_factor"] = rope_dim / head_dim
    theta = meta.get_as(a + "rope.freq_base", float, 10000.0)
    rope = _rope_parameters(meta, a, theta, rope_dim, tensors)
    d["rope_theta"] = theta

    window = meta.get_as(a + "attention.sliding_window", int)
    if experts or arch in ("qwen2moe", "qwen3moe"):
        d |= _moe_fields(meta, a, arch, experts, num_layers, tensors)

    if arch == "gemma3":
        d |= _gemma3_fields(meta, a, num_layers, hidden, heads, head_dim, window, theta, rope)
    else:
        d["rope_parameters"] = rope | {"rope_theta": theta}
        d["hidden_act"] = "silu"
        # No key says so: like llama.cpp, take attention biases from the tensors that are there.
        d["attention_bias"] = arch == "llama" and "blk.0.attn_q.bias" in tensors
        if window:  # llama.cpp ignores it for these archs; a Mistral-style file that has it gets it
            if arch == "llama" and not experts:
                d["architectures"] = ["MistralForCausalLM"]
                d["sliding_window"] = window
            else:
                d |= {"sliding_window": window, "use_sliding_window": False}
    return d


def _moe_fields(meta: GGUFMetadata, a: str, arch: str, experts: int, num_layers: int,
                tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The MoE part of the config dict (models.moe reads it as it reads an HF config.json)."""
    if experts <= 0:
        raise ConfigError(f"{meta.path}: required GGUF metadata key {a + 'expert_count'!r} is missing or not positive "
                          f"(architecture {arch!r} is a mixture of experts)")
    d: dict[str, Any] = {"num_experts": experts, "num_local_experts": experts,
                         "num_experts_per_tok": meta.req(a + "expert_used_count")}
    if arch == "llama":  # Mixtral: the experts are feed_forward_length wide; top-k always renormalised
        d["architectures"] = ["MixtralForCausalLM"]
        return d
    d["moe_intermediate_size"] = meta.req(a + "expert_feed_forward_length")
    # llama.cpp renormalises the top-k routing weights for qwen3moe, never for qwen2moe.
    d["norm_topk_prob"] = arch == "qwen3moe"
    # llama.cpp knows no dense layers in these archs; a layer with a dense MLP and no router is one.
    dense = [i for i in range(num_layers)
             if f"blk.{i}.ffn_gate_inp.weight" not in tensors and f"blk.{i}.ffn_gate.weight" in tensors]
    d |= {"decoder_sparse_step": 1, "mlp_only_layers": dense}
    if arch == "qwen2moe":
        key = a + "expert_shared_feed_forward_length"
        if key in meta:
            d["shared_expert_intermediate_size"] = meta.req(key)
        elif any(name.endswith(".ffn_gate_shexp.weight") for name in tensors):
            raise ConfigError(f"{meta.path}: required GGUF metadata key {key!r} is missing (the file has shared "
                              "expert tensors ffn_*_shexp)")
    return d


def _rope_parameters(meta: GGUFMetadata, a: str, theta: float, rope_dim: int,
                     tensors: Mapping[str, Any]) -> dict[str, Any]:
    kind = meta.get_as(a + "rope.scaling.type", str)
    factor = meta.get_as(a + "rope.scaling.factor", float)
    if kind is None and meta.get_as(a + "rope.scale_linear", float) is not None:  # the old key
        kind, factor = "linear", meta.get_as(a + "rope.scale_linear", float)
    original = meta.get_as(a + "rope.scaling.original_context_length", int)
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None:
        if kind not in (None, "none"):
            raise ConfigError(f"{meta.path}: both rope_freqs.weight and {a}rope.scaling.type={kind!r}; "
                              "this combination is not supported")
        return _llama3_rope(meta, freqs, theta, rope_dim, original)
    if kind in (None, "none") or (kind == "linear" and (factor or 1.0) == 1.0):
        return {"rope_type": "default"}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        p: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor or 1.0)}
        if original:
            p["original_max_position_embeddings"] = original
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            v = meta.get_as(a + "rope.scaling." + key, float)
            if v:
                p[hf] = v
        return p
    raise ConfigError(f"{meta.path}: GGUF metadata key {a + 'rope.scaling.type'!r} = {kind!r} is not supported "
                      "(supported: none, linear, yarn)")


def _llama3_rope(meta: GGUFMetadata, tensor: Any, theta: float, dim: int, original: int | None) -> dict[str, Any]:
    """HF "llama3" rope parameters from llama.cpp's `rope_freqs.weight` (the per-frequency divisors of
    the inverse frequencies: 1 for high frequencies, `factor` for low ones, smooth in between).

    The file keeps only the divisors, and they fix only the band edges relative to the original
    context (low/original, high/original): the defaults (1, 4, original 8192 or the file's
    original_context_length) are tried first, else the edges are fitted to the smooth band; either
    is accepted only if it reproduces the divisors."""
    where = f"{meta.path}: rope_freqs.weight"
    if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
        raise CheckpointError(f"{where} has type {tensor.tensor_type.name}, expected F32")
    divisors = np.asarray(tensor.data, np.float64).reshape(-1)
    if divisors.size != dim // 2:
        raise CheckpointError(f"{where} has {divisors.size} entries, expected rope dimension / 2 = {dim // 2}")
    if np.allclose(divisors, 1.0):
        return {"rope_type": "default"}
    factor = float(divisors.max())
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)).astype(np.float32)
    want = (inv / divisors).astype(np.float32)
    orig = original or 8192

    def params(low: float, high: float) -> dict[str, Any]:
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": orig}

    def reproduces(p: dict[str, Any]) -> bool:
        got = Rope(theta=theta, dim=dim, kind="llama3", factor=factor, low_freq_factor=p["low_freq_factor"],
                   high_freq_factor=p["high_freq_factor"], original_max_positions=orig).inv_freq()
        return bool(np.allclose(got, want, rtol=1e-4, atol=0))

    # In u = 1/wavelen: u < L = low/orig -> factor, u > H = high/orig -> 1, else smooth
    # s = (1/div - 1/factor) / (1 - 1/factor) = (u - L) / (H - L).
    candidates = [params(1.0, 4.0)]
    u = inv.astype(np.float64) / (2 * math.pi)
    medium = (divisors > 1.0 + 1e-6) & (divisors < factor * (1 - 1e-6))
    s = (1.0 / divisors - 1.0 / factor) / (1.0 - 1.0 / factor)
    if medium.sum() >= 2:  # two or more points of the smooth band fix L and H
        slope, intercept = np.polyfit(u[medium], s[medium], 1)
        if slope > 0:
            low_rel = -intercept / slope
            candidates.append(params(low_rel * orig, (low_rel + 1.0 / slope) * orig))
    elif medium.sum() == 1:  # one point: keep the default H = 4 L
        low_rel = float(u[medium][0] / (1.0 + 3.0 * s[medium][0]))
        candidates.append(params(low_rel * orig, 4.0 * low_rel * orig))
    else:  # no smooth band: put both edges in the gap between scaled and unscaled frequencies
        scaled, unscaled = u[divisors >= factor * (1 - 1e-6)], u[divisors <= 1.0 + 1e-6]
        lo, hi = (scaled.max() if scaled.size else u.min() / 2), (unscaled.min() if unscaled.size else u.max() * 2)
        low_rel = math.sqrt(lo * hi)
        candidates.append(params(low_rel * orig, math.sqrt(low_rel * hi) * orig))
    for p in candidates:
        if reproduces(p):
            return p
    raise ConfigError(f"{where} holds rope frequency divisors that match no Llama-3 rope scaling")


def _gemma3_fields(meta: GGUFMetadata, a: str, num_layers: int, hidden: int, heads: int, head_dim: int,
                   window: int | None, theta: float, rope: dict[str, Any]) -> dict[str, Any]:
    """What llama.cpp's gemma3 hard-codes: with a sliding window, every 6th layer global and the
    others local (unless the file has `attention.sliding_window_pattern`), local layers with rope base
    10000 (or `rope.freq_base_swa`) and no scaling; attention scale head_dim^-1/2 except for the
    62-layer 27B (hidden / heads), as gemma_pytorch and HF's query_pre_attn_scalar have it."""
    if window:
        pattern = meta[a + "attention.sliding_window_pattern"] if a + "attention.sliding_window_pattern" in meta else 6
        if isinstance(pattern, list):  # llama.cpp: true = sliding-window layer
            if len(pattern) != num_layers:
                raise ConfigError(f"{meta.path}: {a}attention.sliding_window_pattern has {len(pattern)} entries "
                                  f"for {num_layers} layers")
            sliding = [bool(p) for p in pattern]
        else:
            n = int(pattern)
            sliding = [n > 0 and i % n < n - 1 for i in range(num_layers)]
    else:
        sliding = [False] * num_layers
    local_theta = meta.get_as(a + "rope.freq_base_swa", float, 10000.0)
    scalar = hidden // heads if num_layers == 62 else head_dim
    d: dict[str, Any] = {
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "sliding_window": window or 4096,
        "rope_parameters": {"full_attention": rope | {"rope_theta": theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        "rope_local_base_freq": local_theta,
        "query_pre_attn_scalar": scalar,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    }
    softcap = meta.get_as(a + "final_logit_softcapping", float)
    if softcap:
        d["final_logit_softcapping"] = softcap
    return d


def read_config(meta: GGUFMetadata) -> Any:
    """The family Config of a GGUF file (UnsupportedArchitectureError / ConfigError naming the file)."""
    d = gguf_config_dict(meta)
    meta.config = d
    hf_arch = d["architectures"][0]
    if hf_arch not in models.ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{meta.path}: GGUF architecture {meta.architecture!r} ({hf_arch}) is not supported yet; supported: "
            f"{', '.join(a for a, hf in HF_ARCHITECTURES.items() if hf in models.ARCHITECTURES)}")
    return models.config_from_hf(d, where=f"{meta.path} (GGUF metadata)")


# --- tensors ---------------------------------------------------------------------------------------


def expected_shapes(cfg: Any, *, split_experts: bool = False) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of what a GGUF file holds for `cfg`: the family's `tensor_shapes`,
    with MoE experts as [experts, out, in] stacks unless `split_experts` (old per-expert files)."""
    family = models.family_of(cfg)
    if family is models.moe:
        return family.tensor_shapes(cfg, stacked=not split_experts)
    return family.tensor_shapes(cfg)


def _split_experts(cfg: Any, by_name: Mapping[str, Any]) -> bool:
    """Whether the file stores one tensor per expert (old Mixtral files: `blk.N.ffn_gate.E.weight`)
    instead of the stacks (`blk.N.ffn_gate_exps.weight`)."""
    sparse = getattr(cfg, "sparse", ())
    if not any(sparse):
        return False
    i = sparse.index(True)
    return f"blk.{i}.ffn_gate_exps.weight" not in by_name and f"blk.{i}.ffn_gate.0.weight" in by_name


def gguf_tensor_names(cfg: Any, *, split_experts: bool = False) -> dict[str, str]:
    """HF tensor name (as `expected_shapes(cfg)` lists them) -> GGUF tensor name."""
    family = models.family_of(cfg)
    kind = "gemma3" if family.__name__.endswith("gemma3") else "llama"
    prefix = getattr(cfg, "prefix", "model.")
    out = {}
    for hf in expected_shapes(cfg, split_experts=split_experts):
        if hf == "lm_head.weight":
            out[hf] = "output.weight"
            continue
        rest = hf[len(prefix):] if hf.startswith(prefix) else None
        if rest is not None and rest in _GLOBAL_NAMES:
            out[hf] = _GLOBAL_NAMES[rest]
        elif rest is not None and rest.startswith("layers."):
            _, n, suffix = rest.split(".", 2)
            expert = _EXPERT_NAME.fullmatch(suffix)
            if expert is not None:
                out[hf] = f"blk.{n}.{_EXPERT_PROJ[expert.group(2)]}.{expert.group(1)}.weight"
            else:
                out[hf] = f"blk.{n}.{_LAYER_NAMES[kind][suffix]}"
        else:  # pragma: no cover - a family tensor this map does not know
            raise KeyError(f"no GGUF name for tensor {hf!r}")
    return out


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order undoing llama.cpp's `permute(w, n_head)`: GGUF row (h, j, half) holds HF row
    (h, half, j), j < head_dim / 2, so HF = GGUF[idx] with this idx."""
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(1, 2).reshape(-1)


@dataclass(frozen=True)
class _Plan:
    """One tensor to load: where it comes from and what happens to it on the way."""

    hf_name: str
    tensor: Any  # gguf ReaderTensor
    shape: tuple[int, ...]  # logical, [out, in]
    ggml_type: str
    packed: bool  # keep as GGUFWeight, else dense target dtype
    rows: np.ndarray | None  # row permutation to apply (llama q/k), or None
    norm_shift: float  # subtracted after dequantizing (Gemma's 1 + w norms)

    @property
    def nbytes(self) -> int:
        return int(self.tensor.n_bytes)


def plan_tensors(meta: GGUFMetadata, cfg: Any, *, dequantize: bool) -> list[_Plan]:
    """Check every tensor the config implies against the file's tensor infos (present, shape, type)
    and decide how each is loaded. Nothing is read from the tensor data."""
    if meta.reader.byte_order != "I":
        raise CheckpointError(f"{meta.path}: a GGUF file of the other byte order (big-endian) is not supported")
    by_name = {t.name: t for t in meta.reader.tensors}
    split = _split_experts(cfg, by_name)
    shapes = expected_shapes(cfg, split_experts=split)
    names = gguf_tensor_names(cfg, split_experts=split)
    arch = meta.architecture
    missing = [(hf, g) for hf, g in names.items() if g not in by_name]
    if missing:
        hf, g = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{meta.path}: GGUF file has no tensor {g!r} (for {hf}, expected shape "
                              f"{tuple(shapes[hf])}){more}")
    plans = []
    for hf, g in names.items():
        t = by_name[g]
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if shape != tuple(shapes[hf]) and _squeezed(shape) == _squeezed(shapes[hf]) and shape[-1] == shapes[hf][-1]:
            shape = tuple(shapes[hf])  # the converter squeezes size-1 dims (qwen2moe's ffn_gate_inp_shexp)
        if shape != tuple(shapes[hf]):
            raise CheckpointError(f"{meta.path}: tensor {g!r} has shape {shape} (GGUF dims "
                                  f"{tuple(int(x) for x in t.shape.tolist())}), but the metadata implies "
                                  f"{tuple(shapes[hf])} for {hf}")
        try:
            layout = layout_for(t.tensor_type, g)
            if layout.block_size > 1:
                GGUFWeight.byte_shape(layout.name, shape, g)  # the blocked dim must be whole blocks
        except CheckpointError as e:
            raise CheckpointError(f"{meta.path}: {e}") from None
        rows = None
        if arch == "llama" and g.split(".")[-2] in ("attn_q", "attn_k"):
            n_head = cfg.num_heads if g.split(".")[-2] == "attn_q" else cfg.num_kv_heads
            rows = _unpermute_rows(shape[0], n_head)
            if len(shape) == 1 and layout.block_size > 1:
                raise CheckpointError(f"{meta.path}: tensor {g!r} is a {layout.name}-quantized bias; its "
                                      "rope permutation cannot be undone (only F32/F16/BF16 biases are supported)")
        shift = 1.0 if arch == "gemma3" and g.endswith("norm.weight") else 0.0
        packed = layout.name not in _FLOAT_TYPES and len(shape) >= 2 and not dequantize and shift == 0.0
        plans.append(_Plan(hf, t, shape, layout.name, packed, rows, shift))
    if split:
        _check_expert_types(meta, plans)
    unused = sorted(set(by_name) - set(names.values()) - {"rope_freqs.weight"})
    if unused:
        logger.warning("ignoring %d tensors of %s that the model does not use: %s%s", len(unused), meta.path,
                       ", ".join(unused[:10]), ", ..." if len(unused) > 10 else "")
    return plans


def _check_expert_types(meta: GGUFMetadata, plans: list[_Plan]) -> None:
    """Per-expert tensors (`blk.N.ffn_gate.E.weight`) become one stack per layer and projection, so
    they must share one ggml type (as llama.cpp requires to merge them)."""
    first: dict[tuple[str, str], _Plan] = {}
    for p in plans:
        m = re.fullmatch(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.\d+\.weight", p.tensor.name)
        if m is None:
            continue
        seen = first.setdefault((m.group(1), m.group(2)), p)
        if seen.ggml_type != p.ggml_type:
            raise CheckpointError(f"{meta.path}: tensor {p.tensor.name!r} is {p.ggml_type} but {seen.tensor.name!r} is "
                                  f"{seen.ggml_type}; the experts of one layer's projection are stacked and must "
                                  "share one ggml type")


def _squeezed(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if int(d) != 1)


def _dequantize_on_device(w: GGUFWeight, dtype: Any, shift: float) -> jax.Array:
    return _dequant_fn(jnp.dtype(dtype), shift)(w)


_DEQUANT_FNS: dict[tuple[Any, float], Any] = {}


def _dequant_fn(dtype: Any, shift: float):
    key = (dtype, shift)
    if key not in _DEQUANT_FNS:
        def fn(w: GGUFWeight) -> jax.Array:
            x = w.dequantize(jnp.float32)
            return (x - shift if shift else x).astype(dtype)
        _DEQUANT_FNS[key] = jax.jit(fn)
    return _DEQUANT_FNS[key]


def _host_bytes(p: _Plan) -> np.ndarray:
    """The tensor's raw bytes as uint8 [rows..., bytes_per_row] (a copy, rows reordered if needed)."""
    raw = np.asarray(p.tensor.data).reshape(-1).view(np.uint8)
    byte_shape = GGUFWeight.byte_shape(p.ggml_type, p.shape, p.hf_name)
    if p.rows is None:
        return np.array(raw.reshape(byte_shape), copy=True)
    if len(p.shape) == 1:  # a bias: one element (F32/F16/BF16, checked in plan_tensors) per row
        return raw.reshape(p.shape[0], -1)[p.rows].reshape(byte_shape)
    return raw.reshape(byte_shape)[p.rows]  # fancy indexing copies


def _place(p: _Plan, target: np.dtype, device: Any) -> jax.Array | GGUFWeight:
    raw = _host_bytes(p)
    if p.packed:
        return GGUFWeight.from_numpy(raw, p.ggml_type, p.shape, p.hf_name, device=device, compute_dtype=target)
    if p.ggml_type in _FLOAT_TYPES:
        host = raw.reshape(-1).view(_HOST_DTYPES[p.ggml_type]).reshape(p.shape)
        if p.norm_shift:
            host = host.astype(np.float32) - np.float32(p.norm_shift)
        return jax.device_put(host.astype(target), device)
    packed = GGUFWeight.from_numpy(raw, p.ggml_type, p.shape, p.hf_name, device=device)
    try:
        return _dequantize_on_device(packed, target, p.norm_shift).block_until_ready()
    finally:
        packed.data.delete()


def load_gguf(
    path: str | Path,
    *,
    dtype: Any,
    dequantize: bool | None = None,
    progress: bool = True,
    device: jax.Device | None = None,
) -> tuple[Any, Any, GGUFMetadata]:
    """Load a GGUF file: `(cfg, weights, metadata)`.

    cfg       the family's Config (from the GGUF metadata, see `gguf_config_dict`);
    weights   the family's Weights pytree: quantized weights as packed `GGUFWeight`s, everything else
              dense in `dtype`;
    metadata  a `GGUFMetadata`: the file's key/values (parsed on access) and, as `.reader`, the
              `gguf.GGUFReader` itself (the tokenizer is built from it).

    dequantize: True dequantizes every quantized weight at load into a dense `dtype` array (the CPU's
              fast path: plain dense matmuls; memory of a dense model); False keeps them packed
              (about 4-8x less memory, decoded inside each jitted matmul; the GPU/TPU path);
              None (default) keeps them packed on GPU/TPU and dequantizes on the CPU.
    device:   where the arrays go (default: jax's default device).

    Errors: ModelNotFoundError (no such file), CheckpointError (not GGUF, corrupt/truncated,
    missing tensor, shape contradicting the metadata, unsupported ggml type), ConfigError (a
    required metadata key missing or invalid), UnsupportedArchitectureError. All are raised before
    any tensor is placed, except failures while placing, after which every placed array is deleted.
    """
    path = Path(path).expanduser()
    target = np.dtype(jnp.dtype(dtype))
    if dequantize is None:
        platform = device.platform if device is not None else jax.default_backend()
        dequantize = platform == "cpu"
    meta = read_metadata(path)
    cfg = read_config(meta)
    plans = plan_tensors(meta, cfg, dequantize=dequantize)

    placed: dict[str, Any] = {}
    current: str | None = None
    bar = tqdm(total=sum(p.nbytes for p in plans), unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"loading {path.name}", disable=not progress)
    try:
        for p in plans:
            current = p.tensor.name
            arr = _place(p, target, device)
            placed[p.hf_name] = arr
            # Wait for the transfer so host memory stays about one tensor and a device OOM names it.
            jax.block_until_ready(arr)
            bar.update(p.nbytes)
    except BaseException as e:
        for arr in placed.values():
            for leaf in jax.tree_util.tree_leaves(arr):
                try:
                    leaf.delete()
                except Exception:  # already deleted or never materialised
                    pass
        placed.clear()
        if isinstance(e, FerrumError) or not isinstance(e, Exception):
            raise
        raise CheckpointError(f"{path}: failed to load tensor {current!r}: {_one_line(e)}") from e
    finally:
        bar.close()

    weights = models.family_of(cfg).build_weights(cfg, placed)
    return cfg, weights, meta


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
