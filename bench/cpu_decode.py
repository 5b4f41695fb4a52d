"""ferrum-jax's CPU speed on this machine, next to llama.cpp's (issue 3).

For each model (SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M Q4_K_M, the two GGUF aliases) and each
weight layout:

  * "dequantized": the CPU default (`load(alias)`: every GGUF weight decoded to float32 at load);
  * "packed": `load(alias, dequantize=False)`: GGUF blocks stay packed and are decoded inside the
    jitted step (the GPU default; expected to be slower on the CPU),

it measures

  * time to first token, cold: a fresh Python process with an empty persistent compilation cache
    directory, from the parent's spawn of the process (so interpreter start-up counts) to the first
    non-empty text of `ferrum_jax.stream(model, PROMPT, max_tokens=128)`; split into interpreter
    start, `import ferrum_jax`, `load(...)`, and stream start -> first text (prefill compile + run).
    The first cold process goes on to the end of the stream, so its cache directory then holds every
    program a run needs (load-time, prefill and decode); the others stop at the first text;
  * time to first token, warm: the same in a fresh process whose persistent compilation cache
    (`compile_log.enable_persistent_cache(dir)`) was filled by the first cold run;
  * in-process, after one unmeasured warm-up run: greedy generation of exactly 128 new tokens from
    the tokenized prompt (a `Generation` whose stop ids are all cleared, so EOS cannot end it early;
    the token count is checked), median of 3 runs, of `Stats.decode_tokens_per_second` (127 decode
    steps: the first token comes from prefill), `Stats.prefill_tokens_per_second` and the wall time
    from the start of the run to its first token. Compilations and jit traces during every timed run
    are counted (jax.monitoring events, as `compile_log.count_compiles`, plus `Stats.compiles`) and
    recorded; expected 0.

llama.cpp: the figures of bench/results/llamacpp_cpu_<model>.json (same prompt text, 128 decode
tokens, median of 3 after a warm-up, measured earlier on this machine) are copied next to ours,
and, unless --no-llamacpp, llama.cpp is also re-run in this run (a subprocess calling
bench/llamacpp_cpu.py's `bench`) and the ratios ours / llama.cpp use that same-run measurement.
The llamacpp_cpu_*.json files are not rewritten.

The machine may be shared: the load average, and the CPU time other processes used during each
timed phase (from /proc/stat, minus our own), are recorded; --wait-idle waits (up to the given
seconds) for the 1-minute load average to drop below --idle-below (0.5) before starting.

Writes bench/results/cpu_<model>.json (cpu_<model>_<tag>.json with --tag) and prints a table. Not run by CI. From the repo root:

    python bench/cpu_decode.py                    # both models, both layouts, llama.cpp re-run
    python bench/cpu_decode.py smollm2-135m --layouts dequantized --no-llamacpp
"""

import time

_T_MODULE = time.time()  # the first thing a child process does (before importing ferrum_jax)

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
COMMAND = "python bench/cpu_decode.py"

MODELS = ["smollm2-135m", "gemma3-270m"]
# layout -> load(alias, **kwargs). "dequantized-bf16" is extra (not run by default): the same dense
# weights in bfloat16, half the bytes per decode step.
LAYOUTS = {"dequantized": {}, "packed": {"dequantize": False}, "dequantized-bf16": {"dtype": "bfloat16"}}
DEFAULT_LAYOUTS = ["dequantized", "packed"]
MAX_TOKENS = 128
RUNS = 3
TTFT_RUNS = 3
STREAM_CHUNK = 4  # stream()'s default


class CompileCounter:
    """Counts XLA compilations and jit traces while active, from the same jax.monitoring events as
    `ferrum_jax.compile_log.count_compiles`. The bench uses its own listener because count_compiles
    cannot be nested: `_ACTIVE.remove(log)` removes the first *equal* CompileLog (a dataclass, compared
    by value), so an inner block (Generation._timed) can remove the outer one, which then stops
    counting and its own exit can raise ValueError."""

    _active: ClassVar[list] = []
    _installed: ClassVar[bool] = False

    def __init__(self):
        self.compiles = self.traces = 0

    @classmethod
    def _listener(cls, event: str, duration: float, **_) -> None:
        for c in cls._active:
            if event == "/jax/core/compile/backend_compile_duration":
                c.compiles += 1
            elif event == "/jax/core/compile/jaxpr_trace_duration":
                c.traces += 1

    def __enter__(self):
        if not CompileCounter._installed:
            import jax

            jax.monitoring.register_event_duration_secs_listener(CompileCounter._listener)
            CompileCounter._installed = True
        CompileCounter._active.append(self)
        return self

    def __exit__(self, *exc):
        CompileCounter._active[:] = [c for c in CompileCounter._active if c is not self]
        return False


