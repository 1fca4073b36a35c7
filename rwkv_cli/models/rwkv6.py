"""RWKV-6 "Finch": RWKV-5.2's matrix state with data-dependent token shift and decay ("Eagle and
Finch", Peng et al. 2024, §5).

Equations follow `rwkv-models.md` §7.3 (numbers in comments are its token-shift steps), matching
BlinkDL's `rwkv` 0.8.32 legacy class (`att_one_v6_0`, `att_seq_v6_0`, `ffn_*_v6`):

    delta = p - x;  x^ = x + delta * mu_x                      (1-2; mu weights the PREVIOUS token)
    m_{w,k,v,r,g} = tanh(x^ A) B                               (3-4; A [C, 5 D_mix], B [5, D_mix, C])
    x_i = x + delta * (mu_i + m_i)                             (5)
    d = time_decay + tanh(x_w D1) D2;  w = exp(-exp(d))        (per token and channel, fp32)

then the v5.2 WKV with bonus u = time_faaaa, GroupNorm, SiLU gate and output (models/rwkv5.py).
Channel-mix uses the same shift convention: x_k = x + delta * mu_k, x_r = x + delta * mu_r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import linear, linear_fp32_out, matmul, np_linear
from ..state import RWKV5LayerState
from .common import WeightLoader, np, np_layer_norm, np_sigmoid, token_shift
from .rwkv5 import MatrixStateRWKV, load_bonus

MIX_ORDER = ("w", "k", "v", "r", "g")  # the order of time_maa_w1/w2's five LoRA blocks


@dataclass
class Layer6:
    ln1: tuple
    ln2: tuple
    maa_x: torch.Tensor  # [C]  mu_x
    maa: torch.Tensor  # [5, 1, 1, C]  mu for w, k, v, r, g
    maa_w1: torch.Tensor  # [5 D_mix, C]  LoRA down, [out, in]
    maa_w2: torch.Tensor  # [5, D_mix, C]  LoRA up, one block per mix
    decay_base: torch.Tensor  # [A] fp32  time_decay
    decay_w1: torch.Tensor  # [D_decay, C]  [out, in]
    decay_w2: torch.Tensor  # [A, D_decay]
    bonus: torch.Tensor  # fp32 u [H, N]
    W_r: torch.Tensor  # [A, C]
    W_k: torch.Tensor
    W_v: torch.Tensor
    W_g: torch.Tensor
    W_o: torch.Tensor  # [C, A]
    ln_x: tuple  # GroupNorm affine, fp32
    ffn_maa: torch.Tensor  # [2, 1, 1, C]  mu for k, r
    ffn_key: torch.Tensor  # [F, C]
    ffn_value: torch.Tensor  # [C, F]
    ffn_receptance: torch.Tensor  # [C, C]
    halve_after: bool


class RWKV6(MatrixStateRWKV):
    def _load_blocks(self, w: WeightLoader) -> None:
        self._load_initial_state(w.t)
        C, H, N = self.cfg.n_embd, self.cfg.n_head, self.cfg.head_size
        D = self.cfg.lora["mix"]
        lora_t = lambda name: w(name).t().contiguous()  # noqa: E731  checkpoint stores [in, out]
        self.layers = []
        for i in range(self.cfg.n_layer):
            att, ffn = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            self.layers.append(
                Layer6(
                    **self._common_layer_weights(w, i),
                    maa_x=w(att + "time_maa_x", shape=(C,)),
                    maa=w.stack([att + f"time_maa_{m}" for m in MIX_ORDER], (1, 1, C)),
                    maa_w1=lora_t(att + "time_maa_w1"),
                    maa_w2=w(att + "time_maa_w2", shape=(5, D, C)),
                    decay_base=w.fp32(att + "time_decay").reshape(-1),
                    decay_w1=lora_t(att + "time_decay_w1"),
                    decay_w2=lora_t(att + "time_decay_w2"),
                    bonus=load_bonus(w, att, (H, N)),
                    W_g=w(att + "gate.weight"),
                    ffn_maa=w.stack([ffn + f"time_maa_{m}" for m in "kr"], (1, 1, C)),
                )
            )

    def packed_products(self) -> tuple[str, ...]:
        return (*super().packed_products(), "maa_w1", "decay_w1", "decay_w2")  # maa_w2: a batched product

    def time_mix_inputs(self, lw: Layer6, xx, prev):
        B, T, C = xx.shape
        delta = prev - xx  # 1.
        z = torch.tanh(linear(xx + delta * lw.maa_x, lw.maa_w1))  # 2-3. [B, T, 5 D]
        m = matmul(z.view(B * T, 5, -1).transpose(0, 1), lw.maa_w2).view(5, B, T, C)  # 4. [5, B, T, C]
        xw, xk, xv, xr, xg = torch.addcmul(xx, delta, lw.maa + m).unbind(0)  # 5.
        r, k, v = (linear_fp32_out(t, W) for t, W in ((xr, lw.W_r), (xk, lw.W_k), (xv, lw.W_v)))
        d = lw.decay_base + linear(torch.tanh(linear(xw, lw.decay_w1)), lw.decay_w2).float()
        return r, k, v, xg, -torch.exp(d)  # log w = -exp(d): [B, T, A]

    def channel_mix(self, lw: Layer6, x, st: RWKV5LayerState):
        xx = F.layer_norm(x, (x.shape[-1],), *lw.ln2)
        xk, xr = torch.addcmul(xx, token_shift(xx, st.ffn_shift) - xx, lw.ffn_maa).unbind(0)
        r = torch.sigmoid(linear(xr, lw.ffn_receptance))
        hidden = torch.relu(linear(xk, lw.ffn_key)).square_()
        return r * linear(hidden, lw.ffn_value), xx[:, -1]

    def step_numpy(self, w, x, st):
        """The RNN step of `time_mix` + `channel_mix` in NumPy (same equations, numbered there)."""
        B, C = x.shape
        new = []
        for lw, s in zip(w.layers, st, strict=True):
            xx = np_layer_norm(x, *lw.ln1)
            delta = s.att_shift - xx  # 1.
            z = np.tanh(np_linear(xx + delta * lw.maa_x, lw.maa_w1))  # 2-3. [B, 5 D]
            m = z.reshape(B, 5, -1).transpose(1, 0, 2) @ lw.maa_w2  # 4. [5, B, C]
            xw, xk, xv, xr, xg = xx + delta * (lw.maa[:, 0] + m)  # 5.
            r, k, v = np_linear(xr, lw.W_r), np_linear(xk, lw.W_k), np_linear(xv, lw.W_v)
            d = lw.decay_base + np_linear(np.tanh(np_linear(xw, lw.decay_w1)), lw.decay_w2)
            decay = np.exp(-np.exp(d)).reshape(B, self.cfg.n_head, self.cfg.head_size)
            y, S = self.np_wkv_step(s.wkv, r, k, v, decay, lw.bonus)
            x = x + self.np_attention_output(lw, y, xg)
            xx2 = np_layer_norm(x, *lw.ln2)
            xk, xr = xx2 + (s.ffn_shift - xx2) * lw.ffn_maa[:, 0]
            hidden = np.maximum(np_linear(xk, lw.ffn_key), 0)
            x = x + np_sigmoid(np_linear(xr, lw.ffn_receptance)) * np_linear(hidden * hidden, lw.ffn_value)
            new.append(type(s)(att_shift=xx, wkv=S, ffn_shift=xx2))
        return x, new
