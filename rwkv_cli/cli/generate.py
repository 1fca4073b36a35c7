"""`rwkv generate`: pipe-friendly completion. Text to stdout as it is generated, the rest to stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import app
from . import common as c

# Fields a --batch line may set, besides "prompt" and "id".
BATCH_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "penalty_decay", "seed", "max_tokens", "stop", "ban_tokens")


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt ('-' or none: read stdin). With piped stdin, this text goes first, as an instruction.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the prompt from this file.", rich_help_panel="Input")] = None,
    batch: Annotated[Path | None, typer.Option("--batch", help="JSONL file, one {\"prompt\": ...} per line; writes one JSON line per input, in order.", rich_help_panel="Input")] = None,
    batch_size: Annotated[int, typer.Option(min=0, help="Sequences decoded together with --batch (0: 8 on CPU, 64 on GPU).", rich_help_panel="Input")] = 0,
    state: Annotated[Path | None, typer.Option("--state", help="Start from this state file (rwkv state save / chat --state); the prompt may then be empty. With --batch, every prompt starts from it. Without -m, the model it was saved with is loaded.", rich_help_panel="Input")] = None,
    save_state: Annotated[Path | None, typer.Option("--save-state", help="Save the state after generating (to continue later).", rich_help_panel="Output")] = None,
    model: c.Model = None,
    revision: c.Revision = None,
    offline: c.Offline = False,
    device: c.Device = "auto",
    dtype: c.Dtype = "auto",
    max_tokens: c.MaxTokens = 256,
    temperature: c.Temperature = None,
    top_p: c.TopP = None,
    top_k: c.TopK = None,
    min_p: c.MinP = None,
    presence_penalty: c.Presence = None,
    frequency_penalty: c.Frequency = None,
    penalty_decay: c.Decay = None,
    seed: c.Seed = None,
    stop: c.Stop = None,
    ban_token: c.Ban = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going past the end-of-text token.", rich_help_panel="Sampling")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (text, tokens, finish_reason, timings) instead of streaming.", rich_help_panel="Output")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No loading line or stats on stderr.", rich_help_panel="Output")] = False,
) -> None:
    """Generate text from a prompt (argument, stdin, --file), or for many prompts with --batch.

    \b
    Examples:
      rwkv generate -m rwkv7-g1-0.4b "The capital of France is"
      cat notes.txt | rwkv generate "Summarise these notes:" -n 200
      rwkv generate --batch prompts.jsonl --temp 0 > answers.jsonl
    """
    from ..sampling import GENERATE_DEFAULTS

    flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty,
                 frequency_penalty=frequency_penalty, penalty_decay=penalty_decay, seed=seed,
                 ban_tokens=tuple(ban_token) if ban_token else None)
    params = c.sampling_params(GENERATE_DEFAULTS, **flags)
    if batch is not None:
        if prompt is not None or file is not None:
            raise typer.BadParameter("--batch takes its prompts from the file; give no prompt or --file")
        if save_state is not None:
            raise typer.BadParameter("--save-state saves one sequence's state; --batch runs many")
        lines = _read_batch_file(batch)
        net, tok = c.load_model_for_cli(model, revision, offline, device, dtype, quiet, state_file=state)
        _check_banned_ids(params, net.cfg.vocab_size)
        initial = None
        if state is not None:  # every prompt starts from it: many questions about one document
            from ..statefile import load_state

            initial = load_state(state, net).state
        size = batch_size or (64 if net.device.type == "cuda" else 8)
        _run_batch(net, tok, lines, params, max_tokens, tuple(stop or ()), size, not ignore_eos, initial)
        return
    text = _prompt_text(prompt, file, allow_empty=state is not None)
    if save_state is not None:  # before the work, not after it
        from ..statefile import check_save_target

        check_save_target(save_state, "generate")
    net, tok = c.load_model_for_cli(model, revision, offline, device, dtype, quiet, state_file=state)
    _check_banned_ids(params, net.cfg.vocab_size)
    from ..generate import Generation

    start_state = start_logits = None
    read_before, tokens_before = "", 0  # what the starting state had read: a saved state adds to it
    created = None  # kept when the state is saved back over the file it started from
    if state is not None:
        from ..statefile import load_state

        saved = load_state(state, net)
        start_state, start_logits = saved.state, saved.logits
        if not text and start_logits is None:
            raise typer.BadParameter(f"{state} holds no logits to continue from; give a prompt")
        tokens_before = int(saved.meta.get("tokens") or 0)
        if saved.meta.get("kind") in ("prompt", "generate"):  # a chat's text is its transcript instead
            read_before = str(saved.meta.get("text") or "")
        if save_state is not None and save_state.resolve() == state.resolve():
            created = saved.meta.get("created")
    gen = Generation(net, tok, tok.encode(text) if text else [], params, max_tokens, tuple(stop or ()),
                     stop_at_eos=not ignore_eos, state=start_state, logits=start_logits)
    out = sys.stdout
    try:
        for piece in gen:
            if not as_json:
                out.write(piece)
                out.flush()
    except KeyboardInterrupt:
        gen.finish_reason = "interrupted"
        out.flush()
        c.err("\n[interrupted]")
        if as_json:
            print(json.dumps(gen.as_dict(), ensure_ascii=False))
        raise typer.Exit(130) from None
    if as_json:
        print(json.dumps(gen.as_dict(), ensure_ascii=False))
    elif out.isatty():
        out.write("\n")
    if save_state is not None:
        from ..statefile import save_state as write_state

        write_state(save_state, gen.state, net, logits=gen.logits, kind="generate", tokenizer=getattr(tok, "name", "unknown"),
                    tokens=tokens_before + len(gen.prompt_ids) + len(gen.tokens), text=read_before + text + gen.text,
                    transcript=[], created=created)
        if not quiet:
            c.err(f"state saved to {save_state}")
    if not quiet:
        c.err(f"[{gen.finish_reason}] {gen.timings.summary()}")


def _check_banned_ids(params, vocab_size: int) -> None:
    """--ban-token ids against the vocabulary, known once the model is loaded: a usage error."""
    try:
        params.check_vocab(vocab_size)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _prompt_text(prompt: str | None, file: Path | None, allow_empty: bool = False) -> str:
    from ..errors import RWKVError

    stdin = c.read_stdin_text()
    if prompt == "-":
        if stdin is None:
            raise typer.BadParameter("'-' means read the prompt from stdin, but stdin is a terminal")
        prompt = None
    parts = []
    if prompt:
        parts.append(c.utf8_argument(prompt, "the prompt argument"))
    if file is not None and str(file) == "-":  # as `rwkv state save -f -`
        if stdin is None:
            raise typer.BadParameter("--file - reads stdin, but stdin is a terminal")
        parts.append(stdin)
        stdin = None
    elif file is not None:
        try:
            parts.append(file.read_bytes().decode("utf-8"))
        except OSError as e:
            raise RWKVError(f"{file}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise RWKVError(f"{file}: not valid UTF-8 (at byte {e.start})") from None
    if stdin:
        parts.append(stdin)
    text = "\n\n".join(parts)
    if not text.strip() and not (allow_empty and not text):
        raise typer.BadParameter("empty prompt: give it as an argument, on stdin, or with --file", param_hint="PROMPT")
    return text


def _read_batch_file(path: Path) -> list[str]:
    from ..errors import RWKVError

    try:
        return path.read_bytes().decode("utf-8").splitlines()
    except OSError as e:
        raise RWKVError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RWKVError(f"{path}: not valid UTF-8 (at byte {e.start})") from None


def _parse_batch_line(line: str, tok, params, max_tokens: int, stop: tuple, vocab_size: int):
    """One JSONL line -> (id, BatchRequest); raises ValueError with a message for the error line."""
    from ..generate import BatchRequest

    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(item, dict):
        raise ValueError("each line must be a JSON object with a \"prompt\"")
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("missing or empty \"prompt\" (a string)")
    unknown = set(item) - {"prompt", "id", *BATCH_FIELDS}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    overrides = {k: item[k] for k in BATCH_FIELDS if k in item and k not in ("max_tokens", "stop")}
    try:
        line_params = params.with_overrides(**overrides)
        line_params.check_vocab(vocab_size)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e)) from None
    n = item.get("max_tokens", max_tokens)
    stops = item.get("stop", stop)
    stops = (stops,) if isinstance(stops, str) else stops
    if not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) and x for x in stops):
        raise ValueError("stop must be a string or a list of non-empty strings")
    if not isinstance(n, int) or isinstance(n, bool) or n < -1:
        raise ValueError("max_tokens must be an integer >= -1 (-1: until a stop)")
    return item.get("id"), BatchRequest(tok.encode(prompt), line_params, n, tuple(stops))


def _run_batch(net, tok, lines: list[str], params, max_tokens: int, stop: tuple, batch_size: int, stop_at_eos: bool,
               initial=None) -> None:
    """Write one JSON line per input line, in input order, as soon as each one (and those
    before it) are done. Bad lines get an error object; the others still run."""
    from ..generate import generate_batch

    outputs: dict[int, dict] = {}
    requests, where = [], []
    for n, line in enumerate(lines):
        if not line.strip():
            outputs[n] = {"error": "empty line"}
            continue
        try:
            ident, req = _parse_batch_line(line, tok, params, max_tokens, stop, net.cfg.vocab_size)
        except ValueError as e:
            outputs[n] = {"error": str(e)}
            continue
        outputs[n] = {"id": ident} if ident is not None else {}
        requests.append(req)
        where.append(n)
    pending = set(where)
    next_line = 0

    def emit_ready():
        nonlocal next_line
        while next_line < len(lines) and next_line not in pending:
            print(json.dumps({**outputs[next_line], "line": next_line + 1}, ensure_ascii=False), flush=True)
            next_line += 1

    emit_ready()
    for i, result in generate_batch(net, tok, requests, batch_size, stop_at_eos, initial):
        n = where[i]
        outputs[n] = {**outputs[n], **result}
        pending.discard(n)
        emit_ready()
