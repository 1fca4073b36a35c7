"""Our engine vs BlinkDL's `rwkv` 0.8.32, side by side on the same random checkpoint, on the CPU.

    python benchmarks/bench_cpu.py                      # v7 0.1B and v4 169M shapes, fp32
    python benchmarks/bench_cpu.py --shapes 7:12:768 --prefill 256 --decode 20
    python benchmarks/bench_cpu.py --dtype bf16         # both engines in bf16 ("cpu bf16")

For each shape, one child process (started with the reference's environment flags: RWKV_V7_ON
selects its v7 class at import) loads the checkpoint into both engines and times them in turns:
batch-1 greedy decode tok/s (after warm-up steps) and the prefill tok/s of one prompt. Each
measurement is repeated and the best round is kept, so both engines get the same chances on a
noisy machine. Prints a table with our/reference ratios, then the prefill rate that the prompt's
matrix products alone allow (`products_only_prefill`); `--json` writes the raw numbers.
Needs the `rwkv` test dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SHAPES = ["7:12:768", "4:12:768"]  # v7 0.1B (vocab 65536), v4 169M (vocab 50277)


def time_engine(forward, first_logits, n_decode: int, n_warmup: int, prompt: list[int]):
    """Decode tok/s (greedy, batch 1) and prefill tok/s of `prompt` for one engine."""
    logits, state = first_logits
    for _ in range(n_warmup):
        logits, state = forward([int(logits.argmax())], state)
    t0 = time.perf_counter()
    for _ in range(n_decode):
        logits, state = forward([int(logits.argmax())], state)
    decode = n_decode / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    logits, _ = forward(prompt, None)
    prefill = len(prompt) / (time.perf_counter() - t0)
    return decode, prefill, logits


def products_only_prefill(model, prompt: list[int], rounds: int) -> float:
    """Prefill tok/s of `prompt` counting only its matrix products: one forward records the input
    and weight of every `ops.linear` call (modules bind the name at import, so every loaded
    rwkv_cli module holding it gets the recording instead), then those products alone are replayed
    and timed, best of `rounds`. This is the ceiling of any engine that forms the same products in
    the same dtype."""
    from rwkv_cli import ops

    real, calls = ops.linear, []

    def record(x, w):
        calls.append((x.clone(), w))
        return real(x, w)

    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("rwkv_cli") and getattr(m, "linear", None) is real]
    try:
        for m in modules:
            m.linear = record
        model.forward([prompt], None)
    finally:
        for m in modules:
            m.linear = real
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for x, w in calls:
            real(x, w)
        best = min(best, time.perf_counter() - t0)
    return len(prompt) / best


def worker(args) -> None:
    import rwkv_cli  # noqa: F401 - first, as in the `rwkv` command: its OpenBLAS default precedes NumPy's loading
    import torch
    from rwkv.model import RWKV  # the reference (class chosen by RWKV_V7_ON)

    from rwkv_cli import load_model
    from rwkv_cli.ops import cpu_matmul_backend

    torch.set_grad_enabled(False)
    ours = load_model(args.worker, device="cpu", dtype=args.dtype)
    ref = RWKV(model=args.worker[: -len(".pth")], strategy=f"cpu {args.dtype}")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, ours.cfg.vocab_size, (args.prefill,), generator=gen).tolist()

    def ours_forward(tokens, state):
        logits, state = ours.forward([tokens], state)
        return logits[0], state

    def ref_forward(tokens, state):
        return ref.forward(tokens, state)

    engines = {"ours": ours_forward, "reference": ref_forward}
    best = {name: [0.0, 0.0] for name in engines}
    for _ in range(args.rounds):
        for name, fwd in engines.items():
            fwd(prompt[:16], None)  # warm-up: JIT and allocator
            decode, prefill, _ = time_engine(fwd, fwd([0], None), args.decode, args.warmup, prompt)
            best[name] = [max(best[name][0], decode), max(best[name][1], prefill)]
            if args.verbose:
                print(name, f"decode {decode:.1f} prefill {prefill:.1f}", file=sys.stderr)
    ceiling = products_only_prefill(ours, prompt, 2 * args.rounds)
    # Both engines must agree on the numbers, or the timing comparison means nothing.
    diff = float((ours_forward(prompt, None)[0] - ref_forward(prompt, None)[0].float()).abs().max())
    print(json.dumps({
        "checkpoint": os.path.basename(args.worker), "version": ours.cfg.version,
        "shape": f"L{ours.cfg.n_layer} C{ours.cfg.n_embd} V{ours.cfg.vocab_size}",
        "ours": best["ours"], "reference": best["reference"], "max_logit_diff": diff,
        "products_only_prefill": ceiling,
        "cpu_matmul": cpu_matmul_backend(), "threads": torch.get_num_threads(), "dtype": args.dtype,
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="VERSION:LAYERS:WIDTH[:VOCAB]")
    p.add_argument("--prefill", type=int, default=256, help="prompt length for the prefill timing")
    p.add_argument("--decode", type=int, default=20, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=5, help="decode steps before timing")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds per engine (best kept)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="both engines' weights and activations")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "rwkv-cli-bench"))
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help="print every round (worker, stderr)")
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from rwkv_cli.testing import bench_checkpoint, reference_env

    results = []
    for spec in args.shapes:
        version, path = bench_checkpoint(args.workdir, spec)
        env = reference_env(version)
        cmd = [sys.executable, __file__, "--worker", str(path), "--prefill", str(args.prefill),
               "--decode", str(args.decode), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
               "--dtype", args.dtype]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"worker failed for {spec}:\n{out.stderr[-2000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    r0 = results[0]
    print(f"CPU {args.dtype}, batch 1, {r0['threads']} threads, our matmul backend: {r0['cpu_matmul']}")
    head = f"{'model':<22} {'decode tok/s (ours / ref / ratio)':>36} {f'prefill-{args.prefill} tok/s (ours / ref / ratio)':>42}"
    print(head)
    for r in results:
        (od, op), (rd, rp) = r["ours"], r["reference"]
        print(f"v{r['version']} {r['shape']:<19} {od:>12.1f} {rd:>9.1f} {od / rd:>10.2f}x"
              f" {op:>16.1f} {rp:>9.1f} {op / rp:>12.2f}x   (max |logit diff| {r['max_logit_diff']:.1e})")
    print(f"prefill-{args.prefill} with nothing but its matrix products (the {args.dtype} ceiling here):")
    for r in results:
        ceiling, rp = r["products_only_prefill"], r["reference"][1]
        print(f"v{r['version']} {r['shape']:<19} {ceiling:>12.1f} tok/s = {ceiling / rp:.2f}x the reference")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
