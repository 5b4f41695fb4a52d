"""The fused residual add + RMS norm kernel (pallas_kernels/norm/add_rms_norm.py), in interpret mode
on CPU (the real kernel on a GPU), against two independent oracles: ferrum_jax.ops and a float64
numpy norm of the rounded sum written out here. Plus dispatch (the GPU table picks the kernel, with
reasons when it does not) and CUDA lowering at real shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ferrum_jax import norm_kernels  # noqa: F401  registers pallas_add_rms_norm
from ferrum_jax import ops as ref_ops
from ferrum_jax.backend import Ops
from pallas_kernels.norm import add_rms_norm as kernel
from tests.test_decode_attention import _can_lower_for_cuda

INTERPRET = jax.default_backend() != "gpu"  # the real kernel on a GPU, interpret mode elsewhere
EPS = 1e-6


def naive(s, w, *, eps: float, offset: float) -> np.ndarray:
    """float64 numpy: s / sqrt(mean(s^2) + eps) * (offset + w) over the last axis."""
    s64, w64 = np.asarray(s, np.float64), np.asarray(w, np.float64)
    return s64 / np.sqrt(np.mean(s64 * s64, axis=-1, keepdims=True) + eps) * (offset + w64)


def ulps(got, want, dtype) -> np.ndarray:
    """|got - want| in units of the last place of `dtype` at the larger magnitude of the two."""
    fi = ml_dtypes.finfo(dtype)
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    mag = np.maximum(np.maximum(np.abs(got), np.abs(want)), float(fi.tiny))
    spacing = np.exp2(np.floor(np.log2(mag))) * float(fi.eps)
    return np.abs(got - want) / spacing


def _inputs(seed: int, shape: tuple[int, ...], dtype, offset: float):
    kx, kr, kw = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = (4.0 * jax.random.normal(kx, shape, jnp.float32)).astype(dtype)
    r = jax.random.normal(kr, shape, jnp.float32).astype(dtype)
    # Llama norms sit near 1; Gemma stores w - 1 (offset 1), near 0.
    w = 0.3 * jax.random.normal(kw, shape[-1:], jnp.float32) + (1.0 - offset)
    return x, r, w.astype(dtype)


def _check(x, r, w, offset: float, **kw) -> None:
    s, normed = kernel.add_rms_norm(x, r, w, eps=EPS, offset=offset, interpret=INTERPRET, **kw)
    assert s.shape == normed.shape == x.shape and s.dtype == normed.dtype == x.dtype
    # the sum is bit-exact: what jnp's x + residual gives
    np.testing.assert_array_equal(np.asarray(s), np.asarray(x + r))
    # normed within 1 ulp of the float64 norm rounded to the dtype (a few ulps of float32 math for f32)
    most = 4 if x.dtype == jnp.float32 else 1
    want = np.asarray(jnp.asarray(naive(s.astype(jnp.float32), w.astype(jnp.float32), eps=EPS, offset=offset),
                                  x.dtype))
    assert ulps(normed, want, x.dtype).max() <= most
    # and against the XLA reference op
    s_ref, n_ref = ref_ops.add_rms_norm(x, r, w, eps=EPS, offset=offset)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
    assert ulps(normed, n_ref, x.dtype).max() <= most


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("h", [4096, 5376, 64])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=["bf16", "f16", "f32"])
def test_matches_oracles(dtype, h, rows, offset):
    """Decode and prefill-like row counts; H a power of two or not (Gemma-3-27B's 5376 pads to 8192
    columns); 3 rows as [1, 3, H] (leading dims flattened; with H = 64 a 4-row block masks a row).
    On CPU (interpret mode) XLA norms the unrounded float32 sum (excess precision), within 1 ulp."""
    shape = (1, 3, h) if rows == 3 else (rows, h)
    _check(*_inputs(h + rows, shape, dtype, offset), offset)


@pytest.mark.parametrize("block_rows,num_warps", [(2, 2), (4, 8), (1, 1)])
def test_explicit_launch_config(block_rows, num_warps):
    """Row blocks that do not divide the rows (the last block's rows masked) on a padded width."""
    x, r, w = _inputs(7, (5, 200), jnp.bfloat16, 0.0)
    _check(x, r, w, 0.0, block_rows=block_rows, num_warps=num_warps)


def test_default_launch_config():
    assert kernel.default_block_rows(1, 4096) == 1
    assert kernel.default_block_rows(8192, 4096) == 1
    assert kernel.default_block_rows(3, 64) == 4
    assert kernel.default_block_rows(8192, 64) == 8
    assert kernel.default_block_rows(2, 5376) == 1
    assert 1 <= kernel.default_num_warps(1, 16384) <= 8


def test_rejects_bad_arguments():
    x = jnp.zeros((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_rows 3"):
        kernel.add_rms_norm(x, x, jnp.ones((64,), jnp.bfloat16), eps=EPS, block_rows=3, interpret=True)
    with pytest.raises(ValueError, match="weight shape"):
        kernel.add_rms_norm(x, x, jnp.ones((32,), jnp.bfloat16), eps=EPS, interpret=True)


def test_reference_is_the_op():
    x, r, w = _inputs(3, (2, 3, 64), jnp.bfloat16, 1.0)
    for got in (kernel.reference(x, r, w, eps=EPS, offset=1.0), Ops().add_rms_norm(x, r, w, eps=EPS, offset=1.0)):
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(x + r))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref_ops.rms_norm(x + r, w, eps=EPS, offset=1.0)))


