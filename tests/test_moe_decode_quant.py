"""The decode-sized MoE kernels over quantized expert stacks (pallas_kernels/moe/decode_quant.py):
interpret mode on the CPU, the real kernels on a GPU, CUDA lowering at Qwen3-30B-A3B's shapes.

Oracles, in numpy float64 on the stacks dequantized by `gguf.quants.dequantize` / the GPTQ formula
(test_moe_quant's helpers):
- formats decoded exactly (the "fma" variant: 5-/6-bit codes): the MoE product itself;
- formats with integer dots (the "dp4a" variant: 4-/8-bit codes): tightly, the kernel's
  arithmetic restated: codes * scales (from the stack's `codes()` / `group_scales()`) times the
  activations rounded as the kernel rounds them (int8 per weight group, scale amax / 127, round
  half up: llama.cpp's q8_1), minus each group's offset times the exact sum of its activations;
  loosely (~1e-2, the variant's trade), the exact product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_moe_quant import E, FORMATS, H, _abstract, _lower_cuda, _rel, _routing, _stack, _x

from ferrum_jax import moe_kernels, moe_ops
from ferrum_jax.backend import Ops
from pallas_kernels.moe import decode_quant as dq
from pallas_kernels.moe.decode import GemvTiles

INTERPRET = jax.default_backend() != "gpu"  # the real kernels on a GPU, interpret mode elsewhere
F = 512  # two K steps of the down projection at block_k 256 (K-quant super-blocks are 256 wide)
CFG = dq.QuantDecodeConfig(gate_up=GemvTiles(32, 256, 4, 1), down=GemvTiles(64, 256, 4, 1))


def _q8(x: np.ndarray, group: int) -> np.ndarray:
    """x as the dp4a variant sees it: int8 codes per group of `group` inputs times amax / 127."""
    g = x.reshape(*x.shape[:-1], -1, group).astype(np.float32)
    amax = np.abs(g).max(-1, keepdims=True)
    d = np.where(amax > 0, amax / np.float32(127), np.float32(1))
    return (np.floor(g / d + np.float32(0.5)) * d).reshape(x.shape).astype(np.float64)


def _silu(v: np.ndarray) -> np.ndarray:
    return v / (1 + np.exp(-v))


def _scale_part(w) -> np.ndarray:
    """float64 [E, N, K]: codes * group scales of a stack, the weight before its offset."""
    q = w.codes().reshape(*w.lead, w.lo.shape[-4], w.groups, w.fmt.group)
    wq = (q.astype(jnp.float32) * w.group_scales()[..., None]).reshape(*w.lead, w.lo.shape[-4], w.cols)
    return np.asarray(wq[..., : w.rows, :], np.float64)


def _projection(w, dense: np.ndarray, integer: bool):
    """row [K] -> row @ weight^T as the kernel computes it (exact for the float variant)."""
    if not integer:
        return lambda v, e: v.astype(np.float64) @ dense[e].T
    wq = _scale_part(w)
    offsets = wq - dense  # each group's offset, broadcast over its inputs
    return lambda v, e: _q8(v, w.fmt.group) @ wq[e].T - v.astype(np.float64) @ offsets[e].T


def _numpy_moe(x, ids, w, gate, up, down, experts: int, offset: int = 0) -> np.ndarray:
    """sum over slots of w * down(silu(gate x) * up x), float64, experts [offset, offset + experts) local;
    gate, up, down: row [K], expert -> the projection (up None: gate's rows F.. of a fused stack)."""
    t, k = ids.shape
    y = np.zeros(x.shape)
    for i in range(t):
        for s in range(k):
            e = ids[i, s] - offset
            if not 0 <= e < experts:
                continue
            g = gate(x[i], e)
            f = g.shape[0] if up is not None else g.shape[0] // 2
            u = up(x[i], e) if up is not None else g[f:]
            act = (_silu(g[:f]) * u).astype(np.float32)  # stored in x's dtype (float32 here)
            y[i] += w[i, s] * down(act, e)
    return y


def _check(x, ids, w, gate, gate_d, up, up_d, down, down_d, *, offset=0, config=CFG):
    got = np.asarray(dq.moe_experts_decode_quant(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), gate, up, down,
                                                 "silu", expert_offset=offset, config=config, interpret=INTERPRET))
    stacks = [(gate, gate_d), (up, up_d), (down, down_d)]
    exact = _numpy_moe(x, ids, w, *(None if q is None else _projection(q, d, False) for q, d in stacks),
                       gate.lead[0], offset)
    seen = _numpy_moe(x, ids, w, *(None if q is None else _projection(q, d, dq.variant(q.fmt) == "dp4a")
                                   for q, d in stacks), gate.lead[0], offset)
    assert got.shape == x.shape
    integer = any(dq.variant(q.fmt) == "dp4a" for q, _ in stacks if q is not None)
    # float32 sums of <= 512 products in another order: ~sqrt(512) * 2^-24 each, x3 chained dots.
    assert _rel(got, seen) < 1e-5, _rel(got, seen)
    assert _rel(got, exact) < (5e-2 if integer else 1e-5), _rel(got, exact)
    return got


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_numpy(fmt):
    """One token, top-2 of 8 experts, each format in all three stacks."""
    rng = np.random.default_rng(FORMATS.index(fmt))
    (gate, gate_d), (up, up_d), (down, down_d) = (_stack(rng, fmt, E, F, H), _stack(rng, fmt, E, F, H),
                                                  _stack(rng, fmt, E, H, F))
    ids, w = _routing(rng, 1)
    _check(_x(rng, 1, gate_d), ids, w, gate, gate_d, up, up_d, down, down_d)


