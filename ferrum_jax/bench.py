"""`ferrum-jax bench`: the speed instrument (issue 7). One run measures, on the default device:

  * the device's ceilings: copy bandwidth (bytes read + written per second by a large
    device-to-device copy) and the bf16 matmul rate (a large square matmul), medians of several reps;
  * decode tokens/s at every (batch, context) of a sweep, as a fraction of the copy bandwidth
    (bytes read per step: weights + KV cache) and of the roofline;
  * prefill tokens/s at several prompt lengths (batch 1), as a fraction of the matmul peak, and the
    time to first token (the prefill call at the shortest length, which also samples the token);
  * compile time, cold (the first call of every program, from `count_compiles`) and, with
    `compile_cache_check`, cold vs warm through the persistent compilation cache in two fresh
    processes;
  * peak device memory;
  * optionally a PyTorch peer (`peer="torch"`: bench/peers/torch_peer.py as a subprocess) at some of
    the same points, and ferrum / peer ratios;
  * the number of compilations during every timed part (must be 0, and is recorded).

Weights: a named shape (`ferrum_jax.shapes`) with random weights, dense (bf16/f16/f32) or packed GGUF
blocks of one type (random bytes with finite scale fields, decoded inside the jitted step), or a
real model path via `ferrum_jax.load`. Results go to a printed table and to
bench/results/<shape>_<dtype>_<device>.json; `plot=True` draws PNGs next to the JSON.

    ferrum-jax bench --shape llama-3.1-8b --dtype bf16 --peer torch --compile-cache-check --plot
    python -m ferrum_jax.bench --shape llama-tiny --batch 1,2 --context 64 --prefill 16,32 --steps 8

See docs/bench.md for what every number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pickle
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import models
from ferrum_jax.backend import DEFAULT_OPS, Ops, record_dispatch, summarize
from ferrum_jax.cache import KVCache
from ferrum_jax.compile_log import count_compiles, enable_persistent_cache
from ferrum_jax.errors import ConfigError, FerrumError
from ferrum_jax.generate import EOS_SLOTS, DecodeState, decode, prefill
from ferrum_jax.quant.gguf_blocks import LAYOUTS
from ferrum_jax.quant.packed import GGUFWeight
from ferrum_jax.sampling import GREEDY, SamplingArrays
from ferrum_jax.shapes import SHAPES, shape_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"
DEFAULT_PEER_SCRIPTS = {"torch": REPO / "bench" / "peers" / "torch_peer.py"}

DEFAULT_BATCHES = (1, 8, 32, 128)
DEFAULT_CONTEXTS = (1024, 4096)
DEFAULT_PREFILL = (512, 2048, 8192)
DEFAULT_STEPS = 64
DEFAULT_RUNS = 3
DEFAULT_TIME_BUDGET = 450.0  # seconds for the whole run: sweep points past it are skipped, with a note
DEFAULT_PEER_BUDGET = 150.0  # seconds for all peer subprocesses together (at most 35% of the time budget)
COMPILE_CHECK_RESERVE = 100.0  # seconds of the time budget kept for the compile-cache check
PROMPT_MARGIN = 16  # cache slots beyond context + steps
MEMORY_HEADROOM = 0.9  # use at most this share of the device memory still free

DENSE_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "f16": "float16", "float16": "float16",
                "f32": "float32", "float32": "float32"}

# Random GGUF blocks: every byte random except the f16 scale fields, set to these values so that a
# decoded weight has mean ~0 and standard deviation ~0.02 (like `shapes.random_weights`). The
# "mins" (m, dmin) cancel the mean of the unsigned codes.
QUANT_SCALES: dict[str, dict[str, float]] = {
    "Q8_0": {"d": 2.7e-4},
    "Q4_0": {"d": 4.3e-3},
    "Q4_1": {"d": 4.3e-3, "m": -7.5 * 4.3e-3},
    "Q5_0": {"d": 2.2e-3},
    "Q5_1": {"d": 2.2e-3, "m": -15.5 * 2.2e-3},
    "Q2_K": {"d": 1.4e-3, "dmin": 1.5 * 1.4e-3},
    "Q3_K": {"d": 4.7e-4},
    "Q4_K": {"d": 7.7e-5, "dmin": 7.5 * 7.7e-5},
    "Q5_K": {"d": 3.8e-5, "dmin": 15.5 * 3.8e-5},
    "Q6_K": {"d": 1.5e-5},
}
# A weight whose row length is not a multiple of the chosen type's block is stored in the first
# of these whose block divides it (as llama.cpp's quantizer falls back), else dense.
QUANT_FALLBACKS = ("Q8_0",)

_DONATION_WARNING = "Some donated buffers were not usable"


def _now() -> float:
    return time.perf_counter()


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Ceilings


def _median_rate(fn: Callable[..., Any], args: tuple, work: float, reps: int, inner: int
                 ) -> tuple[float, list[float]]:
    """work / (median seconds of one call fn(*args)), timing `inner` back-to-back calls per rep."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        start = _now()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((_now() - start) / inner)
    return work / statistics.median(times), times


def device_ceilings(copy_bytes: int | None = None, matmul_n: int | None = None, reps: int | None = None
                    ) -> dict[str, Any]:
    """The default device's copy bandwidth (bytes read + written per second by a device-to-device
    copy of `copy_bytes`: 4 GiB on accelerators, 256 MiB on the CPU) and bf16 matmul rate (FLOP/s of
    an n x n x n matmul: n = 8192 on accelerators, 1024 on the CPU), medians of `reps` reps."""
    cpu = jax.default_backend() == "cpu"
    copy_bytes = copy_bytes or ((256 << 20) if cpu else (4 << 30))
    matmul_n = matmul_n or (1024 if cpu else 8192)
    reps = reps or (3 if cpu else 10)
    inner = 1 if cpu else 5

    n = copy_bytes // 4
    copy = jax.jit(lambda a: a + 1)  # reads and writes every byte
    bandwidth, copy_times = _median_rate(copy, (jnp.ones((n,), jnp.float32),), 8.0 * n, reps, inner)

    key = jax.random.PRNGKey(0)
    shape = (matmul_n, matmul_n)
    mats = (jax.random.normal(key, shape, jnp.bfloat16),
            jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.bfloat16))
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    flops, mm_times = _median_rate(mm, mats, 2.0 * matmul_n ** 3, reps, inner)
    del mats
    return {"copy_bandwidth_bytes_per_s": bandwidth, "copy_buffer_bytes": int(copy_bytes),
            "copy_seconds": copy_times, "matmul_bf16_flops_per_s": flops, "matmul_n": int(matmul_n),
            "matmul_seconds": mm_times, "reps": reps, "calls_per_rep": inner}


# ---------------------------------------------------------------------------------------------
# Weights


@partial(jax.jit, static_argnames=("ggml_type", "shape"))
def _random_blocks(key: jax.Array, ggml_type: str, shape: tuple[int, ...]) -> jax.Array:
    layout = LAYOUTS[ggml_type]
    n_blocks = shape[-1] // layout.block_size
    data = jax.random.bits(key, (*shape[:-1], n_blocks, layout.type_size), jnp.uint8)
    for name, value in QUANT_SCALES[ggml_type].items():
        f = layout.field(name)
        raw = np.frombuffer(np.float16(value).tobytes(), np.uint8)  # little-endian f16
        data = data.at[..., f.offset: f.offset + f.size].set(jnp.asarray(raw))
    return data.reshape(*shape[:-1], n_blocks * layout.type_size)


