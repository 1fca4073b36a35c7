"""Prompt (T > 1) time-mix and channel-mix on the GPU: cuBLAS for the products, the fused kernels
for everything between them. Same inputs and outputs as the methods of `RWKV7` / `RWKV4` they
replace (`rwkv_cli/models/`), which stay the reference.

RWKV-7 per layer: LN1 + the six token-shift mixes in one kernel (`ln_mix`), r, k, v as one batched
product and the four LoRA down-projections as another (stacked weights, `stack_for_prompts`),
tanh and sigmoid on their w and g lanes in one `act_inplace`, the up-projections of v, w, a as one
batched product (`stack_lora_up3`) and g's on its own, `wkv7_prep` (steps 3-7 for all tokens),
`wkv7_seq` (the recurrence, state carried, one launch for the whole chunk), `wkv7_post`
(GroupNorm, bonus, gate) for the positions that are kept, the output product. RWKV-4: `ln_mix`,
products (k and v as one batched product with fp32 output), `wkv4_seq`, output product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.rwkv7 import stack_lora_up3
from ..ops import bmm_fp32_out, linear_fp32_out
from . import kops


def _last(t: torch.Tensor, keep: int) -> torch.Tensor:
    return t if keep == t.shape[1] else t[:, -keep:].contiguous()


def add_product(res: torch.Tensor, h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """res + h W^T as one cuBLAS call (beta = 1, summed in fp32 before rounding): [B, T, I] and
    [B, T, O] -> [B, T, O]. One host call instead of a product and an add."""
    O, In = W.shape
    return torch.addmm(res.reshape(-1, O), h.reshape(-1, In), W.t()).view(*h.shape[:-1], O)


def time_mix7(K, net, lw, x, st, v_first, keep: int):
    """RWKV7.time_mix: returns (x[:, -keep:] + the time-mix output, att_shift, wkv, v_first).

    Temporaries are dropped as soon as they are used: the chunk length is set by the peak
    (`RWKVBase.gpu_prefill_chunk`), which is inside `wkv7_prep` (its six fp32 outputs beside r, k, v
    and the up-projections)."""
    B, T, C = x.shape
    H = net.cfg.n_head
    mixes, shift = kops.ln_mix(K, x.contiguous(), st.att_shift, *lw.ln1, lw.mix.view(6, C), v4_order=False)
    first = lw.v0 is None
    if lw.W_rkv is not None:  # batched products over stacked weights: their host time is the cost
        rows = mixes.view(6, B * T, C)
        r, k, v = torch.bmm(rows[:3], lw.W_rkv.transpose(1, 2)).view(3, B, T, C).unbind(0)
        down = torch.bmm(rows[2:], lw.lora_down.transpose(1, 2))  # inputs v, w, a, g: [4, B*T, D]
        del rows, mixes
        kops.act_inplace(K, down[1], kops.ACT_TANH, down[3], kops.ACT_SIGMOID)
        up = stack_lora_up3(lw)  # v, w, a as one product; g (the widest) on its own
        vz, wz, az = torch.bmm(down[:3, :, : up.shape[2]], up.transpose(1, 2)).view(3, B, T, C).unbind(0)
        vz = None if first else vz
        hg = down[3].view(B, T, -1)[..., : lw.g2.shape[1]]
        del down
    else:
        xr, xk, xv, xw, xa, xg = mixes.unbind(0)
        del mixes
        r, k, v = F.linear(xr, lw.W_r), F.linear(xk, lw.W_k), F.linear(xv, lw.W_v)
        hw, ha, hg = F.linear(xw, lw.w1), F.linear(xa, lw.a1), torch.sigmoid(F.linear(_last(xg, keep), lw.g1))
        hv = None if first else F.linear(xv, lw.v1)
        del xr, xk, xv, xw, xa, xg
        wz = F.linear(torch.tanh(hw), lw.w2)
        az = F.linear(ha, lw.a2)
        vz = None if first else F.linear(hv, lw.v2)
        del hw, ha, hv
    r32, d, kk, kw, vw, beta = kops.wkv7_prep(K, r, k, v, wz, az, vz, None if first else v_first.contiguous(),
                                              lw.w0, lw.a0, lw.v0, lw.k_k, lw.k_a, H)
    del r, k, wz, az, vz
    if first:  # a copy: v is a view of the r, k, v product, which can go now
        v_first = v.clone()
    del v
    y, wkv = kops.wkv7_seq(K, st.wkv.contiguous(), r32, d, kk, kw, beta, vw)
    del d, kk, beta
    g = F.linear(hg[:, -keep:], lw.g2)  # sigmoid already applied
    out = kops.wkv7_post(K, *(_last(t, keep) for t in (y, r32, kw, vw)), g, lw.r_k, *lw.ln_x, H)
    del y, r32, kw, vw, g
    return add_product(x[:, -keep:], out, lw.W_o), shift, wkv, v_first


def channel_mix7(K, net, lw, x, st):
    """RWKV7.channel_mix: returns (x + the channel-mix output, ffn_shift)."""
    C = x.shape[-1]
    mixes, shift = kops.ln_mix(K, x.contiguous(), st.ffn_shift, *lw.ln2, lw.ffn_mix.view(1, C), v4_order=False)
    hidden = F.linear(mixes[0], lw.ffn_key)
    del mixes
    kops.act_inplace(K, hidden, kops.ACT_RELU_SQUARE)
    return add_product(x, hidden, lw.ffn_value), shift


def time_mix4(K, net, lw, x, st, keep: int):
    """RWKV4.time_mix: returns (output for the last `keep` positions, att_shift, num, den, max)."""
    C = x.shape[-1]
    mixes, shift = kops.ln_mix(K, x.contiguous(), st.att_shift, *lw.ln1, lw.att_mix.view(3, C), v4_order=True)
    xk, xv, xr = mixes.unbind(0)
    r = torch.sigmoid(F.linear(xr[:, -keep:], lw.W_r))
    if lw.W_kv is not None:  # k and v in one batched product (fp32 out: they feed exp())
        B, T, _ = x.shape
        k, v = bmm_fp32_out(mixes[:2].view(2, B * T, C), lw.W_kv).view(2, B, T, -1).unbind(0)
    else:
        k, v = linear_fp32_out(xk, lw.W_k), linear_fp32_out(xv, lw.W_v)
    y, num, den, mx = kops.wkv4_seq(K, lw.decay, lw.bonus, k.contiguous(), v.contiguous(),
                                    st.wkv_num.contiguous(), st.wkv_den.contiguous(), st.wkv_max.contiguous())
    return F.linear(r * y[:, -keep:].to(x.dtype), lw.W_o), shift, num, den, mx


def channel_mix4(K, net, lw, x, st):
    C = x.shape[-1]
    mixes, shift = kops.ln_mix(K, x.contiguous(), st.ffn_shift, *lw.ln2, lw.ffn_mix.view(2, C), v4_order=True)
    xk, xr = mixes.unbind(0)
    r, hidden = F.linear(xr, lw.ffn_receptance), F.linear(xk, lw.ffn_key)
    kops.act_inplace(K, hidden, kops.ACT_RELU_SQUARE, r, kops.ACT_SIGMOID)
    return r * F.linear(hidden, lw.ffn_value), shift
