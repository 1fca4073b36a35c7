"""`rwkv show` and `rwkv env`: describe a checkpoint and the runtime."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app


@app.command()
def show(path: Path = typer.Argument(..., help="A checkpoint file (.pth or .safetensors).")) -> None:
    """Describe a checkpoint: version, layers, width, heads, vocab, tokenizer and state size.

    [bold]Examples[/bold]
      rwkv show RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth
    """
    from ..checkpoint import load_checkpoint

    cfg, tensors = load_checkpoint(path)
    params = sum(t.numel() for t in tensors.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    rows = [
        ("file", str(path)),
        ("architecture", cfg.name),
        ("layers", cfg.n_layer),
        ("width", cfg.n_embd),
        ("heads", f"{cfg.n_head} x {cfg.head_size}" if cfg.n_head else "-"),
        ("ffn width", cfg.ffn_dim),
        ("vocab", cfg.vocab_size),
        ("tokenizer", cfg.tokenizer),
        ("parameters", f"{params / 1e6:.1f}M"),
        ("dtype", ", ".join(dtypes)),
        ("file size", f"{path.stat().st_size / 1e6:.1f} MB"),
        ("state per sequence", f"{cfg.state_numel() * 4 / 1e6:.2f} MB (fp32)"),
    ]
    if cfg.lora:
        rows.insert(6, ("LoRA ranks", ", ".join(f"{k}={v}" for k, v in cfg.lora.items())))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


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