def _llamacpp_module():
    spec = importlib.util.spec_from_file_location("llamacpp_cpu", HERE / "llamacpp_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # stdlib imports only at module level
    return mod


# ---------------------------------------------------------------------------------------------
# Child process: cold / warm time to first token


def child_ttft(model: str, layout: str, cache_dir: str, to_end: str) -> None:
    t_start = time.time()
    import jax

    import ferrum_jax as fj
    from ferrum_jax.compile_log import enable_persistent_cache

    t_import = time.time()
    enable_persistent_cache(cache_dir)
    events: dict[str, int] = {}
    jax.monitoring.register_event_listener(lambda e, **_: events.__setitem__(e, events.get(e, 0) + 1))

    with CompileCounter() as load_log:
        m = fj.load(model, **LAYOUTS[layout], progress=False)
    t_load = time.time()
    prompt = _llamacpp_module().PROMPT
    t_first = completion = None
    gen = fj.stream(m, prompt, max_tokens=MAX_TOKENS, chunk=STREAM_CHUNK)
    with CompileCounter() as gen_log:
        try:
            while True:
                text = next(gen)
                if text and t_first is None:
                    t_first = time.time()
                    if to_end != "1":
                        raise StopIteration(None)
        except StopIteration as stop:
            completion = stop.value
    t_end = time.time()
    s = completion.stats if completion is not None else None  # None: stopped at the first text
    out = {
        "t_module": _T_MODULE, "t_start": t_start, "t_import": t_import, "t_load": t_load,
        "t_first_text": t_first, "t_end": t_end if to_end == "1" else None,
        "generated_tokens": s.generated_tokens if s else None,
        "finish_reason": completion.finish_reason if s else None,
        "load_compiles": load_log.compiles,
        "generate_compiles": gen_log.compiles, "generate_traces": gen_log.traces,
        "generate_compile_seconds": s.compile_seconds if s else None,
        "cache_events": {k.rsplit("/", 1)[-1]: v for k, v in events.items() if "compilation_cache" in k},
        "weights_bytes": m.nbytes, "dtype": str(m.dtype),
    }
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------
# Machine load


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _machine_busy_seconds() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuMeter:
    """Wall time, our CPU time (with waited-for children) and the CPU time of everything else."""

    def __enter__(self):
        self.load_start = loadavg()
        self.wall, self.own, self.busy = time.perf_counter(), _own_cpu_seconds(), _machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        own = _own_cpu_seconds() - self.own
        busy = _machine_busy_seconds() - self.busy
        self.result = {
            "wall_s": round(wall, 3),
            "own_cpu_cores": round(own / wall, 2) if wall else None,  # average cores we kept busy
            "other_cpu_cores": round(max(busy - own, 0.0) / wall, 2) if wall else None,
            "loadavg_start": self.load_start,
            "loadavg_end": loadavg(),
        }
        return False


def wait_idle(max_seconds: float, threshold: float = 0.5) -> dict:
    start = time.time()
    while loadavg() and loadavg()[0] >= threshold and time.time() - start < max_seconds:
        time.sleep(10)
    return {"waited_s": round(time.time() - start, 1), "loadavg": loadavg(), "threshold": threshold}


# ---------------------------------------------------------------------------------------------
# Parent: the measurements


def run_ttft_child(model: str, layout: str, cache_dir: str, to_end: bool) -> dict:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-ttft", model, layout, cache_dir, str(int(to_end))]
    t_spawn = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"TTFT child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    return {
        "ttft_from_spawn_s": r["t_first_text"] - t_spawn,
        "ttft_from_script_start_s": r["t_first_text"] - r["t_start"],  # before `import ferrum_jax`
        "interpreter_start_s": r["t_module"] - t_spawn,
        "import_s": r["t_import"] - r["t_start"],
        "load_s": r["t_load"] - r["t_import"],
        "first_token_s": r["t_first_text"] - r["t_load"],  # stream() start -> first text
        "total_to_end_s": r["t_end"] - t_spawn if r["t_end"] else None,  # only the cache-filling run
        "generated_tokens": r["generated_tokens"],
        "finish_reason": r["finish_reason"],
        "load_compiles": r["load_compiles"],
        "generate_compiles": r["generate_compiles"],
        "generate_compile_seconds": r["generate_compile_seconds"],
        "cache_events": r["cache_events"],
        "cache_files_after": sum(1 for p in Path(cache_dir).rglob("*") if p.is_file()),
    }


