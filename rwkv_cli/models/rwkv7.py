"""RWKV-7 "Goose": time-mix with a delta-rule matrix state, and a gate-free channel-mix.

Equations follow `rwkv-models.md` §7.4 (numbers in comments are its steps), which match BlinkDL's
`rwkv` 0.8.32 `RWKV_x070` and RWKV-LM's `rwkv_v7_numpy.py`. Shapes: B batch, T time, C width,
H heads of N channels (C = H * N), F FFN width, R DeepEmbed rank.

RWKV-7a (DeepEmbed, §7.5) is the same model plus a token-dependent factor on each channel-mix's
hidden vector, so its layers also take the token ids (`blocks(..., tokens=)`). The reference sums
M = s_emb + LN0(emb) s_emb_x^T for the whole vocabulary at load; here M_tok is formed for the
tokens at hand: one [R*R, C] product per layer and token instead of V of them at load (12 x 65536
rows for the 0.1B shape), same numbers up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import linear, np_linear
from ..state import RWKV7LayerState, State
from ..wkv import wkv7_sequence, wkv7_step
from .common import RWKVBase, WeightLoader, np, np_layer_norm, np_sigmoid, token_shift

# Decay d = exp(-e^-0.5 * sigmoid(z)) lies in (0.545, 1): log d = -e^-0.5 * sigmoid(z)  (step 3)
DECAY_SCALE = math.exp(-0.5)
MIX_ORDER = ("r", "k", "v", "w", "a", "g")  # token-shift mixes, stacked in this order


@dataclass
class Layer7:
    ln1: tuple
    ln2: tuple
    mix: torch.Tensor  # [6, 1, 1, C]  mu for r, k, v, w, a, g
    W_r: torch.Tensor  # [C, C] and friends: [out, in]
    W_k: torch.Tensor
    W_v: torch.Tensor
    W_o: torch.Tensor
    w0: torch.Tensor  # [C] fp32
    w1: torch.Tensor  # [D_w, C]  LoRA down, [out, in]
    w2: torch.Tensor  # [C, D_w]  LoRA up
    a0: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    v0: torch.Tensor | None  # value residual: absent in layer 0
    v1: torch.Tensor | None
    v2: torch.Tensor | None
    g1: torch.Tensor
    g2: torch.Tensor
    k_k: torch.Tensor  # [C]
    k_a: torch.Tensor  # [C]
    r_k: torch.Tensor  # [H, N]
    ln_x: tuple  # GroupNorm affine, fp32
    ffn_mix: torch.Tensor  # [C]
    ffn_key: torch.Tensor  # [F, C]
    ffn_value: torch.Tensor  # [C, F]
    # RWKV-7a DeepEmbed (§7.5), None otherwise
    s_emb: torch.Tensor | None = None  # [V, R*R]  per-token matrices, flattened
    s_emb_x: torch.Tensor | None = None  # [R*R, C]  their part from LN0(emb[tok]), [out, in]
    s1: torch.Tensor | None = None  # [R, C]  down-projection of the LN2 output, [out, in]
    s2: torch.Tensor | None = None  # [F, R]  up to the FFN width, [out, in]
    s0: torch.Tensor | None = None  # [F]
    # On a GPU, the storage that W_r/W_k/W_v and the LoRA down-projections are views of, so a
    # prompt runs them as two batched products (rwkv_cli/cuda/prefill.py): a prompt chunk's host
    # time is mostly its cuBLAS calls (H100, 4,096 tokens, same process: 1.5B 48-62k -> 64k tok/s,
    # 0.1B 28-36k -> 38-40k, 7.2B unchanged). None on the CPU.
    W_rkv: torch.Tensor | None = None  # [3, C, C]
    lora_down: torch.Tensor | None = None  # [4, D, C]: v1, w1, a1, g1 (the mixes' order), zero rows up to D
    # Made the first time more than four sequences decode at once (`stack_lora_up`), else None.
    lora_up: torch.Tensor | None = None  # [4, C, D]: v2, w2, a2, g2, zero columns up to D
    # Made at the first prompt on a GPU (`stack_lora_up3`), else None.
    lora_up3: torch.Tensor | None = None  # [3, C, D3]: v2, w2, a2, zero columns up to D3


def stack_for_prompts(lw: Layer7) -> None:
    """Make W_r, W_k, W_v views of one [3, C, C] tensor and v1, w1, a1, g1 views of one
    zero-padded [4, D, C] tensor, in the order of their inputs among the token-shift mixes (r, k,
    v, w, a, g), so each batched product reads a slice of the mixes. The padding (2 MB a layer
    at 1.5B, under 2% of the weights) is the only extra memory."""
    lw.W_rkv = torch.stack([lw.W_r, lw.W_k, lw.W_v])
    lw.W_r, lw.W_k, lw.W_v = lw.W_rkv.unbind(0)
    downs = [lw.v1, lw.w1, lw.a1, lw.g1]
    lw.lora_down = _stack_zero_padded(downs, dim=0)
    lw.v1, lw.w1, lw.a1, lw.g1 = (None if t is None else lw.lora_down[i, : t.shape[0]] for i, t in enumerate(downs))


def _stack_zero_padded(ts: list, dim: int) -> torch.Tensor:
    """Stack the LoRA matrices `ts` (None: a zero slot) along a new first dimension, each
    zero-padded along `dim` to the largest rank among them."""
    like = next(t for t in ts if t is not None)
    shape = list(like.shape)
    shape[dim] = max(t.shape[dim] for t in ts if t is not None)
    out = torch.zeros(len(ts), *shape, dtype=like.dtype, device=like.device)
    for i, t in enumerate(ts):
        if t is not None:
            out[i].narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def stack_lora_up(lw: Layer7) -> torch.Tensor:
    """The four LoRA up-projections as one zero-padded [4, C, D] tensor, in `lora_down`'s order, so
    batched decoding (rwkv_cli/cuda/decode.py, B > 4) runs them as one product instead of four.
    A copy, since the single-sequence kernels read the originals: 4 MB a layer at 1.5B, made only
    once batches that large are decoded. The zero columns meet the zero rows of `lora_down`, so
    whatever activation those lanes get (sigmoid(0) = 0.5) adds nothing."""
    if lw.lora_up is None:
        lw.lora_up = _stack_zero_padded([lw.v2, lw.w2, lw.a2, lw.g2], dim=1)
    return lw.lora_up


def stack_lora_up3(lw: Layer7) -> torch.Tensor:
    """The up-projections of v, w and a as one zero-padded [3, C, D3] tensor (`lora_down`'s order),
    so a prompt chunk runs them as one batched product; g, the widest, stays on its own. A copy
    (the decoding kernels read the originals), made at the first prompt: 1.2 MB a layer at 1.5B."""
    if lw.lora_up3 is None:
        lw.lora_up3 = _stack_zero_padded([lw.v2, lw.w2, lw.a2], dim=1)
    return lw.lora_up3


class RWKV7(RWKVBase):
    FUSED_KERNELS = True

    def _load_blocks(self, w: WeightLoader) -> None:
        C = self.cfg.n_embd
        lora_t = lambda name: w(name).t().contiguous()  # noqa: E731  checkpoint stores [in, out]
        self.layers = []
        for i in range(self.cfg.n_layer):
            att, ffn = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            has_v = i > 0
            self.layers.append(
                Layer7(
                    ln1=(w(f"blocks.{i}.ln1.weight"), w(f"blocks.{i}.ln1.bias")),
                    ln2=(w(f"blocks.{i}.ln2.weight"), w(f"blocks.{i}.ln2.bias")),
                    mix=w.stack([att + f"x_{m}" for m in MIX_ORDER], (1, 1, C)),
                    W_r=w(att + "receptance.weight"),
                    W_k=w(att + "key.weight"),
                    W_v=w(att + "value.weight"),
                    W_o=w(att + "output.weight"),
                    w0=w.fp32(att + "w0", (C,)),
                    w1=lora_t(att + "w1"),
                    w2=lora_t(att + "w2"),
                    a0=w(att + "a0", shape=(C,)),
                    a1=lora_t(att + "a1"),
                    a2=lora_t(att + "a2"),
                    v0=w(att + "v0", shape=(C,)) if has_v else None,
                    v1=lora_t(att + "v1") if has_v else None,
                    v2=lora_t(att + "v2") if has_v else None,
                    g1=lora_t(att + "g1"),
                    g2=lora_t(att + "g2"),
                    k_k=w(att + "k_k", shape=(C,)),
                    k_a=w(att + "k_a", shape=(C,)),
                    r_k=w(att + "r_k"),
                    ln_x=(w.fp32(att + "ln_x.weight"), w.fp32(att + "ln_x.bias")),
                    ffn_mix=w(ffn + "x_k", shape=(C,)),
                    ffn_key=w(ffn + "key.weight"),
                    ffn_value=w(ffn + "value.weight"),
                    **(self._deep_embed_weights(w, ffn) if self.deep_embed else {}),
                )
            )
            if self.device.type == "cuda":
                stack_for_prompts(self.layers[-1])

    def packed_products(self) -> tuple[str, ...]:
        # The LoRAs too, though tiny: as fp32 NumPy products, OpenBLAS's threads and oneDNN's
        # fought over the two cores (v7 1.5B bf16 step 610 ms, packed 133). RWKV-7a steps in torch
        # in bf16: its DeepEmbed table would need an fp32 copy for NumPy.
        return () if self.deep_embed else ("W_r", "W_k", "W_v", "W_o", "ffn_key", "ffn_value",
                                           "w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")

    @property
    def deep_embed(self) -> bool:
        return self.cfg.variant == "7a"

    def _deep_embed_weights(self, w: WeightLoader, ffn: str) -> dict:
        return dict(
            s_emb=w(ffn + "s_emb.weight"),
            s_emb_x=w(ffn + "s_emb_x.weight"),
            s1=w(ffn + "s1").t().contiguous(),  # checkpoint stores [C, R]
            s2=w(ffn + "s2").t().contiguous(),  # checkpoint stores [R, F]
            s0=w(ffn + "s0", shape=(self.cfg.ffn_dim,)),
        )

    def _token_kwargs(self, tokens) -> dict:
        return {"tokens": tokens} if self.deep_embed else {}

    def blocks(self, x: torch.Tensor, state: State, last_only: bool = False, tokens=None):
        """See `RWKVBase.blocks`; x [B, T, C] must be LN0(emb[tokens]). RWKV-7a needs `tokens` [B, T]."""
        new_layers = []
        v_first = None
        embed = None
        if self.deep_embed:
            if tokens is None:
                raise ValueError("RWKV-7a (DeepEmbed) layers need the token ids: blocks(..., tokens=)")
            embed = (tokens, x)  # the channel-mix factor reads the token and its embedding
        for i, (lw, st) in enumerate(zip(self.layers, state.layers, strict=False)):
            keep = 2 if last_only and i == len(self.layers) - 1 else x.shape[1]
            x, att_shift, wkv, v_first = self.time_mix(lw, x, st, v_first, keep)
            if embed is not None and keep < embed[0].shape[1]:
                embed = (embed[0][:, -keep:], embed[1][:, -keep:])
            x, ffn_shift = self.channel_mix(lw, x, st, embed)
            new_layers.append(RWKV7LayerState(att_shift, wkv, ffn_shift))
        return x, State("7", new_layers)

    def time_mix(self, lw: Layer7, x, st: RWKV7LayerState, v_first, keep: int):
        """Returns (x[:, -keep:] + the time-mix output: the residual stream for the last `keep`
        positions, new att_shift, new wkv state, v_first)."""
        K = self._kernels()
        if K is not None:  # GPU: fused kernels around the same products (rwkv_cli/cuda/prefill.py)
            from ..cuda.prefill import time_mix7

            return time_mix7(K, self, lw, x, st, v_first, keep)
        B, T, C = x.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        xx = F.layer_norm(x, (C,), *lw.ln1)
        # 1. token shift: x_m = x + (prev - x) * mu_m, all six at once -> [6, B, T, C]
        xr, xk, xv, xw, xa, xg = torch.addcmul(xx, token_shift(xx, st.att_shift) - xx, lw.mix).unbind(0)
        # 2-5. projections, decay (fp32), in-context learning rate, output gate
        r, k, v = linear(xr, lw.W_r), linear(xk, lw.W_k), linear(xv, lw.W_v)
        log_decay = -DECAY_SCALE * torch.sigmoid(lw.w0 + linear(torch.tanh(linear(xw, lw.w1)), lw.w2).float())
        a = torch.sigmoid(lw.a0 + linear(linear(xa, lw.a1), lw.a2))
        # 6. removal key (normalised per head) and write key
        kk = F.normalize((k * lw.k_k).view(B, T, H, N), dim=-1)
        k = k * (1 + (a - 1) * lw.k_a)
        # 7. value residual: every layer after the first leans towards layer 0's values
        if lw.v0 is None:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(lw.v0 + linear(linear(xv, lw.v1), lw.v2))
        # 8-9. the delta-rule state update and readout
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        if T == 1:
            y, wkv = wkv7_step(st.wkv, *(t[:, 0] for t in map(heads, (r, log_decay, k, v))), kk[:, 0], heads(a)[:, 0])
            y = y.unsqueeze(1)
        else:
            y, wkv = wkv7_sequence(st.wkv, heads(r), heads(log_decay), heads(k), heads(v), kk, heads(a))
        if keep < T:
            T, y, r, k, v, xg = keep, y[:, -keep:], r[:, -keep:], k[:, -keep:], v[:, -keep:], xg[:, -keep:]
        # 10. per-head GroupNorm (fp32), 11. bonus (r . (k * r_k)) v per head, 12. gate and output
        y = F.group_norm(y.reshape(B * T, C), H, *lw.ln_x, eps=64e-5).view(B, T, C).to(x.dtype)
        y = y + ((r * k).view(B, T, H, N) * lw.r_k).sum(-1, keepdim=True).mul(heads(v)).view(B, T, C)
        g = linear(torch.sigmoid(linear(xg, lw.g1)), lw.g2)
        return x[:, -keep:] + linear(y * g, lw.W_o), xx[:, -1], wkv, v_first

    def channel_mix(self, lw: Layer7, x, st: RWKV7LayerState, embed=None):
        """Returns (x + out, ffn_shift) with out = W_value relu(W_key x_k)^2 (§7.4), the hidden vector
        times `deep_embed_factor` in RWKV-7a, where `embed` = (token ids [B, T], LN0(emb[ids]) [B, T,
        C]) of x's positions."""
        K = None if lw.s_emb is not None else self._kernels()  # the kernels have no DeepEmbed
        if K is not None:
            from ..cuda.prefill import channel_mix7

            return channel_mix7(K, self, lw, x, st)
        xx = F.layer_norm(x, (x.shape[-1],), *lw.ln2)
        xk = torch.addcmul(xx, token_shift(xx, st.ffn_shift) - xx, lw.ffn_mix)
        hidden = torch.relu(linear(xk, lw.ffn_key)).square_()
        if lw.s_emb is not None:
            hidden = hidden * self.deep_embed_factor(lw, xx, *embed)
        return x + linear(hidden, lw.ffn_value), xx[:, -1]

    @staticmethod
    def deep_embed_factor(lw: Layer7, xx, tokens, emb):
        """RWKV-7a's (x~ s1) M_tok s2 + s0 (§7.5): xx = LN2 output [B, T, C] (unshifted), tokens
        [B, T], emb = LN0(emb[tokens]) [B, T, C] -> [B, T, F]."""
        R = lw.s1.shape[0]
        M = (lw.s_emb[tokens] + linear(emb, lw.s_emb_x)).unflatten(-1, (R, R))  # M_tok [B, T, R, R]
        z = (linear(xx, lw.s1).unsqueeze(-2) @ M).squeeze(-2)  # [B, T, R]
        return linear(z, lw.s2) + lw.s0

    def step_numpy(self, w, x, st, tokens=None):
        """The RNN step of `time_mix` + `channel_mix` in NumPy (same equations, numbered there);
        x = LN0(emb[tokens]) [B, C]; RWKV-7a also needs the `tokens` [B]."""
        B, C = x.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        new, v_first, emb = [], None, x
        for lw, s in zip(w.layers, st, strict=False):
            xx = np_layer_norm(x, *lw.ln1)
            xr, xk, xv, xw, xa, xg = xx + (s.att_shift - xx) * lw.mix[:, 0]  # 1. [6, B, C]
            r, k, v = np_linear(xr, lw.W_r), np_linear(xk, lw.W_k), np_linear(xv, lw.W_v)  # 2.
            w_lora = np_linear(np.tanh(np_linear(xw, lw.w1)), lw.w2)
            log_decay = -DECAY_SCALE * np_sigmoid(lw.w0 + w_lora)  # 3.
            a = np_sigmoid(lw.a0 + np_linear(np_linear(xa, lw.a1), lw.a2))  # 4.
            g = np_linear(np_sigmoid(np_linear(xg, lw.g1)), lw.g2)  # 5.
            kk = (k * lw.k_k).reshape(B, H, N)  # 6.
            kk = kk / np.maximum(np.sqrt((kk * kk).sum(-1, keepdims=True)), 1e-12)
            k = k * (1 + (a - 1) * lw.k_a)
            if lw.v0 is None:  # 7.
                v_first = v
            else:
                v = v + (v_first - v) * np_sigmoid(lw.v0 + np_linear(np_linear(xv, lw.v1), lw.v2))
            r, k, v, a = (t.reshape(B, H, N) for t in (r, k, v, a))
            # 8. S <- S diag(d) + [S alpha | v] @ [beta ; k]   9. y = S r
            removed = s.wkv @ -kk[..., None]
            S = s.wkv * np.exp(log_decay).reshape(B, H, 1, N)
            S += np.concatenate([removed, v[..., None]], -1) @ np.stack([kk * a, k], -2)
            y = (S @ r[..., None])[..., 0]
            mu = y.mean(-1, keepdims=True)  # 10. GroupNorm over each head, eps 64e-5
            d = y - mu
            y = (d / np.sqrt(np.mean(d * d, -1, keepdims=True) + 64e-5)).reshape(B, C) * lw.ln_x[0] + lw.ln_x[1]
            y = y + ((r * k * lw.r_k).sum(-1, keepdims=True) * v).reshape(B, C)  # 11.
            x = x + np_linear(y * g, lw.W_o)  # 12.
            xx2 = np_layer_norm(x, *lw.ln2)
            hidden = np.maximum(np_linear(xx2 + (s.ffn_shift - xx2) * lw.ffn_mix, lw.ffn_key), 0)
            hidden = hidden * hidden
            if lw.s_emb is not None:  # RWKV-7a: (x~ s1) M_tok s2 + s0, M_tok [B, R, R]
                R = lw.s1.shape[0]
                M = (lw.s_emb[tokens] + emb @ lw.s_emb_x.T).reshape(B, R, R)
                hidden = hidden * (((xx2 @ lw.s1.T)[:, None, :] @ M)[:, 0] @ lw.s2.T + lw.s0)
            x = x + np_linear(hidden, lw.ffn_value)
            new.append(type(s)(att_shift=xx, wkv=S, ffn_shift=xx2))
        return x, new
