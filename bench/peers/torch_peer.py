"""PyTorch peer for `ferrum-jax bench` (issue 7): HF transformers with a static KV cache and
torch.compile, for the same model shape, batch and lengths, on the same GPU.

    python bench/peers/torch_peer.py --config-json '<HF config dict as JSON>' --batch B --context C \
        --steps N [--prefill L] [--dtype bfloat16] [--no-compile] [--device cuda]

Prints exactly one JSON object on stdout (everything else, transformers/torch logs included, goes to
stderr) and exits 0, also when the measurement fails (then the object has "error"). Only invalid
arguments exit non-zero (argparse's usage error, exit 2, nothing on stdout).

What is measured (see bench/peers/README.md):

  * decode: the model is built from the config alone with random weights (N(0, 0.02) matrices) directly
    on the device, in eval mode under no_grad. A static cache of max_cache_len = context +
    max(steps, warmup) + 16 is filled with `context` random tokens for all `batch` rows (eager,
    chunked prefill), then a one-token decode step (forward + greedy argmax, the argmax feeding the
    next step) is compiled with torch.compile(mode="reduce-overhead", fullgraph=True), HF's
    documented recipe for static cache + compile (CUDA graphs). One untimed run of `warmup` steps
    (default: `steps`) compiles and captures; then `runs` runs of `steps` steps are timed with CUDA
    events between synchronizes, every run decoding positions context .. context+steps-1 again (the
    cache's write position is moved back to `context`; --refill empties and refills it instead).
    Reported: the median run, and whether every run decoded the same greedy tokens as the warm-up.
  * prefill (with --prefill L): one eager (not compiled) forward of L tokens at batch 1 into an empty
    static cache, logits of the last position only; median of `runs` after one warm-up.

Works with transformers 4.5x (StaticCache(config, max_batch_size, max_cache_len, device, dtype),
explicit `cache_position`) and 5.x (lazily allocated StaticCache(config, max_cache_len), positions
tracked by the cache itself): the API in use is detected from signatures, not version numbers.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any

CACHE_MARGIN = 16  # extra static-cache slots beyond context + steps
DTYPE_ALIASES = {"bf16": "bfloat16", "f16": "float16", "fp16": "float16", "half": "float16", "f32": "float32",
                 "fp32": "float32", "float": "float32"}


def log(*args: Any) -> None:
    print("[torch_peer]", *args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# stdout discipline: the JSON result is the only thing on the real stdout.


def _claim_stdout() -> int:
    """Point fd 1 (and sys.stdout) at stderr for the rest of the run, so that nothing printed by
    transformers, torch, inductor's compile workers or C extensions reaches the real stdout; return a
    duplicate of the real stdout for the final JSON."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return real


def _emit(fd: int, result: dict[str, Any]) -> None:
    data = (json.dumps(result, default=str) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]
    os.close(fd)


# --------------------------------------------------------------------------------------------------
# transformers version adaptation


def _tf_version() -> tuple[int, int]:
    import transformers

    parts = transformers.__version__.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


def _model_type_for(archs: list[str]) -> str | None:
    """The model_type for an architecture class name. Several model types can map to one class (in
    transformers 5, e.g. internlm3 -> LlamaForCausalLM), so prefer the one the class is named after."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for arch in archs:
        cands = [mt for mt, names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
                 if arch in (names if isinstance(names, (list, tuple)) else [names])]
        if not cands:
            continue
        stem = arch.split("For")[0].lower()
        norm = {mt: mt.replace("_", "").replace("-", "") for mt in cands}
        for pick in ([mt for mt in cands if norm[mt] == stem],
                     [mt for mt in cands if norm[mt].startswith(stem)],
                     sorted(cands, key=len)):
            if pick:
                return pick[0]
    return None


def build_config(cfg: dict[str, Any]) -> Any:
    """An HF config object from a config.json-style dict (model_type, or inferred from architectures)."""
    from transformers import AutoConfig

    d = dict(cfg)
    model_type = d.pop("model_type", None) or _model_type_for(list(d.get("architectures") or []))
    if model_type is None:
        raise ValueError(f"config has no model_type and no architecture this transformers knows: "
                         f"{d.get('architectures')!r}")
    if _tf_version()[0] < 5 and isinstance(d.get("rope_parameters"), dict):
        # transformers 5 spells RoPE as rope_parameters; 4.x as rope_theta + rope_scaling.
        rp = dict(d.pop("rope_parameters"))
        if "rope_theta" in rp:
            d.setdefault("rope_theta", rp.pop("rope_theta"))
        if rp.get("rope_type", rp.get("type", "default")) != "default":
            d.setdefault("rope_scaling", rp)
    d["use_cache"] = True
    return AutoConfig.for_model(model_type, **d)


def build_model(config: Any, device: Any, dtype: Any, attn: str | None, seed: int) -> Any:
    """Random-weight model built directly on `device` (no CPU copy of the weights): parameters are
    created under `torch.device(device)` and re-drawn in place, matrices N(0, 0.02), vectors (norm
    scales, biases) as the model's own init leaves them."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype_kw = "dtype" if _tf_version() >= (4, 56) else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_kw: dtype}
    if attn:
        kwargs["attn_implementation"] = attn
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.to(device)  # no-op when construction already placed everything; never casts buffers
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval()
    return model


