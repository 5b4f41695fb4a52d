"""Tests of ferrum_jax.loading.safetensors on CPU, with checkpoints built in tmp_path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ferrum_jax.errors import CheckpointError, FerrumError, ModelNotFoundError
from ferrum_jax.loading.safetensors import (
    TensorInfo,
    checkpoint_files,
    load_tensors,
    read_tensor_infos,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
UINT_OF = {2: np.uint16, 4: np.uint32}


def bits(a) -> np.ndarray:
    """The raw bit patterns of an array, so equality is bit-exact (NaN and -0.0 included)."""
    a = np.asarray(a)
    return a.view(UINT_OF[a.dtype.itemsize])


def sample(shape, dtype, seed: int = 0) -> np.ndarray:
    """Random values plus a few that stress casting: signed zero, inf, NaN, rounding ties, f16 max."""
    x = np.random.default_rng(seed).normal(scale=3.0, size=shape).astype(np.float32).ravel()
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.00390625, 65504.0, 1e-6], np.float32)
    x[: min(len(x), len(special))] = special[: len(x)]
    return x.reshape(shape).astype(dtype)


def write(dir_: Path, tensors: dict[str, np.ndarray], name: str = "model.safetensors") -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    path = dir_ / name
    save_file(tensors, str(path))
    return path


@pytest.fixture
def simple_ckpt(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    tensors = {
        "embed": sample((8, 4), np.float32, 1),
        "layer.0.w": sample((4, 4), np.float32, 2),
        "layer.1.w": sample((4, 4), np.float32, 3),
        "norm": sample((4,), np.float32, 4),
    }
    write(tmp_path / "m", tensors)
    return tmp_path / "m", tensors


def shapes(tensors: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in tensors.items()}


# --------------------------------------------------------------------------- files and headers


def test_single_file(simple_ckpt):
    model_dir, tensors = simple_ckpt
    assert checkpoint_files(model_dir) == [model_dir / "model.safetensors"]

    infos = read_tensor_infos(model_dir)
    assert set(infos) == set(tensors)
    assert infos["embed"] == TensorInfo("embed", model_dir / "model.safetensors", (8, 4), "F32")

    out = load_tensors(model_dir, shapes(tensors), dtype=jnp.float32, progress=False)
    assert list(out) == list(tensors)  # caller's order
    for name, ref in tensors.items():
        assert out[name].dtype == jnp.float32
        assert out[name].shape == ref.shape
        np.testing.assert_array_equal(bits(out[name]), bits(ref))


def test_all_safetensors_files_without_index(tmp_path):
    write(tmp_path, {"a": np.ones((2,), np.float32)}, "b-part.safetensors")
    write(tmp_path, {"b": np.zeros((3,), np.float32)}, "a-part.safetensors")
    assert checkpoint_files(tmp_path) == [tmp_path / "a-part.safetensors", tmp_path / "b-part.safetensors"]
    out = load_tensors(tmp_path, {"a": (2,), "b": (3,)}, dtype="float32", progress=False)
    np.testing.assert_array_equal(out["a"], np.ones(2))
    np.testing.assert_array_equal(out["b"], np.zeros(3))


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny Llama saved by transformers into many shards with a model.safetensors.index.json."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    out = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(out, max_shard_size="4KB")
    ref = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return out, ref


def test_sharded_with_index(hf_sharded):
    model_dir, ref = hf_sharded
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = checkpoint_files(model_dir)
    assert len(files) > 1
    assert {f.name for f in files} == set(index["weight_map"].values())

    infos = read_tensor_infos(model_dir)
    assert set(infos) == set(ref)
    for name, info in infos.items():
        assert info.file.name == index["weight_map"][name]
        assert info.shape == ref[name].shape
        assert info.dtype == "F32"

    out = load_tensors(model_dir, shapes(ref), dtype=jnp.float32, progress=False)
    assert list(out) == list(ref)
    for name in ref:
        np.testing.assert_array_equal(bits(out[name]), bits(ref[name]))

    out_bf16 = load_tensors(model_dir, shapes(ref), dtype=jnp.bfloat16, progress=False)
    for name in ref:
        assert out_bf16[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(bits(out_bf16[name]), bits(ref[name].astype(BF16)))


def test_progress_bar_runs(simple_ckpt, capsys):
    model_dir, tensors = simple_ckpt
    out = load_tensors(model_dir, shapes(tensors), dtype=jnp.float32, progress=True)
    assert set(out) == set(tensors)
    assert "loading m" in capsys.readouterr().err


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("src", [np.float32, np.float16, BF16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("dst", [jnp.float32, jnp.bfloat16], ids=["to_f32", "to_bf16"])
def test_cast_is_bit_exact_with_numpy(tmp_path, src, dst):
    ref = {"w": sample((16, 8), src, 5), "b": sample((8,), src, 6)}
    write(tmp_path, ref)
    out = load_tensors(tmp_path, shapes(ref), dtype=dst, progress=False)
    for name, x in ref.items():
        assert out[name].dtype == dst
        np.testing.assert_array_equal(bits(out[name]), bits(x.astype(np.dtype(dst))))


def test_torch_bf16_source(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save_file

    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    torch_save_file({"w": w}, str(tmp_path / "model.safetensors"))
    assert read_tensor_infos(tmp_path)["w"].dtype == "BF16"

    ref_bits = w.view(torch.int16).numpy().view(np.uint16)
    out = load_tensors(tmp_path, {"w": (6, 5)}, dtype="bfloat16", progress=False)
    np.testing.assert_array_equal(bits(out["w"]), ref_bits)
    out32 = load_tensors(tmp_path, {"w": (6, 5)}, dtype=jnp.float32, progress=False)
    np.testing.assert_array_equal(np.asarray(out32["w"]), w.float().numpy())


# --------------------------------------------------------------------------- selection


def test_optional_tensors(simple_ckpt):
    model_dir, tensors = simple_ckpt
    expected = shapes(tensors) | {"lm_head": (8, 4), "bias": (4,)}
    out = load_tensors(model_dir, expected, dtype=jnp.float32, optional={"lm_head", "bias", "norm"},
                       progress=False)
    # Absent optional tensors are left out; present optional ones are loaded.
    assert set(out) == set(tensors)
    np.testing.assert_array_equal(np.asarray(out["norm"]), tensors["norm"])


def test_optional_tensor_with_wrong_shape_still_fails(simple_ckpt):
    model_dir, tensors = simple_ckpt
    with pytest.raises(CheckpointError, match="norm"):
        load_tensors(model_dir, {"norm": (5,)}, dtype=jnp.float32, optional={"norm"}, progress=False)


def test_unexpected_tensors_are_ignored_with_a_debug_line(simple_ckpt, caplog):
    model_dir, tensors = simple_ckpt
    with caplog.at_level(logging.DEBUG, logger="ferrum_jax.loading.safetensors"):
        out = load_tensors(model_dir, {"embed": (8, 4)}, dtype=jnp.float32, progress=False)
    assert list(out) == ["embed"]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 1
    assert "layer.0.w" in debug[0] and "norm" in debug[0]


# --------------------------------------------------------------------------- placement


def test_device_and_sharding_placement(simple_ckpt):
    model_dir, tensors = simple_ckpt
    dev = jax.devices()[-1]
    out = load_tensors(model_dir, shapes(tensors), dtype=jnp.float32, placement=dev, progress=False)
    assert all(a.devices() == {dev} for a in out.values())

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    out = load_tensors(model_dir, shapes(tensors), dtype=jnp.float32, placement=sharding, progress=False)
    assert all(a.sharding == sharding for a in out.values())


def test_per_name_placement_callable(simple_ckpt):
    model_dir, tensors = simple_ckpt
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices[:1]), ("x",))
    chosen: dict[str, object] = {}

    def place(name: str):
        # Layers get a NamedSharding, everything else a plain device (the last one when several exist).
        if name.startswith("layer."):
            chosen[name] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        else:
            chosen[name] = devices[-1]
        return chosen[name]

    out = load_tensors(model_dir, shapes(tensors), dtype=jnp.float32, placement=place, progress=False)
    assert set(chosen) == set(tensors)  # called once per tensor, with its name
    for name, arr in out.items():
        where = chosen[name]
        if isinstance(where, jax.sharding.Sharding):
            assert arr.sharding == where
        else:
            assert arr.devices() == {where}
        np.testing.assert_array_equal(np.asarray(arr), tensors[name])


# --------------------------------------------------------------------------- errors


def test_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    for fn in (checkpoint_files, read_tensor_infos):
        with pytest.raises(ModelNotFoundError, match="nope"):
            fn(missing)
    with pytest.raises(ModelNotFoundError, match="nope"):
        load_tensors(missing, {}, dtype=jnp.float32, progress=False)


def test_path_is_a_file(simple_ckpt):
    model_dir, _ = simple_ckpt
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        checkpoint_files(model_dir / "model.safetensors")


def test_dir_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no .safetensors"):
        checkpoint_files(tmp_path)


def test_index_naming_a_missing_shard(hf_sharded, tmp_path):
    src, _ = hf_sharded
    index = json.loads((src / "model.safetensors.index.json").read_text())
    dst = tmp_path / "broken"
    dst.mkdir()
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    shards = sorted(set(index["weight_map"].values()))
    for shard in shards[1:]:  # leave out the first shard
        (dst / shard).write_bytes((src / shard).read_bytes())
    with pytest.raises(CheckpointError, match=shards[0]):
        checkpoint_files(dst)


def test_index_that_is_not_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        checkpoint_files(tmp_path)


def test_missing_tensor(simple_ckpt):
    model_dir, tensors = simple_ckpt
    expected = shapes(tensors) | {"lm_head": (8, 4)}
    with pytest.raises(CheckpointError, match=r"'lm_head'.*\(8, 4\)"):
        load_tensors(model_dir, expected, dtype=jnp.float32, progress=False)


def test_several_missing_tensors(simple_ckpt):
    model_dir, tensors = simple_ckpt
    expected = shapes(tensors) | {"x": (1,), "y": (2,)}
    with pytest.raises(CheckpointError, match=r"missing 2 tensors: 'x', 'y'"):
        load_tensors(model_dir, expected, dtype=jnp.float32, progress=False)


def test_wrong_shape(simple_ckpt):
    model_dir, tensors = simple_ckpt
    expected = shapes(tensors) | {"layer.1.w": (4, 8)}
    with pytest.raises(CheckpointError) as excinfo:
        load_tensors(model_dir, expected, dtype=jnp.float32, progress=False)
    msg = str(excinfo.value)
    assert "'layer.1.w'" in msg and "model.safetensors" in msg
    assert "(4, 4)" in msg and "(4, 8)" in msg
    assert "\n" not in msg


def test_unsupported_int8(tmp_path):
    write(tmp_path, {"w": np.ones((2, 2), np.float32), "q": np.ones((2, 2), np.int8)})
    with pytest.raises(CheckpointError, match=r"'q'.*I8"):
        load_tensors(tmp_path, {"w": (2, 2), "q": (2, 2)}, dtype=jnp.float32, progress=False)
    # Not expected -> ignored, no error.
    out = load_tensors(tmp_path, {"w": (2, 2)}, dtype=jnp.float32, progress=False)
    assert list(out) == ["w"]


def test_unsupported_f8(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save_file

    torch_save_file({"w8": torch.ones(4, 4).to(torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'w8'.*F8_E4M3"):
        load_tensors(tmp_path, {"w8": (4, 4)}, dtype=jnp.bfloat16, progress=False)


def test_truncated_file(simple_ckpt):
    model_dir, tensors = simple_ckpt
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_tensor_infos(model_dir)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_tensors(model_dir, shapes(tensors), dtype=jnp.float32, progress=False)


def test_same_tensor_in_two_files(tmp_path):
    write(tmp_path, {"a": np.ones((2,), np.float32)}, "one.safetensors")
    write(tmp_path, {"a": np.ones((2,), np.float32)}, "two.safetensors")
    with pytest.raises(CheckpointError, match=r"'a'.*one.safetensors.*two.safetensors"):
        read_tensor_infos(tmp_path)


def test_errors_are_ferrum_errors():
    assert issubclass(CheckpointError, FerrumError)
    assert issubclass(ModelNotFoundError, FerrumError)


# --------------------------------------------------------------------------- cleanup on failure


@pytest.fixture
def record_device_put(monkeypatch) -> list[jax.Array]:
    """Every array jax.device_put returns, so a test can check which were deleted afterwards."""
    made: list[jax.Array] = []
    real = jax.device_put

    def recording(*args, **kwargs):
        arr = real(*args, **kwargs)
        made.append(arr)
        return arr

    monkeypatch.setattr(jax, "device_put", recording)
    return made


def failing_on_third(exc: BaseException):
    calls: list[str] = []

    def place(name: str):
        calls.append(name)
        if len(calls) == 3:
            raise exc
        return jax.devices()[0]

    return place, calls


def test_failure_midway_deletes_loaded_arrays(simple_ckpt, record_device_put):
    model_dir, tensors = simple_ckpt
    place, calls = failing_on_third(RuntimeError("RESOURCE_EXHAUSTED: out of memory\nmore detail"))
    with pytest.raises(CheckpointError) as excinfo:
        load_tensors(model_dir, shapes(tensors), dtype=jnp.float32, placement=place, progress=False)

    msg = str(excinfo.value)
    assert repr(calls[2]) in msg and "model.safetensors" in msg and "RESOURCE_EXHAUSTED" in msg
    assert "\n" not in msg
    assert isinstance(excinfo.value.__cause__, RuntimeError)
    assert len(record_device_put) == 2
    assert all(arr.is_deleted() for arr in record_device_put)


def test_keyboard_interrupt_cleans_up_and_propagates(simple_ckpt, record_device_put):
    model_dir, tensors = simple_ckpt
    place, _ = failing_on_third(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        load_tensors(model_dir, shapes(tensors), dtype=jnp.float32, placement=place, progress=False)
    assert len(record_device_put) == 2
    assert all(arr.is_deleted() for arr in record_device_put)
