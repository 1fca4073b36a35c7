"""Resuming a conversation costs the same after 10 turns or 300: time to first token after --state.

    python benchmarks/bench_resume.py [--turns 10 300] [--shape 7:6:512]

Builds chats of each length on a random checkpoint (greedy, short replies), saves each as a state
file, then measures, in turns so both see the same machine: (a) in-process, loading the state file
and producing the first reply token; (b) end to end, `rwkv chat --state FILE` in a new process
until its first reply byte (process start and model load included, the same for both); and, for
contrast, (c) what re-reading the transcript as text would cost instead of resuming the state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rwkv_cli import load_model
from rwkv_cli.sampling import SamplingParams
from rwkv_cli.session import ChatSession
from rwkv_cli.statefile import load_state, save_state
from rwkv_cli.testing import random_checkpoint
from rwkv_cli.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.5)


def build_chat(model, tok, turns: int, path: Path) -> str:
    s = ChatSession(model, tok, GREEDY, max_tokens=3)
    for i in range(turns):
        "".join(s.send(f"Question {i}: and next?"))
    save_state(path, s.state, model, logits=s.logits, **s.metadata())
    return "".join(f"User: {e.user}\n\nAssistant:{e.reply}\n\n" for e in s.exchanges)


def first_token_in_process(model, tok, path: Path) -> float:
    t0 = time.perf_counter()
    saved = load_state(path, model)
    s = ChatSession(model, tok, GREEDY, max_tokens=1)
    s.restore(saved.state, saved.meta, saved.logits)
    next(iter(s.send("And now?")))
    return time.perf_counter() - t0


def first_token_cli(ckpt: Path, path: Path) -> float:
    env = dict(os.environ, RWKV_NOHISTORY="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_cli", "chat", "-m", str(ckpt), "--state", str(path), "--temp", "0", "-n", "2", "-q"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    proc.stdin.write(b"And now?\n")
    proc.stdin.flush()
    proc.stdout.read(1)
    elapsed = time.perf_counter() - t0
    proc.stdin.close()
    proc.wait()
    return elapsed


def reread(model, tok, text: str) -> float:
    t0 = time.perf_counter()
    model.forward([tok.encode(text + "User: And now?\n\nAssistant:")])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, nargs="*", default=[10, 300])
    p.add_argument("--shape", default="7:6:512", help="VERSION:LAYERS:WIDTH of the random model")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    version, layers, width = args.shape.split(":")
    work = Path(tempfile.mkdtemp(prefix="rwkv-resume-"))
    ckpt = random_checkpoint(work / "model.pth", version, int(layers), int(width), vocab_size=65536)
    model, tok = load_model(ckpt, "cpu", "fp32"), load_tokenizer("world")
    files, texts = {}, {}
    for n in args.turns:
        t0 = time.perf_counter()
        files[n] = work / f"chat-{n}.rwkvstate"
        texts[n] = build_chat(model, tok, n, files[n])
        print(f"built a {n}-turn chat ({len(tok.encode(texts[n]))} tokens) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    results = {n: {"api": [], "cli": [], "reread": []} for n in args.turns}
    first_token_in_process(model, tok, files[args.turns[0]])  # warm-up (allocator, caches)
    for _ in range(args.repeat):
        for n in args.turns:
            results[n]["api"].append(first_token_in_process(model, tok, files[n]))
            results[n]["cli"].append(first_token_cli(ckpt, files[n]))
        for n in args.turns:
            results[n]["reread"].append(reread(model, tok, texts[n]))
    print(f"time to first reply token, median of {args.repeat} (random RWKV-{version} L{layers} C{width}, CPU fp32)")
    print(f"{'history':>10} {'state file':>12} {'--state (API)':>15} {'--state (CLI)':>15} {'re-read instead':>17}")
    for n in args.turns:
        r = results[n]
        print(f"{n:>7} turns {files[n].stat().st_size / 1e6:>9.2f} MB {statistics.median(r['api']) * 1e3:>12.1f} ms"
              f" {statistics.median(r['cli']):>13.2f} s {statistics.median(r['reread']) * 1e3:>14.0f} ms")


if __name__ == "__main__":
    main()
