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

The package, one concern per file: config (defaults, BenchConfig), ceilings (copy bandwidth,
matmul rate, free device memory), weights (random packed weights, their bytes), flops (FLOPs
and bytes of the work), sweeps (the timed decode and prefill points), compile_cache (cold vs warm
compiles in fresh processes), peer (the PyTorch subprocess), report (JSON, table, plots), run
(`run_bench`) and cli (the flags, `main`).

See docs/bench.md for what every number means.
"""

from ferrum_jax.bench.ceilings import MEMORY_HEADROOM, device_ceilings, memory_stats
from ferrum_jax.bench.cli import add_arguments, config_from_args, main, run_from_args
from ferrum_jax.bench.compile_cache import compile_cache_check
from ferrum_jax.bench.config import (
                                     COMPILE_CHECK_RESERVE,
                                     DEFAULT_BATCHES,
                                     DEFAULT_CONTEXTS,
                                     DEFAULT_OUT,
                                     DEFAULT_PEER_BUDGET,
                                     DEFAULT_PEER_SCRIPTS,
                                     DEFAULT_PREFILL,
                                     DEFAULT_RUNS,
                                     DEFAULT_STEPS,
                                     DEFAULT_TIME_BUDGET,
                                     PROMPT_MARGIN,
                                     REPO,
                                     BenchConfig,
)
from ferrum_jax.bench.flops import (
                                     attention_flops_decode,
                                     attention_flops_prefill,
                                     decode_flops_per_token,
                                     kv_bytes_at_context,
                                     prefill_flops,
)
from ferrum_jax.bench.peer import default_peer_points, run_peer
from ferrum_jax.bench.report import format_table, plot, result_path, write_json
from ferrum_jax.bench.run import run_bench
from ferrum_jax.bench.sweeps import bench_decode, bench_prefill
from ferrum_jax.bench.weights import (
                                     DENSE_DTYPES,
                                     QUANT_FALLBACKS,
                                     QUANT_SCALES,
                                     decode_weight_bytes,
                                     estimate_weight_bytes,
                                     expected_distinct_experts,
                                     random_gguf_weight,
                                     random_quantized_weights,
                                     weight_stats,
)

__all__ = [
                                     "COMPILE_CHECK_RESERVE",
                                     "DEFAULT_BATCHES",
                                     "DEFAULT_CONTEXTS",
                                     "DEFAULT_OUT",
                                     "DEFAULT_PEER_BUDGET",
                                     "DEFAULT_PEER_SCRIPTS",
                                     "DEFAULT_PREFILL",
                                     "DEFAULT_RUNS",
                                     "DEFAULT_STEPS",
                                     "DEFAULT_TIME_BUDGET",
                                     "DENSE_DTYPES",
                                     "MEMORY_HEADROOM",
                                     "PROMPT_MARGIN",
                                     "QUANT_FALLBACKS",
                                     "QUANT_SCALES",
                                     "REPO",
                                     "BenchConfig",
                                     "add_arguments",
                                     "attention_flops_decode",
                                     "attention_flops_prefill",
                                     "bench_decode",
                                     "bench_prefill",
                                     "compile_cache_check",
                                     "config_from_args",
                                     "decode_flops_per_token",
                                     "decode_weight_bytes",
                                     "default_peer_points",
                                     "device_ceilings",
                                     "estimate_weight_bytes",
                                     "expected_distinct_experts",
                                     "format_table",
                                     "kv_bytes_at_context",
                                     "main",
                                     "memory_stats",
                                     "plot",
                                     "prefill_flops",
                                     "random_gguf_weight",
                                     "random_quantized_weights",
                                     "result_path",
                                     "run_bench",
                                     "run_from_args",
                                     "run_peer",
                                     "weight_stats",
                                     "write_json",
]
