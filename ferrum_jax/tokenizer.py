"""Tokenizer: text <-> token ids, chat templates and streaming detokenization, on the `tokenizers` library.

`Tokenizer.from_dir` reads a Hugging Face model directory the way transformers 5's `AutoTokenizer` does
for a tokenizer.json-backed tokenizer, so that encode/decode/chat ids match it:

- tokenizer.json (required) is the whole encode/decode pipeline, post-processor (BOS/EOS) included.
- tokenizer_config.json names bos/eos/pad tokens and may hold the chat template. Its `add_bos_token`
  and `add_eos_token` are ignored: transformers 5 drops them whenever tokenizer.json exists and lets
  the post-processor there decide alone (4.x's LlamaTokenizerFast honoured them; 5 does not).
- chat_template.jinja (what save_pretrained writes since transformers 4.4x) beats tokenizer_config.json's
  `chat_template`, which beats chat_template.json (the older processor format).
- special_tokens_map.json is legacy: transformers reads it only when tokenizer_config.json has no
  `added_tokens_decoder`, and then its entries win.
- generation_config.json's `eos_token_id` (int or list) adds stop ids: instruct models often stop on
  an end-of-turn token that is not the tokenizer's eos_token.

Chat templates render in a Jinja sandbox with the globals and filters that Hub templates expect
(those of transformers' `apply_chat_template`).

`IncrementalDetokenizer` turns a stream of ids into text deltas without ever emitting half of a
multi-byte character, at a cost per call that does not grow with the length of the stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.processors import TemplateProcessing

from ferrum_jax.errors import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"

# What a byte-level or byte-fallback decoder puts where the bytes decoded so far end mid-character.
_REPLACEMENT_CHAR = "\ufffd"

# Names a message's reasoning goes by; transformers copies it under the first two so templates that
# read either one see it (gpt-oss templates read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _one_line(error: BaseException) -> str:
    """An exception's text squeezed onto one line, for error messages that must stay one line."""
    return " ".join(str(error).split()) or type(error).__name__


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens, BOS/EOS policy and chat template of a model.

    The backend is taken over, not copied: named special tokens are registered on it (so decode can
    skip them) and its post-processor may be replaced.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_tokens: Sequence[str | int],
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos: bool | None = None,
        add_eos: bool = False,
    ) -> None:
        """`eos_tokens` are token strings or ids; generation stops on any of them, and the first one is
        the `eos_token` that chat templates see. `add_bos=None` leaves the post-processor of the backend
        in charge of BOS; True/False (or `add_eos=True`) replaces it with `[bos] $A [eos]`."""
        self._backend = backend
        self.bos_token = bos_token
        self.bos_token_id = None if bos_token is None else self._special_token_id(bos_token, "bos_token")

        eos_ids: list[int] = []
        for token in eos_tokens:
            token_id = self._eos_id(token)
            if token_id not in eos_ids:
                eos_ids.append(token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(eos_ids)
        first_eos = eos_tokens[0] if len(eos_tokens) else None
        self.eos_token: str | None = backend.id_to_token(first_eos) if isinstance(first_eos, int) else first_eos

        self.pad_token = pad_token
        self.pad_token_id = None if pad_token is None else self._special_token_id(pad_token, "pad_token")
        self.chat_template = chat_template
        self._set_post_processor(add_bos, add_eos)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Loads the tokenizer of a Hugging Face model directory (see the module docstring)."""
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"{root}: not a directory (expected a model directory with {TOKENIZER_FILE})")
        tokenizer_file = root / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file}: missing; ferrum-jax needs the fast-tokenizer file")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises plain Exception for any parse error
            raise TokenizerError(
                f"{tokenizer_file}: cannot be loaded by the tokenizers library ({_one_line(e)})"
            ) from e

        config_file = root / TOKENIZER_CONFIG_FILE
        config = _read_json(config_file) or {}
        names = ("bos_token", "eos_token", "pad_token")
        tokens = {name: _token_field(config, name, config_file) for name in names}
        map_file = root / SPECIAL_TOKENS_MAP_FILE
        if "added_tokens_decoder" not in config:
            # transformers 5 reads this legacy file only for configs without added_tokens_decoder,
            # and lets its entries override the config's.
            special_map = _read_json(map_file) or {}
            for name in names:
                if name in special_map:
                    tokens[name] = _token_field(special_map, name, map_file)

        eos_tokens: list[str | int] = [] if tokens["eos_token"] is None else [tokens["eos_token"]]
        generation_file = root / GENERATION_CONFIG_FILE
        generation_config = _read_json(generation_file) or {}
        eos_tokens += _eos_ids_field(generation_config, generation_file)

        try:
            return cls(
                backend,
                bos_token=tokens["bos_token"],
                eos_tokens=eos_tokens,
                pad_token=tokens["pad_token"],
                chat_template=_find_chat_template(root, config, config_file),
                add_bos=None,  # tokenizer.json's post-processor decides (see the module docstring)
            )
        except TokenizerError as e:
            raise TokenizerError(f"{root}: {e}") from e

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the BOS/EOS policy of the tokenizer."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # int() so numpy/jax scalars from the engine are accepted too.
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Renders a conversation to the prompt text. `extra` become template variables (tools=...,
        enable_thinking=..., ...) and override the defaults below."""
        if self.chat_template is None:
            raise TokenizerError(
                f"this tokenizer has no chat template (none in {CHAT_TEMPLATE_FILE}, "
                f"{TOKENIZER_CONFIG_FILE} 'chat_template' or {LEGACY_CHAT_TEMPLATE_FILE})"
            )
        if not messages:
            raise TokenizerError("cannot apply the chat template to an empty list of messages")
        conversation = [_template_message(message, i) for i, message in enumerate(messages)]
        # As in transformers: the named special tokens that are set (a None would render as "None"),
        # and tools/documents defined as None so `tools is not none` checks work.
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        variables: dict[str, Any] = {name: value for name, value in named.items() if value is not None}
        variables.update(tools=None, documents=None)
        variables.update(extra)
        template = _compile_template(self.chat_template)
        try:
            return template.render(messages=conversation, add_generation_prompt=add_generation_prompt, **variables)
        except TokenizerError:
            raise
        except Exception as e:  # anything a template does wrong with these inputs
            raise TokenizerError(f"chat template failed to render: {type(e).__name__}: {_one_line(e)}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """Prompt ids of a conversation. The template writes the BOS text itself, so this encodes
        without special tokens, as transformers does; otherwise the prompt would start with two BOS."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh streaming decoder for one sequence of generated ids."""
        return IncrementalDetokenizer(self._backend, skip_special_tokens=skip_special_tokens)

    def _special_token_id(self, token: str, field: str) -> int:
        """The id of a named special token, registered as special on the backend as transformers does
        (so decode(skip_special_tokens=True) drops it and encode never splits it)."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{field} {token!r} is not in the vocabulary of {TOKENIZER_FILE}")
        added = {t.content: t for t in self._backend.get_added_tokens_decoder().values()}.get(token)
        if added is None:
            self._backend.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
        elif not added.special:  # re-adding the same content updates the flag, keeping the id
            self._backend.add_special_tokens(
                [
                    tokenizers.AddedToken(
                        token,
                        single_word=added.single_word,
                        lstrip=added.lstrip,
                        rstrip=added.rstrip,
                        normalized=added.normalized,
                        special=True,
                    )
                ]
            )
        return token_id

    def _eos_id(self, token: str | int) -> int:
        if isinstance(token, str):
            return self._special_token_id(token, "eos_token")
        if isinstance(token, int) and not isinstance(token, bool) and token >= 0:
            return token
        raise TokenizerError(f"eos token {token!r} is invalid; allowed: a token string or an id >= 0")

    def _set_post_processor(self, add_bos: bool | None, add_eos: bool) -> None:
        if add_bos is None and not add_eos:
            return  # tokenizer.json's post-processor decides, as in transformers without the flags
        if add_bos is None:
            # Only add_eos was asked for: keep the BOS the current post-processor adds, if any.
            probe = self._backend.encode("", add_special_tokens=True).ids
            add_bos = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        # transformers silently drops a flag whose token is not set; so do we.
        bos = self.bos_token if add_bos else None
        eos = self.eos_token if add_eos and self.eos_token_ids else None
        single = [f"{bos}:0"] if bos else []
        single.append("$A:0")
        if eos:
            single.append(f"{eos}:0")
        pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
        special_tokens = []
        if bos:
            special_tokens.append((bos, self.bos_token_id))
        if eos:
            special_tokens.append((eos, self._backend.token_to_id(eos)))
        self._backend.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)


class IncrementalDetokenizer:
    """Streams the text of a growing sequence of ids, as deltas.

    Uses the prefix_offset / read_offset scheme of vLLM and transformers' TextStreamer: each call
    decodes only the window from `prefix_offset` (the tokens already emitted by the previous call)
    to the end, and emits what that window adds beyond the decode of its emitted part. Decoding a
    window that starts with already-emitted tokens, rather than just the new tokens, keeps decoders
    that look at the first token (SentencePiece's leading-space strip) and multi-token characters
    right. When the window's text ends in U+FFFD, the last tokens hold part of a character; nothing
    is emitted until later tokens complete it.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        # The window: the ids from vLLM's prefix_offset on (older ones are never decoded again, so
        # they are dropped), and read_offset, the end of what has been emitted, relative to it.
        self._ids: list[int] = []
        self._read_offset = 0

    def add(self, ids: Sequence[int]) -> str:
        """Appends ids and returns the new text they complete ("" while a character is incomplete)."""
        self._ids.extend(int(i) for i in ids)
        emitted, text = self._window_texts()
        if len(text) <= len(emitted) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._advance()
        return text[len(emitted) :]

    def flush(self) -> str:
        """Returns whatever is held back: at the end of a stream, a character left incomplete is
        emitted as U+FFFD rather than dropped."""
        emitted, text = self._window_texts()
        self._advance()
        return text[len(emitted) :] if len(text) > len(emitted) else ""

    def _window_texts(self) -> tuple[str, str]:
        """(decode of the already-emitted part of the window, decode of the whole window)."""
        skip = self._skip_special_tokens
        emitted = self._backend.decode(self._ids[: self._read_offset], skip_special_tokens=skip)
        text = self._backend.decode(self._ids, skip_special_tokens=skip)
        return emitted, text

    def _advance(self) -> None:
        """Marks every id as emitted; the chunk just emitted becomes the next window's prefix."""
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)


# ---------------------------------------------------------------------------------------------
# Reading the model directory


def _read_json(path: Path) -> dict | None:
    """A JSON object file, or None if the file does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot be read ({_one_line(e)})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_field(data: Mapping[str, Any], name: str, path: Path) -> str | None:
    """A special-token field: a string, an AddedToken dict ({"content": ...}) or null."""
    value = data.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: field {name!r} must be a token string or an AddedToken object with 'content'")


def _eos_ids_field(data: Mapping[str, Any], path: Path) -> list[int]:
    value = data.get("eos_token_id")
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TokenizerError(
            f"{path}: field 'eos_token_id' must be a token id or a list of token ids, got {value!r}"
        )
    return values


def _template_field(data: Mapping[str, Any], path: Path) -> str | None:
    """A `chat_template` field: a string, or transformers' list of named templates (we use "default")."""
    value = data.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        return {t["name"]: t["template"] for t in value}.get("default")
    raise TokenizerError(f"{path}: field 'chat_template' must be a string or a list of {{name, template}} objects")


def _find_chat_template(root: Path, config: Mapping[str, Any], config_file: Path) -> str | None:
    jinja_file = root / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_file}: cannot be read ({_one_line(e)})") from e
    template = _template_field(config, config_file)
    if template is None:
        legacy_file = root / LEGACY_CHAT_TEMPLATE_FILE
        template = _template_field(_read_json(legacy_file) or {}, legacy_file)
    return template


# ---------------------------------------------------------------------------------------------
# Chat templates


def _template_message(message: Any, index: int) -> dict:
    """A message as transformers hands it to templates: keys with a None value dropped (OpenAI-style
    clients send content=None / tool_calls=None, which templates would print as "None"), and the
    reasoning text copied under the names templates read."""
    if not isinstance(message, Mapping):
        raise TokenizerError(
            f"chat message {index} must be a dict with 'role' and 'content', got {type(message).__name__}"
        )
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _raise_exception(message: str) -> None:
    # Templates call this to refuse a conversation (bad role order, unsupported role...).
    raise TokenizerError("chat template rejected the conversation: " + " ".join(str(message).split()))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override of Jinja's tojson: no HTML escaping, keeps non-ASCII, supports indent.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=1)
def _jinja_environment() -> ImmutableSandboxedEnvironment:
    # Templates come from the Hub: the sandbox keeps them from reaching Python internals or mutating
    # the inputs. trim_blocks/lstrip_blocks and loopcontrols are what templates are written against.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    try:
        return _jinja_environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template has a syntax error at line {e.lineno}: {_one_line(e)}") from e
