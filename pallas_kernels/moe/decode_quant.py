"""Decode-sized MoE over quantized expert stacks: the GEMV kernels of decode.py, each program
decoding its tiles as the quantized matmul's few-row variants do (pallas_kernels/quant_matmul).

At batch 1 the grouped quantized kernels (grouped_quant.py) pad every (token, slot) entry to a
16-row tensor-core tile and decode each [block_n, block_k] weight tile to floats for one real row:
ALU-bound, ~9% of the copy bandwidth for Qwen3-30B-A3B's Q4_K experts on an H200. Here, as in
decode.py (read that first), program (j, i) streams rows [j*block_n, (j+1)*block_n) of entry i's
expert straight from the packed stack:

  4- and 8-bit codes (Q4_K, Q4_0, Q8_0, GPTQ-int4, ...): the "dp4a" decode (`dp4a.dp4a_rows`: x
      quantized to int8 per weight group in the kernel, integer dots, scale and offset once per
      group; ~1e-2 relative error of each projection, llama.cpp's q8_1 idea);
  5- and 6-bit codes (Q5_K, Q6_K, ...): the exact "fma" decode (`fma.fma_rows`).

  gate_up  grid (F / block_n, T*k): act[i, cols] = act_fn(x_t gate_e^T) * (x_t up_e^T) in x's
           dtype; gate and up may be different formats, or one fused [E, 2F, H] stack.
  down     grid (H / block_n, T*k): float32 y[i, cols] = weight_i * (act_i down_e^T); XLA sums
           each token's k rows.

An entry routed outside the local experts (expert parallel: ids - expert_offset not in [0, E))
reads nothing and stores zeros. The reference is `ferrum_jax.moe_ops.moe_experts` (the
"xla_dequant" implementation over the same stacks); `ferrum_jax/moe_kernels.py` registers this as
"pallas_decode_quant".
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ferrum_jax.quant.qweight import QFormat, QuantWeight
from pallas_kernels.moe.decode import GemvTiles, _params, _whole, entries_moe
from pallas_kernels.moe.grouped_matmul import KERNEL_ACTIVATIONS
from pallas_kernels.moe.grouped_quant import operands_unsupported
from pallas_kernels.quant_matmul.dp4a import dp4a_rows
from pallas_kernels.quant_matmul.fma import fma_rows


@dataclasses.dataclass(frozen=True)
class QuantDecodeConfig:
    """Tiles of the two kernels: block_n output rows per program; block_k inputs per loop step
    (cut to a power-of-two number of the format's super-blocks dividing the inputs)."""
    # H200 sweep at Qwen3-30B-A3B's shapes, Q4_K, batch 1 (bench/results/moe_sweep-decode-Q4_K_*):
    # gate_up 22.9 us a layer at these tiles, 25.3 at (16, 1024); down within 0.5 us of its best.
    gate_up: GemvTiles = GemvTiles(8, 2048, 4, 1)
    down: GemvTiles = GemvTiles(16, 1024, 4, 1)


def variant(f: QFormat) -> str:
    """"dp4a" for 4- and 8-bit codes in one byte plane, else "fma" (exact)."""
    return "dp4a" if f.bits in (4, 8) and f.split[1] == 1 else "fma"


def unsupported(x: Any, ids: Any, weights: Any, w_gate: Any, w_up: Any, w_down: Any, kind: str,
                config: QuantDecodeConfig | None = None) -> str | None:
    """None if `moe_experts_decode_quant` takes these arguments, else why not."""
    shapes = operands_unsupported(x, ids, weights, w_gate, w_up, w_down, kind)
    if isinstance(shapes, str):
        return shapes
    nk, e, h, f = shapes
    if nk * 4 > e:
        return f"{nk} (token, slot) entries > E/4 = {e / 4:g}: not decode-sized (the grouped kernels take it)"
    cfg = config or QuantDecodeConfig()
    for what, tiles, n in (("gate_up", cfg.gate_up, f), ("down", cfg.down, h)):
        bn = tiles.block_n
        if bn < 1 or bn & (bn - 1) or n % bn:
            return f"{what}: block_n {bn} is not a power of two dividing {n} outputs"
    return None


def _operands(w: QuantWeight, x2: jax.Array, block_k: int) -> tuple[list[jax.Array], tuple[str, ...], dict]:
    """x2 [rows, K] viewed for the format's decode variant, the stack's leaves in the layout's own
    tile shape with the expert axis in front (free reshapes), their names, and the static facts."""
    f = w.fmt
    e, n_pad = w.lo.shape[:2]
    k = w.shape[2]
    a_fields, b_fields, wd = f.split
    sup = f.super_group or f.group
    r, nsup = sup // f.group, k // sup
    kind = variant(f)
    xv = x2.reshape(x2.shape[0], nsup, r, a_fields, b_fields, wd)
    views = [xv if kind == "dp4a" else xv.astype(jnp.float32)]
    names = []
    for name, leaf, shape in (("lo", w.lo, (nsup, r, b_fields, wd)), ("hi", w.hi, (nsup, r, 1, wd)),
                              ("sc", w.scales, (nsup, r)), ("ss", w.super_scales, (nsup,)),
                              ("of", w.offsets, (nsup, r)), ("so", w.super_offsets, (nsup,))):
        if leaf is not None:
            views.append(leaf.reshape(e, n_pad, *shape))
            names.append(name)
    nsb = 1 << (max(1, min(block_k // sup, nsup)).bit_length() - 1)  # a power of two dividing nsup
    while nsup % nsb:
        nsb //= 2
    return views, tuple(names), dict(fmt=f, kind=kind, nsb=nsb, steps=nsup // nsb)


def _project(x_ref, refs, names, static, *, e, n0, bn: int, row, interpret: bool) -> jax.Array:
    """float32 [bn]: row `row` of x_ref times rows n0.. of expert e's weight."""
    wrefs = dict(zip(names, refs))
    kw = dict(nsb=static["nsb"], steps=static["steps"], base=0, m_rows=1, rows=(e, pl.ds(n0, bn)), block_n=bn,
              x_row=row)
    if static["kind"] == "dp4a":
        return dp4a_rows(x_ref, wrefs, static["fmt"], interpret=interpret, **kw)[0]
    return fma_rows(x_ref, wrefs, static["fmt"], **kw)[0]


def _gate_up_kernel(ids_ref, off_ref, *refs, gate, up, top_k: int, experts: int, up_row: int, act: str,
                    interpret: bool):
    (gate_names, gate_static), (up_names, up_static) = gate, up
    xg_ref, rest = refs[0], refs[1:]
    g_refs, rest = rest[:len(gate_names)], rest[len(gate_names):]
    if up_names is None:  # fused [gate; up] stack: the same refs, up rows further down
        xu_ref, u_refs, up_names, up_static = xg_ref, g_refs, gate_names, gate_static
    else:
        xu_ref, rest = rest[0], rest[1:]
        u_refs, rest = rest[:len(up_names)], rest[len(up_names):]
    (o_ref,) = rest
    j, i = pl.program_id(0), pl.program_id(1)
    e = ids_ref[i] - off_ref[0]
    (bn,) = o_ref.shape
    n0 = pl.multiple_of(j * bn, bn)
    tok = lax.div(i, top_k)
    mine = (e >= 0) & (e < experts)

    @pl.when(mine)
    def _():
        g = _project(xg_ref, g_refs, gate_names, gate_static, e=e, n0=n0, bn=bn, row=tok, interpret=interpret)
        u = _project(xu_ref, u_refs, up_names, up_static, e=e, n0=up_row + n0, bn=bn, row=tok, interpret=interpret)
        o_ref[...] = (KERNEL_ACTIVATIONS[act](g) * u).astype(o_ref.dtype)

    @pl.when(jnp.logical_not(mine))
    def _():
        o_ref[...] = jnp.zeros((bn,), o_ref.dtype)


def _down_kernel(ids_ref, rw_ref, off_ref, *refs, names, static, experts: int, interpret: bool):
    a_ref, w_refs, o_ref = refs[0], refs[1:-1], refs[-1]
    j, i = pl.program_id(0), pl.program_id(1)
    (bn,) = o_ref.shape
    n0 = pl.multiple_of(j * bn, bn)
    e = ids_ref[i] - off_ref[0]
    mine = (e >= 0) & (e < experts)

    @pl.when(mine)
    def _():
        o_ref[...] = _project(a_ref, w_refs, names, static, e=e, n0=n0, bn=bn, row=i, interpret=interpret) * rw_ref[i]

    @pl.when(jnp.logical_not(mine))
    def _():
        o_ref[...] = jnp.zeros((bn,), o_ref.dtype)


def gate_up(x: jax.Array, ids: jax.Array, expert_offset: jax.Array, w_gate: QuantWeight, w_up: QuantWeight | None,
            kind: str, *, top_k: int, tiles: GemvTiles, interpret: bool = False) -> jax.Array:
    """act [T*k, F] in x's dtype: act_fn(x_t gate_e^T) * (x_t up_e^T) for each entry (t, slot) of
    ids [T*k] (flat, e = ids - expert_offset local), zeros for entries of other shards. x [T, H];
    w_up None: w_gate is the fused [E, 2F, H] stack."""
    t = x.shape[0]
    e = w_gate.lead[0]
    f = w_gate.shape[1] // 2 if w_up is None else w_gate.shape[1]
    gate_views, gate_names, gate_static = _operands(w_gate, x, tiles.block_k)
    args, up = list(gate_views), (None, None)
    if w_up is not None:
        up_views, up_names, up_static = _operands(w_up, x, tiles.block_k)
        args += up_views
        up = (up_names, up_static)
    kernel = partial(_gate_up_kernel, gate=(gate_names, gate_static), up=up, top_k=top_k, experts=e,
                     up_row=f if w_up is None else 0, act=kind, interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(f // tiles.block_n, t * top_k),
        in_specs=[_whole(ids), _whole(expert_offset)] + [_whole(a) for a in args],
        out_specs=pl.BlockSpec((None, tiles.block_n), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t * top_k, f), x.dtype),
        interpret=interpret,
        name="moe_decode_quant_gate_up",
        **_params(tiles, interpret),
    )(ids, expert_offset, *args)


def down(act: jax.Array, ids: jax.Array, weights: jax.Array, expert_offset: jax.Array, w_down: QuantWeight, *,
         tiles: GemvTiles, interpret: bool = False) -> jax.Array:
    """y float32 [T*k, H]: weight * (act_row w_down_e^T) for each entry (zeros for other shards'
    entries). act [T*k, F] from `gate_up`; ids, weights [T*k] flat."""
    nk = act.shape[0]
    e, h = w_down.lead[0], w_down.shape[1]
    views, names, static = _operands(w_down, act, tiles.block_k)
    return pl.pallas_call(
        partial(_down_kernel, names=names, static=static, experts=e, interpret=interpret),
        grid=(h // tiles.block_n, nk),
        in_specs=[_whole(ids), _whole(weights), _whole(expert_offset)] + [_whole(a) for a in views],
        out_specs=pl.BlockSpec((None, tiles.block_n), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((nk, h), jnp.float32),
        interpret=interpret,
        name="moe_decode_quant_down",
        **_params(tiles, interpret),
    )(ids, weights, expert_offset, *views)


def moe_experts_decode_quant(x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: QuantWeight,
                             w_up: QuantWeight | None, w_down: QuantWeight, kind: str, *,
                             expert_offset: int | jax.Array = 0, ops: Any = None,
                             config: QuantDecodeConfig | None = None, interpret: bool = False) -> jax.Array:
    """`ferrum_jax.moe_ops.moe_experts` for decode-sized batches over QuantWeight stacks (see
    `unsupported`): x [..., H], ids / weights [..., k], stacks [E, F, H] (or fused [E, 2F, H] with
    w_up None) and [E, H, F]. `ops` is accepted for the op signature and unused."""
    del ops
    reason = unsupported(x, ids, weights, w_gate, w_up, w_down, kind, config)
    if reason is not None:
        raise ValueError(f"moe_experts_decode_quant: {reason}")
    return _run(x, ids, weights, w_gate, w_up, w_down, jnp.asarray(expert_offset, jnp.int32).reshape(1), kind=kind,
                config=config or QuantDecodeConfig(), interpret=interpret)


@partial(jax.jit, static_argnames=("kind", "config", "interpret"))
def _run(x, ids, weights, w_gate, w_up, w_down, expert_offset, *, kind: str, config: QuantDecodeConfig,
         interpret: bool) -> jax.Array:
    return entries_moe(gate_up, down, x, ids, weights, w_gate, w_up, w_down, expert_offset, kind=kind, config=config,
                       down_sums=False, interpret=interpret)


__all__ = ["QuantDecodeConfig", "down", "gate_up", "moe_experts_decode_quant", "unsupported", "variant"]
