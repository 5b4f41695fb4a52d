"""Sharded decode benchmark (issue 8; expert parallel for MoE shapes): random weights of a real model's
shape, drawn straight onto a device mesh, decode tokens/s on each mesh, scaling efficiency against the
1-device point and the fraction of the aggregate copy bandwidth (what every device reads per decode
step: its weight shards and its KV cache slice; for an MoE shape only the experts the step's tokens
are expected to pick under uniform routing; the JSON's bytes_note says how it is counted).

A mesh is named by its axis sizes, e.g. tp2 (tensor parallel over 2 devices), ep4 (the experts of
every MoE layer over 4 devices), dp2 (the batch over 2 replicas) or tp2ep2 (4 devices); it runs on
the first tp*ep*dp devices. `--tp 1,2,4` is short for `--meshes tp1,tp2,tp4`.

    python bench/sharded.py --shape llama-3.1-8b --tp 1,2,4 --batches 1,32          # 4 GPUs
    python bench/sharded.py --shape llama-3.1-70b --tp 2,4 --batches 1,32           # 4 GPUs
    python bench/sharded.py --shape qwen3-30b-a3b --meshes tp1,tp2,ep2,tp4,ep4,tp2ep2 --batches 1,32  # 4 GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python bench/sharded.py --shape llama-tiny --tp 1,2,4 --dtype f32 --context 64 --steps 8  # CPU smoke
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python bench/sharded.py --shape qwen3-moe-tiny --meshes tp1,tp2,ep2,ep4,tp2ep2 --dtype f32 \\
        --context 64 --steps 8 --batches 1,4 --out ''                                 # CPU smoke, MoE

Writes bench/results/sharded_<shape>_<dtype>_<device>.json (with _<mesh names> before .json when a
mesh other than plain TP is in the run) and a .png of tokens/s per mesh when matplotlib is there.
NVLink multicast stays off: NCCL_NVLS_ENABLE=0 is set before jax starts.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before jax (and NCCL) start: NVLink multicast off

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import models  # noqa: E402
from ferrum_jax import sharding as sh  # noqa: E402
from ferrum_jax.backend import Ops  # noqa: E402
from ferrum_jax.bench.ceilings import device_ceilings  # noqa: E402
from ferrum_jax.bench.sweeps import host_state  # noqa: E402
from ferrum_jax.bench.weights import DISTINCT_EXPERTS_NOTE, decode_weight_bytes, weight_stats  # noqa: E402
from ferrum_jax.compile_log import count_compiles  # noqa: E402
from ferrum_jax.errors import ConfigError  # noqa: E402
from ferrum_jax.generate import _programs  # noqa: E402
from ferrum_jax.sampling import GREEDY, SamplingArrays  # noqa: E402
from ferrum_jax.shapes import shape_config, tensor_shapes  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}

# How the bytes behind fraction_of_aggregate_copy_bandwidth are counted (written into the JSON).
BYTES_NOTE = ("fraction_of_aggregate_copy_bandwidth = step_bytes_per_device / seconds_per_step / the copy "
              "bandwidth of one device (every device reads its share at the same time); step_bytes_per_device = "
              "weight_bytes_per_device + kv_bytes_per_device. Weights: the shards a device holds, less its slice "
              "of an untied embedding table (a step gathers a few rows of it), measured per device and averaged. "
              "KV cache: rows over dp, kv heads over tp, replicated over ep: the cache bytes read / (tp * dp).")
MOE_BYTES_NOTE = ("MoE: weight_bytes_per_device = non_expert_weight_bytes_per_device (as above, without the expert "
                  "stacks) + expert_bytes_per_device, the expected expert bytes of the rows one data-parallel "
                  "replica decodes (batch / dp; " + DISTINCT_EXPERTS_NOTE + ") spread over the ep * tp devices "
                  "holding that replica's experts (each holds E/ep experts' 1/tp slices and every expert is "
                  "equally likely to be read: each device's expectation, not the busiest device's).")

# Shapes only: `arrange` on ShapeDtypeStructs gives the sharded layout's leaf shapes without data.
ABSTRACT_ROWS = sh.RowOps(
    take=lambda x, rows: jax.ShapeDtypeStruct((len(rows), *x.shape[1:]), x.dtype),
    concat=lambda xs: jax.ShapeDtypeStruct((sum(x.shape[0] for x in xs), *xs[0].shape[1:]), xs[0].dtype),
    fusable=lambda *xs: True)


# --- meshes ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Axis sizes of one benchmarked mesh (`sh.make_mesh(tp=, ep=, dp=)`)."""
    tp: int = 1
    ep: int = 1
    dp: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.ep * self.dp

    @property
    def name(self) -> str:
        """tp2, ep4, tp2ep2, ...: the axes above 1 in (tp, ep, dp) order; tp1 for one device."""
        parts = [f"{axis}{n}" for axis, n in (("tp", self.tp), ("ep", self.ep), ("dp", self.dp)) if n > 1]
        return "".join(parts) or "tp1"

    @property
    def plain_tp(self) -> bool:
        return self.ep == 1 and self.dp == 1


