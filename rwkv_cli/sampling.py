"""Sampling: ChatRWKV's decaying penalties and nucleus sampling, batched over B sequences.

Order per step, as in BlinkDL's `PIPELINE` (`rwkv-models.md` §16): banned tokens get -inf; each
seen token n loses presence + count[n] * frequency; then softmax; top-p (ties at the cut-off
survive), top-k and min-p truncation at temperature 1; temperature as p^(1/T) on what is left;
one draw from what is left (inverse transform sampling with a uniform number from the sequence's
own seeded RNG). Temperature 0 is greedy. After each draw every count decays by
`penalty_decay` and the drawn token's count grows by 1. Every parameter can differ per sequence.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace

import torch

from .errors import RWKVError

# PIPELINE_ARGS defaults of BlinkDL's `rwkv` package: for raw completion.
GENERATE_DEFAULTS = dict(temperature=1.0, top_p=0.85, top_k=0, presence_penalty=0.2, frequency_penalty=0.2)
# Chat defaults: ChatRWKV's API_DEMO_CHAT.py for RWKV-7 / World models, v2/chat.py for Pile-era models.
CHAT_DEFAULTS = {
    "world": dict(temperature=1.0, top_p=0.3, top_k=0, presence_penalty=0.5, frequency_penalty=0.5),
    "pile": dict(temperature=1.2, top_p=0.5, top_k=0, presence_penalty=0.4, frequency_penalty=0.4),
}


CANDIDATES = (256, 4096)  # partial sorts tried before a full sort of the vocabulary


class SamplingError(RWKVError, ValueError):
    """A sampling parameter that is unusable. A ValueError, which the commands turn into a usage
    error; where none does, an RWKVError still reaches the user as one line."""


_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "penalty_decay")
# Parameters live in float32 on the device, where presence + count * frequency and 1/T must stay
# finite: beyond this, no value changes the result anyway (logits are far smaller).
_MAX_MAGNITUDE = 1e30


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0: off
    presence_penalty: float = 0.2
    frequency_penalty: float = 0.2
    penalty_decay: float = 0.996
    seed: int | None = None  # None: random
    ban_tokens: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        # Values also come from JSONL lines, /set and state files, not only from typed flags.
        for name in _FLOATS:
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise SamplingError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise SamplingError(f"{name} must be a finite number, got {value}")
            if type(value) not in (int, float):  # e.g. numpy scalars: plain floats for torch.tensor
                object.__setattr__(self, name, float(value))
        for name, what in (("top_k", "an integer"), ("seed", "an integer or None")):
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            if not _is_int(value):
                raise SamplingError(f"{name} must be {what}, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy integers too: random.Random takes only int
        bans = self.ban_tokens
        if isinstance(bans, (str, bytes, bytearray)) or not isinstance(bans, Iterable):
            raise SamplingError(f"ban_tokens must be a list of token ids, got {bans!r}")
        bans = tuple(bans)
        for t in bans:
            if not _is_int(t):
                raise SamplingError(f"ban_tokens must hold integer token ids, got {t!r}")
            if t < 0:
                raise SamplingError(f"ban_tokens must hold token ids >= 0, got {t}")
        object.__setattr__(self, "ban_tokens", tuple(map(int, bans)))
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.temperature <= _MAX_MAGNITUDE, "temperature must be at most 1e30"),
            (abs(self.presence_penalty) <= _MAX_MAGNITUDE, "presence_penalty must lie in [-1e30, 1e30]"),
            (abs(self.frequency_penalty) <= _MAX_MAGNITUDE, "frequency_penalty must lie in [-1e30, 1e30]"),
            (0 <= self.top_p <= 1, "top_p must lie in [0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must lie in [0, 1]"),
            (0 <= self.penalty_decay <= 1, "penalty_decay must lie in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(message)

    def with_overrides(self, **overrides) -> SamplingParams:
        """A copy with the given (non-None) fields replaced; unknown names raise ValueError."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise SamplingError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def check_vocab(self, vocab_size: int) -> None:
        """Raise SamplingError if a banned id is not a token of a `vocab_size` vocabulary."""
        if self.ban_tokens and max(self.ban_tokens) >= vocab_size:
            bad = next(t for t in self.ban_tokens if t >= vocab_size)
            raise SamplingError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def uncounted_tokens(tokenizer) -> tuple[int, ...]:
    """Tokens that `PIPELINE.generate` penalises for presence but does not count for frequency:
    those whose text is a piece of " \t0123456789" (spaces, tabs, digits), and end-of-text."""
    chars = " \t0123456789"
    pieces = {chars[i:j] for i in range(len(chars)) for j in range(i + 1, len(chars) + 1)}
    ids = {ids[0] for ids in map(tokenizer.encode, pieces) if len(ids) == 1}
    if tokenizer.decode([0]) == "":
        ids.add(0)
    return tuple(sorted(ids))


