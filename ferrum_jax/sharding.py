"""Sharded runs over a device `Mesh`: Megatron tensor parallel, data parallel over the batch, and (for
MoE families) expert parallel. One host or many (`jax.distributed`).

Mesh axes (`make_mesh`), outermost first:
  "data"    data parallel: the batch rows (and the KV cache's batch dim) are split; weights replicated
  "expert"  expert parallel: the experts of an MoE layer are split (size 1 for dense models)
  "model"   tensor parallel: attention heads, MLP hidden units and the vocabulary are split
"model" is the innermost axis, so a tensor-parallel group is made of neighbouring devices.

Logical axes. Every weight has one logical name per dim (`WEIGHT_AXES`, looked up by the pytree
field name), and so has the KV cache (`CACHE_AXES`); `RULES` maps each logical name to a mesh axis
(None: not split). That one table is the whole policy:

  embed, lm_head  [vocab, embed]     vocab-parallel: each device holds a slice of the rows
  wq, bq          [heads, embed]     column-parallel (heads = num_heads * head_dim rows)
  wk, wv, bk, bv  [kv_heads, embed]  column-parallel
  wqkv, bqkv      [qkv, embed]       column-parallel, rows interleaved per shard (below)
  wo              [embed, heads]     row-parallel: partial sums, one all-reduce
  gate, up        [mlp, embed]       column-parallel
  down            [embed, mlp]       row-parallel: one all-reduce
  norms, bo       [embed]            replicated
  KV cache        [batch, kv_heads, seq, head_dim]: rows over "data", kv heads over "model"
  MoE stacks      gate, up [experts, expert_mlp, embed], down [experts, embed, expert_mlp]:
                  experts over "expert", expert_mlp over "model" (`STACK_AXES`); router replicated

Mixture of experts. `sharded_config` puts the mesh into the MoE config; `models.moe.moe_block` then
routes replicated (every device: router logits and top-k of its rows) and `moe_experts_sharded`
runs each device's experts [e*E/ep, (e+1)*E/ep) on its slice of the expert FFN dim in a shard_map
(`ops.moe_experts(..., expert_offset=first local expert)`: slots routed elsewhere add zero), then
one psum over ("expert", "model"). Attention, dense MLPs, embeddings and the cache keep the layouts
above and are replicated over "expert" (each expert group computes the same attention).

The arrays carry their `NamedSharding`s and prefill/decode are jitted with the cache's and decode
state's shardings as outputs (`ferrum_jax.generate`); XLA's GSPMD partitioner derives the rest from
them: the column-parallel matmuls, attention and the cache writes run on local heads with no
communication, the row-parallel o/down projections end in one all-reduce each, the embedding
gather is a masked local gather plus an all-reduce, and the vocab-sharded logits are reduced across
devices by the sampler. The attention ops are the exception: a sharded model's `Ops` carry the
mesh and run them in a shard_map on local heads (`_attention_layout`), so the Pallas attention
kernels run there on each device's shard (GSPMD would gather a Pallas call's operands).

Fused projections. `load` stacks q/k/v rows into `wqkv` (and gate/up into `Mlp.gate`). A plain row
split of [q; k; v] would give the first device all of q, so under tensor parallelism the rows are
interleaved per shard, [q_0; k_0; v_0; q_1; k_1; v_1; ...] with q_i the i-th slice of whole query
heads, and `Attention.shards` tells the model how to split the fused output (models/common.py).
Gate/up are left apart when tp > 1 (two column-parallel matmuls; they are large enough not to
need fusing).

Fewer KV heads than devices. When tp > num_kv_heads (tp a multiple of it), each kv head is
replicated tp / num_kv_heads times: the rows of wk/wv (and bk/bv) of head j are repeated, in order,
so expanded head i is original head i * num_kv_heads // tp, and the config's num_kv_heads becomes
tp (`sharded_config`). Device i then holds query heads [i*h/tp, (i+1)*h/tp), all of which read
original kv head i * num_kv_heads // tp, exactly the one expanded head it holds: every device has
whole heads, attention needs no communication, and the cache holds one kv head per device
(tp / num_kv_heads copies of each; the same memory a replicated cache would take).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ferrum_jax.backend import register_layout
from ferrum_jax.cache import KVCache
from ferrum_jax.errors import CheckpointError, ConfigError
from ferrum_jax.quant.packed import GGUFWeight
from ferrum_jax.quant.qweight import QuantWeight
from models.common import Attention, Mlp

AXES = ("data", "expert", "model")
PACKED = (GGUFWeight, QuantWeight)  # quantized expert stacks (GGUF blocks, or the kernel layout)

# Logical axis -> mesh axis. The one rule table.
RULES: dict[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "qkv": "model",
    "mlp": "model",
    "experts": "expert",
    "expert_mlp": "model",
    "router": None,
    "embed": None,
    "head_dim": None,
    "seq": None,
}

# Pytree field name -> logical axes of that weight (dims in the checkpoint's [out, in] layout).
WEIGHT_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"), "lm_head": ("vocab", "embed"),
    "wq": ("heads", "embed"), "wk": ("kv_heads", "embed"), "wv": ("kv_heads", "embed"),
    "wqkv": ("qkv", "embed"), "wo": ("embed", "heads"),
    "bq": ("heads",), "bk": ("kv_heads",), "bv": ("kv_heads",), "bqkv": ("qkv",), "bo": ("embed",),
    "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "gate": ("mlp", "embed"), "up": ("mlp", "embed"), "down": ("embed", "mlp"),
    "router": ("router", "embed"), "shared_gate": ("router", "embed"),
}
# The expert stacks of a `models.moe.Moe` node ([experts, out, in]; told from an Mlp's 2-D gate/up/down
# by their rank): experts over "expert", the expert FFN dim over "model".
STACK_AXES: dict[str, tuple[str, ...]] = {
    "gate": ("experts", "expert_mlp", "embed"), "up": ("experts", "expert_mlp", "embed"),
    "down": ("experts", "embed", "expert_mlp"),
}
CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")
ROW_AXES = ("batch",)  # per-row generation inputs and decode state: [batch, ...]


def make_mesh(tp: int = 1, dp: int = 1, ep: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "expert", "model") mesh of shape (dp, ep, tp) over the first dp*ep*tp `devices`
    (default: `jax.devices()`, every process's devices after `jax.distributed.initialize`)."""
    for name, n in (("tp", tp), ("dp", dp), ("ep", ep)):
        if n < 1:
            raise ConfigError(f"{name} must be >= 1, got {n}")
    devices = list(jax.devices() if devices is None else devices)
    need = tp * dp * ep
    if need > len(devices):
        raise ConfigError(f"a mesh of dp={dp} x ep={ep} x tp={tp} needs {need} devices; {len(devices)} available")
    grid = np.array(devices[:need], dtype=object).reshape(dp, ep, tp)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def axis_size(mesh: Mesh | None, axis: str) -> int:
    return 1 if mesh is None else int(mesh.shape[axis])


