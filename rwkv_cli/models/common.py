"""Pieces shared by every RWKV version: weight preparation, token shift, embedding and head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..ops import linear
from ..state import State


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

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        w = WeightLoader(tensors, dtype, device)
        # x_0 = LN0(emb[token]): fold LN0 into the table once (§6).
        self.emb = self._fold_ln0(tensors).to(device=device, dtype=dtype)
        self.ln_out = (w("ln_out.weight"), w("ln_out.bias"))
        self.head = w("head.weight")  # [V, C]
        self._load_blocks(w)

    def _fold_ln0(self, tensors) -> torch.Tensor:
        """LN0 over the embedding table, in fp32 (RWKV-7 reference: it casts before normalising)."""
        ln = (tensors["blocks.0.ln0.weight"].float(), tensors["blocks.0.ln0.bias"].float())
        return F.layer_norm(tensors["emb.weight"].float(), (self.cfg.n_embd,), *ln)

    def _load_blocks(self, w: WeightLoader) -> None:
        raise NotImplementedError

    def blocks(self, x: torch.Tensor, state: State, last_only: bool = False) -> tuple[torch.Tensor, State]:
        """The layer stack: x [B, T, C] -> [B, T', C] and the new state.

        With `last_only`, the final layer computes its outputs for the last two positions only
        (T' = 2): the logits need just the last one, and its channel-mix token shift reads the one
        before. The state still sees every position. This skips the last FFN for T - 2 tokens.
        """
        raise NotImplementedError

    def zero_state(self, batch_size: int = 1) -> State:
        return State.zeros(self.cfg, batch_size, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, state: State, full_output: bool = False):
        """tokens [B, T] -> (logits [B, V] for the last position, or [B, T, V]; the new state).

        T = 1 is the RNN step; T > 1 is the parallel form over the whole chunk. The caller bounds
        T (the engine prefills long prompts in chunks); `state` is not modified.
        """
        x = self.emb[tokens]  # [B, T, C]
        x, state = self.blocks(x, state, last_only=not full_output)
        if not full_output:
            x = x[:, -1]
        x = F.layer_norm(x, (self.cfg.n_embd,), *self.ln_out)
        return linear(x, self.head), state