def ttft(model: str, layout: str, runs: int) -> dict:
    dirs = []
    try:
        cold, warm = [], []
        with CpuMeter() as meter:
            for i in range(runs):
                d = tempfile.mkdtemp(prefix=f"ferrum-xla-cold-{model}-")
                dirs.append(d)
                cold.append(run_ttft_child(model, layout, d, to_end=i == 0))
                print(f"  [{model}/{layout}] cold {i}: first text {cold[-1]['ttft_from_spawn_s']:.2f} s after "
                      f"spawn (import {cold[-1]['import_s']:.2f}, load {cold[-1]['load_s']:.2f}, "
                      f"first token {cold[-1]['first_token_s']:.2f})", file=sys.stderr)
            filled = dirs[0]
            files_filled = sum(1 for p in Path(filled).rglob("*") if p.is_file())
            for i in range(runs):
                warm.append(run_ttft_child(model, layout, filled, to_end=False))
                print(f"  [{model}/{layout}] warm {i}: first text {warm[-1]['ttft_from_spawn_s']:.2f} s after "
                      f"spawn (import {warm[-1]['import_s']:.2f}, load {warm[-1]['load_s']:.2f}, "
                      f"first token {warm[-1]['first_token_s']:.2f})", file=sys.stderr)
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    def summary(rs):
        keys = ["ttft_from_spawn_s", "ttft_from_script_start_s", "interpreter_start_s", "import_s", "load_s",
                "first_token_s"]
        return {f"median_{k}": round(statistics.median(r[k] for r in rs), 3) for k in keys}

    return {
        "cold": {"protocol": "fresh process, persistent compilation cache pointed at a new empty directory",
                 **summary(cold), "runs": cold},
        "warm": {"protocol": "fresh process, persistent compilation cache filled by cold run 0 "
                             f"({files_filled} files)", **summary(warm), "runs": warm},
        "machine_during": meter.result,
    }