def spec(axes: Sequence[str | None]) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes, by RULES."""
    return PartitionSpec(*(RULES[a] if a is not None else None for a in axes))


def logical_axes(path: tuple, leaf: Any) -> tuple[str, ...]:
    """Logical axes of a weight leaf, from the last field name on its pytree path ("data" of a
    packed GGUFWeight is skipped: its rows and blocked columns split like the logical tensor's)."""
    names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey) and k.name != "data"]
    name = names[-1] if names else ""
    if name in STACK_AXES and len(leaf.shape) == 3:
        return STACK_AXES[name]
    if name in WEIGHT_AXES:
        return WEIGHT_AXES[name]
    if name.endswith("norm"):  # attn_norm, mlp_norm, norm, ...: [embed]
        return ("embed",)
    raise ConfigError(f"no logical axes for weight {'.'.join(names) or '<root>'}: add it to "
                      "ferrum_jax.sharding.WEIGHT_AXES")


def _path_name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def check_split(name: str, shape: Sequence[int], pspec: PartitionSpec, mesh: Mesh, block: int = 1) -> None:
    """CheckpointError naming the tensor and mesh axis when a dim does not split evenly (for the
    last dim of a packed weight: into whole blocks of `block` elements)."""
    for dim, (size, axis) in enumerate(zip(shape, tuple(pspec) + (None,) * len(shape))):
        if axis is None:
            continue
        n = axis_size(mesh, axis)
        unit = block if dim == len(shape) - 1 else 1
        if size % (n * unit):
            what = f"{size}" if unit == 1 else f"{size} ({size // unit} blocks of {unit})"
            raise CheckpointError(f"tensor {name!r}: dim {dim} of shape {tuple(shape)} = {what} does not split "
                                  f"evenly over mesh axis {axis!r} of size {n}")


