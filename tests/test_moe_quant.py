"""Quantized MoE expert stacks: `QuantWeight` [experts, out, in], the "xla_dequant" reference over
them, the grouped Pallas kernels (pallas_kernels/moe/grouped_quant.py, interpret mode on the CPU,
the real kernels on a GPU) and their CUDA lowering, and loading: GGUF stacks repacked at load,
GPTQ-int4 experts of an HF checkpoint stacked at load.

Oracles: `gguf.quants.dequantize` (GGUF stacks, bit for bit) and the GPTQ formula in numpy
((q - z) * s, act-order columns put back); the kernels against their jnp references and against
`ferrum_jax.moe_ops.moe_experts` on the stacks dequantized in float32; whole models against the
same file run on GGUFWeight stacks, and against the GPTQ checkpoint dequantized by the numpy oracle.
Small shapes: E = 8 experts, top-2, hidden = ff = 256 (K-quant super-blocks are 256 wide).
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gguf_dequant import _random_bytes

import ferrum_jax
from ferrum_jax import moe_kernels, moe_ops
from ferrum_jax.backend import Ops, record_dispatch, summarize
from ferrum_jax.errors import CheckpointError
from ferrum_jax.quant import GGUFWeight
from ferrum_jax.quant.qweight import QuantWeight, gptq_format
from ferrum_jax.quant.repack import can_repack, repack_gguf, repack_weights
from pallas_kernels.moe import grouped_quant as gq
from pallas_kernels.moe.align import align_block_size, sorted_routing

INTERPRET = jax.default_backend() != "gpu"  # the real kernels on a GPU, interpret mode elsewhere

E, K, H, F = 8, 2, 256, 256
GGUF_TYPES = ["Q4_K", "Q6_K", "Q8_0", "Q4_0", "Q5_K"]
FORMATS = GGUF_TYPES + ["GPTQ-int4"]
# Several output tiles and two K steps per program in both kernels.
CFG = gq.QuantMoeConfig(block_m=16, gate_up=gq.Tiles(64, 128), down=gq.Tiles(128, 128))


# --- tolerances ----------------------------------------------------------------------------------

def _tol(dtype) -> float:
    """Relative (Frobenius) error allowed against a float32 reference of the same dequantized
    weights. float32: the kernel's dots differ only in summation order, a random walk of
    sqrt(n) * 2^-24 per length-n dot (n = 256), times 8 for the chained gate/up and down dots, the
    activation and the slot sum. bf16 / f16 (unit roundoff u = 2^-8 / 2^-11): each of five
    roundings moves every value by at most u relative: the decoded weight tile, the stored act
    rows, the per-slot output rows, the final cast (in both: the reference casts too, so count it
    once more) and the gathered x (exact here: x is given in that dtype to both)."""
    if dtype == jnp.float32:
        return 8 * math.sqrt(max(H, F)) * 2.0**-24
    u = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11
    return 5 * u


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# --- stacks ----------------------------------------------------------------------------------------

def _gguf_stack(rng, qtype: str, e: int, n: int, k: int) -> tuple[QuantWeight, np.ndarray, GGUFWeight]:
    """(repacked stack, gguf's float32 dequantization of the same bytes, the GGUFWeight stack)."""
    raw = _random_bytes(rng, qtype, (e * n, k)).reshape(e, n, -1)
    packed = GGUFWeight.from_numpy(raw, qtype, (e, n, k))
    return repack_gguf(packed), gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]), packed


