"""The published GPTQ and AWQ (GEMM) safetensors layouts, in numpy: config parsing, packing, a
round-to-nearest quantizer that writes them, an independent dequantizer (the test oracle) and the
conversion into the unsigned codes / per-group scales / zero points that `QuantWeight` takes.

A linear layer `W [N=out, K=in]` is stored as (checked against auto-gptq's `QuantLinear.pack` and
`quantization/gptq.py`, gptqmodel's `convert_gptq_v1_to_v2_format_module` and AutoAWQ's
`WQLinear_GEMM.from_linear`):

  GPTQ  qweight int32 [K/p, N]   p = 32/bits codes per word, packed along K: word (r, n) holds
                                 q[r*p + i, n] in bits i*bits .. i*bits+bits-1
        qzeros  int32 [G, N/p]   packed along N the same way: word (g, c) holds z[g, c*p + i]
        scales  f16   [G, N]     G = ceil(K / group_size) (K when group_size is -1)
        g_idx   int32 [K]        the group of each input column (a permutation-derived order with
                                 act-order / desc_act)
        w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]
        checkpoint_format "gptq" (v1, auto-gptq): the stored zero point is z - 1.
        checkpoint_format "gptq_v2" (gptqmodel): z is stored as is.
  AWQ   qweight int32 [K, N/8]   4-bit, packed along N in AWQ's interleaved order: nibble i of word
                                 (k, c) holds q[k, 8c + AWQ_ORDER[i]]
        qzeros  int32 [G, N/8]   the same order; scales f16 [G, N]; groups are contiguous (no g_idx)
        w[n, k] = (q[k, n] - z[k // group, n]) * s[k // group, n]
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ferrum_jax.errors import CheckpointError

GPTQ_BITS = (4, 8)
AWQ_BITS = (4,)
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)
# Nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]; column 8c + j sits in nibble AWQ_REVERSE_ORDER[j].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

# The linear weights a quantizer replaces: every projection of the decoder layers (q/k/v/o, gate/up/down).
QUANTIZED_LINEAR = re.compile(r"(^|\.)layers\.\d+\..*_proj\.weight$")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """An HF `quantization_config` we can read (hashable, static)."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: one group per output channel (the whole K)
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"  # GPTQ: "gptq" (v1) | "gptq_v2"; AWQ: "gemm"

    @property
    def pack(self) -> int:
        """Codes per int32 word."""
        return 32 // self.bits

    @property
    def zero_offset(self) -> int:
        """What the checkpoint stores is z - zero_offset (auto-gptq v1 stores z - 1)."""
        return 1 if self.method == "gptq" and self.checkpoint_format == "gptq" else 0

    def group(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def num_groups(self, k: int) -> int:
        return math.ceil(k / self.group(k))

    @staticmethod
    def from_hf(q: Mapping[str, Any], where: str = "config.json: quantization_config") -> QuantConfig:
        """Parse and validate an HF config.json `quantization_config` (as auto-gptq, gptqmodel,
        AutoAWQ and transformers write it; `w_bit` / `q_group_size` accepted as AutoAWQ's synonyms)."""
        if not isinstance(q, Mapping):
            raise CheckpointError(f"{where} is not an object")

        def bad(field: str, value: Any, supported: str) -> CheckpointError:
            return CheckpointError(f"{where}: field {field!r} = {value!r} is not supported ({supported})")

        method = str(q.get("quant_method", "")).lower()
        if method not in ("gptq", "awq"):
            raise bad("quant_method", q.get("quant_method"), "supported: gptq, awq")
        bits = q.get("bits", q.get("w_bit"))
        group_size = q.get("group_size", q.get("q_group_size", 128 if method == "awq" else -1))
        if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
            raise bad("group_size", group_size, "a positive integer or -1")
        if q.get("dynamic"):  # gptqmodel's per-module overrides of bits / group_size
            raise bad("dynamic", q.get("dynamic"), "per-module overrides are not supported")
        pack_dtype = q.get("pack_dtype", "int32")
        if str(pack_dtype).lower().removeprefix("torch.") != "int32":
            raise bad("pack_dtype", pack_dtype, "supported: int32")

        if method == "gptq":
            if bits not in GPTQ_BITS or isinstance(bits, bool):
                raise bad("bits", bits, f"GPTQ supported: {', '.join(map(str, GPTQ_BITS))}")
            if q.get("is_marlin_format"):
                raise bad("is_marlin_format", True, "only the gptq / gptq_v2 packings are read")
            fmt = str(q.get("checkpoint_format") or "gptq").lower()
            if fmt not in GPTQ_FORMATS:
                raise bad("checkpoint_format", q.get("checkpoint_format"), f"supported: {', '.join(GPTQ_FORMATS)}")
            return QuantConfig("gptq", bits, group_size, desc_act=bool(q.get("desc_act", False)),
                               sym=bool(q.get("sym", True)), checkpoint_format=fmt)

        if bits not in AWQ_BITS or isinstance(bits, bool):
            raise bad("bits", bits, f"AWQ supported: {', '.join(map(str, AWQ_BITS))}")
        version = str(q.get("version") or "gemm").lower()
        if version not in AWQ_VERSIONS:
            raise bad("version", q.get("version"), "only AWQ's GEMM packing ('gemm') is read")
        fmt = q.get("checkpoint_format")  # gptqmodel writes the AWQ version here too
        if fmt is not None and str(fmt).lower() not in AWQ_VERSIONS:
            raise bad("checkpoint_format", fmt, "only AWQ's GEMM packing ('gemm') is read")
        if not q.get("zero_point", True):  # WQLinear_GEMM always has zero points
            raise bad("zero_point", q.get("zero_point"), "AWQ GEMM checkpoints have zero points")
        return QuantConfig("awq", bits, group_size, desc_act=False, sym=False, checkpoint_format="gemm")

    def to_hf(self) -> dict[str, Any]:
        """The `quantization_config` the producing library writes: auto-gptq's `BaseQuantizeConfig.
        to_dict` (v1), gptqmodel's `QuantizeConfig.to_dict` (gptq_v2), AutoAWQ's
        `AwqConfig.to_transformers_dict` (awq)."""
        if self.method == "awq":
            return {"quant_method": "awq", "zero_point": True, "group_size": self.group_size, "bits": self.bits,
                    "version": "gemm", "modules_to_not_convert": None}
        if self.checkpoint_format == "gptq":
            return {"bits": self.bits, "group_size": self.group_size, "damp_percent": 0.01, "desc_act": self.desc_act,
                    "static_groups": False, "sym": self.sym, "true_sequential": True, "model_name_or_path": None,
                    "model_file_base_name": None, "quant_method": "gptq", "checkpoint_format": "gptq"}
        return {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act, "sym": self.sym,
                "lm_head": False, "quant_method": "gptq", "checkpoint_format": "gptq_v2", "pack_dtype": "int32",
                "meta": {"quantizer": ["ferrum-jax:rtn"]}}


# ---------------------------------------------------------------------------------------- packing


def _ones(bits: int) -> np.uint32:
    """A 1 in every field of a word: v1 <-> v2 zero points differ by this, word-wise (gptqmodel)."""
    return np.uint32(sum(1 << (bits * i) for i in range(32 // bits)))


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """uint codes [R, C] -> int32 [R/p, C]: word (r, c) holds q[r*p + i, c] at bit i*bits (GPTQ qweight)."""
    p = 32 // bits
    shifts = (np.arange(p, dtype=np.uint32) * bits)[None, :, None]
    words = (q.astype(np.uint32).reshape(q.shape[0] // p, p, q.shape[1]) << shifts).sum(axis=1, dtype=np.uint32)
    return words.view(np.int32)


def pack_cols(q: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """uint codes [R, C] -> int32 [R, C/p]: word (r, c) holds q[r, c*p + order[i]] at bit i*bits
    (GPTQ qzeros with the identity order; AWQ qweight / qzeros with AWQ_ORDER)."""
    p = 32 // bits
    order = np.arange(p) if order is None else np.asarray(order)
    shifts = (np.arange(p, dtype=np.uint32) * bits)[None, None, :]
    fields = q.astype(np.uint32).reshape(q.shape[0], q.shape[1] // p, p)[:, :, order]
    return (fields << shifts).sum(axis=2, dtype=np.uint32).view(np.int32)


def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of pack_rows: int32 [R/p, C] -> uint8 [R, C]."""
    p, mask = 32 // bits, (1 << bits) - 1
    shifts = (np.arange(p, dtype=np.uint32) * bits)[None, :, None]
    fields = (words.view(np.uint32)[:, None, :] >> shifts) & mask
    return fields.reshape(-1, words.shape[1]).astype(np.uint8)


def unpack_cols(words: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """The inverse of pack_cols: int32 [R, C/p] -> uint8 [R, C]."""
    p, mask = 32 // bits, (1 << bits) - 1
    shifts = (np.arange(p, dtype=np.uint32) * bits)[None, None, :]
    fields = (words.view(np.uint32)[:, :, None] >> shifts) & mask  # [R, C/p, field i]
    out = np.empty_like(fields)
    out[:, :, np.asarray(order) if order is not None else np.arange(p)] = fields  # field i -> column order[i]
    return out.reshape(words.shape[0], -1).astype(np.uint8)


# ------------------------------------------------------------------------------------- quantizer


def quantize_rtn(w: np.ndarray, bits: int, group_size: int, sym: bool = False, desc_act: bool = False,
                 fmt: str = "gptq", checkpoint_format: str = "gptq",
                 importance: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Round-to-nearest quantization of `w [N=out, K=in]` into the published tensors of `fmt`
    ("gptq" -> qweight, qzeros, scales, g_idx; "awq" -> qweight, qzeros, scales).

    Per group, GPTQ's `Quantizer.find_params`: the range [min(x, 0), max(x, 0)] (symmetric: +-max|x|)
    over maxq = 2**bits - 1 steps, zero point round(-xmin / s) (symmetric: 2**(bits-1)); then
    q = clamp(round(x / s) + z, 0, maxq). The scale is rounded to float16 first, as it is stored.
    desc_act: GPTQ's act-order. Columns are visited in descending `importance` (default: the squared
    column norms of w, standing in for the diagonal of the Hessian), groups are formed in that order,
    and g_idx maps each original column to its group, exactly as GPTQ.fasterquant emits it.
    """
    w = np.asarray(w, np.float32)
    n, k = w.shape
    group = k if group_size == -1 else group_size
    if fmt not in ("gptq", "awq") or (fmt == "awq" and (bits != 4 or desc_act)):
        raise ValueError(f"quantize_rtn: fmt={fmt!r} bits={bits} desc_act={desc_act} is not a published layout")
    if k % group or n % (32 // bits) or (fmt == "gptq" and k % (32 // bits)):
        raise ValueError(f"quantize_rtn: shape {w.shape} does not tile into groups of {group} / {32 // bits}-code words")
    maxq = (1 << bits) - 1

    if desc_act:
        imp = (w.astype(np.float64) ** 2).sum(axis=0) if importance is None else np.asarray(importance)
        perm = np.argsort(-imp, kind="stable")
    else:
        perm = np.arange(k)
    x = w[:, perm].reshape(n, k // group, group)  # groups in visiting order
    xmin, xmax = np.minimum(x.min(axis=2), 0.0), np.maximum(x.max(axis=2), 0.0)
    if sym:
        xmax = np.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(flat, -1.0, xmin), np.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).astype(np.float16)
    scale = np.maximum(scale, np.float16(2.0 ** -24))  # a scale that underflows f16 would divide by zero
    s = scale.astype(np.float32)
    zero = np.full_like(s, (maxq + 1) // 2) if sym else np.clip(np.round(-xmin / s), 0, maxq)
    q_sorted = np.clip(np.round(x / s[:, :, None]) + zero[:, :, None], 0, maxq).reshape(n, k)

    codes = np.empty((n, k), np.uint8)
    codes[:, perm] = q_sorted  # back to the original column order
    zeros = zero.astype(np.uint8)  # [N, G]
    if fmt == "awq":
        return {"qweight": pack_cols(codes.T, bits, AWQ_ORDER), "qzeros": pack_cols(zeros.T, bits, AWQ_ORDER),
                "scales": scale.T.copy()}
    g_idx = np.empty(k, np.int32)
    g_idx[perm] = np.arange(k) // group
    qzeros = pack_cols(zeros.T, bits).view(np.uint32)
    if checkpoint_format == "gptq":  # v1 stores z - 1; word-wise like gptqmodel's v2 -> v1 conversion
        qzeros = qzeros - _ones(bits)
    elif checkpoint_format != "gptq_v2":
        raise ValueError(f"quantize_rtn: checkpoint_format {checkpoint_format!r} is not gptq or gptq_v2")
    return {"qweight": pack_rows(codes.T, bits), "qzeros": qzeros.view(np.int32), "scales": scale.T.copy(),
            "g_idx": g_idx}


# --------------------------------------------------------------------------------------- oracle


def dequantize_numpy(tensors: Mapping[str, np.ndarray], cfg: QuantConfig) -> np.ndarray:
    """float32 [N, K], straight from the published formulas (the test oracle; shares no code with
    the packing helpers above). v1 zero points are read the way auto-gptq's kernels read them:
    each field, plus one."""
    bits, p = cfg.bits, 32 // cfg.bits
    mask = (1 << bits) - 1
    qweight = np.asarray(tensors["qweight"]).astype(np.int64) & 0xFFFFFFFF
    qzeros = np.asarray(tensors["qzeros"]).astype(np.int64) & 0xFFFFFFFF
    scales = np.asarray(tensors["scales"]).astype(np.float32)
    if cfg.method == "gptq":
        k, n = qweight.shape[0] * p, qweight.shape[1]
        q = np.zeros((k, n), np.int64)
        z = np.zeros((qzeros.shape[0], n), np.int64)
        for i in range(p):  # row r*p + i of q is field i of qweight row r; likewise along N for qzeros
            q[i::p, :] = (qweight >> (bits * i)) & mask
            z[:, i::p] = (qzeros >> (bits * i)) & mask
        z = z + 1 if cfg.checkpoint_format == "gptq" else z
        g = np.asarray(tensors["g_idx"]) if "g_idx" in tensors else np.arange(k) // cfg.group(k)
    else:
        k, n = qweight.shape[0], qweight.shape[1] * p
        q = np.zeros((k, n), np.int64)
        z = np.zeros((qzeros.shape[0], n), np.int64)
        for i in range(p):  # AutoAWQ's pack: nibble i of word c holds column c*8 + order_map[i]
            q[:, AWQ_ORDER[i]::p] = (qweight >> (bits * i)) & mask
            z[:, AWQ_ORDER[i]::p] = (qzeros >> (bits * i)) & mask
        g = np.arange(k) // cfg.group(k)
    w = (q - z[g]).astype(np.float32) * scales[g]
    return w.T.copy()


# ------------------------------------------------------------------------------- kernel layout


def to_codes(tensors: Mapping[str, np.ndarray], cfg: QuantConfig, name: str = "<linear>"
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes uint8 [N, K], scales float32 [N, K/group], zeros uint8 [N, K/group], perm int32 [K] or
    None) for `QuantWeight.from_codes`, from one layer's published tensors. With a non-trivial g_idx
    (act-order) the columns are sorted by group (perm = argsort(g_idx), stable) so every group is
    contiguous; codes, and the group order of scales / zeros, are then those of the sorted columns."""
    bits = cfg.bits
    qweight, qzeros = np.asarray(tensors["qweight"]), np.asarray(tensors["qzeros"])
    scales = np.asarray(tensors["scales"]).astype(np.float32)
    if cfg.method == "gptq":
        codes_kn = unpack_rows(qweight, bits)
        words = qzeros.view(np.uint32)
        if cfg.zero_offset:  # v1 -> v2 word-wise (gptqmodel): exact for every zero point v1 can hold
            words = words + _ones(bits)
        zeros_gn = unpack_cols(words.view(np.int32), bits)
    else:
        codes_kn = unpack_cols(qweight, bits, AWQ_ORDER)
        zeros_gn = unpack_cols(qzeros, bits, AWQ_ORDER)
    k, n = codes_kn.shape
    group = cfg.group(k)
    if k % group:
        raise CheckpointError(f"{name}: in_features {k} is not a multiple of group_size {group}")
    groups = k // group
    if scales.shape != (groups, n) or zeros_gn.shape != (groups, n):
        raise CheckpointError(f"{name}: scales {scales.shape} / qzeros {qzeros.shape} do not hold {groups} groups "
                              f"of {n} output features")

    perm = None
    g_idx = tensors.get("g_idx") if cfg.method == "gptq" else None
    if g_idx is not None:
        g_idx = np.asarray(g_idx).astype(np.int64)
        if g_idx.shape != (k,) or g_idx.min() < 0 or g_idx.max() >= groups:
            raise CheckpointError(f"{name}.g_idx: expected {k} group indices in [0, {groups}), got shape "
                                  f"{g_idx.shape} with values in [{g_idx.min()}, {g_idx.max()}]")
        counts = np.bincount(g_idx, minlength=groups)
        if np.any(counts != group):
            bad = int(np.argmax(counts != group))
            raise CheckpointError(f"{name}.g_idx: group {bad} has {counts[bad]} input columns, expected "
                                  f"group_size {group} (every group must be whole)")
        if not np.array_equal(g_idx, np.arange(k) // group):
            perm = np.argsort(g_idx, kind="stable").astype(np.int32)
            codes_kn = codes_kn[perm]
    return codes_kn.T.copy(), scales.T.copy(), zeros_gn.T.copy(), perm


# ------------------------------------------------------------------------------------- writer


def write_quantized_checkpoint(src: str | Path | Mapping[str, np.ndarray], out_dir: str | Path, cfg: QuantConfig,
                               *, config: Mapping[str, Any] | None = None) -> Path:
    """Write a quantized HF checkpoint: every decoder-layer projection (q/k/v/o, gate/up/down)
    replaced by `<prefix>.qweight / .qzeros / .scales (/ .g_idx)`; embeddings, norms, biases and
    lm_head kept dense; config.json with `quantization_config` as the producing library writes it.

    `src` is a dense HF checkpoint directory (config.json + safetensors; its other files, e.g. the
    tokenizer, are copied) or a state dict of numpy arrays, then with `config` (the config.json dict).
    """
    from safetensors.numpy import load_file, save_file

    from ferrum_jax.loading.safetensors import checkpoint_files

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(src, (str, Path)):
        src = Path(src)
        config = json.loads((src / "config.json").read_text()) if config is None else config
        state: dict[str, np.ndarray] = {}
        for file in checkpoint_files(src):
            state |= load_file(str(file))
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy(f, out_dir / f.name)
    else:
        state = dict(src)
        if config is None:
            raise ValueError("write_quantized_checkpoint: a state dict needs its config.json dict (`config`)")

    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        if QUANTIZED_LINEAR.search(name) and t.ndim == 2:
            prefix = name[: -len(".weight")]
            q = quantize_rtn(np.asarray(t, np.float32), cfg.bits, cfg.group_size, sym=cfg.sym,
                             desc_act=cfg.desc_act, fmt=cfg.method, checkpoint_format=cfg.checkpoint_format)
            out |= {f"{prefix}.{suffix}": np.ascontiguousarray(v) for suffix, v in q.items()}
        else:
            out[name] = np.ascontiguousarray(t)
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps({**config, "quantization_config": cfg.to_hf()}, indent=2))
    return out_dir
