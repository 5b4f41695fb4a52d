"""The two real GGUF models behind the aliases (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M)
against two independent implementations (slow; a model is skipped if its package is absent):

* HF transformers loading the same GGUF file (it dequantizes every tensor to exact float32, as our
  default CPU load does): greedy continuations identical for 32 tokens on 4 prompts per model, for
  our default load and (one prompt) for packed weights, dequantize=False; logits close everywhere.
* llama.cpp, through the golden files in tests/golden/ (see its README): the top token at every
  prompt position and the 32-token greedy run, equal up to near-ties (llama.cpp rounds activations
  to 8 bits inside its quantized matmuls, so its logits differ from exact fp32 by ~0.1).
* the README's command line, end to end, in a subprocess.

`python -m pytest tests/test_real_models.py -q -s` prints the figures. The tolerances are float32
figures measured on the CPU (the CI machine: 2 cores, no GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import ferrum_jax as fj
from ferrum_jax.aliases import ALIASES, DEFAULT_MODEL, resolve
from ferrum_jax.quant import GGUFWeight
from ferrum_jax.quant.qweight import QuantWeight

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
MODELS = ["smollm2-135m", "gemma3-270m"]
NEW_TOKENS = 32

# --- tolerances ------------------------------------------------------------------------------------

# Ours vs transformers, both float32 from the same dequantized weights: the only differences are the
# order of float sums (XLA's vs torch's matmul / attention reductions), compounded over 30 (SmolLM2)
# or 18 (Gemma) layers. Measured over every position (prompt + 32 generated) of the 4 prompts:
# max |ours - hf| 1.1e-4 for SmolLM2 and 3.4e-4 for Gemma (in its chat prompt), at
# most 4.3e-6 / 4.5e-6 of that position's largest |logit| (~40 float32 ulps). Rounding error scales
# with the magnitude, so the bound is relative to each position's max |logit| (at least 1): ~5x the
# worst observed. Real bugs (a wrong norm offset, rope, scale or weight layout) move logits by 1e-2
# and more.
LOGIT_RTOL = 2.5e-5

# Ours vs llama.cpp. llama.cpp quantizes activations to 8 bits (Q8_1 / Q8_K blocks) before every
# quantized matmul, so its logits carry noise that ours (exact float32 of the same weights) do not.
# For the argmax only the noise *between* candidates of one position matters, so it is measured
# offset-free, for each recorded top-5 candidate b of llama.cpp's top token a:
#     r_b = (ours[b] - ours[a]) - (llamacpp[b] - llamacpp[a]).
# Over the goldens' prompt positions: SmolLM2 median |r| 0.085, p95 0.31, max 0.82; Gemma 0.082, 0.29,
# 0.75 (over the greedy steps too: p99 0.50 / 0.58, max 0.82 / 1.30).
# llama.cpp's pick a and ours b swap only where r_b exceeds the sum of both sides' gaps,
# llamacpp[a] - llamacpp[b] plus ours[b] - ours[a]; a swap is a legitimate near-tie where that sum
# is within the noise: NEAR_TIE ~ the largest |r| seen. Observed swaps: sums 0.04..0.32 at prompt
# positions, up to 0.74 in a greedy run (SmolLM2 non_english step 4: llama.cpp 0.17 one way, ours
# 0.57 the other).
NEAR_TIE = 1.0
# The noise itself, to check our logits against llama.cpp's beyond the argmax: ~2x the observed
# median and p95 (a wrong layer, rope or norm gives deviations of whole logits).
NOISE_MEDIAN_MAX = 0.2
NOISE_P95_MAX = 0.6

# Our free-running greedy run and llama.cpp's share a prefix up to the first near-tie that goes the
# other way; after it they continue different texts and are no longer comparable, so no long common
# prefix can be asserted (8-bit activation rounding makes llama.cpp's long runs drift). Measured
# common prefixes (of 32) for plain_english, question, code, non_english, numbers, chat: SmolLM2
# 32, 19, 0, 4, 32, 32; Gemma 8, 15, 32, 14, 32, 6. SmolLM2's code prompt leaves at its first token,
# where llama.cpp's top-2 gap is 0.057 (ours 0.092 the other way), so no fixed prefix holds for every
# prompt. Asserted instead: every divergence is a near-tie, and at least half of the prompts share
# their first GREEDY_FIRST tokens (observed: 4 of 6 for SmolLM2, 5 of 6 for Gemma; a decode bug
# would break the first tokens of every prompt).
GREEDY_FIRST = 8

# --- prompts for the transformers comparison --------------------------------------------------------

# plain, question and code are texts of the llama.cpp goldens (tests/golden/make_llamacpp_goldens.py),
# so their runs are shared with the llama.cpp tests. The chat prompt goes through our tokenizer's chat
# template; it asks for a short answer, so that SmolLM2 (an instruct model) ends its turn within the
# 32 tokens and stopping is compared too.
PROMPTS = {
    "plain": "The old lighthouse keeper climbed the spiral stairs every evening, and on the last night of",
    "question": "Question: What is the capital of France, and why is it famous?\nAnswer:",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    "chat": "What is the capital of France? Answer in one word.",
}
# The Gemma 3 270M GGUF (the pretrained base model) carries no tokenizer.chat_template; its turn
# format is then written out as the goldens do (the turn markers are special tokens).
GEMMA_TURNS = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
PACKED_PROMPT = "plain"  # the packed programs compile anew for every prompt length: one prompt per model


def _prompt_ids(tok: fj.Tokenizer, key: str) -> list[int]:
    if key != "chat":
        return tok.encode(PROMPTS[key])
    if tok.chat_template is not None:
        return tok.encode_chat([{"role": "user", "content": PROMPTS[key]}])
    return tok.encode(GEMMA_TURNS.format(PROMPTS[key]))


# --- fixtures ----------------------------------------------------------------------------------------


def _require(name: str) -> Path:
    alias = ALIASES[name]
    if not alias.installed:
        pytest.skip(f"{name} is not installed ({alias.pip})")
    return resolve(name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class Real:
    """One real model: ours (default load, packed) and transformers' from the same file, with runs
    and logits cached by token ids, so tests that feed the same ids share them."""

    def __init__(self, name: str):
        self.name, self.path = name, _require(name)
        # float32 and dequantize=None: on the CPU every quantized tensor is decoded at load time.
        self.model = fj.load(name, dtype="float32", progress=False)
        self._runs: dict[tuple, list[int]] = {}
        self._logits: dict[tuple, np.ndarray] = {}
        self._hf_logits: dict[tuple, np.ndarray] = {}

    @functools.cached_property
    def hf(self):
        torch = pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
        pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        start = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            self.path.parent, gguf_file=self.path.name, dtype=torch.float32).eval()
        print(f"\n[real] {self.name}: transformers loads the GGUF (dequantized to float32) in "
              f"{time.perf_counter() - start:.1f}s")
        return hf

    @functools.cached_property
    def packed(self) -> fj.Model:
        model = fj.load(self.name, dtype="float32", dequantize=False, progress=False)
        packed = (GGUFWeight, QuantWeight)
        leaves = jax.tree_util.tree_leaves(model.weights, is_leaf=lambda x: isinstance(x, packed))
        assert any(isinstance(x, QuantWeight) for x in leaves)  # repacked into the kernel layout
        return model

    def run(self, ids: list[int], model: fj.Model | None = None) -> list[int]:
        """32 greedy tokens, not stopped at end-of-generation tokens (as the goldens' runs): without a
        tokenizer nothing stops generation (same compiled programs: the stop ids are a padded array)."""
        model = model or self.model
        key = (id(model), *ids)
        if key not in self._runs:
            out = fj.generate(dataclasses.replace(model, tokenizer=None), ids, max_tokens=NEW_TOKENS)
            assert len(out.token_ids) == NEW_TOKENS
            self._runs[key] = out.token_ids
        return self._runs[key]

    def logits(self, seq: list[int], model: fj.Model | None = None) -> np.ndarray:
        model = model or self.model
        key = (id(model), *seq)
        if key not in self._logits:
            self._logits[key] = fj.logits(model, seq)
        return self._logits[key]

    def hf_logits(self, seq: list[int]) -> np.ndarray:
        import torch

        if tuple(seq) not in self._hf_logits:
            with torch.no_grad():
                self._hf_logits[tuple(seq)] = self.hf(torch.tensor([seq]), use_cache=False).logits[0].float().numpy()
        return self._hf_logits[tuple(seq)]

    @functools.cached_property
    def golden(self) -> dict:
        path = GOLDEN / f"llamacpp_{self.name}.json"
        if not path.is_file():
            pytest.skip(f"{path} is absent: generate it with "
                        f"`python tests/golden/make_llamacpp_goldens.py` (needs llama-cpp-python)")
        golden = json.loads(path.read_text(encoding="utf-8"))
        want = golden["model"]
        assert (self.path.stat().st_size, _sha256(self.path)) == (want["size_bytes"], want["sha256"]), (
            f"{path.name} was recorded from another file than {self.path}: regenerate it")
        return golden


@pytest.fixture(scope="module", params=MODELS)
def real(request):
    """Module-scoped and parametrized: pytest runs every test of one model, drops it (and its
    transformers twin), then loads the next."""
    try:
        import torch
    except ImportError:
        torch = None
    threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(2)
    model = Real(request.param)
    yield model
    model.__dict__.clear()
    if torch:
        torch.set_num_threads(threads)


def _row_tolerance(hf_row: np.ndarray) -> float:
    return LOGIT_RTOL * max(1.0, float(np.abs(hf_row).max()))


# --- transformers ------------------------------------------------------------------------------------


def _check_against_hf(real: Real, ids: list[int], gen: list[int], hf: np.ndarray, ours: np.ndarray,
                      exact: bool) -> list[str]:
    """Transformers' greedy decoding, checked by teacher forcing: `hf` holds HF's logits over ids + gen
    (one forward), so its row P-1+j predicts from the same prefix as our step j. HF's argmax equals
    our token at every step iff HF's own greedy decoding produces exactly our 32 tokens (greedy is a
    function of the prefix) -- also past an end-of-generation token, where both sides run on.
    Unless `exact`, a step may differ at a near-tie; returns those accepted."""
    p = len(ids)
    hf_next = hf[p - 1: p - 1 + len(gen)].argmax(-1)
    ties = []
    for j in np.nonzero(hf_next != np.asarray(gen))[0]:
        row, tok = hf[p - 1 + j], gen[j]
        gap = float(row[hf_next[j]] - row[tok])
        where = f"{real.name} step {j}: ours {tok}, transformers {int(hf_next[j])} (HF's gap {gap:.2e})"
        assert not exact, where
        # Where ours and HF's logits are within t of each other (checked by the caller), HF's logit
        # for our pick is at least HF's max - 2t: only within 2t can the argmax flip by reordering.
        t = _row_tolerance(row)
        assert gap <= 2 * t and np.abs(ours[p - 1 + j] - row).max() <= t, where + f", tolerance {t:.1e}"
        ties.append(where)
    return ties


@pytest.mark.slow
def test_greedy_matches_transformers(real):
    """Our default load (float32, dequantized at load on the CPU) decodes exactly transformers'
    greedy tokens for 32 steps on a plain, a question, a code and a chat prompt (our tokenizer's ids
    fed to both); where the run holds an end-of-generation token, `generate` stops there."""
    eos = set(real.model.tokenizer.eos_token_ids)
    for key in PROMPTS:
        ids = _prompt_ids(real.model.tokenizer, key)
        gen = real.run(ids)
        seq = ids + gen
        _check_against_hf(real, ids, gen, real.hf_logits(seq), real.logits(seq), exact=True)
        out = fj.generate(real.model, ids, max_tokens=NEW_TOKENS)  # the API call, stopping at eos
        stop = next((j for j, t in enumerate(gen) if t in eos), None)
        assert out.token_ids == gen[:stop], key
        assert out.finish_reason == ("length" if stop is None else "stop"), key
        print(f"\n[real] {real.name} {key:8s} {len(ids):2d} prompt tokens -> 32 greedy tokens identical to "
              f"transformers{'' if stop is None else f' (end of turn at {stop}: both stop)'}: {out.text!r}")


@pytest.mark.slow
def test_logits_match_transformers(real):
    """At every position of the 4 prompts (and of their 32-token continuations), max |ours - HF|
    over the vocabulary is within LOGIT_RTOL of that position's largest |logit|."""
    worst, worst_rel = 0.0, 0.0
    for key in PROMPTS:
        ids = _prompt_ids(real.model.tokenizer, key)
        seq = ids + real.run(ids)
        ours, hf = real.logits(seq), real.hf_logits(seq)
        assert ours.shape == hf.shape == (len(seq), real.model.config.vocab_size) and np.isfinite(ours).all()
        diff = np.abs(ours - hf).max(-1)
        scale = np.maximum(1.0, np.abs(hf).max(-1))
        i = int((diff / scale).argmax())
        print(f"\n[real] {real.name} {key:8s} max|ours - hf| {diff.max():.2e} (over the prompt positions "
              f"{diff[:len(ids)].max():.2e}); relative {diff[i] / scale[i]:.2e} at position {i} "
              f"(max|logit| {scale[i]:.1f})")
        assert (diff <= LOGIT_RTOL * scale).all(), (key, i, float(diff[i]), float(scale[i]))
        worst, worst_rel = max(worst, float(diff.max())), max(worst_rel, float((diff / scale).max()))
    print(f"[real] {real.name}: max|ours - hf| {worst:.2e}, relative {worst_rel:.2e} (bound {LOGIT_RTOL:.1e})")


