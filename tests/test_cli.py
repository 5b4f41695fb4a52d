"""The `ferrum-jax` command line on the tiny model: `main(argv)` in-process for most cases (the compiled
programs are shared with the API tests), one real subprocess for the end-to-end path."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ferrum_jax as fj
from ferrum_jax.cli import main
from ferrum_jax.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Hello world"


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() sets the ferrum_jax logger level (DEBUG with --verbose); put it back."""
    logger = logging.getLogger("ferrum_jax")
    level = logger.level
    yield
    logger.setLevel(level)


def _float32(argv: tuple) -> list[str]:
    """The API tests use float32; "auto" would pick bfloat16 on a GPU."""
    argv = [str(a) for a in argv]
    return argv + ["--dtype", "float32"] if argv[0] in ("generate", "chat") and "--dtype" not in argv else argv


def run_main(capsys, *argv: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    argv = _float32(argv)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               JAX_PLATFORMS="cpu", PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "ferrum_jax.cli", *map(str, argv)], input=stdin,
                          capture_output=True, cwd=REPO, env=env, timeout=300)


def summary_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "tok/s" in line]
    assert len(lines) == 1, err
    return lines[0]


def assert_one_error_line(err: str, *fragments: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == errors[0], f"the error line should end stderr: {err!r}"
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------
# generate


def test_generate_subprocess_end_to_end(tiny_model, tiny_model_dir):
    expected = fj.generate(tiny_model, PROMPT, max_tokens=8).text
    proc = run_subprocess("generate", "--model", tiny_model_dir, "--prompt", PROMPT, "--max-tokens", 8, "--verbose")
    out, err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    assert proc.returncode == 0, err
    assert out == expected + "\n"
    summary = summary_line(err)
    assert summary.startswith(f"[{tiny_model_dir.name}] load ") and "compile" in summary
    assert "prefill 5 tok at" in summary and "decode 8 tok at" in summary
    # A fresh process traces the programs, so the dispatch log is complete.
    ops_line = next(line for line in err.splitlines() if line.startswith("ops: "))
    assert "attention=xla" in ops_line and "decode_attention=xla" in ops_line and "linear=xla" in ops_line


def test_generate_in_process_matches_api(tiny_model, tiny_model_dir, capsys):
    expected = fj.generate(tiny_model, PROMPT, max_tokens=8)
    code, out, err = run_main(capsys, "generate", "--model", tiny_model_dir, "--prompt", PROMPT, "--max-tokens", 8)
    assert code == 0, err
    assert out == expected.text + "\n"
    assert "decode 8 tok at" in summary_line(err)
    assert "ops:" not in err  # only with --verbose


def test_generate_chat_matches_api(tiny_model, tiny_model_dir, capsys):
    expected = fj.generate(tiny_model, PROMPT, max_tokens=6, chat=True).text
    code, out, err = run_main(capsys, "generate", "--model", tiny_model_dir, "--prompt", PROMPT,
                              "--max-tokens", 6, "--chat")
    assert code == 0, err
    assert out == expected + "\n"
    prompt_tokens = len(tiny_model.tokenizer.encode_chat([{"role": "user", "content": PROMPT}]))
    assert f"prefill {prompt_tokens} tok" in summary_line(err)


def test_generate_sampling_flags_match_api(tiny_model, tiny_model_dir, capsys):
    sampling = SamplingParams(temperature=1.2, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=7)
    expected = fj.generate(tiny_model, PROMPT, max_tokens=10, sampling=sampling).text
    code, out, err = run_main(capsys, "generate", "--model", tiny_model_dir, "--prompt", PROMPT, "--max-tokens", 10,
                              "--temperature", 1.2, "--top-k", 40, "--top-p", 0.9, "--min-p", 0.05,
                              "--repetition-penalty", 1.3, "--seed", 7)
    assert code == 0, err
    assert out == expected + "\n"
    greedy = fj.generate(tiny_model, PROMPT, max_tokens=10).text
    code, out_other_seed, _ = run_main(capsys, "generate", "--model", tiny_model_dir, "--prompt", PROMPT,
                                       "--max-tokens", 10, "--temperature", 1.2, "--seed", 8)
    assert code == 0
    assert len({out, out_other_seed, greedy + "\n"}) > 1


def test_verbose_prints_ops_line(tiny_model_dir, capsys):
    code, out, err = run_main(capsys, "generate", "--model", tiny_model_dir, "--prompt", PROMPT, "--max-tokens", 2, "-v")
    assert code == 0, err
    assert sum(line.startswith("ops: ") for line in err.splitlines()) == 1
    assert logging.getLogger("ferrum_jax").level == logging.DEBUG


# ---------------------------------------------------------------------------------------------
# chat


def test_chat_from_stdin(tiny_model, tiny_model_dir, capsys, monkeypatch):
    tok = tiny_model.tokenizer
    replies = [fj.generate(tiny_model, tok.encode_chat([{"role": "user", "content": m}]), max_tokens=6).text
               for m in ("hello", "hi")]
    # /reset drops the history, so the second turn is a fresh one-message conversation.
    code, out, err = run_main(capsys, "chat", "--model", tiny_model_dir, "--max-tokens", 6, "--temperature", 0,
                              stdin="hello\n/reset\n\nhi\n/exit\nnever read\n", monkeypatch=monkeypatch)
    assert code == 0, err
    assert out == f"> {replies[0]}\n> > > {replies[1]}\n> "
    assert len([line for line in err.splitlines() if "tok/s" in line]) == 2
    assert "/exit" in err  # the banner


def test_chat_ends_on_eof(tiny_model_dir, capsys, monkeypatch):
    code, out, err = run_main(capsys, "chat", "--model", tiny_model_dir, "--max-tokens", 3, stdin="hello\n",
                              monkeypatch=monkeypatch)
    assert code == 0, err
    assert out.startswith("> ") and out.endswith("> ")
    assert summary_line(err)


def test_chat_without_template(tiny_model_dir, tmp_path, capsys, monkeypatch):
    d = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, d)
    (d / "chat_template.jinja").unlink()
    code, out, err = run_main(capsys, "chat", "--model", d, stdin="hello\n", monkeypatch=monkeypatch)
    assert code == 2
    assert_one_error_line(err, "no chat template")


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one `error:` line, no traceback


