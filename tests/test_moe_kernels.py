"""The MoE Pallas kernels (pallas_kernels/moe/) in interpret mode on the CPU, and their CUDA lowering.

Oracles: a numpy moe_align_block_size written from its definition, float64 numpy loops over
(token, slot) for the expert MLPs, and the XLA reference op `ferrum_jax.moe_ops.moe_experts`.
Small shapes (E=8, top-2, hidden 64, ff 128); the lowering checks use Qwen3-30B-A3B's shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferrum_jax import moe_kernels, moe_ops
from ferrum_jax.backend import Ops
from pallas_kernels import moe
from pallas_kernels.moe import align as align_mod

INTERPRET = jax.default_backend() != "gpu"  # the real kernels on a GPU, interpret mode elsewhere

E, K, H, F = 8, 2, 64, 128
TOKENS = [1, 3, 17, 64]
CFG = moe.MoeConfig(block_m=16, gate_up=moe.Tiles(32, 32), down=moe.Tiles(32, 64))  # several programs and K steps
REPO = Path(__file__).resolve().parents[1]


def _routing(rng, t: int, e: int = E, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    ids = np.argsort(rng.standard_normal((t, e)), axis=1)[:, :k].astype(np.int32)  # k distinct experts a token
    w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    return ids, w / w.sum(1, keepdims=True)


def _stacks(rng, e: int = E, h: int = H, f: int = F) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple((rng.standard_normal(s) / np.sqrt(s[2])).astype(np.float32) for s in ((e, f, h), (e, f, h), (e, h, f)))


def _silu(g):
    return g / (1 + np.exp(-g))


ACTS = {"silu": _silu,
        "gelu_pytorch_tanh": lambda g: 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))}


def _numpy_moe(x, ids, w, wg, wu, wd, kind="silu", offset=0) -> np.ndarray:
    """float64 loop over (token, slot): slots routed outside [offset, offset + E_local) add nothing."""
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s]) - offset
            if 0 <= e < wg.shape[0]:
                out[t] += float(w[t, s]) * (wd[e] @ (ACTS[kind](wg[e] @ x[t]) * (wu[e] @ x[t])))
    return out


def _numpy_align(ids: np.ndarray, e: int, block_m: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted entries of the valid blocks, with -1 padding; expert of each valid block), by definition."""
    flat = ids.reshape(-1) - offset
    rows, experts = [], []
    for x in range(e):
        mine = [i for i in range(flat.size) if flat[i] == x]
        nb = -(-len(mine) // block_m)
        rows += mine + [-1] * (nb * block_m - len(mine))
        experts += [x] * nb
    return np.array(rows, np.int64), np.array(experts, np.int64)


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# --- alignment ---------------------------------------------------------------------------------------

def _check_alignment(ids: np.ndarray, e: int, block_m: int, offset: int = 0) -> moe.Alignment:
    al = jax.jit(lambda i, o: moe.align_block_size(i, num_experts=e, block_m=block_m, expert_offset=o))(
        jnp.asarray(ids), jnp.int32(offset))
    nk = ids.size
    rows, experts = _numpy_align(ids, e, block_m, offset)
    nvb = int(al.num_valid_blocks[0])
    sorted_ids, positions = np.asarray(al.sorted_ids), np.asarray(al.positions)
    assert al.max_blocks == (nk + min(e, nk) * (block_m - 1)) // block_m == moe.max_blocks(nk, e, block_m)
    assert sorted_ids.shape == (al.max_blocks * block_m,) and nvb == len(experts) <= al.max_blocks
    np.testing.assert_array_equal(sorted_ids[:nvb * block_m], np.where(rows < 0, nk, rows))
    np.testing.assert_array_equal(np.asarray(al.expert_of_block)[:nvb], experts)
    assert (sorted_ids[nvb * block_m:] == nk).all()  # past the valid blocks: only padding
    assert (0 <= np.asarray(al.expert_of_block)).all() and (np.asarray(al.expert_of_block) < e).all()
    local = (ids.reshape(-1) - offset >= 0) & (ids.reshape(-1) - offset < e)
    real = sorted_ids[sorted_ids < nk]
    assert sorted(real.tolist()) == np.flatnonzero(local).tolist()  # every local (token, slot) exactly once
    np.testing.assert_array_equal(sorted_ids[positions[local]], np.flatnonzero(local))
    assert (positions[~local] == sorted_ids.shape[0]).all()
    return al


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("block_m", [16, 32])
def test_align_matches_numpy(t, block_m):
    ids, _ = _routing(np.random.default_rng(t), t)
    al = _check_alignment(ids, E, block_m)
    if t * K <= E:
        assert al.max_blocks == t * K  # decode: a block per selected expert, no more


@pytest.mark.parametrize("offset,e_local", [(0, 4), (4, 4), (2, 3), (-3, 8), (8, 4)])
def test_align_expert_ranges(offset, e_local):
    """Only ids in [offset, offset + e_local) are kept (the expert-parallel shard)."""
    ids, _ = _routing(np.random.default_rng(5), 17)
    _check_alignment(ids, e_local, 16, offset)


def test_align_skewed():
    everyone = np.full((64, K), 3, np.int32)  # every slot on expert 3 (duplicates included)
    al = _check_alignment(everyone, E, 16)
    assert int(al.num_valid_blocks[0]) == 64 * K // 16
    half = np.stack([np.zeros(40, np.int32), np.full(40, 7, np.int32)], 1)  # experts 1..6 get nothing
    _check_alignment(half, E, 16)
    _check_alignment(np.array([[5, 5]], np.int32), E, 16)


def test_align_stable_sort_fallback(monkeypatch):
    monkeypatch.setattr(align_mod, "PACKED_SORT_LIMIT", 1)  # the two-operand stable sort path
    ids, _ = _routing(np.random.default_rng(6), 17)
    _check_alignment(ids, E, 16, 0)
    _check_alignment(ids, 4, 16, 2)


@pytest.mark.parametrize("t,offset,e_local", [(1, 0, E), (4, 0, E), (1, 2, 3), (1, 4, 4), (2, 8, 4), (1, -3, 8)])
@pytest.mark.parametrize("block_m", [16, 32])
def test_align_unsorted(t, offset, e_local, block_m):
    """The decode alignment: a block per local entry (local entries first, in entry order), no sort."""
    ids, _ = _routing(np.random.default_rng(60 + t), t)
    nk = ids.size
    al = jax.jit(lambda i, o: moe.align_unsorted(i, num_experts=e_local, block_m=block_m, expert_offset=o))(
        jnp.asarray(ids), jnp.int32(offset))
    flat = ids.reshape(-1) - offset
    local = (flat >= 0) & (flat < e_local)
    nvb = int(al.num_valid_blocks[0])
    sorted_ids = np.asarray(al.sorted_ids).reshape(nk, block_m)
    assert al.max_blocks == nk == moe.max_blocks(nk, e_local, block_m) and nvb == local.sum()
    np.testing.assert_array_equal(sorted_ids[:nvb, 0], np.flatnonzero(local))
    assert (sorted_ids[:, 1:] == nk).all() and (sorted_ids[nvb:] == nk).all()
    np.testing.assert_array_equal(np.asarray(al.expert_of_block)[:nvb], flat[local])
    assert ((0 <= np.asarray(al.expert_of_block)) & (np.asarray(al.expert_of_block) < e_local)).all()
    positions = np.asarray(al.positions)
    np.testing.assert_array_equal(np.asarray(al.sorted_ids)[positions[local]], np.flatnonzero(local))
    assert (positions[~local] == nk * block_m).all()


def test_align_for_picks_by_batch():
    one = jnp.asarray(_routing(np.random.default_rng(70), 1)[0])
    many = jnp.asarray(_routing(np.random.default_rng(71), 17)[0])
    assert int(moe.align_for(one, num_experts=E, block_m=16).num_valid_blocks[0]) == K  # one per entry
    assert moe.align_for(many, num_experts=E, block_m=16).max_blocks == moe.max_blocks(17 * K, E, 16)
    with pytest.raises(ValueError, match="T\\*k <= num_experts"):
        moe.align_unsorted(many, num_experts=E, block_m=16)


def test_align_bad_input():
    with pytest.raises(ValueError, match="block_m"):
        moe.align_block_size(jnp.zeros((2, 2), jnp.int32), num_experts=4, block_m=0)
    with pytest.raises(ValueError, match="integers"):
        moe.align_block_size(jnp.zeros((2, 2)), num_experts=4, block_m=16)


# --- the grouped kernels ------------------------------------------------------------------------------

@pytest.mark.parametrize("t,fused", [(17, True)])
def test_grouped_kernels_against_references(t, fused):
    """gate_up and down alone, on the rows that are entries, vs their jnp references and numpy."""
    rng = np.random.default_rng(10 + t)
    ids, w = _routing(rng, t)
    wg, wu, wd = _stacks(rng)
    x = rng.standard_normal((t, H)).astype(np.float32)
    al = moe.align_block_size(jnp.asarray(ids), num_experts=E, block_m=16)
    gate, up = (jnp.asarray(np.concatenate([wg, wu], 1)), None) if fused else (jnp.asarray(wg), jnp.asarray(wu))
    act = moe.gate_up(jnp.asarray(x), al, gate, up, "silu", top_k=K, tiles=CFG.gate_up, interpret=INTERPRET)
    sorted_ids = np.asarray(al.sorted_ids)
    real = sorted_ids < t * K
    tok, slot = sorted_ids[real] // K, sorted_ids[real] % K
    e = ids[tok, slot]
    want_act = np.stack([_silu(wg[i].astype(np.float64) @ x[j]) * (wu[i].astype(np.float64) @ x[j])
                         for i, j in zip(e, tok)])
    ref_act = moe.gate_up_reference(jnp.asarray(x), al, gate, up, "silu", top_k=K)
    assert _rel(np.asarray(act)[real], want_act) < 1e-5
    assert _rel(np.asarray(act)[real], np.asarray(ref_act)[real]) < 1e-5

    routing = jnp.asarray(np.where(real, w.reshape(-1)[np.minimum(sorted_ids, t * K - 1)], 0.0), jnp.float32)
    y = moe.down(act, al, routing, jnp.asarray(wd), tiles=CFG.down, interpret=INTERPRET)
    want_y = np.stack([w[j, s] * (wd[i].astype(np.float64) @ a) for i, j, s, a in zip(e, tok, slot, want_act)])
    assert _rel(np.asarray(y)[real], want_y) < 1e-5
    assert _rel(np.asarray(y)[real], np.asarray(moe.down_reference(act, al, routing, jnp.asarray(wd)))[real]) < 1e-5


# --- moe_experts_pallas --------------------------------------------------------------------------------

def _compare(x, ids, w, wg, wu, wd, kind="silu", offset=0, fused=False, config=CFG, tol=1e-5, dtype=jnp.float32):
    gate, up = (np.concatenate([wg, wu], 1), None) if fused else (wg, wu)
    args = [jnp.asarray(a, dtype) if a is not None else None for a in (x, None, None, gate, up, wd)]
    args[1], args[2] = jnp.asarray(ids), jnp.asarray(w)
    got = moe.moe_experts_pallas(*args, kind, expert_offset=offset, config=config, interpret=INTERPRET)
    assert got.shape == x.shape and got.dtype == dtype
    want = _numpy_moe(x, ids, w, wg, wu, wd, kind, offset)
    ref = moe_ops.moe_experts(*args, kind, expert_offset=offset, ops=Ops(platform="cpu"))
    assert _rel(got, want) < tol, _rel(got, want)
    assert _rel(got, ref) < tol
    return got


@pytest.mark.parametrize("t,fused", [(t, False) for t in TOKENS] + [(3, True), (64, True)])
def test_moe_experts_matches_reference(t, fused):
    rng = np.random.default_rng(20 + t)
    ids, w = _routing(rng, t)
    _compare(rng.standard_normal((t, H)).astype(np.float32), ids, w, *_stacks(rng), fused=fused)


def test_moe_experts_leading_dims_default_config_and_activations():
    rng = np.random.default_rng(30)
    x = rng.standard_normal((2, 5, H)).astype(np.float32)
    ids, w = _routing(rng, 10)
    stacks = _stacks(rng)
    got = moe.moe_experts_pallas(jnp.asarray(x), jnp.asarray(ids.reshape(2, 5, K)), jnp.asarray(w.reshape(2, 5, K)),
                                 *map(jnp.asarray, stacks), "silu", interpret=INTERPRET)  # choose_config's tiles
    assert got.shape == (2, 5, H)
    assert _rel(got.reshape(10, H), _numpy_moe(x.reshape(10, H), ids, w, *stacks)) < 1e-5
    _compare(x.reshape(10, H), ids, w, *stacks, kind="gelu_pytorch_tanh")


def test_moe_experts_skewed_routing():
    """All tokens on one expert (several blocks of it, every other expert empty), and k=1."""
    rng = np.random.default_rng(40)
    x = rng.standard_normal((64, H)).astype(np.float32)
    stacks = _stacks(rng)
    ids = np.stack([np.full(64, 6), np.full(64, 2)], 1).astype(np.int32)  # 64 rows each on experts 6 and 2
    _compare(x, ids, rng.uniform(size=(64, K)).astype(np.float32), *stacks)
    one = np.full((17, 1), 4, np.int32)
    _compare(x[:17], one, np.ones((17, 1), np.float32), *stacks)


@pytest.mark.parametrize("offset,e_local", [(0, 4), (4, 4), (2, 3)])
def test_moe_experts_expert_offset(offset, e_local):
    """A shard holding experts [offset, offset + e_local) gives its slots' share; shards sum to the whole."""
    rng = np.random.default_rng(50)
    ids, w = _routing(rng, 17)
    x = rng.standard_normal((17, H)).astype(np.float32)
    wg, wu, wd = _stacks(rng)
    sl = slice(offset, offset + e_local)
    _compare(x, ids, w, wg[sl], wu[sl], wd[sl], offset=offset)


def test_moe_experts_shards_sum_to_whole_with_traced_offset():
    rng = np.random.default_rng(51)
    ids, w = _routing(rng, 17)
    x = rng.standard_normal((17, H)).astype(np.float32)
    wg, wu, wd = _stacks(rng)
    shard = jax.jit(lambda off, g, u, d: moe.moe_experts_pallas(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), g, u,
                                                                d, "silu", expert_offset=off, config=CFG,
                                                                interpret=INTERPRET))
    total = sum(np.asarray(shard(jnp.int32(o), *(jnp.asarray(a[o:o + 4]) for a in (wg, wu, wd)))) for o in (0, 4))
    assert _rel(total, _numpy_moe(x, ids, w, wg, wu, wd)) < 1e-5
    nobody = shard(jnp.int32(8), *(jnp.asarray(a[:4]) for a in (wg, wu, wd)))  # a shard no slot is routed to
    assert not np.asarray(nobody).any()


