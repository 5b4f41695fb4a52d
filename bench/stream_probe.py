"""Where does a Triton GEMV's time go? Three minimal kernels over uint8 [N, K/2] codes, M = 1:
  load   acc += bytes                          (streaming only)
  unpack acc += nibble * x (both nibbles)      (+ unpack, exponent-trick convert, FMA with x)
  group  unpack * per-group scale (broadcast from a [BN, ng, 16] tile)
Prints the fraction of the copy bandwidth for each, per block config."""
import itertools
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ferrum_jax.bench.ceilings import device_ceilings  # noqa: E402


def kernel(x_ref, w_ref, s_ref, o_ref, *, mode, bn, bkh, steps, evict, prefetch=0):
    base = pl.program_id(1) * steps * bkh

    def load(t):
        c0 = pl.multiple_of(base + jnp.minimum(t, steps - 1) * bkh, bkh)
        if evict:
            return plt.load(w_ref.at[:, pl.ds(c0, bkh)], eviction_policy="evict_first")
        return w_ref[:, pl.ds(c0, bkh)]

    def compute(t, b, acc):
        c0 = pl.multiple_of(base + t * bkh, bkh)
        if mode == "load":
            return acc + b.astype(jnp.float32)
        lo = lax.bitcast_convert_type((b & 15) | 0x4B000000, jnp.float32) - 8388608.0
        hi = lax.bitcast_convert_type((b >> 4) | 0x4B000000, jnp.float32) - 8388608.0
        xl = x_ref[0, pl.ds(c0, bkh)][None, :]
        xh = x_ref[1, pl.ds(c0, bkh)][None, :]
        return acc + lo * xl + hi * xh

    zero = jnp.zeros((bn, bkh), jnp.float32)
    if prefetch:  # software pipelining by hand: tile t + 1 is requested before tile t is used
        def pstep(t, carry):
            acc, cur = carry
            nxt = load(t + 1)
            return compute(t, cur.astype(jnp.int32), acc), nxt

        acc = lax.fori_loop(0, steps, pstep, (zero, load(0)))[0]
    else:
        acc = lax.fori_loop(0, steps, lambda t, acc: compute(t, load(t).astype(jnp.int32), acc), zero)
    o_ref[0, :] = jnp.sum(acc, axis=1)


def run(mode, x, w, s, bn, bkh, split, warps, stages, evict, prefetch=0):
    n, kh = w.shape
    steps = kh // (bkh * split)
    out = pl.pallas_call(
        partial(kernel, mode=mode, bn=bn, bkh=bkh, steps=steps, evict=evict, prefetch=prefetch),
        out_shape=jax.ShapeDtypeStruct((split, n), jnp.float32), grid=(n // bn, split),
        in_specs=[pl.BlockSpec(x.shape, lambda i, j: (0, 0)), pl.BlockSpec((bn, kh), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, s.shape[1]), lambda i, j: (i, 0))],
        out_specs=pl.BlockSpec((1, bn), lambda i, j: (j, i)),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages))(x, w, s)
    return out.sum(0)


def main():
    bw = device_ceilings(reps=5)["copy_bandwidth_bytes_per_s"]
    n, k = 14336, 4096
    copies = 16
    key = jax.random.PRNGKey(0)
    ws = [jax.random.randint(jax.random.fold_in(key, i), (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8) for i in range(copies)]
    ss = [jax.random.uniform(key, (n, k // 32), jnp.float32).astype(jnp.float16) for _ in range(copies)]
    x = jax.random.normal(key, (2, k // 2), jnp.float32)
    nbytes = n * k // 2 + n * k // 32 * 2
    print(f"copy {bw / 1e12:.2f} TB/s; {n}x{k} 4-bit ({nbytes / 1e6:.1f} MB) x {copies} copies", flush=True)
    for mode, prefetch, bn, bkh, split, warps in itertools.product(
            ["load", "unpack"], [0, 1], [8, 16], [256, 512], [1, 2, 4], [2, 4]):
        stages, evict = 1 if prefetch else 3, True
        f = jax.jit(lambda x, ws, ss: tuple(run(mode, x, w, s, bn, bkh, split, warps, stages, evict, prefetch)
                                            for w, s in zip(ws, ss)))
        try:
            jax.block_until_ready(f(x, ws, ss))
        except Exception as e:  # noqa: BLE001
            print(mode, bn, bkh, split, "FAILED", str(e)[:100]); continue
        times = []
        for _ in range(5):
            t0 = time.perf_counter(); outs = [f(x, ws, ss) for _ in range(3)]; jax.block_until_ready(outs)
            times.append((time.perf_counter() - t0) / 3 / copies)
        t = statistics.median(times)
        print(f"{mode:6s} prefetch={prefetch} bn={bn:3d} bkh={bkh:4d} split={split} warps={warps} {t * 1e6:7.1f} us {nbytes / t / bw:6.1%}", flush=True)


main()