def decode_bench(model_name: str, layout: str, runs: int) -> dict:
    import ferrum_jax as fj
    from ferrum_jax.generate import Generation

    prompt = _llamacpp_module().PROMPT
    t = time.perf_counter()
    with CompileCounter() as load_log:
        m = fj.load(model_name, **LAYOUTS[layout], progress=False)
    load_s = time.perf_counter() - t
    ids = m.tokenizer.encode(prompt)

    def one_run() -> dict:
        run = Generation(m, [ids], max_tokens=MAX_TOKENS, sampling=fj.GREEDY, chat=False, stop_token_ids=(),
                         capacity=None, chunk=None)
        run.stop_ids[:] = -1  # no stop token: exactly MAX_TOKENS are generated (same shape: no recompile)
        generated = []
        with CompileCounter() as log:
            t0 = time.perf_counter()
            it = iter(run)
            first = next(it)[0]
            t_first = time.perf_counter() - t0
            generated.extend(first)
            for (new,) in it:
                generated.extend(new)
            wall = time.perf_counter() - t0
        s = run.stats
        return {
            "generated_tokens": s.generated_tokens,
            "decoded_tokens": s.generated_tokens - s.rows,
            "ttft_ms": t_first * 1e3,
            "prefill_s": s.prefill_seconds,
            "prefill_tok_s": s.prefill_tokens_per_second,
            "decode_s": s.decode_seconds,
            "decode_tok_s": s.decode_tokens_per_second,
            "wall_s": wall,
            "compiles": log.compiles,
            "traces": log.traces,
            "stats_compiles": s.compiles,  # Generation's own count (compile_log.count_compiles in _timed)
            "compile_seconds": s.compile_seconds,
            "dispatch": dict(s.dispatch),
            "_tokens": generated,
        }

    warm = one_run()
    timed = []
    with CpuMeter() as meter:
        for i in range(runs):
            timed.append(one_run())
            r = timed[-1]
            print(f"  [{model_name}/{layout}] run {i}: {r['generated_tokens']} tokens, TTFT {r['ttft_ms']:.0f} ms, "
                  f"prefill {r['prefill_tok_s']:.0f} tok/s, decode {r['decode_tok_s']:.2f} tok/s, "
                  f"compiles {r['compiles']}", file=sys.stderr)
    dispatch = timed[-1]["dispatch"]
    for r in [warm, *timed]:
        r.pop("dispatch")
    tokens = [r.pop("_tokens") for r in timed]
    warm_tokens = warm.pop("_tokens")
    bad = [r for r in timed if r["generated_tokens"] != MAX_TOKENS]
    if bad:
        raise RuntimeError(f"{model_name}/{layout}: expected {MAX_TOKENS} tokens, got {bad[0]['generated_tokens']}")

    def med(k):
        return statistics.median(r[k] for r in timed)

    return {
        "load_s": round(load_s, 3),
        "load_compiles": load_log.compiles,
        "dtype": str(m.dtype),
        "weights_bytes": m.nbytes,
        "dispatch": dispatch,
        "prompt_tokens": len(ids),
        "prompt_token_ids": ids,
        "generated_tokens": MAX_TOKENS,
        "decoded_tokens": timed[0]["decoded_tokens"],
        "ttft_ms": round(med("ttft_ms"), 2),
        "prefill_tok_s": round(med("prefill_tok_s"), 2),
        "decode_tok_s": round(med("decode_tok_s"), 3),
        "decode_ms_per_token": round(1e3 / med("decode_tok_s"), 3),
        "compiles_during_timed_runs": sum(r["compiles"] for r in timed),
        "traces_during_timed_runs": sum(r["traces"] for r in timed),
        "no_compilation_in_timed_runs": all(r["compiles"] == r["traces"] == r["stats_compiles"] == 0 for r in timed),
        "compile_check": "jax.monitoring compile/trace events around each timed run (CompileCounter) and "
                         "Stats.compiles",
        "same_tokens_every_run": all(t == warm_tokens for t in tokens),
        "text_sample": m.tokenizer.decode(warm_tokens)[:300],
        "warmup_run": warm,
        "runs": timed,
        "machine_during": meter.result,
    }


def llamacpp_same_run(model: str) -> dict:
    code = ("import importlib.util, json, sys; import llama_cpp;"
            f"spec = importlib.util.spec_from_file_location('llamacpp_cpu', {str(HERE / 'llamacpp_cpu.py')!r});"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod);"
            f"print('RESULT ' + json.dumps(mod.bench({model!r}, llama_cpp)))")
    with CpuMeter() as meter:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    r = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    r["machine_during"] = meter.result
    return r


def _llamacpp_summary(r: dict) -> dict:
    return {k: r[k] for k in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "decode_ms_per_token", "load_s",
                              "timestamp_utc") if k in r} | {
        "prompt_tokens": r["settings"]["prompt_tokens"], "decode_tokens": r["settings"]["decode_tokens"],
        "llama_cpp_python_version": r.get("llama_cpp_python_version"),
        "decode_tok_s_runs": [round(x["decode_tok_s"], 3) for x in r.get("runs", [])],
        "machine_during": r.get("machine_during")}


def git_info() -> dict:
    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True,
                              text=True, check=False).stdout

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    ours = [f for f in changed if f.startswith("bench/results/cpu_")]  # what this script (re)writes
    others = [f for f in changed if f not in ours]
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(others),
            "modified_tracked_files": others, "modified_own_result_files": ours,
            "note": "taken when the benchmark started; 'dirty' ignores bench/results/cpu_*.json"}


