"""Pallas GPU kernels, one per file, each with a pure-jnp `reference` beside it.

Kernels register themselves with `ferrum_jax.backend.register` for the GPU platform; where no
kernel applies, the XLA reference in `ferrum_jax.ops` runs. None are registered yet."""
