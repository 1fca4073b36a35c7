"""`rwkv pull`, `list`, `show`, `rm`: models on disk and in the Hugging Face cache.

Also the `-m/--model`, `--revision` and `--offline` options that every command running a model
shares; such a command passes their values to `rwkv_cli.hub.resolve_model_option`.
huggingface_hub and torch are imported inside the commands, so `rwkv --help` stays instant.
"""

from __future__ import annotations

import json

import typer

from ..hub import MODEL_HELP
from . import app


def model_option(default: str | None = None):
    return typer.Option(default, "--model", "-m", help=MODEL_HELP)


def revision_option():
    return typer.Option(None, "--revision", help="Branch, tag or commit of a Hub model (default: main).")


def offline_option():
    return typer.Option(
        False, "--offline", help="Use only the Hugging Face cache, never the network (as HF_HUB_OFFLINE=1)."
    )


@app.command()
def pull(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    revision: str | None = revision_option(),
    offline: bool = offline_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; print only the path."),
) -> None:
    """Download a model into the Hugging Face cache (if needed) and print its local path.

    Examples:

    \b
      rwkv pull rwkv7-g1-1.5b
      rwkv pull BlinkDL/rwkv-7-world:RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth
      rwkv pull 'BlinkDL/rwkv7-g1:*-0.4b-*' --revision main -q
    """
    from ..hub import resolve_model

    found = resolve_model(model, revision=revision, offline=offline, progress=not quiet)
    if not quiet and found.repo_id:
        typer.echo(f"{found.source}  {_size(found.path.stat().st_size)}", err=True)
    typer.echo(str(found.path))