def random_gguf_weight(key: jax.Array, ggml_type: str, shape: tuple[int, ...],
                       compute_dtype: Any = jnp.bfloat16) -> GGUFWeight:
    """A packed GGUF weight of logical `shape`: random block bytes with finite f16 scale fields
    (QUANT_SCALES), so it decodes to finite values of mean ~0 and std ~0.02."""
    ggml_type = ggml_type.upper()
    if ggml_type not in QUANT_SCALES:
        raise ConfigError(f"no random-weight recipe for ggml type {ggml_type}; choose one of {', '.join(QUANT_SCALES)}")
    shape = tuple(int(s) for s in shape)
    GGUFWeight.byte_shape(ggml_type, shape)  # the last dim must be whole blocks
    return GGUFWeight(_random_blocks(key, ggml_type, shape), ggml_type, shape, jnp.dtype(compute_dtype).name)


def _type_for(ggml_type: str, cols: int) -> str | None:
    for t in (ggml_type, *QUANT_FALLBACKS):
        if cols % LAYOUTS[t].block_size == 0:
            return t
    return None


def random_quantized_weights(cfg: Any, ggml_type: str = "Q4_K", compute_dtype: Any = jnp.bfloat16, seed: int = 0
                             ) -> tuple[Any, dict[str, int]]:
    """Weights of `cfg`'s shape with every 2-D tensor (embedding, projections, lm_head) a random
    packed GGUFWeight of `ggml_type` (decoded to `compute_dtype` inside the jitted step, as the
    loader's packed weights are); norms are ones and biases N(0, 0.02) in `compute_dtype`. A tensor
    whose row length is not a multiple of the block falls back to Q8_0, else stays dense.
    Returns (weights, {storage type: tensor count})."""
    ggml_type = ggml_type.upper()
    if ggml_type not in QUANT_SCALES:
        raise ConfigError(f"unknown quantized type {ggml_type!r}; choose one of {', '.join(QUANT_SCALES)}")
    family = models.family_of(cfg)
    key = jax.random.PRNGKey(seed)
    tensors, types = {}, {}
    for i, (name, shape) in enumerate(family.tensor_shapes(cfg).items()):
        k = jax.random.fold_in(key, i)
        if len(shape) == 2 and (t := _type_for(ggml_type, shape[-1])) is not None:
            tensors[name] = random_gguf_weight(k, t, shape, compute_dtype)
            types[t] = types.get(t, 0) + 1
        elif "norm" in name:
            tensors[name] = jnp.ones(shape, compute_dtype)
        else:
            tensors[name] = (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(compute_dtype)
            if len(shape) == 2:
                types["dense"] = types.get("dense", 0) + 1
    return family.build_weights(cfg, tensors), types


def _is_weight_leaf(x: Any) -> bool:
    return isinstance(x, GGUFWeight)


def _unique(tree: Any) -> list:
    seen, out = set(), []
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=_is_weight_leaf):
        if id(leaf) not in seen:
            seen.add(id(leaf))
            out.append(leaf)
    return out


def _nbytes(leaf: Any) -> int:
    return int(leaf.nbytes) if isinstance(leaf, GGUFWeight) else int(leaf.size * leaf.dtype.itemsize)


def _numel(leaf: Any) -> int:
    return math.prod(leaf.shape)


def weight_stats(weights: Any) -> dict[str, int]:
    """Bytes (unique leaves; packed bytes for GGUF weights) and matmul parameters.

    bytes_read_per_decode_step: every weight except an untied embedding table, of which a decode
    step only gathers a few rows. matmul_params_per_token: 2-D weights of the layers (each token
    goes through all of them). lm_head_params: the vocabulary projection (prefill applies it at one
    position only)."""
    leaves = _unique(weights)
    total = sum(_nbytes(x) for x in leaves)
    embed = getattr(weights, "embed", None)
    head = getattr(weights, "lm_head", None)
    head_ids = {id(x) for x in _unique(head)} if head is not None else set()
    embed_leaves = [x for x in _unique(embed) if id(x) not in head_ids] if embed is not None else []
    layers = getattr(weights, "layers", weights)
    return {
        "bytes": total,
        "bytes_read_per_decode_step": total - sum(_nbytes(x) for x in embed_leaves),
        "embedding_bytes_not_read": sum(_nbytes(x) for x in embed_leaves),
        "params": sum(_numel(x) for x in leaves),
        "matmul_params_per_token": sum(_numel(x) for x in _unique(layers) if len(x.shape) == 2),
        "lm_head_params": sum(_numel(x) for x in _unique(head)) if head is not None else 0,
    }


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes


def _keys_seen(t: int, window: int | None) -> int:
    """Sum over query positions 0..t-1 of the keys each attends to (causal, optional window)."""
    if window is None or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


def attention_flops_prefill(cfg: Any, t: int) -> int:
    """QK^T and PV: 2 matmuls x 2 FLOPs per multiply-add, over the keys each query sees (causal:
    ~t^2/2; sliding-window layers: ~t * window)."""
    return sum(4 * s.num_heads * s.head_dim * _keys_seen(t, s.window) for s in cfg.attn)


def attention_flops_decode(cfg: Any, context: int) -> int:
    """Per token at position `context`: every layer attends to its visible keys."""
    return sum(4 * s.num_heads * s.head_dim * min(context + 1, s.window or context + 1) for s in cfg.attn)


def prefill_flops(cfg: Any, ws: dict[str, int], t: int) -> int:
    """2 * layer params * t (projections and MLP of every token) + 2 * lm_head params (logits of the
    last position only) + causal attention FLOPs."""
    return 2 * ws["matmul_params_per_token"] * t + 2 * ws["lm_head_params"] + attention_flops_prefill(cfg, t)


def decode_flops_per_token(cfg: Any, ws: dict[str, int], context: int) -> int:
    return 2 * (ws["matmul_params_per_token"] + ws["lm_head_params"]) + attention_flops_decode(cfg, context)


def _kv_bytes_per_token(cfg: Any, dtype: Any) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def kv_bytes_at_context(cfg: Any, batch: int, context: int, dtype: Any) -> int:
    """Bytes of the keys and values a step at position `context` needs (windowed layers: the window)."""
    per_layer_token = 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    return batch * sum(per_layer_token * min(context + 1, s.window or context + 1) for s in cfg.attn)


# ---------------------------------------------------------------------------------------------
# Device memory


def memory_stats() -> dict[str, int] | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  pragma: no cover - backends without the call
        return None
    return dict(stats) if stats else None


def _fits(need: int) -> tuple[bool, str | None]:
    """Whether `need` more bytes fit in the device memory still free (unknown on the CPU: yes)."""
    stats = memory_stats()
    if not stats or "bytes_limit" not in stats:
        return True, None
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if need <= MEMORY_HEADROOM * free:
        return True, None
    return False, f"needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free of {stats['bytes_limit'] / 1e9:.1f} GB"


def _decode_need(cfg: Any, batch: int, capacity: int, kv_bytes: int) -> int:
    act = batch * (cfg.num_heads * capacity * 4 * 3 + cfg.vocab_size * 4 * 4
                   + max(cfg.intermediate_size, cfg.hidden_size) * 4 * 8)
    state = batch * (capacity * 4 + cfg.vocab_size)
    return kv_bytes + act + state + (64 << 20)


def _prefill_need(cfg: Any, t: int, kv_bytes: int) -> int:
    scores = 3 * cfg.num_heads * t * t * 4  # the reference attention materialises f32 scores and probs
    act = t * (3 * cfg.intermediate_size + 4 * cfg.hidden_size + 3 * cfg.num_heads * cfg.head_dim) * 4 * 2
    return kv_bytes + scores + act + cfg.vocab_size * 4 * 4 + (64 << 20)