def bench_model(name: str, layouts: list[str], args, common: dict) -> dict:
    import jax
    import jaxlib

    from ferrum_jax.aliases import resolve

    lc = _llamacpp_module()
    path = resolve(name)
    load_start = loadavg()
    print(f"[{name}] {path.name}", file=sys.stderr)

    llama_same = None
    if not args.no_llamacpp:
        print(f"[{name}] llama.cpp (same run)", file=sys.stderr)
        llama_same = llamacpp_same_run(name)
    earlier_path = RESULTS / f"llamacpp_cpu_{name}.json"
    llama_earlier = json.loads(earlier_path.read_text()) if earlier_path.is_file() else None
    if llama_same:
        ref, ref_source = llama_same, "same run (bench/llamacpp_cpu.py's bench(), in a subprocess)"
    else:
        stamp = llama_earlier["timestamp_utc"] if llama_earlier else "missing"
        ref, ref_source = llama_earlier, f"earlier: {earlier_path.relative_to(ROOT)} ({stamp})"

    configs = {}
    for layout in layouts:
        kw = ", ".join(f"{k}={v!r}" for k, v in LAYOUTS[layout].items())
        c = {"load": f"load(alias{', ' if kw else ''}{kw})"}
        if args.ttft_runs > 0:
            print(f"[{name}/{layout}] time to first token, {args.ttft_runs} cold + {args.ttft_runs} warm processes",
                  file=sys.stderr)
            c["time_to_first_token"] = ttft(name, layout, args.ttft_runs)
        print(f"[{name}/{layout}] decode, 1 warm-up + {args.runs} runs", file=sys.stderr)
        c["in_process"] = decode_bench(name, layout, args.runs)
        if ref:
            ip = c["in_process"]
            c["ratio_to_llamacpp"] = {
                "decode_tok_s": round(ip["decode_tok_s"] / ref["decode_tok_s"], 3),
                "prefill_tok_s": round(ip["prefill_tok_s"] / ref["prefill_tok_s"], 3),
                "ttft_warm_in_process": round(ip["ttft_ms"] / ref["ttft_ms"], 3),
            }
        goals = {"decode_at_least_half_of_llamacpp": (c["ratio_to_llamacpp"]["decode_tok_s"] >= 0.5) if ref else None}
        if "time_to_first_token" in c:
            goals["cold_first_token_under_10_s"] = c["time_to_first_token"]["cold"]["median_ttft_from_spawn_s"] < 10
        c["aims"] = goals
        configs[layout] = c

    ip0 = next(iter(configs.values()))["in_process"]
    if ref and ref["settings"]["prompt_tokens"] != ip0["prompt_tokens"]:
        print(f"WARNING: prompt is {ip0['prompt_tokens']} tokens here, {ref['settings']['prompt_tokens']} for "
              "llama.cpp", file=sys.stderr)
    return {
        "benchmark": "ferrum-jax CPU decode / time to first token, next to llama.cpp",
        "command": " ".join([COMMAND, *sys.argv[1:]]),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **common,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "model": {"name": name, "file": path.name, "sha256": lc.sha256_file(str(path)),
                  "size_bytes": path.stat().st_size},
        "settings": {
            "prompt": lc.PROMPT,
            "prompt_tokens": ip0["prompt_tokens"],
            "max_tokens": MAX_TOKENS,
            "decoded_tokens_per_run": ip0["decoded_tokens"],
            "sampling": "greedy",
            "stop_tokens": "none (Generation.stop_ids cleared) for the in-process runs; the tokenizer's EOS "
                           "ids for the stream() of the TTFT processes",
            "dtype": {layout: c["in_process"]["dtype"] for layout, c in configs.items()},
            "runs": args.runs,
            "warmup_runs": 1,
            "ttft_runs_each": args.ttft_runs,
            "stream_chunk": STREAM_CHUNK,
            "statistic": "median over runs",
            "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
            "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
        },
        "configs": configs,
        "llamacpp": {
            "ratios_use": ref_source,
            "same_run": _llamacpp_summary(llama_same) if llama_same else None,
            "earlier": ({"file": str(earlier_path.relative_to(ROOT)), **_llamacpp_summary(llama_earlier)}
                        if llama_earlier else None),
            "note": "the 'earlier' figures were measured before this run on this machine (same protocol), "
                    "not in the same run",
        },
        "loadavg_model_start": load_start,
        "loadavg_model_end": loadavg(),
    }