@app.command("list")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="One JSON array with every field."),
) -> None:
    """List the checkpoints in the Hugging Face cache, with their architecture and size.

    Examples:

    \b
      rwkv list
      rwkv list --json
    """
    from ..hub import cached_files, hub_cache_dir

    rows = [_describe(c, size) for c, size in _checkpoints(cached_files())]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(
            f"no models in the Hugging Face cache ({hub_cache_dir()}); `rwkv pull MODEL` gets one", err=True
        )
        return
    table = [("REPO", "FILE", "SIZE", "VERSION", "PARAMS", "REVISION")]
    table += [
        (r["repo"], r["file"], _size(r["size"]), r["version"], r["size_class"], r["revision"][:8])
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@app.command("ls", hidden=True)
def _ls(as_json: bool = typer.Option(False, "--json")) -> None:
    list_models(as_json)


def _checkpoints(files) -> list:
    """(cached file, size) for each checkpoint in the cache: BlinkDL files (.pth, .safetensors) one
    by one; a Hugging Face-layout snapshot as its entry point (`model.safetensors`, a shard index
    with the total size of its cached shards, or `pytorch_model.bin`), its shards not listed apart."""
    from ..checkpoint import HF_WEIGHT_FILES
    from ..errors import RWKVError
    from ..hub import CHECKPOINT_SUFFIXES, hf_shard_names

    by_snapshot: dict = {}
    for c in files:
        by_snapshot.setdefault((c.repo_id, c.commit), []).append(c)
    out = []
    for snapshot in by_snapshot.values():
        names = {c.filename: c for c in snapshot}
        shards: set = set()
        for c in snapshot:
            if c.filename.endswith(".index.json") and c.filename in HF_WEIGHT_FILES:
                try:
                    listed = hf_shard_names(c.path)
                except RWKVError:  # an unreadable index: its row says so, the shards stay listed
                    listed = []
                shards |= set(listed)
                out.append((c, sum(names[n].size for n in listed if n in names)))
        out += [(c, c.size) for c in snapshot if c.filename not in shards
                and (c.filename.endswith(CHECKPOINT_SUFFIXES) or c.filename == "pytorch_model.bin")]
    return sorted(out, key=lambda cs: (cs[0].repo_id.lower(), cs[0].filename, cs[0].commit))


def _describe(c, size: int | None = None) -> dict:
    """One `rwkv list` row; the architecture comes from tensor shapes (safetensors headers, or a
    memory-mapped .pth), so listing does not load any weights."""
    from math import prod

    from ..checkpoint import read_shapes
    from ..config import infer_config
    from ..errors import RWKVError, UnsupportedModelError

    row = {"repo": c.repo_id, "file": c.filename, "revision": c.commit, "refs": list(c.refs)}
    row.update(size=c.size if size is None else size, path=str(c.path), version="?", size_class="-", params=None)
    try:
        shapes = read_shapes(c.path)
        cfg = infer_config(shapes)
    except UnsupportedModelError as e:
        row.update(version="unsupported", error=str(e))
    except RWKVError as e:
        row.update(version="unreadable", error=str(e))
    else:
        params = sum(prod(s) for s in shapes.values())
        row.update(version=f"RWKV-{cfg.variant}", params=params, size_class=_count(params))
        row.update(layers=cfg.n_layer, width=cfg.n_embd, vocab=cfg.vocab_size, tokenizer=cfg.tokenizer)
    return row


@app.command()
def show(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    revision: str | None = revision_option(),
    offline: bool = offline_option(),
) -> None:
    """Describe a model: version, layers, width, heads, vocab, tokenizer, parameters and state size.

    Examples:

    \b
      rwkv show rwkv7-g1-0.4b
      rwkv show RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth
    """
    from ..checkpoint import load_checkpoint
    from ..hub import resolve_model_option

    found = resolve_model_option(model, offline=offline, revision=revision)
    cfg, tensors = load_checkpoint(found.path)
    params = sum(t.numel() for t in tensors.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    beside = (found.directory / "tokenizer.json").is_file()  # the tokenizer choice's first rule
    rows = [
        ("file", str(found.path)),
        ("architecture", cfg.name),
        ("layers", cfg.n_layer),
        ("width", cfg.n_embd),
        ("heads", f"{cfg.n_head} x {cfg.head_size}" if cfg.n_head else "-"),
        ("ffn width", cfg.ffn_dim),
        *([("LoRA ranks", ", ".join(f"{k}={v}" for k, v in cfg.lora.items()))] if cfg.lora else []),
        ("vocab", cfg.vocab_size),
        ("tokenizer", "tokenizer.json beside the checkpoint" if beside else cfg.tokenizer),
        ("parameters", _count(params)),
        ("dtype", ", ".join(dtypes)),
        ("file size", _size(found.path.stat().st_size)),
        ("state per sequence", f"{cfg.state_numel() * 4 / 1e6:.2f} MB (fp32)"),
    ]
    if found.repo_id:
        rows.insert(0, ("model", found.source))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


@app.command()
def rm(
    model: str = typer.Argument(
        ..., help="owner/repo (all its files), owner/repo:FILE_OR_GLOB or an alias (every cached match)."
    ),
    revision: str | None = revision_option(),
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete without asking."),
) -> None:
    """Delete cached models from the Hugging Face cache (never files outside it).

    Examples:

    \b
      rwkv rm rwkv7-g1-0.1b
      rwkv rm BlinkDL/rwkv-7-world -y
    """
    from ..hub import ModelNotFoundError, delete_cached, find_cached

    files = find_cached(model, revision)
    if not files:
        raise ModelNotFoundError(
            f"nothing in the Hugging Face cache matches {model}; `rwkv list` shows what is there"
        )
    for c in files:
        typer.echo(f"{c.repo_id}:{c.filename}  {c.commit[:8]}  {_size(c.size)}")
    if not yes:
        typer.confirm(f"Delete {len(files)} file(s) from the cache?", abort=True)
    freed = delete_cached(files)
    typer.echo(f"deleted {len(files)} file(s), freed {_size(freed)}")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _count(n: int) -> str:
    """A parameter count the way model names say it: 191M, 1.5B."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