@pytest.mark.slow
def test_packed_weights_match_transformers(real):
    """dequantize=False keeps the GGUF blocks packed and decodes them inside the jitted forward. The
    weights are the same bit for bit, but XLA may fuse the decoding into the matmuls and reorder
    float sums: a greedy step may legitimately differ from transformers at a near-tie only, where
    HF's own top-2 gap is within 2x the logit tolerance and our packed logits are within the
    tolerance of HF's (see _check_against_hf). None did when measured: max|packed - hf| was 1.1e-4
    (SmolLM2; its packed logits equal the dequantized ones bit for bit) and 5.7e-5 (Gemma). Those
    logits are only computed here on a divergence: their program compiles anew for packed weights."""
    ids = _prompt_ids(real.model.tokenizer, PACKED_PROMPT)
    gen = real.run(ids, real.packed)
    seq = ids + gen
    hf = real.hf_logits(seq)
    hf_next = hf[len(ids) - 1: -1].argmax(-1)
    if (hf_next != np.asarray(gen)).any():
        ours = real.logits(seq, real.packed)
        diff = np.abs(ours - hf).max(-1)
        assert (diff <= LOGIT_RTOL * np.maximum(1.0, np.abs(hf).max(-1))).all(), float(diff.max())
        ties = _check_against_hf(real, ids, gen, hf, ours, exact=False)
    else:
        ties = []
    same = gen == real.run(ids)
    print(f"\n[real] {real.name} packed {PACKED_PROMPT}: 32 greedy tokens "
          f"{'identical to' if same else 'differ from'} the default load's; as transformers' except at "
          f"near-ties: {ties or 'none'}")


