"""y = x @ w^T (+ bias) for a few rows of x (decode) and a dense [N, K] weight: a GEMV kernel.

At batch 1 a linear layer is a stream of its weight bytes. XLA runs it as cuBLAS, a Triton GEMM
or a reduce fusion, chosen by its autotuner; for weights that fit the L2 (the ~20 MB projections
of an MoE model's attention) the autotuner measures its candidates L2-warm and can pick one that
runs at half the bandwidth in the model, where the weight comes from HBM (Qwen3-30B-A3B's qkv on an
H200: 7.6 us with cuBLAS, 11.9-13.3 us with the Triton GEMM it picked in some compiles).

Grid (N / block_n, rows): program (j, i) streams rows [j*block_n, (j+1)*block_n) of w (each row K
contiguous inputs) in block_k steps against x's row i: elementwise float32 FMAs into a
[block_n, block_k] accumulator, reduced along the row once at the end. The steps are unrolled (static), so every tile's load can be in flight at
once (Triton pipelines only loads that feed a tensor-core dot; a loop would wait on each load).
A second row of x re-reads the weight, mostly from L2: the kernel is for rows <= MAX_ROWS.

`reference` is `ferrum_jax.ops.linear`.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ferrum_jax import ops as ref_ops

MAX_ROWS = 4
MAX_UNROLL = 16  # loads per program; a wider K takes a wider block_k (compile time)
FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    # H200, with the accumulator reduced once at the end: bench/gemv.py's sweep (bench/results/
    # gemv_bench_*) and the model agree on (4, 1024, 4) for Qwen3-30B-A3B's qkv (in a decode
    # profile: 7.2 us; 8.9 with (8, 512, 8), 8.2 with (4, 512, 4) or (8, 1024, 4)).
    block_n: int = 4  # weight rows (outputs) per program
    block_k: int = 1024  # inputs per load
    num_warps: int = 4


def _fit(dim: int, want: int) -> int:
    """The largest power of two <= want dividing dim (>= 1)."""
    v = want
    while v > 1 and dim % v:
        v //= 2
    return v


def choose_config(n: int, k: int, config: GemvConfig | None = None) -> GemvConfig:
    """`config` (default GemvConfig()) with its tiles cut down to divide [N, K], and block_k grown
    where more than MAX_UNROLL loads would cover K."""
    c = config or GemvConfig()
    bk = _fit(k, c.block_k)
    while k // bk > MAX_UNROLL and k % (2 * bk) == 0:
        bk *= 2
    return dataclasses.replace(c, block_n=_fit(n, c.block_n), block_k=bk)


def unsupported(x, w, bias=None) -> str | None:
    """None if `gemv` takes these arguments, else why not."""
    if not isinstance(w, jax.Array) or w.ndim != 2:
        return f"weight is {type(w).__name__} {getattr(w, 'shape', '')}, not a dense [N, K] array"
    n, k = w.shape
    if x.shape[-1] != k:
        return f"x features {x.shape[-1]} != weight inputs {k}"
    rows = x.size // max(k, 1)
    if rows == 0 or rows > MAX_ROWS:
        return f"{rows} rows of x (the GEMV takes 1..{MAX_ROWS})"
    if x.dtype not in FLOATS or w.dtype != x.dtype:
        return f"dtypes x {x.dtype} / weight {w.dtype} (one float dtype)"
    if bias is not None and bias.shape != (n,):
        return f"bias shape {bias.shape} != ({n},)"
    if k % 16 or n % 8:
        return f"weight [{n}, {k}]: N a multiple of 8 and K of 16"
    if w.size >= 2**31:
        return f"a weight of {w.size} elements (32-bit indexing)"
    return None


def _gemv_kernel(x_ref, w_ref, *rest, block_k: int, steps: int):
    b_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    j, i = pl.program_id(0), pl.program_id(1)
    (bn,) = o_ref.shape
    n0 = pl.multiple_of(j * bn, bn)
    # Products accumulate elementwise across the steps and are reduced along the row once at the
    # end: a reduction per step costs shuffles and a shared-memory round trip between the loads.
    acc = jnp.zeros((bn, block_k), jnp.float32)
    for t in range(steps):  # unrolled: all the program's weight loads in flight together
        xv = x_ref[i, pl.ds(t * block_k, block_k)].astype(jnp.float32)[None, :]
        w = w_ref[pl.ds(n0, bn), pl.ds(t * block_k, block_k)].astype(jnp.float32)
        acc = acc + w * xv
    y = jnp.sum(acc, axis=1).astype(o_ref.dtype)
    if b_ref is not None:  # as the reference: the bias added in the output dtype
        y = y + b_ref[pl.ds(n0, bn)].astype(o_ref.dtype)
    o_ref[...] = y


@partial(jax.jit, static_argnames=("config", "interpret"))
def gemv(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *, config: GemvConfig | None = None,
         interpret: bool = False) -> jax.Array:
    """x [..., K] (at most MAX_ROWS rows) @ w [N, K]^T (+ bias [N]) -> [..., N] in x's dtype."""
    reason = unsupported(x, w, bias)
    if reason is not None:
        raise ValueError(f"gemv: {reason}")
    n, k = w.shape
    cfg = choose_config(n, k, config)
    bn, bk = cfg.block_n, cfg.block_k
    xs = x.reshape(-1, k)
    whole = lambda a: pl.BlockSpec(a.shape, lambda j, i: (0,) * a.ndim)  # noqa: E731
    args = [xs, w] + ([bias] if bias is not None else [])
    params = {} if interpret else {"compiler_params": _triton_params(cfg.num_warps)}
    y = pl.pallas_call(
        partial(_gemv_kernel, block_k=bk, steps=k // bk),
        grid=(n // bn, xs.shape[0]),
        in_specs=[whole(a) for a in args],
        out_specs=pl.BlockSpec((None, bn), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((xs.shape[0], n), x.dtype),
        interpret=interpret,
        name="gemv",
        **params,
    )(*args)
    return y.reshape(*x.shape[:-1], n)


def _triton_params(num_warps: int):
    from jax.experimental.pallas import triton as pl_triton
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)


reference = ref_ops.linear

__all__ = ["GemvConfig", "MAX_ROWS", "choose_config", "gemv", "reference", "unsupported"]
