"""Tests of ferrum_jax.tokenizer against transformers' AutoTokenizer, on tokenizers built in tmp dirs.

Three small tokenizers are trained here (no hub downloads): a byte-level BPE in the style of Llama-3
(BOS from the tokenizer.json post-processor), the same vocabulary with a ChatML template and no BOS
(Qwen style), and a SentencePiece-style BPE with byte fallback (Llama-2 / Gemma style). Their
vocabularies are small, so CJK characters and emoji come out as several byte tokens each.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ferrum_jax.errors import FerrumError, TokenizerError
from ferrum_jax.tokenizer import IncrementalDetokenizer, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello there, how are you doing today?",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { total += values[i]; }",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2024-01-01",
    "Café, naïve, résumé, Straße, Ünïcödé characters.",
    "日本語のテキストです。中文测试句子。",
    "Emoji time 😀 🎉 👍 and more text after them.",
    "The model answers questions about science, history and programming.",
    "    indented code block\n\ttabbed line\n",
] * 20

TEST_STRINGS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "a  b   c    d     e",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld",
    "naïve café résumé",
    "Straße",
    "日本語のテキスト",
    "中文测试",
    "한국어 텍스트",
    "Ελληνικά",
    "Русский текст",
    "עברית",
    "العربية",
    "हिन्दी",
    "😀",
    "🎉🎉🎉",
    "emoji😀mid",
    "👨‍👩‍👧‍👦 family",
    "🇺🇸 flag",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "ℝ ∑ ∫ ≠ ≤",
    "e\u0301 combining accent",
    "\u200b zero width",
    "mixed 中 English 文 text",
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    'JSON {"key": [1, 2, 3], "ü": null}',
    "https://example.com/path?q=a&b=c#frag",
    "12345",
    "3.14159",
    "1,000,000",
    "0x1F 0b1010",
    "-42 +7 1e-9",
    "CamelCaseIdentifier snake_case_name",
    "UPPER lower MiXeD",
    "'single' \"double\" `back`",
    "line1\r\nline2",
    "tab\tseparated\tvalues",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "...!!!???",
    "<|begin_of_text|> literal special token text",
    "</s> and <s> in text",
    "ﬁ ligature",
    "end with emoji 🎉",
]

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

CHATML_TEMPLATE = """{% if tools %}
<|im_start|>system
Tools:
{{ tools | tojson(indent=2) }}<|im_end|>
{% endif %}
{% for message in messages %}
{% if message['role'] not in ['system', 'user', 'assistant'] %}
{{ raise_exception('Unknown role: ' + message['role']) }}
{% endif %}
<|im_start|>{{ message['role'] }}
{% if message.content is defined %}{{ message['content'] }}{% endif %}
{% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>{% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{% endif %}"""

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello! 你好 😀"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4. 🎉"},
        {"role": "user", "content": "  And 日本語?  "},
    ],
]
SYSTEM_CONVERSATION = [{"role": "system", "content": "Be brief."}, *CONVERSATIONS[1]]


# ---------------------------------------------------------------------------------------------
# Building tokenizer directories


def _train_byte_level(special_tokens: list[str]) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _train_sentencepiece_style() -> tokenizers.Tokenizer:
    """A Llama-2-layout BPE: <unk> <s> </s>, the 256 <0xNN> byte tokens, then merges; the normalizer
    turns spaces into ▁ and prepends one; unknown characters fall back to bytes."""
    specials = ["<unk>", "<s>", "</s>"]
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, limit_alphabet=60, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)

    spec = json.loads(tok.to_str())
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<start_of_turn>", "<end_of_turn>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def _save(backend: tokenizers.Tokenizer, directory: Path, *, chat_template: str | None, **special_tokens) -> Path:
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    if chat_template is not None:
        hf.chat_template = chat_template
    hf.save_pretrained(directory)
    return directory


def _edit_json(path: Path, **updates) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in updates.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    out: dict[str, Path] = {}

    # Llama-3 style: BOS added by a Sequence[ByteLevel, TemplateProcessing] post-processor; the end
    # of turn <|eot_id|> is a stop token only through generation_config.json.
    tok = _train_byte_level(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    )
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos_id)],
            ),
        ]
    )
    out["llama3"] = _save(
        tok,
        root / "llama3",
        chat_template=LLAMA3_TEMPLATE,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
    )
    eos_ids = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    _edit_json(out["llama3"] / "generation_config.json", bos_token_id=bos_id, eos_token_id=eos_ids)

    # Qwen style: ChatML, no BOS at all (the post-processor adds nothing), a pad token.
    tok = _train_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    out["chatml"] = _save(
        tok, root / "chatml", chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    _edit_json(out["chatml"] / "generation_config.json", eos_token_id=tok.token_to_id("<|im_end|>"))

    # Llama-2 / Gemma style: byte fallback, BOS in both the post-processor and the template, and
    # tokenizer_config.json sets add_bos_token explicitly (as those repos do).
    tok = _train_sentencepiece_style()
    out["spm"] = _save(
        tok,
        root / "spm",
        chat_template=GEMMA_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
    )
    _edit_json(out["spm"] / "tokenizer_config.json", add_bos_token=True, add_eos_token=False)
    stop_ids = [tok.token_to_id("</s>"), tok.token_to_id("<end_of_turn>")]
    _edit_json(out["spm"] / "generation_config.json", eos_token_id=stop_ids)

    # Variants of the llama3 directory that exercise the add_bos_token / add_eos_token rules.
    def variant(name: str, *, post_processor: bool, **config) -> None:
        shutil.copytree(out["llama3"], root / name)
        out[name] = root / name
        if not post_processor:
            spec = json.loads((out[name] / "tokenizer.json").read_text())
            spec["post_processor"] = None
            (out[name] / "tokenizer.json").write_text(json.dumps(spec))
        _edit_json(out[name] / "tokenizer_config.json", **config)

    variant("flag_bos_no_pp", post_processor=False, add_bos_token=True)
    variant("flag_no_bos_with_pp", post_processor=True, add_bos_token=False)
    variant("flag_eos_only", post_processor=True, add_eos_token=True)
    variant("no_pp_no_flags", post_processor=False)

    # Legacy layout: template inside tokenizer_config.json, tokens as AddedToken dicts, and a
    # special_tokens_map.json (read by transformers only without added_tokens_decoder).
    legacy = root / "legacy"
    shutil.copytree(out["llama3"], legacy)
    template = (legacy / "chat_template.jinja").read_text()
    (legacy / "chat_template.jinja").unlink()

    def added(content: str) -> dict:
        flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        return {"__type": "AddedToken", "content": content, **flags}

    _edit_json(
        legacy / "tokenizer_config.json",
        chat_template=template,
        bos_token=added("<|begin_of_text|>"),
        eos_token=added("<|end_of_text|>"),
        added_tokens_decoder=None,
    )
    _edit_json(legacy / "special_tokens_map.json", pad_token={"content": "<|eot_id|>", "lstrip": False})
    out["legacy"] = legacy
    return out


@pytest.fixture(scope="module")
def loaded(dirs) -> dict[str, tuple[Tokenizer, object]]:
    """(ours, transformers') for every directory, loaded once."""
    return {name: (Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)) for name, path in dirs.items()}


MAIN = ["llama3", "chatml", "spm"]
ALL = MAIN + ["flag_bos_no_pp", "flag_no_bos_with_pp", "flag_eos_only", "no_pp_no_flags", "legacy"]


# ---------------------------------------------------------------------------------------------
# Matching transformers


@pytest.mark.parametrize("name", ALL)
def test_encode_matches_transformers(loaded, name):
    ours, hf = loaded[name]
    for text in TEST_STRINGS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special), (
                name,
                text,
                special,
            )


@pytest.mark.parametrize("name", ALL)
def test_decode_matches_transformers(loaded, name):
    ours, hf = loaded[name]
    for text in TEST_STRINGS:
        ids = hf.encode(text) + [ours.eos_token_ids[0]]
        for skip in (True, False):
            ours_text = ours.decode(ids, skip_special_tokens=skip)
            assert ours_text == hf.decode(ids, skip_special_tokens=skip), (name, text, skip)
        if not (name == "spm" and "<s>" in text):  # SentencePiece prepends ▁ after each special token
            assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
    assert ours.decode([]) == ""


def test_add_bos_flags_are_ignored_like_transformers(loaded):
    """transformers 5 drops tokenizer_config.json's add_bos_token/add_eos_token when tokenizer.json
    exists: its post-processor alone decides (the encode test checks the same against HF)."""
    hello = loaded["llama3"][0].encode("hello", add_special_tokens=False)
    bos = loaded["llama3"][0].bos_token_id
    expected = {
        "llama3": [bos, *hello],  # from the tokenizer.json post-processor
        "flag_bos_no_pp": hello,  # add_bos_token: true, but no post-processor to add it
        "flag_no_bos_with_pp": [bos, *hello],  # add_bos_token: false, the post-processor still adds it
        "flag_eos_only": [bos, *hello],  # add_eos_token: true is ignored too
        "no_pp_no_flags": hello,
    }
    for name, ids in expected.items():
        ours, hf = loaded[name]
        assert ours.encode("hello") == ids == hf.encode("hello"), name


def test_constructor_add_bos_add_eos():
    backend = _train_byte_level(["<s>", "</s>"])
    hello = backend.encode("hello").ids
    bos, eos = backend.token_to_id("<s>"), backend.token_to_id("</s>")
    assert Tokenizer(backend, bos_token="<s>", eos_tokens=["</s>"]).encode("hello") == hello
    assert Tokenizer(backend, bos_token="<s>", eos_tokens=["</s>"], add_bos=True).encode("hello") == [bos, *hello]
    both = Tokenizer(backend, bos_token="<s>", eos_tokens=["</s>"], add_eos=True)  # keeps the BOS policy
    assert both.encode("hello") == [bos, *hello, eos]
    assert both.encode("hello", add_special_tokens=False) == hello
    eos_only = Tokenizer(backend, bos_token="<s>", eos_tokens=[eos], add_bos=False, add_eos=True)
    assert eos_only.encode("hello") == [*hello, eos] and eos_only.eos_token == "</s>"
    # No bos token: add_bos is dropped, as transformers does.
    assert Tokenizer(backend, bos_token=None, eos_tokens=[eos], add_bos=True).encode("hello") == hello


@pytest.mark.parametrize("name", ALL)
def test_special_tokens_match_transformers(loaded, name):
    ours, hf = loaded[name]
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.bos_token == hf.bos_token
    assert ours.eos_token == hf.eos_token
    assert ours.eos_token_ids[0] == hf.eos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.vocab_size == len(hf)


def test_generation_config_eos_ids(loaded):
    llama3, _ = loaded["llama3"]
    end_of_text, eot = llama3.encode("<|end_of_text|><|eot_id|>", add_special_tokens=False)
    assert llama3.eos_token_ids == (end_of_text, eot)
    chatml, _ = loaded["chatml"]  # an int eos_token_id equal to the config's eos: no duplicate
    assert chatml.eos_token_ids == (chatml.encode("<|im_end|>", False)[0],)
    spm, _ = loaded["spm"]
    assert spm.eos_token_ids == (2, spm.encode("<end_of_turn>", False)[-1])
    assert loaded["legacy"][0].pad_token == "<|eot_id|>"  # from special_tokens_map.json


@pytest.mark.parametrize("name", ["llama3", "chatml", "spm", "legacy"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(loaded, name, add_generation_prompt):
    ours, hf = loaded[name]
    conversations = CONVERSATIONS if name == "spm" else [*CONVERSATIONS, SYSTEM_CONVERSATION]
    for messages in conversations:
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        hf_ids = hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == hf_ids
    if ours.bos_token_id is not None:
        # The template writes BOS itself; encode_chat must not add a second one.
        ids = ours.encode_chat(CONVERSATIONS[0])
        assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id


def test_chat_template_extras_match_transformers(loaded):
    ours, hf = loaded["chatml"]
    function = {"name": "météo", "description": "Wetter für 東京 ☀️", "parameters": {}}
    tools = [{"type": "function", "function": function}]
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "think 🤔"},  # None dropped, as in HF
        {"role": "user", "content": "ok"},
    ]
    text = ours.apply_chat_template(messages, tools=tools, enable_thinking=False)
    assert text == hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    assert '"name": "météo"' in text and "\n  " in text  # tojson keeps non-ASCII, honours indent
    assert "<think>think 🤔</think>" in text and "None" not in text


def test_chat_template_builtins():
    backend = _train_byte_level(["<eos>"])
    template = (
        "{{ strftime_now('%Y') }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
    )
    tok = Tokenizer(backend, bos_token=None, eos_tokens=["<eos>"], chat_template=template)
    text = tok.apply_chat_template([{"role": "user", "content": "<b>ü</b>"}, {"role": "user", "content": "x"}])
    year, rest = text.split("|")
    assert year.isdigit() and len(year) == 4
    assert rest == '{"role": "user", "content": "<b>ü</b>"}'  # no HTML escaping, not ASCII-escaped


def test_raise_exception_in_template(loaded):
    for name, bad in [
        ("chatml", [{"role": "robot", "content": "hi"}]),
        ("spm", [{"role": "assistant", "content": "hi"}]),
    ]:
        ours, hf = loaded[name]
        with pytest.raises(TokenizerError, match="chat template rejected the conversation: "):
            ours.apply_chat_template(bad)
        with pytest.raises(Exception):
            hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(TokenizerError, match="Unknown role: robot"):
        loaded["chatml"][0].encode_chat([{"role": "robot", "content": "hi"}])


def test_named_special_tokens_become_special(tmp_path):
    """As in transformers, a config's eos/bos/pad token is skipped by decode even when tokenizer.json
    has it as a plain vocabulary entry or as a non-special added token."""
    backend = _train_byte_level([])
    backend.add_tokens(["<end>"])  # added, but not special
    backend.save(str(tmp_path / "tokenizer.json"))
    # "Q" is a plain vocabulary entry (a byte of the byte-level alphabet).
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<end>", "bos_token": "Q"}))
    ours, hf = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.vocab_size == len(hf) == backend.get_vocab_size(with_added_tokens=True)
    ids = [ours.bos_token_id, *ours.encode("the dog<end>Q")]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.encode("the dog<end>Q") == hf.encode("the dog<end>Q")
    assert ours.decode(ids) == "the dog"


def test_template_sandbox():
    backend = _train_byte_level(["<eos>"])
    tok = Tokenizer(backend, bos_token=None, eos_tokens=["<eos>"], chat_template="{{ messages.append(1) }}")
    with pytest.raises(TokenizerError, match="chat template failed to render"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------------------------------
# Incremental detokenizer


def _splits_characters(tok: Tokenizer, ids: list[int]) -> bool:
    """True if some token of `ids` decodes to part of a character (so streaming must hold it back)."""
    return any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("name", MAIN)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_detokenizer_one_id_at_a_time(loaded, name, skip_special_tokens):
    tok, _ = loaded[name]
    split_seen = False
    texts = [*TEST_STRINGS, " ".join(TEST_STRINGS), tok.apply_chat_template(CONVERSATIONS[1])]
    for text in texts:
        ids = tok.encode(text) + [tok.eos_token_ids[0]]
        split_seen |= _splits_characters(tok, ids)
        det = tok.detokenizer(skip_special_tokens=skip_special_tokens)
        deltas = [det.add([i]) for i in ids]
        deltas.append(det.flush())
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens), (name, text)
        assert not any("\ufffd" in d for d in deltas), (name, text, deltas)
    assert split_seen, "the test data must contain characters split across tokens"


@pytest.mark.parametrize("name", MAIN)
def test_detokenizer_chunks(loaded, name):
    tok, _ = loaded[name]
    text = " ".join(TEST_STRINGS)
    ids = tok.encode(text)
    for chunk in (2, 3, 7):
        det = tok.detokenizer()
        out = "".join(det.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)) + det.flush()
        assert out == tok.decode(ids)


