"""`rwkv tokenize`: text to token ids and back, with the tokenizer a model would use."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from . import app


@app.command()
def tokenize(
    text: str | None = typer.Argument(
        None, help="Text to tokenize (token ids with --decode). Read from stdin when omitted or '-'."
    ),
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="A model (checkpoint file, folder, owner/repo[:FILE], alias: its tokenizer is chosen from "
        "its vocabulary size or a tokenizer.json beside it), a tokenizer name (world, gpt-neox-20b) "
        "or a tokenizer.json.",
    ),
    decode: bool = typer.Option(
        False, "--decode", "-d", help="Read token ids (a JSON list or whitespace-separated) and print text."
    ),
    count: bool = typer.Option(False, "--count", "-c", help="Print only the number of tokens."),
) -> None:
    """Print the token ids of TEXT as a JSON list, or with --decode the text of token ids.

    Input is used exactly as given, final newline included (echo adds one; printf does not).

    Examples:

    \b
      rwkv tokenize -m world "User: hi"
      rwkv tokenize -m RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth --count < prompt.txt
      rwkv tokenize -m world "Hello" | rwkv tokenize -m world --decode
    """
    if decode and count:
        raise typer.BadParameter("--count counts the tokens of text; it does not go with --decode")
    tok = _tokenizer_for(model)
    source = _read_input(text)
    if decode:
        from ..tokenizer import check_token_ids

        ids = _parse_ids(source)
        # every tokenizer alike: World's decode would refuse these too, a tokenizer.json's gives
        # nothing for ids past its vocabulary (a model's padding rows)
        check_token_ids(ids, tok.vocab_size)
        out = tok.decode(ids)
        sys.stdout.write(out + ("\n" if sys.stdout.isatty() else ""))
        return
    ids = tok.encode(source)
    typer.echo(len(ids) if count else json.dumps(ids))


def _read_input(text: str | None) -> str:
    from ..errors import TokenizerError

    if text is not None and text != "-":
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach argv as lone surrogates
            raise TokenizerError(f"the text argument is not valid UTF-8{_where(text, e.start)}") from None
        return text
    if sys.stdin.isatty():
        raise typer.BadParameter("give TEXT, or pipe it on stdin")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(
            f"stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


def _where(text: str, start: int) -> str:
    """' (byte 0xNN at offset K)' for the bad character at `start`, as stdin's error says it, when
    the character stands for an argv byte (Python's surrogateescape); else ''."""
    code = ord(text[start])
    if not 0xDC80 <= code <= 0xDCFF:
        return ""
    return f" (byte 0x{code - 0xDC00:02x} at offset {len(text[:start].encode('utf-8'))})"


def _parse_ids(source: str) -> list[int]:
    from ..errors import TokenizerError

    try:
        ids = json.loads(source) if source.lstrip().startswith("[") else [int(x) for x in source.split()]
    except ValueError:
        ids = None
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise TokenizerError("--decode expects token ids: a JSON list or whitespace-separated integers")
    return ids


def _tokenizer_for(model: str):
    """A tokenizer by name or tokenizer.json, else the one of the checkpoint file `model`."""
    from ..errors import CheckpointError
    from ..hub import ALIASES, resolve_model_option
    from ..tokenizer import TOKENIZER_NAMES, load_tokenizer, load_tokenizer_for

    path = Path(model)
    if model in TOKENIZER_NAMES or path.is_dir() and (path / "tokenizer.json").is_file() or path.name.endswith(".json"):
        return load_tokenizer(model)
    if not path.exists() and "/" not in model and model not in ALIASES:
        names = ", ".join(TOKENIZER_NAMES)
        raise CheckpointError(
            f"{model}: no such file or model (give a checkpoint, a model spec, a tokenizer.json, or one of: {names})"
        )
    resolved = resolve_model_option(model)  # a checkpoint file, folder, Hub spec or alias
    return load_tokenizer_for(resolved.path, _vocab_size(resolved.path))


def _vocab_size(path: Path) -> int:
    """Embedding rows of a checkpoint, read from its tensor shapes."""
    from ..checkpoint import read_shapes
    from ..config import infer_config
    from ..errors import UnsupportedModelError

    shapes = read_shapes(path)
    try:
        return infer_config(shapes).vocab_size
    except UnsupportedModelError:  # e.g. RWKV-6: not runnable yet, but its tokenizer is known
        if "emb.weight" not in shapes:
            raise
        return shapes["emb.weight"][0]