# ---------------------------------------------------------------------------------------------
# Timed parts


def _host_state(batch: int, capacity: int, vocab: int, context: int) -> DecodeState:
    """A decode state whose every row's next token sits at position `context` (the timed steps
    attend over `context` keys), with no stop ids and no token limit."""
    put = jax.device_put
    return DecodeState(
        tokens=put(np.zeros((batch, capacity), np.int32)), count=put(np.zeros((batch,), np.int32)),
        last=put(np.ones((batch,), np.int32)), position=put(np.full((batch,), context, np.int32)),
        done=put(np.zeros((batch,), bool)), seen=put(np.zeros((batch, vocab), bool)),
        key=put(np.stack([np.zeros(batch, np.uint32), np.arange(batch, dtype=np.uint32)], axis=1)),
        max_new=put(np.full((batch,), 1 << 30, np.int32)), stop_ids=put(np.full((EOS_SLOTS,), -1, np.int32)))


def _rewind(state: DecodeState, context: int) -> DecodeState:
    """Put every row back at position `context` with nothing generated (host arrays: no compile)."""
    b = state.count.shape[0]
    put = jax.device_put
    return dataclasses.replace(state, count=put(np.zeros((b,), np.int32)),
                               position=put(np.full((b,), context, np.int32)), done=put(np.zeros((b,), bool)))


@dataclasses.dataclass
class _Call:
    seconds: float
    compiles: int
    compile_seconds: float
    dispatch: dict[str, str]


def _call(fn: Callable[..., Any], *args: Any, record: bool = False) -> tuple[Any, _Call]:
    """fn(*args) to completion: wall seconds, and the compilations (and op choices) seen meanwhile."""
    with count_compiles() as log, record_dispatch() as choices, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DONATION_WARNING)  # the CPU cannot donate
        start = _now()
        out = fn(*args)
        jax.block_until_ready(out)
        seconds = _now() - start
    return out, _Call(seconds, log.compiles, log.seconds, summarize(choices) if record and choices else {})


def bench_decode(weights: Any, cfg: Any, ops: Ops, *, batch: int, context: int, steps: int, runs: int,
                 kv_dtype: Any) -> dict[str, Any]:
    """Decode `steps` tokens per row from position `context`, `runs` timed times after a compile call
    and a warm-up call. The KV cache has capacity context + steps + PROMPT_MARGIN. The cache contents
    do not change the work done, so the state is built on the host rather than by a prefill."""
    capacity = context + steps + PROMPT_MARGIN
    cache = KVCache.create(num_layers=cfg.num_layers, batch=batch, kv_heads=cfg.num_kv_heads, capacity=capacity,
                           head_dim=cfg.head_dim, dtype=kv_dtype)
    params = SamplingArrays.from_params([GREEDY] * batch)
    n = jax.device_put(np.int32(steps))
    state = _host_state(batch, capacity, cfg.vocab_size, context)

    def step(state: DecodeState, cache: KVCache) -> tuple[DecodeState, KVCache]:
        return decode(weights, cache, state, params, n, cfg=cfg, ops=ops)

    (state, cache), first = _call(step, state, cache, record=True)
    (state, cache), warm = _call(step, _rewind(state, context), cache)  # outputs as inputs: may differ in placement
    times, compiles = [], 0
    for _ in range(runs):
        state = _rewind(state, context)
        (state, cache), c = _call(step, state, cache)
        times.append(c.seconds)
        compiles += c.compiles
    done = int(np.asarray(state.count).min())
    kv_bytes = cache.nbytes
    del state, cache
    t = statistics.median(times)
    return {"capacity": capacity, "steps": steps, "steps_done_min": done, "run_seconds": times,
            "seconds_per_step": t / steps, "tokens_per_second": batch * steps / t,
            "kv_bytes_per_step": kv_bytes, "first_call_seconds": first.seconds,
            "compile_seconds": first.compile_seconds, "compiles_cold": first.compiles,
            "compiles_warmup": warm.compiles, "compiles_during_timing": compiles, "dispatch": first.dispatch}


def bench_prefill(weights: Any, cfg: Any, ops: Ops, *, length: int, runs: int, kv_dtype: Any,
                  seed: int = 0) -> dict[str, Any]:
    """Prefill one prompt of `length` random tokens into a cache of that capacity (the call also
    samples the first token): `runs` timed calls after a compile call."""
    cache = KVCache.create(num_layers=cfg.num_layers, batch=1, kv_heads=cfg.num_kv_heads, capacity=length,
                           head_dim=cfg.head_dim, dtype=kv_dtype)
    rng = np.random.default_rng(seed)
    put = jax.device_put
    tokens = put(rng.integers(0, cfg.vocab_size, (1, length), dtype=np.int32))
    lengths = put(np.array([length], np.int32))
    params = SamplingArrays.from_params([GREEDY])
    max_new = put(np.array([1], np.int32))
    stop = put(np.full((EOS_SLOTS,), -1, np.int32))
    keys = put(np.zeros((1, 2), np.uint32))

    def run(cache: KVCache) -> tuple[DecodeState, KVCache]:
        return prefill(weights, cache, tokens, lengths, params, max_new, stop, keys, cfg=cfg, ops=ops)

    (state, cache), first = _call(run, cache, record=True)
    times, compiles = [], 0
    for _ in range(runs):
        (state, cache), c = _call(run, cache)
        times.append(c.seconds)
        compiles += c.compiles
    del state, cache
    t = statistics.median(times)
    return {"run_seconds": times, "seconds": t, "tokens_per_second": length / t,
            "first_call_seconds": first.seconds, "compile_seconds": first.compile_seconds,
            "compiles_cold": first.compiles, "compiles_during_timing": compiles, "dispatch": first.dispatch}


# ---------------------------------------------------------------------------------------------
# Persistent compilation cache: cold and warm compile in fresh processes


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _compile_probe(spec_path: str, cache_dir: str) -> dict[str, Any]:
    """In a fresh process: lower and compile the decode and prefill programs of the pickled spec
    (abstract weights: no device memory for them) with the persistent cache in `cache_dir`."""
    import ferrum_jax  # noqa: F401  registers the ops

    events: dict[str, int] = {}
    jax.monitoring.register_event_listener(lambda name, **_: events.__setitem__(name, events.get(name, 0) + 1))
    enable_persistent_cache(cache_dir)
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    cfg, ops, weights, b, cap, length = (spec[k] for k in ("cfg", "ops", "weights", "batch", "capacity", "length"))
    kv = spec["kv_dtype"]
    sds = jax.ShapeDtypeStruct
    out: dict[str, Any] = {"platform": jax.default_backend()}

    def cache_of(batch: int, capacity: int) -> Any:
        return jax.eval_shape(lambda: KVCache.create(num_layers=cfg.num_layers, batch=batch, kv_heads=cfg.num_kv_heads,
                                                     capacity=capacity, head_dim=cfg.head_dim, dtype=kv))

    params = _abstract(SamplingArrays.from_params([GREEDY] * b))
    state = _abstract(_host_state(b, cap, cfg.vocab_size, 0))
    with count_compiles() as log:
        start = _now()
        decode.lower(weights, cache_of(b, cap), state, params, sds((), jnp.int32), cfg=cfg, ops=ops).compile()
        out["decode_seconds"] = _now() - start
    out["decode_backend_compiles"] = log.compiles
    with count_compiles() as log:
        start = _now()
        prefill.lower(weights, cache_of(1, length), sds((1, length), jnp.int32), sds((1,), jnp.int32),
                      _abstract(SamplingArrays.from_params([GREEDY])), sds((1,), jnp.int32),
                      sds((EOS_SLOTS,), jnp.int32), sds((1, 2), jnp.uint32), cfg=cfg, ops=ops).compile()
        out["prefill_seconds"] = _now() - start
    out["prefill_backend_compiles"] = log.compiles
    out["cache_hits"] = events.get("/jax/compilation_cache/cache_hits", 0)
    out["cache_misses"] = events.get("/jax/compilation_cache/cache_misses", 0)
    return out


