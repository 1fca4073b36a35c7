"""RWKV-5.0, 5.1 and 5.2 ("Eagle"): multi-head matrix-valued states ("Eagle and Finch: RWKV with
Matrix-Valued States and Dynamic Recurrence", Peng et al. 2024, §4).

Time-mix: per head, a matrix state S [key, value] that decays along the key index and absorbs
k v^T each token; the readout r^T (diag(u) k v^T + S) goes through a per-head GroupNorm and (5.1+)
a SiLU gate. Channel-mix is RWKV-4's. Equations: `rwkv-models.md` §7.2, matching BlinkDL's `rwkv`
0.8.32 legacy class (`att_one_v5`, `att_one_v5_1`, `att_seq_v5*`). The variants differ only in:

    5.0: no gate; one decay w = exp(-exp(time_decay)) and one bonus per head   (time_decay [H])
    5.1: adds the gate (`gate.weight`, `time_mix_g`)
    5.2: decay and bonus per key channel                                        (time_decay [H, N])

The bonus is `time_faaaa` used raw, or a tensor named `time_first` exponentiated (§3).
`MatrixStateRWKV` holds what RWKV-6 (models/rwkv6.py) shares: the layer loop with the fp16
rescale, the WKV dispatch, the GroupNorm/gate/output and the NumPy pieces of the CPU step.
Shapes: B batch, T time, C width, H heads of N channels (A = H * N, = C in released models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import linear, linear_fp32_out, np_linear
from ..state import RWKV5LayerState, State
from ..wkv56 import wkv5_sequence, wkv5_step, wkv6_sequence
from .common import RWKVBase, WeightLoader, np, np_layer_norm, np_sigmoid, token_shift
from .rwkv4 import gated_channel_mix

# fp16 keeps the residual stream in range by halving it every RESCALE_EVERY layers, with the output
# projections pre-divided to match; the LayerNorms make this invisible (§8). Same as RWKV-4.
RESCALE_EVERY = 6
GROUP_NORM_EPS = 64e-5


@dataclass
class Layer5:
    ln1: tuple
    ln2: tuple
    att_mix: torch.Tensor  # [3 or 4, 1, 1, C]  mu for k, v, r (, g); mu weights the current token
    W_r: torch.Tensor  # [A, C]  [out, in]
    W_k: torch.Tensor
    W_v: torch.Tensor
    W_g: torch.Tensor | None  # [A, C]; None in 5.0 (no gate)
    W_o: torch.Tensor  # [C, A]
    log_decay: torch.Tensor  # fp32 log w = -exp(time_decay): [H, 1] (5.0/5.1) or [H, N] (5.2)
    decay: torch.Tensor  # fp32 w = exp(log_decay), same shape (the RNN step's multiplier)
    bonus: torch.Tensor  # fp32 u [H, N]
    ln_x: tuple  # GroupNorm affine, fp32 [A]
    ffn_mix: torch.Tensor  # [2, 1, 1, C]  mu for k, r
    ffn_key: torch.Tensor  # [F, C]
    ffn_value: torch.Tensor  # [C, F]
    ffn_receptance: torch.Tensor  # [C, C]
    halve_after: bool  # fp16 only: halve the residual after this layer


def load_bonus(w: WeightLoader, att: str, shape) -> torch.Tensor:
    """u in fp32: `time_faaaa` raw, or `time_first` exponentiated (§3, §7.2)."""
    if att + "time_faaaa" in w.t:
        return w.fp32(att + "time_faaaa").reshape(shape)
    return torch.exp(w.fp32(att + "time_first")).reshape(shape)


class MatrixStateRWKV(RWKVBase):
    """Shared by RWKV-5.x and RWKV-6. Subclasses load `self.layers` and implement
    `time_mix_inputs` (token shift, projections, decays) and `channel_mix`."""

    def _common_layer_weights(self, w: WeightLoader, i: int) -> dict:
        """Layer i's weights that RWKV-5.x and RWKV-6 name and use alike: the LayerNorms, r/k/v and
        output projections, GroupNorm, the gated channel-mix (output projections pre-scaled, §8)."""
        att, ffn = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        scale, halve = self._rescale(i)
        return dict(
            ln1=(w(f"blocks.{i}.ln1.weight"), w(f"blocks.{i}.ln1.bias")),
            ln2=(w(f"blocks.{i}.ln2.weight"), w(f"blocks.{i}.ln2.bias")),
            W_r=w(att + "receptance.weight"),
            W_k=w(att + "key.weight"),
            W_v=w(att + "value.weight"),
            W_o=(w.fp32(att + "output.weight") / scale).to(self.dtype),
            ln_x=(w.fp32(att + "ln_x.weight"), w.fp32(att + "ln_x.bias")),
            ffn_key=w(ffn + "key.weight"),
            ffn_value=(w.fp32(ffn + "value.weight") / scale).to(self.dtype),
            ffn_receptance=w(ffn + "receptance.weight"),
            halve_after=halve,
        )

    def _fold_ln0(self, tensors) -> torch.Tensor:
        """LN0 in the file's own precision, as the legacy reference class does before any cast."""
        emb, w, b = tensors["emb.weight"], tensors["blocks.0.ln0.weight"], tensors["blocks.0.ln0.bias"]
        if emb.dtype in (torch.bfloat16, torch.float16) and w.dtype == b.dtype == emb.dtype:
            return F.layer_norm(emb, (self.cfg.n_embd,), w, b)
        return super()._fold_ln0(tensors)

    def _load_initial_state(self, tensors) -> None:
        """A state-tuned `time_state` [H, N, N] in every layer of the model file is the initial
        state, as in the reference's legacy class: stored [head, value, key], so transposed (§12)."""
        names = [f"blocks.{i}.att.time_state" for i in range(self.cfg.n_layer)]
        self.initial_wkv = None
        if all(n in tensors for n in names):
            self.initial_wkv = [
                tensors[n].to(device=self.device, dtype=torch.float32).transpose(-1, -2).contiguous() for n in names
            ]

    def zero_state(self, batch_size: int = 1) -> State:
        """The state a new sequence starts from: zeros, or the model file's embedded tuned state."""
        state = super().zero_state(batch_size)
        for layer, wkv in zip(state.layers, getattr(self, "initial_wkv", None) or (), strict=False):
            layer.wkv = wkv.expand(batch_size, -1, -1, -1).clone()
        return state

    def packed_products(self) -> tuple[str, ...]:
        return ("W_r", "W_k", "W_v", "W_g", "W_o", "ffn_key", "ffn_value", "ffn_receptance")

    def _rescale(self, i: int) -> tuple[float, bool]:
        """(divisor of layer i's output projections, whether to halve the residual after it)."""
        if self.dtype != torch.float16:
            return 1.0, False
        return 2.0 ** (i // RESCALE_EVERY), (i + 1) % RESCALE_EVERY == 0

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, state: State, full_output: bool = False):
        """As `RWKVBase.forward`, without the CUDA-graph step (its kernels are RWKV-4/7 only)."""
        if tokens.shape[1] == 1 and self._numpy_step_applies():
            return self._numpy_step(tokens[:, 0], state)
        return self.forward_torch(tokens, state, full_output)

    def blocks(self, x: torch.Tensor, state: State, last_only: bool = False) -> tuple[torch.Tensor, State]:
        new_layers = []
        for i, (lw, st) in enumerate(zip(self.layers, state.layers, strict=True)):
            keep = 2 if last_only and i == len(self.layers) - 1 else x.shape[1]
            dx, att_shift, wkv = self.time_mix(lw, x, st, keep)
            x = x[:, -keep:] + dx
            dx, ffn_shift = self.channel_mix(lw, x, st)
            x = x + dx
            if lw.halve_after:
                x = x / 2
            new_layers.append(RWKV5LayerState(att_shift, wkv, ffn_shift))
        return x, State(self.cfg.version, new_layers)

    def time_mix(self, lw, x, st: RWKV5LayerState, keep: int):
        """Returns (output for the last `keep` positions, new att_shift, new wkv state)."""
        B, T, C = x.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        xx = F.layer_norm(x, (C,), *lw.ln1)
        r, k, v, xg, log_w = self.time_mix_inputs(lw, xx, token_shift(xx, st.att_shift))
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        if T == 1:
            lw_t = log_w if log_w.dim() == 2 else log_w[:, 0].view(B, H, N)
            y, wkv = wkv5_step(st.wkv, *(heads(t)[:, 0] for t in (r, k, v)), lw_t, lw.bonus)
            y = y.unsqueeze(1)
        elif log_w.dim() == 2 and log_w.shape[1] == 1:  # one decay per head: the exact parallel form
            y, wkv = wkv5_sequence(st.wkv, heads(r), heads(k), heads(v), log_w.view(H), lw.bonus)
        else:
            log_w = log_w if log_w.dim() == 2 else heads(log_w)
            y, wkv = wkv6_sequence(st.wkv, heads(r), heads(k), heads(v), log_w, lw.bonus)
        y, xg = y[:, -keep:], (xg[:, -keep:] if xg is not None else None)
        return self.attention_output(lw, y, xg, x.dtype), xx[:, -1], wkv

    def time_mix_inputs(self, lw, xx, prev):
        """From LN1 outputs xx [B, T, C] and their shifted copy: r, k, v [B, T, A] fp32, the gate
        input (or None), and log-decays (fp32 [H, 1] or [H, N], or per token [B, T, A])."""
        raise NotImplementedError

    def attention_output(self, lw, y, xg, dtype):
        """W_o (GroupNorm_H(y) * silu(W_g x_g)): y [B, T, H, N] fp32 -> [B, T, C] (§7.2 Output)."""
        B, T, H, N = y.shape
        y = F.group_norm(y.reshape(B * T, H * N), H, *lw.ln_x, eps=GROUP_NORM_EPS).view(B, T, H * N).to(dtype)
        if lw.W_g is not None:
            y = y * F.silu(linear(xg, lw.W_g))
        return linear(y, lw.W_o)

    # -- NumPy pieces of the CPU step (the twins of the torch code above) -------------------------

    def np_wkv_step(self, S, r, k, v, decay, bonus):
        """`wkv5_step` in NumPy: r, k, v [B, A]; S [B, H, N, N]; decay broadcast to [B, H, N]."""
        B = r.shape[0]
        H, N = self.cfg.n_head, self.cfg.head_size
        r, k, v = (t.reshape(B, H, N) for t in (r, k, v))
        y = (r[:, :, None, :] @ S)[:, :, 0] + (r * bonus * k).sum(-1, keepdims=True) * v
        S = S * decay[..., None] + k[..., :, None] * v[..., None, :]
        return y, S

    def np_attention_output(self, lw, y, gate_in):
        B, H, N = y.shape
        mu = y.mean(-1, keepdims=True)  # GroupNorm over each head, eps 64e-5
        d = y - mu
        y = (d / np.sqrt(np.mean(d * d, -1, keepdims=True) + GROUP_NORM_EPS)).reshape(B, H * N)
        y = y * lw.ln_x[0] + lw.ln_x[1]
        if lw.W_g is not None:
            g = np_linear(gate_in, lw.W_g)
            y = y * (g * np_sigmoid(g))
        return np_linear(y, lw.W_o)


