"""Tiny random Hugging Face checkpoints, built from a config alone (no hub access), for parity tests.

Every builder takes a directory, creates an fp32 model of the family with `attn_implementation="eager"`,
re-initializes its parameters with a scale that makes the test meaningful (HF's std=0.02 init gives
nearly flat logits, so almost any bug would still pass a tolerance and greedy ties would be common),
`save_pretrained`s it into the directory and returns (dir, torch model in eval mode).

    from hf_models import BUILDERS, build  # tests/ is on sys.path under pytest (rootdir-less tests)
    path, hf = build("llama3", tmp_path / "llama3")

Weights: projections and embeddings ~ N(0, std), biases ~ N(0, 0.2) (nonzero on purpose), RMSNorm
weights ~ 1 + N(0, 0.1) (Llama-style, multiplies by w) or N(0, 0.3) (Gemma, which stores w - 1),
tuned per family so that logits spread (std ~1.5-3) and greedy continuations vary instead of
repeating one token. No eos/bos/pad ids are set, so `generate` never stops early.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

# Small enough that a whole parity file runs in well under a minute or two on a 2-core CPU.
VOCAB = 384
HIDDEN = 64
INTERMEDIATE = 128
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 128

# Special ids kept out of the way: nothing stops generation, nothing is a padding row in embeddings.
_NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def randomize(model: torch.nn.Module, *, seed: int, std: float = 0.15, embed_std: float = 0.4,
              bias_std: float = 0.2, gemma_norms: bool = False,
              norm_shift: dict[str, float] | None = None) -> torch.nn.Module:
    """Re-initialize every parameter in place (deterministically from `seed`). `norm_shift` adds a
    constant to the norm weights whose name contains a key."""
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, s: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * s

    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            if "norm" in name:
                p.copy_(normal(p.shape, 0.3) if gemma_norms else 1.0 + normal(p.shape, 0.1))
                p.add_(sum(v for k, v in (norm_shift or {}).items() if k in name))
            elif name.endswith(".bias"):
                p.copy_(normal(p.shape, bias_std))
            elif "embed_tokens" in name or name == "lm_head.weight":
                p.copy_(normal(p.shape, embed_std))
            else:
                p.copy_(normal(p.shape, std))
    return model


def _save(model: transformers.PreTrainedModel, path: Path) -> tuple[Path, transformers.PreTrainedModel]:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(path, safe_serialization=True)
    model.eval()
    return path, model


def _make(model_cls: type, config: Any, path: Path, *, seed: int, **init: Any):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32)
    model.config._attn_implementation = "eager"
    randomize(model, seed=seed, **init)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return _save(model, path)


def _common(**kw: Any) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6,
                dtype="float32", **_NO_SPECIAL) | kw


def llama3(path: Path, *, tied: bool = False, seed: int = 1):
    """Llama with Llama-3 rope scaling; original_max_position_embeddings=16 so that most
    frequencies (wavelength > 16) are actually rescaled and the medium band is smoothed."""
    cfg = transformers.LlamaConfig(**_common(
        num_hidden_layers=2, head_dim=16, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    # Tied: stronger layers and a smaller table, or the residual stays close to the input token's own
    # embedding and greedy decoding just repeats it.
    init = dict(std=0.25, embed_std=0.2) if tied else {}
    return _make(transformers.LlamaForCausalLM, cfg, path, seed=seed, **init)


def llama3_tied(path: Path, *, seed: int = 2):
    return llama3(path, tied=True, seed=seed)


def mistral(path: Path, *, seed: int = 3):
    """Mistral with sliding_window=8, shorter than the test sequences (20+ tokens)."""
    cfg = transformers.MistralConfig(**_common(
        num_hidden_layers=2, head_dim=16, sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    return _make(transformers.MistralForCausalLM, cfg, path, seed=seed)


def qwen2(path: Path, *, seed: int = 4):
    """Qwen2: q/k/v projections with (nonzero) biases, full attention everywhere."""
    cfg = transformers.Qwen2Config(**_common(
        num_hidden_layers=2, use_sliding_window=False, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
    return _make(transformers.Qwen2ForCausalLM, cfg, path, seed=seed)


def qwen3(path: Path, *, yarn: bool = False, seed: int = 5):
    """Qwen3: per-head q/k RMSNorm, head_dim (32) != hidden / heads (16). With `yarn`, YaRN rope
    scaling with factor 4 over original_max_position_embeddings 32 (attention_factor 1 + 0.1 ln 4)."""
    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": MAX_POSITIONS // 4}
    cfg = transformers.Qwen3Config(**_common(
        num_hidden_layers=2, head_dim=32, use_sliding_window=False, tie_word_embeddings=False,
        rope_parameters=rope))
    return _make(transformers.Qwen3ForCausalLM, cfg, path, seed=seed)


def qwen3_yarn(path: Path, *, seed: int = 6):
    return qwen3(path, yarn=True, seed=seed)


# transformers' Gemma3Attention (5.x) never passes `attn_logit_softcapping` to its attention function,
# so HF silently ignores that field (real Gemma 3 checkpoints leave it null; Gemma 2 and the original
# Gemma reference apply it, to the scaled scores before the mask). To have a reference that honours
# it, this registers "eager_softcap": Gemma 3's eager attention with the module's own softcap.
SOFTCAP_ATTN = "eager_softcap"


def _register_softcap_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.gemma3 import modeling_gemma3

    def eager_softcap(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("softcap", None)
        return modeling_gemma3.eager_attention_forward(module, query, key, value, attention_mask,
                                                       softcap=module.attn_logit_softcapping, **kwargs)

    AttentionInterface.register(SOFTCAP_ATTN, eager_softcap)
    AttentionMaskInterface.register(SOFTCAP_ATTN, eager_mask)


def gemma3(path: Path, *, final_softcap: bool = False, attn_softcap: bool = False, num_layers: int = 4,
           seed: int = 7):
    """Gemma 3 text: layers mixing sliding (window 8) and full attention, each kind with its own
    rope (local theta 10k; global theta 1M with linear scaling x8, as the 4B+ checkpoints have),
    query_pre_attn_scalar (24) != head_dim (32), tied embeddings, nonzero (w - 1) norm weights.
    `final_softcap` turns on final-logit soft-capping and `attn_softcap` attention-logit soft-capping,
    at values that bite (the returned torch model then runs SOFTCAP_ATTN, see above)."""
    cfg = transformers.Gemma3TextConfig(**_common(
        num_hidden_layers=num_layers, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"][:num_layers],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        final_logit_softcapping=4.0 if final_softcap else None, attn_logit_softcapping=1.5 if attn_softcap else None,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True))
    # Embeddings are scaled by sqrt(hidden) = 8 on the way in and tied to the LM head on the way out, and
    # every sub-layer's output is RMS-normalized: with a large table the residual stays the input token's
    # embedding and greedy decoding repeats it. So: a small table, post-norms that scale by ~2, a final
    # norm that scales by ~4 (logits std ~1.5).
    path, model = _make(transformers.Gemma3ForCausalLM, cfg, path, seed=seed, embed_std=0.05, gemma_norms=True,
                        norm_shift={"post_attention_layernorm": 1.0, "post_feedforward_layernorm": 1.0,
                                    "model.norm.": 3.0})
    if attn_softcap:
        _register_softcap_attention()
        model.set_attn_implementation(SOFTCAP_ATTN)
    return path, model


def gemma3_final_softcap(path: Path, *, seed: int = 8):
    return gemma3(path, final_softcap=True, num_layers=2, seed=seed)


def gemma3_attn_softcap(path: Path, *, seed: int = 9):
    return gemma3(path, final_softcap=True, attn_softcap=True, num_layers=2, seed=seed)


BUILDERS: dict[str, Callable[..., tuple[Path, Any]]] = {
    "llama3": llama3,
    "llama3-tied": llama3_tied,
    "mistral-swa": mistral,
    "qwen2-bias": qwen2,
    "qwen3": qwen3,
    "qwen3-yarn": qwen3_yarn,
    "gemma3": gemma3,
    "gemma3-final-softcap": gemma3_final_softcap,
    "gemma3-attn-softcap": gemma3_attn_softcap,  # torch reference patched: HF ignores attn softcapping
}


def build(name: str, path: Path) -> tuple[Path, Any]:
    """Build the named tiny checkpoint into `path`; returns (path, torch model)."""
    if name not in BUILDERS:
        raise KeyError(f"no tiny model named {name!r}; have {', '.join(BUILDERS)}")
    return BUILDERS[name](Path(path))