def test_detokenizer_holds_back_partial_characters(loaded):
    tok, _ = loaded["llama3"]
    ids = tok.encode("a 🦀", add_special_tokens=False)  # not in the training corpus: 4 byte tokens
    assert len(ids) >= 3 and _splits_characters(tok, ids)
    det = tok.detokenizer()
    deltas = [det.add([i]) for i in ids]
    assert "".join(deltas) == "a 🦀"
    assert deltas[-1].endswith("🦀") and all("\ufffd" not in d for d in deltas)
    # A stream that really ends mid-character: held back, then flushed as U+FFFD.
    det = tok.detokenizer()
    partial = "".join(det.add([i]) for i in ids[:-1])
    assert "\ufffd" not in partial
    assert det.flush().endswith("\ufffd")
    assert det.flush() == ""


def test_detokenizer_window_stays_small(loaded):
    """Per-call cost is bounded: the window the detokenizer decodes does not grow with the stream."""
    tok, _ = loaded["llama3"]
    ids = tok.encode(" ".join(TEST_STRINGS * 5))
    assert len(ids) > 1000
    det = tok.detokenizer()
    widest = 0
    for i in ids:
        det.add([i])
        widest = max(widest, len(det._ids))
    assert widest <= 16
    assert isinstance(det, IncrementalDetokenizer)


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_directory(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing") as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, FerrumError)


def test_corrupt_tokenizer_json(dirs, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot be loaded"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{not json", r"tokenizer_config\.json: invalid JSON"),
        (b"\xff\xfe\x00garbage", r"tokenizer_config\.json: cannot be read"),
        (b"[1, 2]", r"tokenizer_config\.json: expected a JSON object"),
        (b'{"bos_token": 5}', r"tokenizer_config\.json: field 'bos_token'"),
        (b'{"chat_template": 3}', r"tokenizer_config\.json: field 'chat_template'"),
        (b'{"eos_token": "<|not a token|>"}', r"eos_token '<\|not a token\|>' is not in the vocabulary"),
    ],
)
def test_bad_tokenizer_config(dirs, tmp_path, content, match):
    shutil.copy(dirs["llama3"] / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=match) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_bad_generation_config(dirs, tmp_path):
    shutil.copytree(dirs["llama3"], tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text('{"eos_token_id": "2"}')
    with pytest.raises(TokenizerError, match=r"generation_config\.json: field 'eos_token_id'"):
        Tokenizer.from_dir(tmp_path / "m")


def test_missing_chat_template(dirs, tmp_path):
    shutil.copy(dirs["llama3"] / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer.from_dir(tmp_path)  # no config at all: plain completion still works
    assert tok.chat_template is None and tok.encode("hi")
    with pytest.raises(TokenizerError, match="no chat template.*chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


def test_chat_template_json_and_syntax_error(dirs, tmp_path):
    shutil.copytree(dirs["chatml"], tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").unlink()
    (tmp_path / "m" / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}"}))
    assert Tokenizer.from_dir(tmp_path / "m").apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    (tmp_path / "m" / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(TokenizerError, match="chat template has a syntax error"):
        Tokenizer.from_dir(tmp_path / "m").apply_chat_template([{"role": "user", "content": "x"}])