class RWKV5(MatrixStateRWKV):
    def _load_blocks(self, w: WeightLoader) -> None:
        self._load_initial_state(w.t)
        C, H, N = self.cfg.n_embd, self.cfg.n_head, self.cfg.head_size
        gated = self.cfg.version != "5.0"
        per_channel = self.cfg.version == "5.2"
        self.layers = []
        for i in range(self.cfg.n_layer):
            att, ffn = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            log_decay = -torch.exp(w.fp32(att + "time_decay")).reshape(H, N if per_channel else 1)
            self.layers.append(
                Layer5(
                    **self._common_layer_weights(w, i),
                    att_mix=w.stack([att + f"time_mix_{m}" for m in ("kvrg" if gated else "kvr")], (1, 1, C)),
                    W_g=w(att + "gate.weight") if gated else None,
                    log_decay=log_decay,
                    decay=torch.exp(log_decay),
                    bonus=load_bonus(w, att, (H, N if per_channel else 1)).expand(H, N).contiguous(),
                    ffn_mix=w.stack([ffn + f"time_mix_{m}" for m in "kr"], (1, 1, C)),
                )
            )

    def time_mix_inputs(self, lw: Layer5, xx, prev):
        # x_m = mu_m * x + (1 - mu_m) * prev for k, v, r (, g) at once -> [3|4, B, T, C]
        mixed = torch.addcmul(prev, xx - prev, lw.att_mix)
        xk, xv, xr = mixed[0], mixed[1], mixed[2]
        r, k, v = (linear_fp32_out(t, W) for t, W in ((xr, lw.W_r), (xk, lw.W_k), (xv, lw.W_v)))
        return r, k, v, (mixed[3] if lw.W_g is not None else None), lw.log_decay

    def channel_mix(self, lw: Layer5, x, st: RWKV5LayerState):
        """RWKV-4's channel-mix: sigma(W_r x_r) * W_v relu(W_k x_k)^2."""
        return gated_channel_mix(lw, x, st.ffn_shift)

    def step_numpy(self, w, x, st):
        """The RNN step of `time_mix` + `channel_mix` in NumPy (fp32, or bf16 products: no rescaling)."""
        new = []
        for lw, s in zip(w.layers, st, strict=True):
            xx = np_layer_norm(x, *lw.ln1)
            mixed = s.att_shift + (xx - s.att_shift) * lw.att_mix[:, 0]  # [3|4, B, C]
            r, k, v = np_linear(mixed[2], lw.W_r), np_linear(mixed[0], lw.W_k), np_linear(mixed[1], lw.W_v)
            y, S = self.np_wkv_step(s.wkv, r, k, v, lw.decay, lw.bonus)
            x = x + self.np_attention_output(lw, y, mixed[3] if lw.W_g is not None else None)
            xx2 = np_layer_norm(x, *lw.ln2)
            xk, xr = s.ffn_shift + (xx2 - s.ffn_shift) * lw.ffn_mix[:, 0]
            hidden = np.maximum(np_linear(xk, lw.ffn_key), 0)
            x = x + np_sigmoid(np_linear(xr, lw.ffn_receptance)) * np_linear(hidden * hidden, lw.ffn_value)
            new.append(type(s)(att_shift=xx, wkv=S, ffn_shift=xx2))
        return x, new
