"""Sampling: ChatRWKV's decaying penalties and nucleus sampling, batched over B sequences.

Order per step, as in BlinkDL's `PIPELINE` (`rwkv-models.md` §16): banned tokens get -inf; each
seen token n loses presence + count[n] * frequency; then softmax; top-p (ties at the cut-off
survive), top-k and min-p truncation at temperature 1; temperature as p^(1/T) on what is left;
one multinomial draw. Temperature 0 is greedy. After each draw every count decays by
`penalty_decay` and the drawn token's count grows by 1. Every parameter can differ per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

# PIPELINE_ARGS defaults of BlinkDL's `rwkv` package: for raw completion.
GENERATE_DEFAULTS = dict(temperature=1.0, top_p=0.85, top_k=0, presence_penalty=0.2, frequency_penalty=0.2)
# Chat defaults: ChatRWKV's API_DEMO_CHAT.py for RWKV-7 / World models, v2/chat.py for Pile-era models.
CHAT_DEFAULTS = {
    "world": dict(temperature=1.0, top_p=0.3, top_k=0, presence_penalty=0.5, frequency_penalty=0.5),
    "pile": dict(temperature=1.2, top_p=0.5, top_k=0, presence_penalty=0.4, frequency_penalty=0.4),
}


CANDIDATES = (256, 4096)  # partial sorts tried before a full sort of the vocabulary


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
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 <= self.top_p <= 1, "top_p must lie in [0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must lie in [0, 1]"),
            (0 <= self.penalty_decay <= 1, "penalty_decay must lie in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def with_overrides(self, **overrides) -> SamplingParams:
        """A copy with the given (non-None) fields replaced; unknown names raise ValueError."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def uncounted_tokens(tokenizer) -> tuple[int, ...]:
    """Tokens that `PIPELINE.generate` penalises for presence but does not count for frequency:
    those whose text is a piece of " \t0123456789" (spaces, tabs, digits), and end-of-text."""
    chars = " \t0123456789"
    pieces = {chars[i:j] for i in range(len(chars)) for j in range(i + 1, len(chars) + 1)}
    ids = {ids[0] for ids in map(tokenizer.encode, pieces) if len(ids) == 1}
    if tokenizer.decode([0]) == "":
        ids.add(0)
    return tuple(sorted(ids))


