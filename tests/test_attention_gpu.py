"""GPU-only attention paths against the XLA reference (skipped where there is no GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ferrum_jax  # noqa: F401  (registers the ops)
from ferrum_jax.backend import Ops, record_dispatch

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("heads,kv_heads,head_dim,t", [(8, 2, 128, 300), (4, 4, 64, 129), (32, 8, 128, 1024)])
def test_cudnn_prefill_matches_reference(heads, kv_heads, head_dim, t, window):
    key = jax.random.PRNGKey(0)
    kq, kk, kv = jax.random.split(key, 3)
    b = 2
    q = jax.random.normal(kq, (b, t, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(kk, (b, kv_heads, t, head_dim), jnp.bfloat16)
    v = jax.random.normal(kv, (b, kv_heads, t, head_dim), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kw = dict(scale=head_dim ** -0.5, window=window, causal_from_zero=True)
    with record_dispatch() as choices:  # cuDNN itself, even where the Hopper kernel would be chosen first
        fast = jax.jit(lambda *a: Ops(force=(("attention", "cudnn"),)).attention(*a, **kw))(q, k, v, pos)
    assert choices[0].impl == "cudnn"
    with jax.default_matmul_precision("highest"):
        ref = Ops(force=(("attention", "xla"),)).attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                          v.astype(jnp.float32), pos, **kw)
    np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(ref), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("t", [1, 256])
def test_attention_on_a_mesh_runs_the_kernels_in_shard_map(t):
    """Ops on a (one-device) mesh run attention inside shard_map, where the kernels are chosen on
    the local shards: the same kernel as without the mesh, the same result."""
    import ferrum_jax as fj
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(1), 3)
    b, s = 2, 1024
    q = jax.random.normal(kq, (b, t, 32, 128), jnp.bfloat16)
    k = jax.random.normal(kk, (b, 8, s, 128), jnp.bfloat16)
    v = jax.random.normal(kv, (b, 8, s, 128), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
    call = (lambda o: o.decode_attention) if t == 1 else (lambda o: o.attention)
    run = lambda o: jax.jit(lambda *a: call(o)(*a, scale=128 ** -0.5))(q, k, v, pos)
    with record_dispatch() as plain:
        want = run(Ops())
    with record_dispatch() as sharded:
        got = run(Ops(mesh=fj.make_mesh(tp=1)))
    assert sharded[0].impl == plain[0].impl and sharded[0].impl.startswith("pallas"), (plain, sharded)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