# --- llama.cpp -----------------------------------------------------------------------------------------


def _swap_gaps(top5_ids: list[int], top5_logits: list[float], ours_row: np.ndarray, want: int, got: int
               ) -> tuple[float, float]:
    """(llama.cpp's gap for its pick `want` over ours `got`, our gap for `got` over `want`)."""
    recorded = dict(zip(top5_ids, top5_logits))
    assert got in recorded, f"our pick {got} is not even in llama.cpp's top-5 {top5_ids}"
    return recorded[want] - recorded[got], float(ours_row[got] - ours_row[want])


def _teacher_forced(real: Real, p: dict) -> np.ndarray:
    """Our logits over prompt_ids + llama.cpp's greedy run: rows :P are the prompt positions, row
    P-1+j the step that chose greedy[j] (from llama.cpp's prefix)."""
    return real.logits(p["prompt_ids"] + p["greedy"])


@pytest.mark.slow
def test_top_token_matches_llamacpp(real):
    """Fed llama.cpp's prompt_ids, our argmax equals llama.cpp's at every prompt position, except at
    near-ties (NEAR_TIE); and the offset-free noise between our and llama.cpp's top-5 logits is the
    size 8-bit activations explain."""
    total, swaps, noise = 0, [], []
    for key, p in real.golden["prompts"].items():
        n = len(p["prompt_ids"])
        lg = _teacher_forced(real, p)[:n]
        top = p["top_tokens"]
        assert len(top["argmax"]) == len(top["top5_ids"]) == n
        for i, (want, ids5, logits5) in enumerate(zip(top["argmax"], top["top5_ids"], top["top5_logits"])):
            ours5 = lg[i, ids5]
            noise.extend(np.abs((ours5[1:] - ours5[0]) - (np.asarray(logits5[1:]) - logits5[0])))
            got = int(lg[i].argmax())
            total += 1
            if got == want:
                continue
            gap_l, gap_o = _swap_gaps(ids5, logits5, lg[i], want, got)
            where = f"{key} position {i}: llama.cpp {want}, ours {got}; gaps llama.cpp {gap_l:.3f} + ours {gap_o:.3f}"
            assert gap_l + gap_o <= NEAR_TIE, f"{real.name} {where} > NEAR_TIE {NEAR_TIE}"
            swaps.append(where)
    noise = np.asarray(noise)
    median, p95 = float(np.median(noise)), float(np.percentile(noise, 95))
    print(f"\n[real] {real.name} vs llama.cpp: top token equal at {total - len(swaps)}/{total} prompt positions; "
          f"offset-free top-5 logit noise: median {median:.3f}, p95 {p95:.3f}, max {noise.max():.3f}"
          + "".join(f"\n  near-tie: {s}" for s in swaps))
    assert median <= NOISE_MEDIAN_MAX and p95 <= NOISE_P95_MAX, (median, p95)


