"""Flash attention forward for Hopper (sm_90) on Pallas' Mosaic GPU backend (plgpu): wgmma + TMA,
a producer warpgroup feeding two compute warpgroups through a ring of K/V buffers.

The structure (warp specialization, barriers, the ping-pong schedule barrier between the two compute
warpgroups, the unmasked / masked / epilogue loop split under a causal mask) is adapted from JAX's
example `jax/experimental/pallas/ops/gpu/attention_mgpu.py` (Copyright 2024 The JAX Authors,
Apache License 2.0). Changes from it: K/V in our cache layout, per-row position offsets, custom
scale, bf16 as well as f16 (the example hard-codes f16 shared-memory buffers), sliding window,
soft-cap, padded tails, heaviest q tiles launched first.

Semantics (those of `ferrum_jax.ops.attention` restricted to contiguous positions per row):
  q [B, T, H, D]; k, v [B, KVH, S, D] (the KV cache layout: one (b, kv head)'s [block_kv, D] tile is
  contiguous, a plain TMA box); query t of row b sits at position offset[b] + t; slot s is visible
  iff s <= pos (and s > pos - window). GQA: query head h reads kv head h // (H // KVH).

Tiling. One CTA owns one (batch row, q head) and 2 * block_q query tokens: compute warpgroup w
(0, 1) takes tokens [base + w * block_q, +block_q). The producer warpgroup streams the kv blocks
the CTA needs, [cta_lo, cta_hi) (from the causal diagonal and the window), through
`max_concurrent_steps` buffers. Each compute warpgroup walks the same step sequence: steps before
its own range (a window's trailing edge that only warpgroup 0 sees) and after it (the diagonal that
only warpgroup 1 sees) are flushed (consumed barriers, schedule barriers) without compute. Inside
its range, blocks that every row sees completely run without a mask; the edge blocks build one.

Tails: T is padded to a multiple of 2 * block_q and S to a multiple of block_kv by the wrapper
(a copy, only when they are not multiples); padded slots are masked (s < S), padded query rows are
sliced off (they may hold NaN: a padded row can see no key).

Numerics: scores in the log2 domain (scale * log2(e) folded into one multiply, fused into the
exp2's FMA); soft-cap: log2(e) * cap * tanh(scale * s / cap). float32 accumulation.

`interpret=True` runs the kernel in Mosaic GPU interpret mode on the CPU (jax >= 0.10): the
wgmma / layout primitives the interpreter lacks are replaced by plain jnp dots there, so interpret
mode checks the control flow, pipeline, barriers and masks, not the wgmma lowering (which the CUDA
lowering test and the GPU tests cover).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.attention.flash import option_problem, shape_problem

LOG2E = math.log2(math.e)
# Finite, so a row whose scores so far are all masked (-inf) gets exp2(-inf - M_INIT) = 0, not NaN.
M_INIT = -1e30

HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SMEM_BYTES = 227 * 1024  # Hopper's per-block shared memory limit
_JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:2])


# --------------------------------------------------------------------------------------------------
# plgpu: imported lazily (CPU-only installs may lack its deps), version differences in one place.

@functools.cache
def mosaic_gpu_unavailable() -> str | None:
    """None when jax's Mosaic GPU Pallas backend imports, else why not."""
    try:
        importlib.import_module("jax.experimental.pallas.mosaic_gpu")
    except Exception as e:  # noqa: BLE001  (ImportError, missing absl, jaxlib without Mosaic GPU)
        return f"Mosaic GPU unavailable in jax {jax.__version__}: {type(e).__name__}: {e}"
    return None


def _plgpu():
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return plgpu


class _Api:
    """The plgpu calls the kernel makes, shimmed across jax 0.10.x / 0.11.x and interpret mode."""

    def __init__(self, interpret: bool):
        self.plgpu = _plgpu()
        self.interpret = interpret

    def transpose(self, ref, perm):
        if _JAX_VERSION >= (0, 11):
            return ref.transpose(perm)  # 0.11: plgpu.transpose_ref is deprecated
        return self.plgpu.transpose_ref(ref, perm)

    def layout_cast(self, x, layout):
        return x if self.interpret else self.plgpu.layout_cast(x, layout)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return self.plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=self.plgpu.Layout.WGMMA)

    def interpret_params(self):
        if not self.interpret:
            return None
        cls = getattr(self.plgpu, "InterpretGPUParams", None)
        if cls is None:  # jax 0.10.x does not export it
            cls = importlib.import_module("jax._src.pallas.mosaic_gpu.interpret.params").InterpretGPUParams
        return cls()


