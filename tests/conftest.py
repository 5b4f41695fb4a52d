"""Shared fixtures: a tiny random Llama checkpoint with a real (trained, byte-level BPE) tokenizer.

Built once per session, offline, in a few seconds: the weights come from transformers'
`LlamaForCausalLM` (fp32, re-initialised with a wide normal so the logits are not flat and greedy
decoding does not collapse onto one token), saved with `save_pretrained` next to a
`PreTrainedTokenizerFast` whose `tokenizer.json` is trained here on a small corpus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the fixture never touches the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import pytest

# The references are the oracles: on a GPU, XLA's default float32 dot is TF32 (about 1e-3 relative),
# which would make an exact kernel look wrong. On the CPU float32 dots are exact already (and
# programs compiled with the flag crashed XLA's CPU executable serialization: not set there).
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML with a BOS in front, the way Llama-3-style templates write it themselves.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello there, how are you doing today?",
    "Once upon a time there was a tiny model that learned to talk.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159",
    "Café, naïve, résumé, Straße, Ünïcödé characters.",
    "日本語のテキストです。中文测试句子。",
    "Emoji time 😀 🎉 👍 and more text after them.",
    "Привет, мир! Καλημέρα κόσμε.",
] * 10

MAX_POSITIONS = 128  # small, so the KV cache (capacity <= 128) and the compiled programs stay tiny
SEED = 0


def _train_tokenizer():
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=[BOS, EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def build_tiny_llama(directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = _train_tokenizer()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(directory)

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=backend.get_vocab_size(with_added_tokens=True), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=backend.token_to_id(BOS),
        eos_token_id=backend.token_to_id(EOS), pad_token_id=None, dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = backend.token_to_id(EOS)
    model.generation_config.bos_token_id = backend.token_to_id(BOS)
    model.generation_config.pad_token_id = None
    model.save_pretrained(directory)

    gen = directory / "generation_config.json"
    assert json.loads(gen.read_text())["eos_token_id"] == backend.token_to_id(EOS)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Directory of a tiny random fp32 LlamaForCausalLM checkpoint + tokenizer (HF layout)."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny checkpoint loaded with ferrum_jax (float32, default ops). Shared: do not mutate."""
    import ferrum_jax

    return ferrum_jax.load(tiny_model_dir, dtype="float32", progress=False)


@pytest.fixture(autouse=True, scope="session")
def _no_persistent_compile_cache():
    """The CLI turns on JAX's persistent compilation cache by default, and tests call the CLI
    in-process: that would switch it on for every later test of the session, which then read and
    write executables (XLA crashed serializing one on the CPU). Tests that want the cache pass
    --compile-cache DIR themselves."""
    import ferrum_jax.cli as cli

    cli.DEFAULT_CACHE_DIR = "none"
    yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module compiles its own programs (interpret-mode kernels are large): drop them
    after the module, so one process running the whole suite does not keep every one alive."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
