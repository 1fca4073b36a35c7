"""A chat conversation as a recurrent state, with snapshots for undo, retry and continue.

The whole conversation lives in the model's fixed-size state. Every exchange keeps references to
the states around it (states are never modified in place, so a snapshot costs nothing): /undo and
/retry restore one instead of re-reading history, and take the same time after 5 turns or 500.

Prompt format for World and G1 models (`rwkv-models.md` §15):
    System: {system}\\n\\n            (optional, once)
    User: {message}\\n\\nAssistant:     (the model writes " {reply}\\n\\n"; "\\n\\n" ends the turn)
With think mode on, the assistant turn starts with "Assistant: <think"; with it off (G1 "fake
think"), with "Assistant: <think>\\n</think". End-of-text (id 0) is suppressed in replies.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import torch

from .generate import Generation
from .sampling import SamplingParams
from .state import State

TURN_END = "\n\n"
END_OF_TEXT = 0
SNAPSHOT_BUDGET = 1 << 30  # bytes of undo/retry snapshots: ~200 turns at 0.1B, ~38 at 1.5B, ~14 at 7.2B


@dataclass
class Exchange:
    """One user message and the reply, with the states that /undo, /retry and /continue use."""

    user: str
    reply: str = ""
    interrupted: bool = False
    prompt_tokens: int = 0  # tokens the user turn added to the state
    reply_tokens: int = 0  # tokens the reply added
    snapshots: bool = False  # False for exchanges restored from a file or trimmed
    before: State | None = field(default=None, repr=False)  # state before the user's message
    pre_reply: tuple | None = field(default=None, repr=False)  # (state, logits) after "Assistant:"
    pre_end: tuple | None = field(default=None, repr=False)  # (state, logits) before the turn end


def normalize_message(text: str) -> str:
    """User text as the model was trained to see it: no CR, no surrounding space, no blank lines
    (a blank line would end the turn)."""
    return re.sub(r"\n{2,}", "\n", text.replace("\r\n", "\n").replace("\r", "\n").strip())


class ChatSession:
    """A conversation with one model. Iterate `send(message)` for the reply's text."""

    def __init__(self, model, tokenizer, params: SamplingParams, *, system: str | None = None,
                 think: bool | None = None, raw: bool = False, max_tokens: int = 1024, keep_turns: int | None = None,
                 init_state: State | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.params = params
        self.think, self.raw, self.max_tokens = think, raw, max_tokens
        if keep_turns is None:  # two snapshots per exchange, within SNAPSHOT_BUDGET bytes
            per_turn = 2 * 4 * model.cfg.state_numel()
            keep_turns = max(4, min(256, SNAPSHOT_BUDGET // per_turn))
        self.keep_turns = keep_turns
        self.init_state = init_state
        self.system = system
        self.reset()

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the start: the initial (or tuned) state plus the system prompt."""
        self.exchanges: list[Exchange] = []
        self.state: State | None = self.init_state
        self.logits = None
        self.tokens_consumed = 0
        if self.system and not self.raw:
            ids = self.tokenizer.encode(f"System: {normalize_message(self.system)}{TURN_END}")
            self.logits, self.state = self.model.forward([ids], self.state)
            self.tokens_consumed = len(ids)

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self.reset()

    def _trim(self) -> None:
        """Keep snapshots for the last `keep_turns` exchanges; /continue needs one only for the last."""
        for ex in self.exchanges[:-1]:
            ex.pre_end = None
        for ex in self.exchanges[: -self.keep_turns]:
            ex.snapshots, ex.before, ex.pre_reply = False, None, None

    # -- turns ----------------------------------------------------------------------------------
    def _assistant_prefix(self) -> str:
        if self.think is True:
            return "Assistant: <think"
        if self.think is False:
            return "Assistant: <think>\n</think"
        return "Assistant:"

    def _turn_prompt(self, message: str) -> str:
        if self.raw:
            return message
        lead = TURN_END if self.exchanges and self.exchanges[-1].interrupted else ""
        return f"{lead}User: {normalize_message(message)}{TURN_END}{self._assistant_prefix()}"

    def _reply_params(self, extra_bans: tuple[int, ...] = ()) -> SamplingParams:
        return replace(self.params, ban_tokens=tuple(self.params.ban_tokens) + (END_OF_TEXT,) + extra_bans)

    def send(self, message: str) -> Iterator[str]:
        """Add the user's message and stream the reply. Interrupting the iteration (Ctrl-C) keeps
        the partial reply and the state after it; the next turn first closes it with a blank line."""
        if not message.strip():
            raise ValueError("empty message")
        ids = self.tokenizer.encode(self._turn_prompt(message))
        ex = Exchange(user=message, prompt_tokens=len(ids), snapshots=True, before=self.state)
        logits, state = self.model.forward([ids], self.state)
        ex.pre_reply = (state, logits)
        self.state, self.logits = state, logits
        self.tokens_consumed += len(ids)
        self.exchanges.append(ex)
        self._trim()
        yield from self._generate(ex, state, logits)

    def _generate(self, ex: Exchange, state: State, logits: torch.Tensor, first_bans: tuple[int, ...] = ()) -> Iterator[str]:
        stops = () if self.raw else (TURN_END,)
        ex.interrupted = True  # until the reply ends normally
        if first_bans:  # one token with extra bans, then the normal loop
            head = Generation(self.model, self.tokenizer, [], self._reply_params(first_bans), 1, (), False, state, logits, True)
            yield from self._follow(ex, head)
            state, logits = head.state, head.logits
        gen = Generation(self.model, self.tokenizer, [], self._reply_params(), self.max_tokens, stops, False, state, logits, True)
        yield from self._follow(ex, gen)
        if gen.finish_reason == "stop":
            ex.interrupted = False
            ex.pre_end = (gen.prev_state, gen.prev_logits)
        # "length": the reply hit the token limit; it stays open, and the next turn closes it

    def _follow(self, ex: Exchange, gen: Generation) -> Iterator[str]:
        """Stream a Generation into the exchange, keeping the session's state current even if the
        consumer stops early (Ctrl-C)."""
        try:
            for piece in gen:
                ex.reply += piece
                yield piece
        finally:
            counted = len(gen.tokens)
            self.state, self.logits = gen.state, gen.logits
            self.tokens_consumed += counted
            ex.reply_tokens += counted

    def undo(self) -> Exchange | None:
        """Drop the last exchange by restoring the state before it (None: nothing to undo here)."""
        if not self.exchanges or not self.exchanges[-1].snapshots:
            return None
        ex = self.exchanges.pop()
        self.state, self.logits = ex.before, None
        self.tokens_consumed -= ex.prompt_tokens + ex.reply_tokens
        return ex

    def retry(self) -> Iterator[str]:
        """Sample the last reply again from the state just after the user's message."""
        if not self.exchanges or not self.exchanges[-1].snapshots:
            raise ValueError("nothing to retry in this session")
        ex = self.exchanges[-1]
        state, logits = ex.pre_reply
        self.tokens_consumed -= ex.reply_tokens
        ex.reply, ex.reply_tokens, ex.pre_end = "", 0, None
        self.state, self.logits = state, logits
        yield from self._generate(ex, state, logits)

    def continue_reply(self) -> Iterator[str]:
        """Extend the last reply: from just before its closing blank line (or from where it was
        interrupted), with the tokens that would end it again banned for the first step."""
        if not self.exchanges:
            raise ValueError("nothing to continue")
        ex = self.exchanges[-1]
        if ex.interrupted and self.logits is not None:
            state, logits = self.state, self.logits
        elif not ex.interrupted and ex.pre_end is not None:
            state, logits = ex.pre_end
            self.tokens_consumed -= 1  # the token that closed the turn is taken back
            ex.reply_tokens -= 1
        else:
            raise ValueError("the last reply cannot be continued in this session")
        ends = tuple(t for t in (self._single_token(TURN_END), self._single_token("\n")) if t is not None)
        yield from self._generate(ex, state, logits, first_bans=ends)

    def _single_token(self, text: str) -> int | None:
        ids = self.tokenizer.encode(text)
        return ids[0] if len(ids) == 1 else None

    # -- persistence ----------------------------------------------------------------------------
    def transcript(self) -> list[dict]:
        return [{"user": ex.user, "assistant": ex.reply, **({"interrupted": True} if ex.interrupted else {})} for ex in self.exchanges]

    def metadata(self) -> dict:
        return {
            "kind": "chat",
            "tokenizer": getattr(self.tokenizer, "name", "unknown"),
            "tokens": self.tokens_consumed,
            "system": self.system,
            "think": self.think,
            "raw": self.raw,
            "transcript": self.transcript(),
            "sampling": asdict(self.params),
        }

    def restore(self, state: State, meta: dict, logits: torch.Tensor | None = None) -> None:
        """Continue a saved conversation: its state, transcript and settings (no snapshots for
        the restored exchanges: /undo and /retry reach back to where this session started)."""
        self.system, self.think, self.raw = meta.get("system"), meta.get("think"), bool(meta.get("raw"))
        self.exchanges = [Exchange(user=t.get("user", ""), reply=t.get("assistant", ""), interrupted=bool(t.get("interrupted")))
                          for t in meta.get("transcript") or []]
        self.state, self.logits, self.tokens_consumed = state, logits, int(meta.get("tokens") or 0)
