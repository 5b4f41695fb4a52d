"""GPTQ and AWQ safetensors checkpoints (ferrum_jax.quant.gptq, ferrum_jax.loading.gptq), on CPU.

  - the config parser: what auto-gptq / gptqmodel / AutoAWQ write, and clear errors otherwise;
  - layout facts derived by hand (bit positions of qweight / qzeros, AWQ's interleaved order, v1's
    stored zero point z - 1, act-order's g_idx);
  - the RTN quantizer against the numpy oracle (the RTN error bound), for every variant;
  - `QuantWeight.from_codes(*to_codes(...)).dequantize()` against the oracle, bit for bit;
  - end to end: tiny random Llama / Qwen3 checkpoints quantized to GPTQ-int4 (act-order, asym),
    GPTQ-int8 and AWQ-int4, loaded with `ferrum_jax.load`: logits and 16 greedy tokens equal those
    of the same model with its weights replaced by the oracle's dequantization.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_models import VOCAB, build  # sets HF_HUB_OFFLINE before transformers is imported

import ferrum_jax
from ferrum_jax.errors import CheckpointError
from ferrum_jax.quant.gptq import (AWQ_ORDER, AWQ_REVERSE_ORDER, QUANTIZED_LINEAR, QuantConfig, dequantize_numpy,
                                   pack_cols, pack_rows, quantize_rtn, to_codes, unpack_cols,
                                   write_quantized_checkpoint)
from ferrum_jax.quant.qweight import QuantWeight, gptq_format

# (method, bits, checkpoint_format) of every layout we read.
LAYOUTS = [("gptq", 4, "gptq"), ("gptq", 8, "gptq"), ("gptq", 4, "gptq_v2"), ("gptq", 8, "gptq_v2"), ("awq", 4, "gemm")]


def _cfg(method: str, bits: int, fmt: str, group: int, sym: bool = False, desc_act: bool = False) -> QuantConfig:
    return QuantConfig(method, bits, group, desc_act=desc_act, sym=sym, checkpoint_format=fmt)


def _quantize(w: np.ndarray, cfg: QuantConfig, **kw) -> dict[str, np.ndarray]:
    return quantize_rtn(w, cfg.bits, cfg.group_size, sym=cfg.sym, desc_act=cfg.desc_act, fmt=cfg.method,
                        checkpoint_format=cfg.checkpoint_format if cfg.method == "gptq" else "gptq", **kw)


def _weight(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=0.1, size=(n, k)).astype(np.float32)


# --------------------------------------------------------------------------------------- config


def test_config_from_what_the_libraries_write():
    autogptq = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True, "static_groups": False,
                "sym": False, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None,
                "quant_method": "gptq", "checkpoint_format": "gptq"}
    assert QuantConfig.from_hf(autogptq) == QuantConfig("gptq", 4, 128, desc_act=True, sym=False)
    gptqmodel = {"bits": 8, "group_size": -1, "desc_act": False, "sym": True, "lm_head": False,
                 "quant_method": "gptq", "checkpoint_format": "gptq_v2", "pack_dtype": "int32",
                 "meta": {"quantizer": ["gptqmodel:2.0.0"]}}
    assert QuantConfig.from_hf(gptqmodel) == QuantConfig("gptq", 8, -1, sym=True, checkpoint_format="gptq_v2")
    autoawq = {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "GEMM",
               "modules_to_not_convert": None}
    assert QuantConfig.from_hf(autoawq) == QuantConfig("awq", 4, 128, sym=False, checkpoint_format="gemm")
    # Without checkpoint_format a GPTQ config is v1 (auto-gptq's and transformers' default).
    assert QuantConfig.from_hf({"quant_method": "gptq", "bits": 4, "group_size": 32}).checkpoint_format == "gptq"
    for cfg in (_cfg("gptq", 4, "gptq", 32, desc_act=True), _cfg("gptq", 8, "gptq_v2", -1, sym=True),
                _cfg("awq", 4, "gemm", 64)):
        assert QuantConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("q, field", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "'bits' = 3"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "'group_size' = 0"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "'checkpoint_format'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": True}, "'is_marlin_format'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "pack_dtype": "int16"}, "'pack_dtype'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"-:.*down": {}}}, "'dynamic'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'quant_method' = 'bitsandbytes'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "'version' = 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "exllama"}, "'version' = 'exllama'"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"}, "'bits' = 8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "'zero_point'"),
])
def test_config_errors_name_the_field(q, field):
    with pytest.raises(CheckpointError, match="quantization_config") as e:
        QuantConfig.from_hf(q)
    assert field in str(e.value)


# ------------------------------------------------------------------------------- layout facts


def test_gptq_qweight_bit_positions():
    # Rows 0..7 of column 0 hold codes 1..8: one word, code of row i at bits 4i..4i+3.
    q = np.zeros((16, 2), np.uint8)
    q[:8, 0] = np.arange(1, 9)
    q[8:, 1] = 15
    words = pack_rows(q, 4).view(np.uint32)
    assert words.shape == (2, 2)
    assert words[0, 0] == 0x87654321 and words[1, 1] == 0xFFFFFFFF and words[0, 1] == words[1, 0] == 0
    q8 = np.array([[1], [2], [3], [250]], np.uint8)  # 8-bit: four codes per word, row i at bits 8i
    assert pack_rows(q8, 8).view(np.uint32)[0, 0] == 0xFA030201


def test_gptq_qzeros_and_awq_order_bit_positions():
    z = np.arange(8, dtype=np.uint8)[None, :]  # columns 0..7 of one group
    assert pack_cols(z, 4).view(np.uint32)[0, 0] == 0x76543210  # GPTQ: column i at bits 4i
    # AWQ (AutoAWQ's pack): nibble i holds column AWQ_ORDER[i] = 0, 2, 4, 6, 1, 3, 5, 7.
    assert pack_cols(z, 4, AWQ_ORDER).view(np.uint32)[0, 0] == 0x75316420
    assert [AWQ_ORDER[j] for j in AWQ_REVERSE_ORDER] == list(range(8))  # the reverse order undoes it


def test_awq_unpack_as_the_published_readers_do():
    # AutoAWQ / transformers: shift out the nibbles in order, then index each 8 columns by AWQ_REVERSE_ORDER.
    codes = np.random.default_rng(1).integers(0, 16, (5, 24)).astype(np.uint8)
    words = pack_cols(codes, 4, AWQ_ORDER).view(np.uint32)
    fields = ((words[:, :, None] >> np.arange(0, 32, 4, dtype=np.uint32)) & 15).reshape(5, 24)
    reverse = np.arange(24).reshape(-1, 8)[:, list(AWQ_REVERSE_ORDER)].reshape(-1)
    np.testing.assert_array_equal(fields[:, reverse], codes)
    np.testing.assert_array_equal(unpack_cols(words.view(np.int32), 4, AWQ_ORDER), codes)


@pytest.mark.parametrize("bits, v1_word, v2_word", [(4, 0x77777777, 0x88888888), (8, 0x7F7F7F7F, 0x80808080)])
def test_symmetric_zero_points_v1_stores_z_minus_1(bits, v1_word, v2_word):
    w = _weight(16, 64)
    for fmt, word in (("gptq", v1_word), ("gptq_v2", v2_word)):
        t = quantize_rtn(w, bits, 32, sym=True, checkpoint_format=fmt)
        assert np.all(t["qzeros"].view(np.uint32) == word), fmt


def test_dequantize_numpy_by_hand():
    # K=8, N=8, one group; column n has codes q[k, n] = k + n (mod 16), zero point 3 + n, scale n + 1.
    k_, n_ = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    q = (k_ + n_) % 16
    word = lambda fields: np.uint32(sum(int(f) << (4 * i) for i, f in enumerate(fields)))
    scales = np.arange(1, 9, dtype=np.float16)[None, :]
    expect = ((q - (3 + np.arange(8))[None, :]) * np.arange(1, 9)[None, :]).T.astype(np.float32)  # [N, K]
    gptq = {"qweight": np.array([[word(q[:, n]) for n in range(8)]], np.uint32).view(np.int32),
            "qzeros": np.array([[word(2 + np.arange(8))]], np.uint32).view(np.int32),  # v1: z - 1
            "scales": scales, "g_idx": np.zeros(8, np.int32)}
    np.testing.assert_array_equal(dequantize_numpy(gptq, _cfg("gptq", 4, "gptq", -1)), expect)
    awq = {"qweight": np.array([[word(q[k, list(AWQ_ORDER)])] for k in range(8)], np.uint32).view(np.int32),
           "qzeros": np.array([[word((3 + np.arange(8))[list(AWQ_ORDER)])]], np.uint32).view(np.int32),
           "scales": scales}
    np.testing.assert_array_equal(dequantize_numpy(awq, _cfg("awq", 4, "gemm", -1)), expect)


def test_act_order_g_idx():
    n, k, group = 8, 64, 16
    importance = np.random.default_rng(2).random(k)
    t = quantize_rtn(_weight(n, k), 4, group, desc_act=True, importance=importance)
    perm = np.argsort(-importance, kind="stable")  # GPTQ visits columns by descending diag(H)
    expect = np.empty(k, np.int32)
    expect[perm] = np.arange(k) // group
    np.testing.assert_array_equal(t["g_idx"], expect)
    assert not np.array_equal(t["g_idx"], np.sort(t["g_idx"]))  # a real permutation
    assert np.all(np.bincount(t["g_idx"]) == group)
    plain = quantize_rtn(_weight(n, k), 4, group, desc_act=False)
    np.testing.assert_array_equal(plain["g_idx"], np.arange(k) // group)


# ------------------------------------------------------------------------ quantizer vs oracle


@pytest.mark.parametrize("method, bits, fmt, desc_act", [(*layout, act) for layout in LAYOUTS
                                                          for act in ((False, True) if layout[0] == "gptq" else (False,))])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_bound(method, bits, fmt, desc_act, group, sym):
    cfg = _cfg(method, bits, fmt, group, sym=sym, desc_act=desc_act)
    n, k = 40, 256
    w = _weight(n, k, seed=bits + group)
    t = _quantize(w, cfg)
    deq = dequantize_numpy(t, cfg)
    assert deq.shape == (n, k) and deq.dtype == np.float32
    g = t["g_idx"] if "g_idx" in t else np.arange(k) // cfg.group(k)
    s = t["scales"].astype(np.float32)[g].T  # each element's scale, [N, K]
    # Round to nearest: half a step, plus what the float16 rounding of the scale can shift the
    # clamped end of the range by (maxq steps of a relative 2**-11).
    bound = s * (0.5 + ((1 << bits) - 1) * 2.0 ** -11) + 1e-7
    err = np.abs(w - deq)
    assert np.all(err <= bound), float((err / bound).max())
    assert err.mean() > 0.05 * s.mean()  # it did quantize


# --------------------------------------------------------------------- kernel layout vs oracle


@pytest.mark.parametrize("method, bits, fmt, group, desc_act, n, k", [
    ("gptq", 4, "gptq", 32, True, 40, 96),  # ragged: N=40 is no multiple of the row tile, K=96 of 128
    ("gptq", 4, "gptq", 32, False, 40, 96),
    ("gptq", 8, "gptq", 32, True, 40, 96),
    ("gptq", 4, "gptq_v2", -1, False, 24, 96),
    ("gptq", 8, "gptq_v2", 128, True, 72, 256),
    ("awq", 4, "gemm", 32, False, 40, 96),
    ("awq", 4, "gemm", -1, False, 16, 64),
])
@pytest.mark.parametrize("sym", [False, True])
def test_quantweight_equals_oracle(method, bits, fmt, group, desc_act, n, k, sym):
    cfg = _cfg(method, bits, fmt, group, sym=sym, desc_act=desc_act)
    t = _quantize(_weight(n, k, seed=n + k), cfg)
    codes, scales, zeros, perm = to_codes(t, cfg)
    assert codes.shape == (n, k) and codes.dtype == np.uint8 and zeros.dtype == np.uint8
    assert scales.shape == zeros.shape == (n, k // cfg.group(k))
    assert (perm is not None) == (desc_act and group != -1)
    w = QuantWeight.from_codes(codes, scales, gptq_format(bits, cfg.group(k)), zeros=zeros, perm=perm)
    assert w.shape == (n, k)
    np.testing.assert_array_equal(np.asarray(w.dequantize(jnp.float32)), dequantize_numpy(t, cfg))


def test_v1_zero_point_zero_round_trips():
    # v1 cannot hold z = 0 in a field (it stores z - 1); gptqmodel's word-wise v2 -> v1 conversion borrows
    # from the next field, and reading v1 word-wise (+ 0x11111111) undoes it exactly.
    w = np.abs(_weight(16, 64)) + 0.01  # all positive: asymmetric zero point 0 in every group
    v1 = quantize_rtn(w, 4, 32, sym=False, checkpoint_format="gptq")
    v2 = quantize_rtn(w, 4, 32, sym=False, checkpoint_format="gptq_v2")
    a, b = to_codes(v1, _cfg("gptq", 4, "gptq", 32)), to_codes(v2, _cfg("gptq", 4, "gptq_v2", 32))
    assert np.all(b[2] == 0)
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x, y)


def test_to_codes_rejects_a_ragged_act_order_group():
    cfg = _cfg("gptq", 4, "gptq", 16, desc_act=True)
    t = _quantize(_weight(8, 64), cfg)
    t["g_idx"] = t["g_idx"].copy()
    t["g_idx"][np.flatnonzero(t["g_idx"] == 0)[0]] = 1  # group 0 loses a column, group 1 gains one
    with pytest.raises(CheckpointError, match=r"layer\.g_idx: group 0 has 15 input columns, expected group_size 16"):
        to_codes(t, cfg, name="layer")


# -------------------------------------------------------------------------------- end to end

VARIANTS = {
    "gptq4-g32-act-asym": _cfg("gptq", 4, "gptq", 32, sym=False, desc_act=True),
    "gptq8-g32-sym-v2": _cfg("gptq", 8, "gptq_v2", 32, sym=True),
    "awq4-g32": _cfg("awq", 4, "gemm", 32),
}
PROMPT_LEN, DECODE_STEPS = 24, 16


@pytest.fixture(autouse=True)
def _full_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("dense"), {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build(family, root / family)[0]
        return built[family]

    return get


@pytest.fixture(scope="module")
def dense_logits(dense_dirs):
    cache = {}

    def get(family: str, ids: list[int]) -> np.ndarray:
        if family not in cache:
            cache[family] = ferrum_jax.load(dense_dirs(family), dtype="float32", progress=False)
        return ferrum_jax.logits(cache[family], ids)

    return get


def _dequantized_checkpoint(quant_dir: Path, cfg: QuantConfig, out: Path) -> Path:
    """The quantized checkpoint with every packed layer replaced by the oracle's dense weight."""
    state = load_file(str(quant_dir / "model.safetensors"))
    dense = {k: v for k, v in state.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for name in [k for k in state if k.endswith(".qweight")]:
        prefix = name[: -len(".qweight")]
        parts = {s: state[f"{prefix}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx") if f"{prefix}.{s}" in state}
        dense[prefix + ".weight"] = dequantize_numpy(parts, cfg)
    out.mkdir(parents=True)
    save_file(dense, str(out / "model.safetensors"))
    config = json.loads((quant_dir / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("family, variant", [(f, v) for f in ("llama3", "qwen3") for v in VARIANTS]
                         + [("gemma3", "gptq4-g32-act-asym")])
def test_load_quantized_matches_dequantized_dense(family, variant, dense_dirs, dense_logits, tmp_path):
    cfg = VARIANTS[variant]
    src = dense_dirs(family)
    quant_dir = write_quantized_checkpoint(src, tmp_path / "quant", cfg)
    on_disk = load_file(str(quant_dir / "model.safetensors"))
    assert not any(QUANTIZED_LINEAR.search(k) for k in on_disk)  # no dense projection left
    for name, t in load_file(str(src / "model.safetensors")).items():  # embeddings, norms, lm_head: as they were
        if not QUANTIZED_LINEAR.search(name):
            np.testing.assert_array_equal(on_disk[name], t)
    assert json.loads((quant_dir / "config.json").read_text())["quantization_config"] == cfg.to_hf()
    ref_dir = _dequantized_checkpoint(quant_dir, cfg, tmp_path / "ref")

    model = ferrum_jax.load(quant_dir, dtype="float32", progress=False)
    ref = ferrum_jax.load(ref_dir, dtype="float32", progress=False)
    layer = model.weights.layers[0]  # load may fuse q/k/v and gate/up (QuantWeight.concat): either way, packed
    attn = [layer.attn.wqkv] if layer.attn.wqkv is not None else [layer.attn.wq, layer.attn.wk, layer.attn.wv]
    mlp = [layer.mlp.gate] + ([layer.mlp.up] if layer.mlp.up is not None else [])
    for w in attn + mlp + [layer.attn.wo, layer.mlp.down]:
        assert isinstance(w, QuantWeight), type(w)
    assert isinstance(model.weights.embed, jax.Array) and isinstance(model.weights.lm_head, jax.Array)
    assert model.dtype == jnp.float32

    ids = np.random.default_rng(3).integers(0, VOCAB, PROMPT_LEN).tolist()
    got, want = ferrum_jax.logits(model, ids), ferrum_jax.logits(ref, ids)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(got - dense_logits(family, ids)).max() > 1e-3  # the quantization is really there
    tokens = ferrum_jax.generate(model, ids, max_tokens=DECODE_STEPS).token_ids
    assert tokens == ferrum_jax.generate(ref, ids, max_tokens=DECODE_STEPS).token_ids
    assert len(tokens) == DECODE_STEPS


# ----------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def gptq_dir(dense_dirs, tmp_path_factory) -> Path:
    return write_quantized_checkpoint(dense_dirs("llama3"), tmp_path_factory.mktemp("gptq") / "m",
                                      VARIANTS["gptq4-g32-act-asym"])


def _copy_with(src: Path, dst: Path, edit_state=None, edit_config=None) -> Path:
    shutil.copytree(src, dst)
    if edit_state:
        state = load_file(str(dst / "model.safetensors"))
        edit_state(state)
        save_file(state, str(dst / "model.safetensors"))
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config["quantization_config"])
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_wrong_qweight_shape_names_the_tensor(gptq_dir, tmp_path):
    name = "model.layers.1.mlp.down_proj.qweight"

    def truncate(state):
        state[name] = state[name][:-1].copy()

    bad = _copy_with(gptq_dir, tmp_path / "bad", edit_state=truncate)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' .* has shape \(15, 64\), expected \(16, 64\)"):
        ferrum_jax.load(bad, dtype="float32", progress=False)


def test_missing_scales_names_the_tensor(gptq_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.scales"
    bad = _copy_with(gptq_dir, tmp_path / "bad", edit_state=lambda state: state.pop(name))
    with pytest.raises(CheckpointError, match=rf"no tensor '{name}'"):
        ferrum_jax.load(bad, dtype="float32", progress=False)


def test_act_order_without_g_idx_is_refused(gptq_dir, tmp_path):
    name = "model.layers.0.mlp.up_proj.g_idx"  # desc_act: true, so the group of each column is needed
    bad = _copy_with(gptq_dir, tmp_path / "bad", edit_state=lambda state: state.pop(name))
    with pytest.raises(CheckpointError, match=rf"no tensor '{name}'"):
        ferrum_jax.load(bad, dtype="float32", progress=False)


def test_bits_3_names_the_field(gptq_dir, tmp_path):
    bad = _copy_with(gptq_dir, tmp_path / "bad", edit_config=lambda q: q.update(bits=3))
    with pytest.raises(CheckpointError, match=r"config\.json: quantization_config: field 'bits' = 3"):
        ferrum_jax.load(bad, dtype="float32", progress=False)


def test_config_disagreeing_with_tensors(gptq_dir, tmp_path):
    # The tensors are 4-bit, group 32; a config saying 8-bit implies other shapes.
    bad = _copy_with(gptq_dir, tmp_path / "bad", edit_config=lambda q: q.update(bits=8))
    with pytest.raises(CheckpointError, match=r"qweight' .* expected .* 8-bit GPTQ"):
        ferrum_jax.load(bad, dtype="float32", progress=False)


def test_nonzero_stray_bias_is_refused(gptq_dir, tmp_path):
    name = "model.layers.0.self_attn.q_proj.bias"  # Llama has no q bias
    ok = _copy_with(gptq_dir, tmp_path / "ok", edit_state=lambda s: s.update({name: np.zeros(64, np.float16)}))
    ferrum_jax.load(ok, dtype="float32", progress=False)  # all zeros, as some exporters write: fine
    bad = _copy_with(gptq_dir, tmp_path / "bad", edit_state=lambda s: s.update({name: np.ones(64, np.float16)}))
    with pytest.raises(CheckpointError, match=rf"'{name}' is nonzero"):
        ferrum_jax.load(bad, dtype="float32", progress=False)
