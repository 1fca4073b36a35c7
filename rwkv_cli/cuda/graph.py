"""Decoding steps replayed from CUDA graphs, so small models are not bound by launch latency.

A `GraphStep` serves one batch size B. It owns static token ids and logits, and a small pool of
state buffers, each a State laid out in two flat tensors (the shift vectors in the activation
dtype, the WKV state in fp32). A step reads one buffer and writes another (the fused kernels of
`decode.py`, or the PyTorch path when they are unavailable), and is captured once per (source,
destination) pair. The State handed out *is* the destination buffer: no copy. A buffer is written
again only once nothing outside holds any of its tensors (storage use counts tell), so states
given out earlier never change (the engine's functional contract). A decoding loop that drops
each state when it gets the next ping-pongs between two buffers and two graphs; a state the caller
keeps (a chat snapshot) makes its buffer leave the pool, and a new one takes its place.
"""

from __future__ import annotations

import gc
import os
from collections import OrderedDict

import torch

from ..errors import notice
from ..state import RWKV4LayerState, RWKV7LayerState, State

MAX_GRAPHS = 4  # batch sizes kept captured at once (least recently used dropped)

_SIDE_STREAMS: dict[tuple, torch.cuda.Stream] = {}


def side_stream(device, role: str) -> torch.cuda.Stream:
    """One stream per device and role ("capture": graph warm-ups and captures; "lora": batched
    decoding's LoRA branch), shared by every graph: each stream that runs a cuBLAS product gets a
    workspace of its own (32 MiB on Hopper) that stays allocated, so a new stream per capture
    added 64 MiB a graph (v7 0.1B, 8 sequences: 234 MiB beyond the weights)."""
    device = torch.device(device)
    key = (device.index if device.index is not None else torch.cuda.current_device(), role)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[key]


class FlatBackedState(State):
    """A State laid out by `FlatState` in two flat tensors; its per-layer views are made on first
    use (a decoding loop that only passes states back in never needs them: making ~3L views cost
    more host time per token than the step's kernels at 0.1B)."""

    def __init__(self, layout: FlatState, act: torch.Tensor, f32: torch.Tensor):
        self.version, self._layout, self._flat, self._layers = layout.cfg.version, layout, (act, f32), None

    @property
    def layers(self) -> list:
        if self._layers is None:
            self._layers = self._layout.layers(*self._flat)
        return self._layers

    @property
    def batch_size(self) -> int:
        return self._flat[0].shape[2]

    @property
    def device(self) -> torch.device:
        return self._flat[0].device


class FlatState:
    """The layout of a State as two flat tensors: act [L, 2, B, C] (att_shift, ffn_shift) and
    fp32 [L, B, H, N, N] (v7 wkv) or [L, 3, B, A] (v4 num, den, max)."""

    def __init__(self, cfg, B: int, dtype, device):
        self.cfg, self.B, self.dtype, self.device = cfg, B, dtype, device
        L, C = cfg.n_layer, cfg.n_embd
        self.act_shape = (L, 2, B, C)
        self.f32_shape = (L, B, cfg.n_head, cfg.head_size, cfg.head_size) if cfg.version == "7" else (L, 3, B, cfg.dim_att)

    def empty(self):
        return (torch.empty(self.act_shape, dtype=self.dtype, device=self.device),
                torch.empty(self.f32_shape, dtype=torch.float32, device=self.device))

    def state(self, act, f32) -> State:
        return FlatBackedState(self, act, f32)

    def layers(self, act, f32) -> list:
        att, ffn = act[:, 0].unbind(0), act[:, 1].unbind(0)
        if self.cfg.version == "7":
            return [RWKV7LayerState(a, w, f) for a, w, f in zip(att, f32.unbind(0), ffn, strict=False)]
        return [RWKV4LayerState(a, n, d, m, f) for a, (n, d, m), f in zip(att, (t.unbind(0) for t in f32.unbind(0)), ffn, strict=False)]

    def matches(self, state: State) -> bool:
        flat = getattr(state, "_flat", None)
        return flat is not None and flat[0].shape == self.act_shape and flat[1].shape == self.f32_shape \
            and flat[0].dtype == self.dtype and flat[0].device == self.device

    def copy_into(self, dst: State, src: State) -> None:
        if self.matches(src) and self.matches(dst):
            dst._flat[0].copy_(src._flat[0])
            dst._flat[1].copy_(src._flat[1])
            return
        pairs = [(d, s) for d, s in zip(dst.tensors(), src.tensors(), strict=False)]
        for d, s in pairs:
            if d.shape != s.shape:
                raise ValueError(f"state tensor of shape {list(s.shape)} where {list(d.shape)} was expected")
        dsts, srcs = [d for d, _ in pairs], [s.to(device=d.device, dtype=d.dtype) for d, s in pairs]
        torch._foreach_copy_(dsts, srcs)