# ---------------------------------------------------------------------------------------------
# Dispatch


def _sds(shape: tuple[int, ...], dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def test_gpu_table_picks_the_kernel():
    x, w = _sds((1, 1, 4096)), _sds((4096,))
    impl, choice = Ops(platform="gpu").choose("add_rms_norm", x, x, w, eps=EPS, offset=0.0)
    assert impl.name == choice.impl == "pallas_add_rms_norm"
    impl, choice = Ops(platform="cpu").choose("add_rms_norm", x, x, w, eps=EPS, offset=0.0)
    assert impl.name == "xla" and ("pallas_add_rms_norm", "not on cpu") in choice.skipped


@pytest.mark.parametrize("x,r,w,why", [
    (_sds((1, 4096)), _sds((1, 4096), jnp.float32), _sds((4096,)), "dtype"),
    (_sds((1, 4096)), _sds((2, 4096)), _sds((4096,)), "differ"),
    (_sds((1, 20000)), _sds((1, 20000)), _sds((20000,)), "features"),
    (_sds((1, 4096)), _sds((1, 4096)), _sds((4095,)), "weight shape"),
    (_sds((1, 4096), jnp.int32), _sds((1, 4096), jnp.int32), _sds((4096,)), "dtypes"),
], ids=["mixed-dtypes", "shapes", "too-wide", "weight", "int"])
def test_gpu_table_declines_with_a_reason(x, r, w, why):
    impl, choice = Ops(platform="gpu").choose("add_rms_norm", x, r, w, eps=EPS, offset=0.0)
    assert impl.name == "xla"
    assert why in dict(choice.skipped)["pallas_add_rms_norm"]


def test_mesh_runs_the_reference():
    """A Pallas call cannot be partitioned by GSPMD: a sharded model's ops skip the kernel."""
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    x = _sds((1, 1, 4096))
    impl, _ = Ops(platform="gpu", mesh=mesh).choose("add_rms_norm", x, x, _sds((4096,)), eps=EPS, offset=0.0)
    assert impl.name == "xla"


# ---------------------------------------------------------------------------------------------
# CUDA lowering


@pytest.mark.parametrize("shape,dtype,offset", [
    ((1, 1, 4096), jnp.bfloat16, 0.0),  # Llama-3-8B decode, batch 1
    ((64, 1, 4096), jnp.bfloat16, 0.0),  # batch 64
    ((1, 8192, 4096), jnp.bfloat16, 0.0),  # prefill
    ((1, 1, 5376), jnp.bfloat16, 1.0),  # Gemma-3-27B decode: a masked 8192-wide block
    ((3, 1, 2048), jnp.float16, 0.0),
    ((5, 64), jnp.float32, 0.0),  # several rows per program, the last block masked
])
def test_lowers_for_cuda_at_real_shapes(shape, dtype, offset):
    reason = _can_lower_for_cuda()
    if reason is not None:
        pytest.skip(reason)
    x, w = jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct(shape[-1:], dtype)
    f = lambda x, r, w: kernel.add_rms_norm(x, r, w, eps=EPS, offset=offset)
    lowered = jax.jit(f).trace(x, x, w).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()[:100000]
