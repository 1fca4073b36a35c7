"""`rwkv state save|show`: read a document or system prompt once, keep the state, reuse it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import app
from . import common as c

state_app = typer.Typer(help="Save and inspect state files (a read prompt or a conversation, resumable).", no_args_is_help=True)
app.add_typer(state_app, name="state")


@state_app.command("save")
def save(
    output: Annotated[Path, typer.Option("--output", "-o", help="The state file to write.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Text to read into the state.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the text from this file ('-': stdin).")] = None,
    model: c.Model = None,
    revision: c.Revision = None,
    offline: c.Offline = False,
    device: c.Device = "auto",
    dtype: c.Dtype = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Read TEXT once and save the model's state after it: `rwkv generate --state` and
    `rwkv chat --state` then start from there without reading it again.

    \b
    Examples:
      rwkv state save -m rwkv7-g1-0.4b -f manual.txt -o manual.rwkvstate
      rwkv generate --state manual.rwkvstate "Q: How do I reset the device?\\nA:"
    """
    import time

    from ..errors import RWKVError
    from ..statefile import check_save_target, save_state

    if prompt is not None and file is not None:
        raise typer.BadParameter("give one of --prompt or --file, not both")
    if prompt is None and file is None:  # piped text, as `rwkv generate` reads it
        if sys.stdin is None or sys.stdin.isatty():
            raise typer.BadParameter("give --prompt, --file, or pipe the text on stdin")
        file = Path("-")
    check_save_target(output, "prompt")  # before the model is loaded and the text read, not after
    if file is not None:
        text = c.read_stdin_text() if str(file) == "-" else _read_text(file)
        if text is None:
            raise typer.BadParameter("--file - reads stdin, but stdin is a terminal")
    else:
        text = c.utf8_argument(prompt, "--prompt")
    if not text:
        raise typer.BadParameter("the text is empty")
    net, tok = c.load_model_for_cli(model, revision, offline, device, dtype, quiet)
    ids = tok.encode(text)
    t0 = time.perf_counter()
    try:
        logits, state = net.forward([ids])
    except KeyboardInterrupt:
        raise RWKVError("interrupted; nothing was saved") from None
    seconds = time.perf_counter() - t0
    save_state(output, state, net, logits=logits, kind="prompt", tokenizer=getattr(tok, "name", "unknown"),
               tokens=len(ids), text=text, transcript=[])
    if not quiet:
        c.err(f"read {len(ids)} tokens in {seconds:.1f} s ({len(ids) / max(seconds, 1e-9):.0f} tok/s); "
              f"state {state.nbytes / 1e6:.2f} MB -> {output}")


def _read_text(path: Path) -> str:
    from ..errors import RWKVError

    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise RWKVError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RWKVError(f"{path}: not valid UTF-8 (at byte {e.start})") from None


@state_app.command("show")
def show(
    path: Annotated[Path, typer.Argument(help="A state file.")],
    as_json: Annotated[bool, typer.Option("--json", help="All metadata as JSON.")] = False,
    full: Annotated[bool, typer.Option("--full", help="The whole transcript or text, not a preview.")] = False,
) -> None:
    """Print a state file's metadata and a preview of its transcript or text."""
    from ..statefile import read_meta

    meta = read_meta(path)
    shapes = meta.pop("_shapes", {})
    if as_json:
        print(json.dumps(meta, ensure_ascii=False, indent=2))
        return
    m = meta["model"]
    arch = m.get("architecture") or {}
    state_values = sum(_numel(s) for k, s in shapes.items() if k != "logits")
    rows = [
        ("file", str(path)),
        ("kind", meta.get("kind", "?")),
        ("model", f"{m.get('source')} (fingerprint {m.get('fingerprint')})"),
        ("architecture", f"RWKV-{arch.get('version')}, {arch.get('n_layer')} layers, width {arch.get('n_embd')}"),
        ("tokens read", meta.get("tokens")),
        ("state", f"{state_values * 4 / 1e6:.2f} MB ({state_values:,} values)"),
        ("created", meta.get("created")),
        ("updated", meta.get("updated")),
    ]
    if meta.get("system"):
        rows.append(("system", meta["system"]))
    for key, value in rows:
        print(f"{key:>13}: {value}")
    transcript = meta.get("transcript") or []
    if transcript:
        shown = transcript if full else transcript[-3:]
        print(f"\ntranscript ({len(transcript)} exchanges{'' if full or len(transcript) <= 3 else ', last 3'}):")
        for ex in shown:
            print(f">>> {_preview(ex.get('user', ''), full)}\n{_preview(ex.get('assistant', '').strip(), full)}")
    elif meta.get("text"):
        print(f"\ntext: {_preview(meta['text'], full, 300)}")


def _numel(shape) -> int:
    n = 1
    for d in shape or []:
        n *= d
    return n


def _preview(text: str, full: bool, limit: int = 200) -> str:
    if full or len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text)} characters)"