MAX_BUFFERS = 3  # state buffers per batch size (a loop needs two; the third spares a re-capture)


def _users(flat) -> list[int]:
    """How many tensors share each flat tensor's storage (views included)."""
    return [torch._C._storage_Use_Count(t.untyped_storage()._cdata) for t in flat]


class _Buffer:
    """One buffer of the pool: a flat state (act, f32) and the logits of the step that wrote it.
    `idle` counts the tensors of ours that share their storage (the pool's, and views that prepared
    steps point into): more means someone holds it. Outputs are handed out as fresh aliases, so a
    caller's references always show in the counts."""

    def __init__(self, layout: FlatState, slot: int, vocab_size: int):
        act, f32 = layout.empty()
        logits = torch.zeros(layout.B, vocab_size, dtype=torch.float32, device=act.device)
        self.flat, self.slot = (act, f32, logits), slot
        self.idle = _users(self.flat)

    def free(self) -> bool:
        return _users(self.flat) == self.idle

    def outputs(self, layout: FlatState):
        act, f32, logits = (t.view(t.shape) for t in self.flat)
        return logits, layout.state(act, f32)


class GraphStep:
    """The decoding step of `net` for B sequences, captured as CUDA graphs (or run eagerly if
    capture fails). Call with token ids [B, 1] (on any device) and a State; returns
    (fp32 logits [B, V], new State)."""

    def __init__(self, net, B: int, use_graph: bool = True):
        self.net, self.use_graph = net, use_graph
        self.layout = FlatState(net.cfg, B, net.dtype, net.device)
        self.tokens = torch.zeros(B, dtype=torch.long, device=net.device)
        if net.device.type == "cuda":  # ids from the host go through pinned memory: no synchronous copy
            self.tokens_host = torch.zeros(B, dtype=torch.long, pin_memory=True)
            self.tokens_copied = torch.cuda.Event()  # the pinned ids may be rewritten once it has passed
        self.K = net._kernels()  # None: the model's PyTorch step (no kernels for this version, or none loaded)
        self.backend = "cuda" if self.K is not None else "torch"
        self.buffers: list[_Buffer] = []
        # (src slot, dst slot) -> (replay or step function, views it holds per slot)
        self.steps: dict[tuple[int, int], tuple[object, dict[int, list[int]]]] = {}

    # -- buffers ---------------------------------------------------------------------------------
    def _free_buffer(self, exclude: _Buffer | None) -> _Buffer:
        for buf in self.buffers:
            if buf is not exclude and buf.free():
                return buf
        if len(self.buffers) < MAX_BUFFERS:
            self.buffers.append(_Buffer(self.layout, len(self.buffers), self.net.cfg.vocab_size))
            return self.buffers[-1]
        old = next(b for b in self.buffers if b is not exclude)
        return self._replace(old)

    def _replace(self, old: _Buffer) -> _Buffer:
        """`old` is held outside: it leaves the pool (its holders keep it alive) for a new buffer,
        and the steps pointing into it go, with the views they held of their other buffer."""
        for key in [k for k in self.steps if old.slot in k]:
            _, held = self.steps.pop(key)
            for slot, counts in held.items():
                if slot != old.slot:
                    buf = self.buffers[slot]
                    buf.idle = [i - c for i, c in zip(buf.idle, counts, strict=False)]
        self.buffers[old.slot] = _Buffer(self.layout, old.slot, self.net.cfg.vocab_size)
        return self.buffers[old.slot]

    def _buffer_of(self, state: State) -> _Buffer | None:
        flat = getattr(state, "_flat", None)
        if flat is not None:
            for buf in self.buffers:
                if buf.flat[0].data_ptr() == flat[0].data_ptr() and buf.flat[1].data_ptr() == flat[1].data_ptr() \
                        and buf.flat[0].shape == flat[0].shape:
                    return buf
        return None

    # -- steps -----------------------------------------------------------------------------------
    def _step(self, src: _Buffer, dst: _Buffer):
        key = (src.slot, dst.slot)
        if key not in self.steps:
            before = {b.slot: _users(b.flat) for b in (src, dst)}
            src_state, dst_state, logits = self.layout.state(*src.flat[:2]), self.layout.state(*dst.flat[:2]), dst.flat[2]
            for st in (src_state, dst_state):  # lazy views made now: those the step keeps count as its own
                st.layers  # noqa: B018
            if self.K is not None:
                from . import decode

                run = decode.build_step(self.net, self.K, src_state, dst_state, self.tokens, logits)
            else:
                run = self._torch_step(src_state, dst_state, logits)
            graph = self._capture(run, src) if self.use_graph else None
            del src_state, dst_state, logits
            gc.collect()  # builders hold reference cycles: count only the views that stay
            held = {b.slot: [a - c for a, c in zip(_users(b.flat), before[b.slot], strict=False)] for b in (src, dst)}
            for b in (src, dst):
                b.idle = [i + c for i, c in zip(b.idle, held[b.slot], strict=False)]
            self.steps[key] = (graph.replay if graph is not None else run, held)
        return self.steps[key][0]

    def _torch_step(self, src: State, dst: State, logits_out: torch.Tensor):
        dst_tensors = list(dst.tensors())

        def step():
            logits, new = self.net.forward_torch(self.tokens.view(-1, 1), src)
            logits_out.copy_(logits)
            torch._foreach_copy_(dst_tensors, list(new.tensors()))

        return step

    def _capture(self, run, src: _Buffer):
        saved = [t.clone() for t in src.flat[:2]]  # the warm-up must leave the source as it was
        try:
            side = side_stream(self.net.device, "capture")  # warm-up and capture on one stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy module loads, cuBLAS handles, allocator pools
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                run()
            graph.keep_alive = run  # buffers and prepared launches the graph points into
            return graph
        except Exception as e:  # noqa: BLE001 - replaying eagerly is always correct
            notice(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                   "decoding without graphs")
            self.use_graph = False
            return None
        finally:
            for t, s in zip(src.flat[:2], saved, strict=False):
                t.copy_(s)

    def _set_tokens(self, tokens: torch.Tensor) -> None:
        tokens = tokens.reshape(-1)
        if tokens.data_ptr() == self.tokens.data_ptr():
            return  # written in place by the sampler (`Model.step_input`)
        if tokens.device != self.tokens.device:
            self.tokens_copied.synchronize()
            self.tokens_host.copy_(tokens)
            self.tokens.copy_(self.tokens_host, non_blocking=True)
            self.tokens_copied.record()
        else:
            self.tokens.copy_(tokens)

    def __call__(self, tokens: torch.Tensor, state: State):
        src = self._buffer_of(state)
        if src is None:
            src = self._free_buffer(exclude=None)
            self.layout.copy_into(self.layout.state(*src.flat[:2]), state)
        dst = self._free_buffer(exclude=src)
        self._set_tokens(tokens)
        self._step(src, dst)()
        return dst.outputs(self.layout)


class GraphCache:
    """GraphSteps by batch size, least recently used dropped past MAX_GRAPHS."""

    def __init__(self, net):
        self.net = net
        self.steps: OrderedDict[int, GraphStep] = OrderedDict()
        self.use_graph = os.environ.get("RWKV_CUDA_GRAPHS", "1") != "0"

    def get(self, B: int) -> GraphStep:
        step = self.steps.pop(B, None)
        if step is None:
            if len(self.steps) >= MAX_GRAPHS:
                self.steps.popitem(last=False)
            step = GraphStep(self.net, B, self.use_graph)
        self.steps[B] = step
        return step
