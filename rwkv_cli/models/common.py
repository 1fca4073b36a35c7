"""Pieces shared by every RWKV version: weight preparation, token shift, embedding and head."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .. import ops
from ..config import ModelConfig
from ..ops import linear
from ..state import State

try:
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


def token_shift(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The previous token's vector at every position: [B, T, C] -> [B, T, C], `last` [B, C] first."""
    if x.shape[1] == 1:
        return last.unsqueeze(1)
    return torch.cat([last.unsqueeze(1), x[:, :-1]], 1)


class WeightLoader:
    """Casts checkpoint tensors to the run device/dtype once, at load."""

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device):
        self.t, self.dtype, self.device = tensors, dtype, device

    def __call__(self, name: str, dtype=None, shape=None) -> torch.Tensor:
        x = self.t[name]
        if shape is not None:
            x = x.reshape(shape)
        return x.to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def fp32(self, name: str, shape=None) -> torch.Tensor:
        return self(name, torch.float32, shape)

    def stack(self, names: list[str], shape) -> torch.Tensor:
        return torch.stack([self(n, shape=shape) for n in names])


class RWKVBase:
    """Embedding, final norm and head; subclasses implement `blocks` (the layer stack)."""

    FUSED_KERNELS = False  # whether rwkv_cli/cuda has kernels for this version (RWKV-4, RWKV-7)

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        w = WeightLoader(tensors, dtype, device)
        # x_0 = LN0(emb[token]): fold LN0 into the table once (§6).
        self.emb = self._fold_ln0(tensors).to(device=device, dtype=dtype)
        self.ln_out = (w("ln_out.weight"), w("ln_out.bias"))
        self.head = w("head.weight")  # [V, C]
        self._load_blocks(w)
        self.packed = self._pack_products()

    def _fold_ln0(self, tensors) -> torch.Tensor:
        """LN0 over the embedding table, in fp32 (RWKV-7 reference: it casts before normalising)."""
        ln = (tensors["blocks.0.ln0.weight"].float(), tensors["blocks.0.ln0.bias"].float())
        return F.layer_norm(tensors["emb.weight"].float(), (self.cfg.n_embd,), *ln)

    def _load_blocks(self, w: WeightLoader) -> None:
        raise NotImplementedError

    def packed_products(self) -> tuple[str, ...]:
        """Layer fields that are only ever the weight of a product (`ops.linear`, `ops.np_linear`),
        so a bf16 CPU model may hold them as `ops.PackedWeight`s; none unless a version lists them."""
        return ()

    def _pack_products(self) -> bool:
        """bf16 on the CPU: the head and `packed_products` become `PackedWeight`s (no copy kept),
        and decoding steps run `step_numpy` on them (activations in fp32, products in bf16)."""
        names = self.packed_products()
        bf16_cpu = self.device.type == "cpu" and self.dtype == torch.bfloat16
        if not (names and bf16_cpu and ops.packs_bf16_weights()):
            return False
        self.head = ops.PackedWeight(self.head)
        for lw in self.layers:
            for name in names:
                if getattr(lw, name) is not None:  # RWKV-7's layer 0 has no value LoRA
                    setattr(lw, name, ops.PackedWeight(getattr(lw, name)))
        # A bf16 file loaded as bf16 is not copied: the other weights are still views of its memory
        # map, and any one of them keeps the whole mapping (every page the packing read) resident:
        # v7 1.5B 5.9 GiB of RSS instead of 3.0. Copies of those small tensors let it go.
        def own(v):
            if isinstance(v, tuple):
                return tuple(map(own, v))
            return v.clone() if isinstance(v, torch.Tensor) else v

        self.ln_out = own(self.ln_out)
        for lw in self.layers:
            for f in dataclasses.fields(lw):
                setattr(lw, f.name, own(getattr(lw, f.name)))
        return True

    def blocks(self, x: torch.Tensor, state: State, last_only: bool = False) -> tuple[torch.Tensor, State]:
        """The layer stack: x [B, T, C] -> [B, T', C] and the new state.

        With `last_only`, the final layer computes its outputs for the last two positions only
        (T' = 2): the logits need just the last one, and its channel-mix token shift reads the one
        before. The state still sees every position. This skips the last FFN for T - 2 tokens.
        """
        raise NotImplementedError

    def _token_kwargs(self, tokens) -> dict:
        """Extra keyword arguments of `blocks` / `step_numpy` for layers that read the token ids
        themselves (RWKV-7a's DeepEmbed, §7.5): {"tokens": tokens} there, else nothing."""
        return {}

    def zero_state(self, batch_size: int = 1) -> State:
        return State.zeros(self.cfg, batch_size, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, state: State, full_output: bool = False):
        """tokens [B, T] -> (logits [B, V] for the last position, or [B, T, V]; the new state).

        T = 1 is the RNN step; T > 1 is the parallel form over the whole chunk. The caller bounds
        T (the engine prefills long prompts in chunks); `state` is not modified. On a GPU the
        step is replayed from a CUDA graph (`rwkv_cli.cuda.graph`).
        """
        if tokens.shape[1] == 1 and self._numpy_step_applies():
            return self._numpy_step(tokens[:, 0], state)
        if tokens.shape[1] == 1 and not full_output and self.device.type == "cuda":
            return self._graph_step(tokens.shape[0])(tokens, state)
        return self.forward_torch(tokens, state, full_output)

    # -- the GPU: fused kernels (rwkv_cli/cuda) where they load, else this same torch code --------
    def _kernels(self):
        """The compiled CUDA kernels for this model's device, or None (CPU, disabled, unavailable:
        the reason is printed once on stderr) and the caller runs its PyTorch code."""
        if self.device.type != "cuda" or not self.FUSED_KERNELS:
            return None
        if self.cfg.version == "7" and self.cfg.head_size != 64:
            return None
        if self.cfg.variant == "7a":  # the kernels do not know DeepEmbed (§7.5)
            from ..errors import notice_once

            notice_once("the fused CUDA kernels do not cover RWKV-7a (DeepEmbed); using the PyTorch path")
            return None
        from ..cuda.loader import kernels_for

        return kernels_for(self.device)

    def step_input(self, batch_size: int):
        """On a GPU, the ids buffer [B] that the decoding step's CUDA graph reads; else None."""
        return self._graph_step(batch_size).tokens if self.device.type == "cuda" else None

    def _graph_step(self, batch_size: int):
        if getattr(self, "_graphs", None) is None:
            from ..cuda.graph import GraphCache

            self._graphs = GraphCache(self)
        return self._graphs.get(batch_size)

    def gpu_prefill_chunk(self) -> int:
        """Prompt chunk length on a GPU: long enough to amortise the host's ~16 calls a layer and
        chunk, while the temporaries (RWKV-7's peak, inside `wkv7_prep`: about 48 * C bytes a token
        on an H100, 46-49 at 1.5B, plus a few MiB) stay within ~7% of the weights' memory. A power
        of two."""
        if getattr(self, "_gpu_chunk", None) is None:
            tokens = int(0.07 * self.weights_nbytes() / (48 * self.cfg.n_embd))
            self._gpu_chunk = max(256, min(4096, 1 << max(0, tokens.bit_length() - 1)))
        return self._gpu_chunk

    def weights_nbytes(self) -> int:
        """Bytes of the loaded weights (views of one stacked tensor count once)."""
        weights = list(self._all_weights())
        tensors = [t for t in weights if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values()) + sum(t.nbytes for t in weights if isinstance(t, ops.PackedWeight))

    def _all_weights(self):
        """Every weight: tensors, and `PackedWeight`s on a bf16 CPU model."""
        kinds = (torch.Tensor, ops.PackedWeight)
        yield from (self.emb, *self.ln_out, self.head)
        for lw in self.layers:
            for f in dataclasses.fields(lw):
                v = getattr(lw, f.name)
                yield from (t for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, kinds))

    def forward_torch(self, tokens: torch.Tensor, state: State, full_output: bool = False):
        """`forward` without the CUDA graph (prompts, and the step that a graph captures)."""
        x = self.emb[tokens]  # [B, T, C]
        x, state = self.blocks(x, state, last_only=not full_output, **self._token_kwargs(tokens))
        if not full_output:
            x = x[:, -1]
        x = F.layer_norm(x, (self.cfg.n_embd,), *self.ln_out)
        K = self._kernels()
        if K is not None:  # the prompt's products decide between cuBLAS and kernels/gemm.cu
            from ..cuda.prefill import linear as gpu_linear

            return gpu_linear(K, self, x, self.head), state
        return linear(x, self.head), state

    # -- the CPU decoding step in NumPy -----------------------------------------------------------
    # A token's math is ~50 small vector ops per layer. Through torch each costs several dispatcher
    # calls (4,200 aten calls per token at 12 layers, measured), which on the 2-core machine added
    # ~10 ms to ~32 ms of weight streaming; NumPy runs the same math with ~1 us per op, on views of
    # the same weights. Subclasses implement `step_numpy`; the torch path stays the twin it is
    # tested against (`RWKV_CPU_MATMUL=torch` selects it).

    # A bf16 model with packed weights (`_pack_products`) steps here too: its vectors (norms,
    # mixes, decays) are copied to fp32 arrays at the first step, its products stay packed bf16
    # (`ops.np_linear`), and the state keeps its dtypes between steps.

    def _numpy_step_applies(self) -> bool:
        fp32_or_packed = self.dtype == torch.float32 or self.packed
        return self.device.type == "cpu" and fp32_or_packed and ops.numpy_decoding()

    def _numpy_weights(self):
        if getattr(self, "_np_cache", None) is None:
            def as_np(v):  # fp32 tensors: views, no copy
                if isinstance(v, tuple):
                    return tuple(map(as_np, v))
                return v.float().numpy() if isinstance(v, torch.Tensor) else v
            layers = [SimpleNamespace(**{f.name: as_np(getattr(lw, f.name)) for f in dataclasses.fields(lw)}) for lw in self.layers]
            self._np_cache = SimpleNamespace(ln_out=as_np(self.ln_out), head=as_np(self.head), layers=layers)
        return self._np_cache

    def _numpy_step(self, tokens: torch.Tensor, state: State):
        w = self._numpy_weights()
        names = [f.name for f in dataclasses.fields(state.layers[0])]
        st = [SimpleNamespace(**{n: getattr(lay, n).float().numpy() for n in names}) for lay in state.layers]
        with np.errstate(over="ignore"):  # exp overflow inside sigmoid is harmless (-> 0 or 1)
            ids = tokens.numpy()
            x, new = self.step_numpy(w, self.emb[tokens].float().numpy(), st, **self._token_kwargs(ids))
            x = np_layer_norm(x, *w.ln_out)
        first = state.layers[0]  # bf16 models keep bf16 token shifts
        dtypes = {n: getattr(first, n).dtype for n in names}
        layers = [type(first)(**{k: torch.from_numpy(a).to(dtypes[k]) for k, a in vars(arrays).items()})
                  for arrays in new]
        return torch.from_numpy(ops.np_linear(x, w.head)), State(state.version, layers)

    def step_numpy(self, w, x, st):
        """One token for B sequences in NumPy: x [B, C]; st: per-layer namespaces of state arrays.
        Returns (x after the last block, new per-layer state namespaces)."""
        raise NotImplementedError


def np_layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last axis (biased variance, as torch)."""
    mu = x.mean(-1, keepdims=True)
    d = x - mu
    var = np.mean(d * d, -1, keepdims=True)
    return d * (1.0 / np.sqrt(var + eps)) * weight + bias


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))
