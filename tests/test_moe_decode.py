"""The decode-sized MoE kernels: routing (pallas_kernels/moe/route.py) and the GEMV expert kernels
(pallas_kernels/moe/decode.py), in interpret mode on the CPU (the real kernels on a GPU), and their
CUDA lowering at Qwen3-30B-A3B shapes.

Oracles: float64 numpy written from the definitions (softmax, a stable descending argsort, the
per-(token, slot) expert MLP loop of test_moe_kernels), and the XLA reference ops
`ferrum_jax.moe_ops.moe_route` / `moe_experts`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import moe_kernels, moe_ops
from ferrum_jax.backend import Ops
from pallas_kernels.moe import decode as moe_decode
from pallas_kernels.moe import route as moe_route
from tests.test_moe_kernels import ACTS, _lower_cuda, _numpy_moe, _stacks

INTERPRET = jax.default_backend() != "gpu"
QWEN3_30B = dict(experts=128, top_k=8, hidden=2048, ff=768)
E, H, F = 32, 64, 48
SMALL = moe_decode.DecodeConfig(moe_decode.GemvTiles(16, 32), moe_decode.GemvTiles(16, 16))  # several programs, steps


def _numpy_route(logits: np.ndarray, k: int, norm: bool) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[..., :k]  # descending, ties by index
    w = np.take_along_axis(p, ids, -1)
    if norm:
        w = w / w.sum(-1, keepdims=True)
    return w, ids


# --- routing -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,k,norm", [((1, 128), 8, True), ((3, 5, 60), 4, False), ((37, 128), 8, True),
                                          ((2, 8), 8, True), ((1, 7), 3, False), ((20, 33), 1, True)])
def test_route_matches_numpy_and_reference(shape, k, norm):
    logits = jax.random.normal(jax.random.PRNGKey(len(shape) * 31 + k), shape, jnp.float32) * 3
    w, ids = moe_route.route_topk(logits, top_k=k, norm_topk_prob=norm, interpret=INTERPRET)
    assert w.shape == ids.shape == (*shape[:-1], k) and w.dtype == jnp.float32 and ids.dtype == jnp.int32
    wn, idn = _numpy_route(np.asarray(logits), k, norm)
    np.testing.assert_array_equal(np.asarray(ids), idn)
    np.testing.assert_allclose(np.asarray(w), wn, rtol=2e-6, atol=1e-7)
    wr, idr = moe_ops.moe_route(logits, jnp.eye(shape[-1], dtype=jnp.float32), top_k=k, norm_topk_prob=norm,
                                ops=Ops())
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(idr))
    np.testing.assert_allclose(np.asarray(w), np.asarray(wr), rtol=2e-6, atol=1e-7)


def test_route_ties_pick_the_lower_expert_first():
    logits = jnp.zeros((3, 16), jnp.float32).at[0, 3].set(1.0).at[1, 9].set(-1.0)
    w, ids = moe_route.route_topk(logits, top_k=4, norm_topk_prob=False, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(ids), [[3, 0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3]])
    np.testing.assert_allclose(np.asarray(w), _numpy_route(np.asarray(logits), 4, False)[0], rtol=2e-6)


def test_route_bf16_logits_and_extremes():
    """bf16 logits are routed in float32; a huge logit takes all the weight, others underflow to 0."""
    logits = jax.random.normal(jax.random.PRNGKey(3), (5, 64), jnp.float32).at[2, 7].set(500.0)
    w, ids = moe_route.route_topk(logits.astype(jnp.bfloat16), top_k=6, norm_topk_prob=True, interpret=INTERPRET)
    wn, idn = _numpy_route(np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32)), 6, True)
    np.testing.assert_array_equal(np.asarray(ids)[[0, 1, 3, 4]], idn[[0, 1, 3, 4]])
    assert int(ids[2, 0]) == 7 and float(w[2, 0]) == 1.0 and np.all(np.asarray(w)[2, 1:] == 0)
    np.testing.assert_allclose(np.asarray(w), wn, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("shape,k,match", [((2, 2048), 8, "2048 experts"), ((2, 16), 17, "top_k 17"),
                                           ((2, 16), 0, "top_k 0")])
def test_route_rejects_with_reason(shape, k, match):
    with pytest.raises(ValueError, match=match):
        moe_route.route_topk(jnp.zeros(shape), top_k=k, norm_topk_prob=True, interpret=True)
    assert match in moe_route.unsupported(jnp.zeros(shape), k)
    assert "not floating" in moe_route.unsupported(jnp.zeros((2, 16), jnp.int32), 2)


# --- the GEMV expert kernels ------------------------------------------------------------------------------

def _case(seed: int, t: int, k: int, *, fused: bool, offset: int = 0, e_global: int = E, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    wg, wu, wd = _stacks(rng, E, H, F)
    ids = np.stack([rng.permutation(e_global)[:k] for _ in range(t)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    w /= w.sum(1, keepdims=True)
    x = rng.standard_normal((t, H)).astype(np.float32)
    want = _numpy_moe(x, ids, w, wg, wu, wd, offset=offset)
    gate, up = (np.concatenate([wg, wu], axis=1), None) if fused else (wg, wu)
    arrays = tuple(None if a is None else jnp.asarray(a, dtype) for a in (x, gate, up, wd))
    return arrays, jnp.asarray(ids), jnp.asarray(w), want


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("t,k", [(1, 8), (2, 4), (4, 2), (1, 1)])
def test_decode_matches_numpy(t, k, fused):
    (x, g, u, d), ids, w, want = _case(t * 10 + k, t, k, fused=fused)
    got = moe_decode.moe_experts_decode(x, ids, w, g, u, d, "silu", config=SMALL, interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
    ref = moe_ops.moe_experts(x, ids, w, g, u, d, "silu", ops=Ops())
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["gelu_pytorch_tanh", "relu", "gelu_new"])
def test_decode_activations(kind):
    (x, g, u, d), ids, w, _ = _case(5, 2, 3, fused=False)
    got = moe_decode.moe_experts_decode(x, ids, w, g, u, d, kind, config=SMALL, interpret=INTERPRET)
    if kind in ACTS:
        want = _numpy_moe(np.asarray(x), np.asarray(ids), np.asarray(w), np.asarray(g), np.asarray(u), np.asarray(d),
                          kind=kind)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
    ref = moe_ops.moe_experts(x, ids, w, g, u, d, kind, ops=Ops())
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("offset", [0, 16, 40])
def test_decode_expert_parallel_slice(offset):
    """A local stack of experts [offset, offset + 32) out of 64: slots routed elsewhere add nothing
    (offset 40: some slots land past the local range on both sides)."""
    (x, g, u, d), ids, w, want = _case(offset + 1, 1, 8, fused=False, offset=offset, e_global=E * 2)
    got = moe_decode.moe_experts_decode(x, ids, w, g, u, d, "silu", expert_offset=offset, config=SMALL,
                                        interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
    traced = jax.jit(lambda o: moe_decode.moe_experts_decode(x, ids, w, g, u, d, "silu", expert_offset=o,
                                                             config=SMALL, interpret=INTERPRET))(jnp.int32(offset))
    np.testing.assert_allclose(np.asarray(traced), want, rtol=2e-5, atol=2e-6)


def test_decode_tokens_sharing_experts_and_batch_dims():
    """Skewed routing: every token picks the same k experts; x carries [batch, 1, H] dims."""
    (x, g, _, d), _, w, _ = _case(9, 4, 2, fused=True)
    ids = jnp.asarray(np.tile([[5, 30]], (4, 1)).astype(np.int32))
    want = _numpy_moe(np.asarray(x), np.asarray(ids), np.asarray(w), np.asarray(g)[:, :F], np.asarray(g)[:, F:],
                      np.asarray(d))
    got = moe_decode.moe_experts_decode(x[:, None], ids[:, None], w[:, None], g, None, d, "silu", config=SMALL,
                                        interpret=INTERPRET)
    assert got.shape == (4, 1, H)
    np.testing.assert_allclose(np.asarray(got)[:, 0], want, rtol=2e-5, atol=2e-6)


def test_decode_bf16_within_rounding():
    (x, g, u, d), ids, w, _ = _case(11, 1, 8, fused=False, dtype=jnp.bfloat16)
    got = moe_decode.moe_experts_decode(x, ids, w, g, u, d, "silu", interpret=INTERPRET)  # default tiles, cut to fit
    f32 = [np.asarray(a.astype(jnp.float32)) for a in (x, g, u, d)]
    want = _numpy_moe(f32[0], np.asarray(ids), np.asarray(w), *f32[1:])
    assert got.dtype == jnp.bfloat16
    # act is rounded to bf16 once (as the reference does), the output once: a few bf16 ulps.
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=3e-2, atol=3e-2 * np.abs(want).max())


def test_decode_declines_with_reasons():
    (x, g, u, d), ids, w, _ = _case(1, 1, 8, fused=False)
    assert moe_decode.unsupported(x, ids, w, g, u, d, "silu") is None
    big = jnp.zeros((2, 8), jnp.int32)  # 16 entries > E/4 = 8
    assert "not decode-sized" in moe_decode.unsupported(jnp.zeros((2, H)), big, big.astype(jnp.float32), g, u, d, "silu")
    assert "gelu" in moe_decode.unsupported(x, ids, w, g, u, d, "gelu")
    assert "do not fit hidden" in moe_decode.unsupported(x, ids, w, g, u, d[:, :, :5], "silu")
    with pytest.raises(ValueError, match="not decode-sized"):
        moe_decode.moe_experts_decode(jnp.zeros((2, H)), big, big.astype(jnp.float32), g, u, d, "silu", interpret=True)
    # the op's dispatch: registered ahead of the grouped kernels, GPU only; the reference on the CPU
    assert moe_kernels._decode_applies(x, ids, w, g, u, d, "silu") is None
    assert Ops().choose("moe_experts", x, ids, w, g, u, d, "silu")[0].name == (
        "pallas_decode" if jax.default_backend() == "gpu" else "xla")


def test_choose_config_cuts_tiles_to_fit():
    cfg = moe_decode.choose_config(2048, 768)
    assert 768 % cfg.gate_up.block_n == 0 and 2048 % cfg.gate_up.block_k == 0
    assert 2048 % cfg.down.block_n == 0 and 768 % cfg.down.block_k == 0
    odd = moe_decode.choose_config(96, 40, moe_decode.DecodeConfig(moe_decode.GemvTiles(64, 64),
                                                                  moe_decode.GemvTiles(64, 64)))
    assert (odd.gate_up.block_n, odd.gate_up.block_k, odd.down.block_n, odd.down.block_k) == (8, 32, 32, 8)


def test_choose_config_gives_wide_down_rows_the_wide_tiles():
    """Qwen3-30B-A3B's 8 x 768 bf16 slot rows (12 KB) keep the one-row, one-warp default; Mixtral's
    2 x 14336 (56 KB) and float32 stacks past WIDE_DOWN_BYTES take WIDE_DOWN_TILES (cut to the
    shape); an explicit config is kept."""
    qwen = moe_decode.choose_config(2048, 768, top_k=8, itemsize=2).down
    assert (qwen.block_n, qwen.block_k, qwen.num_warps) == (1, 256, 1)
    wide = moe_decode.WIDE_DOWN_TILES
    mixtral = moe_decode.choose_config(4096, 14336, top_k=2, itemsize=2).down
    assert (mixtral.block_n, mixtral.block_k, mixtral.num_warps) == (wide.block_n, wide.block_k, wide.num_warps)
    assert moe_decode.choose_config(2048, 768, top_k=8, itemsize=4).down.block_n == wide.block_n  # 24 KB
    assert moe_decode.choose_config(2, 768, top_k=8, itemsize=4).down.block_n == 2  # cut to H
    given = moe_decode.DecodeConfig(moe_decode.GemvTiles(8, 1024), moe_decode.GemvTiles(1, 256, 1))
    assert moe_decode.choose_config(4096, 14336, given, top_k=2).down == moe_decode.GemvTiles(1, 1024, 1)


# --- CUDA lowering at Qwen3-30B-A3B shapes ----------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 4])
@pytest.mark.parametrize("fused", [False, True])
def test_decode_lowers_for_cuda(t, fused):
    e, k, h, f = QWEN3_30B.values()
    bf = jnp.bfloat16
    args = (jax.ShapeDtypeStruct((t, h), bf), jax.ShapeDtypeStruct((t, k), jnp.int32),
            jax.ShapeDtypeStruct((t, k), jnp.float32), jax.ShapeDtypeStruct((e, 2 * f if fused else f, h), bf),
            None if fused else jax.ShapeDtypeStruct((e, f, h), bf), jax.ShapeDtypeStruct((e, h, f), bf))
    text = _lower_cuda(lambda x, i, w, g, u, d: moe_decode.moe_experts_decode(x, i, w, g, u, d, "silu"), *args)
    assert text.count("__gpu$xla.gpu.triton") == 2  # gate_up and down


@pytest.mark.parametrize("t", [1, 64])
def test_route_lowers_for_cuda(t):
    text = _lower_cuda(lambda l: moe_route.route_topk(l, top_k=8, norm_topk_prob=True),
                       jax.ShapeDtypeStruct((t, 128), jnp.bfloat16))
    assert text.count("__gpu$xla.gpu.triton") == 1
