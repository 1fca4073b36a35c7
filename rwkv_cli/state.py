"""The recurrent state: everything an RWKV model remembers about a sequence, in a few named tensors.

Layouts follow `rwkv-models.md` §9 with a leading batch dimension B:
  RWKV-4, per layer: att_shift [B,C], wkv_num/wkv_den/wkv_max [B,A] (fp32), ffn_shift [B,C]
  RWKV-5.x/6, per layer: att_shift [B,C], wkv [B,H,N,N] (fp32, indexed [key, value]), ffn_shift [B,C]
  RWKV-7, per layer: att_shift [B,C], wkv [B,H,N,N] (fp32, indexed [value, key]), ffn_shift [B,C]
The shift vectors hold the LayerNorm output of the previous token, in the activation dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import ModelConfig


@dataclass
class RWKV4LayerState:
    att_shift: torch.Tensor  # [B, C]  LN1 output of the previous token
    wkv_num: torch.Tensor  # [B, A]  fp32 numerator a, stored as a * exp(-wkv_max)
    wkv_den: torch.Tensor  # [B, A]  fp32 denominator b, same scale
    wkv_max: torch.Tensor  # [B, A]  fp32 running log-scale p (starts at -1e30: "empty")
    ffn_shift: torch.Tensor  # [B, C]  LN2 output of the previous token


@dataclass
class RWKV7LayerState:
    att_shift: torch.Tensor  # [B, C]
    wkv: torch.Tensor  # [B, H, N, N]  fp32 matrix state S, indexed [value, key]
    ffn_shift: torch.Tensor  # [B, C]


@dataclass
class RWKV5LayerState:
    """RWKV-5.0/5.1/5.2 and RWKV-6. The matrix state is the TRANSPOSE of RWKV-7's: row i is key
    channel i (the decay scales rows), column j value channel j, as in the reference (§7.2, §9)."""

    att_shift: torch.Tensor  # [B, C]
    wkv: torch.Tensor  # [B, H, N, N]  fp32 matrix state S, indexed [key, value]
    ffn_shift: torch.Tensor  # [B, C]


LAYER_STATE = {
    "4": RWKV4LayerState, "7": RWKV7LayerState,
    "5.0": RWKV5LayerState, "5.1": RWKV5LayerState, "5.2": RWKV5LayerState, "6": RWKV5LayerState,
}


@dataclass
class State:
    """Per-layer recurrent state of B sequences. Forward passes return a new State; they never
    modify the one they were given, so a snapshot is simply a reference (or a `clone()`)."""

    version: str
    layers: list

    @classmethod
    def zeros(
        cls, cfg: ModelConfig, batch_size: int = 1, dtype=torch.float32, device="cpu"
    ) -> State:
        B, C, A = batch_size, cfg.n_embd, cfg.dim_att
        f32 = dict(dtype=torch.float32, device=device)
        act = dict(dtype=dtype, device=device)
        layers = []
        for _ in range(cfg.n_layer):
            if cfg.version == "4":
                layers.append(
                    RWKV4LayerState(
                        torch.zeros(B, C, **act),
                        torch.zeros(B, A, **f32),
                        torch.zeros(B, A, **f32),
                        torch.full((B, A), -1e30, **f32),
                        torch.zeros(B, C, **act),
                    )
                )
            else:
                H, N = cfg.n_head, cfg.head_size
                layers.append(
                    LAYER_STATE[cfg.version](
                        torch.zeros(B, C, **act), torch.zeros(B, H, N, N, **f32), torch.zeros(B, C, **act)
                    )
                )
        return cls(cfg.version, layers)

    # -- inspection ---------------------------------------------------------------------------
    def tensors(self):
        for layer in self.layers:
            for f in dataclasses.fields(layer):
                yield getattr(layer, f.name)

    @property
    def batch_size(self) -> int:
        return self.layers[0].att_shift.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.layers[0].att_shift.device

    # -- copies and conversions ---------------------------------------------------------------
    def map(self, fn) -> State:
        """A new State with `fn` applied to every tensor (fn receives the field name too)."""
        return State(
            self.version,
            [
                type(layer)(**{f.name: fn(f.name, getattr(layer, f.name)) for f in dataclasses.fields(layer)})
                for layer in self.layers
            ],
        )

    def clone(self) -> State:
        return self.map(lambda _, t: t.clone())

    def to(self, device=None, dtype=None) -> State:
        """Move to a device; `dtype` changes only the shift vectors (the wkv state stays fp32)."""

        def move(name, t):
            keep_fp32 = name.startswith("wkv")
            return t.to(device=device, dtype=None if keep_fp32 else dtype)

        return self.map(move)

    def select(self, index) -> State:
        """Rows `index` of the batch (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self.map(lambda _, t: t[index])

    @classmethod
    def cat(cls, states: list[State]) -> State:
        """Stack several states along the batch dimension."""
        first = states[0]
        layers = []
        for i, layer in enumerate(first.layers):
            fields = {
                f.name: torch.cat([getattr(s.layers[i], f.name) for s in states]) for f in dataclasses.fields(layer)
            }
            layers.append(type(layer)(**fields))
        return cls(first.version, layers)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flat `{"blocks.{i}.{field}": tensor}` map, the form state files store."""
        return {
            f"blocks.{i}.{f.name}": getattr(layer, f.name)
            for i, layer in enumerate(self.layers)
            for f in dataclasses.fields(layer)
        }

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], version: str) -> State:
        """Inverse of `to_dict`; raises ValueError naming what is missing or left over."""
        layer_cls = LAYER_STATE[version]
        names = [f.name for f in dataclasses.fields(layer_cls)]
        n_layer = 1 + max((int(k.split(".")[1]) for k in tensors if k.startswith("blocks.")), default=-1)
        wanted = {f"blocks.{i}.{n}" for i in range(n_layer) for n in names}
        if n_layer == 0 or set(tensors) != wanted:
            missing = sorted(wanted - set(tensors))[:3]
            extra = sorted(set(tensors) - wanted)[:3]
            raise ValueError(f"state tensors do not match RWKV-{version} (missing {missing}, unexpected {extra})")
        layers = [layer_cls(**{n: tensors[f"blocks.{i}.{n}"] for n in names}) for i in range(n_layer)]
        return cls(version, layers)
