"""One decoding step (T = 1) for B sequences from the fused kernels, on static buffers.

`build_step(net, K, state, tokens, logits)` returns a function of no arguments that reads the
token ids in `tokens` [B] and the state in `state` (updated in place), and writes fp32 logits [B, V].
Every launch and its arguments are prepared once, so the function is what a CUDA graph captures.

Launches per layer (RWKV-7): LN1 + six token-shift mixes; one gemv launch for r, k, v and the four
LoRA down-projections; one for the four LoRA up-projections (tanh / sigmoid on their inputs); the
fused WKV step (decay, keys, delta-rule update, readout, GroupNorm, bonus, gate); the output
projection with the residual add; LN2 + mix; FFN key (relu^2); FFN value with the residual add.
RWKV-4 is the same shape with its own mixes and a receptance-gated FFN. Products go through
kernels/gemv.cu for B <= 4 in fp16/bf16, else through cuBLAS (`twins.gemv_torch`).
"""

from __future__ import annotations

import torch

from . import kops
from .twins import Seg, gemv_torch


class _Builder:
    def __init__(self, net, K, B: int):
        self.net, self.K, self.B = net, K, B
        self.dt, self.dev = net.dtype, net.device
        self.use_gemv = B <= kops.GEMV_MAX_B and self.dt in (torch.float16, torch.bfloat16)
        self.ops = []

    def buf(self, *shape, dtype=None):
        return torch.zeros(*shape, dtype=dtype or self.dt, device=self.dev)

    def products(self, segs: list[Seg]) -> None:
        if self.use_gemv:
            payload, grid, smem = kops.gemv_payload(segs)
            if smem <= self.K.max_smem:
                kern = kops.gemv_kernel(self.K, segs)
                self.ops.append(lambda: kern.launch(grid, 256, payload, smem))
                return
        self.ops.append(lambda: gemv_torch(segs))

    def ln_mix(self, x, shift, w, b, mix, v4_order, out, shift_out=None, xx_out=None):
        kern = self.K.get(f"ln_mix_{kops.SUFFIX[self.dt]}")
        n = 0 if mix is None else mix.shape[0]
        C = x.shape[-1]
        self.ops.append(lambda: kern(self.B, 256, x, shift, w, b, mix, out, xx_out, shift_out, 1, C, n, int(v4_order)))

    def embed_and_head(self, tokens, logits, body):
        """x = emb[tokens]; the layers (`body(x)`); logits = head(LN_out(x))."""
        C = self.net.cfg.n_embd
        x = self.buf(self.B, C)
        self.ops.append(lambda: torch.index_select(self.net.emb, 0, tokens, out=x))
        body(x)
        xo = self.buf(self.B, C)
        self.ln_mix(x, x, *self.net.ln_out, None, False, out=xo, xx_out=xo)
        self.products([Seg(xo, self.net.head, logits)])

    def function(self):
        ops = tuple(self.ops)

        def step():
            for op in ops:
                op()

        return step


