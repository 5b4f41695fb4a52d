"""Load safetensors checkpoints (single file or sharded with an index) straight onto devices.

The model families know which tensor names and shapes their config implies; they pass them to
`load_tensors`, which checks the whole checkpoint from the file headers before moving a single byte,
then streams one tensor at a time from disk to its device so host memory stays about one tensor.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ferrum_jax.errors import CheckpointError, FerrumError, ModelNotFoundError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Source dtypes we read. Others (ints, F8, F64, ...) would need a dequantisation or a lossy cast the
# model family must decide on, so they are rejected up front instead of being silently converted.
SUPPORTED_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}

Placement = jax.Device | jax.sharding.Sharding | Callable[[str], jax.sharding.Sharding | jax.Device] | None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file header describes it; nothing of its data is read."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "BF16"

    @property
    def nbytes(self) -> int:
        """Size on disk, or 0 for dtypes we do not know the width of (they are rejected anyway)."""
        dt = SUPPORTED_DTYPES.get(self.dtype)
        return math.prod(self.shape) * dt.itemsize if dt is not None else 0


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory.

    `model.safetensors` if present, else the shards named by `model.safetensors.index.json`
    (its `weight_map`), else every `*.safetensors` file in the directory (sorted by name).
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelNotFoundError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model path {model_dir} is not a directory")

    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]

    index = model_dir / INDEX_FILE
    if index.is_file():
        return _shards_from_index(index)

    files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    if not files:
        raise ModelNotFoundError(f"model directory {model_dir} holds no .safetensors files")
    return files


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: cannot read weight_map ({type(e).__name__}: {e})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map is empty or not an object")

    # dict.fromkeys keeps the first-seen order and drops duplicates: shards are read in index order.
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index} names shard {shard.name} but {shard} does not exist")
    return shards


def read_tensor_infos(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Name, file, shape and dtype of every tensor in the checkpoint, from the file headers only."""
    infos: dict[str, TensorInfo] = {}
    for file in checkpoint_files(model_dir):
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    info = TensorInfo(name, file, tuple(int(d) for d in sl.get_shape()), sl.get_dtype())
                    if name in infos:
                        raise CheckpointError(
                            f"tensor {name!r} appears in both {infos[name].file} and {file}"
                        )
                    infos[name] = info
        except FerrumError:
            raise
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors header ({_one_line(e)})") from e
    return infos


def load_tensors(
    model_dir: str | Path,
    expected: Mapping[str, tuple[int, ...]],
    *,
    dtype: jnp.dtype | str,
    optional: Collection[str] = (),
    placement: Placement = None,
    progress: bool = True,
) -> dict[str, jax.Array]:
    """Load the `expected` tensors (name -> shape) of a checkpoint as `dtype`, each onto its placement.

    Names in `optional` may be absent from the checkpoint and are then absent from the result.
    `placement` is a device, a sharding, a callable name -> device/sharding, or None (default device).
    The whole checkpoint is validated from its headers first; if loading fails midway, every array
    already on device is deleted before the error propagates (wrapped as CheckpointError, except
    KeyboardInterrupt/SystemExit which propagate unchanged).
    """
    model_dir = Path(model_dir)
    target = np.dtype(jnp.dtype(dtype))
    infos = read_tensor_infos(model_dir)
    to_load = _validate(model_dir, infos, expected, optional)

    # Read file by file (and, within a file, in the caller's order) so each shard is opened once.
    files = list(dict.fromkeys(info.file for info in to_load))
    by_file = {file: [info for info in to_load if info.file == file] for file in files}

    loaded: dict[str, jax.Array] = {}
    # What is being read right now, so a failure can name it.
    file: Path | None = None
    name: str | None = None
    bar = tqdm(
        total=sum(i.nbytes for i in to_load),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"loading {model_dir.resolve().name}",
        disable=not progress,
    )
    try:
        for file in files:
            name = None
            with safe_open(file, framework="numpy") as f:
                for info in by_file[file]:
                    name = info.name
                    host = f.get_tensor(info.name)
                    if host.dtype != target:
                        host = host.astype(target)
                    arr = jax.device_put(host, _resolve(placement, info.name))
                    loaded[info.name] = arr
                    # Wait for the transfer: it releases the host copy before the next tensor is read
                    # (host memory stays ~one tensor) and makes a device OOM surface at this tensor.
                    arr.block_until_ready()
                    del host
                    bar.update(info.nbytes)
    except BaseException as e:
        for arr in loaded.values():
            try:
                arr.delete()
            except Exception:  # already deleted or never materialised; nothing more to free
                pass
        loaded.clear()
        if isinstance(e, FerrumError) or not isinstance(e, Exception):
            raise  # our own errors are already clear; KeyboardInterrupt/SystemExit stay as they are
        where = f"tensor {name!r} from {file}" if name is not None else f"{file or model_dir}"
        raise CheckpointError(f"failed to load {where}: {_one_line(e)}") from e
    finally:
        bar.close()

    # Return in the caller's order, independent of how tensors are spread over shards.
    return {name: loaded[name] for name in expected if name in loaded}


def _validate(
    model_dir: Path,
    infos: Mapping[str, TensorInfo],
    expected: Mapping[str, tuple[int, ...]],
    optional: Collection[str],
) -> list[TensorInfo]:
    """Check names, shapes and dtypes against the headers; return the infos to load, in `expected` order."""
    optional = set(optional)
    missing = [name for name in expected if name not in infos and name not in optional]
    if len(missing) == 1:
        name = missing[0]
        raise CheckpointError(
            f"checkpoint {model_dir} has no tensor {name!r} (expected shape {tuple(expected[name])})"
        )
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {model_dir} is missing {len(missing)} tensors: {shown}")

    to_load = []
    for name, shape in expected.items():
        info = infos.get(name)
        if info is None:
            continue  # optional and absent
        if info.shape != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {info.file} has shape {info.shape}, expected {tuple(shape)}"
            )
        if info.dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} in {info.file} has dtype {info.dtype}; "
                f"supported: {', '.join(SUPPORTED_DTYPES)}"
            )
        to_load.append(info)

    unexpected = sorted(set(infos) - set(expected))
    if unexpected:
        logger.debug("ignoring %d tensors in %s not expected by the model: %s",
                     len(unexpected), model_dir, ", ".join(unexpected))
    return to_load


def _resolve(placement: Placement, name: str) -> jax.Device | jax.sharding.Sharding | None:
    # Devices and shardings are not callables, but test them first so a future callable
    # Sharding subclass is still taken as a placement rather than called.
    if placement is None or isinstance(placement, (jax.Device, jax.sharding.Sharding)):
        return placement
    return placement(name)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
