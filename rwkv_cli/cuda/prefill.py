"""Prompt (T > 1) time-mix and channel-mix on the GPU: cuBLAS for the products, the fused kernels
for everything between them. Same inputs and outputs as the methods of `RWKV7` / `RWKV4` they
replace (`rwkv_cli/models/`), which stay the reference.

RWKV-7 per layer: LN1 + the six token-shift mixes in one kernel (`ln_mix`), r, k, v as one batched
product and the four LoRA down-projections as another (stacked weights, `stack_for_prompts`),
tanh and sigmoid on their w and g lanes in one `act_inplace`, the up-projections of v, w, a as one
batched product (`stack_lora_up3`) and g's on its own, `wkv7_prep` (steps 3-7 for all tokens),
`wkv7_chunk_mats` + `wkv7_chunk` (the recurrence in 16-token chunks: every chunk's factors, written
over the dead d, kk and beta, then the state carried through them), `wkv7_post`
(GroupNorm, bonus, gate) for the positions that are kept, the output product. RWKV-4: `ln_mix`,
products (k and v as one batched product with fp32 output), `wkv4_seq`, output product.

The products run on cuBLAS, except for models small enough that cuBLAS's workspace (32 MiB a
stream on Hopper, allocated at its first call) would be a large part of their memory: those use
kernels/gemm.cu (`own_gemm`), which needs none. At 0.1B the prompts are host-bound either way.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..models.rwkv7 import stack_lora_up3
from ..ops import bmm_fp32_out, linear_fp32_out
from . import kops

# Weights under 20 workspaces (640 MiB: v7 0.1B, v4 169M) take kernels/gemm.cu, where the workspace
# would be over 5% of them. RWKV_GEMM=cublas or =own overrides the choice (A/B measurements).
OWN_GEMM_BELOW = 20 * 32 * 2**20


def own_gemm(net) -> bool:
    """Whether `net`'s prompt products (and the head's) run on kernels/gemm.cu instead of cuBLAS."""
    flag = getattr(net, "_own_gemm", None)
    if flag is None:
        choice = os.environ.get("RWKV_GEMM", "")
        flag = choice == "own" or (choice != "cublas" and net.weights_nbytes() < OWN_GEMM_BELOW)
        net._own_gemm = flag
    return flag


def linear(K, net, x, W, res=None, out_f32: bool = False):
    """x W^T (+ res, [..., N] like the output; 16-bit outputs only), or fp32 out (no res): one call
    either way (cuBLAS adds res with beta = 1, summed in fp32 before rounding, like kernels/gemm.cu)."""
    if own_gemm(net) and kops.gemm_fits(x, W):
        return kops.gemm(K, x, W, None if res is None else res.contiguous(), out_f32)
    if out_f32:
        return linear_fp32_out(x, W)
    if res is None:
        return F.linear(x, W)
    O, In = W.shape
    return torch.addmm(res.reshape(-1, O), x.reshape(-1, In), W.t()).view(*x.shape[:-1], O)


def bmm(K, net, x, W, out_f32: bool = False):
    """x [n, M, K] @ W [n, N, K]^T -> [n, M, N]."""
    if own_gemm(net) and kops.gemm_fits(x, W):
        return kops.gemm(K, x, W, out_f32=out_f32)
    return bmm_fp32_out(x, W) if out_f32 else torch.bmm(x, W.transpose(1, 2))


def _last(t: torch.Tensor, keep: int) -> torch.Tensor:
    return t if keep == t.shape[1] else t[:, -keep:].contiguous()


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
        r, k, v = bmm(K, net, rows[:3], lw.W_rkv).view(3, B, T, C).unbind(0)
        down = bmm(K, net, rows[2:], lw.lora_down)  # inputs v, w, a, g: [4, B*T, D]
        del rows, mixes
        kops.act_inplace(K, down[1], kops.ACT_TANH, down[3], kops.ACT_SIGMOID)
        up = stack_lora_up3(lw)  # v, w, a as one product; g (the widest) on its own
        vz, wz, az = bmm(K, net, down[:3, :, : up.shape[2]], up).view(3, B, T, C).unbind(0)
        vz = None if first else vz
        hg = down[3].view(B, T, -1)[..., : lw.g2.shape[1]]
        del down
    else:
        xr, xk, xv, xw, xa, xg = mixes.unbind(0)
        del mixes
        lin = lambda h, W: linear(K, net, h, W)  # noqa: E731
        r, k, v = lin(xr, lw.W_r), lin(xk, lw.W_k), lin(xv, lw.W_v)
        hw, ha, hg = lin(xw, lw.w1), lin(xa, lw.a1), torch.sigmoid(lin(_last(xg, keep), lw.g1))
        hv = None if first else lin(xv, lw.v1)
        del xr, xk, xv, xw, xa, xg
        wz = lin(torch.tanh(hw), lw.w2)
        az = lin(ha, lw.a2)
        vz = None if first else lin(hv, lw.v2)
        del hw, ha, hv
    r32, d, kk, kw, vw, beta = kops.wkv7_prep(K, r, k, v, wz, az, vz, None if first else v_first.contiguous(),
                                              lw.w0, lw.a0, lw.v0, lw.k_k, lw.k_a, H)
    del r, k, wz, az, vz
    if first:  # a copy: v is a view of the r, k, v product, which can go now
        v_first = v.clone()
    del v
    y, wkv = kops.wkv7_seq(K, st.wkv.contiguous(), r32, d, kk, kw, beta, vw)
    del d, kk, beta
    g = linear(K, net, hg[:, -keep:], lw.g2)  # sigmoid already applied
    out = kops.wkv7_post(K, *(_last(t, keep) for t in (y, r32, kw, vw)), g, lw.r_k, *lw.ln_x, H)
    del y, r32, kw, vw, g
    return linear(K, net, out, lw.W_o, res=x[:, -keep:]), shift, wkv, v_first


def channel_mix7(K, net, lw, x, st):
    """RWKV7.channel_mix: returns (x + the channel-mix output, ffn_shift)."""
    C = x.shape[-1]
    mixes, shift = kops.ln_mix(K, x.contiguous(), st.ffn_shift, *lw.ln2, lw.ffn_mix.view(1, C), v4_order=False)
    hidden = linear(K, net, mixes[0], lw.ffn_key)
    del mixes
    kops.act_inplace(K, hidden, kops.ACT_RELU_SQUARE)
    return linear(K, net, hidden, lw.ffn_value, res=x), shift


def time_mix4(K, net, lw, x, st, keep: int):
    """RWKV4.time_mix: returns (output for the last `keep` positions, att_shift, num, den, max)."""
    C = x.shape[-1]
    mixes, shift = kops.ln_mix(K, x.contiguous(), st.att_shift, *lw.ln1, lw.att_mix.view(3, C), v4_order=True)
    xk, xv, xr = mixes.unbind(0)
    r = torch.sigmoid(linear(K, net, xr[:, -keep:], lw.W_r))
    if lw.W_kv is not None:  # k and v in one batched product (fp32 out: they feed exp())
        B, T, _ = x.shape
        k, v = bmm(K, net, mixes[:2].view(2, B * T, C), lw.W_kv, out_f32=True).view(2, B, T, -1).unbind(0)
    else:
        k, v = linear(K, net, xk, lw.W_k, out_f32=True), linear(K, net, xv, lw.W_v, out_f32=True)
    y, num, den, mx = kops.wkv4_seq(K, lw.decay, lw.bonus, k.contiguous(), v.contiguous(),
                                    st.wkv_num.contiguous(), st.wkv_den.contiguous(), st.wkv_max.contiguous())
    return linear(K, net, r * y[:, -keep:].to(x.dtype), lw.W_o), shift, num, den, mx


def channel_mix4(K, net, lw, x, st):
    C = x.shape[-1]
    mixes, shift = kops.ln_mix(K, x.contiguous(), st.ffn_shift, *lw.ln2, lw.ffn_mix.view(2, C), v4_order=True)
    xk, xr = mixes.unbind(0)
    r, hidden = linear(K, net, xr, lw.ffn_receptance), linear(K, net, xk, lw.ffn_key)
    kops.act_inplace(K, hidden, kops.ACT_RELU_SQUARE, r, kops.ACT_SIGMOID)
    return r * linear(K, net, hidden, lw.ffn_value), shift