def build_step7(net, K, state, tokens, logits):
    cfg = net.cfg
    b = _Builder(net, K, tokens.shape[0])
    B, C, H = b.B, cfg.n_embd, cfg.n_head
    mixes = b.buf(6, B, C)
    xr, xk, xv, xw, xa, xg = mixes.unbind(0)
    r, k, v, wz, az, vz, g, vf, y = (b.buf(B, C) for _ in range(9))
    ffn_in = b.buf(1, B, C)
    hidden = b.buf(B, net.layers[0].ffn_key.shape[0])

    def body(x):
        for lw, st in zip(net.layers, state.layers):
            first = lw.v0 is None
            lo = {n: b.buf(B, getattr(lw, n + "1").shape[0]) for n in ("w", "a", "v", "g") if not (first and n == "v")}
            b.ln_mix(x, st.att_shift, *lw.ln1, lw.mix.view(6, C), False, out=mixes, shift_out=st.att_shift)
            b.products([Seg(xr, lw.W_r, r), Seg(xk, lw.W_k, k), Seg(xv, lw.W_v, v), Seg(xw, lw.w1, lo["w"]),
                        Seg(xa, lw.a1, lo["a"]), Seg(xg, lw.g1, lo["g"])]
                       + ([] if first else [Seg(xv, lw.v1, lo["v"])]))
            b.products([Seg(lo["w"], lw.w2, wz, in_act=1), Seg(lo["a"], lw.a2, az), Seg(lo["g"], lw.g2, g, in_act=2)]
                       + ([] if first else [Seg(lo["v"], lw.v2, vz)]))
            kern = K.get(f"wkv7_step_{kops.SUFFIX[b.dt]}")
            args = (r, k, v, wz, az, None if first else vz, g, vf, int(first), lw.w0, lw.a0,
                    lw.v0, lw.k_k, lw.k_a, lw.r_k, *lw.ln_x, st.wkv, st.wkv, y, H)
            b.ops.append(lambda kern=kern, args=args: kern(B * H, 256, *args))
            b.products([Seg(y, lw.W_o, x, res=x)])
            b.ln_mix(x, st.ffn_shift, *lw.ln2, lw.ffn_mix.view(1, C), False, out=ffn_in, shift_out=st.ffn_shift)
            b.products([Seg(ffn_in[0], lw.ffn_key, hidden, out_act=1)])
            b.products([Seg(hidden, lw.ffn_value, x, res=x)])

    b.embed_and_head(tokens, logits, body)
    return b.function()


def build_step4(net, K, state, tokens, logits):
    cfg = net.cfg
    b = _Builder(net, K, tokens.shape[0])
    B, C, A = b.B, cfg.n_embd, cfg.dim_att
    att_in = b.buf(3, B, C)
    xk, xv, xr = att_in.unbind(0)
    k, v = b.buf(B, A, dtype=torch.float32), b.buf(B, A, dtype=torch.float32)
    r, rwkv = b.buf(B, A), b.buf(B, A)
    ffn_in = b.buf(2, B, C)
    fk, fr = ffn_in.unbind(0)
    hidden, rr = b.buf(B, net.layers[0].ffn_key.shape[0]), b.buf(B, C)

    def body(x):
        for lw, st in zip(net.layers, state.layers):
            b.ln_mix(x, st.att_shift, *lw.ln1, lw.att_mix.view(3, C), True, out=att_in, shift_out=st.att_shift)
            b.products([Seg(xk, lw.W_k, k), Seg(xv, lw.W_v, v), Seg(xr, lw.W_r, r, out_act=2)])
            kern = K.get(f"wkv4_step_{kops.SUFFIX[b.dt]}")
            args = (lw.decay, lw.bonus, k, v, r, st.wkv_num, st.wkv_den, st.wkv_max, rwkv,
                    st.wkv_num, st.wkv_den, st.wkv_max, B, A)
            b.ops.append(lambda kern=kern, args=args: kern(-(-B * A // 256), 256, *args))
            b.products([Seg(rwkv, lw.W_o, x, res=x)])
            b.ln_mix(x, st.ffn_shift, *lw.ln2, lw.ffn_mix.view(2, C), True, out=ffn_in, shift_out=st.ffn_shift)
            b.products([Seg(fk, lw.ffn_key, hidden, out_act=1), Seg(fr, lw.ffn_receptance, rr, out_act=2)])
            b.products([Seg(hidden, lw.ffn_value, x, res=x, gate=rr, scale=0.5 if lw.halve_after else 1.0)])

    b.embed_and_head(tokens, logits, body)
    return b.function()


def build_step(net, K, state, tokens, logits):
    """The kernel decoding step for this model, or None where the kernels do not apply."""
    if net.cfg.version == "7":
        if net.cfg.head_size != kops.HEAD_SIZE:
            return None
        return build_step7(net, K, state, tokens, logits)
    return build_step4(net, K, state, tokens, logits)
