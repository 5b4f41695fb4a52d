"""Does XLA's own int4 support make a fast weight-only-quantized GEMV? jnp.int4 / uint4 weights
with per-group or per-channel scales, dequantized inside the jitted matmul (XLA fuses the
conversion into its GEMM), at M = 1 and 8. Fractions of the copy bandwidth for the packed bytes."""
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ferrum_jax.bench.ceilings import device_ceilings  # noqa: E402


def timed(f, *args, inner=5, reps=7):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = [f(*args) for _ in range(inner)]
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / inner)
    return statistics.median(ts)


def main():
    bw = device_ceilings(reps=5)["copy_bandwidth_bytes_per_s"]
    print(f"copy {bw / 1e12:.2f} TB/s")
    key = jax.random.PRNGKey(0)
    G = 128
    variants = {
        "int4 per-channel (scale after dot)": lambda x, w, s, z: (x @ w.astype(x.dtype).T) * s[:, 0],
        "int4 group-128 scales": lambda x, w, s, z: x @ (w.astype(x.dtype).reshape(w.shape[0], -1, G)
                                                          * s[:, :, None]).reshape(w.shape).T,
        "uint4 group-128 scale+zero": lambda x, w, s, z: x @ ((w.astype(x.dtype).reshape(w.shape[0], -1, G) - z[:, :, None])
                                                               * s[:, :, None]).reshape(w.shape).T,
        "int8 group-128 scales": None,
    }
    for n, k in [(14336, 4096), (4096, 4096), (4096, 14336)]:
        copies = max(1, (400 << 20) // (n * k // 2))
        for name, fn in variants.items():
            dt = jnp.int8 if name.startswith("int8") else (jnp.uint4 if name.startswith("uint4") else jnp.int4)
            if fn is None:
                fn = variants["int4 group-128 scales"]
            lo, hi = (0, 16) if dt == jnp.uint4 else ((-8, 8) if dt == jnp.int4 else (-128, 128))
            ws = [jax.random.randint(jax.random.fold_in(key, i), (n, k), lo, hi, jnp.int32).astype(dt) for i in range(copies)]
            s = jax.random.uniform(key, (n, k // G), jnp.bfloat16, 1e-3, 1e-2)
            z = jax.random.randint(key, (n, k // G), 0, 16, jnp.int32).astype(jnp.bfloat16)
            nbytes = n * k * (1 if dt == jnp.int8 else 0.5) + n * k // G * (4 if dt == jnp.uint4 else 2)
            for m in (1, 8):
                x = jax.random.normal(key, (m, k), jnp.bfloat16)
                prog = jax.jit(lambda x, ws, s, z: tuple(fn(x, w, s, z) for w in ws))
                try:
                    t = timed(prog, x, ws, s, z) / copies
                except Exception as e:  # noqa: BLE001
                    print(f"{n}x{k} {name} M={m}: FAILED {str(e)[:120]}")
                    continue
                print(f"{n}x{k} {name:36s} M={m}: {t * 1e6:7.1f} us {nbytes / t / bw:6.1%}", flush=True)
            del ws


main()
