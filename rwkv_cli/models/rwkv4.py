"""RWKV-4, the architecture of the paper ("RWKV: Reinventing RNNs for the Transformer Era", §3).

Time-mix: a per-channel exponentially decayed average of values weighted by e^k, with a bonus u
for the current token (paper eq. 14-16); channel-mix: a receptance-gated squared-ReLU FFN.
Equations as in `rwkv-models.md` §7.1, matching BlinkDL's `rwkv` 0.8.32 legacy class.
Shapes: B batch, T time, C width, A attention width (= C in released models), F FFN width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import linear, linear_fp32_out, np_linear
from ..state import RWKV4LayerState, State
from ..wkv import wkv4_sequence, wkv4_step
from .common import RWKVBase, WeightLoader, np, np_layer_norm, np_sigmoid, token_shift

# fp16 keeps the residual stream in range by halving it every RESCALE_EVERY layers, with the
# output projections pre-divided to match; LayerNorms make this invisible to the result (§8).
RESCALE_EVERY = 6


@dataclass
class Layer4:
    ln1: tuple
    ln2: tuple
    att_mix: torch.Tensor  # [3, 1, 1, C]  mu for k, v, r (mu weights the current token)
    decay: torch.Tensor  # [A] fp32, w = -exp(time_decay)
    bonus: torch.Tensor  # [A] fp32, u = time_first
    W_k: torch.Tensor  # [A, C]  [out, in]
    W_v: torch.Tensor
    W_r: torch.Tensor
    W_o: torch.Tensor  # [C, A]
    ffn_mix: torch.Tensor  # [2, 1, 1, C]  mu for k, r
    ffn_key: torch.Tensor  # [F, C]
    ffn_value: torch.Tensor  # [C, F]
    ffn_receptance: torch.Tensor  # [C, C]
    halve_after: bool  # fp16 only: halve the residual after this layer
    # On a GPU, the [2, A, C] storage W_k and W_v are views of: a prompt forms both in one batched
    # product (rwkv_cli/cuda/prefill.py). None on the CPU.
    W_kv: torch.Tensor | None = None


def stack_for_prompts(lw: Layer4) -> None:
    """Make W_k and W_v views of one [2, A, C] tensor (no extra memory): their inputs are the first
    two token-shift mixes, so a prompt forms k and v in one batched product."""
    lw.W_kv = torch.stack([lw.W_k, lw.W_v])
    lw.W_k, lw.W_v = lw.W_kv.unbind(0)


def gated_channel_mix(lw, x: torch.Tensor, ffn_shift: torch.Tensor):
    """The RWKV-4/5 channel-mix (§7.1): sigma(W_r x_r) * W_v relu(W_k x_k)^2, with the v4 token
    shift x_m = mu_m * x + (1 - mu_m) * prev. Returns (output [B, T, C], new shift [B, C])."""
    xx = F.layer_norm(x, (x.shape[-1],), *lw.ln2)
    prev = token_shift(xx, ffn_shift)
    xk, xr = torch.addcmul(prev, xx - prev, lw.ffn_mix).unbind(0)
    r = torch.sigmoid(linear(xr, lw.ffn_receptance))
    hidden = torch.relu(linear(xk, lw.ffn_key)).square_()
    return r * linear(hidden, lw.ffn_value), xx[:, -1]


class RWKV4(RWKVBase):
    FUSED_KERNELS = True

    def _fold_ln0(self, tensors) -> torch.Tensor:
        """LN0 in the file's own precision, as the RWKV-4 reference does before any cast: with bf16
        files the folded table is rounded to bf16, and matching that keeps logits identical."""
        emb, w, b = tensors["emb.weight"], tensors["blocks.0.ln0.weight"], tensors["blocks.0.ln0.bias"]
        if emb.dtype in (torch.bfloat16, torch.float16) and w.dtype == b.dtype == emb.dtype:
            return F.layer_norm(emb, (self.cfg.n_embd,), w, b)
        return super()._fold_ln0(tensors)

    def packed_products(self) -> tuple[str, ...]:
        return ("W_k", "W_v", "W_r", "W_o", "ffn_key", "ffn_value", "ffn_receptance")

    def _load_blocks(self, w: WeightLoader) -> None:
        C = self.cfg.n_embd
        rescale = self.dtype == torch.float16
        self.layers = []
        for i in range(self.cfg.n_layer):
            att, ffn = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            scale = 2 ** (i // RESCALE_EVERY) if rescale else 1
            self.layers.append(
                Layer4(
                    ln1=(w(f"blocks.{i}.ln1.weight"), w(f"blocks.{i}.ln1.bias")),
                    ln2=(w(f"blocks.{i}.ln2.weight"), w(f"blocks.{i}.ln2.bias")),
                    att_mix=w.stack([att + f"time_mix_{m}" for m in "kvr"], (1, 1, C)),
                    decay=-torch.exp(w.fp32(att + "time_decay").reshape(-1)),
                    bonus=w.fp32(att + "time_first").reshape(-1),
                    W_k=w(att + "key.weight"),
                    W_v=w(att + "value.weight"),
                    W_r=w(att + "receptance.weight"),
                    W_o=(w.fp32(att + "output.weight") / scale).to(self.dtype),
                    ffn_mix=w.stack([ffn + f"time_mix_{m}" for m in "kr"], (1, 1, C)),
                    ffn_key=w(ffn + "key.weight"),
                    ffn_value=(w.fp32(ffn + "value.weight") / scale).to(self.dtype),
                    ffn_receptance=w(ffn + "receptance.weight"),
                    halve_after=rescale and (i + 1) % RESCALE_EVERY == 0,
                )
            )
            if self.device.type == "cuda":
                stack_for_prompts(self.layers[-1])

    def blocks(self, x: torch.Tensor, state: State, last_only: bool = False) -> tuple[torch.Tensor, State]:
        new_layers = []
        for i, (lw, st) in enumerate(zip(self.layers, state.layers, strict=False)):
            keep = 2 if last_only and i == len(self.layers) - 1 else x.shape[1]
            dx, att_shift, num, den, mx = self.time_mix(lw, x, st, keep)
            x = x[:, -keep:] + dx
            dx, ffn_shift = self.channel_mix(lw, x, st)
            x = x + dx
            if lw.halve_after:
                x = x / 2
            new_layers.append(RWKV4LayerState(att_shift, num, den, mx, ffn_shift))
        return x, State("4", new_layers)

    def time_mix(self, lw: Layer4, x, st: RWKV4LayerState, keep: int):
        """Returns (output for the last `keep` positions, att_shift, wkv_num, wkv_den, wkv_max)."""
        K = self._kernels()
        if K is not None:  # GPU: fused kernels around the same products (rwkv_cli/cuda/prefill.py)
            from ..cuda.prefill import time_mix4

            return time_mix4(K, self, lw, x, st, keep)
        xx = F.layer_norm(x, (x.shape[-1],), *lw.ln1)
        prev = token_shift(xx, st.att_shift)
        # x_m = mu_m * x + (1 - mu_m) * prev, for k, v, r at once -> [3, B, T, C]
        xk, xv, xr = torch.addcmul(prev, xx - prev, lw.att_mix).unbind(0)
        r = torch.sigmoid(linear(xr[:, -keep:], lw.W_r))
        k, v = linear_fp32_out(xk, lw.W_k), linear_fp32_out(xv, lw.W_v)  # fp32: they feed exp()
        if x.shape[1] == 1:
            y, num, den, mx = wkv4_step(lw.decay, lw.bonus, k[:, 0], v[:, 0], st.wkv_num, st.wkv_den, st.wkv_max)
            y = y.unsqueeze(1)
        else:
            y, num, den, mx = wkv4_sequence(lw.decay, lw.bonus, k, v, st.wkv_num, st.wkv_den, st.wkv_max)
        return linear(r * y[:, -keep:].to(x.dtype), lw.W_o), xx[:, -1], num, den, mx

    def channel_mix(self, lw: Layer4, x, st: RWKV4LayerState):
        K = self._kernels()
        if K is not None:
            from ..cuda.prefill import channel_mix4

            return channel_mix4(K, self, lw, x, st)
        return gated_channel_mix(lw, x, st.ffn_shift)

    def step_numpy(self, w, x, st):
        """The RNN step of `time_mix` + `channel_mix` in NumPy (fp32, or bf16 products: no rescaling)."""
        new = []
        for lw, s in zip(w.layers, st, strict=False):
            xx = np_layer_norm(x, *lw.ln1)
            xk, xv, xr = s.att_shift + (xx - s.att_shift) * lw.att_mix[:, 0]
            r = np_sigmoid(np_linear(xr, lw.W_r))
            k, v = np_linear(xk, lw.W_k), np_linear(xv, lw.W_v)
            # wkv_step: read the decayed average with the bonus, then absorb this token
            uk = lw.bonus + k
            q = np.maximum(s.wkv_max, uk)
            e1, e2 = np.exp(s.wkv_max - q), np.exp(uk - q)
            y = (e1 * s.wkv_num + e2 * v) / (e1 * s.wkv_den + e2)
            decayed = s.wkv_max + lw.decay
            q = np.maximum(decayed, k)
            e1, e2 = np.exp(decayed - q), np.exp(k - q)
            num, den = e1 * s.wkv_num + e2 * v, e1 * s.wkv_den + e2
            x = x + np_linear(r * y, lw.W_o)
            xx2 = np_layer_norm(x, *lw.ln2)
            xk, xr = s.ffn_shift + (xx2 - s.ffn_shift) * lw.ffn_mix[:, 0]
            hidden = np.maximum(np_linear(xk, lw.ffn_key), 0)
            x = x + np_sigmoid(np_linear(xr, lw.ffn_receptance)) * np_linear(hidden * hidden, lw.ffn_value)
            new.append(type(s)(att_shift=xx, wkv_num=num, wkv_den=den, wkv_max=q, ffn_shift=xx2))
        return x, new
