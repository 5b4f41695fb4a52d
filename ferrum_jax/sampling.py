"""Token sampling: repetition penalty, temperature, top-k, top-p and min-p, then a categorical draw.

`SamplingParams` is the host-side, per-request description; `SamplingArrays` packs a batch of them
into [B] device arrays, so one compiled decode step serves any mix of settings. Everything below
`SamplingArrays` is pure, static-shaped and jit-safe, meant to run inside a decode `lax.while_loop`.

The filters follow transformers' logits processors, in the order `generate()` applies them:
RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
MinPLogitsWarper (each keeps at least one token). One difference, on ties only: top-k and top-p
here cut at a threshold value, so tokens tied with the last kept one are all kept, where torch
would keep an arbitrary subset of them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ferrum_jax.errors import SamplingError

# jax.random.key truncates seeds to 32 bits unless x64 is on, so larger seeds would silently collide.
_MAX_SEED = 2**32 - 1
_MAX_TOP_K = 2**31 - 1  # stored as int32 on device


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token. Defaults sample from the model's plain distribution."""

    temperature: float = 1.0  # 0 => greedy (argmax); the filters below are then ignored
    top_k: int = 0  # keep the k most likely tokens; 0 => off
    top_p: float = 1.0  # keep the smallest set with probability mass >= top_p; 1 => off
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob; 0 => off
    repetition_penalty: float = 1.0  # CTRL/HF style, on tokens already seen; 1 => off
    seed: int = 0  # for the caller's jax.random.key; sample() itself takes a key

    def validate(self) -> SamplingParams:
        """Returns self, or raises SamplingError naming the first invalid field."""
        t = self.temperature
        if not (_is_real(t) and math.isfinite(t) and t >= 0):
            raise SamplingError(f"temperature={t!r} is invalid; allowed: a finite float >= 0 (0 => greedy)")
        k = self.top_k
        if not (_is_int(k) and 0 <= k <= _MAX_TOP_K):
            raise SamplingError(f"top_k={k!r} is invalid; allowed: an int in [0, {_MAX_TOP_K}] (0 => off)")
        p = self.top_p
        if not (_is_real(p) and 0 < p <= 1):
            raise SamplingError(f"top_p={p!r} is invalid; allowed: a float in (0, 1] (1 => off)")
        m = self.min_p
        if not (_is_real(m) and 0 <= m <= 1):
            raise SamplingError(f"min_p={m!r} is invalid; allowed: a float in [0, 1] (0 => off)")
        r = self.repetition_penalty
        if not (_is_real(r) and math.isfinite(r) and r > 0):
            raise SamplingError(
                f"repetition_penalty={r!r} is invalid; allowed: a finite float > 0 (1 => off)"
            )
        s = self.seed
        if not (_is_int(s) and 0 <= s <= _MAX_SEED):
            raise SamplingError(f"seed={s!r} is invalid; allowed: an int in [0, {_MAX_SEED}]")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingArrays:
    """A batch of SamplingParams as device arrays, one row per sequence (all leaves have shape [B]).

    The values are pytree leaves, not static fields, so new settings reuse the compiled step.
    """

    temperature: jax.Array  # float32
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32
    min_p: jax.Array  # float32
    repetition_penalty: jax.Array  # float32

    @staticmethod
    def from_params(params: Sequence[SamplingParams]) -> SamplingArrays:
        """Validates each request's params and stacks them into [B] arrays."""
        rows = [p.validate() for p in params]

        def column(name: str, dtype: type) -> jax.Array:
            return jnp.asarray(np.array([getattr(p, name) for p in rows], dtype=dtype))

        return SamplingArrays(
            temperature=column("temperature", np.float32),
            top_k=column("top_k", np.int32),
            top_p=column("top_p", np.float32),
            min_p=column("min_p", np.float32),
            repetition_penalty=column("repetition_penalty", np.float32),
        )