def weight_shardings(weights: Any, mesh: Mesh) -> Any:
    """A pytree of NamedShardings matching `weights` (already in the layout of `arrange`), by the
    logical axes of each leaf and RULES."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec(logical_axes(path, leaf))), weights)


def named(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, spec(axes))


def cache_sharding(mesh: Mesh) -> NamedSharding:
    return named(mesh, CACHE_AXES)


def row_sharding(mesh: Mesh) -> NamedSharding:
    return named(mesh, ROW_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def place(mesh: Mesh | None, tree: Any, rows: bool = True) -> Any:
    """Host values (numpy or jax arrays) onto the mesh: split along the batch rows over "data" or
    replicated. Works across processes (each process passes the same values). No mesh: jnp arrays."""
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, tree)
    sharding = row_sharding(mesh) if rows else replicated(mesh)

    def put(x: Any) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree)


def host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) array as a numpy array, the same on every process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def create_cache(mesh: Mesh, *, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: Any) -> KVCache:
    """A zero KV cache created in place on the mesh ([batch, kv_heads, seq, head_dim]: rows over
    "data", kv heads over "model"); no device ever holds more than its slice."""
    for dim, n, axis in ((0, batch, "data"), (1, kv_heads, "model")):
        if n % axis_size(mesh, axis):
            raise ConfigError(f"KV cache dim {dim} ({n}) does not split over mesh axis {axis!r} of size "
                              f"{axis_size(mesh, axis)}")
    return _cache_maker(mesh, num_layers, batch, kv_heads, capacity, head_dim, jnp.dtype(dtype))()


@functools.cache
def _cache_maker(mesh: Mesh, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: jnp.dtype) -> Callable[[], KVCache]:
    s = cache_sharding(mesh)
    return jax.jit(lambda: KVCache.create(num_layers=num_layers, batch=batch, kv_heads=kv_heads, capacity=capacity,
                                          head_dim=head_dim, dtype=dtype), out_shardings=KVCache(k=s, v=s))


# --- the sharded layout: kv heads replicated, q/k/v fused per shard ---------------------------------


def kv_replicas(num_heads: int, num_kv_heads: int, tp: int, where: str = "model") -> int:
    """How many copies of each kv head tensor parallelism over `tp` devices needs (1: none)."""
    if num_heads % tp:
        raise ConfigError(f"{where}: num_attention_heads={num_heads} does not split over mesh axis 'model' "
                          f"of size {tp}")
    if num_kv_heads % tp == 0:
        return 1
    if tp % num_kv_heads:
        raise ConfigError(f"{where}: num_key_value_heads={num_kv_heads} does not split over mesh axis 'model' "
                          f"of size {tp}, and {tp} is not a multiple of it (to replicate kv heads)")
    return tp // num_kv_heads


def check_mesh(cfg: Any, mesh: Mesh | None) -> None:
    if mesh is None:
        return
    if set(mesh.axis_names) != set(AXES):
        raise ConfigError(f"mesh axes {mesh.axis_names}: expected {AXES} (see ferrum_jax.sharding.make_mesh)")
    ep, tp = axis_size(mesh, "expert"), axis_size(mesh, "model")
    if getattr(cfg, "num_experts", 0):  # models.moe: experts over "expert", their FFN dim over "model"
        for field, n, axis, size in (("num_experts", cfg.num_experts, "expert", ep),
                                     ("moe_intermediate_size", cfg.moe_intermediate_size, "model", tp),
                                     ("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size,
                                      "model", tp)):
            if n % size:
                raise ConfigError(f"{cfg.architecture}: {field}={n} does not split over mesh axis {axis!r} of "
                                  f"size {size}")
    if axis_size(mesh, "expert") > 1 and not getattr(cfg, "num_experts", 0):
        raise ConfigError(f"expert parallel needs an MoE model: {cfg.architecture} is dense (mesh axis 'expert' "
                          f"has size {axis_size(mesh, 'expert')}; use --tp / --dp)")
    kv_replicas(cfg.num_heads, cfg.num_kv_heads, axis_size(mesh, "model"), cfg.architecture)


def sharded_config(cfg: Any, mesh: Mesh | None) -> Any:
    """`cfg` as the sharded model sees it: num_kv_heads multiplied by the kv head replicas; an MoE
    config also carries the mesh (its experts run in `moe_experts_sharded`)."""
    check_mesh(cfg, mesh)
    if mesh is not None and getattr(cfg, "num_experts", 0):
        cfg = dataclasses.replace(cfg, mesh=mesh)
    rep = kv_replicas(cfg.num_heads, cfg.num_kv_heads, axis_size(mesh, "model"), cfg.architecture)
    if rep == 1:
        return cfg
    kv = cfg.num_kv_heads * rep
    return dataclasses.replace(cfg, num_kv_heads=kv,
                               attn=tuple(dataclasses.replace(a, num_kv_heads=kv) for a in cfg.attn))


def moe_experts_sharded(mesh: Mesh, ops: Any, x: jax.Array, ids: jax.Array, weights: jax.Array, gate: Any,
                        up: Any, down: Any, kind: str) -> jax.Array:
    """`ops.moe_experts` over expert stacks laid out by STACK_AXES on `mesh`, in a shard_map: every
    device gets the (replicated) routing of its rows and runs its own experts
    [i*E/ep, (i+1)*E/ep) (`expert_offset`; slots routed elsewhere add zero) on its slice of the
    expert FFN dim (gate/up column-parallel, down row-parallel: the activation is elementwise, so
    the slices are independent), and one psum over ("expert", "model") sums the partial outputs.
    Rows stay split over "data" (when the batch divides; else replicated)."""
    if any(isinstance(w, PACKED) for w in (gate, up, down)):
        raise ConfigError("packed (quantized) expert stacks do not run on a mesh yet (load with dequantize=True)")
    ep = axis_size(mesh, "expert")
    local_experts = gate.shape[0] // ep
    rows = PartitionSpec("data" if x.shape[0] % axis_size(mesh, "data") == 0 else None)
    stacks = [w for w in (gate, up, down) if w is not None]
    names = ["gate", "up", "down"] if up is not None else ["gate", "down"]
    specs = tuple(spec(STACK_AXES[n]) for n in names)
    if up is None and axis_size(mesh, "model") > 1:
        raise ConfigError("a fused [gate; up] expert stack cannot split over mesh axis 'model' (arrange unfuses it)")

    local_ops = dataclasses.replace(ops, mesh=None)  # local shards: the Pallas kernels may run

    def local(x: jax.Array, ids: jax.Array, weights: jax.Array, *ws: jax.Array) -> jax.Array:
        g, u, d = ws if len(ws) == 3 else (ws[0], None, ws[1])
        offset = jax.lax.axis_index("expert") * local_experts
        y = local_ops.moe_experts(x, ids, weights, g, u, d, kind, expert_offset=offset)
        return jax.lax.psum(y, ("expert", "model"))

    # check_vma=False: the Pallas grouped kernel's outputs carry no varying-axes type for the checker.
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, *specs), out_specs=rows, check_vma=False)(
        x, ids, weights, *stacks)


def _attention_layout(mesh: Mesh, q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                      **kwargs: Any) -> tuple[tuple, dict, PartitionSpec]:
    """How the attention ops split: batch rows over "data", heads over "model" (q's heads and the
    cache's kv heads together: each device holds whole query groups and their kv head, see the
    module docstring), so attention needs no communication. A dim that does not divide stays whole."""
    data = "data" if q.shape[0] % axis_size(mesh, "data") == 0 else None
    tp = axis_size(mesh, "model")
    model = "model" if q.shape[2] % tp == 0 and k.shape[1] % tp == 0 else None
    qs = PartitionSpec(data, None, model, None)
    kv = PartitionSpec(data, model, None, None)
    scales = PartitionSpec(data, model, None)
    return (qs, kv, kv, PartitionSpec(data, None)), {"k_scale": scales, "v_scale": scales}, qs


def _append_layout(mesh: Mesh, q: jax.Array, k_new: jax.Array, v_new: jax.Array, k: jax.Array, v: jax.Array,
                   q_positions: jax.Array, **kwargs: Any) -> tuple[tuple, dict, tuple]:
    """`decode_attention_append` splits as attention: the new k/v (and the split counters,
    `tickets` [batch, kv_heads]) by kv heads like the cache."""
    (qs, kv, _, pos), _, out = _attention_layout(mesh, q, k, v, q_positions)
    new = PartitionSpec(qs[0], None, kv[1], None)
    norms = PartitionSpec(None)  # per-head norm weights [head_dim]: the same on every device
    tickets = PartitionSpec(kv[0], kv[1])
    outs = (out, kv, kv) if kwargs.get("tickets") is None else (out, kv, kv, tickets)
    return (qs, new, new, kv, kv, pos), {"q_norm": norms, "k_norm": norms, "tickets": tickets}, outs


# Attention on a mesh runs in shard_map on local heads, so its Pallas kernels run there too.
register_layout("attention", _attention_layout)
register_layout("decode_attention", _attention_layout)
register_layout("decode_attention_append", _append_layout)


@dataclasses.dataclass(frozen=True)
class RowOps:
    """How `arrange` builds rows of a weight: `take(x, rows)` (rows of x, in that order), `concat`
    (stack along rows), `fusable(*xs)` (dense and of one dtype)."""
    take: Callable[[Any, np.ndarray], Any]
    concat: Callable[[list], Any]
    fusable: Callable[..., bool]


def _blocks(n: int, shards: int) -> list[np.ndarray]:
    return np.split(np.arange(n), shards)


def arrange(weights: Any, cfg: Any, tp: int, ops: RowOps) -> Any:
    """Rewrite the Attention / Mlp nodes of unsharded `weights` (fused or not) into the layout of
    `tp` tensor-parallel shards: kv heads replicated as needed, q/k/v fused per shard (dense only),
    gate/up fused when tp == 1. `cfg` is the unsharded config."""
    rep = kv_replicas(cfg.num_heads, cfg.num_kv_heads, tp, cfg.architecture)
    d, kv = cfg.head_dim, cfg.num_kv_heads
    q_rows, kv_rows = cfg.num_heads * d, kv * d
    expand = (np.repeat(np.arange(kv), rep)[:, None] * d + np.arange(d)).reshape(-1)

    def interleave(q: Any, k: Any, v: Any) -> Any:
        parts = zip(_blocks(q_rows, tp), _blocks(kv_rows * rep, tp), _blocks(kv_rows * rep, tp))
        return ops.concat([ops.take(x, r) for qb, kb, vb in parts for x, r in ((q, qb), (k, kb), (v, vb))])

    def attention(a: Attention) -> Attention:
        if a.shards != 1:
            raise ConfigError("these weights are already arranged for tensor parallelism")
        wq, wk, wv, bq, bk, bv = a.wq, a.wk, a.wv, a.bq, a.bk, a.bv
        if a.wqkv is not None:  # undo fuse_projections: [q; k; v]
            cuts = (np.arange(q_rows), np.arange(q_rows, q_rows + kv_rows), np.arange(q_rows + kv_rows, q_rows + 2 * kv_rows))
            wq, wk, wv = (ops.take(a.wqkv, r) for r in cuts)
            if a.bqkv is not None:
                bq, bk, bv = (ops.take(a.bqkv, r) for r in cuts)
        if rep > 1:
            wk, wv = ops.take(wk, expand), ops.take(wv, expand)
            bk, bv = (None if b is None else ops.take(b, expand) for b in (bk, bv))
        out = dataclasses.replace(a, wq=wq, wk=wk, wv=wv, bq=bq, bk=bk, bv=bv, wqkv=None, bqkv=None)
        biases = (bq, bk, bv)
        if not ops.fusable(wq, wk, wv) or (any(b is not None for b in biases) and not all(b is not None for b in biases)):
            return out
        bqkv = interleave(*biases) if bq is not None else None
        return dataclasses.replace(out, wq=None, wk=None, wv=None, bq=None, bk=None, bv=None,
                                   wqkv=interleave(wq, wk, wv), bqkv=bqkv, shards=tp)

    def mlp(m: Mlp) -> Mlp:
        gate, up = m.gate, m.up
        if up is None:  # fused [gate; up] (of intermediate_size, or a shared expert's size)
            f = m.gate.shape[0] // 2
            gate, up = ops.take(m.gate, np.arange(f)), ops.take(m.gate, np.arange(f, 2 * f))
        if tp == 1 and ops.fusable(gate, up):
            return Mlp(gate=ops.concat([gate, up]), up=None, down=m.down)
        return Mlp(gate=gate, up=up, down=m.down)

    def moe(m: Any) -> Any:  # models.moe.Moe: stacks as they are (gate/up unfused for tp > 1)
        gate, up = m.gate, m.up
        if up is None and tp > 1:  # [E, 2F, H]: [gate_e; up_e] per expert
            f = gate.shape[1] // 2
            gate, up = gate[:, :f], gate[:, f:]
        return dataclasses.replace(m, gate=gate, up=up, shared=None if m.shared is None else mlp(m.shared))

    def node(n: Any) -> Any:
        if _is_moe(n):
            return moe(n)
        return attention(n) if isinstance(n, Attention) else mlp(n) if isinstance(n, Mlp) else n

    return jax.tree_util.tree_map(node, weights, is_leaf=lambda n: isinstance(n, (Attention, Mlp)) or _is_moe(n))


def _is_moe(n: Any) -> bool:
    """A models.moe.Moe node (not imported here: models.moe imports the backend)."""
    return type(n).__name__ == "Moe" and hasattr(n, "router")


def _take_device(x: Any, rows: np.ndarray) -> Any:
    if isinstance(x, GGUFWeight):
        return GGUFWeight(jnp.take(x.data, jnp.asarray(rows), axis=0), x.ggml_type, (len(rows), *x.shape[1:]),
                          x.compute_dtype)
    return jnp.take(x, jnp.asarray(rows), axis=0)


def _fusable_device(*xs: Any) -> bool:
    return all(isinstance(x, jax.Array) for x in xs) and len({x.dtype for x in xs}) == 1


DEVICE_ROWS = RowOps(take=_take_device, concat=jnp.concatenate, fusable=_fusable_device)


def _unique_map(fn: Callable[[tuple, Any], Any], tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """tree_map_with_path that maps a leaf object appearing twice (tied embeddings) once."""
    done: dict[int, Any] = {}

    def once(path: tuple, leaf: Any) -> Any:
        if id(leaf) not in done:
            done[id(leaf)] = fn(path, leaf)
        return done[id(leaf)]

    return jax.tree_util.tree_map_with_path(once, tree, is_leaf=is_leaf)


def shard_weights(cfg: Any, weights: Any, mesh: Mesh) -> tuple[Any, Any]:
    """(sharded config, weights placed on the mesh) from unsharded weights of `cfg` (as `load` or
    `shapes.random_weights` give them, on any device): rearranged for tensor parallelism, then each
    leaf put with its NamedSharding. Memory: one tensor at a time beyond the input."""
    tp = axis_size(mesh, "model")
    new_cfg = sharded_config(cfg, mesh)
    arranged = arrange(weights, cfg, tp, DEVICE_ROWS) if tp > 1 or new_cfg is not cfg else weights
    for n in jax.tree_util.tree_leaves(arranged, is_leaf=_is_moe):
        if _is_moe(n) and any(isinstance(w, PACKED) for w in (n.gate, n.up, n.down)):
            raise ConfigError(f"{cfg.architecture}: packed (quantized) expert stacks do not run on a mesh yet; load "
                              "the GGUF file with dequantize=True before shard_model")

    def put(path: tuple, leaf: Any) -> Any:
        if isinstance(leaf, GGUFWeight):
            s = NamedSharding(mesh, spec(logical_axes(path, leaf)))
            check_split(_path_name(path), leaf.shape, s.spec, mesh, block=leaf.layout.block_size)
            return dataclasses.replace(leaf, data=jax.device_put(leaf.data, s))
        s = NamedSharding(mesh, spec(logical_axes(path, leaf)))
        check_split(_path_name(path), leaf.shape, s.spec, mesh)
        return jax.device_put(leaf, s)

    return new_cfg, _unique_map(put, arranged, is_leaf=lambda x: isinstance(x, GGUFWeight))


def shard_model(model: Any, mesh: Mesh) -> Any:
    """A copy of a single-device `Model` sharded over `mesh` (see `shard_weights`)."""
    cfg, weights = shard_weights(model.config, model.weights, mesh)
    return dataclasses.replace(model, config=cfg, weights=weights, mesh=mesh)


def device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each device holds of the arrays in `tree` (a leaf appearing twice counted once)."""
    out: dict[jax.Device, int] = {}
    seen: set[int] = set()
    for leaf in jax.tree_util.tree_leaves(tree):
        if id(leaf) in seen or not isinstance(leaf, jax.Array):
            continue
        seen.add(id(leaf))
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def total_bytes(tree: Any) -> int:
    """Bytes of the logical arrays of `tree` (unique leaves)."""
    seen, total = set(), 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if id(leaf) not in seen:
            seen.add(id(leaf))
            total += math.prod(leaf.shape) * leaf.dtype.itemsize
    return total