def test_missing_model_dir_subprocess(tmp_path):
    proc = run_subprocess("generate", "--model", tmp_path / "nope", "--prompt", PROMPT)
    err = proc.stderr.decode("utf-8")
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: model path {tmp_path / 'nope'} does not exist")


@pytest.mark.parametrize("flags,fragments", [
    (["--top-p", 0], ["top_p=0.0 is invalid", "(0, 1]"]),
    (["--temperature", -1], ["temperature=-1.0 is invalid"]),
    (["--top-k", -3], ["top_k=-3 is invalid"]),
    (["--capacity", 4], ["does not fit the KV cache capacity of 4"]),
    (["--max-tokens", 0], ["max-tokens must be >= 1"]),
])
def test_bad_generate_flags(tiny_model_dir, capsys, flags, fragments):
    code, out, err = run_main(capsys, "generate", "--model", tiny_model_dir, "--prompt", PROMPT, *flags)
    assert code == 2
    assert out == ""
    assert_one_error_line(err, *fragments)


def test_bad_model_dirs(tmp_path, tiny_model_dir, capsys):
    code, _, err = run_main(capsys, "generate", "--model", tmp_path / "nope", "--prompt", PROMPT)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: model path {tmp_path / 'nope'} does not exist")

    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, "generate", "--model", tmp_path / "empty", "--prompt", PROMPT)
    assert code == 2
    assert_one_error_line(err, "no config.json")

    code, _, err = run_main(capsys, "generate", "--model", tiny_model_dir / "config.json", "--prompt", PROMPT)
    assert code == 2
    assert_one_error_line(err, "is a file but not a .gguf file")


def test_prompt_longer_than_context(tiny_model_dir, capsys):
    code, _, err = run_main(capsys, "generate", "--model", tiny_model_dir, "--prompt", "word " * 200)
    assert code == 2
    assert_one_error_line(err, "max_position_embeddings")
