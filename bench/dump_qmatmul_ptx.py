"""Compile one quantized matmul per variant with XLA dumps on (PTX lands in the dump folder)."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.quant_matmul import FORMATS, random_weight  # noqa: E402
from pallas_kernels import quant_matmul as qm  # noqa: E402

w = random_weight(FORMATS[sys.argv[1] if len(sys.argv) > 1 else "Q4_K"], 4096, 4096, jax.random.PRNGKey(0))
x = jax.random.normal(jax.random.PRNGKey(1), (1, 4096), jnp.bfloat16)
for cfg in (qm.GemvConfig("fma", 16, 8, 512, 4), qm.GemvConfig("dot", 16, 64, 256, 4)):
    jax.block_until_ready(qm.qmatmul(x, w, config=cfg))
    print("compiled", cfg)
