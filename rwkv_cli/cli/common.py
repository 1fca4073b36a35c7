"""Options and helpers shared by the commands that run a model (`generate`, `chat`, `state`).

Typer options are declared once here (as `Annotated` types) so every command spells and
documents them the same way. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..hub import MODEL_HELP

Model = Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP, rich_help_panel="Model")]
Revision = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).", rich_help_panel="Model")]
Offline = Annotated[bool, typer.Option("--offline", help="Use only the local Hugging Face cache.", rich_help_panel="Model")]


def _device_choice(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def _dtype_choice(value: str) -> str:
    if value not in ("auto", "fp32", "bf16", "fp16"):
        raise typer.BadParameter(f"{value!r} is not one of auto, fp32, bf16, fp16")
    return value


Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: the GPU when there is one).",
                                     callback=_device_choice, rich_help_panel="Model")]
Dtype = Annotated[str, typer.Option(
    help="auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, or bf16 if only that fits in memory; fp16 on GPU. "
         "bf16 on a CPU: half the memory, faster with AVX512-BF16, not bit-exact).",
    callback=_dtype_choice, rich_help_panel="Model")]

MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=-1, help="Tokens to generate (-1: until a stop).", rich_help_panel="Sampling")]
Temperature = Annotated[float | None, typer.Option("--temperature", "--temp", help="0 = greedy.", rich_help_panel="Sampling")]
TopP = Annotated[float | None, typer.Option("--top-p", help="Nucleus cut-off (applied before temperature).", rich_help_panel="Sampling")]
TopK = Annotated[int | None, typer.Option("--top-k", help="Keep the k most likely tokens (0: off).", rich_help_panel="Sampling")]
MinP = Annotated[float | None, typer.Option("--min-p", help="Drop tokens below min_p x the top probability.", rich_help_panel="Sampling")]
Presence = Annotated[float | None, typer.Option("--presence-penalty", help="Subtracted once a token has appeared.", rich_help_panel="Sampling")]
Frequency = Annotated[float | None, typer.Option("--frequency-penalty", help="Subtracted per (decayed) occurrence.", rich_help_panel="Sampling")]
Decay = Annotated[float | None, typer.Option("--penalty-decay", help="Occurrence counts decay by this per token.", rich_help_panel="Sampling")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed (same seed, same output).", rich_help_panel="Sampling")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text (repeatable; not printed).", rich_help_panel="Sampling")]
Ban = Annotated[list[int] | None, typer.Option("--ban-token", help="Never sample this token id (repeatable).", rich_help_panel="Sampling")]


def err(message: str) -> None:
    """A diagnostic line on stderr (stdout carries only generated text)."""
    print(message, file=sys.stderr, flush=True)


def sampling_params(defaults: dict, **flags):
    """SamplingParams from the family defaults, overridden by the flags the user gave."""
    from ..sampling import SamplingParams

    try:
        return SamplingParams(**defaults).with_overrides(**{k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def load_model_for_cli(model: str | None, revision: str | None, offline: bool, device: str, dtype: str,
                       quiet: bool = False, tokenizer: bool = True, state_file=None):
    """Resolve the spec and load the weights (`Model.source` set to how the spec resolved) and,
    unless `tokenizer=False`, the model's tokenizer. Returns (model, tokenizer or None).

    Without -m, an existing `state_file` names the model: the one it was saved with (a state
    works only with its own weights), before $RWKV_MODEL and the default."""
    from ..engine import load_model
    from ..errors import RWKVError
    from ..hub import resolve_model_option
    from ..tokenizer import load_tokenizer_for

    recorded = model is None and state_file is not None and Path(state_file).is_file()
    if recorded:
        model, saved_source = _model_of_state(state_file)
        recorded = model is not None
    try:
        resolved = resolve_model_option(model, offline=offline, revision=revision)
    except RWKVError as e:
        if not recorded:
            raise
        raise RWKVError(f"{state_file} was saved with {saved_source}, which cannot be loaded here ({e}); "
                        "give -m") from None
    loaded = load_model(resolved.path, device=device, dtype=dtype)
    loaded.source, loaded.spec = resolved.source, resolved.exact_spec
    tok = load_tokenizer_for(resolved.path, loaded.cfg.vocab_size, offline=offline or None) if tokenizer else None
    if not quiet:
        dtype_name = str(loaded.dtype).replace("torch.", "")
        how = f" (the model of {state_file})" if recorded else ""
        err(f"loaded {resolved.source}{how}: {loaded.cfg.describe()} on {loaded.device} {dtype_name} "
            f"({loaded.load_seconds:.1f} s)")
    return loaded, tok


def _model_of_state(path) -> tuple[str | None, str]:
    """(spec to load, source for messages) of the model a state file was saved with. Files from
    before `spec` was recorded give None: their source may be a path relative to another folder,
    so $RWKV_MODEL or the default apply, as then (the fingerprint check still guards)."""
    from ..statefile import read_meta

    identity = read_meta(path)["model"]
    return identity.get("spec"), str(identity.get("source") or "an unnamed model")


def utf8_argument(text: str | None, what: str) -> str | None:
    """A command-line argument as text, or a one-line error: bytes that are not UTF-8 reach
    Python's argv as lone surrogates, which no tokenizer can encode."""
    from ..errors import RWKVError

    try:
        text is None or text.encode("utf-8")
    except UnicodeEncodeError:
        raise RWKVError(f"{what} is not valid UTF-8") from None
    return text


def read_stdin_text() -> str | None:
    """Piped stdin as text (None when stdin is a terminal); invalid UTF-8 is a one-line error."""
    from ..errors import RWKVError

    if sys.stdin is None or sys.stdin.isatty():
        return None
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RWKVError(f"stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