@pytest.mark.slow
def test_greedy_matches_llamacpp(real):
    """Our 32 greedy tokens from llama.cpp's prompt_ids against its 32 (both run past end-of-
    generation tokens). Every step of llama.cpp's run, fed back to us (teacher forcing), must give
    llama.cpp's token or a near-tie; our own run's divergence from it must be a near-tie; see
    GREEDY_FIRST for what is asserted about common prefixes."""
    prefixes, lines = {}, []
    for key, p in real.golden["prompts"].items():
        ids, want = p["prompt_ids"], p["greedy"]
        assert len(want) == NEW_TOKENS
        got = real.run(ids)
        c = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), NEW_TOKENS)
        prefixes[key] = c
        lg = _teacher_forced(real, p)[len(ids) - 1:]  # lg[j]: our logits for step j after llama.cpp's prefix
        forced = []
        for j in range(NEW_TOKENS):
            ours = int(lg[j].argmax())
            if ours != want[j]:
                gap_l, gap_o = _swap_gaps(p["greedy_top5_ids"][j], p["greedy_top5_logits"][j], lg[j], want[j], ours)
                assert gap_l + gap_o <= NEAR_TIE, (f"{real.name} {key} step {j} of llama.cpp's run: llama.cpp "
                                                   f"{want[j]}, ours {ours}; gaps {gap_l:.3f} + {gap_o:.3f}")
                forced.append(f"{j} ({gap_l:.3f} + {gap_o:.3f})")
        if c < NEW_TOKENS:  # up to c our run is llama.cpp's, so lg[c] is our step c: where we left it
            gap_l, gap_o = _swap_gaps(p["greedy_top5_ids"][c], p["greedy_top5_logits"][c], lg[c], want[c], got[c])
            assert gap_l + gap_o <= NEAR_TIE, (f"{real.name} {key}: our run leaves llama.cpp's at step {c}: "
                                               f"llama.cpp {want[c]}, ours {got[c]}; gaps {gap_l:.3f} + {gap_o:.3f}")
        lines.append(f"  {key:13s} common prefix {c:2d}/32; steps of llama.cpp's run where our argmax differs "
                     f"(gaps llama.cpp + ours): {', '.join(forced) or 'none'}")
    print(f"\n[real] {real.name} greedy vs llama.cpp:\n" + "\n".join(lines))
    assert 2 * sum(c >= GREEDY_FIRST for c in prefixes.values()) >= len(prefixes), prefixes