def _gptq_stack(rng, e: int, n: int, k: int, group: int = 32, act_order: bool = False
                ) -> tuple[QuantWeight, np.ndarray]:
    """GPTQ-int4 experts stacked (`QuantWeight.stack`), and the numpy oracle (q - z) * s with each
    expert's act-order columns put back (stored column j feeds input perm[j])."""
    fmt = gptq_format(4, group)
    ws, dense = [], np.empty((e, n, k), np.float32)
    g = np.arange(k) // group
    for i in range(e):
        codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
        scales = rng.uniform(1e-3, 1e-2, (n, k // group)).astype(np.float16)
        zeros = rng.integers(0, 16, (n, k // group)).astype(np.uint8)
        perm = rng.permutation(k).astype(np.int32) if act_order else np.arange(k)
        ws.append(QuantWeight.from_codes(codes, scales, fmt, zeros=zeros, perm=perm if act_order else None))
        dense[i][:, perm] = (codes.astype(np.float32) - zeros[:, g]) * scales[:, g].astype(np.float32)
    return QuantWeight.stack(ws), dense


def _stack(rng, fmt: str, e: int, n: int, k: int) -> tuple[QuantWeight, np.ndarray]:
    return _gptq_stack(rng, e, n, k) if fmt == "GPTQ-int4" else _gguf_stack(rng, fmt, e, n, k)[:2]


def _routing(rng, t: int, e: int = E, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    ids = np.argsort(rng.standard_normal((t, e)), axis=1)[:, :k].astype(np.int32)  # k distinct experts a token
    w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    return ids, w / w.sum(1, keepdims=True)


def _x(rng, t: int, gate: np.ndarray) -> np.ndarray:
    """Activations scaled so gate outputs are O(1) (the activation's curved part, whatever the
    random blocks' scales)."""
    rms = float(np.sqrt(np.mean(np.square(gate, dtype=np.float64))))
    return (rng.standard_normal((t, gate.shape[-1])) / (rms * np.sqrt(gate.shape[-1]))).astype(np.float32)


# --- the stacks themselves ------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", GGUF_TYPES + ["Q4_1", "Q5_0", "Q5_1"])
def test_repacked_stack_is_bit_exact(qtype):
    rng = np.random.default_rng(0)
    w, want, packed = _gguf_stack(rng, qtype, 3, 40, 256)  # 40 rows: each expert padded to 64 on its own
    assert can_repack(packed) is None and w.ndim == 3 and w.shape == (3, 40, 256) and w.lead == (3,)
    assert w.lo.shape[:2] == (3, 64)
    got = np.asarray(w.dequantize(jnp.float32))
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    # Each expert's leaves are exactly the 2-D repack of that expert's rows.
    one = repack_gguf(packed[1])
    assert w.nbytes == 3 * one.nbytes and w.stream_bytes() == 3 * one.stream_bytes()
    for a, b in zip(jax.tree_util.tree_leaves(w[1]), jax.tree_util.tree_leaves(one)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(w.take_experts(jnp.asarray([[2, 0]])).dequantize()), got[[[2, 0]]])
    np.testing.assert_array_equal(np.asarray(w[1:3].dequantize()), got[1:3])


def test_gptq_stack_matches_the_formula():
    rng = np.random.default_rng(1)
    for act_order in (False, True):
        w, want = _gptq_stack(rng, 3, 24, 128, act_order=act_order)
        assert w.shape == (3, 24, 128) and (w.perm is not None) == act_order
        np.testing.assert_array_equal(np.asarray(w.dequantize()), want)
        picks = np.array([[2, 0], [1, 1]])  # [tokens, slots], as the decode path gathers them
        np.testing.assert_array_equal(np.asarray(w.take_experts(jnp.asarray(picks)).dequantize()), want[picks])
    a = QuantWeight.from_codes(np.zeros((8, 64), np.uint8), np.ones((8, 2)), gptq_format(4, 32),
                               zeros=np.zeros((8, 2), np.uint8))
    b = QuantWeight.from_codes(np.zeros((8, 64), np.uint8), np.ones((8, 1)), gptq_format(4, 64),
                               zeros=np.zeros((8, 1), np.uint8))
    with pytest.raises(ValueError, match=r"weight 1 is int4-g64 \(8, 64\).*weight 0 is int4-g32"):
        QuantWeight.stack([a, b])
    assert not QuantWeight.can_concat([w, w])  # stacks never fuse along rows


def test_repack_weights_takes_stacks_with_a_layout():
    rng = np.random.default_rng(2)
    stack = lambda t, shape: GGUFWeight.from_numpy(_random_bytes(rng, t, shape).reshape(*shape[:-1], -1), t, shape)
    tree = repack_weights({"q4k": stack("Q4_K", (2, 16, 256)), "q2k": stack("Q2_K", (2, 16, 256)),
                           "flat": stack("Q8_0", (16, 256)), "deep": stack("Q8_0", (2, 2, 16, 256))})
    assert isinstance(tree["q4k"], QuantWeight) and tree["q4k"].shape == (2, 16, 256)
    assert isinstance(tree["flat"], QuantWeight) and tree["flat"].ndim == 2
    assert isinstance(tree["q2k"], GGUFWeight)  # no kernel layout: block-decoded
    assert isinstance(tree["deep"], GGUFWeight) and "3-D [experts, out, in]" in can_repack(tree["deep"])


# --- the reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [1, 40])
def test_reference_over_quantweight_stacks(tokens):
    """"xla_dequant" on QuantWeight stacks (mixed with a GGUFWeight and a dense stack) equals the
    dense reference on the dequantized stacks; decode gathers, prefill scans; shards add up."""
    rng = np.random.default_rng(3)
    gate, gate_d = _stack(rng, "Q4_K", E, F, H)
    up, up_d, up_gguf = _gguf_stack(rng, "Q6_K", E, F, H)
    down, down_d = _stack(rng, "GPTQ-int4", E, H, F)
    x = _x(rng, tokens, gate_d).reshape(1, tokens, H)
    ids, w = _routing(rng, tokens)
    ids, w = ids.reshape(1, tokens, K), w.reshape(1, tokens, K)
    # Forced: on a GPU the kernels would be chosen first.
    run = jax.jit(partial(Ops(force=(("moe_experts", "xla_dequant"),)).moe_experts, kind="silu"))
    want = jax.jit(partial(Ops(force=(("moe_experts", "xla"),)).moe_experts, kind="silu"))(
        x, ids, w, jnp.asarray(gate_d), jnp.asarray(up_d), jnp.asarray(down_d))
    for stacks in ((gate, up, down), (gate, up_gguf, jnp.asarray(down_d))):
        with record_dispatch() as log:
            got = run(x, ids, w, *stacks)
        assert summarize(log)["moe_experts"] == "xla_dequant"
        assert _rel(got, want) < _tol(jnp.float32)
    halves = [run(x, ids, w, gate[lo: lo + E // 2], up[lo: lo + E // 2], down[lo: lo + E // 2],
                  expert_offset=jnp.int32(lo)) for lo in (0, E // 2)]
    assert _rel(halves[0] + halves[1], want) < _tol(jnp.float32)


@pytest.mark.parametrize("tokens", [1, 64])
def test_reference_never_holds_the_dense_stack(tokens):
    """Decode dequantizes only the gathered experts (k of E); prefill one expert at a time."""
    rng = np.random.default_rng(4)
    e = 16
    gate, up, down = (_stack(rng, "Q8_0", e, F, H)[0], _stack(rng, "Q4_K", e, F, H)[0],
                      _stack(rng, "GPTQ-int4", e, H, F)[0])
    x = jnp.ones((1, tokens, H), jnp.float32)
    ids = jnp.zeros((1, tokens, K), jnp.int32)
    w = jnp.full((1, tokens, K), 0.5, jnp.float32)
    jaxpr = jax.make_jaxpr(partial(Ops(platform="cpu").moe_experts, kind="silu"))(x, ids, w, gate, up, down)
    from test_moe_gguf import _largest_float

    biggest = _largest_float(jaxpr.jaxpr)
    assert biggest <= (K * F * H if tokens == 1 else max(F * H, tokens * max(F, H)))


# --- the kernels -----------------------------------------------------------------------------------

def _check_op(x, ids, w, gate, gate_d, up, up_d, down, down_d, *, offset=0, config=CFG, dtype=jnp.float32):
    """The kernel op against the dense reference op on the dequantized float32 stacks."""
    got = gq.moe_experts_quant(jnp.asarray(x, dtype), jnp.asarray(ids), jnp.asarray(w), gate, up, down, "silu",
                               expert_offset=offset, config=config, interpret=INTERPRET)
    assert got.shape == x.shape and got.dtype == dtype
    want = moe_ops.moe_experts(jnp.asarray(x, dtype), jnp.asarray(ids), jnp.asarray(w), jnp.asarray(gate_d),
                               None if up_d is None else jnp.asarray(up_d), jnp.asarray(down_d), "silu",
                               expert_offset=offset, ops=Ops(platform="cpu"))
    err = _rel(got, want)
    assert err < _tol(dtype), err
    return got, want


def test_kernels_against_their_references():
    """gate_up and down alone (mixed formats, as a Q4_K_M file has them), on the rows that are
    entries, against the jnp references beside them."""
    rng = np.random.default_rng(10)
    t = 17
    gate, gate_d = _stack(rng, "Q4_K", E, F, H)
    up, _ = _stack(rng, "Q6_K", E, F, H)
    down, _ = _stack(rng, "Q8_0", E, H, F)
    x = jnp.asarray(_x(rng, t, gate_d))
    ids, w = _routing(rng, t)
    al = align_block_size(jnp.asarray(ids), num_experts=E, block_m=16)
    real = np.asarray(al.sorted_ids) < t * K
    act = gq.gate_up(x, al, gate, up, "silu", top_k=K, tiles=CFG.gate_up, interpret=INTERPRET)
    ref_act = gq.gate_up_reference(x, al, gate, up, "silu", top_k=K)
    assert _rel(np.asarray(act)[real], np.asarray(ref_act)[real]) < _tol(jnp.float32)
    routing = sorted_routing(al, jnp.asarray(w))
    y = gq.down(act, al, routing, down, tiles=CFG.down, interpret=INTERPRET)
    ref_y = gq.down_reference(act, al, routing, down)
    assert _rel(np.asarray(y)[real], np.asarray(ref_y)[real]) < _tol(jnp.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("t", [1, 3, 64])
def test_moe_experts_quant_matches_reference(fmt, t):
    """Decode-sized (T = 1: the sort-free alignment at E = 8; T = 3) and prefill-sized (T = 64) batches."""
    rng = np.random.default_rng(20 + t)
    (gate, gate_d), (up, up_d), (down, down_d) = (_stack(rng, fmt, E, F, H), _stack(rng, fmt, E, F, H),
                                                  _stack(rng, fmt, E, H, F))
    ids, w = _routing(rng, t)
    _check_op(_x(rng, t, gate_d), ids, w, gate, gate_d, up, up_d, down, down_d)


@pytest.mark.parametrize("t", [3, 64])
def test_fused_gate_up_stack(t):
    """One [E, 2F, H] stack ([gate_e; up_e] rows per expert), the default config's tiles."""
    rng = np.random.default_rng(30 + t)
    gate_up, gate_up_d = _stack(rng, "Q4_K", E, 2 * F, H)
    down, down_d = _stack(rng, "Q6_K", E, H, F)
    ids, w = _routing(rng, t)
    _check_op(_x(rng, t, gate_up_d[:, :F]), ids, w, gate_up, gate_up_d, None, None, down, down_d, config=None)


def test_skewed_routing_and_leading_dims():
    """All 64 tokens' first slot on expert 6 and second on 2 (several blocks of each, six experts
    with no token), k = 1, and x with two leading dims."""
    rng = np.random.default_rng(40)
    (gate, gate_d), (up, up_d), (down, down_d) = (_stack(rng, "Q5_K", E, F, H), _stack(rng, "Q4_0", E, F, H),
                                                  _stack(rng, "Q8_0", E, H, F))
    x = _x(rng, 64, gate_d)
    ids = np.stack([np.full(64, 6), np.full(64, 2)], 1).astype(np.int32)
    _check_op(x, ids, rng.uniform(size=(64, K)).astype(np.float32), gate, gate_d, up, up_d, down, down_d)
    _check_op(x[:17], np.full((17, 1), 4, np.int32), np.ones((17, 1), np.float32), gate, gate_d, up, up_d, down,
              down_d)
    ids, w = _routing(rng, 10)
    got = gq.moe_experts_quant(jnp.asarray(x[:10].reshape(2, 5, H)), jnp.asarray(ids.reshape(2, 5, K)),
                               jnp.asarray(w.reshape(2, 5, K)), gate, up, down, "silu", interpret=INTERPRET)
    flat, _ = _check_op(x[:10], ids, w, gate, gate_d, up, up_d, down, down_d, config=None)
    np.testing.assert_array_equal(np.asarray(got).reshape(10, H), np.asarray(flat))


@pytest.mark.parametrize("t", [1, 17])
def test_expert_offset_shards_sum_to_whole(t):
    """A shard holding experts [offset, offset + 4) gives its slots' share (slots of the other shard
    add zero), with a traced offset; the two shards sum to the whole; a shard nobody is routed to
    gives zeros."""
    rng = np.random.default_rng(50 + t)
    (gate, gate_d), (up, up_d), (down, down_d) = (_stack(rng, "Q4_K", E, F, H), _stack(rng, "Q4_K", E, F, H),
                                                  _stack(rng, "GPTQ-int4", E, H, F))
    x = _x(rng, t, gate_d)
    ids, w = _routing(rng, t)
    for lo, n in ((0, 4), (4, 4), (2, 3)):
        sl = slice(lo, lo + n)
        _check_op(x, ids, w, gate[sl], gate_d[sl], up[sl], up_d[sl], down[sl], down_d[sl], offset=lo)
    shard = jax.jit(lambda off, g, u, d: gq.moe_experts_quant(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), g,
                                                              u, d, "silu", expert_offset=off, config=CFG,
                                                              interpret=INTERPRET))
    total = sum(np.asarray(shard(jnp.int32(o), gate[o:o + 4], up[o:o + 4], down[o:o + 4])) for o in (0, 4))
    whole = moe_ops.moe_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), jnp.asarray(gate_d),
                                jnp.asarray(up_d), jnp.asarray(down_d), "silu", ops=Ops(platform="cpu"))
    assert _rel(total, whole) < _tol(jnp.float32)
    assert not np.asarray(shard(jnp.int32(8), gate[:4], up[:4], down[:4])).any()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
    rng = np.random.default_rng(60)
    (gate, gate_d), (up, up_d), (down, down_d) = (_stack(rng, "Q4_K", E, F, H), _stack(rng, "Q6_K", E, F, H),
                                                  _stack(rng, "GPTQ-int4", E, H, F))
    for t in (1, 64):
        ids, w = _routing(rng, t)
        _check_op(_x(rng, t, gate_d), ids, w, gate, gate_d, up, up_d, down, down_d, dtype=dtype)


def test_unsupported_names_what_does_not_fit():
    rng = np.random.default_rng(70)
    gate, gate_d, gate_gguf = _gguf_stack(rng, "Q4_K", E, F, H)
    down, _ = _stack(rng, "Q8_0", E, H, F)
    ordered, _ = _gptq_stack(rng, E, F, H, act_order=True)
    x = jnp.ones((3, H), jnp.float32)
    ids, w = map(jnp.asarray, _routing(rng, 3))
    check = partial(gq.unsupported, x, ids, w)
    assert check(gate, gate, down, "silu") is None
    assert "not a QuantWeight stack" in check(gate_gguf, gate, down, "silu")
    assert "not a QuantWeight stack" in check(jnp.asarray(gate_d), gate, down, "silu")
    assert "act-order" in check(gate, ordered, down, "silu")
    assert "activation 'gelu'" in check(gate, gate, down, "gelu")
    assert "not a power of two" in gq.unsupported(x, ids, w, gate, gate, down, "silu",
                                                  gq.QuantMoeConfig(16, gq.Tiles(48, 128), gq.Tiles()))
    assert "fewer than 16" in gq.unsupported(x, ids, w, gate, gate, down, "silu",
                                             gq.QuantMoeConfig(16, gq.Tiles(64, 16), gq.Tiles()))
    assert "not a multiple of block_k 512" in gq.unsupported(x, ids, w, gate, gate, down, "silu",
                                                             gq.QuantMoeConfig(16, gq.Tiles(64, 512), gq.Tiles()))
    wide, _ = _stack(rng, "Q8_0", E, H, 2 * F)
    assert "do not fit hidden" in check(gate, gate, wide, "silu")
    assert "block_m 8" in gq.unsupported(x, ids, w, gate, gate, down, "silu", gq.QuantMoeConfig(8))
    assert "differ" in gq.unsupported(x, ids, w[:, :1], gate, gate, down, "silu")
    assert "bfloat16/float16/float32" in gq.unsupported(x.astype(jnp.int32), ids, w, gate, gate, down, "silu")
    with pytest.raises(ValueError, match=r"moe_experts_quant: the up int4-g32 stack has GPTQ act-order"):
        gq.moe_experts_quant(x, ids, w, gate, ordered, down, "silu", interpret=INTERPRET)


def test_dispatch():
    rng = np.random.default_rng(80)
    gate, gate_d, gate_gguf = _gguf_stack(rng, "Q4_K", E, F, H)
    down, down_d = _stack(rng, "Q8_0", E, H, F)
    x = jnp.ones((3, H), jnp.bfloat16)
    ids, w = map(jnp.asarray, _routing(rng, 3))
    gpu = Ops(platform="gpu")
    impl, _ = gpu.choose("moe_experts", x, ids, w, gate, gate, down, "silu", expert_offset=0, ops=None)
    assert impl.name == "pallas_grouped_quant"
    impl, choice = gpu.choose("moe_experts", x, ids, w, gate_gguf, gate, down, "silu", expert_offset=0, ops=None)
    assert impl.name == "xla_dequant" and "GGUFWeight Q4_K" in str(choice)
    dense = [jnp.asarray(a, jnp.bfloat16) for a in (gate_d, gate_d, down_d)]
    impl, _ = gpu.choose("moe_experts", x, ids, w, *dense, "silu", expert_offset=0, ops=None)
    assert impl.name == "pallas_grouped"  # dense stacks keep their kernel
    assert "not a QuantWeight stack" in moe_kernels._grouped_quant_applies(x, ids, w, *dense, "silu")
    impl, choice = Ops(platform="cpu").choose("moe_experts", x, ids, w, gate, gate, down, "silu", ops=None)
    assert impl.name == "xla_dequant" and "pallas_grouped_quant: not on cpu" in str(choice)


# --- CUDA lowering at Qwen3-30B-A3B's MoE shapes ------------------------------------------------------

QWEN3_30B = dict(e=128, k=8, h=2048, f=768)


def _abstract(fmt: str, shape: tuple[int, int, int]) -> QuantWeight:
    """A QuantWeight stack of ShapeDtypeStructs (nothing drawn)."""
    if fmt == "GPTQ-int4":
        e, n, k = shape
        one = lambda: QuantWeight.from_codes(jnp.zeros((n, k), jnp.uint8), jnp.ones((n, k // 128), jnp.float16),
                                             gptq_format(4, 128), zeros=jnp.zeros((n, k // 128), jnp.uint8))
        return jax.eval_shape(lambda: QuantWeight.stack([one()] * e))
    raw = jax.ShapeDtypeStruct(GGUFWeight.byte_shape(fmt, shape), jnp.uint8)
    return jax.eval_shape(lambda d: repack_gguf(GGUFWeight(d, fmt, shape)), raw)


def _lower_cuda(fn, *args) -> str:
    """The StableHLO of fn lowered for CUDA (runs the Pallas Triton lowering on this CPU machine)."""
    try:
        jax.jit(lambda a: a + 1).trace(jnp.ones(4)).lower(lowering_platforms=("cuda",))
    except Exception as e:  # noqa: BLE001  only whether this jax can target cuda at all
        pytest.skip(f"this jax cannot lower for cuda on the CPU: {str(e)[:200]}")
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("formats,fused", [(("Q4_K",) * 3, False), (("Q6_K",) * 3, False), (("Q8_0",) * 3, False),
                                           (("Q5_K",) * 3, False), (("Q4_0",) * 3, False),
                                           (("GPTQ-int4",) * 3, False), (("Q4_K", "Q6_K", "Q8_0"), False),
                                           (("Q4_K", None, "Q6_K"), True)])
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_lowers_for_cuda_at_qwen3_30b_shapes(formats, fused, t):
    e, k, h, f = QWEN3_30B.values()
    g_fmt, u_fmt, d_fmt = formats
    stacks = (_abstract(g_fmt, (e, 2 * f if fused else f, h)), None if fused else _abstract(u_fmt, (e, f, h)),
              _abstract(d_fmt, (e, h, f)))
    args = (jax.ShapeDtypeStruct((t, h), jnp.bfloat16), jax.ShapeDtypeStruct((t, k), jnp.int32),
            jax.ShapeDtypeStruct((t, k), jnp.float32), *stacks)
    assert gq.unsupported(*args, "silu") is None
    text = _lower_cuda(lambda x, i, w, g, u, d: gq.moe_experts_quant(x, i, w, g, u, d, "silu"), *args)
    assert text.count("__gpu$xla.gpu.triton") == 2  # gate_up and down


# --- models ----------------------------------------------------------------------------------------

GGUF_TYPES_BY_LAYER = {0: {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q6_K", "ffn_down_exps": "Q8_0"},
                       1: {"ffn_gate_exps": "Q5_K", "ffn_up_exps": "Q4_0", "ffn_down_exps": "Q2_K"}}


def test_gguf_moe_model_gets_quantweight_stacks(tmp_path, monkeypatch):
    """A tiny Qwen3-MoE GGUF file loaded packed: stacks with a kernel layout become QuantWeight
    stacks (Q2_K stays a GGUFWeight), the logits equal those of the same file run on its GGUFWeight
    stacks (no repack), and on a GPU the Q4_K layer would dispatch to the quantized kernel."""
    import test_moe_gguf as tg

    from ferrum_jax.loading.gguf import load_gguf
    from models.common import fuse_projections
    from models.moe import Moe

    monkeypatch.setitem(tg.TYPES, "qwen3moe", GGUF_TYPES_BY_LAYER)
    path, _, _, _ = tg.make_case(tmp_path, partial(tg.qwen3moe, seed=35, layers=2, dense=()), "quant-stacks")
    model = ferrum_jax.load(path, dtype="float32", dequantize=False, progress=False)
    cfg, raw, _ = load_gguf(path, dtype=jnp.float32, dequantize=False, progress=False)
    blocks = ferrum_jax.Model(cfg, fuse_projections(raw), None)
    for i, types in GGUF_TYPES_BY_LAYER.items():
        moe, moe_raw = model.weights.layers[i].mlp, blocks.weights.layers[i].mlp
        assert isinstance(moe, Moe)
        for proj in ("gate", "up", "down"):
            stack, qtype = getattr(moe, proj), types[f"ffn_{proj}_exps"]
            assert isinstance(getattr(moe_raw, proj), GGUFWeight)
            if qtype == "Q2_K":
                assert isinstance(stack, GGUFWeight)
            else:
                assert isinstance(stack, QuantWeight) and stack.fmt.name == qtype and stack.shape == (8, 256, 256)
                np.testing.assert_array_equal(np.asarray(stack.dequantize()),
                                              np.asarray(getattr(moe_raw, proj).dequantize()))
    prompts = [tg._prompt(15, tg.PROMPT_LEN), tg._prompt(16, tg.PROMPT_LEN - 5)]
    with record_dispatch() as log:
        got = tg.prefill_logits(model, prompts)
    # The Q2_K layer has no kernel layout: "xla_dequant" everywhere; the others take the kernel on a GPU.
    assert summarize(log)["moe_experts"] == ("xla_dequant" if INTERPRET else "pallas_grouped_quant,xla_dequant")
    want = tg.prefill_logits(blocks, prompts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

    def one_token(m) -> np.ndarray:  # T * k < E: the reference gathers the picked experts
        tokens, positions = jnp.asarray([[prompts[0][0]]], jnp.int32), jnp.zeros((1, 1), jnp.int32)
        return np.asarray(tg._forward(m.weights, tokens, positions, tg._cache(m, 1), cfg=m.config, ops=m.ops)[0])

    # Decode: the 2-D linears of both runs must take the same implementation (on a GPU a QuantWeight
    # linear of <= 4 rows is the dp4a kernel with int8 activations, ~1e-2 off the exact product; the
    # GGUFWeight ones decode blocks), so the reference is `model` itself with the file's GGUFWeight
    # expert stacks swapped in: only the MoE implementation differs.
    layers = tuple(dataclasses.replace(a, mlp=dataclasses.replace(a.mlp, gate=b.mlp.gate, up=b.mlp.up, down=b.mlp.down))
                   for a, b in zip(model.weights.layers, blocks.weights.layers))
    gguf_stacks = ferrum_jax.Model(cfg, dataclasses.replace(model.weights, layers=layers), None)
    if INTERPRET:
        np.testing.assert_allclose(one_token(model), one_token(gguf_stacks), rtol=1e-5, atol=1e-4)
    else:  # one token: the repacked stacks take pallas_decode_quant, int8 activations (~1e-2 off)
        assert _rel(one_token(model), one_token(gguf_stacks)) < 5e-2

    x = jnp.ones((1, 256), jnp.bfloat16)
    ids, w = map(jnp.asarray, _routing(np.random.default_rng(0), 1))
    layer0, layer1 = (model.weights.layers[i].mlp for i in (0, 1))
    impl, _ = Ops(platform="gpu").choose("moe_experts", x, ids, w, layer0.gate, layer0.up, layer0.down, "silu",
                                         ops=None)
    assert impl.name == "pallas_decode_quant"  # one token's 2 entries <= E / 4: decode-sized
    x3 = jnp.ones((3, 256), jnp.bfloat16)
    ids3, w3 = map(jnp.asarray, _routing(np.random.default_rng(0), 3))
    impl, _ = Ops(platform="gpu").choose("moe_experts", x3, ids3, w3, layer0.gate, layer0.up, layer0.down, "silu",
                                         ops=None)
    assert impl.name == "pallas_grouped_quant"
    impl, choice = Ops(platform="gpu").choose("moe_experts", x, ids, w, layer1.gate, layer1.up, layer1.down, "silu",
                                              ops=None)
    assert impl.name == "xla_dequant" and "GGUFWeight Q2_K" in str(choice)


# --- GPTQ-int4 MoE from HF safetensors ---------------------------------------------------------------

def _qwen3_moe_config() -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 384,
            "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 128, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 128,
            "tie_word_embeddings": False}


def _qwen3_moe_state(config: dict, seed: int) -> dict[str, np.ndarray]:
    import models

    cfg = models.config_from_hf(config)
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in models.family_of(cfg).tensor_shapes(cfg).items():
        if "norm" in name:
            state[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            std = 0.5 if "embed" in name else 1.5 / np.sqrt(shape[-1])
            state[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return state


def _dequantized_checkpoint(quant_dir: Path, qcfg, out: Path) -> Path:
    """The GPTQ checkpoint with every packed layer replaced by the numpy oracle's dense weight."""
    from safetensors.numpy import load_file, save_file

    from ferrum_jax.quant.gptq import dequantize_numpy

    state = load_file(str(quant_dir / "model.safetensors"))
    dense = {k: v for k, v in state.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for name in [k for k in state if k.endswith(".qweight")]:
        prefix = name[: -len(".qweight")]
        parts = {s: state[f"{prefix}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx") if f"{prefix}.{s}" in state}
        dense[prefix + ".weight"] = dequantize_numpy(parts, qcfg)
    out.mkdir(parents=True)
    save_file(dense, str(out / "model.safetensors"))
    config = json.loads((quant_dir / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_moe_checkpoint_loads_quantweight_stacks(tmp_path, act_order):
    """A tiny random Qwen3-MoE quantized to GPTQ-int4 (per-expert `mlp.experts.{i}.gate_proj.qweight`
    ...) loads its experts as QuantWeight stacks with the same logits as the checkpoint dequantized
    by the numpy oracle; the stacks run through the quantized kernels (act-order ones decline)."""
    from ferrum_jax.quant.gptq import QuantConfig, write_quantized_checkpoint

    qcfg = QuantConfig("gptq", 4, 32, desc_act=act_order, sym=False, checkpoint_format="gptq")
    config = _qwen3_moe_config()
    quant_dir = write_quantized_checkpoint(_qwen3_moe_state(config, 7), tmp_path / "quant", qcfg, config=config)
    model = ferrum_jax.load(quant_dir, dtype="float32", progress=False)
    ref = ferrum_jax.load(_dequantized_checkpoint(quant_dir, qcfg, tmp_path / "ref"), dtype="float32", progress=False)
    for layer in model.weights.layers:
        moe = layer.mlp
        # gate/up fused per expert at load ([gate_e; up_e]: [8, 256, 128]) unless act-order keeps them apart
        assert (moe.up is None) == (not act_order)
        stacks = ((moe.gate, (8, 128 if act_order else 256, 128)), (moe.down, (8, 128, 128)))
        stacks += ((moe.up, (8, 128, 128)),) if act_order else ()
        for stack, shape in stacks:
            assert isinstance(stack, QuantWeight) and stack.shape == shape and stack.fmt == gptq_format(4, 32)
            assert (stack.perm is not None) == act_order
        assert isinstance(moe.router, jax.Array)
    ids = np.random.default_rng(3).integers(0, 384, 20).tolist()
    got, want = ferrum_jax.logits(model, ids), ferrum_jax.logits(ref, ids)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(got).max() > 0.1  # not a degenerate model

    moe, ref_moe = model.weights.layers[0].mlp, ref.weights.layers[0].mlp
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    r_ids, r_w = map(jnp.asarray, _routing(rng, 3))
    reason = gq.unsupported(x, r_ids, r_w, moe.gate, moe.up, moe.down, "silu")
    if act_order:
        assert "act-order" in reason
        return
    assert reason is None
    got = gq.moe_experts_quant(x, r_ids, r_w, moe.gate, moe.up, moe.down, "silu", interpret=INTERPRET)
    want = moe_ops.moe_experts(x, r_ids, r_w, ref_moe.gate, ref_moe.up, ref_moe.down, "silu",
                               ops=Ops(platform="cpu"))
    assert _rel(got, want) < _tol(jnp.float32)


def test_gptq_moe_experts_of_mixed_quantization_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from ferrum_jax.quant.gptq import QuantConfig, write_quantized_checkpoint

    config = _qwen3_moe_config()
    state = _qwen3_moe_state(config, 8)
    quant_dir = write_quantized_checkpoint(state, tmp_path / "quant", QuantConfig("gptq", 4, 32), config=config)
    # One expert's up projection dense instead of quantized: a stack cannot mix the two.
    tensors = load_file(str(quant_dir / "model.safetensors"))
    prefix = "model.layers.1.mlp.experts.3.up_proj"
    for suffix in ("qweight", "qzeros", "scales", "g_idx"):
        tensors.pop(f"{prefix}.{suffix}")
    tensors[prefix + ".weight"] = state[prefix + ".weight"]
    save_file(tensors, str(quant_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight' is a "):
        ferrum_jax.load(quant_dir, dtype="float32", progress=False)


# --- the benchmark script ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["Q4_K", "GPTQ-int4"])
def test_bench_quant_smoke(tmp_path, fmt):
    """bench/moe.py --format: tiny shapes on the CPU (interpret mode), one JSON with both sweeps."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}  # an exact oracle on a GPU too
    proc = subprocess.run([sys.executable, str(repo / "bench" / "moe.py"), "--format", fmt, "--smoke", "--out",
                           str(tmp_path), "--commit", "abc123"], capture_output=True, text=True, timeout=300, cwd=repo,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = list(tmp_path.glob(f"moe_bench-{fmt}_smoke_*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["format"] == fmt and data["commit"] == "abc123" and data["expert_bytes_packed"] > 0
    for p in data["prefill"]:
        assert p["grouped_quant"]["rel_err_vs_xla_dequant"] < _tol(jnp.float32)
        assert p["grouped_dense"]["rel_err_vs_xla_dequant"] < _tol(jnp.float32)
        assert p["config"]["gate_up"]["block_n"] > 0
    for d in data["decode"]:
        for name in ("grouped_quant", "xla_dequant", "grouped_dense"):
            assert d[name]["active_weight_bytes"] > 0 and d[name]["bw_fraction"] > 0
        assert d["grouped_quant"]["active_weight_bytes"] < d["grouped_dense"]["active_weight_bytes"]