def parse_mesh(text: str) -> MeshSpec:
    """'tp2', 'ep4', 'tp2ep2', 'tp2xdp2' (an 'x' between axes is allowed) -> MeshSpec."""
    t = text.strip().lower()
    if not re.fullmatch(r"(?:(?:tp|ep|dp)\d+x?)*(?:tp|ep|dp)\d+", t):
        raise argparse.ArgumentTypeError(f"mesh {text!r}: expected axis sizes such as tp2, ep4, dp2, tp2ep2")
    sizes: dict[str, int] = {}
    for axis, n in re.findall(r"(tp|ep|dp)(\d+)", t):
        if axis in sizes:
            raise argparse.ArgumentTypeError(f"mesh {text!r}: {axis} given twice")
        if int(n) < 1:
            raise argparse.ArgumentTypeError(f"mesh {text!r}: {axis} must be >= 1")
        sizes[axis] = int(n)
    return MeshSpec(**sizes)


def parse_meshes(text: str) -> tuple[MeshSpec, ...]:
    return tuple(parse_mesh(t) for t in text.split(",") if t.strip())


def check_meshes(meshes: tuple[MeshSpec, ...], cfg: Any, shape: str) -> None:
    """Refuse what can never run, before any weights are drawn: expert parallel on a dense shape
    (whatever the device count), and axis sizes that do not split the shape (`sh.check_mesh`, on a
    mesh of that many devices when there are enough; the others are skipped later)."""
    moe = bool(getattr(cfg, "num_experts", 0))
    for m in meshes:
        if m.ep > 1 and not moe:
            raise ConfigError(f"--meshes {m.name}: expert parallel (ep={m.ep}) needs a mixture-of-experts shape; "
                              f"--shape {shape} is dense ({cfg.architecture}). Use tp/dp meshes for it.")
        if m.devices <= len(jax.devices()):
            try:
                sh.check_mesh(cfg, sh.make_mesh(tp=m.tp, ep=m.ep, dp=m.dp))
            except ConfigError as e:
                raise ConfigError(f"--meshes {m.name} with --shape {shape}: {e}") from e


# --- weights ----------------------------------------------------------------------------------------