def compile_cache_check(cfg: Any, weights: Any, ops: Ops, *, batch: int, capacity: int, length: int,
                        kv_dtype: Any, timeout: float = 600.0) -> dict[str, Any]:
    """Compile the decode program (batch, capacity) and the prefill program (length) in two fresh
    processes sharing one empty persistent-cache directory: the first compiles cold and fills the
    cache, the second should load both programs from it. Times are lower + compile wall seconds;
    process_seconds is the child's whole life (interpreter, imports, backend start, compiles)."""
    result: dict[str, Any] = {"decode_batch": batch, "decode_capacity": capacity, "prefill_length": length}
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="ferrum-bench-") as tmp:
        spec = Path(tmp) / "spec.pkl"
        with open(spec, "wb") as f:
            pickle.dump({"cfg": cfg, "ops": ops, "weights": _abstract(weights), "batch": batch, "capacity": capacity,
                         "length": length, "kv_dtype": jnp.dtype(kv_dtype).name}, f)
        cache_dir = Path(tmp) / "xla-cache"
        deadline = _now() + timeout
        for name in ("cold", "warm"):
            start = _now()
            try:
                proc = subprocess.run([sys.executable, "-m", "ferrum_jax.bench", "--compile-probe", str(spec),
                                       str(cache_dir)], capture_output=True, text=True, check=False, cwd=REPO, env=env,
                                      timeout=max(deadline - _now(), 1.0))
            except subprocess.TimeoutExpired:
                result[name] = {"error": f"timed out after {timeout:.0f} s"}
                break
            seconds = _now() - start
            if proc.returncode != 0:
                result[name] = {"error": f"exit {proc.returncode}: {_tail(proc.stderr)}"}
                break
            try:
                result[name] = json.loads(proc.stdout.strip().splitlines()[-1]) | {"process_seconds": seconds}
            except (ValueError, IndexError):
                result[name] = {"error": f"no JSON on stdout: {_tail(proc.stdout + proc.stderr)}"}
                break
        cold, warm = result.get("cold", {}), result.get("warm", {})
        if "decode_seconds" in cold and "decode_seconds" in warm:
            result["files_in_cache"] = sum(1 for p in cache_dir.rglob("*") if p.is_file())
            result["decode_speedup"] = cold["decode_seconds"] / max(warm["decode_seconds"], 1e-9)
            result["prefill_speedup"] = cold["prefill_seconds"] / max(warm["prefill_seconds"], 1e-9)
    return result


def _tail(text: str, n: int = 800) -> str:
    text = text.strip()
    return text[-n:] if len(text) > n else text


# ---------------------------------------------------------------------------------------------
# The peer


def run_peer(peer: str, config: dict[str, Any] | None, points: Sequence[tuple[int, int, int]], steps: int, *,
             dtype: str = "bfloat16", script: str | Path | None = None, extra_args: Sequence[str] = (),
             budget: float = DEFAULT_PEER_BUDGET, log: Callable[[str], None] = _log_stderr) -> dict[str, Any]:
    """Run the peer once per (batch, context, prefill length) point, each in its own process:

        python <script> --config-json '<HF config dict as JSON>' --batch B --context C --steps N
                        --prefill L --dtype <dense dtype> [extra_args...]

    which prints one JSON object on stdout: {"decode_tokens_per_second", "prefill_tokens_per_second",
    "device", "torch", ...} (with "error" when its measurement failed). A missing script, a failure,
    a timeout or spent budget is recorded and the run goes on."""
    script = Path(script) if script is not None else DEFAULT_PEER_SCRIPTS.get(peer)
    out: dict[str, Any] = {"name": peer, "script": str(script) if script else None, "runs": []}
    if script is None:
        out["error"] = f"unknown peer {peer!r}; known: {', '.join(DEFAULT_PEER_SCRIPTS)}"
        return out
    if not script.is_file():
        out["error"] = f"peer script {script} not found"
        return out
    if config is None:
        out["error"] = "no HF config dict for this model: the peer needs one"
        return out
    out["dtype"], out["extra_args"] = dtype, list(extra_args)
    deadline = _now() + budget
    for b, c, length in points:
        rec: dict[str, Any] = {"batch": b, "context": c, "prefill": length, "steps": steps}
        out["runs"].append(rec)
        left = deadline - _now()
        if left < 5:
            rec["error"] = "skipped: peer time budget spent"
            continue
        cmd = [sys.executable, str(script), "--config-json", json.dumps(config), "--batch", str(b), "--context",
               str(c), "--steps", str(steps), "--prefill", str(length), "--dtype", dtype, *extra_args]
        log(f"peer {peer}: batch {b} context {c} prefill {length} ...")
        start = _now()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO, timeout=left)
        except subprocess.TimeoutExpired:
            rec["error"] = f"timed out after {left:.0f} s"
            log(f"peer {peer}: {rec['error']}")
            continue
        rec["seconds"] = _now() - start
        parsed = _last_json_object(proc.stdout)
        if parsed is not None:
            rec |= {k: v for k, v in parsed.items() if k not in ("batch", "context", "prefill", "steps")}
            if parsed.get("error") is None:
                rec.pop("error", None)
        if proc.returncode != 0 and "error" not in rec:
            rec["error"] = f"exit {proc.returncode}: {_tail(proc.stderr)}"
        elif parsed is None and "error" not in rec:
            rec["error"] = f"no JSON object on stdout: {_tail(proc.stdout + proc.stderr)}"
        log(f"peer {peer}: " + (str(rec["error"])[:300] if rec.get("error") else
                                f"decode {rec.get('decode_tokens_per_second')} tok/s, "
                                f"prefill {rec.get('prefill_tokens_per_second')} tok/s"))
    return out


