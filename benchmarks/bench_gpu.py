"""Our GPU engine vs BlinkDL's `rwkv` 0.8.32 ("cuda fp16", RWKV_CUDA_ON=1) on the same random
checkpoints in real shapes, in one run; prints the issue's table with ratios.

    python benchmarks/bench_gpu.py                         # v7 0.1B, v7 1.5B (+ B=64), v4 1.5B, v7 7.2B
    python benchmarks/bench_gpu.py --shapes 7:12:768 --no-reference
    python benchmarks/bench_gpu.py --kernels               # each kernel against its PyTorch twin

For each shape one child process (started with the reference's environment flags: RWKV_V7_ON
selects its v7 class at import) loads the checkpoint into both engines and times, the way
shared/tools/bench_reference.py times the reference: batch-1 greedy decode tok/s (100 steps after
10 warm-up steps; the reference's argmax read back on the host each step, ours through the
Sampler and DecodeLoop exactly as `rwkv generate` decodes, the logits' finiteness read with the
ids, where the reference checks nothing) and the prefill tok/s of one 4096-token prompt (after
one warm-up with the same prompt, for both); ours best of `--rounds`. It also reports our peak
GPU memory beyond the weights while decoding and while prefilling, and how far our logits are from
the reference's after the prompt. Needs a CUDA GPU and the `rwkv` test dependency (nvcc and ninja
for the reference's extension).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# (spec, target decode B=1, target prefill, batch sizes beyond 1 with their aggregate target)
DEFAULT_SHAPES = ["7:12:768", "7:24:2048", "4:24:2048", "7:32:4096"]
TARGETS = {"7:12:768": (2000, None), "7:24:2048": (800, 60000), "4:24:2048": (800, 60000), "7:32:4096": (170, 25000)}
BATCHED = {"7:24:2048": (64, 25000)}
NAMES = {"7:12:768": "v7 0.1B", "7:24:2048": "v7 1.5B", "4:24:2048": "v4 1.5B", "7:32:4096": "v7 7.2B",
         "4:12:768": "v4 169M"}


def sync():
    import torch

    torch.cuda.synchronize()


def time_decode_ours(model, B: int, n_warmup: int, n: int) -> float:
    """Ours, as `rwkv generate` decodes: greedy through the Sampler and the DecodeLoop (the next
    step queued before the ids are read back, with the logits' finiteness in the same transfer).
    Returns aggregate tok/s over B sequences."""
    from rwkv_cli.decoding import DecodeLoop

    loop = DecodeLoop.greedy(model, *model.forward([[0]] * B))
    for _ in range(n_warmup):
        next(loop)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        next(loop)
    sync()
    return B * n / (time.perf_counter() - t0)


def time_decode(forward, n_warmup: int, n: int) -> float:
    """The reference's loop: each step's argmax read back on the host."""
    logits, state = forward([0], None)
    for _ in range(n_warmup):
        logits, state = forward([int(logits.argmax())], state)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        logits, state = forward([int(logits.argmax())], state)
    sync()
    return n / (time.perf_counter() - t0)


def time_prefill(forward, prompt) -> tuple[float, object]:
    # warm-up with the whole prompt: a 64-token one leaves the long chunks' first cuBLAS calls,
    # kernel loads and allocations inside the timing (v7 1.5B on an H100: 18k tok/s cold, 62k warm)
    forward(prompt, None)
    sync()
    t0 = time.perf_counter()
    logits, _ = forward(prompt, None)
    sync()
    return len(prompt) / (time.perf_counter() - t0), logits


def worker(args) -> None:
    import torch

    from rwkv_cli import load_model
    from rwkv_cli.cuda import describe_backend

    torch.set_grad_enabled(False)
    res = {"checkpoint": os.path.basename(args.worker)}
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ours = load_model(args.worker, device="cuda", dtype="fp16")
    res["weights_bytes"] = torch.cuda.memory_allocated() - before
    res["version"], res["backend"] = ours.cfg.version, describe_backend()
    res["shape"] = f"L{ours.cfg.n_layer} C{ours.cfg.n_embd} V{ours.cfg.vocab_size}"
    prompt = torch.randint(0, min(50000, ours.cfg.vocab_size), (args.prefill,), generator=torch.Generator().manual_seed(0)).tolist()

    def ours_forward(tokens, state):
        logits, state = ours.forward([tokens], state)
        return logits[0], state

    decode, prefill, mem_dec, mem_pre = 0.0, 0.0, 0, 0
    for _ in range(args.rounds):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        decode = max(decode, time_decode_ours(ours, 1, args.warmup, args.decode))
        mem_dec = max(mem_dec, torch.cuda.max_memory_allocated() - base)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        rate, our_logits = time_prefill(ours_forward, prompt)
        prefill = max(prefill, rate)
        mem_pre = max(mem_pre, torch.cuda.max_memory_allocated() - base)
    res.update(ours_decode=decode, ours_prefill=prefill, decode_extra_bytes=mem_dec, prefill_extra_bytes=mem_pre,
               state_bytes=ours.zero_state(1).nbytes, prefill_chunk=ours.net.gpu_prefill_chunk())
    for B in args.batch:
        res[f"ours_decode_B{B}"] = time_decode_ours(ours, B, 3, args.decode // 2)
    if not args.no_reference:
        from rwkv.model import RWKV  # the reference (class chosen by RWKV_V7_ON)

        ref = RWKV(model=args.worker[: -len(".pth")], strategy="cuda fp16")

        def ref_forward(tokens, state):
            return ref.forward(tokens, state)

        res["ref_decode"] = time_decode(ref_forward, args.warmup, args.decode)
        res["ref_prefill"], ref_logits = time_prefill(ref_forward, prompt)
        ref_logits = ref_logits.float()
        res["max_logit_diff"] = float((our_logits.float() - ref_logits).abs().max())
        res["max_abs_ref_logit"] = float(ref_logits.abs().max())
        res["same_argmax"] = int(our_logits.argmax()) == int(ref_logits.argmax())
    print(json.dumps(res))


def fmt_rate(x):
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def ratio(a, b):
    return "-" if not a or not b else f"{a / b:.1f}x"


def run_shapes(args) -> None:
    from rwkv_cli.testing import bench_checkpoint, reference_env

    results = []
    for spec in args.shapes:
        version, path = bench_checkpoint(args.workdir, spec)
        env = reference_env(version, cuda=True)
        batch = [BATCHED[spec][0]] if spec in BATCHED and not args.no_batch else []
        cmd = [sys.executable, __file__, "--worker", str(path), "--prefill", str(args.prefill), "--decode",
               str(args.decode), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
               *(["--no-reference"] if args.no_reference else []), *[a for B in batch for a in ("--batch", str(B))]]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"worker failed for {spec}:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["spec"], r["seconds"] = spec, round(time.perf_counter() - t0)
        print(json.dumps(r), file=sys.stderr)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print_table(results, args)


def print_table(results, args) -> None:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "?"
    print(f"\n{gpu}, torch {torch.__version__}, {datetime.date.today()}; ours: fp16, "
          f"{results[0]['backend'] if results else '?'}; reference: rwkv 0.8.32 cuda fp16, RWKV_CUDA_ON=1")
    print(f"decode: batch 1, greedy, {args.decode} steps; prefill: one {args.prefill}-token prompt\n")
    print("| model shape | decode B=1 ours | reference | ratio | prefill ours | reference | ratio | target | "
          "memory beyond weights (decode / prefill) | max logit diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in results:
        dec_t, pre_t = TARGETS.get(r["spec"], (None, None))
        target = ", ".join(t for t in (dec_t and f"decode >= {dec_t:,}", pre_t and f"prefill >= {pre_t:,}") if t)
        mem = f"{r['decode_extra_bytes'] / 2**20:.0f} / {r['prefill_extra_bytes'] / 2**20:.0f} MiB " \
              f"({100 * r['prefill_extra_bytes'] / r['weights_bytes']:.1f}% of {r['weights_bytes'] / 2**30:.2f} GiB)"
        diff = f"{r['max_logit_diff']:.3f} of {r['max_abs_ref_logit']:.1f}" if "max_logit_diff" in r else "-"
        name = f"{NAMES.get(r['spec'], r['spec'])} ({r['shape']})"
        print(f"| {name} | {fmt_rate(r['ours_decode'])} | {fmt_rate(r.get('ref_decode'))} | "
              f"{ratio(r['ours_decode'], r.get('ref_decode'))} | {fmt_rate(r['ours_prefill'])} | "
              f"{fmt_rate(r.get('ref_prefill'))} | {ratio(r['ours_prefill'], r.get('ref_prefill'))} | {target or '-'} | "
              f"{mem} | {diff} |")
        for key in r:
            if key.startswith("ours_decode_B"):
                B = int(key[len("ours_decode_B"):])
                tgt = BATCHED.get(r["spec"], (B, None))[1]
                print(f"| {NAMES.get(r['spec'], r['spec'])}, batched decode B={B} | {fmt_rate(r[key])} (aggregate) | "
                      f"(no batching) | | | | | {f'>= {tgt:,}' if tgt else '-'} | | |")


# -- kernels against their twins -------------------------------------------------------------------
def time_cuda(fn, reps: int = 20) -> float:
    """Milliseconds per call: `reps` calls captured in a CUDA graph, replayed 10 times."""
    import torch

    fn()
    sync()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    sync()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        g.replay()
    e1.record()
    sync()
    return e0.elapsed_time(e1) / (10 * reps)


def run_kernels(args) -> None:
    import torch
    import torch.nn.functional as F

    from rwkv_cli.cuda import kops, loader, twins
    from rwkv_cli.wkv import wkv4_sequence, wkv7_sequence

    torch.set_grad_enabled(False)
    K = loader.kernels_for(torch.device("cuda"))
    assert K is not None, loader.status()
    C, H, T, dt = 2048, 32, 4096, torch.float16
    rows = []

    def row(name, ours_ms, twin_ms, nbytes=None):
        bw = f"{nbytes / ours_ms / 1e6:,.0f} GB/s" if nbytes else ""
        rows.append(f"| {name} | {1000 * ours_ms:,.1f} | {1000 * twin_ms:,.1f} | {twin_ms / ours_ms:.1f}x | {bw} |")

    # products of one decoding step, B = 1, at the 1.5B and 0.1B widths: r, k, v, output (4 C x C
    # in one launch) and the FFN (4C x C, with its input staged from the residual by LayerNorm +
    # token shift or as given, and C x 4C). Each case cycles through copies of its weights (256 MB
    # or more) so that they stream from DRAM as in a decoding step, not from the 50 MB L2; on
    # Hopper the gemv launches are programmatic dependent launches (RWKV_CUDA_PDL=0: ordinary).
    def gemv_cases(Cw: int):
        """(name, make the products, their PyTorch twin) for width Cw, and the weight copies."""
        x, h = torch.randn(1, Cw, device="cuda", dtype=dt), torch.randn(1, 4 * Cw, device="cuda", dtype=dt)
        y4 = [torch.empty(1, Cw, device="cuda", dtype=dt) for _ in range(4)]
        yk, yv = torch.empty(1, 4 * Cw, device="cuda", dtype=dt), torch.empty(1, Cw, device="cuda", dtype=dt)
        ln = (torch.rand(Cw, device="cuda", dtype=dt) + 0.5, torch.randn(Cw, device="cuda", dtype=dt) * 0.1)
        shift, mix = torch.randn(1, Cw, device="cuda", dtype=dt), torch.rand(Cw, device="cuda", dtype=dt)
        W = lambda o, i: torch.randn(o, i, device="cuda", dtype=dt) * 0.02  # noqa: E731
        copies = max(4, -(-(256 << 20) // (16 * Cw * Cw)))
        cases = [
            ("4 products C x C in one launch", lambda: [twins.Seg(x, W(Cw, Cw), y) for y in y4],
             lambda segs: [F.linear(x, s.W) for s in segs]),
            ("FFN key 4C x C (relu^2)", lambda: [twins.Seg(x, W(4 * Cw, Cw), yk, out_act=1)],
             lambda segs: torch.relu(F.linear(x, segs[0].W)).square()),
            ("FFN key 4C x C, LayerNorm + shift staged (relu^2)",
             lambda: [twins.Seg(x, W(4 * Cw, Cw), yk, out_act=1, in_act=3, shift=shift, ln=ln, mix=mix)],
             twins.gemv_torch),
            ("FFN value C x 4C (+ residual)", lambda: [twins.Seg(h, W(Cw, 4 * Cw), yv, res=yv)],
             lambda segs: yv + F.linear(h, segs[0].W)),
        ]
        return cases, copies

    for Cw in (C, 768):
        cases, copies = gemv_cases(Cw)
        for name, make, twin in cases:
            sets = [make() for _ in range(copies)]
            nbytes = sum(s.W.numel() * 2 for s in sets[0])
            ours = time_cuda(lambda sets=sets: [kops.gemv(K, segs) for segs in sets]) / copies
            ref = time_cuda(lambda sets=sets, twin=twin: [twin(segs) for segs in sets]) / copies
            row(f"gemv C={Cw}: {name}, B=1", ours, ref, nbytes)
            del sets
    # prompt products of a small model (0.1B widths, 512-token chunk): kernels/gemm.cu against cuBLAS
    R, Cs = 512, 768
    xs3 = torch.randn(3, R, Cs, device="cuda", dtype=dt)
    for name, x_, W_ in (("r, k, v: 3 x (512 x 768 @ 768 x 768)", xs3, torch.randn(3, Cs, Cs, device="cuda", dtype=dt)),
                         ("FFN key: 512 x 768 @ 768 x 3072", xs3[0], torch.randn(4 * Cs, Cs, device="cuda", dtype=dt)),
                         ("head: 1 x 768 @ 768 x 65536", xs3[0, :1], torch.randn(65536, Cs, device="cuda", dtype=dt))):
        twin = (lambda x_=x_, W_=W_: torch.bmm(x_, W_.transpose(1, 2))) if W_.dim() == 3 else \
            (lambda x_=x_, W_=W_: F.linear(x_, W_))
        row(f"gemm {name}", time_cuda(lambda x_=x_, W_=W_: kops.gemm(K, x_, W_)), time_cuda(twin))
    # RWKV-7 prefill recurrence, one layer, T tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    N = 64
    r, k, v = (torch.randn(1, T, H, N, device="cuda", generator=gen) for _ in range(3))
    ld = -0.6 * torch.rand(1, T, H, N, device="cuda", generator=gen)
    kk = F.normalize(torch.randn(1, T, H, N, device="cuda", generator=gen), dim=-1)
    a = torch.rand(1, T, H, N, device="cuda", generator=gen)
    S = torch.zeros(1, H, N, N, device="cuda")
    f = lambda t: t.reshape(1, T, C).contiguous()  # noqa: E731
    prepared = (f(r), f(torch.exp(ld)), f(kk), f(k), f(kk * a), f(v))
    # The chunked kernels overwrite d, kk and beta, so each timed call first restores its inputs
    # from `prepared`; the restoring copies' own time is taken off.
    used = [t.clone() for t in prepared]

    def restore():
        for dst, src in zip(used, prepared, strict=True):
            dst.copy_(src)

    restore_ms = time_cuda(restore, 2)
    twin_ms = time_cuda(lambda: wkv7_sequence(S, r, ld, k, v, kk, a), 2)
    for name in ("wkv7_chunk", "wkv7_seq"):
        row(f"{name}: T={T}, H={H} (prefill recurrence, one layer)",
            time_cuda(lambda name=name: (restore(), kops.wkv7_seq(K, S, *used, kernel=name)), 2) - restore_ms,
            twin_ms)
    # RWKV-4 prefill recurrence
    w, u = -torch.exp(torch.randn(C, device="cuda")), torch.randn(C, device="cuda")
    k4, v4 = torch.randn(1, T, C, device="cuda"), torch.randn(1, T, C, device="cuda")
    z = torch.zeros(1, C, device="cuda")
    m = torch.full((1, C), -1e30, device="cuda")
    row(f"wkv4_seq: T={T}, C={C}", time_cuda(lambda: kops.wkv4_seq(K, w, u, k4, v4, z, z, m), 2),
        time_cuda(lambda: wkv4_sequence(w, u, k4, v4, z, z, m), 2))
    # decoding step pieces
    xs = torch.randn(1, T, C, device="cuda", dtype=dt)
    lw, lb, mix, sh = torch.ones(C, device="cuda", dtype=dt), torch.zeros(C, device="cuda", dtype=dt), \
        torch.rand(6, C, device="cuda", dtype=dt), torch.zeros(1, C, device="cuda", dtype=dt)
    row(f"ln_mix: LN + 6 token-shift mixes, T={T}", time_cuda(lambda: kops.ln_mix(K, xs, sh, lw, lb, mix, False)),
        time_cuda(lambda: twins.ln_mix(xs, sh, lw, lb, mix, False)))
    hid = torch.randn(64, 4 * C, device="cuda", dtype=dt)  # batched decoding's FFN key output
    row(f"act_inplace: relu^2 of B=64 x {4 * C}", time_cuda(lambda: kops.act_inplace(K, hid, kops.ACT_RELU_SQUARE)),
        time_cuda(lambda: hid.relu_().square_()), hid.numel() * 4)
    vecs = [torch.randn(1, C, device="cuda", dtype=dt) for _ in range(8)]
    p = dict(w0=torch.randn(C, device="cuda") - 3, a0=vecs[7][0], v0=vecs[7][0], k_k=vecs[6][0], k_a=vecs[6][0])
    rk, lnw, lnb = torch.randn(H, N, device="cuda", dtype=dt) * 0.1, torch.ones(C, device="cuda"), torch.zeros(C, device="cuda")
    Sd, out = torch.randn(1, H, N, N, device="cuda") * 0.1, torch.empty(1, C, device="cuda", dtype=dt)
    args7 = (*vecs[:6], vecs[6], vecs[7], p["w0"], p["a0"], p["v0"], p["k_k"], p["k_a"], rk, lnw, lnb)
    row("wkv7_step: steps 3-12 fused, B=1", time_cuda(lambda: kops.wkv7_step(K, *args7, Sd, Sd, out)),
        time_cuda(lambda: twins.wkv7_step(*vecs[:6], vecs[6], vecs[7], p["w0"], p["a0"], p["v0"], p["k_k"], p["k_a"],
                                          rk, lnw, lnb, Sd)), Sd.numel() * 8)
    # a decoding step's read-back and sampling (kernels/sampling.cu), V = 65536, default parameters
    from rwkv_cli.sampling import GENERATE_DEFAULTS, Sampler, SamplingParams, checked_ids_torch

    V = 65536
    for B in (1, 64):
        s = Sampler([SamplingParams(**GENERATE_DEFAULTS)] * B, V, device="cuda")
        s.record(torch.randint(0, V, (B,), device="cuda", generator=gen))
        logits = torch.randn(B, V, device="cuda", generator=gen) * 3
        row(f"checked_ids: argmax + finiteness, B={B}", time_cuda(lambda: kops.checked_ids(K, logits)),
            time_cuda(lambda: checked_ids_torch(logits)), logits.numel() * 4)
        row(f"penalized_softmax: penalties + softmax + argmax, B={B}",
            time_cuda(lambda: kops.penalized_softmax(K, logits, s.counts, s.seen, None, s.presence, s.frequency)),
            time_cuda(lambda: (lambda pen: (torch.softmax(pen, -1), pen.argmax(-1)))(s.penalized(logits))))
        sp, si = torch.softmax(logits, -1).sort(-1, descending=True)
        u = torch.rand(B, device="cuda", generator=gen)
        row(f"nucleus_draw: top-p cut + temperature + draw, B={B}",
            time_cuda(lambda: kops.nucleus_draw(K, sp, si, s.top_p, s.top_k, s.min_p, s.inv_temp, u, u.long(),
                                                None, None, s.weight, s.decay)),
            time_cuda(lambda: s._draw(s._truncate(sp, None, check_complete=False)[0], si, u, s.inv_temp)))
    print(f"\n{torch.cuda.get_device_name()}, fp16, {datetime.date.today()}\n")
    print("| kernel | ours us | torch twin us | speed-up | bandwidth |")
    print("|---|---:|---:|---:|---|")
    print("\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="VERSION:LAYERS:WIDTH[:VOCAB]")
    p.add_argument("--prefill", type=int, default=4096, help="prompt length for the prefill timing")
    p.add_argument("--decode", type=int, default=100, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=10, help="decode steps before timing")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds for our engine (best kept)")
    p.add_argument("--batch", type=int, action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--no-batch", action="store_true", help="skip the batched-decode line")
    p.add_argument("--no-reference", action="store_true", help="time only our engine")
    p.add_argument("--kernels", action="store_true", help="time each kernel against its PyTorch twin")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "rwkv-cli-bench"))
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.kernels:
        return run_kernels(args)
    run_shapes(args)


if __name__ == "__main__":
    main()