def _host_to(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for it (pinned memory, asynchronous copy):
    a plain copy to a GPU waits for all the work queued before it."""
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t


def _kernels(logits: torch.Tensor):
    """The fused CUDA kernels for these logits' GPU, or None (CPU; kernels unavailable or off)."""
    if not logits.is_cuda:
        return None
    from .cuda.loader import kernels_for

    return kernels_for(logits.device)


def checked_ids(logits: torch.Tensor, sampled: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """What a decoding step reads back: fp32 logits [B, V] and the drawn ids [B] (None: each
    row's argmax) -> (tokens [B], ids [B]), where ids are the tokens with -1 for rows holding a
    NaN or infinite logit; with `out`, the tokens are written there (and returned as it). On a
    GPU with the fused kernels, one launch (kernels/sampling.cu); otherwise `checked_ids_torch`,
    its twin."""
    if logits.dtype == torch.float32 and logits.is_contiguous():
        K = _kernels(logits)
        if K is not None:
            from .cuda import kops

            return kops.checked_ids(K, logits, sampled, out)
    return checked_ids_torch(logits, sampled, out)


def checked_ids_torch(logits: torch.Tensor, sampled: torch.Tensor | None = None, out: torch.Tensor | None = None):
    tokens = logits.argmax(-1) if sampled is None else sampled
    if out is not None:
        tokens = out.copy_(tokens)
    return tokens, torch.where(torch.isfinite(logits).all(-1), tokens, -1)


class Sampler:
    """Samples one token per sequence per step, keeping each sequence's penalty counts."""

    def __init__(self, params: list[SamplingParams], vocab_size: int, device="cpu", uncounted: tuple[int, ...] = ()):
        self.params = list(params)
        self.vocab_size = vocab_size
        for p in self.params:
            p.check_vocab(vocab_size)
        self.weight = torch.ones(vocab_size, device=device)  # how much one occurrence counts
        self.weight[[t for t in uncounted if 0 <= t < vocab_size]] = 0.0
        B = len(self.params)
        col = lambda name, dtype=torch.float32: torch.tensor(  # noqa: E731
            [getattr(p, name) for p in self.params], dtype=dtype, device=device
        ).view(B, 1)
        self.top_p, self.min_p = col("top_p"), col("min_p")
        # k >= V keeps every token, as k = 0 does; a larger k would not fit in an int64
        self.top_k = torch.tensor([min(p.top_k, vocab_size) for p in self.params], dtype=torch.long,
                                  device=device).view(B, 1)
        self.presence, self.frequency, self.decay = col("presence_penalty"), col("frequency_penalty"), col("penalty_decay")
        self.counts = torch.zeros(B, vocab_size, device=device)
        self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        self.ban = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(self.params):
            self.ban[b, list(p.ban_tokens)] = True
        # temperatures as exponents 1/T (greedy rows: 0); draws come from one host RNG per
        # sequence (its seed), so a step's draws for every row reach the device in one copy
        self.inv_temp = torch.tensor([1.0 / p.temperature if p.temperature else 0.0 for p in self.params],
                                     device=device).view(B, 1)
        self.rngs = [random.Random(p.seed) for p in self.params]  # seed None: from os.urandom
        self._flags()

    def _flags(self) -> None:
        """Which work the current rows need: penalties and counts only where some row penalises,
        bans only where some row bans, and no softmax or sort when every row is greedy."""
        self.penalizes = any(p.presence_penalty or p.frequency_penalty for p in self.params)
        self.bans = any(p.ban_tokens for p in self.params)
        self.all_greedy = all(p.temperature == 0 for p in self.params)

    def select(self, rows: list[int]) -> None:
        """Keep only these sequences (others finished), in this order."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.counts.device)
        for name in ("top_p", "top_k", "min_p", "presence", "frequency", "decay", "counts", "seen", "ban", "inv_temp"):
            setattr(self, name, getattr(self, name)[idx])
        self.params = [self.params[i] for i in rows]
        self.rngs = [self.rngs[i] for i in rows]
        self._flags()

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after bans and decaying presence/frequency penalties."""
        logits = logits[:, : self.vocab_size].float()
        if self.penalizes:
            logits = logits - torch.where(self.seen, self.presence + self.counts * self.frequency, 0.0)
        return logits.masked_fill(self.ban, float("-inf")) if self.bans else logits

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Draw one token per sequence from logits [B, V]; updates the penalty counts. -> [B]

        Every row is handled by the same batched operations (a fixed number of launches per step
        on a GPU, whatever B), and nothing waits for a GPU: the draws are uniform numbers from each
        sequence's host RNG, turned into tokens by inverse transform sampling on the device."""
        if self.all_greedy:  # softmax keeps the order: greedy rows take the argmax of the logits
            tokens = self.penalized(logits).argmax(-1)
            self.record(tokens)
            return tokens
        K = _kernels(logits)
        if K is not None:
            return self._sample_fused(K, logits)
        logits = self.penalized(logits)
        B, dev = logits.shape[0], logits.device
        sampled = [b for b, p in enumerate(self.params) if p.temperature != 0]
        tokens = logits.argmax(-1) if len(sampled) < B else torch.empty(B, dtype=torch.long, device=dev)
        probs = torch.softmax(logits, -1)
        u = self._uniforms(dev)
        # Truncation needs only the head of the sorted distribution. On the CPU, take the top
        # CANDIDATES first (a partial sort, ~25x cheaper than sorting 65k probabilities), widening
        # only for rows whose kept set might extend past them. A GPU sorts everything in one call.
        V = probs.shape[-1]
        tiers = (*CANDIDATES, V) if probs.device.type == "cpu" else (V,)
        rows = _host_to(torch.tensor(sampled), dev)  # rows still to draw
        every = len(sampled) == B  # rows are all rows: no gathers
        for k in tiers:
            last = k >= V
            p = probs if every else probs[rows]
            top_p, top_i = p.sort(-1, descending=True) if last else p.topk(k, -1)
            kept, complete = self._truncate(top_p, None if every else rows, check_complete=not last)
            done = slice(None) if last else torch.tensor(complete)  # the CPU's tiers only
            u_rows, inv_temp = (u, self.inv_temp) if every else (u[rows], self.inv_temp[rows])
            tokens[rows[done]] = self._draw(kept[done], top_i[done], u_rows[done], inv_temp[done])
            if last or bool(done.all()):
                break
            rows, every = rows[~done], False
        self.record(tokens)
        return tokens

    def _sample_fused(self, K, logits: torch.Tensor) -> torch.Tensor:
        """`sample` through kernels/sampling.cu: penalties + softmax, one sort, then truncation,
        temperature, the draw and the count update in one launch (about 12 launches a step in all,
        for any B, instead of about 50)."""
        from .cuda import kops

        logits = logits[:, : self.vocab_size].float().contiguous()
        u = self._uniforms(logits.device)
        counts, seen = (self.counts, self.seen) if self.penalizes else (None, None)
        probs, argmax = kops.penalized_softmax(K, logits, counts, seen, self.ban if self.bans else None,
                                               self.presence, self.frequency)
        sorted_p, sorted_i = probs.sort(-1, descending=True)
        return kops.nucleus_draw(K, sorted_p, sorted_i, self.top_p, self.top_k, self.min_p, self.inv_temp, u, argmax,
                                 counts, seen, self.weight, self.decay)

    def _uniforms(self, device) -> torch.Tensor:
        """This step's draw per row [B], uniform in [0, 1), from each sequence's own RNG (greedy
        rows draw nothing and get 0), on `device` without waiting for it."""
        draws = [rng.random() if p.temperature else 0.0 for rng, p in zip(self.rngs, self.params, strict=True)]
        return _host_to(torch.tensor(draws, dtype=torch.float32), device)

    @staticmethod
    def _draw(kept: torch.Tensor, top_i: torch.Tensor, u: torch.Tensor, inv_temp: torch.Tensor) -> torch.Tensor:
        """Inverse transform sampling: kept [R, K] truncated probabilities (descending, zeros past
        the cut), top_i their token ids, u [R] uniform in [0, 1), inv_temp [R, 1] = 1/T applied
        after truncation (p^(1/T)). -> token ids [R]"""
        w = kept.pow(inv_temp)
        cum = w.cumsum(-1)
        at = torch.searchsorted(cum, u.view(-1, 1) * cum[:, -1:], right=True)
        at = torch.minimum(at, (w > 0).sum(-1, keepdim=True) - 1)  # u * total rounded up to total
        # every weight underflowed (a tiny T: p^(1/T) is 0 in float32): the most likely token, as
        # kernels/sampling.cu takes it
        at = at.clamp(min=0)
        return top_i.gather(-1, at).view(-1)

    def sample_checked(self, logits: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample`, and the ids as `checked_ids` gives them to the host (-1: the row's logits
        were not all finite); the tokens go into `out` when given (`Model.step_input`). Greedy
        rows with nothing to penalise or ban take both from one pass over the logits."""
        if self.all_greedy and not self.penalizes and not self.bans and logits.shape[-1] == self.vocab_size:
            return checked_ids(logits.float(), out=out)
        return checked_ids(logits.float(), self.sample(logits), out)

    def _truncate(self, sorted_p: torch.Tensor, rows: torch.Tensor | None, check_complete: bool = True):
        """sorted_p [R, K]: the K largest probabilities of rows `rows` (None: all), descending.
        Returns the kept probabilities (others zeroed) and, per row, whether the kept set surely
        lies within K (None when not asked: the check waits for the device)."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
        # top-p: the cut-off is the probability where the cumulative sum first reaches top_p
        cum = torch.cumsum(sorted_p, -1)
        top_p = pick(self.top_p)
        first = torch.searchsorted(cum, top_p.clamp(max=1.0 - 1e-6).contiguous())
        cutoff = sorted_p.gather(-1, first.clamp(max=sorted_p.shape[-1] - 1))
        cutoff = torch.where(first >= sorted_p.shape[-1], 0.0, cutoff)  # not reached within K
        # top-k: the k-th largest probability (k = 0: no limit; k beyond K: unknown here)
        top_k = pick(self.top_k)
        kth = sorted_p.gather(-1, (top_k.clamp(min=1) - 1).clamp(max=sorted_p.shape[-1] - 1))
        cutoff = torch.where((top_k > 0) & (top_k <= sorted_p.shape[-1]), torch.maximum(cutoff, kth), cutoff)
        cutoff = torch.maximum(cutoff, pick(self.min_p) * sorted_p[:, :1])
        # Every probability outside the K is <= the last one here: the set is complete when that
        # last one is already cut off (ties at the cut-off survive, so equality is not enough).
        complete = (sorted_p[:, -1:] < cutoff).view(-1).tolist() if check_complete else None
        return torch.where(sorted_p >= cutoff, sorted_p, 0.0), complete

    def record(self, tokens: torch.Tensor) -> None:
        """Decay every count, then count the drawn tokens (also used for forced tokens). Nothing to
        keep while no row penalises."""
        if not self.penalizes:
            return
        self.counts.mul_(self.decay)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.counts[rows, tokens] += self.weight[tokens]
        self.seen[rows, tokens] = True
