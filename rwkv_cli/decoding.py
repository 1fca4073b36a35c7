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
from .sampling import Sampler
from .state import State


class _HostIds:
    """Checked ids [B] (`sampling.checked_ids`: -1 where a row's logits were not finite), copied
    to pinned host memory on a stream of their own (the copy engine's work stays off the compute
    stream's path to the next step); `wait` returns them as ints."""

    def __init__(self, B: int):
        self.pinned = torch.zeros(B, dtype=torch.long, pin_memory=True)
        self.stream = torch.cuda.Stream()
        self.ready, self.done = torch.cuda.Event(), torch.cuda.Event()
        self.B = B

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
        self.host = None  # a _HostIds per batch size, on a GPU

    def __iter__(self):
        return self

    def __next__(self) -> tuple[list[int], torch.Tensor, State]:
        logits = self.logits
        with cpu_forward_threads(logits):  # no fight with BLAS's spinning threads
            # on a GPU the tokens go straight into the buffer the next step reads
            tokens, checked = self.sampler.sample_checked(logits, self.model.step_input(logits.shape[0]))
        if logits.device.type != "cuda":
            ids = checked.tolist()
            if min(ids) < 0:
                raise non_finite_error(self.model.dtype)
            self.logits, self.state = self.model.step(tokens, self.state)
            return ids, self.logits, self.state
        if self.host is None or self.host.B != tokens.shape[0]:
            self.host = _HostIds(tokens.shape[0])
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