def checked_ids(logits: torch.Tensor, sampled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What a decoding step reads back: fp32 logits [B, V] and the drawn ids [B] (None: each
    row's argmax) -> (tokens [B], ids [B]), where ids are the tokens with -1 for rows holding a
    NaN or infinite logit. On a GPU with the fused kernels, one launch (kernels/sampling.cu);
    otherwise `checked_ids_torch`, its twin."""
    if logits.is_cuda and logits.dtype == torch.float32 and logits.is_contiguous():
        from .cuda.loader import kernels_for

        K = kernels_for(logits.device)
        if K is not None:
            from .cuda import kops

            return kops.checked_ids(K, logits, sampled)
    return checked_ids_torch(logits, sampled)


def checked_ids_torch(logits: torch.Tensor, sampled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = logits.argmax(-1) if sampled is None else sampled
    return tokens, torch.where(torch.isfinite(logits).all(-1), tokens, -1)


class Sampler:
    """Samples one token per sequence per step, keeping each sequence's penalty counts."""

    def __init__(self, params: list[SamplingParams], vocab_size: int, device="cpu", uncounted: tuple[int, ...] = ()):
        self.params = list(params)
        self.vocab_size = vocab_size
        self.weight = torch.ones(vocab_size, device=device)  # how much one occurrence counts
        self.weight[[t for t in uncounted if 0 <= t < vocab_size]] = 0.0
        B = len(self.params)
        col = lambda name, dtype=torch.float32: torch.tensor(  # noqa: E731
            [getattr(p, name) for p in self.params], dtype=dtype, device=device
        ).view(B, 1)
        self.top_p, self.top_k, self.min_p = col("top_p"), col("top_k", torch.long), col("min_p")
        self.presence, self.frequency, self.decay = col("presence_penalty"), col("frequency_penalty"), col("penalty_decay")
        self.counts = torch.zeros(B, vocab_size, device=device)
        self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        self.ban = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(self.params):
            ids = [t for t in p.ban_tokens if 0 <= t < vocab_size]
            self.ban[b, ids] = True
        self.generators = [self._generator(p.seed, device) for p in self.params]
        self._flags()

    def _flags(self) -> None:
        """Which work the current rows need: penalties and counts only where some row penalises,
        bans only where some row bans, and no softmax or sort when every row is greedy."""
        self.penalizes = any(p.presence_penalty or p.frequency_penalty for p in self.params)
        self.bans = any(p.ban_tokens for p in self.params)
        self.all_greedy = all(p.temperature == 0 for p in self.params)

    @staticmethod
    def _generator(seed: int | None, device) -> torch.Generator:
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        return gen

    def select(self, rows: list[int]) -> None:
        """Keep only these sequences (others finished), in this order."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.counts.device)
        for name in ("top_p", "top_k", "min_p", "presence", "frequency", "decay", "counts", "seen", "ban"):
            setattr(self, name, getattr(self, name)[idx])
        self.params = [self.params[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self._flags()

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after bans and decaying presence/frequency penalties."""
        logits = logits[:, : self.vocab_size].float()
        if self.penalizes:
            logits = logits - torch.where(self.seen, self.presence + self.counts * self.frequency, 0.0)
        return logits.masked_fill(self.ban, float("-inf")) if self.bans else logits

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Draw one token per sequence from logits [B, V]; updates the penalty counts. -> [B]

        Which rows are greedy, and their temperatures, come from the host-side parameters, so a
        GPU is never waited on before the draw itself."""
        logits = self.penalized(logits)
        if self.all_greedy:  # softmax keeps the order: greedy rows take the argmax of the logits
            tokens = logits.argmax(-1)
            self.record(tokens)
            return tokens
        probs = torch.softmax(logits, -1)
        tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        greedy = [b for b, p in enumerate(self.params) if p.temperature == 0]
        rows = [b for b, p in enumerate(self.params) if p.temperature != 0]
        if greedy:
            tokens[greedy] = logits[greedy].argmax(-1)
        # Truncation needs only the head of the sorted distribution. On the CPU, take the top
        # CANDIDATES first (a partial sort, ~25x cheaper than sorting 65k probabilities), widening
        # only for rows whose kept set might extend past them. A GPU sorts everything in one call.
        tiers = (*CANDIDATES, probs.shape[-1]) if probs.device.type == "cpu" else (probs.shape[-1],)
        for k in tiers:
            if not rows:
                break
            last = k >= probs.shape[-1]
            top_p, top_i = probs[rows].topk(min(k, probs.shape[-1]), -1) if not last else probs[rows].sort(-1, descending=True)
            kept, complete = self._truncate(top_p, rows, check_complete=not last)
            for n, b in enumerate(rows):
                if last or complete[n]:
                    p = kept[n] ** (1.0 / self.params[b].temperature)  # temperature after truncation
                    tokens[b] = top_i[n, torch.multinomial(p / p.sum(), 1, generator=self.generators[b])[0]]
            rows = [] if last else [b for n, b in enumerate(rows) if not complete[n]]
        self.record(tokens)
        return tokens

    def sample_checked(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample`, and the ids as `checked_ids` gives them to the host (-1: the row's logits
        were not all finite). Greedy rows with nothing to penalise or ban take both from one
        pass over the logits."""
        if self.all_greedy and not self.penalizes and not self.bans and logits.shape[-1] == self.vocab_size:
            return checked_ids(logits.float())
        return checked_ids(logits.float(), self.sample(logits))

    def _truncate(self, sorted_p: torch.Tensor, rows: list[int], check_complete: bool = True):
        """sorted_p [R, K]: the K largest probabilities of each row, descending. Returns the kept
        probabilities (others zeroed) and, per row, whether the kept set surely lies within K
        (None when not asked: the check waits for the device)."""
        # top-p: the cut-off is the probability where the cumulative sum first reaches top_p
        cum = torch.cumsum(sorted_p, -1)
        top_p = self.top_p[rows]
        first = torch.searchsorted(cum, top_p.clamp(max=1.0 - 1e-6).contiguous())
        cutoff = sorted_p.gather(-1, first.clamp(max=sorted_p.shape[-1] - 1))
        cutoff = torch.where(first >= sorted_p.shape[-1], 0.0, cutoff)  # not reached within K
        # top-k: the k-th largest probability (k = 0: no limit; k beyond K: unknown here)
        top_k = self.top_k[rows]
        kth = sorted_p.gather(-1, (top_k.clamp(min=1) - 1).clamp(max=sorted_p.shape[-1] - 1))
        cutoff = torch.where((top_k > 0) & (top_k <= sorted_p.shape[-1]), torch.maximum(cutoff, kth), cutoff)
        cutoff = torch.maximum(cutoff, self.min_p[rows] * sorted_p[:, :1])
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
