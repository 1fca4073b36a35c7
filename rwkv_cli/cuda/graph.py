"""Decoding steps replayed from CUDA graphs, so small models are not bound by launch latency.

A `GraphStep` owns static buffers for one batch size B: token ids, logits and a state held in two
flat tensors (the shift vectors in the activation dtype, the WKV state in fp32). Its step (the
fused kernels of `decode.py`, or the PyTorch path when they are unavailable) updates that state in
place and is captured once. A call copies the caller's state in (nothing to copy when it is the
state the previous call returned), replays the graph, and hands out *copies*: fresh logits and a
fresh State whose tensors are views of two new flat tensors. States given out earlier are never
touched again, so snapshots stay valid (the engine's functional contract).
"""

from __future__ import annotations

import os
import sys
import weakref
from collections import OrderedDict

import torch

from ..state import RWKV4LayerState, RWKV7LayerState, State

MAX_GRAPHS = 4  # batch sizes kept captured at once (least recently used dropped)


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
        att, ffn = act[:, 0].unbind(0), act[:, 1].unbind(0)
        if self.cfg.version == "7":
            layers = [RWKV7LayerState(a, w, f) for a, w, f in zip(att, f32.unbind(0), ffn)]
        else:
            layers = [RWKV4LayerState(a, n, d, m, f) for a, (n, d, m), f in zip(att, (t.unbind(0) for t in f32.unbind(0)), ffn)]
        st = State(self.cfg.version, layers)
        st._flat = (act, f32)  # marks a state laid out by this class
        return st

    def matches(self, state: State) -> bool:
        flat = getattr(state, "_flat", None)
        return flat is not None and flat[0].shape == self.act_shape and flat[1].shape == self.f32_shape \
            and flat[0].dtype == self.dtype and flat[0].device == self.device

    def copy_into(self, dst: State, src: State) -> None:
        if self.matches(src) and self.matches(dst):
            dst._flat[0].copy_(src._flat[0])
            dst._flat[1].copy_(src._flat[1])
            return
        pairs = [(d, s) for d, s in zip(dst.tensors(), src.tensors())]
        for d, s in pairs:
            if d.shape != s.shape:
                raise ValueError(f"state tensor of shape {list(s.shape)} where {list(d.shape)} was expected")
        dsts, srcs = [d for d, _ in pairs], [s.to(device=d.device, dtype=d.dtype) for d, s in pairs]
        torch._foreach_copy_(dsts, srcs)


class GraphStep:
    """The decoding step of `net` for B sequences, captured as a CUDA graph (or run eagerly if
    capture fails). Call with token ids [B, 1] and a State; returns (fp32 logits [B, V], State)."""

    def __init__(self, net, B: int, use_graph: bool = True):
        from . import decode, loader

        cfg = net.cfg
        self.layout = FlatState(cfg, B, net.dtype, net.device)
        self.state = self.layout.state(*self.layout.empty())
        for t in self.state.tensors():
            t.zero_()
        self.tokens = torch.zeros(B, dtype=torch.long, device=net.device)
        self.logits = torch.zeros(B, cfg.vocab_size, dtype=torch.float32, device=net.device)
        K = loader.kernels_for(net.device)
        step = decode.build_step(net, K, self.state, self.tokens, self.logits) if K is not None else None
        self.backend = "cuda" if step is not None else "torch"
        self.run = step or self._torch_step(net)
        self.graph = None
        self._last = None
        if use_graph:
            self.graph = self._capture()

    def _torch_step(self, net):
        def step():
            logits, new = net.forward_torch(self.tokens.view(-1, 1), self.state)
            self.logits.copy_(logits)
            torch._foreach_copy_(list(self.state.tensors()), list(new.tensors()))

        return step

    def _capture(self):
        saved = [t.clone() for t in self.state.tensors()]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy module loads, cuBLAS handles, allocator pools
                    self.run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.run()
            return graph
        except Exception as e:  # noqa: BLE001 - replaying eagerly is always correct
            print(f"rwkv-cli: CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "decoding without graphs", file=sys.stderr)
            return None
        finally:
            torch._foreach_copy_(list(self.state.tensors()), saved)

    def __call__(self, tokens: torch.Tensor, state: State):
        last = self._last() if self._last is not None else None
        if state is not last:
            self.layout.copy_into(self.state, state)
        self.tokens.copy_(tokens.view(-1))
        if self.graph is not None:
            self.graph.replay()
        else:
            self.run()
        act, f32 = self.layout.empty()
        act.copy_(self.state._flat[0])
        f32.copy_(self.state._flat[1])
        out = self.layout.state(act, f32)
        self._last = weakref.ref(out)
        return self.logits.clone(), out


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
