"""Tokenizer from a GGUF file's metadata alone (no sidecar tokenizer.json), on the `tokenizers` library.

    reader = gguf.GGUFReader(path)
    tok = tokenizer_from_gguf(reader, path)      # -> ferrum_jax.tokenizer.Tokenizer

What is built is llama.cpp's tokenizer for the file (src/llama-vocab.cpp), expressed as a
`tokenizers` pipeline, so that token ids are those of the runtime the file was made for:

`tokenizer.ggml.model == "llama"` (SentencePiece vocabularies: Llama 2, Gemma, ...). llama.cpp's
SPM tokenizer starts from UTF-8 characters and repeatedly merges the adjacent pair whose
concatenation is a vocabulary token with the highest score; characters that never become a token
are emitted as <0xXX> byte tokens. Here that is a BPE model with byte fallback whose merges are
every (left, right) split of every token whose two halves are tokens too, ranked by the score of
the merged token (ties: lower token id first, then the longer left half): the construction of
transformers' `generate_merges` for GGUF SentencePiece vocabularies, ranked the way llama.cpp
merges (transformers ranks Gemma's merges by token position instead, which is the same order for
Gemma 3's normal tokens, whose scores fall with their id). Spaces become U+2581 in a normalizer.
With `tokenizer.ggml.add_space_prefix` (llama.cpp's default for these vocabularies: on)
a U+2581 is prepended to every piece of text that starts the input or follows a special token,
exactly as llama.cpp does (a normalizer `Prepend`, which tokenizers applies per text segment between
added tokens); the decoder then strips one leading space.

`tokenizer.ggml.model == "gpt2"` (byte-level BPE: Llama 3, Qwen 2, SmolLM, ...). The merges of
`tokenizer.ggml.merges`, the pre-tokenizer regexes llama.cpp uses for `tokenizer.ggml.pre` (each
applied to the pieces of the previous one, matches and gaps both kept: a `Split(..., "isolated")`
per regex, then byte-level mapping without a regex of its own), and llama.cpp's `ignore_merges`
for the Llama 3 / Tekken families. An unknown `tokenizer.ggml.pre` is a TokenizerError, as it is
for llama.cpp (which refuses to load the file). (transformers' GGUF converter has no entry for
"smollm" and splits such files like GPT-2, without isolating digits first: its ids differ from
llama.cpp's, and from SmolLM2's own tokenizer.json, where a space precedes a numeric character.)

Special tokens (`tokenizer.ggml.token_type`). CONTROL and UNKNOWN tokens become special added
tokens (matched whole in the text, dropped by decode(skip_special_tokens=True)); USER_DEFINED
tokens become plain added tokens (matched whole, kept by decode) -- llama.cpp's special-token
partition, which always matches user-defined tokens and matches control tokens when parsing
specials. They are spelled as the file spells them: llama.cpp's converter stores user-defined
tokens already "pre-normalized" (Gemma's whitespace-run tokens hold real spaces, not U+2581), and
byte-level files store control/user-defined tokens as raw text. (transformers' GGUF converter
instead re-spells Gemma's whitespace-run tokens with U+2581 and merges them inside BPE: the same
ids for runs of up to 31 spaces, which is the longest such token, but runs of 32+ spaces are cut
differently, and a literal U+2581 pair in the text becomes a whitespace token there.)

Like llama.cpp, tokens whose text marks a turn end, end of generation or FIM role
(`<end_of_turn>`, `<|im_end|>`, `</s>`, `<|fim_prefix|>`, ...) are CONTROL whatever type the
file gives them (Gemma 3 stores `</s>` as USER_DEFINED: it is still parsed from text, but
decode(skip_special_tokens=True) drops it, as llama.cpp's detokenizer does and transformers' does not).

BOS/EOS. bos/eos/unk/pad ids from `tokenizer.ggml.{bos,eos,unknown,padding}_token_id`. Whether
`encode` adds BOS/EOS comes from `tokenizer.ggml.add_bos_token` / `add_eos_token`, defaulting as
llama.cpp does: on for SentencePiece vocabularies and for the Llama 3 / Tekken pre-tokenizers, off
otherwise; EOS off. The stop ids (`Tokenizer.eos_token_ids`) are llama.cpp's end-of-generation
set, eos first: eos, `tokenizer.ggml.eot_token_id` / `eom_token_id`, the tokens with an EOG text
(`<end_of_turn>`, `<|im_end|>`, `<|eot_id|>`, ...) and the FIM pad/repo/separator tokens, so an
instruct model stops at the end of its turn as it does under llama.cpp.

Chat template: `tokenizer.chat_template` (absent in some files, e.g. the Gemma 3 270M base model).

Not reproduced: llama.cpp's `clean_spaces` detokenizer pass (some gpt2-type vocabularies) and
per-model token attributes (lstrip/rstrip for Phi-3 and a few embedding models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import gguf
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from ferrum_jax.errors import TokenizerError
from ferrum_jax.tokenizer import Tokenizer

# token_type values (gguf.TokenType; llama.cpp's LLAMA_TOKEN_TYPE_*)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_KEY_MODEL = "tokenizer.ggml.model"
_KEY_PRE = "tokenizer.ggml.pre"
_KEY_TOKENS = "tokenizer.ggml.tokens"
_KEY_SCORES = "tokenizer.ggml.scores"
_KEY_TYPES = "tokenizer.ggml.token_type"
_KEY_MERGES = "tokenizer.ggml.merges"
_KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
_KEY_ADD_EOS = "tokenizer.ggml.add_eos_token"
_KEY_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
_KEY_CHAT_TEMPLATE = "tokenizer.chat_template"
_KEY_BOS = "tokenizer.ggml.bos_token_id"
_KEY_EOS = "tokenizer.ggml.eos_token_id"
_KEY_UNK = "tokenizer.ggml.unknown_token_id"
_KEY_PAD = "tokenizer.ggml.padding_token_id"
_KEY_EOT = "tokenizer.ggml.eot_token_id"
_KEY_EOM = "tokenizer.ggml.eom_token_id"

SUPPORTED_MODELS = ("gpt2", "llama")

_SPIECE_SPACE = "\u2581"

# Token texts that llama.cpp (llama-vocab.cpp, "auto-detect special tokens by text") marks CONTROL
# whatever type the file gives them, and the ones it stops generation on (`special_eog_ids`).
_FIM_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
            "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
            "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
            "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
    "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>", "<|eom_id|>",
)
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
)
# gpt-oss: always parsed and rendered
_FORCED_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


# ---------------------------------------------------------------------------------------------
# Pre-tokenizer regexes of llama.cpp (llm_tokenizer_bpe in src/llama-vocab.cpp), per tokenizer.ggml.pre.
# Where llama.cpp rewrites a tokenizer.json regex for its own engine (case-insensitive groups spelled
# out, \p{Lu}-style classes emulated with lookaheads), the tokenizer.json original is used: the
# `tokenizers` regex engine (Oniguruma) supports it and the two match the same text.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


@dataclass(frozen=True)
class _PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # llama.cpp: a pre-token that is itself a vocabulary token is kept whole
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token
    bos_disabled: bool = False  # llama.cpp ignores the bos id of these vocabularies (chatglm)


def _family(names: Sequence[str], spec: _PreTokenizer) -> dict[str, _PreTokenizer]:
    return dict.fromkeys(names, spec)


PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    # "default" (and a missing tokenizer.ggml.pre): llama.cpp's fallback regexes for BPE vocabularies.
    **_family(["default"], _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))),
    **_family(
        ["gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
         "mellum", "modern-bert", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling"],
        _PreTokenizer((_GPT2,)),
    ),
    **_family(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"],
        _PreTokenizer((r"\p{N}", _GPT2)),
    ),
    **_family(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"],
        _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    ),
    **_family(["dbrx", "smaug-bpe"], _PreTokenizer((_LLAMA3,))),
    **_family(["chatglm-bpe", "glm4"], _PreTokenizer((_LLAMA3,), bos_disabled=True)),
    **_family(
        ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"],
        _PreTokenizer((_QWEN2,)),
    ),
    **_family(["qwen35"], _PreTokenizer((_QWEN35,))),
    **_family(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _PreTokenizer((_GPT4O,))),
    **_family(["tekken"], _PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True)),
    **_family(
        ["falcon"],
        _PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    ),
    **_family(["deepseek-v3", "hunyuan-dense", "joyai-llm"], _PreTokenizer(_DEEPSEEK3)),
    **_family(["poro-chat", "bloom", "gpt3-finnish"], _PreTokenizer((r" ?[^(\s|.,!?…。，、।۔،)]+",))),
}


# ---------------------------------------------------------------------------------------------
# Entry point


def tokenizer_from_gguf(reader: gguf.GGUFReader, path: str) -> Tokenizer:
    """The tokenizer a GGUF file describes, built from its `tokenizer.*` metadata (see the module
    docstring). `path` is only used in error messages. Raises TokenizerError for a missing or
    malformed key, an unsupported `tokenizer.ggml.model` or an unknown `tokenizer.ggml.pre`."""
    meta = _Metadata(reader, str(path))
    model = meta.string(_KEY_MODEL, required=True)
    if model not in SUPPORTED_MODELS:
        raise TokenizerError(
            f"{path}: tokenizer model {model!r} (GGUF key {_KEY_MODEL!r}) is not supported; "
            f"supported: {', '.join(repr(m) for m in SUPPORTED_MODELS)}"
        )
    pre: _PreTokenizer | None = None
    if model == "gpt2":
        pre = _pre_tokenizer(meta)  # before the big arrays: an unknown value fails fast

    tokens = meta.strings(_KEY_TOKENS, required=True)
    if not tokens:
        raise TokenizerError(f"{path}: GGUF key {_KEY_TOKENS!r} is an empty list")
    n = len(tokens)
    types = meta.numbers(_KEY_TYPES, n)
    if types is None:
        types = np.full(n, NORMAL, np.int64)
    # llama.cpp names empty tokens so that every id has a distinct text
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]

    special_ids = {key: meta.token_id(key, n) for key in (_KEY_BOS, _KEY_EOS, _KEY_UNK, _KEY_PAD, _KEY_EOT, _KEY_EOM)}
    types, eog_ids = _llamacpp_token_types(tokens, types, special_ids)

    if model == "llama":
        scores = meta.numbers(_KEY_SCORES, n, required=True).astype(np.float64)
        add_space_prefix = meta.boolean(_KEY_ADD_SPACE_PREFIX, default=True)
        unk_id = special_ids[_KEY_UNK]
        backend, keys = _sentencepiece_backend(tokens, scores, unk_id, add_space_prefix, meta.path)
        add_bos_default = True
    else:
        assert pre is not None
        merges = meta.strings(_KEY_MERGES, required=True)
        backend, keys = _byte_level_backend(tokens, types, merges, pre, meta.path)
        add_bos_default = pre.add_bos
        if pre.bos_disabled:
            special_ids[_KEY_BOS] = None

    _add_special_tokens(backend, keys, types)

    bos_id, eos_id, pad_id = special_ids[_KEY_BOS], special_ids[_KEY_EOS], special_ids[_KEY_PAD]
    add_bos = meta.boolean(_KEY_ADD_BOS, default=add_bos_default)
    add_eos = meta.boolean(_KEY_ADD_EOS, default=False)
    # llama.cpp refuses a file that asks for a BOS/EOS it does not name; a default is just dropped.
    for flag_key, on, id_key in ((_KEY_ADD_BOS, add_bos, _KEY_BOS), (_KEY_ADD_EOS, add_eos, _KEY_EOS)):
        if on and special_ids[id_key] is None and flag_key in reader.fields:
            raise TokenizerError(f"{path}: GGUF key {flag_key!r} is true, but {id_key!r} is not set")
    add_bos = add_bos and bos_id is not None
    add_eos = add_eos and eos_id is not None

    # Stop ids: eos first (the `eos_token` templates see), then the rest of llama.cpp's set.
    eos_tokens: list[str | int] = [] if eos_id is None else [keys[eos_id]]
    eos_tokens += [i for i in eog_ids if i != eos_id]

    try:
        return Tokenizer(
            backend,
            bos_token=None if bos_id is None else keys[bos_id],
            eos_tokens=eos_tokens,
            pad_token=None if pad_id is None else keys[pad_id],
            chat_template=meta.string(_KEY_CHAT_TEMPLATE) or None,
            add_bos=add_bos,
            add_eos=add_eos,
        )
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Backends


def _sentencepiece_backend(
    tokens: list[str], scores: np.ndarray, unk_id: int | None, add_space_prefix: bool, path: str
) -> tuple[tokenizers.Tokenizer, list[str]]:
    vocab = _vocab(tokens, path)
    merges = _merges_from_scores(tokens, vocab, scores)
    try:
        model = models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None if unk_id is None else tokens[unk_id],
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    except Exception as e:  # the Rust side raises plain Exception
        raise TokenizerError(f"{path}: cannot build a BPE model from {_KEY_TOKENS!r}: {_one_line(e)}") from e
    backend = tokenizers.Tokenizer(model)
    steps: list[Any] = [normalizers.Prepend(_SPIECE_SPACE)] if add_space_prefix else []
    steps.append(normalizers.Replace(" ", _SPIECE_SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    dsteps: list[Any] = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dsteps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(dsteps)
    return backend, tokens


def _merges_from_scores(tokens: list[str], vocab: dict[str, int], scores: np.ndarray) -> list[tuple[str, str]]:
    """Every split of every token into two tokens, best first: by the merged token's score (what
    llama.cpp's SPM tokenizer merges on), then by its id, then longer left half first."""
    known = vocab.__contains__
    merged_ids: list[int] = []
    left_lens: list[int] = []
    for tid, token in enumerate(tokens):
        for k in range(len(token) - 1, 0, -1):
            if known(token[:k]) and known(token[k:]):
                merged_ids.append(tid)
                left_lens.append(k)
    if not merged_ids:
        return []
    ids = np.asarray(merged_ids, np.int64)
    lens = np.asarray(left_lens, np.int64)
    order = np.lexsort((-lens, ids, -scores[ids]))
    return [(tokens[t][:k], tokens[t][k:]) for t, k in zip(ids[order].tolist(), lens[order].tolist())]


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _byte_level_backend(
    tokens: list[str], types: np.ndarray, merges: list[str], pre: _PreTokenizer, path: str
) -> tuple[tokenizers.Tokenizer, list[str]]:
    byte_map = _byte_alphabet()
    alphabet = set(byte_map.values())
    keys: list[str] = []
    for token, ttype in zip(tokens, types.tolist()):
        if ttype in (CONTROL, USER_DEFINED, UNKNOWN) or set(token) <= alphabet:
            # Control/user-defined tokens are raw text, matched whole before the byte-level mapping.
            keys.append(token)
        else:
            # A normal token stored as raw text rather than in the byte alphabet: spell it the way
            # the BPE model sees text (transformers does the same for such files).
            keys.append("".join(byte_map[b] for b in token.encode("utf-8")))
    vocab = _vocab(keys, path)

    pairs: list[tuple[str, str]] = []
    for merge in merges:
        # llama.cpp splits at the first space after the first character
        cut = merge.find(" ", 1)
        if cut < 0:
            raise TokenizerError(f"{path}: GGUF key {_KEY_MERGES!r} has an entry without a space: {merge!r}")
        left, right = merge[:cut], merge[cut + 1 :]
        # A merge whose pieces or result are not tokens can never produce a token; tokenizers refuses them.
        if left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
    try:
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges, dropout=None)
    except Exception as e:
        raise TokenizerError(
            f"{path}: cannot build a BPE model from {_KEY_TOKENS!r}/{_KEY_MERGES!r}: {_one_line(e)}"
        ) from e
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, keys


