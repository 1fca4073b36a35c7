"""`rwkv convert IN OUT.safetensors`: any supported checkpoint as one canonical safetensors file.

The output holds the validated tensors under BlinkDL names (whatever the input's layout: `.pth`,
Hugging Face, fla-hub, prefixed), unchanged or cast with `--dtype`. Safetensors loads by memory
mapping, with no pickle to trust, and `rwkv` reads it like the original.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app

DTYPE_NAMES = ("fp32", "bf16", "fp16")


@app.command()
def convert(
    source: Annotated[str, typer.Argument(help="A checkpoint file or folder, or a Hub spec / alias.")],
    output: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    dtype: Annotated[str | None, typer.Option(help="Cast the weights: fp32 | bf16 | fp16 (default: keep).")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Use only the local Hugging Face cache.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Write a checkpoint as a canonical safetensors file (BlinkDL tensor names, no pickle).

    \b
    Examples:
      rwkv convert RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth world-0.1b.safetensors
      rwkv convert fla-hub/rwkv7-0.1B-g1 rwkv7-0.1b.safetensors --dtype bf16
    """
    if output.suffix != ".safetensors":
        raise typer.BadParameter("the output file name must end in .safetensors", param_hint="OUTPUT")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise typer.BadParameter(f"use one of {', '.join(DTYPE_NAMES)}", param_hint="--dtype")
    if output.exists() and not force:
        raise typer.BadParameter(f"{output} exists (use --force to overwrite)", param_hint="OUTPUT")
    from ..hub import resolve_model_option

    resolved = resolve_model_option(source, offline=offline)
    cfg, nbytes, seconds = convert_checkpoint(resolved.path, output, dtype)
    typer.echo(f"wrote {output}: {cfg.describe()}, {nbytes / 2**20:.1f} MiB in {seconds:.1f} s", err=True)


def convert_checkpoint(source, output, dtype: str | None = None):
    """Read `source` (any layout), validate it and write `output` atomically.
    Returns (config, bytes written, seconds)."""
    import os
    import time

    from safetensors.torch import save_file

    from .. import __version__
    from ..checkpoint import load_checkpoint
    from ..engine import DTYPES

    t0 = time.perf_counter()
    cfg, tensors = load_checkpoint(source)
    target = DTYPES[dtype] if dtype else None
    out, seen = {}, set()
    for name in sorted(tensors):
        t = tensors[name]
        if target is not None and t.is_floating_point():
            t = t.to(target)
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # a view of a tensor already written (a split fused tensor): own copy
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    meta = {"format": "pt", "rwkv_version": cfg.version, "converted_by": f"rwkv-cli {__version__}"}
    try:
        save_file(out, str(tmp), metadata=meta)
        umask = os.umask(0)  # safetensors creates the file 0600; give it the mode any new file gets
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return cfg, output.stat().st_size, time.perf_counter() - t0