def table(results: list[dict]) -> str:
    cols = [("model", 13), ("weights", 16), ("cold TTFT s", 11), ("warm TTFT s", 11), ("TTFT ms", 8),
            ("prefill t/s", 11), ("decode t/s", 10), ("llama.cpp t/s", 13), ("ratio", 6), ("others' cores", 13)]
    lines = [" ".join(f"{n:>{w}}" if i > 1 else f"{n:<{w}}" for i, (n, w) in enumerate(cols))]
    for r in results:
        lc = r["llamacpp"]
        ref = lc["same_run"] or lc["earlier"]
        for layout, c in r["configs"].items():
            ip, t = c["in_process"], c.get("time_to_first_token")
            cells = [r["model"]["name"], layout,
                     f"{t['cold']['median_ttft_from_spawn_s']:.2f}" if t else "-",
                     f"{t['warm']['median_ttft_from_spawn_s']:.2f}" if t else "-",
                     f"{ip['ttft_ms']:.0f}", f"{ip['prefill_tok_s']:.0f}", f"{ip['decode_tok_s']:.2f}",
                     f"{ref['decode_tok_s']:.2f}" if ref else "-",
                     f"{c['ratio_to_llamacpp']['decode_tok_s']:.3f}" if "ratio_to_llamacpp" in c else "-",
                     f"{ip['machine_during']['other_cpu_cores']:.2f}"]
            lines.append(" ".join(f"{x:>{w}}" if i > 1 else f"{x:<{w}}" for i, (x, (_, w)) in enumerate(zip(cells, cols))))
        if ref:
            lines.append(f"{'':<13} {'llama.cpp':<16} {'':>11} {'':>11} {ref['ttft_ms']:>8.0f} {ref['prefill_tok_s']:>11.0f} "
                         f"{ref['decode_tok_s']:>10.2f}  ({'same run' if lc['same_run'] else 'earlier'}"
                         + (f"; earlier: {lc['earlier']['decode_tok_s']:.2f} t/s)" if lc["same_run"] and lc["earlier"]
                            else ")"))
    lines.append("TTFT s: spawn of a fresh process -> first streamed text (cold: empty compilation cache; warm: "
                 "filled). TTFT ms: in-process, warmed up. others' cores: CPU used by other processes during "
                 "the timed decode runs.")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-ttft":
        child_ttft(*sys.argv[2:6])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help=f"default: {' '.join(MODELS)}")
    p.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS, choices=list(LAYOUTS))
    p.add_argument("--runs", type=int, default=RUNS)
    p.add_argument("--ttft-runs", type=int, default=TTFT_RUNS, help="cold and warm processes each (0: skip)")
    p.add_argument("--no-llamacpp", action="store_true", help="don't re-run llama.cpp; use the earlier JSON")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for the 1-minute load average to fall below --idle-below")
    p.add_argument("--idle-below", type=float, default=0.5, metavar="LOAD")
    p.add_argument("--tag", default="", help="write cpu_<model>_<tag>.json instead (e.g. for extra layouts)")
    args = p.parse_args()
    models = args.models or MODELS
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")

    idle = wait_idle(args.wait_idle, args.idle_below) if args.wait_idle > 0 else None
    lc = _llamacpp_module()
    common = {
        "machine": lc.machine_info(),
        "git": git_info(),
        "loadavg_bench_start": loadavg(),
        "wait_idle": idle,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = []
    for name in models:
        r = bench_model(name, args.layouts, args, common)
        r["loadavg_bench_end_of_this_model"] = loadavg()
        out = RESULTS / f"cpu_{name}{'_' + args.tag if args.tag else ''}.json"
        out.write_text(json.dumps(r, indent=2) + "\n")
        print(f"[{name}] -> {out.relative_to(ROOT)}", file=sys.stderr)
        results.append(r)
    print(table(results))
    print(f"load average at start {common['loadavg_bench_start']}, at end {loadavg()}")


if __name__ == "__main__":
    main()
