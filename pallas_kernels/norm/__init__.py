"""Normalization kernels (Pallas, Triton lowering), one per file with its pure-jnp reference beside it."""
