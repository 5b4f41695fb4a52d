"""ferrum-jax: an LLM inference runtime on JAX and Pallas.

    import ferrum_jax as fj
    model = fj.load("path/to/hf-checkpoint")
    print(fj.generate(model, "The capital of France is", max_tokens=16).text)
"""

from ferrum_jax import ops as _ops  # noqa: F401  registers the XLA reference of every op
from ferrum_jax import moe_ops as _moe_ops  # noqa: F401  registers the MoE references
from ferrum_jax.quant import ops as _quant_ops  # noqa: F401  registers "xla_dequant" linear/embed for GGUFWeight
from ferrum_jax.quant import qops as _qweight_ops  # noqa: F401  registers linear/embed for QuantWeight
from ferrum_jax import moe_kernels as _moe_kernels  # noqa: F401  registers pallas_grouped (moe_experts on GPU)
from ferrum_jax import attention_kernels as _attention_kernels  # noqa: F401  registers pallas_flash (prefill on GPU)
from ferrum_jax import ragged_kernels as _ragged_kernels  # noqa: F401  registers ragged_paged_attention
from ferrum_jax import decode_kernels as _decode_kernels  # noqa: F401  registers pallas_decode / pallas_paged_decode
from ferrum_jax import norm_kernels as _norm_kernels  # noqa: F401  registers pallas_add_rms_norm
from ferrum_jax import linear_kernels as _linear_kernels  # noqa: F401  registers pallas_gemv (decode linear)
from ferrum_jax.backend import DEFAULT_OPS, Ops, record_dispatch
from ferrum_jax.cache import KVCache
from ferrum_jax.kv_config import KVCacheConfig
from ferrum_jax.paged_cache import PageAllocator, PagedKVCache
from ferrum_jax.errors import FerrumError
from ferrum_jax.generate import Completion, Generation, decode, generate, logits, prefill, stream
from ferrum_jax.model import Model, load
from ferrum_jax.sampling import GREEDY, SamplingParams
from ferrum_jax.sharding import make_mesh, shard_model
from ferrum_jax.tokenizer import Tokenizer

__all__ = ["DEFAULT_OPS", "Ops", "record_dispatch", "KVCache", "KVCacheConfig", "PageAllocator", "PagedKVCache", "FerrumError", "Completion", "Generation",
           "decode", "generate", "logits", "prefill", "stream", "Model", "load", "GREEDY", "SamplingParams", "Tokenizer",
           "make_mesh", "shard_model"]
__version__ = "0.1.0"