# --------------------------------------------------------------------------------------------------
# Configuration and argument checks.

@dataclasses.dataclass(frozen=True)
class HopperConfig:
    block_q: int  # query tokens per compute warpgroup (a CTA owns 2 * block_q); multiple of 64
    block_kv: int  # cache slots per pipeline step; multiple of 64
    max_concurrent_steps: int  # K/V ring buffers (>= 2)


def default_config(head_dim: int) -> HopperConfig:
    """block_q 64, the largest block_kv among 256 / 128 / 64 that fits shared memory; 3 K/V buffers
    at head_dim 128 (an H200 at 32/8 heads: 1.12 / 1.05 / 1.04x cuDNN at 2k / 8k / 32k tokens, vs
    1.0 / 1.05 / 1.04x with 2; block_kv 64 is slower), 2 elsewhere (not measured)."""
    if head_dim <= 64:
        return HopperConfig(64, 256, 2)
    if head_dim <= 128:
        return HopperConfig(64, 128, 3)
    return HopperConfig(64, 64, 2)


def smem_bytes(head_dim: int, dtype, config: HopperConfig) -> int:
    item = jnp.dtype(dtype).itemsize
    return (2 * config.block_q + 2 * config.max_concurrent_steps * config.block_kv) * head_dim * item


def config_error(head_dim: int, dtype, config: HopperConfig) -> str | None:
    for name in ("block_q", "block_kv"):
        n = getattr(config, name)
        if not isinstance(n, int) or n <= 0 or n % 64:
            return f"{name} {n!r} must be a positive multiple of 64"
    if not isinstance(config.max_concurrent_steps, int) or config.max_concurrent_steps < 2:
        return f"max_concurrent_steps {config.max_concurrent_steps!r} must be >= 2"
    if smem_bytes(head_dim, dtype, config) > SMEM_BYTES - 1024:
        return (f"{config} at head_dim {head_dim} needs {smem_bytes(head_dim, dtype, config)} bytes of "
                f"shared memory (limit {SMEM_BYTES})")
    return None


def unsupported(q, k, v, *, scale=1.0, window=None, softcap=None) -> str | None:
    """None when the kernel takes these arguments (shapes, dtypes, options), else why not."""
    problem = shape_problem(q, k, v)
    if problem is not None:
        return problem
    if jnp.dtype(q.dtype) not in DTYPES:
        return f"dtype {q.dtype} is not bfloat16 or float16"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"k / v dtype {k.dtype} / {v.dtype} differ from q's {q.dtype} (quantized caches: not here)"
    return option_problem(scale, window, softcap)


@functools.cache
def device_unsupported() -> str | None:
    """None on a Hopper (compute capability 9.x) GPU with Mosaic GPU available, else why not."""
    reason = mosaic_gpu_unavailable()
    if reason is not None:
        return reason
    try:
        dev = jax.devices()[0]
    except Exception as e:  # noqa: BLE001
        return f"no device: {e}"
    cc = getattr(dev, "compute_capability", None)
    if cc is None:
        return f"compute capability of {dev.platform} device {dev.device_kind!r} unknown"
    if not str(cc).startswith("9"):
        return f"compute capability {cc} is not 9.x (Hopper)"
    try:  # jax's attention_mgpu.py refuses causal masks there: a ptxas miscompilation
        from jax._src.lib import cuda_versions
        version = cuda_versions.cuda_runtime_get_version() if cuda_versions is not None else None
    except Exception:  # noqa: BLE001
        version = None
    if version is not None and 12080 <= version < 12091:
        return f"CUDA runtime {version}: ptxas miscompiles causal masks between 12.8.0 and 12.9.1"
    return None


# --------------------------------------------------------------------------------------------------
# Public entry points.

