"""Checkpoint loading: reading weights from disk onto devices.

`ferrum_jax.loading.safetensors` reads Hugging Face safetensors checkpoints (single file or sharded).
"""