def _last_json_object(text: str) -> dict | None:
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, dict) else None
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def default_peer_points(batches: Sequence[int], contexts: Sequence[int], lengths: Sequence[int],
                        max_positions: int | None = None) -> list[tuple[int, int, int]]:
    """Two peer runs (each one process that builds and compiles the model: they are not cheap), at the
    first context: the smallest batch with the shortest prefill and the largest batch with the
    longest prefill (of the lengths within `max_positions`)."""
    if max_positions:
        contexts = [c for c in contexts if c < max_positions]
        lengths = [n for n in lengths if n <= max_positions]
    if not batches or not contexts:
        return []
    lengths = sorted(lengths) or [min(512, contexts[0])]
    points = [(min(batches), contexts[0], lengths[0]), (max(batches), contexts[0], lengths[-1])]
    return list(dict.fromkeys(points))


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class BenchConfig:
    shape: str | None = "llama-3.1-8b"  # a name in ferrum_jax.shapes.SHAPES (random weights)
    model: str | None = None  # or a model path / alias for ferrum_jax.load (overrides shape)
    dtype: str = "bf16"  # bf16 | f16 | f32 (dense) or a GGUF block type: q8_0, q4_k, ...
    batches: tuple[int, ...] = DEFAULT_BATCHES
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    prefill: tuple[int, ...] = DEFAULT_PREFILL
    steps: int = DEFAULT_STEPS
    runs: int = DEFAULT_RUNS
    peer: str = "none"  # "torch" or "none"
    peer_script: str | None = None  # default: bench/peers/<peer>_peer.py
    peer_points: tuple[tuple[int, int, int], ...] | None = None  # (batch, context, prefill); default: one per batch
    peer_budget: float = DEFAULT_PEER_BUDGET
    peer_args: tuple[str, ...] = ()  # passed on to the peer, e.g. ("--device", "cpu")
    compile_cache_check: bool = False
    compile_cache: str | None = None  # enable the persistent cache in this process too (then "cold" is not cold)
    out: str | None = str(DEFAULT_OUT)  # folder for the JSON (and plots); None: write nothing
    plot: bool = False
    commit: str | None = None  # default: git rev-parse HEAD
    time_budget: float | None = DEFAULT_TIME_BUDGET
    copy_bytes: int | None = None  # ceilings' sizes (default by device)
    matmul_n: int | None = None
    ceiling_reps: int | None = None
    seed: int = 0
    command: str | None = None  # recorded in the JSON

    def validate(self) -> None:
        if self.model is None and self.shape is None:
            raise ConfigError("give a --shape or a --model")
        if self.model is None and self.shape not in SHAPES:
            raise ConfigError(f"unknown model shape {self.shape!r}; known: {', '.join(SHAPES)}")
        d = self.dtype.lower()
        if d not in DENSE_DTYPES and d.upper() not in QUANT_SCALES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose bf16, f16, f32 or one of "
                              f"{', '.join(t.lower() for t in QUANT_SCALES)}")
        if self.model is not None and d not in DENSE_DTYPES:
            raise ConfigError("--dtype with --model is the activation dtype (bf16, f16 or f32); a GGUF file "
                              "keeps its own quantized types")
        for name in ("batches", "contexts", "prefill"):
            if any(int(v) < 1 for v in getattr(self, name)):
                raise ConfigError(f"{name}: every value must be >= 1, got {getattr(self, name)}")
        if self.steps < 1 or self.runs < 1:
            raise ConfigError(f"steps and runs must be >= 1 (got {self.steps}, {self.runs})")
        if self.peer not in ("none", *DEFAULT_PEER_SCRIPTS):
            raise ConfigError(f"--peer {self.peer!r}: choose none or {', '.join(DEFAULT_PEER_SCRIPTS)}")

    @property
    def quant_type(self) -> str | None:
        d = self.dtype.lower()
        return None if d in DENSE_DTYPES else d.upper()

    @property
    def compute_dtype(self) -> str:
        return DENSE_DTYPES.get(self.dtype.lower(), "bfloat16")

    @property
    def dtype_tag(self) -> str:
        d = self.dtype.lower()
        return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(d, d)


def _git_commit() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, cwd=REPO,
                              timeout=10)
        if head.returncode != 0:
            return {"commit": None}
        # --no-optional-locks: a read-only look (no index refresh written back).
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False, cwd=REPO, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "device"


def _hf_config(bc: BenchConfig) -> dict[str, Any] | None:
    """The HF config dict the peer builds its model from (None when there is none)."""
    if bc.model is None:
        return dict(SHAPES[bc.shape])
    from ferrum_jax.model import resolve_path

    path = resolve_path(bc.model)
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path.is_file() and path.suffix.lower() == ".gguf":
        from ferrum_jax.loading.gguf import gguf_config_dict, read_metadata

        return gguf_config_dict(read_metadata(path))
    return None


def estimate_weight_bytes(cfg: Any, dtype: str = "bf16") -> int:
    """Device bytes of `cfg`'s random weights in `dtype` (a dense dtype or a GGUF type), before
    drawing them."""
    d = dtype.lower()
    itemsize = jnp.dtype(DENSE_DTYPES.get(d, "bfloat16")).itemsize
    total = 0
    for shape in models.family_of(cfg).tensor_shapes(cfg).values():
        t = _type_for(d.upper(), shape[-1]) if d not in DENSE_DTYPES and len(shape) == 2 else None
        total += math.prod(shape[:-1]) * LAYOUTS[t].bytes_per_row(shape[-1]) if t else math.prod(shape) * itemsize
    return total


def _load_weights(bc: BenchConfig) -> tuple[Any, Any, Ops, dict[str, Any]]:
    """(cfg, weights, ops, description) for the run."""
    compute = jnp.dtype(bc.compute_dtype)
    if bc.model is None:
        need = estimate_weight_bytes(shape_config(bc.shape), bc.dtype)
        ok, why = _fits(need)
        if not ok:
            raise ConfigError(f"{bc.shape} {bc.dtype_tag} weights do not fit on this device: {why}")
    if bc.model is not None:
        from ferrum_jax.model import load

        m = load(bc.model, dtype=compute, progress=False)
        return m.config, m.weights, m.ops, {"source": "model", "path": str(bc.model), "random": False,
                                            "format": "as loaded (GGUF types as stored, packed on accelerators)"}
    cfg = shape_config(bc.shape)
    if bc.quant_type is None:
        from ferrum_jax.shapes import random_weights

        return cfg, random_weights(cfg, compute, seed=bc.seed), DEFAULT_OPS, {
            "source": "shape", "random": True, "format": "dense", "quant_type": None}
    weights, types = random_quantized_weights(cfg, bc.quant_type, compute, seed=bc.seed)
    return cfg, weights, DEFAULT_OPS, {"source": "shape", "random": True, "format": "gguf-packed",
                                       "quant_type": bc.quant_type, "tensor_types": types,
                                       "decoded_in": "the jitted step (xla_dequant linear/embed)"}


