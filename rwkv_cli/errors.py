"""Errors that reach the user as one clear line (the CLI prints `error: <message>` and exits 1),
and notices: one line on stderr about something the user should know but that is not an error."""

import sys
import threading

_lock = threading.Lock()
_notices: set[str] = set()


def notice(message: str) -> None:
    """A one-line notice on stderr (stdout carries only generated text)."""
    print(f"rwkv-cli: {message}", file=sys.stderr, flush=True)


def notice_once(message: str) -> None:
    """`notice`, once per process for each message."""
    with _lock:
        if message in _notices:
            return
        _notices.add(message)
    notice(message)


class RWKVError(Exception):
    """Base class: the message is complete and user-facing; no traceback is shown for it."""


class CheckpointError(RWKVError):
    """A file that cannot be used as a checkpoint: wrong format, truncated, missing or mis-shaped tensors."""


class UnsupportedModelError(CheckpointError):
    """A recognised RWKV variant or layout that this version does not run (yet)."""


class NonFiniteError(RWKVError):
    """The model produced NaN or infinite logits (usually fp16 overflow)."""


class TokenizerError(RWKVError):
    """No usable tokenizer: unknown vocabulary, missing or unreadable tokenizer files, bad token ids."""
