"""`rwkv bench`: prompt-processing and generation speed of a model, like llama-bench.

For each batch size B: `ppP` times one forward over B prompts of P tokens from a zero state;
`tgN` times N single-token steps of B sequences (greedy, through the decoding loop that `rwkv
generate` uses, after warm-up steps, so CUDA graphs and kernels are built before the clock
starts). Each test runs `--repetitions` times; the table shows the mean and the spread. Memory:
the GPU's peak allocated bytes (weights included), or the process's peak resident size on the CPU.
"""

from __future__ import annotations

import json as jsonlib
import time
from typing import Annotated

import typer

from . import app
from .common import Device, Dtype, Model, Offline, Revision, err, load_model_for_cli

Prompt = Annotated[list[int], typer.Option("--prompt", "-p", min=0, help="Prompt lengths to time (repeatable; 0: none).", rich_help_panel="Bench")]
Gen = Annotated[list[int], typer.Option("--gen", "-n", min=0, help="Generated tokens to time (repeatable; 0: none).", rich_help_panel="Bench")]
Batch = Annotated[list[int], typer.Option("--batch", "-b", min=1, help="Batch sizes (repeatable).", rich_help_panel="Bench")]
Reps = Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Runs per test.", rich_help_panel="Bench")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object per test instead of a table.")]


def _peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_prompt(model, B: int, P: int, reps: int) -> list[float]:
    import torch

    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(0, model.cfg.vocab_size, (B, P), generator=gen)
    model.forward(toks)  # warm-up at full length: kernels, the long chunks' cuBLAS plans, allocator
    out = []
    for _ in range(reps):
        _sync(model.device)
        t0 = time.perf_counter()
        model.forward(toks)  # ends in a device sync (the finiteness check)
        out.append(B * P / (time.perf_counter() - t0))
    return out


def _time_gen(model, B: int, N: int, reps: int) -> list[float]:
    import torch

    from ..decoding import DecodeLoop

    toks = torch.randint(0, model.cfg.vocab_size, (B, 16), generator=torch.Generator().manual_seed(1))
    # greedy through the loop `rwkv generate` uses (the next step queued before the ids are read)
    loop = DecodeLoop.greedy(model, *model.forward(toks))
    for _ in range(3):  # warm-up steps: the CUDA graph for this batch size is captured here
        next(loop)
    out = []
    for _ in range(reps):
        _sync(model.device)
        t0 = time.perf_counter()
        for _ in range(N):
            next(loop)
        _sync(model.device)
        out.append(B * N / (time.perf_counter() - t0))
    return out


def _stats(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    return mean, (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5


@app.command()
def bench(
    model: Model = None,
    revision: Revision = None,
    offline: Offline = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    prompt: Prompt = [512],  # noqa: B006 - Typer reads list defaults
    gen: Gen = [128],  # noqa: B006
    batch: Batch = [1],  # noqa: B006
    repetitions: Reps = 3,
    json: Json = False,
) -> None:
    """Measure prompt and generation tokens/s, batch sizes and memory for a model.

    Examples:
      rwkv bench -m rwkv7-g1-0.4b
      rwkv bench -m model.pth -p 4096 -n 256 -b 1 -b 8 -b 64
    """
    import torch

    # No tokenizer: timing needs none, and an offline machine may not have GPT-NeoX's cached.
    m, _ = load_model_for_cli(model, revision, offline, device, dtype, quiet=True, tokenizer=False)
    dev = m.device
    weights = m.net.weights_nbytes()
    dtype_name = str(m.dtype).replace("torch.", "")
    backend = "PyTorch (CPU)"
    where = f"{dev}"
    if dev.type == "cuda":
        from ..cuda import describe_backend

        backend = describe_backend(dev)
        where = torch.cuda.get_device_name(dev)
    err(f"{m.source}: {m.cfg.describe()}; {where} {dtype_name}; weights {weights / 2**30:.2f} GiB; kernels: {backend}")

    rows = []
    for B in batch:
        state_bytes = m.zero_state(B).nbytes
        for kind, sizes, timer in (("pp", prompt, _time_prompt), ("tg", gen, _time_gen)):
            for n in sizes:
                if n <= 0:
                    continue
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                rates = timer(m, B, n, repetitions)
                mean, sd = _stats(rates)
                rows.append({"test": f"{kind}{n}", "batch": B, "tok_s": round(mean, 1), "tok_s_sd": round(sd, 1),
                             "ms_per_step": round(1000 * B / mean, 3) if kind == "tg" else None,
                             "peak_mem_bytes": _peak_memory(dev), "weights_bytes": weights, "state_bytes": state_bytes,
                             "device": where, "dtype": dtype_name, "model": m.cfg.describe()})
                if json:
                    typer.echo(jsonlib.dumps(rows[-1]))
    if json:
        return
    typer.echo(f"| {'test':<8} | {'batch':>5} | {'tok/s':>18} | {'ms/step':>8} | {'peak memory':>12} |")
    typer.echo(f"|{'-' * 10}|{'-' * 7}|{'-' * 20}|{'-' * 10}|{'-' * 14}|")
    for r in rows:
        ms = f"{r['ms_per_step']:.2f}" if r["ms_per_step"] else ""
        typer.echo(f"| {r['test']:<8} | {r['batch']:>5} | {r['tok_s']:>10.1f} ± {r['tok_s_sd']:<5.1f} | {ms:>8} | "
                   f"{r['peak_mem_bytes'] / 2**30:>8.2f} GiB |")