@pytest.mark.parametrize("offset,e_local", [(0, 4), (4, 4), (2, 6)])
def test_moe_experts_decode_expert_offset(offset, e_local):
    """One token, one slot (T*k <= E_local / 4: the sort-free alignment) on an expert shard: a slot
    routed to another shard adds nothing."""
    rng = np.random.default_rng(52)
    ids, w = _routing(rng, 1, k=1)
    x = rng.standard_normal((1, H)).astype(np.float32)
    wg, wu, wd = _stacks(rng)
    sl = slice(offset, offset + e_local)
    _compare(x, ids, w, wg[sl], wu[sl], wd[sl], offset=offset)


def test_moe_experts_bf16():
    rng = np.random.default_rng(60)
    ids, w = _routing(rng, 17)
    _compare(rng.standard_normal((17, H)).astype(np.float32), ids, w, *_stacks(rng), dtype=jnp.bfloat16, tol=3e-2)


def test_moe_experts_bad_input():
    rng = np.random.default_rng(70)
    ids, w = _routing(rng, 3)
    x = jnp.asarray(rng.standard_normal((3, H)), jnp.float32)
    wg, wu, wd = map(jnp.asarray, _stacks(rng))
    with pytest.raises(ValueError, match="activation 'gelu'"):
        moe.moe_experts_pallas(x, jnp.asarray(ids), jnp.asarray(w), wg, wu, wd, "gelu", interpret=INTERPRET)
    with pytest.raises(ValueError, match="do not fit hidden"):
        moe.moe_experts_pallas(x, jnp.asarray(ids), jnp.asarray(w), wg, wu, wd[:, :32], "silu", interpret=INTERPRET)
    bad = moe.MoeConfig(block_m=16, gate_up=moe.Tiles(48, 32))
    with pytest.raises(ValueError, match="block_n 48"):
        moe.moe_experts_pallas(x, jnp.asarray(ids), jnp.asarray(w), wg, wu, wd, "silu", config=bad, interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_m 8"):
        moe.moe_experts_pallas(x, jnp.asarray(ids), jnp.asarray(w), wg, wu, wd, "silu",
                               config=moe.MoeConfig(block_m=8), interpret=INTERPRET)


# --- dispatch -----------------------------------------------------------------------------------------

def test_dispatch():
    rng = np.random.default_rng(80)
    ids, w = _routing(rng, 3)
    x = jnp.ones((3, H), jnp.bfloat16)
    wg, wu, wd = (jnp.asarray(a, jnp.bfloat16) for a in _stacks(rng))
    args = (x, jnp.asarray(ids), jnp.asarray(w), wg, wu, wd)
    impl, _ = Ops(platform="gpu").choose("moe_experts", *args, "silu", expert_offset=0, ops=None)
    assert impl.name == "pallas_grouped"
    impl, choice = Ops(platform="gpu").choose("moe_experts", *args, "gelu", expert_offset=0, ops=None)
    assert impl.name == "xla" and "activation 'gelu'" in str(choice)
    assert "not dense arrays" in moe_kernels._grouped_applies(*args[:3], object(), wu, wd, "silu")  # e.g. quantized
    impl, choice = Ops(platform="cpu").choose("moe_experts", *args, "silu", ops=None)
    assert impl.name == "xla" and "not on cpu" in str(choice)


# --- CUDA lowering at Qwen3-30B-A3B shapes --------------------------------------------------------------

QWEN3_30B = dict(e=128, k=8, h=2048, f=768)


def _lower_cuda(fn, *args) -> str:
    """The StableHLO of fn lowered for CUDA (runs the Pallas Triton lowering on this CPU machine)."""
    try:
        jax.jit(lambda a: a + 1).trace(jnp.ones(4)).lower(lowering_platforms=("cuda",))
    except Exception as e:  # noqa: BLE001  only whether this jax can target cuda at all
        pytest.skip(f"this jax cannot lower for cuda on the CPU: {str(e)[:200]}")
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("t", [1, 64, 4096])
@pytest.mark.parametrize("fused", [False, True])
def test_lowers_for_cuda_at_qwen3_30b_shapes(t, fused):
    e, k, h, f = QWEN3_30B.values()
    bf = jnp.bfloat16
    args = (jax.ShapeDtypeStruct((t, h), bf), jax.ShapeDtypeStruct((t, k), jnp.int32),
            jax.ShapeDtypeStruct((t, k), jnp.float32), jax.ShapeDtypeStruct((e, 2 * f if fused else f, h), bf),
            None if fused else jax.ShapeDtypeStruct((e, f, h), bf), jax.ShapeDtypeStruct((e, h, f), bf))
    cfg = moe.choose_config(t * k, e, h, f)
    text = _lower_cuda(lambda x, i, w, g, u, d: moe.moe_experts_pallas(x, i, w, g, u, d, "silu", config=cfg), *args)
    assert text.count("__gpu$xla.gpu.triton") == 2  # gate_up and down


@pytest.mark.parametrize("kind", sorted(moe.KERNEL_ACTIVATIONS))
@pytest.mark.parametrize("block_m,tiles", [(16, moe.Tiles(16, 256, 4, 4)), (64, moe.Tiles(128, 64, 8, 3)),
                                           (128, moe.Tiles(64, 32, 8, 2))])
def test_lowers_for_cuda_with_sweep_tiles(kind, block_m, tiles):
    """The corners of the GPU sweep's tile space, and every activation the epilogue offers."""
    e, k, h, f = QWEN3_30B.values()
    bf = jnp.bfloat16
    args = (jax.ShapeDtypeStruct((64, h), bf), jax.ShapeDtypeStruct((64, k), jnp.int32),
            jax.ShapeDtypeStruct((64, k), jnp.float32), jax.ShapeDtypeStruct((e, f, h), bf),
            jax.ShapeDtypeStruct((e, f, h), bf), jax.ShapeDtypeStruct((e, h, f), bf))
    cfg = moe.MoeConfig(block_m, tiles, tiles)
    _lower_cuda(lambda x, i, w, g, u, d: moe.moe_experts_pallas(x, i, w, g, u, d, kind, config=cfg), *args)


def test_lowers_for_cuda_float32():
    args = (jax.ShapeDtypeStruct((3, 64), jnp.float32), jax.ShapeDtypeStruct((3, 2), jnp.int32),
            jax.ShapeDtypeStruct((3, 2), jnp.float32), jax.ShapeDtypeStruct((8, 128, 64), jnp.float32),
            None, jax.ShapeDtypeStruct((8, 64, 64), jnp.float32))
    _lower_cuda(lambda x, i, w, g, u, d: moe.moe_experts_pallas(x, i, w, g, u, d, "silu"), *args)


# --- the benchmark script -----------------------------------------------------------------------------

def test_bench_smoke(tmp_path):
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}  # an exact dense oracle on a GPU too
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "moe.py"), "--smoke", "--out", str(tmp_path),
                           "--commit", "abc123"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    files = list(tmp_path.glob("moe_*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["commit"] == "abc123" and data["jax"] == jax.__version__ and "kind" in data["device"]
    assert {p["tokens"] for p in data["prefill"]} and data["decode"]
    for p in data["prefill"]:
        assert {"grouped", "ragged_dot", "dense"} <= set(p) and p["grouped"]["rel_err_vs_dense"] < 1e-4
    for d in data["decode"]:
        assert 0 < d["grouped"]["active_weight_bytes"] and d["grouped"]["bw_fraction"] > 0
