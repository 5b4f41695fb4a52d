"""Partial sums of y = x @ w^T for one row of x, split along K: a split-K GEMV whose reduction is
left to the kernel that consumes y.

At batch 1 a projection is a stream of its weight bytes, and XLA runs the ones with a narrow
output (Llama-3.1-8B's o [4096, 4096], down [4096, 14336]) as a split-K Triton GEMM followed by a
separate kernel that sums the splits (~1.3 us on an H200, mostly launch and latency), after which
the layer's residual add and norm run as a third kernel. This kernel writes the float32 partial
sums [splits, N] and stops there: the norm kernel adds them up as it loads its residual
(`pallas_kernels/norm/add_rms_norm.add_partials_rms_norm`), so the sum costs no kernel of its own.

- Grid (N / block_n, splits): program (j, s) walks K-range s in block_k steps, each a tensor-core
  dot of the [16, block_k] x tile (row 0 the real one, the other rows zero: the dot's minimum M)
  with a [block_n, block_k] weight tile. The loop feeds a dot, so Triton pipelines its loads
  (`num_stages` in flight), which a CUDA-core GEMV cannot get (its loads wait on registers).
  Measured on an H200 (skgemv probe, this file's defaults): Llama-3.1-8B's o 10.5 us against XLA's
  9.97 + 1.23, down 29.1 against 29.0 + 1.4, qkv 14.5 against 14.8 + 1.3.
- `act`: x is [2K] = [gate | up] and the kernel's input is act(gate) * up, rounded to x's dtype
  after each step as `ferrum_jax.ops.Projection.apply` does (the gated MLP's activation, which XLA
  ran as one more kernel, is folded into the down projection's loads).

`reference` is the float32 product of `ferrum_jax.ops.linear`'s input and weight; the partial sums
add up to it (summed in another order).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ferrum_jax import ops as ref_ops

FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # tensor-core operand dtypes
DOT_ROWS = 16  # the smallest M of a tensor-core dot


@dataclasses.dataclass(frozen=True)
class SplitKConfig:
    # H200, Llama-3.1-8B's o and down (skgemv probe sweep of block_n 32-128, block_k 128-256,
    # splits 2-8, 3-4 stages): (128, 256, 4, 4 warps, 3 stages) best or within 0.3 us of it.
    block_n: int = 128
    block_k: int = 256
    splits: int = 4
    num_warps: int = 4
    num_stages: int = 3


def _fit(dim: int, want: int) -> int:
    """The largest power of two <= want dividing dim (>= 1)."""
    v = want
    while v > 1 and dim % v:
        v //= 2
    return v


def choose_config(n: int, k: int, config: SplitKConfig | None = None) -> SplitKConfig:
    """`config` (default SplitKConfig()) with block_n cut down to divide N and block_k, splits to
    divide K (block_k first: no fewer than 16 inputs a step)."""
    c = config or SplitKConfig()
    bn = _fit(n, c.block_n)
    bk = max(16, _fit(k, c.block_k))
    splits = _fit(k // bk, c.splits) if k % bk == 0 else 1
    return dataclasses.replace(c, block_n=bn, block_k=bk, splits=splits)


def unsupported(x, w, act: str | None = None) -> str | None:
    """None if `splitk_gemv` takes these arguments, else why not."""
    if not isinstance(w, (jax.Array, jax.ShapeDtypeStruct)) or w.ndim != 2:  # (shapes: dispatch checks)
        return f"weight is {type(w).__name__} {getattr(w, 'shape', '')}, not a dense [N, K] array"
    n, k = w.shape
    inputs = 2 * k if act is not None else k
    if not hasattr(x, "shape") or x.shape[-1] != inputs:
        return f"x features {getattr(x, 'shape', ('?',))[-1]} != {inputs} (the weight's inputs{', x2: gate | up' if act else ''})"
    if x.size != inputs:
        return f"{x.size // max(inputs, 1)} rows of x (the split-K GEMV takes one)"
    if jnp.dtype(x.dtype) not in FLOATS or w.dtype != x.dtype:
        return f"dtypes x {x.dtype} / weight {w.dtype} (one of bfloat16, float16: a tensor-core dot)"
    if act is not None and act not in ref_ops.ACTIVATIONS:
        return f"activation {act!r} (known: {', '.join(ref_ops.ACTIVATIONS)})"
    if n % 16 or k % 16:
        return f"weight [{n}, {k}]: N and K multiples of 16"
    if w.size >= 2**31 or x.size >= 2**31:
        return f"a weight of {w.size} elements (32-bit indexing)"
    return None


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, steps: int, act: str | None):
    j, s = pl.program_id(0), pl.program_id(1)
    (bn,) = o_ref.shape
    n0 = pl.multiple_of(j * bn, bn)
    k_in = w_ref.shape[1]
    first_row = lax.broadcasted_iota(jnp.int32, (DOT_ROWS, block_k), 0) == 0

    def step(t, acc):
        k0 = pl.multiple_of((s * steps + t) * block_k, block_k)
        xv = x_ref[0, pl.ds(k0, block_k)]
        if act is not None:  # as Projection.apply: act(gate) rounded, times up, rounded
            gate = ref_ops.ACTIVATIONS[act](xv.astype(jnp.float32)).astype(xv.dtype)
            xv = (gate.astype(jnp.float32) * x_ref[0, pl.ds(k_in + k0, block_k)].astype(jnp.float32)).astype(xv.dtype)
        xt = jnp.where(first_row, xv[None, :], jnp.zeros((), xv.dtype))
        wt = w_ref[pl.ds(n0, bn), pl.ds(k0, block_k)]
        return acc + lax.dot_general(xt, wt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, step, jnp.zeros((DOT_ROWS, bn), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=0)  # rows 1.. are zeros: row 0 exactly


@partial(jax.jit, static_argnames=("act", "config", "interpret"))
def splitk_gemv(x: jax.Array, w: jax.Array, *, act: str | None = None, config: SplitKConfig | None = None,
                interpret: bool = False) -> jax.Array:
    """x [..., K] (one row; [..., 2K] = gate | up with `act`) and w [N, K] -> float32 partial sums
    [splits, N] of x @ w^T (of act(gate) * up with `act`), splits as `choose_config` gives."""
    reason = unsupported(x, w, act)
    if reason is not None:
        raise ValueError(f"splitk_gemv: {reason}")
    n, k = w.shape
    cfg = choose_config(n, k, config)
    bn, bk, splits = cfg.block_n, cfg.block_k, cfg.splits
    xs = x.reshape(1, -1)
    whole = lambda a: pl.BlockSpec(a.shape, lambda j, s: (0,) * a.ndim)  # noqa: E731
    params = {} if interpret else {"compiler_params": _triton_params(cfg.num_warps, cfg.num_stages)}
    return pl.pallas_call(
        partial(_kernel, block_k=bk, steps=k // (bk * splits), act=act),
        grid=(n // bn, splits),
        in_specs=[whole(xs), whole(w)],
        out_specs=pl.BlockSpec((None, bn), lambda j, s: (s, j)),
        out_shape=jax.ShapeDtypeStruct((splits, n), jnp.float32),
        interpret=interpret,
        name="splitk_gemv",
        **params,
    )(xs, w)


def _triton_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as pl_triton
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def reference(x: jax.Array, w: jax.Array, *, act: str | None = None) -> jax.Array:
    """The oracle: float32 [N] = the linear's input (act(gate) * up, rounded as the model rounds
    it, with `act`) @ w^T, in float32."""
    xs = x.reshape(-1)
    if act is not None:
        gate, up = jnp.split(xs, 2)
        xs = ref_ops.ACTIVATIONS[act](gate) * up
    return jnp.dot(xs.astype(jnp.float32), w.astype(jnp.float32).T, precision=lax.Precision.HIGHEST)


__all__ = ["SplitKConfig", "choose_config", "reference", "splitk_gemv", "unsupported"]
