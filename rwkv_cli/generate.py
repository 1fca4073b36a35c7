"""Text generation on top of the engine: streaming for one prompt, batched for many.

    gen = Generation(model, tokenizer, tokenizer.encode("The capital of France is"), params, max_tokens=50)
    for text in gen:          # text arrives as soon as it is complete UTF-8 and cannot be a stop string
        print(text, end="")
    gen.finish_reason, gen.state  # "stop" / "length" / "interrupted"; the state after the last token

The state is only ever replaced by the result of a completed step, so after a Ctrl-C the
Generation still holds a consistent state and the text printed so far.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .decoding import DecodeLoop
from .engine import Model
from .sampling import Sampler, SamplingParams, uncounted_tokens
from .state import State


class StopMatcher:
    """Streams text, holding back any tail that could begin a stop string; cuts at the first stop."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """New text in; text that is now safe to show out. Sets `stopped` at a stop string."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = 0  # longest tail of pending that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


@dataclass
class Timings:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0

    def as_dict(self) -> dict:
        rate = lambda n, s: round(n / s, 2) if s > 0 else None  # noqa: E731
        return {
            "prompt_tokens": self.prompt_tokens,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "prefill_tokens_per_second": rate(self.prompt_tokens, self.prefill_seconds),
            "generated_tokens": self.generated_tokens,
            "decode_seconds": round(self.decode_seconds, 4),
            "decode_tokens_per_second": rate(self.generated_tokens, self.decode_seconds),
        }

    def summary(self) -> str:
        d = self.as_dict()
        return (
            f"prompt {d['prompt_tokens']} tok @ {d['prefill_tokens_per_second'] or 0:.1f} tok/s · "
            f"gen {d['generated_tokens']} tok @ {d['decode_tokens_per_second'] or 0:.1f} tok/s"
        )


@dataclass
class Generation:
    """One prompt's generation; iterate it for text. `max_tokens < 0` means until a stop."""

    model: Model
    tokenizer: object
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    state: State | None = None  # the state to continue from (None: a fresh sequence)
    logits: torch.Tensor | None = None  # with a state and no prompt: the logits that state ends with
    count_every_token: bool = False  # True: ChatRWKV chat's penalties; False: PIPELINE's (spaces, digits uncounted)

    def __post_init__(self):
        # the state and logits before the last token fed (e.g. before a stop string's last token)
        self.prev_state: State | None = None
        self.prev_logits: torch.Tensor | None = None
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.timings = Timings(prompt_tokens=len(self.prompt_ids))

    def __iter__(self) -> Iterator[str]:
        model, tok = self.model, self.tokenizer
        if self.prompt_ids:
            t0 = time.perf_counter()
            self.logits, self.state = model.forward([self.prompt_ids], self.state)
            self.timings.prefill_seconds = time.perf_counter() - t0
        elif self.logits is None:
            raise ValueError("nothing to generate from: give prompt tokens, or a state with its logits")
        # penalties count generated tokens only, as in PIPELINE.generate
        sampler = Sampler([self.params], model.cfg.vocab_size, device=self.logits.device,
                          uncounted=() if self.count_every_token else uncounted_tokens(tok))
        detok, stops = tok.detokenizer(), StopMatcher(self.stop)
        eos = getattr(tok, "eos_id", 0) if self.stop_at_eos else None
        t0 = time.perf_counter()
        # each step's state is queued before its token reaches the host (decoding.py); it is taken
        # only once the token is known to continue the text
        steps = DecodeLoop(model, sampler, self.logits, self.state)
        while self.max_tokens < 0 or len(self.tokens) < self.max_tokens:
            sampled, logits, state = next(steps)
            token = sampled[0]
            if token == eos:
                self.finish_reason = "stop"
                break
            self.prev_logits, self.prev_state = self.logits, self.state
            self.logits, self.state = logits, state
            self.tokens.append(token)
            self.timings.generated_tokens += 1
            self.timings.decode_seconds = time.perf_counter() - t0
            out = stops.feed(detok.push(token))
            if out:
                self.text += out
                yield out
            if stops.stopped:
                self.finish_reason = "stop"
                break
        else:
            self.finish_reason = "length"
        self.timings.decode_seconds = time.perf_counter() - t0
        rest = stops.feed(detok.flush()) + stops.flush()
        if rest:
            self.text += rest
            yield rest

    def run(self) -> str:
        """Generate to the end; returns the text."""
        for _ in self:
            pass
        return self.text

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            "timings": self.timings.as_dict(),
        }


@dataclass
class BatchRequest:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int = 256
    stop: tuple[str, ...] = ()


def generate_batch(model: Model, tokenizer, requests: list[BatchRequest], batch_size: int = 8, stop_at_eos: bool = True,
                   initial: State | None = None):
    """Generate for many prompts, `batch_size` sequences decoding together through the batched
    engine. Prompts are prefilled one by one (they differ in length; an RNN cannot pad), each
    from `initial` (one sequence's state, e.g. a document read once; None: the zero state), then
    the group decodes in lockstep, dropping sequences as they finish. Yields (index, result dict)
    in completion order; results have the fields of `Generation.as_dict`."""
    eos = getattr(tokenizer, "eos_id", 0) if stop_at_eos else None
    for start in range(0, len(requests), batch_size):
        group = list(range(start, min(start + batch_size, len(requests))))
        states, logits, timings = [], [], {}
        for i in group:
            t0 = time.perf_counter()
            lg, st = model.forward([requests[i].prompt_ids], initial)  # `initial` is not modified
            timings[i] = Timings(len(requests[i].prompt_ids), time.perf_counter() - t0)
            states.append(st)
            logits.append(lg)
        state, logits = State.cat(states), torch.cat(logits)
        sampler = Sampler([requests[i].params for i in group], model.cfg.vocab_size, device=logits.device,
                          uncounted=uncounted_tokens(tokenizer))
        active = list(group)
        detoks = {i: tokenizer.detokenizer() for i in group}
        stops = {i: StopMatcher(requests[i].stop) for i in group}
        out = {i: {"tokens": [], "text": ""} for i in group}
        t0 = time.perf_counter()
        steps = DecodeLoop(model, sampler, logits, state)
        while active:
            tokens, _, _ = next(steps)
            keep, finished = [], []
            for row, (i, token) in enumerate(zip(active, tokens, strict=False)):
                req, res = requests[i], out[i]
                if token == eos:
                    res["finish_reason"] = "stop"
                    finished.append(i)
                    continue
                res["tokens"].append(token)
                res["text"] += stops[i].feed(detoks[i].push(token))
                if stops[i].stopped:
                    res["finish_reason"] = "stop"
                    finished.append(i)
                elif 0 <= req.max_tokens <= len(res["tokens"]):
                    res["finish_reason"] = "length"
                    finished.append(i)
                else:
                    keep.append(row)
            for i in finished:
                res = out[i]
                res["text"] += stops[i].feed(detoks[i].flush()) + stops[i].flush()
                tm = timings[i]
                tm.generated_tokens, tm.decode_seconds = len(res["tokens"]), time.perf_counter() - t0
                yield i, {**res, "timings": tm.as_dict()}
            if not keep:
                break
            if len(keep) < len(active):
                steps.select(keep)
                active = [active[r] for r in keep]