def run_bench(bc: BenchConfig, log: Callable[[str], None] = _log_stderr) -> dict[str, Any]:
    """Run the whole benchmark; returns the result dict (also written as JSON when bc.out is set)."""
    bc.validate()
    t0 = _now()
    deadline = t0 + bc.time_budget if bc.time_budget else math.inf
    # Sweep points start only before sweep_deadline; the compile-cache check gets what is left.
    sweep_deadline = deadline - (COMPILE_CHECK_RESERVE if bc.compile_cache_check else 0.0)
    notes: list[str] = []
    result: dict[str, Any] = {
        "benchmark": "ferrum-jax bench", "command": bc.command,
        "timestamp_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(bc).items()},
    }
    git = _git_commit()
    result["commit"] = bc.commit or git.get("commit") or "unknown"
    result["commit_source"] = "--commit" if bc.commit else ("git" if git.get("commit") else "none")
    if "dirty" in git and not bc.commit:
        result["commit_dirty"] = git["dirty"]
    hf_config = _hf_config(bc)

    # The peer runs first, before this process takes the device (jax preallocates most of its memory).
    peer = None
    if bc.peer != "none":
        points = list(bc.peer_points) if bc.peer_points else default_peer_points(
            bc.batches, bc.contexts, bc.prefill, (hf_config or {}).get("max_position_embeddings"))
        peer = run_peer(bc.peer, hf_config, points, bc.steps, dtype=bc.compute_dtype, script=bc.peer_script,
                        extra_args=bc.peer_args, log=log,
                        budget=min(bc.peer_budget, 0.35 * bc.time_budget if bc.time_budget else math.inf))
        if peer.get("error"):
            log(f"peer {bc.peer}: {peer['error']}")

    if bc.compile_cache:
        enable_persistent_cache(bc.compile_cache)
    dev = jax.devices()[0]
    result["device"] = {"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count(),
                        "memory_bytes_limit": (memory_stats() or {}).get("bytes_limit")}
    import jaxlib

    result |= {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
               "persistent_cache_in_process": jax.config.jax_compilation_cache_dir}
    log(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")

    log("ceilings: copy bandwidth and bf16 matmul ...")
    ceil = device_ceilings(bc.copy_bytes, bc.matmul_n, bc.ceiling_reps)
    bw, peak = ceil["copy_bandwidth_bytes_per_s"], ceil["matmul_bf16_flops_per_s"]
    result["ceilings"] = ceil
    log(f"ceilings: copy {bw / 1e9:.1f} GB/s, bf16 matmul {peak / 1e12:.2f} TFLOP/s")

    log("weights ...")
    start = _now()
    cfg, weights, ops, wdesc = _load_weights(bc)
    jax.block_until_ready(weights)
    ws = weight_stats(weights)
    kv_dtype = jnp.dtype(bc.compute_dtype)
    name = bc.shape if bc.model is None else Path(str(bc.model)).stem
    result |= {"shape": name, "config": hf_config, "dtype": bc.dtype_tag, "compute_dtype": bc.compute_dtype,
               "kv_cache_dtype": kv_dtype.name, "quant_type": bc.quant_type,
               "weights": wdesc | ws | {"seconds": _now() - start}}
    log(f"weights: {name} {bc.dtype_tag}: {ws['bytes'] / 1e9:.2f} GB ({ws['params'] / 1e9:.2f} G params), "
        f"{_now() - start:.1f} s")
    if any(getattr(s, "window", None) for s in cfg.attn):
        notes.append("sliding-window layers: FLOPs and ideal KV bytes count only the keys inside the window; "
                     "the XLA reference attention still reads (and masks) every cache slot")
    max_pos = cfg.max_position_embeddings

    # Prefill and time to first token.
    pre = []
    for length in bc.prefill:
        rec: dict[str, Any] = {"length": length}
        pre.append(rec)
        if length > max_pos:
            rec |= {"status": "skipped", "note": f"longer than max_position_embeddings {max_pos}"}
            continue
        if _now() > sweep_deadline:
            rec |= {"status": "skipped", "note": "time budget spent (--time-budget)"}
            continue
        kv = _kv_bytes_per_token(cfg, kv_dtype) * length
        ok, why = _fits(_prefill_need(cfg, length, kv))
        if not ok:
            rec |= {"status": "skipped", "note": f"does not fit: {why}"}
            log(f"prefill {length}: skipped ({why})")
            continue
        try:
            rec |= bench_prefill(weights, cfg, ops, length=length, runs=bc.runs, kv_dtype=kv_dtype, seed=bc.seed)
        except Exception as e:  # noqa: BLE001  an out-of-memory error, say: record it and go on
            rec |= {"status": "failed", "error": _one_line(e)}
            log(f"prefill {length}: failed: {rec['error']}")
            continue
        flops = prefill_flops(cfg, ws, length)
        rec |= {"status": "ok", "flops": flops, "flops_per_s": flops / rec["seconds"],
                "matmul_peak_fraction": flops / rec["seconds"] / peak}
        log(f"prefill {length}: {rec['tokens_per_second']:.0f} tok/s, {rec['matmul_peak_fraction']:.1%} of matmul "
            f"peak (compile {rec['compile_seconds']:.1f} s)")
    result["prefill"] = pre
    ok_pre = [r for r in pre if r.get("status") == "ok"]
    result["ttft"] = ({"prompt_tokens": ok_pre[0]["length"], "seconds": ok_pre[0]["seconds"],
                       "includes": "prefill of the prompt and sampling of the first token (device time)"}
                      if ok_pre else None)

    # Decode sweep.
    dec = []
    for context in bc.contexts:
        for batch in bc.batches:
            rec = {"batch": batch, "context": context}
            dec.append(rec)
            capacity = context + bc.steps + PROMPT_MARGIN
            if capacity > max_pos:
                rec |= {"status": "skipped", "note": f"context + steps exceeds max_position_embeddings {max_pos}"}
                continue
            if _now() > sweep_deadline:
                rec |= {"status": "skipped", "note": "time budget spent (--time-budget)"}
                continue
            kv = _kv_bytes_per_token(cfg, kv_dtype) * capacity * batch
            ok, why = _fits(_decode_need(cfg, batch, capacity, kv))
            if not ok:
                rec |= {"status": "skipped", "note": f"does not fit: {why}"}
                log(f"decode batch {batch} context {context}: skipped ({why})")
                continue
            try:
                rec |= bench_decode(weights, cfg, ops, batch=batch, context=context, steps=bc.steps, runs=bc.runs,
                                    kv_dtype=kv_dtype)
            except Exception as e:  # noqa: BLE001
                rec |= {"status": "failed", "error": _one_line(e)}
                log(f"decode batch {batch} context {context}: failed: {rec['error']}")
                continue
            if rec["steps_done_min"] < bc.steps:  # a row stopped early: the step time is not what it says
                notes.append(f"decode batch {batch} context {context}: a row ran only {rec['steps_done_min']} of "
                             f"{bc.steps} steps")
                log(f"decode batch {batch} context {context}: WARNING a row stopped after {rec['steps_done_min']} steps")
            step = rec["seconds_per_step"]
            wbytes = ws["bytes_read_per_decode_step"]
            ideal_kv = kv_bytes_at_context(cfg, batch, context, kv_dtype)
            flops = batch * decode_flops_per_token(cfg, ws, context)
            roof_step = max((wbytes + ideal_kv) / bw, flops / peak)
            rec |= {"status": "ok", "weight_bytes_per_step": wbytes, "kv_bytes_at_context": ideal_kv,
                    "bytes_per_step": wbytes + rec["kv_bytes_per_step"],
                    "bandwidth_fraction": (wbytes + rec["kv_bytes_per_step"]) / step / bw,
                    "weight_bandwidth_fraction": wbytes / step / bw,
                    "flops_per_step": flops, "roofline_tokens_per_second": batch / roof_step,
                    "roofline_bound": "memory" if (wbytes + ideal_kv) / bw >= flops / peak else "compute",
                    "roofline_fraction": step and roof_step / step}
            log(f"decode batch {batch:4d} context {context:6d}: {rec['tokens_per_second']:10.1f} tok/s, "
                f"{rec['bandwidth_fraction']:.1%} of copy BW, {rec['roofline_fraction']:.1%} of roofline "
                f"(compile {rec['compile_seconds']:.1f} s, {rec['compiles_during_timing']} compiles timed)")
    result["decode"] = dec
    result["decode_kv_bytes_note"] = (
        "kv_bytes_per_step is the whole cache (capacity = context + steps + 16 slots): the XLA reference decode "
        "attention reads every slot, masked; kv_bytes_at_context is what a step at `context` needs, used for "
        "the roofline")

    ok_dec = [r for r in dec if r.get("status") == "ok"]
    first_dec = ok_dec[0] if ok_dec else None
    result["compile"] = {
        "cold": {"decode_seconds": first_dec and first_dec["compile_seconds"],
                 "decode_point": first_dec and [first_dec["batch"], first_dec["context"]],
                 "prefill_seconds": ok_pre[0]["compile_seconds"] if ok_pre else None,
                 "prefill_length": ok_pre[0]["length"] if ok_pre else None,
                 "note": "trace + lower + compile of the first call (count_compiles)"},
        "persistent_cache": None}

    timed = sum(r.get("compiles_during_timing", 0) for r in ok_dec + ok_pre)
    result["compiles_during_timing_total"] = timed
    result["zero_compiles_after_warmup"] = timed == 0

    mem = memory_stats()
    result["memory"] = {"peak_bytes_in_use": mem.get("peak_bytes_in_use") if mem else None,
                        "bytes_limit": mem.get("bytes_limit") if mem else None}

    if bc.compile_cache_check:
        if first_dec is None and not ok_pre:
            result["compile"]["persistent_cache"] = {"error": "no decode or prefill point ran"}
        else:
            b = first_dec["batch"] if first_dec else bc.batches[0]
            cap = first_dec["capacity"] if first_dec else bc.contexts[0] + bc.steps + PROMPT_MARGIN
            length = ok_pre[0]["length"] if ok_pre else min(bc.prefill)
            log(f"compile cache check: two fresh processes (decode batch {b} capacity {cap}, prefill {length}) ...")
            cc = compile_cache_check(cfg, weights, ops, batch=b, capacity=cap, length=length, kv_dtype=kv_dtype,
                                     timeout=min(max(deadline - _now(), 90.0), 600.0))
            result["compile"]["persistent_cache"] = cc
            if "decode_speedup" in cc:
                log(f"compile cache: decode {cc['cold']['decode_seconds']:.1f} s cold -> "
                    f"{cc['warm']['decode_seconds']:.2f} s warm; prefill {cc['cold']['prefill_seconds']:.1f} s -> "
                    f"{cc['warm']['prefill_seconds']:.2f} s")
            else:
                log(f"compile cache check: {cc}")

    if peer is not None:
        _attach_peer(result, peer)
    result["peer"] = peer
    result["notes"] = notes + [
        ("decode: the state is built on the host with every row at position `context` (no prefill): the cache "
         "contents do not change the work"),
        "weights are random" if wdesc.get("random") else "weights are the model's"]
    result["wall_seconds"] = _now() - t0

    if bc.out:
        path = write_json(result, bc.out)
        result["json_path"] = str(path)
        log(f"wrote {path}")
        if bc.plot:
            for p in plot(result, bc.out, log=log):
                log(f"wrote {p}")
    return result


def _attach_peer(result: dict[str, Any], peer: dict[str, Any]) -> None:
    runs = [r for r in peer.get("runs", []) if "error" not in r]
    for rec in result["decode"]:
        match = [r for r in runs if r["batch"] == rec["batch"] and r["context"] == rec["context"]
                 and r.get("decode_tokens_per_second")]
        if match and rec.get("status") == "ok":
            p = float(match[0]["decode_tokens_per_second"])
            rec["peer_tokens_per_second"] = p
            rec["ratio_to_peer"] = rec["tokens_per_second"] / p if p else None
    for rec in result["prefill"]:
        match = [r for r in runs if r["prefill"] == rec["length"] and r.get("prefill_tokens_per_second")]
        if match and rec.get("status") == "ok":
            p = float(match[0]["prefill_tokens_per_second"])
            rec["peer_tokens_per_second"] = p
            rec["ratio_to_peer"] = rec["tokens_per_second"] / p if p else None


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:500] if text else type(e).__name__