def test_mixed_formats_fused_stack_and_two_tokens():
    """A Q4_K_M-like mix (Q4_K gate, Q6_K up, Q8_0 down: both variants in one call), then a fused
    [gate; up] Q4_K stack with a Q6_K down, two tokens of one slot each (default tiles too)."""
    rng = np.random.default_rng(3)
    (gate, gate_d), (up, up_d), (down, down_d) = (_stack(rng, "Q4_K", E, F, H), _stack(rng, "Q6_K", E, F, H),
                                                  _stack(rng, "Q8_0", E, H, F))
    ids, w = _routing(rng, 1)
    _check(_x(rng, 1, gate_d), ids, w, gate, gate_d, up, up_d, down, down_d)
    fused, fused_d = _stack(rng, "Q4_K", E, 2 * F, H)
    down6, down6_d = _stack(rng, "Q6_K", E, H, F)
    ids, w = _routing(rng, 2, k=1)
    for config in (CFG, None):
        _check(_x(rng, 2, fused_d[:, :F]), ids, w, fused, fused_d, None, None, down6, down6_d, config=config)


def test_expert_offset_and_entries_of_other_shards():
    """A shard of experts [4, 8) with a traced offset (E / 4 = 1 entry: one token, one slot): its
    expert's share; an entry routed to the other shard gives zeros."""
    rng = np.random.default_rng(5)
    (gate, gate_d), (up, up_d), (down, down_d) = (_stack(rng, "Q4_K", E, F, H), _stack(rng, "Q5_K", E, F, H),
                                                  _stack(rng, "GPTQ-int4", E, H, F))
    x = _x(rng, 1, gate_d)
    w = np.array([[0.7]], np.float32)
    sl = slice(4, 8)
    _check(x, np.array([[6]], np.int32), w, gate[sl], gate_d[sl], up[sl], up_d[sl], down[sl], down_d[sl], offset=4)
    run = jax.jit(lambda off, ids: dq.moe_experts_decode_quant(jnp.asarray(x), ids, jnp.asarray(w), gate[sl], up[sl],
                                                               down[sl], "silu", expert_offset=off, config=CFG,
                                                               interpret=INTERPRET))
    assert np.asarray(run(jnp.int32(4), jnp.array([[6]], jnp.int32))).any()
    assert not np.asarray(run(jnp.int32(4), jnp.array([[1]], jnp.int32))).any()  # expert 1 is the other shard's