def _has_sliding_layers(config: Any) -> bool:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(cfg, "sliding_window", None) or getattr(cfg, "use_sliding_window", True) is False:
        return False
    return ("sliding_attention" in (getattr(cfg, "layer_types", None) or [])
            or getattr(cfg, "sliding_window_pattern", None) is not None
            or getattr(cfg, "model_type", "") in ("gemma2", "gemma3", "gemma3_text", "cohere2"))


class Api:
    """Which spelling of the forward/cache API this transformers uses (from signatures)."""

    def __init__(self, model: Any) -> None:
        params = inspect.signature(model.forward).parameters
        self.cache_position = "cache_position" in params  # 4.x: explicit; 5.x: the cache counts
        self.logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.cache_class = "StaticCache"
        self.fill_in_one_chunk = False

    def static_cache(self, model: Any, batch: int, max_len: int, device: Any, dtype: Any) -> Any:
        """StaticCache(config, max_cache_len) where that is the signature (4.56+, lazily allocated);
        else the older StaticCache(config, max_batch_size, max_cache_len, device, dtype) (4.4x-4.55,
        where 4.54-4.55 hide it behind *args, **kwargs)."""
        import transformers

        cache_cls = transformers.StaticCache
        if ("max_batch_size" in inspect.signature(cache_cls.__init__).parameters
                and hasattr(transformers, "HybridCache") and _has_sliding_layers(model.config)):
            # before 4.54 a StaticCache knows no sliding layers; models with them (Gemma 2/3) use the
            # HybridCache (what generate() picks for them there), which must be filled in one chunk.
            cache_cls = transformers.HybridCache
            self.fill_in_one_chunk = True
        self.cache_class = cache_cls.__name__
        named = set(inspect.signature(cache_cls.__init__).parameters) - {"self", "args", "kwargs"}
        new_style = "max_cache_len" in named and not named & {"max_batch_size", "batch_size"}
        new_kw: dict[str, Any] = {"config": model.config, "max_cache_len": max_len}
        batch_kw = "batch_size" if "batch_size" in named and "max_batch_size" not in named else "max_batch_size"
        old_kw = dict(new_kw, **{batch_kw: batch, "device": device, "dtype": dtype})
        first, second = (new_kw, old_kw) if new_style else (old_kw, new_kw)
        try:
            return cache_cls(**first)
        except TypeError:
            log(f"{self.cache_class}(" + ", ".join(first) + ") failed; trying (" + ", ".join(second) + ")")
            return cache_cls(**second)

    def forward_kwargs(self, ids: Any, cache_position: Any, cache: Any, last_only: bool) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "input_ids": ids,
            "position_ids": cache_position.unsqueeze(0).expand(ids.shape[0], -1),
            "past_key_values": cache,
            "use_cache": True,
        }
        if self.cache_position:
            kw["cache_position"] = cache_position
        if last_only and self.logits_kw:
            kw[self.logits_kw] = 1
        return kw


def reset_cache(cache: Any) -> None:
    """Empty a static cache in place (static tensor addresses kept, so CUDA graphs stay valid).
    `Cache.reset()` zeroes the tensors and, in transformers 5 (where the cache tracks its own length),
    the length counters; those are zeroed here too in case a version's reset does not."""
    import torch

    cache.reset()
    for layer in getattr(cache, "layers", None) or []:
        cl = getattr(layer, "cumulative_length", None)
        if isinstance(cl, torch.Tensor):
            cl.zero_()
        elif isinstance(cl, int):
            layer.cumulative_length = 0
        if isinstance(getattr(layer, "cumulative_length_int", None), int):
            layer.cumulative_length_int = 0


