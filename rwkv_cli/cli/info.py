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
    from ..ops import cpu_matmul_backend, packs_bf16_weights

    typer.echo(f"rwkv-cli {__version__}, Python {platform.python_version()}, torch {torch.__version__}")
    backend = cpu_matmul_backend()
    detail = {"numpy": "NumPy decoding steps, oneDNN prompt products", "numpy-blas": "NumPy decoding steps and prompt products",
              "torch": "torch throughout"}[backend]
    typer.echo(f"CPU threads: {torch.get_num_threads()}, CPU fp32 products: {backend} ({detail})")
    bf16 = ("oneDNN, weights packed at load; NumPy decoding steps" if packs_bf16_weights()
            else "torch (this CPU or backend gives oneDNN no packed bf16 weights)")
    typer.echo(f"CPU bf16 products: {bf16}")
    if torch.cuda.is_available():
        from ..cuda import describe_backend

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        typer.echo(f"CUDA {torch.version.cuda}: {props.name} (sm_{props.major}{props.minor}, "
                   f"{props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s))")
        typer.echo(f"GPU kernel backend: {describe_backend()}")
    else:
        built = "torch built without CUDA" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        typer.echo(f"CUDA: not available ({built}); GPU kernel backend: none (CPU only)")
