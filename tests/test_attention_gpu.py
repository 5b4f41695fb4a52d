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
