"""Where a GPU decoding step and a prompt spend their time: per-kernel device time (PyTorch
profiler), graph replay time, and the end-to-end `Model.forward` time with the argmax read back
every step (what bench_gpu.py times). For deciding what to fuse next; the speed table with the
reference is bench_gpu.py.

    python benchmarks/profile_gpu.py                           # v7 0.1B and 1.5B, B = 1 and 64
    python benchmarks/profile_gpu.py --shapes 4:24:2048 --batch 1 --prefill 4096
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch


def events_ms(fn, n: int) -> float:
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n


def kernel_table(fn, n: int, top: int) -> tuple[float, list[tuple[str, float, float]]]:
    """Device microseconds per call of `fn`, summed over its kernels; and the `top` kernels as
    (name, launches per call, us per call)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if getattr(ev, "device_type", None) is not None and str(ev.device_type).endswith("CUDA"):
            dur = ev.time_range.elapsed_us()
            if "Memcpy" not in ev.name and "Memset" not in ev.name:
                per[ev.name][0] += 1
                per[ev.name][1] += dur
    rows = sorted(((k, c / n, t / n) for k, (c, t) in per.items()), key=lambda r: -r[2])
    return sum(r[2] for r in rows), rows[:top]


def print_rows(rows) -> None:
    for name, calls, us in rows:
        print(f"    {us:9.1f} us  {calls:6.1f}x  {name[:90]}")


def profile_shape(spec: str, batches: list[int], prefill: int, steps: int, workdir: str) -> None:
    from rwkv_cli import load_model
    from rwkv_cli.testing import bench_checkpoint

    _, path = bench_checkpoint(workdir, spec)
    model = load_model(path, device="cuda", dtype="fp16")
    net = model.net
    print(f"\n== {spec}: L{model.cfg.n_layer} C{model.cfg.n_embd} V{model.cfg.vocab_size}")
    for B in batches:
        gs = net._graph_step(B)
        tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
        logits, st = model.forward(tok)
        for _ in range(3):
            logits, st = model.forward(logits.argmax(-1, keepdim=True), st)
        run = next(iter(gs.steps.values()))[0]  # a captured step (graph replay) of the loop above
        replay = events_ms(run, steps)
        kern_us, rows = kernel_table(run, 5, 14)

        def loop(read_back: bool):
            nonlocal logits, st
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                nxt = logits.argmax(-1, keepdim=True)
                if read_back:
                    int(nxt[0, 0])
                logits, st = model.forward(nxt, st, check_finite=read_back)
            torch.cuda.synchronize()
            return 1000 * (time.perf_counter() - t0) / steps

        def host_loop():  # what bench_gpu.py times: ids as Python ints, the argmax read each step
            nonlocal logits, st
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                ids = logits.argmax(-1).tolist()
                logits, st = model.forward([[i] for i in ids], st)
            torch.cuda.synchronize()
            return 1000 * (time.perf_counter() - t0) / steps

        loop(True)
        fwd, fwd_async, host = loop(True), loop(False), host_loop()
        print(f"  B={B} ({gs.backend}): graph replay {replay:.3f} ms, kernels {kern_us / 1000:.3f} ms (profiled, summed), "
              f"forward+argmax+read {fwd:.3f} ms, without reads {fwd_async:.3f} ms, ids as ints {host:.3f} ms "
              f"({B * 1000 / host:,.0f} tok/s)")
        print_rows(rows)
        if B == 1:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                host_loop()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if prefill:
        prompt = torch.randint(0, 50000, (1, prefill), generator=torch.Generator().manual_seed(0))
        model.forward(prompt[:, :64])
        ms = events_ms(lambda: model.forward(prompt, check_finite=False), 2)
        kern_us, rows = kernel_table(lambda: model.forward(prompt, check_finite=False), 1, 14)
        print(f"  prefill {prefill}: {ms:.1f} ms ({prefill * 1000 / ms:,.0f} tok/s), kernels {kern_us / 1000:.1f} ms, "
              f"chunk {net.gpu_prefill_chunk()}")
        print_rows(rows)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:  # host time: launches, and anything slower
            model.forward(prompt, check_finite=False)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=["7:12:768", "7:24:2048"])
    p.add_argument("--batch", type=int, nargs="*", default=[1, 64])
    p.add_argument("--prefill", type=int, default=4096, help="prompt length to profile (0: none)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "rwkv-cli-bench"))
    args = p.parse_args()
    torch.set_grad_enabled(False)
    print(torch.cuda.get_device_name(), torch.__version__)
    for spec in args.shapes:
        profile_shape(spec, args.batch, args.prefill, args.steps, args.workdir)


if __name__ == "__main__":
    main()
