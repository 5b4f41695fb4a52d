"""Op dispatch: one table of implementations per op, one explicit choice per call.

Models call ops through an `Ops` value (`ops.linear(x, w)`, `ops.attention(...)`). `Ops` is a
frozen, hashable dataclass, passed to jitted functions as a static argument, so the choice of
implementation is part of the compiled program's cache key and never comes from global state.

Each op has an ordered list of implementations; the first one whose platform matches and whose
`applies` check accepts the arguments runs. The XLA reference (pure jnp, in `ferrum_jax.ops`) is
registered last for every op and always applies: it is the CPU path and the test oracle. A platform
that lacks a kernel simply has no entry for it. Every choice is logged at DEBUG level (with the
reason each faster entry was skipped) and appended to any active `record_dispatch()` log.

On a mesh (`Ops(mesh=...)`, a sharded model's ops) the program is partitioned by GSPMD, which
cannot partition a Pallas call (it would gather every operand onto each device). An op that needs
no communication when each device holds its own shard (attention: whole heads per device) declares
how its arrays split (`register_layout`); on a mesh it then runs inside `shard_map` on the local
shards, where the choice among its implementations is made again on the local shapes, kernels
included. Other ops skip the implementations that are not `partitionable`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax

log = logging.getLogger("ferrum_jax.dispatch")

# An `applies` check returns None when the implementation can take these arguments, else the reason.
AppliesFn = Callable[..., str | None]


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable[..., Any]
    platforms: frozenset[str] | None = None  # None: any platform
    applies: AppliesFn | None = None
    reference: bool = False  # the pure-jnp reference: tried last, applies everywhere
    # False for a Pallas call: GSPMD cannot partition it (it would gather every operand onto each
    # device), so ops on a mesh skip it unless the op runs on local shards (`register_layout`).
    partitionable: bool = True
    # Why the result is not the exact product up to float rounding (e.g. "int8 activations"), or
    # None; Ops(exact=True) skips such implementations.
    approximate: str | None = None


@dataclasses.dataclass(frozen=True)
class Choice:
    op: str
    impl: str
    skipped: tuple[tuple[str, str], ...]  # (implementation, why not)

    def __str__(self) -> str:
        why = "; ".join(f"{n}: {r}" for n, r in self.skipped)
        return f"{self.op} -> {self.impl}" + (f" (skipped {why})" if why else "")


_TABLE: dict[str, list[Impl]] = {}
# op -> layout(mesh, *args, **kwargs) -> (specs of the positional args, {array kwarg: spec}, spec of the output)
LayoutFn = Callable[..., tuple[tuple[Any, ...], dict[str, Any], Any]]
_LAYOUTS: dict[str, LayoutFn] = {}
_RECORDERS: list[list[Choice]] = []


def register(op: str, impl: Impl, *, before: str | None = None) -> None:
    """Add an implementation of `op`: kernels in the order registered (or just ahead of the one
    named `before`, where a later kernel measured faster), the reference last."""
    impls = _TABLE.setdefault(op, [])
    if any(i.name == impl.name for i in impls):
        raise ValueError(f"{op} already has an implementation named {impl.name!r}")
    names = [i.name for i in impls]
    if before is not None and before not in names:
        raise ValueError(f"{op} has no implementation named {before!r} to register {impl.name!r} before")
    impls.insert(names.index(before) if before is not None else len(impls), impl)
    impls.sort(key=lambda i: i.reference)  # stable: keeps kernel order, moves the reference last


def register_layout(op: str, layout: LayoutFn) -> None:
    """Declare that `op` runs on local shards with no communication, split as `layout` says
    (PartitionSpecs of its array arguments and output, given the mesh and the arguments)."""
    _LAYOUTS[op] = layout


def implementations(op: str) -> list[str]:
    return [i.name for i in _TABLE[op]]


@contextlib.contextmanager
def record_dispatch() -> Iterator[list[Choice]]:
    """Collect the choices made while tracing inside the block (one entry per traced op call)."""
    choices: list[Choice] = []
    _RECORDERS.append(choices)
    try:
        yield choices
    finally:
        _RECORDERS.remove(choices)


def summarize(choices: list[Choice]) -> dict[str, str]:
    """{op: implementation(s)} for a dispatch log, e.g. {"linear": "xla", "attention": "xla"}."""
    seen: dict[str, list[str]] = {}
    for c in choices:
        names = seen.setdefault(c.op, [])
        if c.impl not in names:
            names.append(c.impl)
    return {op: ",".join(names) for op, names in seen.items()}


@dataclasses.dataclass(frozen=True)
class Ops:
    """The op interface models call. Static under jit.

    platform: where the program runs ("cpu", "gpu", "tpu", "METAL"); None means jax's default backend.
    force: ((op, implementation), ...) pins an op to a named implementation, e.g.
        Ops(force=(("attention", "xla"),)) to compare a kernel against the reference.
    mesh: the program runs on this device mesh through GSPMD (a sharded model's ops): ops with a
        registered layout run inside shard_map on local shards (any implementation); the others
        skip implementations that are not `partitionable`. Code inside a shard_map uses mesh=None.
    cublas_from_rows: GPU decode programs of at least this many rows (the batch) are compiled with
        XLA's Triton GEMMs off, so XLA's matmuls run through cuBLAS; None keeps XLA's own choice
        everywhere. By measurement (H200, jax 0.11.2, Llama-3.1-8B shape, 2k context, decode
        tok/s with cuBLAS vs XLA's choice: batch 1 -7.5%, 8 -4.6%, 32 -1.2%, 64 +3.7%, 128 +1.8%;
        bench/results/decode_gemm_backend_*): XLA's autotuner picks split-K Triton GEMMs that lose
        to cuBLAS once the weight tiles are reused by 64 rows.
    exact: skip implementations that trade accuracy for speed beyond float rounding (the integer-dot
        kernels of quantized weights at decode, which round the activations to int8 per weight
        group: ~1e-2 relative error); the exact kernels or references run instead.
    xla_options: ((name, value), ...) XLA compiler options added to every decode program's, e.g.
        (("xla_gpu_enable_pdl", True),) to measure an XLA feature (bench/decode_ab.py).
    """

    platform: str | None = None
    force: tuple[tuple[str, str], ...] = ()
    mesh: jax.sharding.Mesh | None = None
    cublas_from_rows: int | None = 64
    exact: bool = False
    xla_options: tuple[tuple[str, Any], ...] = ()

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def __post_init__(self) -> None:
        for op, name in self.force:
            if op not in _TABLE:
                raise ValueError(f"Ops(force=...): no op named {op!r}; ops: {', '.join(sorted(_TABLE))}")
            if name not in implementations(op):
                raise ValueError(f"Ops(force=...): {op} has no implementation named {name!r}; "
                                 f"it has: {', '.join(implementations(op))}")
            why = next(i.approximate for i in _TABLE[op] if i.name == name)
            if self.exact and why:
                raise ValueError(f"Ops(exact=True, force=...): {op}'s {name!r} is approximate ({why})")

    def compiler_options(self, rows: int) -> dict[str, Any] | None:
        """XLA compiler options for a decode program of `rows` rows (see `cublas_from_rows`), plus
        `xla_options`."""
        platform = (self.platform or jax.default_backend()).lower()
        options = {}
        if platform == "gpu" and self.cublas_from_rows is not None and rows >= self.cublas_from_rows:
            options["xla_gpu_enable_triton_gemm"] = False
        options.update(self.xla_options)
        return options or None

    def choose(self, op: str, *args: Any, **kwargs: Any) -> tuple[Impl, Choice]:
        if op not in _TABLE:
            raise KeyError(f"no op named {op!r}; ops: {sorted(_TABLE)}")
        platform = (self.platform or jax.default_backend()).lower()
        forced = dict(self.force).get(op)
        if forced is not None:
            impl = next(i for i in _TABLE[op] if i.name == forced)
            if impl.platforms is not None and platform not in impl.platforms:
                raise ValueError(f"{op}: forced implementation {forced!r} does not run on {platform}")
            reason = impl.applies(*args, **kwargs) if impl.applies else None
            if reason is None and self.sharded and not impl.partitionable:
                reason = "operands are sharded over a mesh (a Pallas call runs inside shard_map only)"
            if reason is not None:
                raise ValueError(f"{op}: forced implementation {forced!r} does not apply: {reason}")
            skipped = tuple((i.name, f"forced {forced}") for i in _TABLE[op] if i is not impl)
            return impl, Choice(op, impl.name, skipped)
        skipped: list[tuple[str, str]] = []
        for impl in _TABLE[op]:
            if impl.platforms is not None and platform not in impl.platforms:
                skipped.append((impl.name, f"not on {platform}"))
                continue
            if self.sharded and not impl.partitionable:
                skipped.append((impl.name, "operands are sharded over a mesh (a Pallas call runs inside shard_map only)"))
                continue
            if self.exact and impl.approximate:
                skipped.append((impl.name, f"approximate ({impl.approximate}) and Ops(exact=True)"))
                continue
            reason = impl.applies(*args, **kwargs) if impl.applies else None
            if reason is not None:
                skipped.append((impl.name, reason))
                continue
            return impl, Choice(op, impl.name, tuple(skipped))
        raise ValueError(f"{op}: no implementation applies ({skipped})")

    def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if self.mesh is not None and op in _LAYOUTS:
            return self._call_on_shards(op, args, kwargs)
        impl, choice = self.choose(op, *args, **kwargs)
        if choice.skipped:
            log.debug("%s", choice)
        for rec in _RECORDERS:
            rec.append(choice)
        return impl.fn(*args, **kwargs)

    def _call_on_shards(self, op: str, args: tuple, kwargs: dict) -> Any:
        """`op` inside shard_map over self.mesh, split by its registered layout; the implementation
        is chosen inside, on the local shards."""
        arg_specs, kwarg_specs, out_spec = _LAYOUTS[op](self.mesh, *args, **kwargs)
        names = [n for n in kwarg_specs if kwargs.get(n) is not None]
        local = dataclasses.replace(self, mesh=None)
        # an op that calls others (its `ops` argument) calls them on the local shards too
        static = {n: local if v is self else v for n, v in kwargs.items() if n not in names}

        def on_shard(*arrays: Any) -> Any:
            return local.call(op, *arrays[:len(args)], **static, **dict(zip(names, arrays[len(args):])))

        in_specs = (*arg_specs, *(kwarg_specs[n] for n in names))
        # check_vma=False: a Pallas call's outputs carry no varying-axes type for the checker.
        return jax.shard_map(on_shard, mesh=self.mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(
            *args, *(kwargs[n] for n in names))

    # The op interface. Signatures and semantics are those of the references in ferrum_jax.ops.
    def embed(self, tokens, table):
        return self.call("embed", tokens, table)

    def linear(self, x, w, bias=None):
        return self.call("linear", x, w, bias)

    def rms_norm(self, x, w, *, eps: float, offset: float = 0.0):
        return self.call("rms_norm", x, w, eps=eps, offset=offset)

    def add_rms_norm(self, x, residual, w, *, eps: float, offset: float = 0.0):
        """(s, rms_norm(s, w)) with s = x + residual: a residual add and the norm after it (ferrum_jax.ops)."""
        return self.call("add_rms_norm", x, residual, w, eps=eps, offset=offset)

    def add_rms_norm_linear(self, x, residual, norm_w, w, bias=None, *, eps: float, offset: float = 0.0):
        """(s, linear(rms_norm(s, norm_w), w, bias)) with s = x + residual (x when residual is None):
        a layer's residual add, input norm and first projection (ferrum_jax.ops)."""
        return self.call("add_rms_norm_linear", x, residual, norm_w, w, bias, eps=eps, offset=offset, ops=self)

    def rope(self, x, positions, rope):
        return self.call("rope", x, positions, rope)

    def activation(self, x, kind: str):
        return self.call("activation", x, kind)

    def gated_mlp(self, x, w_gate, w_up, w_down, kind: str):
        return self.call("gated_mlp", x, w_gate, w_up, w_down, kind, ops=self)

    def moe_route(self, x, router, *, top_k: int, norm_topk_prob: bool):
        """Router logits -> top-k (float32 weights, int32 expert ids), each [..., top_k] (ferrum_jax.moe_ops)."""
        return self.call("moe_route", x, router, top_k=top_k, norm_topk_prob=norm_topk_prob, ops=self)

    def moe_experts(self, x, ids, weights, w_gate, w_up, w_down, kind: str, *, expert_offset=0):
        """The routed expert MLPs of stacked [experts, out, in] weights, combined per token by `weights`."""
        return self.call("moe_experts", x, ids, weights, w_gate, w_up, w_down, kind, expert_offset=expert_offset,
                         ops=self)

    def moe(self, x, router, w_gate, w_up, w_down, kind: str, *, top_k: int, norm_topk_prob: bool, expert_offset=0):
        """A sparse MoE block: `moe_route` then `moe_experts`."""
        weights, ids = self.moe_route(x, router, top_k=top_k, norm_topk_prob=norm_topk_prob)
        return self.moe_experts(x, ids, weights, w_gate, w_up, w_down, kind, expert_offset=expert_offset)

    def attention(self, q, k, v, q_positions, *, scale: float, window: int | None = None,
                  softcap: float | None = None, causal_from_zero: bool = False, k_scale=None, v_scale=None):
        """Prefill-shaped attention (many query tokens) over cache slots [batch, kv_heads, slots, head_dim],
        slot s holding position s. `causal_from_zero` promises that queries and keys are the same
        tokens at positions 0..T-1 (a prefill into an empty cache), so an implementation may use a
        plain causal mask instead of the positions. Quantized caches pass their scales."""
        return self.call("attention", q, k, v, q_positions, scale=scale, window=window, softcap=softcap,
                         causal_from_zero=causal_from_zero, k_scale=k_scale, v_scale=v_scale)

    def decode_attention(self, q, k, v, q_positions, *, scale: float, window: int | None = None,
                         softcap: float | None = None, k_scale=None, v_scale=None):
        """Decode-shaped attention (one query token per sequence) against a contiguous cache."""
        return self.call("decode_attention", q, k, v, q_positions, scale=scale, window=window, softcap=softcap,
                         k_scale=k_scale, v_scale=v_scale)

    def decode_attention_append(self, q, k_new, v_new, k, v, q_positions, *, scale: float,
                                window: int | None = None, softcap: float | None = None, rope=None, q_norm=None,
                                k_norm=None, norm_eps: float = 1e-6, norm_offset: float = 0.0, tickets=None):
        """Store one decode token's k_new, v_new [batch, 1, kv_heads, head_dim] at q_positions in the
        contiguous cache k, v, then `decode_attention` over it -> (out, k, v). Given `rope` (and
        q_norm, k_norm), q and k_new are the projection's, normalized and rotated first. Given
        `tickets` (the kernel's zeroed split counters), they come back as a fourth output (ferrum_jax.ops)."""
        return self.call("decode_attention_append", q, k_new, v_new, k, v, q_positions, scale=scale, window=window,
                         softcap=softcap, rope=rope, q_norm=q_norm, k_norm=k_norm, norm_eps=norm_eps,
                         norm_offset=norm_offset, tickets=tickets, ops=self)

    def paged_attention(self, q, k_pages, v_pages, page_table, q_positions, *, scale: float,
                        window: int | None = None, softcap: float | None = None, k_scale=None, v_scale=None):
        """Attention of q [batch, q_len, heads, head_dim] over a paged cache (ferrum_jax.ops.paged_attention)."""
        return self.call("paged_attention", q, k_pages, v_pages, page_table, q_positions, scale=scale, window=window,
                         softcap=softcap, k_scale=k_scale, v_scale=v_scale)

    def ragged_paged_attention(self, q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, *,
                               scale: float, window: int | None = None, softcap: float | None = None,
                               k_scale=None, v_scale=None):
        """Attention for a batch mixing prefill chunks and decode tokens over a paged cache, in one call
        (ferrum_jax.ragged_kernels). Layout:
          q          [tokens, heads, head_dim]: the new tokens of all sequences packed, sequence s owning
                     tokens cu_q_lens[s] .. cu_q_lens[s+1]; tokens past cu_q_lens[num_seqs] are padding
                     and come out as zeros. Returns [tokens, heads, head_dim] in q's dtype.
          k_pages, v_pages  [pages, kv_heads, page_size, head_dim], already holding the new tokens' K/V;
                     int8 / fp8 codes pass k_scale, v_scale [pages, kv_heads, page_size].
          page_table int32 [seqs, pages_per_seq]: sequence s's slot j is in page page_table[s, j // page_size]
                     at row j % page_size.
          cu_q_lens  int32 [seqs + 1]; kv_lens int32 [seqs]: a sequence's length including its new tokens,
                     so its token i is at position kv_lens[s] - q_len_s + i.
          num_seqs   int32 scalar array: rows of the metadata past it are unused.
        Slot j is visible to a query at position p when j <= p (and j > p - window)."""
        return self.call("ragged_paged_attention", q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs,
                         scale=scale, window=window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)


DEFAULT_OPS = Ops()
