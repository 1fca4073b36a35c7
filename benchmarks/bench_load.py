"""Load time of a checkpoint as a BlinkDL `.pth` versus the same weights after `rwkv convert`.

    python benchmarks/bench_load.py                      # v7 0.1B shape: L12 C768 V65536, bf16 file
    python benchmarks/bench_load.py --shape 6:24:1024 --rounds 5

Writes a random checkpoint of the shape (bf16, as official files are), converts it to safetensors
with `rwkv convert`'s code (as is, and cast to fp32), then times, in turns, `read_shapes` (what
`rwkv list` and `show` read), `load_checkpoint` (open, rename, validate: the file's own cost;
tensors stay memory-mapped) and `load_model` (the same plus casting to fp32 and preparing the
weights) for each file.
Each is repeated and the best round is kept (the machine is shared and noisy). The page cache is
warm for both files after the first round, so this compares formats, not disks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7:12:768", help="VERSION:LAYERS:WIDTH (vocab 65536)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from rwkv_cli.checkpoint import load_checkpoint, read_shapes
    from rwkv_cli.cli.convert import convert_checkpoint
    from rwkv_cli.engine import load_model
    from rwkv_cli.testing import random_checkpoint

    version, layers, width = args.shape.split(":")
    fp32_model = lambda p: load_model(p, "cpu", "fp32")  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        pth = random_checkpoint(Path(tmp) / "model.pth", version, int(layers), int(width))
        files = {"pth": pth, "safetensors": Path(tmp) / "model.safetensors",
                 "safetensors-fp32": Path(tmp) / "model-fp32.safetensors"}
        convert_checkpoint(pth, files["safetensors"])
        convert_checkpoint(pth, files["safetensors-fp32"], "fp32")
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, path in files.items():
                steps = (("shapes", read_shapes), ("read", load_checkpoint), ("load_model", fp32_model))
                for what, fn in steps:
                    t0 = time.perf_counter()
                    out = fn(path)
                    dt = time.perf_counter() - t0
                    del out
                    key = f"{name} {what}"
                    best[key] = min(best.get(key, dt), dt)
        size = {n: p.stat().st_size / 2**20 for n, p in files.items()}
    print(f"RWKV-{version} L{layers} C{width} V65536, bf16 .pth; best of {args.rounds} rounds")
    for key, dt in best.items():
        print(f"  {key:28s} {dt * 1000:8.0f} ms   ({size[key.split()[0]]:.0f} MiB file)")


if __name__ == "__main__":
    main()