def result_path(result: dict[str, Any], out: str | Path) -> Path:
    return Path(out) / f"{_slug(result['shape'])}_{result['dtype']}_{_slug(result['device']['kind'])}.json"


def write_json(result: dict[str, Any], out: str | Path) -> Path:
    path = result_path(result, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    return str(x)


# ---------------------------------------------------------------------------------------------
# Output


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def _short(text: str, n: int = 64) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def format_table(result: dict[str, Any]) -> str:
    """figure | value | fraction of its ceiling | ratio ferrum / peer."""
    c = result["ceilings"]
    rows = [("figure", "value", "of ceiling", "/ peer"),
            ("copy bandwidth", _si(c["copy_bandwidth_bytes_per_s"], "B/s"), "ceiling", ""),
            ("bf16 matmul", _si(c["matmul_bf16_flops_per_s"], "FLOP/s"), "ceiling", "")]

    def ratio(r: dict) -> str:
        return f"{r['ratio_to_peer']:.2f}" if r.get("ratio_to_peer") else ""

    for r in result["prefill"]:
        label = f"prefill {r['length']}"
        if r.get("status") != "ok":
            rows.append((label, r.get("status", "?"), _short(r.get("note") or r.get("error", "")), ""))
            continue
        rows.append((label, f"{r['tokens_per_second']:.1f} tok/s", f"{r['matmul_peak_fraction']:.1%} matmul", ratio(r)))
    if result.get("ttft"):
        t = result["ttft"]
        rows.append((f"TTFT {t['prompt_tokens']}", f"{t['seconds'] * 1e3:.1f} ms", "", ""))
    for r in result["decode"]:
        label = f"decode b={r['batch']} ctx={r['context']}"
        if r.get("status") != "ok":
            rows.append((label, r.get("status", "?"), _short(r.get("note") or r.get("error", "")), ""))
            continue
        rows.append((label, f"{r['tokens_per_second']:.1f} tok/s",
                     f"{r['bandwidth_fraction']:.1%} BW, {r['roofline_fraction']:.1%} roof", ratio(r)))
    cold = result["compile"]["cold"]
    if cold.get("decode_seconds") is not None:
        rows.append(("compile decode (cold)", f"{cold['decode_seconds']:.2f} s", "", ""))
    if cold.get("prefill_seconds") is not None:
        rows.append(("compile prefill (cold)", f"{cold['prefill_seconds']:.2f} s", "", ""))
    pc = result["compile"].get("persistent_cache")
    if pc and "decode_speedup" in pc:
        rows.append(("compile decode, fresh process", f"{pc['cold']['decode_seconds']:.2f} s cold",
                     f"{pc['warm']['decode_seconds']:.2f} s warm", ""))
        rows.append(("compile prefill, fresh process", f"{pc['cold']['prefill_seconds']:.2f} s cold",
                     f"{pc['warm']['prefill_seconds']:.2f} s warm", ""))
    elif pc:
        rows.append(("compile cache check", "failed", _short(str(pc.get("warm") or pc.get("cold") or pc)), ""))
    mem = result["memory"]
    if mem.get("peak_bytes_in_use") is not None:
        limit = mem.get("bytes_limit")
        rows.append(("peak device memory", _si(mem["peak_bytes_in_use"], "B"),
                     f"{mem['peak_bytes_in_use'] / limit:.1%} of limit" if limit else "", ""))
    else:
        rows.append(("peak device memory", "n/a", "", ""))
    rows.append(("compiles during timing", str(result["compiles_during_timing_total"]),
                 "ok" if result["zero_compiles_after_warmup"] else "RECOMPILED", ""))
    peer = result.get("peer")
    if peer and peer.get("error"):
        rows.append((f"peer {peer['name']}", "error", _short(peer["error"]), ""))
    elif peer:
        runs = peer.get("runs", [])
        bad = [r for r in runs if r.get("error")]
        device = next((r.get("device") for r in runs if r.get("device")), "")
        rows.append((f"peer {peer['name']}", f"{len(runs) - len(bad)}/{len(runs)} runs ok",
                     _short(bad[0]["error"]) if bad else _short(str(device)), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [(f"{result['shape']} {result['dtype']} on {result['device']['kind']} (jax {result['jax']}, "
              f"commit {str(result['commit'])[:12]})")]
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _batch_axis(ax: Any, points: list[dict]) -> None:
    batches = sorted({r["batch"] for r in points})
    ax.set_xscale("log", base=2)
    if batches:
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()


def plot(result: dict[str, Any], out: str | Path, log: Callable[[str], None] = _log_stderr) -> list[Path]:
    """decode tokens/s vs batch (one line per context, dashed: its roofline; x: the peer) and the
    fraction of roofline of decode and of prefill. Needs matplotlib; says so and returns [] without."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot: matplotlib is not installed (pip install matplotlib): skipped")
        return []
    stem = result_path(result, out).with_suffix("")
    title = f"{result['shape']} {result['dtype']} on {result['device']['kind']}"
    ok = [r for r in result["decode"] if r.get("status") == "ok"]
    contexts = sorted({r["context"] for r in ok})
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(contexts):
        pts = sorted((r["batch"], r) for r in ok if r["context"] == c)
        xs = [b for b, _ in pts]
        color = f"C{i}"
        ax.plot(xs, [r["tokens_per_second"] for _, r in pts], "o-", color=color, label=f"context {c}")
        ax.plot(xs, [r["roofline_tokens_per_second"] for _, r in pts], "--", color=color, alpha=0.6,
                label=f"roofline, context {c}")
        peer = [(b, r["peer_tokens_per_second"]) for b, r in pts if r.get("peer_tokens_per_second")]
        if peer:
            ax.plot(*zip(*peer), "x", color=color, markersize=9, label=f"peer, context {c}")
    _batch_axis(ax, ok)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(stem.parent / (stem.name + "_decode.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, c in enumerate(contexts):
        pts = sorted((r["batch"], r) for r in ok if r["context"] == c)
        a1.plot([b for b, _ in pts], [r["roofline_fraction"] for _, r in pts], "o-", color=f"C{i}",
                label=f"roofline, context {c}")
        a1.plot([b for b, _ in pts], [r["bandwidth_fraction"] for _, r in pts], "s:", color=f"C{i}", alpha=0.6,
                label=f"copy BW, context {c}")
    _batch_axis(a1, ok)
    a1.set_ylim(0, max([1.05] + [1.1 * r[k] for r in ok for k in ("roofline_fraction", "bandwidth_fraction")]))
    a1.set_xlabel("batch")
    a1.set_ylabel("fraction")
    a1.set_title("decode")
    a1.grid(True, alpha=0.3)
    a1.legend(fontsize=8)
    pre = [r for r in result["prefill"] if r.get("status") == "ok"]
    a2.bar([str(r["length"]) for r in pre], [r["matmul_peak_fraction"] for r in pre], color="C3")
    a2.set_ylim(0, max([1.05] + [1.1 * r["matmul_peak_fraction"] for r in pre]))
    a2.set_xlabel("prompt tokens")
    a2.set_ylabel("fraction of bf16 matmul peak")
    a2.set_title("prefill")
    a2.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(stem.parent / (stem.name + "_roofline.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line (`ferrum-jax bench` and `python -m ferrum_jax.bench`)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _points(text: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"peer point {item!r}: expected BATCH:CONTEXT:PREFILL")
        out.append(tuple(int(p) for p in parts))
    return tuple(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="llama-3.1-8b", help=f"a named shape with random weights: {', '.join(SHAPES)}")
    p.add_argument("--model", default=None, help="a model path or alias instead of a shape (real weights)")
    p.add_argument("--dtype", default="bf16",
                   help=f"bf16, f16, f32, or a GGUF type for random packed weights: "
                        f"{', '.join(t.lower() for t in QUANT_SCALES)} (default bf16)")
    p.add_argument("--batch", type=_ints, default=DEFAULT_BATCHES, help="decode batch sizes (default 1,8,32,128)")
    p.add_argument("--context", type=_ints, default=DEFAULT_CONTEXTS, help="decode context lengths (default 1024,4096)")
    p.add_argument("--prefill", type=_ints, default=DEFAULT_PREFILL, help="prefill lengths (default 512,2048,8192)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="decode steps per timed run (default 64)")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed runs per point; the median counts (default 3)")
    p.add_argument("--peer", default="none", choices=["none", *DEFAULT_PEER_SCRIPTS], help="a peer to run too")
    p.add_argument("--peer-script", default=None, help="the peer's script (default bench/peers/<peer>_peer.py)")
    p.add_argument("--peer-points", type=_points, default=None, metavar="B:C:L,...",
                   help="peer runs (batch:context:prefill); default: smallest batch with the shortest prefill and "
                        "largest batch with the longest, at the first context")
    p.add_argument("--peer-budget", type=float, default=DEFAULT_PEER_BUDGET,
                   help=f"seconds for all peer runs (default {DEFAULT_PEER_BUDGET:.0f})")
    p.add_argument("--peer-args", default="", metavar="ARGS",
                   help="extra arguments for the peer script, one string (e.g. '--device cpu --no-compile')")
    p.add_argument("--compile-cache-check", action="store_true",
                   help="also time compiles cold vs warm through the persistent cache (two fresh processes)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="use a persistent compilation cache in this process too (default off: cold compiles)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the JSON and plots ('none': write nothing)")
    p.add_argument("--plot", action="store_true", help="draw PNGs (needs matplotlib)")
    p.add_argument("--commit", default=None, help="the git commit to record (default: git rev-parse HEAD)")
    p.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET,
                   help=f"seconds; sweep points past it are skipped with a note (default {DEFAULT_TIME_BUDGET:.0f}; "
                        "0 = none)")
    p.add_argument("--copy-bytes", type=int, default=None, help="copy-bandwidth buffer (default 4 GiB, CPU 256 MiB)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 8192, CPU 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only draw the plots of an earlier result file (next to it); runs nothing")


def config_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None) -> BenchConfig:
    out = None if str(args.out).lower() in ("none", "") else args.out
    cmd = "ferrum-jax bench " + " ".join(argv if argv is not None else sys.argv[1:])
    return BenchConfig(shape=None if args.model else args.shape, model=args.model, dtype=args.dtype,
                       batches=tuple(args.batch), contexts=tuple(args.context), prefill=tuple(args.prefill),
                       steps=args.steps, runs=args.runs, peer=args.peer, peer_script=args.peer_script,
                       peer_points=args.peer_points, peer_budget=args.peer_budget,
                       peer_args=tuple(shlex.split(args.peer_args or "")),
                       compile_cache_check=args.compile_cache_check, compile_cache=args.compile_cache, out=out,
                       plot=args.plot, commit=args.commit, time_budget=args.time_budget or None,
                       copy_bytes=args.copy_bytes, matmul_n=args.matmul_n, seed=args.seed, command=cmd.strip())


def run_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What `ferrum-jax bench` does: run, print the table on stdout; FerrumError if anything
    recompiled during a timed part (after the JSON is written)."""
    if args.replot:
        path = Path(args.replot)
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FerrumError(f"--replot {path}: {e}") from None
        for p in plot(result, path.parent):
            print(p, flush=True)
        return result
    result = run_bench(config_from_args(args, argv))
    print(format_table(result), flush=True)
    if not result["zero_compiles_after_warmup"]:
        raise FerrumError(f"{result['compiles_during_timing_total']} compilation(s) during timed parts "
                          f"(see 'compiles_during_timing' in the JSON)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compile-probe"]:  # internal: one fresh process of compile_cache_check
        print(json.dumps(_compile_probe(argv[1], argv[2])), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m ferrum_jax.bench", description="ferrum-jax speed benchmark")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args, argv)
    except FerrumError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
