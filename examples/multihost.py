"""Sharded generation over several processes (hosts) with `jax.distributed`.

Every process runs this same script with the same arguments except --process-id. After
`jax.distributed.initialize`, `jax.devices()` lists the devices of all processes; the mesh spans
them, each process loads only the slices of its own devices from its copy of the checkpoint, and
`generate` runs one SPMD program on all of them (XLA's collectives between processes: NCCL on
GPUs, gloo on CPUs). Every process gets the same completion; process 0 prints it.

One process, on this machine's devices (no coordinator needed):

    python examples/multihost.py --model smollm2-135m --prompt "The capital of France is"

Two processes on one CPU machine, 2 host devices each, tp=2 x dp=2 across both (a local coordinator):

    for i in 0 1; do
      python examples/multihost.py --model PATH --cpu-devices 2 --tp 2 --dp 2 \\
          --coordinator localhost:12355 --num-processes 2 --process-id $i &
    done; wait

Two GPU hosts with 8 GPUs each, tp=8 within a host and dp=2 across them (the mesh's "model" axis is
the innermost, so a tensor-parallel group stays on one host's NVLink):

    NCCL_NVLS_ENABLE=0 python examples/multihost.py --model PATH --tp 8 --dp 2 \\
        --coordinator host0:12355 --num-processes 2 --process-id {0 on host0, 1 on host1}
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, in every process

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="alias, .gguf file or HF checkpoint directory")
    ap.add_argument("--prompt", default="The three primary colors are")
    ap.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--coordinator", default=None, help="host:port of process 0 (omit for one process)")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--cpu-devices", type=int, default=None, help="host CPU devices per process (CPU runs)")
    args = ap.parse_args()

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.coordinator:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)

    import ferrum_jax as fj

    mesh = fj.make_mesh(tp=args.tp, dp=args.dp)
    model = fj.load(args.model, dtype="float32" if jax.default_backend() == "cpu" else "auto", mesh=mesh,
                    progress=False)
    prompt = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else args.prompt
    out = fj.generate(model, prompt, max_tokens=args.max_tokens)
    if jax.process_index() == 0:
        print(f"processes: {jax.process_count()}, devices: {len(jax.devices())}, mesh: {dict(mesh.shape)}")
        print(f"tokens: {out.token_ids}")
        print(f"text: {out.text!r}")
        print(f"decode: {out.stats.decode_tokens_per_second:.1f} tok/s")


if __name__ == "__main__":
    main()