def _vocab(keys: list[str], path: str) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, key in enumerate(keys):
        first = vocab.setdefault(key, i)
        if first != i:
            raise TokenizerError(f"{path}: duplicate token {key!r} in {_KEY_TOKENS!r} (ids {first} and {i})")
    return vocab


def _add_special_tokens(backend: tokenizers.Tokenizer, keys: list[str], types: np.ndarray) -> None:
    """CONTROL/UNKNOWN tokens -> special added tokens; USER_DEFINED -> plain added tokens. All are
    matched against the raw text (normalized=False), before normalization and pre-tokenization."""
    special = np.flatnonzero((types == CONTROL) | (types == UNKNOWN)).tolist()
    user = np.flatnonzero(types == USER_DEFINED).tolist()
    if special:
        backend.add_special_tokens([AddedToken(keys[i], special=True, normalized=False) for i in special])
    if user:
        backend.add_tokens([AddedToken(keys[i], special=False, normalized=False) for i in user])


def _llamacpp_token_types(
    tokens: list[str], types: np.ndarray, special_ids: dict[str, int | None]
) -> tuple[np.ndarray, list[int]]:
    """The token types llama.cpp ends up with, and its end-of-generation ids.

    llama.cpp does not take the file's token types as they are: tokens whose text looks like a
    turn end, FIM or end-of-generation marker are made CONTROL (so they are not parsed from text
    when specials are off, and vanish from detokenized text), a few gpt-oss markers are made
    USER_DEFINED. The end-of-generation set is eos, eot, eom, the FIM pad/repo/separator tokens
    and the tokens with an EOG text, less two workarounds (gpt-oss's <|end|>, Gemma 4's </s>)."""
    wanted = {*_EOT_TEXTS, *_EOG_TEXTS, *_FORCED_USER_DEFINED, *(t for ts in _FIM_TEXTS.values() for t in ts)}
    by_text = {token: i for i, token in enumerate(tokens) if token in wanted}
    types = types.copy()
    control: set[int] = {by_text[t] for t in (*_EOT_TEXTS, *_EOG_TEXTS) if t in by_text}
    fim: dict[str, int] = {}
    for role, texts in _FIM_TEXTS.items():
        found = [by_text[t] for t in texts if t in by_text]
        if found:  # llama.cpp takes the first it meets (hash order); the lowest id here
            fim[role] = min(found)
            control.add(fim[role])
    for i in control:
        types[i] = CONTROL
    for text in _FORCED_USER_DEFINED:
        if text in by_text:
            types[by_text[text]] = USER_DEFINED

    eog = {by_text[t] for t in _EOG_TEXTS if t in by_text}
    eog |= {fim[r] for r in ("pad", "rep", "sep") if r in fim}
    eog |= {special_ids[k] for k in (_KEY_EOS, _KEY_EOT, _KEY_EOM) if special_ids[k] is not None}
    texts = {tokens[i] for i in eog}
    end = by_text.get("<|end|>")
    if end in eog and ({"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts):
        eog.discard(end)
        types[end] = USER_DEFINED
    close = by_text.get("</s>")
    if close in eog and "<|tool_response>" in texts:
        eog.discard(close)
        types[close] = NORMAL
    first = [special_ids[k] for k in (_KEY_EOT, _KEY_EOM) if special_ids[k] in eog]
    return types, list(dict.fromkeys(first + sorted(eog)))


def _pre_tokenizer(meta: _Metadata) -> _PreTokenizer:
    name = meta.string(_KEY_PRE)
    if name is None or name == "":
        name = "default"  # llama.cpp: "missing pre-tokenizer type, using: 'default'"
    spec = PRE_TOKENIZERS.get(name)
    if spec is None:
        raise TokenizerError(
            f"{meta.path}: unknown pre-tokenizer {name!r} (GGUF key {_KEY_PRE!r}); supported: "
            + ", ".join(sorted(PRE_TOKENIZERS))
        )
    return spec


# ---------------------------------------------------------------------------------------------
# Reading metadata


_INT_TYPES = {
    gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16, gguf.GGUFValueType.INT16,
    gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT64,
}
_NUMBER_TYPES = _INT_TYPES | {gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64}


class _Metadata:
    """Typed access to a reader's fields; every problem is a TokenizerError naming file and key."""

    def __init__(self, reader: gguf.GGUFReader, path: str):
        self.reader = reader
        self.path = path

    def _field(self, key: str, required: bool) -> Any:
        field = self.reader.fields.get(key)
        if field is None and required:
            raise TokenizerError(f"{self.path}: GGUF metadata key {key!r} is missing (needed to build the tokenizer)")
        return field

    def _bad_type(self, key: str, field: Any, expected: str) -> TokenizerError:
        got = "/".join(t.name for t in field.types) or "unknown"
        return TokenizerError(f"{self.path}: GGUF metadata key {key!r} has type {got}, expected {expected}")

    def string(self, key: str, required: bool = False) -> str | None:
        field = self._field(key, required)
        if field is None:
            return None
        if field.types != [gguf.GGUFValueType.STRING]:
            raise self._bad_type(key, field, "STRING")
        return self._decode(key, field.parts[field.data[0]])

    def boolean(self, key: str, default: bool) -> bool:
        field = self._field(key, False)
        if field is None:
            return default
        if len(field.types) != 1 or field.types[0] not in _INT_TYPES | {gguf.GGUFValueType.BOOL}:
            raise self._bad_type(key, field, "BOOL")
        return bool(field.parts[field.data[0]][0])

    def token_id(self, key: str, n_tokens: int) -> int | None:
        field = self._field(key, False)
        if field is None:
            return None
        if len(field.types) != 1 or field.types[0] not in _INT_TYPES:
            raise self._bad_type(key, field, "an integer")
        value = int(field.parts[field.data[0]][0])
        if value < 0:  # some converters write -1 for "none"
            return None
        if value >= n_tokens:
            raise TokenizerError(
                f"{self.path}: GGUF metadata key {key!r} = {value} is out of range "
                f"(the vocabulary has {n_tokens} tokens)"
            )
        return value

    def strings(self, key: str, required: bool = False) -> list[str] | None:
        field = self._field(key, required)
        if field is None:
            return None
        is_array = field.types[:1] == [gguf.GGUFValueType.ARRAY]
        if not is_array or (field.data and field.types[1:] != [gguf.GGUFValueType.STRING]):
            raise self._bad_type(key, field, "ARRAY of STRING")
        return [self._decode(key, field.parts[i], index) for index, i in enumerate(field.data)]

    def numbers(self, key: str, length: int, required: bool = False) -> np.ndarray | None:
        field = self._field(key, required)
        if field is None:
            return None
        if field.types[:1] != [gguf.GGUFValueType.ARRAY] or (
            field.data and (len(field.types) != 2 or field.types[1] not in _NUMBER_TYPES)
        ):
            raise self._bad_type(key, field, "ARRAY of numbers")
        if len(field.data) < length:
            raise TokenizerError(
                f"{self.path}: GGUF metadata key {key!r} has {len(field.data)} entries for {length} tokens"
            )
        values = np.concatenate([field.parts[i] for i in field.data[:length]]) if length else np.zeros(0)
        return values

    def _decode(self, key: str, raw: np.ndarray, index: int | None = None) -> str:
        try:
            return raw.tobytes().decode("utf-8")
        except UnicodeDecodeError as e:
            where = key if index is None else f"{key}[{index}]"
            raise TokenizerError(f"{self.path}: GGUF metadata {where!r} is not valid UTF-8 ({e.reason})") from e


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