def test_declines_with_reasons_and_dispatch():
    rng = np.random.default_rng(7)
    gate, gate_d = _stack(rng, "Q4_K", E, F, H)
    down, _ = _stack(rng, "Q8_0", E, H, F)
    one = jnp.ones((1, H), jnp.bfloat16)
    ids, w = map(jnp.asarray, _routing(rng, 1))
    assert dq.unsupported(one, ids, w, gate, gate, down, "silu") is None
    three = jnp.ones((3, H), jnp.bfloat16)
    ids3, w3 = map(jnp.asarray, _routing(rng, 3))
    assert "not decode-sized" in dq.unsupported(three, ids3, w3, gate, gate, down, "silu")
    assert "not a QuantWeight stack" in dq.unsupported(one, ids, w, jnp.asarray(gate_d), gate, down, "silu")
    assert "activation 'gelu'" in dq.unsupported(one, ids, w, gate, gate, down, "gelu")
    assert "block_n 48" in dq.unsupported(one, ids, w, gate, gate, down, "silu",
                                          dq.QuantDecodeConfig(gate_up=GemvTiles(48, 256, 4, 1)))
    with pytest.raises(ValueError, match="moe_experts_decode_quant: .*not decode-sized"):
        dq.moe_experts_decode_quant(three, ids3, w3, gate, gate, down, "silu", interpret=INTERPRET)
    gpu = Ops(platform="gpu")
    assert gpu.choose("moe_experts", one, ids, w, gate, gate, down, "silu", expert_offset=0, ops=None)[0].name \
        == "pallas_decode_quant"
    impl, choice = gpu.choose("moe_experts", three, ids3, w3, gate, gate, down, "silu", expert_offset=0, ops=None)
    assert impl.name == "pallas_grouped_quant" and "not decode-sized" in str(choice)
    impl, choice = Ops(platform="gpu", exact=True).choose("moe_experts", one, ids, w, gate, gate, down, "silu",
                                                          expert_offset=0, ops=None)
    assert impl.name == "pallas_grouped_quant" and "Ops(exact=True)" in str(choice)
    assert moe_kernels.decode_quant is dq
    assert moe_ops.moe_experts  # the reference the registration falls back to


@pytest.mark.parametrize("formats,fused", [(("Q4_K",) * 3, False), (("Q4_K", "Q6_K", "Q8_0"), False),
                                           (("Q4_K", None, "Q6_K"), True), (("GPTQ-int4",) * 3, False),
                                           (("Q5_K",) * 3, False)])
def test_lowers_for_cuda_at_qwen3_30b_shapes(formats, fused):
    e, k, h, f = 128, 8, 2048, 768
    g_fmt, u_fmt, d_fmt = formats
    stacks = (_abstract(g_fmt, (e, 2 * f if fused else f, h)), None if fused else _abstract(u_fmt, (e, f, h)),
              _abstract(d_fmt, (e, h, f)))
    args = (jax.ShapeDtypeStruct((1, h), jnp.bfloat16), jax.ShapeDtypeStruct((1, k), jnp.int32),
            jax.ShapeDtypeStruct((1, k), jnp.float32), *stacks)
    assert dq.unsupported(*args, "silu") is None
    text = _lower_cuda(lambda x, i, w, g, u, d: dq.moe_experts_decode_quant(x, i, w, g, u, d, "silu"), *args)
    assert text.count("__gpu$xla.gpu.triton") == 2  # gate_up and down


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_activations(dtype):
    """x in bf16 / f16 (the act rows stored in that dtype; Q4_K gate, Q6_K up, Q4_0 down: both
    variants): the output in that dtype, within the integer-dot variant's bound of the exact
    float64 product, as the float32 run is (the rounded x moves the int8 codes of the groups,
    so the two runs differ by about that bound, not by the dtype's unit roundoff)."""
    rng = np.random.default_rng(9)
    (gate, gate_d), (up, up_d), (down, down_d) = (_stack(rng, "Q4_K", E, F, H), _stack(rng, "Q6_K", E, F, H),
                                                  _stack(rng, "Q4_0", E, H, F))
    x = _x(rng, 1, gate_d)
    ids, w = _routing(rng, 1)
    got = dq.moe_experts_decode_quant(jnp.asarray(x, dtype), jnp.asarray(ids), jnp.asarray(w), gate, up, down, "silu",
                                      config=CFG, interpret=INTERPRET)
    assert got.dtype == dtype
    exact = _numpy_moe(x, ids, w, *(_projection(q, d, False) for q, d in ((gate, gate_d), (up, up_d), (down, down_d))),
                       E)
    assert _rel(np.asarray(got, np.float32), exact) < 5e-2, _rel(np.asarray(got, np.float32), exact)
