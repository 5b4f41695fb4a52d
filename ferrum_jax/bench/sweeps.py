"""The timed parts: one decode point (batch, context) and one prefill length, each a compile call
then timed calls with the compilations counted, and the sweeps over all points of a run (a point is
skipped, with a note, when it is too long, past the time budget or does not fit in memory)."""

from __future__ import annotations

import dataclasses
import statistics
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ferrum_jax.backend import Ops, record_dispatch, summarize
from ferrum_jax.bench.ceilings import fits
from ferrum_jax.bench.config import PROMPT_MARGIN, now
from ferrum_jax.bench.flops import (
    decode_flops_per_token,
    decode_need,
    kv_bytes_at_context,
    prefill_flops,
    prefill_need,
)
from ferrum_jax.bench.weights import decode_weight_bytes, expected_distinct_experts
from ferrum_jax.cache import KVCache
from ferrum_jax.compile_log import count_compiles
from ferrum_jax.generate import EOS_SLOTS, DecodeState, decode, prefill
from ferrum_jax.sampling import GREEDY, SamplingArrays

_DONATION_WARNING = "Some donated buffers were not usable"


def host_state(batch: int, capacity: int, vocab: int, context: int) -> DecodeState:
    """A decode state whose every row's next token sits at position `context` (the timed steps
    attend over `context` keys), with no stop ids and no token limit. Rows start from distinct
    tokens, so they do not all compute the same thing (a MoE batch then routes to many experts)."""
    put = jax.device_put
    return DecodeState(
        tokens=put(np.zeros((batch, capacity), np.int32)), count=put(np.zeros((batch,), np.int32)),
        last=put((np.arange(batch) * 7919 % max(vocab - 1, 1) + 1).astype(np.int32)),
        position=put(np.full((batch,), context, np.int32)),
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
        start = now()
        out = fn(*args)
        jax.block_until_ready(out)
        seconds = now() - start
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
    state = host_state(batch, capacity, cfg.vocab_size, context)

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
            "compiles_warmup": warm.compiles, "compiles_during_timing": compiles, "dispatch": first.dispatch,
            "xla_compiler_options": ops.compiler_options(batch) or {}}


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


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:500] if text else type(e).__name__


def _cannot_run(rec: dict[str, Any], label: str, too_long: str | None, deadline: float, need: int,
                log: Callable[[str], None]) -> bool:
    """Mark `rec` skipped, with a note, when the point is too long, past `deadline`, or needs more
    device memory than is free."""
    if too_long:
        rec |= {"status": "skipped", "note": too_long}
        return True
    if now() > deadline:
        rec |= {"status": "skipped", "note": "time budget spent (--time-budget)"}
        return True
    ok, why = fits(need)
    if not ok:
        rec |= {"status": "skipped", "note": f"does not fit: {why}"}
        log(f"{label}: skipped ({why})")
    return not ok


def _measured(rec: dict[str, Any], label: str, log: Callable[[str], None], fn: Callable[..., dict[str, Any]],
              **kwargs: Any) -> bool:
    """rec |= fn(**kwargs); an exception (out of memory, say) is recorded as failed and the run goes on."""
    try:
        rec |= fn(**kwargs)
    except Exception as e:  # noqa: BLE001  an out-of-memory error, say: record it and go on
        rec |= {"status": "failed", "error": _one_line(e)}
        log(f"{label}: failed: {rec['error']}")
        return False
    return True


def prefill_sweep(weights: Any, cfg: Any, ops: Ops, ws: dict[str, int], *, lengths: Sequence[int], runs: int,
                  kv_dtype: Any, seed: int, peak: float, deadline: float, log: Callable[[str], None]
                  ) -> list[dict[str, Any]]:
    """bench_prefill at every length that starts before `deadline`, as a fraction of the matmul `peak`."""
    max_pos = cfg.max_position_embeddings
    pre = []
    for length in lengths:
        rec: dict[str, Any] = {"length": length}
        pre.append(rec)
        label = f"prefill {length}"
        too_long = f"longer than max_position_embeddings {max_pos}" if length > max_pos else None
        if _cannot_run(rec, label, too_long, deadline, prefill_need(cfg, length, kv_dtype), log):
            continue
        if not _measured(rec, label, log, bench_prefill, weights=weights, cfg=cfg, ops=ops, length=length,
                         runs=runs, kv_dtype=kv_dtype, seed=seed):
            continue
        flops = prefill_flops(cfg, ws, length)
        rec |= {"status": "ok", "flops": flops, "flops_per_s": flops / rec["seconds"],
                "matmul_peak_fraction": flops / rec["seconds"] / peak}
        log(f"prefill {length}: {rec['tokens_per_second']:.0f} tok/s, {rec['matmul_peak_fraction']:.1%} of matmul "
            f"peak (compile {rec['compile_seconds']:.1f} s)")
    return pre


def decode_sweep(weights: Any, cfg: Any, ops: Ops, ws: dict[str, int], *, batches: Sequence[int],
                 contexts: Sequence[int], steps: int, runs: int, kv_dtype: Any, bw: float, peak: float,
                 deadline: float, notes: list[str], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """bench_decode at every (batch, context) that starts before `deadline`, as fractions of the copy
    bandwidth `bw` and of the roofline (`bw` and the matmul `peak`). Rows that stopped early go to `notes`.
    The weight bytes of a step are `decode_weight_bytes(ws, batch)` (MoE: the non-expert weights + the
    expected distinct experts under uniform routing; recorded per point as `weight_bytes_per_step`)."""
    max_pos = cfg.max_position_embeddings
    dec = []
    for context in contexts:
        for batch in batches:
            rec: dict[str, Any] = {"batch": batch, "context": context}
            dec.append(rec)
            label = f"decode batch {batch} context {context}"
            capacity = context + steps + PROMPT_MARGIN
            too_long = (f"context + steps exceeds max_position_embeddings {max_pos}" if capacity > max_pos
                        else None)
            if _cannot_run(rec, label, too_long, deadline, decode_need(cfg, batch, capacity, kv_dtype), log):
                continue
            if not _measured(rec, label, log, bench_decode, weights=weights, cfg=cfg, ops=ops, batch=batch,
                             context=context, steps=steps, runs=runs, kv_dtype=kv_dtype):
                continue
            if rec["steps_done_min"] < steps:  # a row stopped early: the step time is not what it says
                notes.append(f"{label}: a row ran only {rec['steps_done_min']} of {steps} steps")
                log(f"{label}: WARNING a row stopped after {rec['steps_done_min']} steps")
            step = rec["seconds_per_step"]
            wbytes = decode_weight_bytes(ws, batch)  # MoE: the non-expert weights + the experts B tokens pick
            if "moe" in ws:
                moe = ws["moe"]
                distinct = float(expected_distinct_experts(moe["num_experts"], moe["top_k"], batch))
                rec |= {"expected_distinct_experts_per_layer": distinct,
                        "active_expert_bytes_per_step": wbytes - moe["non_expert_bytes_read_per_decode_step"]}
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
    return dec