@functools.cache
def _drawer(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding, ones: bool):
    def draw(key: jax.Array) -> jax.Array:
        if ones:
            return jnp.ones(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.jit(draw, out_shardings=sharding)  # each device draws only its slice


def random_sharded_weights(cfg: Any, mesh: Mesh, dtype: Any, seed: int = 0) -> tuple[Any, Any]:
    """(sharded config, weights of `cfg`'s shape in the sharded layout, N(0, 0.02), norms 1), drawn
    on the mesh one tensor at a time: no device or host ever holds a whole tensor. MoE experts come
    as [experts, out, in] stacks (`shapes.tensor_shapes`: one struct per projection, not one per
    expert), each placed by its logical axes (`sh.STACK_AXES`: experts over "expert", the expert
    FFN dim over "model")."""
    family = models.family_of(cfg)
    structs = {n: jax.ShapeDtypeStruct(s, dtype) for n, s in tensor_shapes(cfg).items()}
    layout = sh.arrange(family.build_weights(cfg, structs), cfg, sh.axis_size(mesh, "model"), ABSTRACT_ROWS)
    key, count = jax.random.PRNGKey(seed), iter(range(1 << 30))

    def draw(path: tuple, s: jax.ShapeDtypeStruct) -> jax.Array:
        name = sh._path_name(path)
        sharding = NamedSharding(mesh, sh.spec(sh.logical_axes(path, s)))
        sh.check_split(name, s.shape, sharding.spec, mesh)
        return _drawer(s.shape, s.dtype, sharding, name.endswith("norm"))(jax.random.fold_in(key, next(count)))

    weights = sh._unique_map(draw, layout, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return sh.sharded_config(cfg, mesh), weights  # an MoE config carries the mesh from here


def _expert_stacks(weights: Any) -> list[jax.Array]:
    from models.moe import Moe

    return [w for layer in getattr(weights, "layers", ()) if isinstance(layer.mlp, Moe)
            for w in (layer.mlp.gate, layer.mlp.up, layer.mlp.down) if w is not None]


def non_expert_bytes_per_device(weights: Any) -> float:
    """Non-expert weight bytes one device reads per decode step: its shards, less its slice of an
    untied embedding table (a step gathers only a few rows of it) and less its expert stacks
    (counted by `expert_bytes_per_device`: a step reads only some experts). Mean over devices."""
    per_device = sh.device_bytes(weights)
    embed_shard = sh.device_bytes(weights.embed) if weights.embed is not weights.lm_head else {}
    expert_shard = sh.device_bytes(_expert_stacks(weights))
    return statistics.mean(b - embed_shard.get(d, 0) - expert_shard.get(d, 0) for d, b in per_device.items())


def expert_bytes_per_device(ws: dict[str, Any], m: MeshSpec, batch: int) -> float:
    """Expected expert bytes one device reads per decode step under uniform routing: a data replica
    decodes batch / dp rows, so it reads `decode_weight_bytes` of that batch less the non-expert
    bytes; its ep * tp devices each hold an equal slice of them (experts over ep, their FFN dim
    over tp), and every expert is equally likely to be picked."""
    if "moe" not in ws:
        return 0.0
    experts_read = decode_weight_bytes(ws, batch // m.dp) - ws["moe"]["non_expert_bytes_read_per_decode_step"]
    return experts_read / (m.ep * m.tp)


# --- the timed decode -------------------------------------------------------------------------------


def _state(mesh: Mesh, batch: int, capacity: int, vocab: int, context: int):
    """A decode state at position `context` for every row, placed as the decode program returns it."""
    s = host_state(batch, capacity, vocab, context)
    placed = {f.name: sh.place(mesh, np.asarray(getattr(s, f.name)), rows=f.name != "stop_ids")
              for f in dataclasses.fields(s)}
    return dataclasses.replace(s, **placed)


def bench_decode(weights: Any, cfg: Any, mesh: Mesh, *, batch: int, context: int, steps: int, runs: int,
                 dtype: Any) -> dict[str, Any]:
    capacity = context + steps + 16
    cache = sh.create_cache(mesh, num_layers=cfg.num_layers, batch=batch, kv_heads=cfg.num_kv_heads,
                            capacity=capacity, head_dim=cfg.head_dim, dtype=dtype)
    params = sh.place(mesh, SamplingArrays.from_params([GREEDY] * batch))
    _, decode = _programs(mesh)
    n = jnp.int32(steps)
    times, compiles = [], []
    for i in range(runs + 2):  # a compile call and a warm-up call, then the timed runs
        state = _state(mesh, batch, capacity, cfg.vocab_size, context)
        with count_compiles() as log:
            start = time.perf_counter()
            state, cache = decode(weights, cache, state, params, n, cfg=cfg, ops=Ops(mesh=mesh))
            jax.block_until_ready((state, cache))
            seconds = time.perf_counter() - start
        compiles.append(log.compiles)
        if i >= 2:
            times.append(seconds)
    done = int(sh.host(state.count).min())
    kv_bytes_read = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * (context + steps / 2) \
        * jnp.dtype(dtype).itemsize  # all devices together; each reads its rows' and kv heads' share
    t = statistics.median(times)
    return {"batch": batch, "context": context, "steps": steps, "steps_done_min": done, "run_seconds": times,
            "seconds_per_step": t / steps, "tokens_per_second": batch * steps / t,
            "kv_bytes_read_per_step": kv_bytes_read, "compiles_per_call": compiles}


def bench_mesh(m: MeshSpec, cfg0: Any, args: argparse.Namespace, bw: float) -> list[dict[str, Any]]:
    """Every batch of `args` on one mesh: the points, with bytes per device and bandwidth fraction."""
    dtype = DTYPES[args.dtype]
    mesh = sh.make_mesh(tp=m.tp, ep=m.ep, dp=m.dp)
    start = time.perf_counter()
    cfg, weights = random_sharded_weights(cfg0, mesh, dtype)
    jax.block_until_ready(weights)
    draw_seconds = time.perf_counter() - start
    batches = [b for b in args.batches if b % m.dp == 0]
    for b in sorted(set(args.batches) - set(batches)):  # the cache and the decode rows split over "data"
        print(f"[sharded] {m.name}: batch {b} does not split over dp={m.dp}, skipped", file=sys.stderr)
    ws = weight_stats(weights, cfg, [b // m.dp for b in batches])  # logical bytes (sharding does not change them)
    w_non_expert = non_expert_bytes_per_device(weights)
    points = []
    for batch in batches:
        p = bench_decode(weights, cfg, mesh, batch=batch, context=args.context, steps=args.steps,
                         runs=args.runs, dtype=dtype)
        w_expert = expert_bytes_per_device(ws, m, batch)
        kv_dev = p["kv_bytes_read_per_step"] / (m.tp * m.dp)
        step_bytes = w_non_expert + w_expert + kv_dev
        p = {"mesh": m.name, "tp": m.tp, "ep": m.ep, "dp": m.dp, "devices": m.devices} | p
        p |= {"weight_bytes_per_device": w_non_expert + w_expert, "kv_bytes_per_device": kv_dev,
              "step_bytes_per_device": step_bytes, "draw_seconds": draw_seconds,
              "fraction_of_aggregate_copy_bandwidth": step_bytes / p["seconds_per_step"] / bw}
        if "moe" in ws:
            p |= {"non_expert_weight_bytes_per_device": w_non_expert, "expert_bytes_per_device": w_expert,
                  "expected_distinct_experts_per_layer": ws["moe"]["expected_distinct_experts_per_layer"][
                      str(batch // m.dp)]}
        points.append(p)
        print(f"[sharded] {m.name} (tp={m.tp} ep={m.ep} dp={m.dp}) batch={batch}: {p['tokens_per_second']:.1f} tok/s, "
              f"{p['seconds_per_step'] * 1e3:.2f} ms/step, {100 * p['fraction_of_aggregate_copy_bandwidth']:.0f}% "
              f"of {m.devices} x copy bandwidth", file=sys.stderr)
    return points


def add_scaling_efficiency(points: list[dict[str, Any]]) -> None:
    """tokens/s per device against the 1-device point at the same batch (None without one)."""
    for p in points:
        base = next((q for q in points if q["devices"] == 1 and q["batch"] == p["batch"]), None)
        p["scaling_efficiency"] = p["tokens_per_second"] / (p["devices"] * base["tokens_per_second"]) if base else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg0 = shape_config(args.shape)
    check_meshes(args.meshes, cfg0, args.shape)
    ceilings = device_ceilings(copy_bytes=args.copy_bytes)
    bw = ceilings["copy_bandwidth_bytes_per_s"]
    n_dev = len(jax.devices())
    print(f"[sharded] {args.shape} {args.dtype} on {n_dev} x {jax.devices()[0].device_kind}: "
          f"copy bandwidth {bw / 1e9:.0f} GB/s per device", file=sys.stderr)
    points = []
    for m in args.meshes:
        if m.devices > n_dev:
            print(f"[sharded] {m.name}: needs {m.devices} devices, only {n_dev}, skipped", file=sys.stderr)
            continue
        points += bench_mesh(m, cfg0, args, bw)
    add_scaling_efficiency(points)
    moe = bool(getattr(cfg0, "num_experts", 0))
    return {"shape": args.shape, "dtype": args.dtype, "context": args.context, "steps": args.steps,
            "meshes": [m.name for m in args.meshes], "devices": n_dev, "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"), "ceilings": ceilings,
            "bytes_note": BYTES_NOTE + (" " + MOE_BYTES_NOTE if moe else ""), "points": points}


# --- output -----------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    """tokens/s per mesh, one line per batch: x = tensor-parallel devices when every mesh is plain
    TP (as before), else the mesh names in the order they were asked for."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    points = result["points"]
    plain_tp = all(p["ep"] == 1 and p["dp"] == 1 for p in points)
    names = [n for n in result["meshes"] if any(p["mesh"] == n for p in points)]
    x_of = (lambda p: p["tp"]) if plain_tp else (lambda p: names.index(p["mesh"]))
    fig, ax = plt.subplots(figsize=(6 if plain_tp else max(6, 1.1 * len(names)), 4))
    for batch in sorted({p["batch"] for p in points}):
        pts = sorted((p for p in points if p["batch"] == batch), key=x_of)
        ax.plot([x_of(p) for p in pts], [p["tokens_per_second"] for p in pts], "o-", label=f"batch {batch}")
    if plain_tp:
        ax.set(xlabel="tensor parallel devices", xticks=sorted({p["tp"] for p in points}))
    else:
        ax.set(xlabel="mesh (tp: tensor, ep: expert, dp: data parallel)", xticks=range(len(names)))
        ax.set_xticklabels(names)
    ax.set(ylabel="decode tokens/s", title=f"{result['shape']} {result['dtype']}, {result['device_kind']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def result_path(folder: str, result: dict[str, Any], meshes: tuple[MeshSpec, ...]) -> Path:
    """sharded_<shape>_<dtype>_<device>.json, with the mesh names appended when one is not plain TP
    (so an expert-parallel run does not overwrite the TP-only result of the same shape)."""
    kind = "".join(c if c.isalnum() else "-" for c in result["device_kind"].lower()).strip("-")
    suffix = "" if all(m.plain_tp for m in meshes) else "_" + "-".join(m.name for m in meshes)
    return Path(folder) / f"sharded_{result['shape']}_{result['dtype']}_{kind}{suffix}.json"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="sharded decode benchmark (tensor, expert and data parallel)")
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--meshes", type=parse_meshes, default=None,
                    help="comma list of meshes, e.g. tp1,tp2,ep2,ep4,tp2ep2,tp2dp2 (default: --tp)")
    ap.add_argument("--tp", type=ints, default=None, help="tensor-parallel degrees: --tp 1,2,4 is --meshes "
                    "tp1,tp2,tp4 (default when --meshes is not given)")
    ap.add_argument("--batches", type=ints, default=(1, 32))
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--copy-bytes", type=int, default=None, help="copy-bandwidth buffer (default: the bench's)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON ('' for none)")
    ap.add_argument("--commit", default=None, help="the git commit to record (the device machine has no .git)")
    args = ap.parse_args(argv)
    if args.meshes is not None and args.tp is not None:
        ap.error("--tp and --meshes both given: use one (--tp 1,2 is --meshes tp1,tp2)")
    if args.meshes is None:
        args.meshes = tuple(MeshSpec(tp=n) for n in (args.tp or (1, 2, 4)))
    try:  # refused before any device work (run checks again, for callers other than this one)
        check_meshes(args.meshes, shape_config(args.shape), args.shape)
    except ConfigError as e:
        ap.error(str(e))
    result = run(args)
    result["commit"] = args.commit
    if args.out:
        path = result_path(args.out, result, args.meshes)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=float) + "\n")
        plot(result, path.with_suffix(".png"))
        print(f"[sharded] wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
