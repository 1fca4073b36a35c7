"""World tokenizer: ours against BlinkDL's reference (`rwkv` 0.8.32 TRIE_TOKENIZER), side by side.

    python benchmarks/bench_tokenizer.py [--mb 1.0]

Prints load time (a fresh interpreter: import, load, first encode), encoding MB/s on mixed text
(English prose, source code, multilingual text) and decoding MB/s, for both, and the ratios.
"Cold" is a fresh tokenizer's first pass, where every piece is new to its cache; "warm" repeats
the text. Both tokenizers must produce identical ids, or the script stops. Runs in ~10 s.
"""

from __future__ import annotations

import argparse
import ast
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path


def corpus(megabytes: float) -> dict[str, str]:
    """Three kinds of text, about a third of `megabytes` each, the same on every run."""
    import email
    import json

    from rwkv_cli.tokenizer import WorldTokenizer

    sources = [p for pkg in (email, json) for p in sorted(Path(pkg.__file__).parent.glob("*.py"))]
    sources += sorted(Path(ast.__file__).parent.glob("[a-s]*.py"))
    code, prose, size = [], [], int(megabytes * 1e6 / 3)
    for path in sources:
        text = path.read_text(encoding="utf-8", errors="replace")
        code.append(text)
        try:  # docstrings are English prose
            tree = ast.parse(text)
        except SyntaxError:
            continue
        docs = (
            ast.get_docstring(n)
            for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Module))
        )
        prose.extend(d for d in docs if d)
        if sum(map(len, code)) > size and sum(map(len, prose)) > size:
            break
    # Multilingual: random words made of the vocabulary's non-ASCII tokens (CJK, Cyrillic, Arabic...)
    rng = random.Random(0)
    words = [t.decode() for t in WorldTokenizer().tokens if max(t) >= 0x80 and _utf8(t)]
    multi, n = [], 0
    while n < size // 2:  # characters here are 2-4 bytes
        w = "".join(rng.choices(words, k=rng.randint(1, 3)))
        multi.append(w + rng.choice(" ，。 , . \n"))
        n += len(multi[-1])
    return {
        "prose": "\n\n".join(prose)[:size],
        "code": "".join(code)[:size],
        "multilingual": "".join(multi),
    }


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def load_seconds(code: str, runs: int = 3) -> float:
    """Median wall time of `code` in fresh interpreters (imports included)."""
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(out.stdout))
    return statistics.median(times)


def best_rate(fn, nbytes: int, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return nbytes / 1e6 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=1.0, help="size of the mixed text in MB")
    args = ap.parse_args()

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkv_cli.data.build_world_vocab import default_txt_path
    from rwkv_cli.tokenizer import WorldTokenizer

    txt = str(default_txt_path())
    timer = "import time; t = time.perf_counter(); {}; print(time.perf_counter() - t)"
    ours_load = load_seconds(
        timer.format("from rwkv_cli.tokenizer import WorldTokenizer; WorldTokenizer().encode('hi')")
    )
    ref_load = load_seconds(
        timer.format(f"from rwkv.rwkv_tokenizer import TRIE_TOKENIZER; TRIE_TOKENIZER({txt!r}).encode('hi')")
    )

    ref = TRIE_TOKENIZER(txt)
    parts = corpus(args.mb)
    parts["mixed"] = "".join(parts.values())
    print(
        f"{'text':<13}{'MB':>6}  {'encode MB/s: ours cold':>22}{'warm':>7}{'ref':>7}{'cold/ref':>10}"
        f"  {'decode MB/s: ours':>17}{'ref':>7}{'ratio':>7}"
    )
    for name, text in parts.items():
        nbytes = len(text.encode())
        ours = WorldTokenizer()
        t = time.perf_counter()
        ids = ours.encode(text)
        cold = nbytes / 1e6 / (time.perf_counter() - t)
        warm = best_rate(lambda ours=ours, text=text: ours.encode(text), nbytes, 3)
        t = time.perf_counter()
        ref_ids = ref.encode(text)
        ref_rate = nbytes / 1e6 / (time.perf_counter() - t)
        if ids != ref_ids:
            sys.exit(f"{name}: ids differ from the reference")
        dec = best_rate(lambda ours=ours, ids=ids: ours.decode(ids), nbytes, 5)
        ref_dec = best_rate(lambda ids=ids: ref.decode(ids), nbytes, 5)
        print(
            f"{name:<13}{nbytes / 1e6:>6.2f}  {cold:>22.1f}{warm:>7.1f}{ref_rate:>7.1f}"
            f"{cold / ref_rate:>9.1f}x"
            f"  {dec:>17.1f}{ref_dec:>7.1f}{dec / ref_dec:>6.1f}x"
        )
    print(
        f"load (import + vocabulary + first encode, median of 3): ours {ours_load:.3f} s, "
        f"reference {ref_load:.3f} s ({ref_load / ours_load:.0f}x faster)"
    )


if __name__ == "__main__":
    main()