def _apply_repetition_penalty(logits: jax.Array, params: SamplingArrays, seen: jax.Array | None) -> jax.Array:
    if seen is None:
        return logits
    penalty = params.repetition_penalty[:, None]
    # Dividing a negative logit would raise it, so negative logits are multiplied instead (as in CTRL/HF).
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def _sorted_cutoff(scores: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per-row value below which top-k or top-p removes a token ([B]; -inf where neither cuts).

    One descending sort serves both filters; only values are sorted (no indices), since a
    threshold on values is enough to mask the unsorted scores.
    """
    vocab = scores.shape[-1]
    ranked = jnp.sort(scores, axis=-1, descending=True, stable=False)

    # Top-k: keep scores >= the k-th largest. k == 0 or k >= V removes nothing.
    k_on = (top_k > 0) & (top_k < vocab)
    kth = jnp.take_along_axis(ranked, (jnp.clip(top_k, 1, vocab) - 1)[:, None], axis=-1)[:, 0]
    k_cut = jnp.where(k_on, kth, -jnp.inf)

    # Top-p runs on the top-k-masked scores; masking the sorted row keeps it sorted.
    ranked = jnp.where(ranked >= k_cut[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    # HF sorts ascending and removes where the running sum <= 1 - top_p; the same sum in
    # descending order is a reverse cumsum, accumulated smallest-first as torch does it.
    mass_at_or_below = lax.cumsum(probs, axis=1, reverse=True)
    remove = mass_at_or_below <= (1 - top_p)[:, None]
    remove = remove.at[:, 0].set(False)  # the most likely token always survives
    p_cut = jnp.min(jnp.where(remove, jnp.inf, ranked), axis=-1)
    # top_p == 1 means off: HF skips the warper then, which also keeps tokens whose prob underflows to 0.
    p_cut = jnp.where(top_p < 1, p_cut, -jnp.inf)
    return jnp.maximum(k_cut, p_cut)


def _filter(scores: jax.Array, params: SamplingArrays) -> jax.Array:
    """Temperature, top-k, top-p and min-p on already-penalised logits; greedy rows pass through."""
    vocab = scores.shape[-1]
    greedy = params.temperature == 0
    scores = scores / jnp.where(greedy, 1.0, params.temperature)[:, None]

    # Greedy rows get every filter turned off: argmax of the penalised logits needs none of them.
    top_k = jnp.where(greedy, 0, params.top_k)
    top_p = jnp.where(greedy, 1.0, params.top_p)
    min_p = jnp.where(greedy, 0.0, params.min_p)

    # The sort is the costly part (V is 128k-262k), so skip it when no row uses top-k or top-p.
    needs_sort = jnp.any(((top_k > 0) & (top_k < vocab)) | (top_p < 1))
    cutoff = lax.cond(
        needs_sort,
        lambda s: _sorted_cutoff(s, top_k, top_p),
        lambda s: jnp.full(s.shape[:1], -jnp.inf, s.dtype),
        scores,
    )
    scores = jnp.where(scores < cutoff[:, None], -jnp.inf, scores)

    # Min-p compares probabilities (not log-probs) as HF does, so the kept sets agree at the edge.
    # The top token is never removed (min_p <= 1), which keeps at least one.
    probs = jax.nn.softmax(scores, axis=-1)
    floor = min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < floor, -jnp.inf, scores)


def process_logits(logits: jax.Array, params: SamplingArrays, seen: jax.Array | None) -> jax.Array:
    """Logits [B, V] -> log-weights [B, V] float32 to sample from; removed tokens are -inf.

    Applies, per row: repetition penalty on tokens marked in `seen` (bool [B, V]; None => no
    penalty), temperature, top-k, top-p, min-p. Rows with temperature 0 get only the penalty.
    """
    scores = _apply_repetition_penalty(logits.astype(jnp.float32), params, seen)
    return _filter(scores, params)


def sample(
    logits: jax.Array, key: jax.Array, params: SamplingArrays, seen: jax.Array | None = None
) -> jax.Array:
    """Picks one token per row: int32 [B].

    Greedy rows (temperature 0) take the argmax of the penalised logits; the others draw from
    process_logits() with their own key: `key` is either one raw key (uint32 [2], split into one
    per row) or one raw key per row (uint32 [B, 2], so each request keeps its own seeded stream
    whatever batch it shares).
    """
    scores = _apply_repetition_penalty(logits.astype(jnp.float32), params, seen)
    greedy = params.temperature == 0
    best = jnp.argmax(scores, axis=-1).astype(jnp.int32)

    def draw(scores: jax.Array) -> jax.Array:
        keys = key if key.ndim == 2 else jax.random.split(key, scores.shape[0])
        drawn = jax.vmap(jax.random.categorical)(keys, _filter(scores, params)).astype(jnp.int32)
        return jnp.where(greedy, best, drawn)

    # An all-greedy batch (the common case) needs neither the filters' sort nor the random draw.
    return lax.cond(jnp.all(greedy), lambda s: best, draw, scores)


def update_seen(seen: jax.Array, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Marks `tokens` as seen in the bool [B, V] mask, for the repetition penalty.

    `tokens` is [B] (one decode step) or [B, T] (e.g. a padded prompt); `valid`, of the same
    shape, says which entries count. Tokens outside [0, V) are ignored, as HF ignores ids past
    the logits' vocab.
    """
    batch, vocab = seen.shape
    if tokens.ndim == 1:
        tokens = tokens[:, None]
        valid = None if valid is None else valid[:, None]
    ok = (tokens >= 0) & (tokens < vocab)
    if valid is not None:
        ok = ok & valid
    # Entries that do not count point one past the end, where mode="drop" discards them.
    columns = jnp.where(ok, tokens, vocab)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], columns.shape)
    return seen.at[rows, columns].set(True, mode="drop")
