"""Generation: one jitted prefill (which also samples the first token) and one jitted multi-step
decode loop (`lax.while_loop` on device: forward, sample, stop checks; no host round-trip per token).

Shapes are bucketed so programs are reused: batch to a power of two, prompt length to a power of
two (>= 16), cache capacity to a power of two (>= 256). Prompts are right-padded: every sequence
keeps positions 0..len-1 and its own write position, so no mask needs to know about padding.
The KV cache and the decode state are donated: XLA updates them in place. The cache is a
`KVCache` (contiguous) or a `PagedKVCache`, int8 / fp8 or in the model's dtype, as the caller's
`KVCacheConfig` says (`kv_cache=`); each kind of cache is its own pytree, so its own programs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import models
from ferrum_jax import sharding
from ferrum_jax.backend import Ops, record_dispatch, summarize
from ferrum_jax.cache import KVCache
from ferrum_jax.compile_log import count_compiles
from ferrum_jax.errors import ConfigError, FerrumError, PromptTooLongError, TokenizerError
from ferrum_jax.kv_config import KVCacheConfig
from ferrum_jax.model import Model
from ferrum_jax.paged_cache import PagedKVCache
from ferrum_jax.sampling import GREEDY, SamplingArrays, SamplingParams, sample, update_seen

MIN_PROMPT_BUCKET = 16
MIN_CAPACITY = 256
EOS_SLOTS = 8  # stop ids are padded to a fixed count so a new tokenizer does not recompile
Cache = KVCache | PagedKVCache


def bucket(n: int, minimum: int = 1) -> int:
    """The power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    tokens: jax.Array  # int32 [B, capacity]: generated tokens, in order
    count: jax.Array  # int32 [B]: how many generated so far
    last: jax.Array  # int32 [B]: newest token, fed at the next step
    position: jax.Array  # int32 [B]: position of `last`
    done: jax.Array  # bool [B]
    seen: jax.Array  # bool [B, vocab]: prompt and generated tokens (repetition penalty)
    key: jax.Array  # uint32 [B, 2]: one PRNG key per row, from that row's seed
    max_new: jax.Array  # int32 [B]
    stop_ids: jax.Array  # int32 [EOS_SLOTS], -1 = unused


def _forward(weights, tokens, positions, cache, cfg, ops, **kw):
    return models.family_of(cfg).forward(weights, tokens, positions, cache, cfg, ops, **kw)