def rewind(cache: Any, pos: int) -> bool:
    """Move the write position of a cache that counts its own length (transformers 5: a tensor with a
    static address) back to `pos`, contents kept (the next steps overwrite positions pos, pos+1, ...).
    False, touching nothing, if it has no such counters or has sliding-window ring buffers (which
    rotate their contents, so they are refilled instead)."""
    import torch

    layers = getattr(cache, "layers", None) or []
    if not layers or any(hasattr(layer, "cumulative_length_int") for layer in layers):
        return False
    counters = [getattr(layer, "cumulative_length", None) for layer in layers]
    if not all(isinstance(cl, torch.Tensor) for cl in counters):
        return False
    for cl in counters:
        cl.fill_(pos)
    return True


# --------------------------------------------------------------------------------------------------
# measurement


class Clock:
    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn: Any) -> tuple[float, float]:
        """(event seconds, wall seconds) of fn(); event seconds are wall seconds off CUDA."""
        self.sync()
        if self.cuda:
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            end.record()
        self.sync()
        wall = time.perf_counter() - t0
        return (start.elapsed_time(end) / 1e3 if self.cuda else wall), wall


def _dynamo_counter(group: str, key: str) -> int:
    """A torch._dynamo counter (diagnostics; 0 where this torch has no such counter)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters[group][key])
    except Exception as e:  # noqa: BLE001 - diagnostics only
        log(f"no dynamo counter {group}/{key}: {e}")
        return 0


_TORCH_LOGGERS = ("torch", "torch._inductor", "torch._dynamo")


class _SkipWatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.reasons: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "skipping cudagraph" in msg.lower():
            self.reasons.add(msg.strip()[:300])


def _watch_cudagraph_skips() -> _SkipWatcher | None:
    """Collect inductor's "skipping cudagraphs due to ..." messages (also logged to stderr) while the
    step compiles: with mode="reduce-overhead", a skipped CUDA graph silently leaves the launch
    overhead in. Not done when TORCH_LOGS is set (the user's logging stays as asked). On CPU there are
    no CUDA graphs: cudagraph_skips counts 1 per graph there, with no message."""
    import torch

    if os.environ.get("TORCH_LOGS"):
        return None
    for artifacts in ({"perf_hints": True, "cudagraphs": True}, {"perf_hints": True}):
        try:  # the skip message is a "cudagraphs" artifact in recent torch, a "perf_hints" one before
            torch._logging.set_logs(**artifacts)
            break
        except Exception as e:  # noqa: BLE001 - diagnostics only
            log(f"cannot enable {', '.join(artifacts)} logs: {e}")
    watcher = _SkipWatcher()
    for name in _TORCH_LOGGERS:  # torch's own loggers do not propagate to their parents
        logging.getLogger(name).addHandler(watcher)
    return watcher


def _stop_watching(watcher: _SkipWatcher | None) -> list[str]:
    """Back to default torch logging (nothing logged per step while timing); the reasons seen."""
    import torch

    if watcher is None:
        return []
    for name in _TORCH_LOGGERS:
        logging.getLogger(name).removeHandler(watcher)
    try:
        torch._logging.set_logs()
    except Exception as e:  # noqa: BLE001 - diagnostics only
        log(f"cannot reset torch logs: {e}")
    return sorted(watcher.reasons)[:8]


def fill_cache(model: Any, api: Api, cache: Any, ids: Any, chunk: int) -> Any:
    """Empty `cache`, then prefill it eagerly with `ids` [batch, context] in chunks of `chunk` positions;
    returns the greedy next token [batch, 1]."""
    import torch

    reset_cache(cache)
    context, logits = ids.shape[1], None
    for pos in range(0, context, chunk):
        n = min(chunk, context - pos)
        cp = torch.arange(pos, pos + n, device=ids.device)
        logits = model(**api.forward_kwargs(ids[:, pos:pos + n], cp, cache, last_only=True)).logits
    return torch.argmax(logits[:, -1, :], dim=-1, keepdim=True)


def measure_decode(model: Any, api: Api, args: argparse.Namespace, device: Any, dtype: Any,
                   compiled: bool) -> dict[str, Any]:
    """Fill the static cache with `context` tokens (eager, untimed); then the warm-up and every timed
    run decode from position `context`: greedy one-token steps at context, context+1, ..."""
    import torch

    clock = Clock(device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device=device, generator=gen)
    chunk = max(1, args.fill_tokens // args.batch)
    max_len = args.context + max(args.steps, args.warmup) + CACHE_MARGIN
    cache = api.static_cache(model, args.batch, max_len, device, dtype)
    if api.fill_in_one_chunk:
        chunk = args.context

    def step(tokens: Any, cache_position: Any) -> Any:
        logits = model(**api.forward_kwargs(tokens, cache_position, cache, last_only=False)).logits
        return torch.argmax(logits[:, -1, :], dim=-1, keepdim=True)

    if compiled:
        step = torch.compile(step, mode=args.compile_mode, fullgraph=True)
    cache_position = torch.tensor([args.context], dtype=torch.long, device=device)
    state: dict[str, Any] = {}

    sliding = _has_sliding_layers(model.config)

    def prepare(fill: bool) -> float:
        """Put the cache back at `context` tokens: refill it (the first time, with --refill, or for
        sliding-window ring buffers, which rotate their contents), or else just move the write
        position back (4.x/early 5.x: the explicit cache_position does that; later 5.x: the cache's own
        counters), which is enough since every run overwrites the same slots."""
        t = time.perf_counter()
        if not fill:
            fill = sliding or (not api.cache_position and (
                not rewind(cache, args.context) or int(cache.get_seq_length()) != args.context))
            if fill and not state.get("said_refill"):
                log("this cache cannot be rewound (sliding-window ring buffers, or unknown counters); "
                    "refilling it before every run")
                state["said_refill"] = True
        if fill:
            state["first"] = fill_cache(model, api, cache, ids, chunk)
        state["tok"] = state["first"].clone()
        cache_position.fill_(args.context)
        clock.sync()
        return time.perf_counter() - t

    def decode(n: int) -> None:
        tok, toks = state["tok"], []
        for _ in range(n):
            tok = step(tok, cache_position).clone()  # clone: a CUDA-graph output is overwritten by the next replay
            toks.append(tok)
            cache_position.add_(1)
        state["toks"] = toks

    fill_s = prepare(True)
    log(f"filled static cache (max_cache_len={max_len}) with {args.context} tokens x batch {args.batch} "
        f"(chunks of {chunk}) in {fill_s:.2f}s")
    watcher = _watch_cudagraph_skips() if compiled else None
    t = time.perf_counter()
    try:
        decode(args.warmup)
        clock.sync()
    finally:
        skip_reasons = _stop_watching(watcher)
    warmup_s = time.perf_counter() - t
    log(f"warm-up: {args.warmup} steps in {warmup_s:.2f}s ({'compiled, ' + args.compile_mode if compiled else 'eager'})")

    reference = torch.cat(state["toks"][:args.steps], dim=1)
    agree = []
    graphs_before = _dynamo_counter("stats", "unique_graphs")
    ev, wall = [], []
    for r in range(args.runs):
        prepare(args.refill)
        e, w = clock.time(lambda: decode(args.steps))
        ev.append(e)
        wall.append(w)
        if args.warmup >= args.steps:
            agree.append(bool(torch.equal(torch.cat(state["toks"], dim=1), reference)))
        log(f"run {r}: {args.steps} steps in {e * 1e3:.1f} ms ({e / args.steps * 1e3:.3f} ms/step)")
    med = statistics.median(ev)
    recompiled = _dynamo_counter("stats", "unique_graphs") - graphs_before
    if compiled and recompiled:
        log(f"WARNING: {recompiled} graph(s) compiled during the timed runs; raise --warmup")
    out: dict[str, Any] = {
        "decode_tokens_per_second": args.batch * args.steps / med,
        "decode_ms_per_step": med / args.steps * 1e3,
        "decode_wall_ms_per_step": statistics.median(wall) / args.steps * 1e3,
        "decode_run_ms": [round(x * 1e3, 3) for x in ev],
        "max_cache_len": max_len,
        "warmup_steps": args.warmup,
        "warmup_seconds": round(warmup_s, 3),
        "cache_fill_seconds": round(fill_s, 3),
        "refill_each_run": args.refill,
        # each timed run decoded the same greedy tokens as the warm-up (None: warm-up shorter than a run)
        "decode_runs_agree": all(agree) if agree else None,
    }
    if compiled:
        out["graphs_compiled_during_timing"] = recompiled
        if skip_reasons:
            out["cudagraph_skip_reasons"] = skip_reasons
    return out


def measure_prefill(model: Any, api: Api, args: argparse.Namespace, device: Any, dtype: Any) -> dict[str, Any]:
    """Eager forward of `prefill` random tokens at batch 1 into an empty static cache (last logits only)."""
    import torch

    clock = Clock(device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    n = args.prefill
    cache = api.static_cache(model, 1, n, device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device, generator=gen)
    cp = torch.arange(n, device=device)

    def once() -> None:
        model(**api.forward_kwargs(ids, cp, cache, last_only=True))

    once()  # warm-up (also allocates a lazily initialised cache)
    times = []
    for _ in range(args.runs):
        reset_cache(cache)
        times.append(clock.time(once)[0])
    med = statistics.median(times)
    log(f"prefill {n} tokens: {med * 1e3:.1f} ms (median of {args.runs})")
    return {"prefill_tokens_per_second": n / med, "prefill_ms": med * 1e3, "prefill_length": n,
            "prefill_batch": 1, "prefill_compiled": False}


def _free(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:2000]}"


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    import torch
    import transformers

    result["torch"] = torch.__version__
    result["transformers"] = transformers.__version__
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available to torch on this machine")
        result["device"] = torch.cuda.get_device_name(device)
    else:
        result["device"] = f"{device.type} ({platform.processor() or platform.machine()}, "\
                           f"{torch.get_num_threads()} threads)"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)

    config = build_config(json.loads(args.config_json))
    t = time.perf_counter()
    model = build_model(config, device, dtype, args.attn_implementation, args.seed)
    log(f"built {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
        f"{args.dtype}) on {device} in {time.perf_counter() - t:.2f}s")
    result["model_class"] = type(model).__name__
    result["model_type"] = getattr(config, "model_type", None)
    result["num_parameters"] = sum(p.numel() for p in model.parameters())
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    api = Api(model)
    result["explicit_cache_position"] = api.cache_position

    with torch.no_grad():
        decode = None
        if args.compile:
            try:
                decode = measure_decode(model, api, args, device, dtype, compiled=True)
                result["compile"] = True
            except Exception as e:  # noqa: BLE001 - any compile/capture failure: fall back to eager
                log("compiled decode failed; falling back to eager:\n" + traceback.format_exc())
                result["compile_error"] = _err(e)
                torch._dynamo.reset()
                _free(device)
        if decode is None:
            decode = measure_decode(model, api, args, device, dtype, compiled=False)
            result["compile"] = False
        result.update(decode)
        result["cache_class"] = api.cache_class
        if args.compile and result["compile"]:
            result["cudagraph_skips"] = _dynamo_counter("inductor", "cudagraph_skips")
        torch._dynamo.reset()  # drops compiled graphs, CUDA-graph pools and their hold on the decode cache
        _free(device)

        if args.prefill:
            try:
                result.update(measure_prefill(model, api, args, device, dtype))
            except Exception as e:  # noqa: BLE001 - keep the decode numbers
                log("prefill failed:\n" + traceback.format_exc())
                result["prefill_error"] = _err(e)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-json", required=True, help="HF config.json contents as a JSON object")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--context", type=int, required=True, help="tokens in the cache before decoding")
    ap.add_argument("--steps", type=int, required=True, help="decode steps per timed run")
    ap.add_argument("--prefill", type=int, default=0, help="also time a batch-1 prefill of this many tokens")
    ap.add_argument("--dtype", default="bfloat16", type=lambda v: DTYPE_ALIASES.get(v.lower(), v.lower()),
                    choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda", help="torch device (default cuda; cpu for testing)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="eager decode")
    ap.add_argument("--compile-mode", default="reduce-overhead",
                    help="torch.compile mode for the decode step (default reduce-overhead: CUDA graphs)")
    ap.add_argument("--attn-implementation", default=None,
                    help="HF attn_implementation (default: transformers' default, sdpa)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed decode steps first (compilation, CUDA-graph capture); default --steps, i.e. "
                         "one untimed run over the same positions as the timed ones")
    ap.add_argument("--refill", action="store_true",
                    help="empty and refill the cache before every timed run (default: move its position back)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported")
    ap.add_argument("--fill-tokens", type=int, default=8192,
                    help="tokens (batch x positions) per forward when filling the cache to --context")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = args.steps
    for name in ("batch", "context", "steps", "warmup", "runs", "fill_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.prefill < 0:
        ap.error("--prefill must be >= 0")
    try:
        cfg = json.loads(args.config_json)
    except json.JSONDecodeError as e:
        ap.error(f"--config-json is not valid JSON: {e}")
    if not isinstance(cfg, dict):
        ap.error("--config-json must be a JSON object")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = _claim_stdout()
    result: dict[str, Any] = {
        "decode_tokens_per_second": None, "decode_ms_per_step": None, "device": None, "torch": None,
        "transformers": None, "compile": False, "cache": "static", "batch": args.batch,
        "context": args.context, "steps": args.steps, "dtype": args.dtype, "runs": args.runs,
        "compile_mode": args.compile_mode if args.compile else None, "python": platform.python_version(),
    }
    try:
        run(args, result)
    except BaseException as e:  # noqa: BLE001 - the contract is one JSON object, whatever happened
        log("failed:\n" + traceback.format_exc())
        result["error"] = _err(e)
        if "out of memory" in str(e).lower():
            result["oom"] = True
    _emit(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
