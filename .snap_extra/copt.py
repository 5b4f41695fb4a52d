import jax, jax.numpy as jnp
f = lambda a, b: a @ b
a = jnp.ones((64, 4096), jnp.bfloat16); b = jnp.ones((4096, 4096), jnp.bfloat16)
for opts in (None, {"xla_gpu_enable_triton_gemm": False}):
    txt = jax.jit(f, compiler_options=opts).lower(a, b).compile().as_text()
    print(opts, "triton" if "__triton_gemm" in txt or "triton_gemm" in txt else "", "cublas" if "custom_call_target=\"__cublas" in txt else "")
