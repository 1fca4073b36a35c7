"""`rwkv env`: describe the runtime."""

from __future__ import annotations

import typer

from . import app


@app.command()
def env() -> None:
    """Versions, devices and backends in use."""
    import platform

    import torch

    from .. import __version__
    from ..ops import cpu_matmul_backend

    typer.echo(f"rwkv-cli {__version__}, Python {platform.python_version()}, torch {torch.__version__}")
    typer.echo(f"CPU threads: {torch.get_num_threads()}, CPU fp32 matmul backend: {cpu_matmul_backend()}")
    if torch.cuda.is_available():
        typer.echo(f"CUDA {torch.version.cuda}: {torch.cuda.get_device_name()}")
    else:
        typer.echo("CUDA: not available")
