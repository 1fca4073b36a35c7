"""The decoding loop, with the GPU kept one step ahead of the host.

    loop = DecodeLoop(model, sampler, logits, state)   # logits/state: after the prompt
    for ids, logits, state in loop:   # ids: the tokens drawn from the previous logits, as ints
        ...                           # logits/state: after feeding `ids` (already queued)

A step draws tokens from the last logits on the device, queues their copy to the host, and then
queues the model's step on those same device-side tokens *before* waiting for the copy. So while
the host reads the ids, detokenizes, matches stop strings and launches the next step, the device
is already running the step that the ids feed: the host's time per token (Python, launches, the
read-back, about 0.2 ms) hides behind the device's instead of adding to it. On the CPU the same
loop runs step by step.

The step queued for a token that ends generation (end-of-text) is wasted work; the consumer
simply does not take its state. The state the loop hands out is always the state after exactly
the tokens handed out, so a consumer that stops (or is interrupted) between steps keeps a
consistent state.
"""

from __future__ import annotations

import torch

from .engine import Model, non_finite_error
from .ops import cpu_forward_threads
from .sampling import Sampler, SamplingParams
from .state import State


class _HostIds:
    """Checked ids [B] (`sampling.checked_ids`: -1 where a row's logits were not finite), copied
    to pinned host memory on a stream of their own (the copy engine's work stays off the compute
    stream's path to the next step); `wait` returns them as ints."""

    def __init__(self, B: int):
        self.pinned = torch.zeros(B, dtype=torch.long, pin_memory=True)
        self.stream = torch.cuda.Stream()
        self.ready, self.done = torch.cuda.Event(), torch.cuda.Event()

    def queue(self, ids: torch.Tensor) -> None:
        self.ready.record()  # the ids are computed once the work queued so far has run
        self.stream.wait_event(self.ready)
        with torch.cuda.stream(self.stream):
            self.pinned.copy_(ids, non_blocking=True)
            self.done.record()
        ids.record_stream(self.stream)  # the allocator must not hand out its memory before the copy

    def wait(self) -> list[int]:
        self.done.synchronize()
        return self.pinned.tolist()


class DecodeLoop:
    """Yields (ids [B] as ints, logits [B, V] and the State after feeding those ids) per step.

    `select(rows)` keeps only those sequences (the others finished) for the following steps."""

    def __init__(self, model: Model, sampler: Sampler, logits: torch.Tensor, state: State):
        self.model, self.sampler, self.logits, self.state = model, sampler, logits, state
        # per batch size, set on the first step and when rows drop: on a GPU the buffer the next
        # step reads its ids from (the sampler writes them there) and the ids' read-back
        self.batch, self.step_input, self.host = 0, None, None

    @classmethod
    def greedy(cls, model: Model, logits: torch.Tensor, state: State) -> DecodeLoop:
        """Argmax decoding, no penalties: what the benchmarks time."""
        params = SamplingParams(temperature=0, presence_penalty=0, frequency_penalty=0)
        return cls(model, Sampler([params] * logits.shape[0], model.cfg.vocab_size, device=logits.device), logits, state)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[list[int], torch.Tensor, State]:
        logits = self.logits
        if self.batch != logits.shape[0]:
            self.batch, self.step_input = logits.shape[0], self.model.step_input(logits.shape[0])
            self.host = _HostIds(self.batch) if logits.is_cuda else None
        with cpu_forward_threads(logits, rows=logits.shape[0]):  # no fight with BLAS's spinning threads
            tokens, checked = self.sampler.sample_checked(logits, self.step_input)
        if self.host is None:  # the CPU: step by step
            ids = checked.tolist()
            if min(ids) < 0:
                raise non_finite_error(self.model.dtype)
            self.logits, self.state = self.model.step(tokens, self.state)
            return ids, self.logits, self.state
        self.host.queue(checked)
        # queued now, before the wait: the device runs this step while the host reads the ids
        # (`tokens` are valid ids even for a non-finite row, so the queued step is harmless)
        next_logits, next_state = self.model.step(tokens, self.state)
        ids = self.host.wait()
        if min(ids) < 0:
            raise non_finite_error(self.model.dtype)
        self.logits, self.state = next_logits, next_state
        return ids, next_logits, next_state

    def select(self, rows: list[int]) -> None:
        """Keep only sequences `rows` (indices into the current batch), in this order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.logits.device)
        self.logits, self.state = self.logits[index], self.state.select(index)
        self.sampler.select(rows)
