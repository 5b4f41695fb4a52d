"""GGUF block dequantizers (jnp) against the gguf package's numpy reference, bit for bit."""

from __future__ import annotations

import gguf
import gguf.quants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES

from ferrum_jax.errors import CheckpointError
from ferrum_jax.quant import LAYOUTS, SUPPORTED_TYPES, GGUFWeight, dequantize_blocks, layout_for

T = gguf.GGMLQuantizationType

ALL_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]  # fmt: skip
# Types gguf.quants can quantize (the rest are tested from random bytes with valid scales).
QUANTIZABLE = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
QUANTIZED = [t for t in ALL_TYPES if LAYOUTS[t].block_size > 1]
F16_FIELDS = ("d", "m", "dmin")  # f16 scale fields of the block structs


def _reference(raw: np.ndarray, name: str) -> np.ndarray:
    """gguf's numpy dequantizer on raw bytes uint8 [..., bytes_per_row]."""
    qtype = T[name]
    if name == "F32":
        return raw.view(np.float32).copy()
    if name == "F16":
        return raw.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(raw, qtype)


def _random_bytes(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random blocks for a logical `shape`, every f16 scale field a finite small value."""
    layout = LAYOUTS[name]
    n_blocks = shape[-1] // layout.block_size
    raw = rng.integers(0, 256, size=(*shape[:-1], n_blocks, layout.type_size), dtype=np.uint8)
    for f in layout.fields:
        if f.name in F16_FIELDS:
            scale = rng.uniform(-0.1, 0.1, size=raw.shape[:-1]).astype(np.float16)
            raw[..., f.offset : f.offset + 2] = scale[..., None].view(np.uint8)
    return raw.reshape(*shape[:-1], n_blocks * layout.type_size)


def _quantized_bytes(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32) * 2.0
    x.reshape(-1)[:: 97] = 0.0  # some exact zeros
    q = gguf.quants.quantize(x, T[name])
    return np.ascontiguousarray(q).view(np.uint8).reshape(GGUFWeight.byte_shape(name, shape))


def _assert_bit_exact(got, want) -> None:
    got = np.asarray(got, dtype=np.float32)
    want = np.asarray(want, dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


@jax.jit
def _deq(w: GGUFWeight) -> jax.Array:
    return w.dequantize(jnp.float32)


def _shape_for(name: str, rows: int = 3, blocks: int = 4) -> tuple[int, int]:
    bs = LAYOUTS[name].block_size
    return (rows, bs * blocks if bs > 1 else 40)


# ---- layouts ------------------------------------------------------------------------------------


def test_layout_table_matches_ggml():
    assert set(LAYOUTS) == set(ALL_TYPES)
    assert SUPPORTED_TYPES == {T[n] for n in ALL_TYPES}
    for name, layout in LAYOUTS.items():
        assert layout.name == name and layout.ggml_type == T[name]
        assert (layout.block_size, layout.type_size) == GGML_QUANT_SIZES[T[name]]
        assert sum(f.size for f in layout.fields) == layout.type_size
        assert layout_for(int(T[name]), "t") is layout
        assert layout_for(T[name], "t") is layout


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, int(T.IQ4_XS), T.TQ1_0, T.Q8_K, 999])
def test_unsupported_type_names_tensor(qtype):
    with pytest.raises(CheckpointError) as exc:
        layout_for(qtype, "blk.3.ffn_down.weight")
    msg = str(exc.value)
    assert "blk.3.ffn_down.weight" in msg
    if qtype != 999:
        assert T(int(qtype)).name in msg
    with pytest.raises(CheckpointError, match="blk.0.attn_q.weight"):
        GGUFWeight.from_numpy(np.zeros((2, 66), np.uint8), T.IQ2_XXS, (2, 256), "blk.0.attn_q.weight")


# ---- bit-exact dequantization -------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantized_random_data_matches_gguf(name):
    rng = np.random.default_rng(1)
    shape = _shape_for(name)
    raw = _quantized_bytes(rng, name, shape)
    w = GGUFWeight.from_numpy(raw, name, shape)
    assert w.data.dtype == jnp.uint8 and w.data.shape == raw.shape
    out = _deq(w)
    assert out.shape == shape and out.dtype == jnp.float32
    _assert_bit_exact(out, _reference(raw, name))


@pytest.mark.parametrize("name", QUANTIZED)
def test_random_blocks_match_gguf(name):
    rng = np.random.default_rng(2)
    shape = _shape_for(name, rows=5, blocks=3)
    raw = _random_bytes(rng, name, shape)
    out = _deq(GGUFWeight.from_numpy(raw, name, shape))
    _assert_bit_exact(out, _reference(raw, name))


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantize_blocks_eager_and_block_shape(name):
    """The raw-block API directly (eager, no jit), with two leading dims."""
    rng = np.random.default_rng(3)
    layout = LAYOUTS[name]
    raw = _random_bytes(rng, name, (2, 2 * layout.block_size))
    blocks = raw.reshape(2, 2, layout.type_size)
    out = dequantize_blocks(name, jnp.asarray(blocks))
    assert out.shape == (2, 2 * layout.block_size)
    _assert_bit_exact(out, _reference(raw, name))


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0", "BF16"])
def test_stacked_3d(name):
    rng = np.random.default_rng(4)
    bs = LAYOUTS[name].block_size
    shape = (3, 4, bs * 2 if bs > 1 else 24)  # [experts, rows, cols]
    raw = _random_bytes(rng, name, shape)
    w = GGUFWeight.from_numpy(raw, T[name], shape)
    want = _reference(raw, name)
    _assert_bit_exact(_deq(w), want)
    _assert_bit_exact(_deq(w[1]), want[1])  # index one expert
    assert w[1].shape == shape[1:]

    # Under scan over the leading dim the leaf is sliced: dequantize follows data's shape.
    def body(c, wl):
        return c, wl.dequantize()

    _, per_layer = jax.jit(lambda w: jax.lax.scan(body, 0, w))(w)
    _assert_bit_exact(per_layer, want)


def test_k_quant_f16_scale_edge_values():
    """Subnormal, negative and zero f16 scales go through the bitcast path unchanged."""
    rng = np.random.default_rng(5)
    name = "Q4_K"
    raw = _random_bytes(rng, name, (4, 256)).reshape(4, 1, 144)
    specials = np.array([1e-7, -65504.0, 0.0, -0.0], dtype=np.float16).view(np.uint8).reshape(4, 2)
    raw[:, 0, 0:2] = specials  # d
    raw[:, 0, 2:4] = specials[::-1]  # dmin
    raw = raw.reshape(4, 144)
    _assert_bit_exact(_deq(GGUFWeight.from_numpy(raw, name, (4, 256))), _reference(raw, name))


# ---- pytree / jit ------------------------------------------------------------------------------


def test_pytree_node_and_static_meta():
    rng = np.random.default_rng(6)
    raw = _random_bytes(rng, "Q4_0", (2, 64))
    w = GGUFWeight.from_numpy(raw, "Q4_0", (2, 64))
    leaves, treedef = jax.tree_util.tree_flatten(w)
    assert len(leaves) == 1 and leaves[0] is w.data
    w2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert w2.ggml_type == "Q4_0" and w2.shape == (2, 64)
    assert w.nbytes == 2 * 2 * 18
    assert w.bits_per_weight == 4.5
    # Different type / shape are different treedefs (a jit retraces rather than mixing them up).
    other = GGUFWeight.from_numpy(_random_bytes(rng, "Q4_1", (2, 64)), "Q4_1", (2, 64))
    assert jax.tree_util.tree_structure(other) != treedef
    # The dequantizer fuses into a matmul under jit; bf16 output.
    x = jnp.asarray(rng.standard_normal((5, 64)).astype(np.float32))
    hi = jax.lax.Precision.HIGHEST  # no TF32 on GPUs
    y = jax.jit(lambda x, w: jnp.matmul(x, w.dequantize(jnp.float32).T, precision=hi))(x, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ _reference(raw, "Q4_0").T, rtol=1e-5, atol=1e-5)
    assert _deq(w).dtype == jnp.float32
    assert jax.jit(lambda w: w.dequantize(jnp.bfloat16))(w).dtype == jnp.bfloat16


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
@pytest.mark.parametrize("name", ["Q5_K", "Q3_K", "Q5_1"])
def test_donated_through_jit(name):
    rng = np.random.default_rng(7)
    shape = _shape_for(name, rows=2, blocks=2)
    raw = _random_bytes(rng, name, shape)
    w = GGUFWeight.from_numpy(raw, name, shape)
    out = jax.jit(lambda w: w.dequantize(), donate_argnums=0)(w)
    _assert_bit_exact(out, _reference(raw, name))


def test_from_numpy_accepts_reader_dtypes_and_checks_size():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    # GGUFReader hands F32/F16 tensors over as float arrays, not bytes.
    _assert_bit_exact(_deq(GGUFWeight.from_numpy(x, T.F32, (3, 8))), x)
    _assert_bit_exact(_deq(GGUFWeight.from_numpy(x.astype(np.float16), T.F16, (3, 8))), x.astype(np.float16))
    v = GGUFWeight.from_numpy(x[0], "F32", (8,))  # 1-D (norm weights)
    _assert_bit_exact(_deq(v), x[0])
    with pytest.raises(CheckpointError, match="blk.1.attn_k.weight"):
        GGUFWeight.from_numpy(np.zeros((3, 17), np.uint8), "Q4_0", (3, 32), "blk.1.attn_k.weight")
    with pytest.raises(CheckpointError, match="block size"):
        GGUFWeight.from_numpy(np.zeros((3, 18), np.uint8), "Q4_0", (3, 33), "t")