def flash_attention_hopper(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array | None = None, *,
                           scale: float, window: int | None = None, softcap: float | None = None,
                           block_q: int | None = None, block_kv: int | None = None,
                           max_concurrent_steps: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal attention of q [B, T, H, D] over the cache k, v [B, KVH, S, D]; query t of row b is at
    position q_offset[b] + t (q_offset int32 [B]; None: 0 for every row, compiled as a constant).
    Returns [B, T, H, D] in q's dtype. Tunables default to `default_config(head_dim)`."""
    reason = unsupported(q, k, v, scale=scale, window=window, softcap=softcap)
    if reason is not None:
        raise ValueError(f"flash_attention_hopper: {reason}")
    b, d = q.shape[0], q.shape[3]
    if q_offset is not None:
        q_offset = jnp.asarray(q_offset)
        if q_offset.shape != (b,) or q_offset.dtype != jnp.int32:
            raise ValueError(f"flash_attention_hopper: q_offset must be int32 [{b}], got {q_offset.dtype} "
                             f"{q_offset.shape}")
    base = default_config(d)
    if block_kv is None:  # a short cache: no wider a tile than it needs (64, 128 or 256)
        block_kv = min(base.block_kv, max(64, 1 << (k.shape[2] - 1).bit_length()))
    config = HopperConfig(block_q or base.block_q, block_kv,
                          max_concurrent_steps or base.max_concurrent_steps)
    err = config_error(d, q.dtype, config)
    if err is not None:
        raise ValueError(f"flash_attention_hopper: {err}")
    return _forward(q, k, v, q_offset, scale=float(scale), window=None if window is None else int(window),
                    softcap=None if softcap is None else float(softcap), config=config, interpret=bool(interpret))


def contiguous_positions(q_offset: jax.Array, t: int) -> jax.Array:
    """The q_positions [B, T] that `flash_attention_hopper`'s q_offset stands for."""
    return q_offset[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def hopper_prefill(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *, scale: float,
                   window: int | None = None, softcap: float | None = None, causal_from_zero: bool = False,
                   k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> jax.Array:
    """The `attention` op's signature, for a prefill from position 0 only (`causal_from_zero`: every
    row's positions are 0..T-1, so q_positions is not read)."""
    reason = op_unsupported(q, k, v, q_positions, scale=scale, window=window, softcap=softcap,
                            causal_from_zero=causal_from_zero, k_scale=k_scale, v_scale=v_scale)
    if reason is not None:
        raise ValueError(f"hopper_prefill: {reason}")
    return flash_attention_hopper(q, k, v, None, scale=scale, window=window, softcap=softcap)


def op_unsupported(q, k, v, q_positions, *, scale=1.0, window=None, softcap=None, causal_from_zero=False,
                   k_scale=None, v_scale=None) -> str | None:
    """The op-level check (no device check): None when `hopper_prefill` takes these arguments."""
    if not causal_from_zero:
        return "not a prefill from position 0 (causal_from_zero=False)"
    if k_scale is not None or v_scale is not None:
        return "quantized cache"
    reason = unsupported(q, k, v, scale=scale, window=window, softcap=softcap)
    if reason is not None:
        return reason
    if not hasattr(q_positions, "shape") or tuple(q_positions.shape) != tuple(q.shape[:2]):
        return f"q_positions must be [B, T] = {tuple(q.shape[:2])}"
    # Verify the promise only when it costs nothing to (a concrete host array): never under jit.
    if isinstance(q_positions, np.ndarray) and not np.array_equal(
            q_positions, np.broadcast_to(np.arange(q.shape[1]), q_positions.shape)):
        return "causal_from_zero, but q_positions are not 0..T-1 in every row"
    return None


# --------------------------------------------------------------------------------------------------
# The kernel.

def _cdiv(a, b: int):
    return lax.div(a + (b - 1), jnp.int32(b))


@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "config", "interpret"))
def _forward(q, k, v, q_offset, *, scale: float, window: int | None, softcap: float | None, config: HopperConfig,
             interpret: bool):
    b, t, h, d = q.shape
    s = k.shape[2]
    bq2, bk = 2 * config.block_q, config.block_kv
    t_pad, s_pad = -(-t // bq2) * bq2, -(-s // bk) * bk
    if t_pad != t:
        q = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    if s_pad != s:
        k, v = (jnp.pad(a, ((0, 0), (0, 0), (0, s_pad - s), (0, 0))) for a in (k, v))
    call = _build(b=b, t_pad=t_pad, h=h, kvh=k.shape[1], s_len=s, s_pad=s_pad, d=d, dtype=jnp.dtype(q.dtype),
                  scale=scale, window=window, softcap=softcap, config=config, has_offset=q_offset is not None,
                  interpret=interpret)
    out = call(q_offset, q, k, v) if q_offset is not None else call(q, k, v)
    return out[:, :t] if t_pad != t else out


def _build(*, b, t_pad, h, kvh, s_len, s_pad, d, dtype, scale, window, softcap, config: HopperConfig,
           has_offset: bool, interpret: bool):
    api = _Api(interpret)
    plgpu = api.plgpu
    group = h // kvh
    block_q, block_kv = config.block_q, config.block_kv
    compute_wgs = 2
    n_q_tiles = t_pad // (compute_wgs * block_q)
    max_concurrent_steps = min(config.max_concurrent_steps, s_pad // block_kv)
    mcs = max_concurrent_steps
    masked_tail = s_pad != s_len  # padded slots exist: the masked steps must hide them
    if softcap is None:
        c_score = scale * LOG2E
    else:
        c_inner, c_outer = scale / softcap, softcap * LOG2E

    def kv_blocks(p_first, p_last):
        """The kv blocks [lo, hi) that queries at positions p_first..p_last can see."""
        hi = _cdiv(jnp.minimum(p_last + 1, s_len), block_kv)
        if window is None:
            return jnp.int32(0), hi
        lo = lax.div(jnp.clip(p_first - window + 1, 0, s_len), jnp.int32(block_kv))
        return lo, jnp.maximum(hi, lo)

    def kernel(offset_ref, q_ref, k_ref, v_ref, out_ref, scoped):
        batch = lax.axis_index("batch")
        q_head = lax.axis_index("heads")
        q_tile = (n_q_tiles - 1) - lax.axis_index("q_seq")  # heaviest (latest) tiles first
        wg_idx = lax.axis_index("wg")
        smem_buffers, buffer_barriers, consumed_barriers, schedule_barrier = scoped
        qo_smem2, k_smem, v_smem = smem_buffers
        k_barriers, v_barriers, q_barriers = buffer_barriers
        k_consumed_barriers, v_consumed_barriers = consumed_barriers
        offset = offset_ref[batch] if offset_ref is not None else jnp.int32(0)

        cta_tok = q_tile * (compute_wgs * block_q)
        cta_lo, cta_hi = kv_blocks(offset + cta_tok, offset + cta_tok + compute_wgs * block_q - 1)
        n_steps = cta_hi - cta_lo  # pipeline steps of this CTA: kv block cta_lo + i at step i

        def perform_schedule_barrier():
            plgpu.barrier_arrive(schedule_barrier)
            plgpu.barrier_wait(schedule_barrier)

        def rel(x):
            return jnp.clip(x - cta_lo, 0, n_steps)

        @pl.when(wg_idx < 2)
        def _compute_wg():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg_idx]
            q_tok = cta_tok + wg_idx * block_q
            p_first = offset + q_tok
            p_last = p_first + block_q - 1
            wg_lo, wg_hi = kv_blocks(p_first, p_last)
            # Steps [0, a): before this warpgroup's range; [a, b_): its range; [b_, n_steps): after.
            a = rel(wg_lo)
            b_ = jnp.maximum(rel(wg_hi), a)
            # Blocks every row sees completely: slots <= p_first (and < S), and > p_last - window.
            full_hi = jnp.minimum(lax.div(p_first + 1, jnp.int32(block_kv)), s_len // block_kv)
            m1 = a if window is None else jnp.clip(rel(_cdiv(jnp.maximum(p_last - window + 1, 0), block_kv)), a, b_)
            m2 = jnp.clip(rel(full_hi), m1, b_)

            plgpu.copy_gmem_to_smem(
                q_ref.at[batch, pl.ds(q_tok, block_q), q_head], qo_smem, q_barriers.at[wg_idx])
            plgpu.barrier_wait(q_barriers.at[wg_idx])

            m_i = api.layout_cast(jnp.full((block_q,), M_INIT, dtype=jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = api.layout_cast(jnp.full((block_q,), 0, dtype=jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = api.layout_cast(jnp.full((block_q, d), 0, dtype=jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(b_ > 0)
            def _():
                plgpu.barrier_wait(k_barriers.at[0])

            pl.when(wg_idx == 1)(perform_schedule_barrier)

            def kv_loop(step, carry, masked: bool = False):
                acc, m_i, l_i = carry
                slot = lax.rem(step, jnp.array(mcs, step.dtype))

                # QK
                if interpret:
                    qk = lax.dot_general(qo_smem[...], k_smem.at[slot][...], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
                    perform_schedule_barrier()
                else:
                    def compute_qk(acc_ref):
                        plgpu.wgmma(acc_ref, qo_smem, api.transpose(k_smem.at[slot], (1, 0)))
                        perform_schedule_barrier()
                        return acc_ref[...]
                    qk = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_kv), jnp.float32))
                plgpu.barrier_arrive(k_consumed_barriers.at[slot])

                if softcap is not None:
                    qk = jnp.tanh(qk * c_inner) * c_outer  # log2-domain scores
                if masked:
                    q_pos = api.iota((block_q, block_kv), 0) + p_first
                    kv_pos = api.iota((block_q, block_kv), 1) + (cta_lo + step) * block_kv
                    mask = kv_pos <= q_pos
                    if window is not None:
                        mask = mask & (kv_pos > q_pos - window)
                    if masked_tail:
                        mask = mask & (kv_pos < s_len)
                    qk = jnp.where(mask, qk, -jnp.inf)

                # Softmax in the log2 domain; m is kept scaled so that p is one FMA + exp2.
                if softcap is None:
                    m_ij = jnp.maximum(m_i, qk.max(axis=1) * c_score)
                    p = jnp.exp2(qk * c_score - lax.broadcast_in_dim(m_ij, qk.shape, [0]))
                else:
                    m_ij = jnp.maximum(m_i, qk.max(axis=1))
                    p = jnp.exp2(qk - lax.broadcast_in_dim(m_ij, qk.shape, [0]))
                alpha = jnp.exp2(m_i - m_ij)
                m_i = m_ij
                acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i *= alpha
                p16 = p.astype(dtype)

                def end_softmax_barriers():
                    plgpu.barrier_arrive(schedule_barrier)  # Done with softmax!
                    plgpu.barrier_wait(v_barriers.at[slot])
                    plgpu.barrier_wait(schedule_barrier)  # Wait until TensorCore is free.
                # The example found this ordering to matter for performance.
                if d <= 128:
                    l_i += p.sum(axis=1)
                    acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
                    end_softmax_barriers()
                else:
                    end_softmax_barriers()
                    l_i += p.sum(axis=1)

                # PV
                def wait_next_k():
                    wait_step = step + 1
                    wait_slot = lax.rem(wait_step, jnp.array(mcs, step.dtype))

                    @pl.when(wait_step < b_)
                    def _wait():
                        plgpu.barrier_wait(k_barriers.at[wait_slot])

                if interpret:
                    acc = acc + lax.dot_general(p16, v_smem.at[slot][...], (((1,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32)
                    wait_next_k()
                else:
                    def compute_pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        wait_next_k()
                    acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_consumed_barriers.at[slot])
                return acc, m_i, l_i

            def prologue_kv_loop(step, _):
                # A step before this warpgroup's range (window): keep the barriers in step, no compute.
                slot = lax.rem(step, jnp.array(mcs, step.dtype))
                perform_schedule_barrier()
                plgpu.barrier_arrive(k_consumed_barriers.at[slot])
                plgpu.barrier_arrive(schedule_barrier)
                plgpu.barrier_wait(v_barriers.at[slot])
                plgpu.barrier_wait(schedule_barrier)
                wait_step = step + 1
                wait_slot = lax.rem(wait_step, jnp.array(mcs, step.dtype))

                @pl.when(wait_step < b_)
                def _wait():
                    plgpu.barrier_wait(k_barriers.at[wait_slot])
                plgpu.barrier_arrive(v_consumed_barriers.at[slot])

            def epilogue_kv_loop(step, _):
                # This loop makes sure that all the pipelined KV data is processed, even
                # if one compute wg finishes early like with causal masking. Unlike the example,
                # it also waits for each step's data, so that every barrier phase is observed (no
                # TMA left in flight; Mosaic GPU interpret mode checks this).
                slot = lax.rem(step, jnp.array(mcs, step.dtype))
                plgpu.barrier_wait(k_barriers.at[slot])
                plgpu.barrier_wait(v_barriers.at[slot])
                plgpu.barrier_arrive(k_consumed_barriers.at[slot])
                plgpu.barrier_arrive(v_consumed_barriers.at[slot])
                perform_schedule_barrier()
                perform_schedule_barrier()

            masked_kv_loop = functools.partial(kv_loop, masked=True)
            carry = (acc, m_i, l_i)
            if window is not None:
                lax.fori_loop(jnp.int32(0), a, prologue_kv_loop, None)
                carry = lax.fori_loop(a, m1, masked_kv_loop, carry)  # the window's trailing edge
            carry = lax.fori_loop(m1, m2, kv_loop, carry)  # no mask needed
            carry = lax.fori_loop(m2, b_, masked_kv_loop, carry)  # the diagonal (and padded slots)
            lax.fori_loop(b_, n_steps, epilogue_kv_loop, None)  # flush the pipeline
            acc, m_i, l_i = carry
            pl.when(wg_idx == 0)(perform_schedule_barrier)

            acc /= lax.broadcast_in_dim(l_i, (block_q, d), [0])
            qo_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(q_tok, block_q), q_head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg_idx == 2)
        def _memory_wg():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))

            def tile(ref, step):
                return ref.at[batch, kv_head, pl.ds((cta_lo + step) * block_kv, block_kv)]

            for i in range(mcs):
                def issue(i=i):
                    plgpu.copy_gmem_to_smem(tile(k_ref, i), k_smem.at[i], k_barriers.at[i])
                    plgpu.copy_gmem_to_smem(tile(v_ref, i), v_smem.at[i], v_barriers.at[i])
                pl.when(i < n_steps)(issue)  # (the example issues all: unobserved loads at exit)

            @pl.loop(0, n_steps - mcs)
            def _kv_loop(step):
                tma_step = step + mcs
                tma_slot = lax.rem(step, jnp.array(mcs, step.dtype))
                plgpu.barrier_wait(k_consumed_barriers.at[tma_slot])
                plgpu.copy_gmem_to_smem(tile(k_ref, tma_step), k_smem.at[tma_slot], k_barriers.at[tma_slot])
                plgpu.barrier_wait(v_consumed_barriers.at[tma_slot])
                plgpu.copy_gmem_to_smem(tile(v_ref, tma_step), v_smem.at[tma_slot], v_barriers.at[tma_slot])

            # Not in the example: observe the last steps' consumed phases too (interpret mode checks
            # that every barrier phase is observed; on the GPU this only idles the producer).
            @pl.loop(jnp.maximum(n_steps - mcs, 0), n_steps)
            def _drain(step):
                slot = lax.rem(step, jnp.array(mcs, step.dtype))
                plgpu.barrier_wait(k_consumed_barriers.at[slot])
                plgpu.barrier_wait(v_consumed_barriers.at[slot])

    def entry(*refs):
        if has_offset:
            offset_ref, q_ref, k_ref, v_ref, out_ref = refs
        else:
            offset_ref, (q_ref, k_ref, v_ref, out_ref) = None, refs
        if interpret:
            transforms = ()
        else:
            # 128-byte swizzle: the tile's minor dimension is 64 two-byte elements.
            transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        qo_scratch = plgpu.SMEM((compute_wgs, block_q, d), dtype, transforms=transforms)
        k_scratch = plgpu.SMEM((mcs, block_kv, d), dtype, transforms=transforms)
        v_scratch = plgpu.SMEM((mcs, block_kv, d), dtype, transforms=transforms)
        pl.run_scoped(
            lambda *args: kernel(offset_ref, q_ref, k_ref, v_ref, out_ref, args),
            (qo_scratch, k_scratch, v_scratch),
            (
                plgpu.Barrier(num_barriers=mcs),
                plgpu.Barrier(num_barriers=mcs),
                plgpu.Barrier(num_barriers=compute_wgs),
            ),
            (plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=mcs),) * 2,
            plgpu.Barrier(num_arrivals=compute_wgs),
            collective_axes="wg",
        )

    kwargs = {}
    if interpret:
        kwargs["interpret"] = api.interpret_params()
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((b, t_pad, h, d), dtype),
        grid=(h, n_q_tiles, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kwargs,
    )