# --- the command line --------------------------------------------------------------------------------


@pytest.mark.slow
def test_readme_command_line():
    """`ferrum-jax generate --prompt "The three primary colors are" --max-tokens 16`, the README's
    command: exit 0, stdout is our API's greedy text for the default model, the summary on stderr."""
    _require(DEFAULT_MODEL)
    prompt = "The three primary colors are"
    exe = shutil.which("ferrum-jax")
    cmd = [exe] if exe else [sys.executable, "-m", "ferrum_jax.cli"]
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    if not exe:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run([*cmd, "generate", "--prompt", prompt, "--max-tokens", "16"], check=False,
                          capture_output=True, cwd=REPO, env=env, timeout=300, text=True, encoding="utf-8")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr

    model = fj.load(progress=False)  # what the command loads: the default alias, dtype auto
    want = fj.generate(model, prompt, max_tokens=16)
    assert want.text.strip()
    assert proc.stdout == want.text + "\n", (proc.stdout, want.text)
    summary = [line for line in proc.stderr.splitlines() if "tok/s" in line]
    assert len(summary) == 1, proc.stderr
    generated = len(want.token_ids) + (want.finish_reason == "stop")  # the stop token counts as generated
    assert summary[0].startswith(f"[{DEFAULT_MODEL}] load ") and f"prefill {want.prompt_tokens} tok" in summary[0] \
        and f"decode {generated} tok" in summary[0], summary[0]
    print(f"\n[real] `{' '.join(Path(c).name for c in cmd)} generate ...` in {seconds:.1f}s: {proc.stdout!r}\n"
          f"  stderr: {summary[0]}")