def _split_rows(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    pairs = jax.vmap(jax.random.split)(keys)  # [B, 2, 2]
    return pairs[:, 0], pairs[:, 1]


def _advance(state: DecodeState, tok: jax.Array, seen: jax.Array, key: jax.Array, capacity: int) -> DecodeState:
    """Append `tok` to every live row and update its stop conditions."""
    live = ~state.done
    rows = jnp.arange(tok.shape[0])
    tokens = state.tokens.at[rows, jnp.where(live, state.count, capacity)].set(tok, mode="drop")
    count = state.count + live
    position = state.position + live
    stop = (tok[:, None] == state.stop_ids[None, :]).any(axis=1)
    done = state.done | (live & (stop | (count >= state.max_new) | (position >= capacity)))
    return dataclasses.replace(state, tokens=tokens, count=count, last=jnp.where(live, tok, state.last),
                               position=position, done=done, seen=seen, key=key)


@partial(jax.jit, static_argnames=("cfg", "ops"), donate_argnames=("cache",))
def prefill(weights: Any, cache: Cache, tokens: jax.Array, lengths: jax.Array, params: SamplingArrays,
            max_new: jax.Array, stop_ids: jax.Array, key: jax.Array, *, cfg: Any, ops: Ops
            ) -> tuple[DecodeState, Cache]:
    """Run right-padded prompts tokens [B, T] (true lengths [B]) into an empty cache and sample the
    first new token of each row."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = _forward(weights, tokens, positions, cache, cfg, ops, kv_len=t, logits_at=lengths - 1)
    vocab = logits.shape[-1]
    in_prompt = positions < lengths[:, None]
    seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], jnp.where(in_prompt, tokens, vocab)].set(
        True, mode="drop")
    key, sub = _split_rows(key)
    first = sample(logits[:, 0], sub, params, seen)
    start = DecodeState(tokens=jnp.zeros((b, cache.capacity), jnp.int32), count=jnp.zeros((b,), jnp.int32),
                        last=first, position=lengths - 1, done=jnp.zeros((b,), bool), seen=seen, key=key,
                        max_new=max_new, stop_ids=stop_ids)
    return _advance(start, first, update_seen(seen, first), key, cache.capacity), cache


def _decode_loop(weights: Any, cache: Cache, state: DecodeState, params: SamplingArrays, steps: jax.Array, *,
                 cfg: Any, ops: Ops) -> tuple[DecodeState, Cache]:
    """Up to `steps` decode steps (fewer if every row stops), all on device."""

    def cond(carry):
        state, _, i = carry
        return (i < steps) & ~jnp.all(state.done)

    def body(carry):
        state, cache, i = carry
        logits, cache = _forward(weights, state.last[:, None], state.position[:, None], cache, cfg, ops)
        key, sub = _split_rows(state.key)
        tok = sample(logits[:, 0], sub, params, state.seen)
        return _advance(state, tok, update_seen(state.seen, tok), key, cache.capacity), cache, i + 1

    # The decode attention kernel's split counters, zeroed once for the whole loop (KVCache.tickets).
    tickets = isinstance(cache, KVCache) and not cache.quantized
    if tickets:
        cache = cache.with_tickets()
    state, cache, _ = jax.lax.while_loop(cond, body, (state, cache, jnp.int32(0)))
    return state, cache.without_tickets() if tickets else cache


class DecodeProgram:
    """The jitted multi-step decode loop (`_decode_loop`), called as a jitted function (and
    `.lower(...)` for AOT use). Each call picks the program compiled with the XLA options that
    `ops.compiler_options(batch)` gives (cuBLAS GEMMs for large batches on GPU); one jit each."""

    __name__ = "decode"

    def __init__(self, out_shardings: Any = None):
        self.out_shardings = out_shardings
        self._jitted: dict[tuple[tuple[str, Any], ...], Any] = {}

    def program(self, state: DecodeState, ops: Ops) -> Any:
        options = ops.compiler_options(state.last.shape[0]) or {}
        key = tuple(sorted(options.items()))
        if key not in self._jitted:
            kw = {} if self.out_shardings is None else {"out_shardings": self.out_shardings}
            self._jitted[key] = jax.jit(_decode_loop, static_argnames=("cfg", "ops"), donate_argnames=("cache", "state"),
                                        compiler_options=options or None, **kw)
        return self._jitted[key]

    def __call__(self, weights: Any, cache: Cache, state: DecodeState, params: SamplingArrays, steps: jax.Array,
                 *, cfg: Any, ops: Ops) -> tuple[DecodeState, Cache]:
        """Up to `steps` decode steps (fewer if every row stops), all on device; `cache` and
        `state` are donated."""
        return self.program(state, ops)(weights, cache, state, params, steps, cfg=cfg, ops=ops)

    def lower(self, weights: Any, cache: Cache, state: Any, params: Any, steps: Any, *, cfg: Any, ops: Ops) -> Any:
        return self.program(state, ops).lower(weights, cache, state, params, steps, cfg=cfg, ops=ops)


decode = DecodeProgram()


@functools.cache
def _programs(mesh: jax.sharding.Mesh | None) -> tuple[Any, Any]:
    """(prefill, decode) for a model on `mesh`: the same functions jitted with the sharded layouts of
    their outputs (decode state split by rows over "data", cache as `sharding.CACHE_AXES`), so a
    decode call gets back exactly the shardings it was given and never recompiles."""
    if mesh is None:
        return prefill, decode
    rows, cache = sharding.row_sharding(mesh), sharding.cache_sharding(mesh)
    state = DecodeState(**{f.name: rows for f in dataclasses.fields(DecodeState)} | {"stop_ids": sharding.replicated(mesh)})
    out = (state, KVCache(k=cache, v=cache))
    return (jax.jit(prefill.__wrapped__, static_argnames=("cfg", "ops"), donate_argnames=("cache",), out_shardings=out),
            DecodeProgram(out_shardings=out))


@dataclasses.dataclass
class Stats:
    rows: int = 0  # sequences in the batch
    prompt_tokens: int = 0
    generated_tokens: int = 0  # including the first, which prefill samples
    prefill_seconds: float = 0.0  # run time of prefill, excluding compilation
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    compiles: int = 0
    dispatch: dict[str, str] = dataclasses.field(default_factory=dict)  # op -> implementation that ran

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        decoded = self.generated_tokens - self.rows  # each row's first token comes from prefill
        return decoded / self.decode_seconds if self.decode_seconds and decoded > 0 else 0.0


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (a stop token), "length" (max_tokens or the cache capacity)
    stats: Stats


Prompt = str | Sequence[int]
_DISPATCH: dict[tuple, dict[str, str]] = {}  # program -> {op: implementation}, filled when traced


class Generation:
    """One batched generation run. Iterate to get per-row text deltas chunk by chunk (streaming);
    `completions()` runs it to the end. Built by `generate` and `stream`."""

    def __init__(self, model: Model, prompts: Sequence[Prompt], *, max_tokens: int, sampling, chat: bool,
                 stop_token_ids: Sequence[int], capacity: int | None, chunk: int | None,
                 kv_cache: KVCacheConfig | None = None):
        self.model, self.chunk, self.stats = model, chunk, Stats()
        kv_cache = KVCacheConfig() if kv_cache is None else kv_cache
        if not isinstance(kv_cache, KVCacheConfig):
            raise ConfigError(f"kv_cache must be a KVCacheConfig, got {type(kv_cache).__name__}")
        if model.mesh is not None and not kv_cache.is_default:
            raise ConfigError(f"kv_cache: a model on a device mesh runs only the contiguous cache in the model's "
                              f"dtype (KVCacheConfig()); got layout={kv_cache.layout!r}, dtype={kv_cache.dtype!r}")
        self.kv_cache = kv_cache
        params = list(sampling) if isinstance(sampling, Sequence) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            raise FerrumError(f"got {len(params)} sampling settings for {len(prompts)} prompts")
        if max_tokens < 1:
            raise FerrumError(f"max_tokens must be >= 1, got {max_tokens}")
        self.ids = [self._encode(p, chat, i) for i, p in enumerate(prompts)]
        lengths = [len(x) for x in self.ids]
        cfg = model.config
        longest = max(lengths)
        if longest > cfg.max_position_embeddings:
            raise PromptTooLongError(f"prompt of {longest} tokens exceeds the model's context of "
                                     f"{cfg.max_position_embeddings} (max_position_embeddings)")
        if capacity is None:
            capacity = max(bucket(longest + max_tokens, MIN_CAPACITY), bucket(longest, MIN_PROMPT_BUCKET))
            capacity = max(min(capacity, cfg.max_position_embeddings), longest)
        elif longest > capacity:
            raise PromptTooLongError(f"prompt of {longest} tokens does not fit the KV cache capacity of {capacity}")
        self.capacity = kv_cache.capacity(capacity)  # a paged cache rounds up to whole pages
        self.batch = -(-bucket(len(prompts)) // model.data_parallel) * model.data_parallel  # rows split evenly
        t = min(bucket(longest, MIN_PROMPT_BUCKET), capacity)
        tokens = np.zeros((self.batch, t), np.int32)
        for i, x in enumerate(self.ids):
            tokens[i, : len(x)] = x
        self.lengths = np.array(lengths + [1] * (self.batch - len(prompts)), np.int32)
        self.tokens = tokens
        # Padding rows of the batch bucket ask for no tokens: they are done from the start.
        self.max_new = np.array([max_tokens] * len(prompts) + [0] * (self.batch - len(prompts)), np.int32)
        self.params = SamplingArrays.from_params(params + [GREEDY] * (self.batch - len(prompts)))
        stops = list(dict.fromkeys([*(model.tokenizer.eos_token_ids if model.tokenizer else ()), *stop_token_ids]))
        self.stop_ids = np.full((bucket(len(stops), EOS_SLOTS),), -1, np.int32)
        self.stop_ids[: len(stops)] = stops
        seeds = [p.seed for p in params] + [0] * (self.batch - len(prompts))
        self.key = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))
        self.n = len(prompts)
        self.stats.prompt_tokens, self.stats.rows = sum(lengths), len(prompts)
        self.state: DecodeState | None = None
        self.counts = np.zeros(self.batch, np.int64)

    def _encode(self, prompt: Prompt, chat: bool, i: int) -> list[int]:
        vocab = self.model.config.vocab_size
        if isinstance(prompt, str):
            tok = self.model.tokenizer
            if tok is None:
                raise TokenizerError("this model has no tokenizer: pass prompts as token ids")
            ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
        else:
            ids = [int(x) for x in prompt]
            bad = [x for x in ids if not 0 <= x < vocab]
            if bad:
                raise FerrumError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if not ids:
            raise FerrumError(f"prompt {i} is empty: give at least one token")
        return ids

    def _timed(self, fn, *args, **kw):
        """Run a jitted call, splitting compile time from run time. Op choices are only seen while
        tracing, so they are remembered per program for the calls that reuse it."""
        cache = args[1]  # its kind, shapes and dtypes pick the program (a paged cache's page order does not)
        leaves, tree = jax.tree_util.tree_flatten(cache)
        layout = (tree, tuple((a.shape, a.dtype) for a in leaves))
        program = (fn.__name__, kw["cfg"], kw["ops"], self.batch, self.tokens.shape[1], layout)
        with count_compiles() as log, record_dispatch() as choices:
            start = time.perf_counter()
            out = fn(*args, **kw)
            jax.block_until_ready(out)
            elapsed = time.perf_counter() - start
        self.stats.compile_seconds += log.seconds
        self.stats.compiles += log.compiles
        if choices:
            _DISPATCH[program] = summarize(choices)
        self.stats.dispatch |= _DISPATCH.get(program, {})
        return out, max(elapsed - log.seconds, 0.0)

    def __iter__(self) -> Iterator[list[int]]:
        """Runs prefill, then decode chunks; yields, after each, the new token ids of every row."""
        m, cfg = self.model, self.model.config
        shape = dict(num_layers=cfg.num_layers, batch=self.batch, kv_heads=cfg.num_kv_heads, capacity=self.capacity,
                     head_dim=cfg.head_dim, dtype=m.dtype)
        cache = self.kv_cache.create(**shape) if m.mesh is None else sharding.create_cache(m.mesh, **shape)
        prefill_fn, decode_fn = _programs(m.mesh)
        rows = functools.partial(sharding.place, m.mesh)  # per-row inputs, split over "data" on a mesh
        params = rows(self.params)
        (state, cache), seconds = self._timed(
            prefill_fn, m.weights, cache, rows(self.tokens), rows(self.lengths), params, rows(self.max_new),
            sharding.place(m.mesh, self.stop_ids, rows=False), rows(self.key), cfg=cfg, ops=m.ops)
        self.stats.prefill_seconds += seconds
        yield self._take(state)
        steps = self.chunk or int(self.max_new.max())
        while not bool(np.all(sharding.host(state.done))):
            (state, cache), seconds = self._timed(decode_fn, m.weights, cache, state, params, jnp.int32(steps),
                                                  cfg=cfg, ops=m.ops)
            self.stats.decode_seconds += seconds
            yield self._take(state)
        self.state = state

    def _take(self, state: DecodeState) -> list[list[int]]:
        counts = np.minimum(sharding.host(state.count), self.max_new)
        tokens = sharding.host(state.tokens)
        new = [tokens[i, self.counts[i]: counts[i]].tolist() for i in range(self.n)]
        self.stats.generated_tokens += int(sum(counts[: self.n] - self.counts[: self.n]))
        self.counts = counts
        self.done = sharding.host(state.done)
        return new

    def completions(self, generated: list[list[int]] | None = None) -> list[Completion]:
        if generated is None:
            generated = [[] for _ in range(self.n)]
            for chunk in self:
                for row, ids in zip(generated, chunk):
                    row.extend(ids)
        stop_ids = set(self.stop_ids.tolist()) - {-1}
        out = []
        for i, ids in enumerate(generated):
            stopped = bool(ids) and ids[-1] in stop_ids
            body = ids[:-1] if stopped else ids
            text = self.model.tokenizer.decode(body) if self.model.tokenizer else ""
            out.append(Completion(text=text, token_ids=body, prompt_tokens=len(self.ids[i]),
                                  finish_reason="stop" if stopped else "length", stats=self.stats))
        return out


def generate(model: Model, prompts: Prompt | Sequence[Prompt], *, max_tokens: int = 256,
             sampling: SamplingParams | Sequence[SamplingParams] = GREEDY, chat: bool = False,
             stop_token_ids: Sequence[int] = (), capacity: int | None = None,
             kv_cache: KVCacheConfig | None = None) -> Completion | list[Completion]:
    """Generate continuations. A single prompt (a string or a list of token ids) gives one
    Completion; a list of prompts gives a list. The whole decode loop runs on device. `kv_cache`
    picks the cache layout and storage dtype (None: `KVCacheConfig()`, contiguous in the model's dtype)."""
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
    batch = [prompts] if single else list(prompts)
    if not batch:
        raise FerrumError("no prompts given")
    run = Generation(model, batch, max_tokens=max_tokens, sampling=sampling, chat=chat,
                     stop_token_ids=stop_token_ids, capacity=capacity, chunk=None, kv_cache=kv_cache)
    out = run.completions()
    return out[0] if single else out


def stream(model: Model, prompt: Prompt, *, max_tokens: int = 256, sampling: SamplingParams = GREEDY,
           chat: bool = False, stop_token_ids: Sequence[int] = (), capacity: int | None = None,
           chunk: int = 4, kv_cache: KVCacheConfig | None = None) -> Iterator[str]:
    """Yield text as it is generated (every `chunk` tokens; the same compiled decode program as
    `generate`). The generator's return value (StopIteration.value) is the final Completion."""
    run = Generation(model, [prompt], max_tokens=max_tokens, sampling=sampling, chat=chat,
                     stop_token_ids=stop_token_ids, capacity=capacity, chunk=chunk, kv_cache=kv_cache)
    tok = model.tokenizer
    if tok is None:
        raise TokenizerError("streaming text needs a tokenizer")
    detok, generated = tok.detokenizer(), []
    stop_ids = set(run.stop_ids.tolist()) - {-1}
    for (ids,) in run:
        generated.extend(ids)
        text = detok.add([t for t in ids if t not in stop_ids])
        if text:
            yield text
    tail = detok.flush()
    if tail:
        yield tail
    return run.completions([generated])[0]


@partial(jax.jit, static_argnames=("cfg", "ops", "dtype"))
def _prompt_logits(weights: Any, tokens: jax.Array, *, cfg: Any, ops: Ops, dtype: str) -> jax.Array:
    b, t = tokens.shape
    cache = KVCache.create(num_layers=cfg.num_layers, batch=b, kv_heads=cfg.num_kv_heads, capacity=t,
                           head_dim=cfg.head_dim, dtype=dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return _forward(weights, tokens, positions, cache, cfg, ops)[0]


def logits(model: Model, prompt: Prompt) -> np.ndarray:
    """float32 [T, vocab]: the next-token logits after every position of one prompt (for
    inspection and notebooks; generation itself only ever computes the last position)."""
    ids = Generation(model, [prompt], max_tokens=1, sampling=GREEDY, chat=False, stop_token_ids=(),
                     capacity=None, chunk=None).ids[0]
    tokens = np.zeros((1, bucket(len(ids), MIN_PROMPT_BUCKET)), np.int32)
    tokens[0, : len(ids)] = ids
    out = _prompt_logits(model.weights, jnp.asarray(tokens), cfg=model.config, ops=model.ops, dtype=model.dtype.name)
    return np.asarray(out[0, : len(ids)])
