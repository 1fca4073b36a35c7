"""One decoding step (T = 1) for B sequences from the fused kernels, on static buffers.

`build_step(net, K, src, dst, tokens, logits)` returns a function of no arguments that reads the
token ids in `tokens` [B] and the state `src`, and writes the new state into `dst` (a different
set of buffers: nothing is updated in place) and fp32 logits [B, V] into `logits`. Every launch
and its arguments are prepared once, so the function is what a CUDA graph captures.

Launches per layer (RWKV-7, B <= 4 in fp16/bf16): one gemv launch for r, k, v and the four LoRA
down-projections, each staging LN1 + its token-shift mix itself (the first block also writes the
LayerNorm output, the next token's shift, into `dst`); one for the four LoRA up-projections
(tanh / sigmoid on their inputs); the fused WKV step (decay, keys, delta-rule update, readout,
GroupNorm, bonus, gate); the output projection with the residual add; the FFN key with LN2 + mix
staged and relu^2; the FFN value with the residual add. Six launches; RWKV-4 has five. For larger
batches and fp32, a separate ln_mix launch feeds cuBLAS products (`twins.gemv_torch`, their
activations in one `act_inplace` launch); RWKV-7 then forms r, k, v and its LoRA projections as
three batched products over stacked weights, the LoRA chain on a second stream beside r, k, v.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..models.rwkv7 import stack_lora_up
from . import kops
from .graph import side_stream
from .twins import Seg, gemv_torch

OUT_ACT = {1: kops.ACT_RELU_SQUARE, 2: kops.ACT_SIGMOID}  # Seg.out_act -> act_inplace's act


class _Builder:
    def __init__(self, net, K, B: int):
        self.net, self.K, self.B = net, K, B
        self.dt, self.dev = net.dtype, net.device
        # kernels/gemv.cu for B <= 4 in half precision (LayerNorm fused into its staging); else
        # a separate ln_mix launch and cuBLAS products
        self.fused = B <= kops.GEMV_MAX_B and self.dt in (torch.float16, torch.bfloat16) and K.max_smem > 0
        self.ops = []
        # Launches hold raw pointers (prepared gemv parameters, captured graphs): every buffer they
        # touch must outlive them, or the allocator hands its memory to someone else.
        self.keep = []

    def buf(self, *shape, dtype=None):
        t = torch.zeros(*shape, dtype=dtype or self.dt, device=self.dev)
        self.keep.append(t)
        return t

    def products(self, segs: list[Seg]) -> None:
        if self.fused:
            payload, grid, smem = kops.gemv_payload(segs)
            if smem <= self.K.max_smem:
                kern = kops.gemv_kernel(self.K, segs)
                self.keep.append(segs)
                self.ops.append(lambda: kern.launch(grid, 256, payload, smem))
                return
        # cuBLAS: the activations of plain products (relu^2, sigmoid) in one act_inplace launch
        # afterwards, instead of PyTorch's one or two launches for each
        acts = [(s.y, OUT_ACT[s.out_act]) for s in segs if s.out_act and s.res is None and s.gate is None
                and s.scale == 1.0 and not s.out_f32][:2]
        if not acts:
            self.ops.append(lambda: gemv_torch(segs))
            return
        bare = [replace(s, out_act=0) if any(s.y is y for y, _ in acts) else s for s in segs]
        args = [a for pair in acts for a in pair]

        def op():
            gemv_torch(bare)
            kops.act_inplace(self.K, *args)

        self.ops.append(op)

    def ln_mix(self, x, shift, w, b, mix, v4_order, out, shift_out=None, xx_out=None):
        kern = self.K.get(f"ln_mix_{kops.SUFFIX[self.dt]}")
        n = 0 if mix is None else mix.shape[0]
        C = x.shape[-1]
        self.ops.append(lambda: kern(self.B, kops.LN_MIX_BLOCK, x, shift, w, b, mix, out, xx_out, shift_out, 1, C, n,
                                     int(v4_order)))

    def normed(self, x, shift, ln, mixes, v4_order, shift_out):
        """Inputs of the products after a LayerNorm, with the token shift from `shift` (the previous
        token's LayerNorm output); this token's goes to `shift_out`. With `fused`, LayerNorm + token
        shift become the staging of each product (`in_act` 3/4); else one ln_mix launch writes the
        mixed inputs. Returns, per mix vector, the keyword arguments of a Seg."""
        if self.fused:
            act = 4 if v4_order else 3
            return [dict(x=x, in_act=act, shift=shift, ln=ln, mix=m, xx_out=shift_out if i == 0 else None)
                    for i, m in enumerate(mixes.unbind(0))]
        out = self.buf(mixes.shape[0], self.B, x.shape[-1])
        self.ln_mix(x, shift, *ln, mixes, v4_order, out=out, shift_out=shift_out)
        return [dict(x=o) for o in out.unbind(0)]

    def embed_and_head(self, tokens, logits, body):
        """x = emb[tokens]; the layers (`body(x)`); logits = head(LN_out(x))."""
        C = self.net.cfg.n_embd
        x = self.buf(self.B, C)
        self.ops.append(lambda: torch.index_select(self.net.emb, 0, tokens, out=x))
        body(x)
        if self.fused:
            self.products([Seg(x, self.net.head, logits, in_act=5, ln=self.net.ln_out)])
        else:
            xo = self.buf(self.B, C)
            self.ln_mix(x, x, *self.net.ln_out, None, False, out=xo, xx_out=xo)
            self.products([Seg(xo, self.net.head, logits)])

    def function(self):
        ops = tuple(self.ops)

        def step():
            for op in ops:
                op()

        step.keep_alive = self.keep  # buffers and products the launches point into
        return step


def build_step7(net, K, src, dst, tokens, logits):
    cfg = net.cfg
    b = _Builder(net, K, tokens.shape[0])
    B, C, H = b.B, cfg.n_embd, cfg.n_head
    # Larger batches on cuBLAS: r, k, v as one batched product and the LoRA projections as two
    # (stacked weights), since at B = 64 the many small launches cost more than their bytes.
    batched = not b.fused and net.layers[0].W_rkv is not None
    if batched:
        mixes, rkv, ups = b.buf(6, B, C), b.buf(3, B, C), b.buf(4, B, C)
        lows = b.buf(4 * B * max(lw.lora_down.shape[1] for lw in net.layers))
        (r, k, v), (vz, wz, az, g) = rkv.unbind(0), ups.unbind(0)
        vf, y = b.buf(B, C), b.buf(B, C)
    else:
        r, k, v, wz, az, vz, g, vf, y = (b.buf(B, C) for _ in range(9))
    hidden = b.buf(B, net.layers[0].ffn_key.shape[0])

    side = side_stream(b.dev, "lora") if batched and b.dev.type == "cuda" else None  # the LoRA branch

    def lora_batched(lw):
        """mixes -> r, k, v and the LoRA outputs vz, wz, az, g (tanh on w's hidden lanes and
        sigmoid on g's before their up-projections), in three products."""
        low = lows[: 4 * B * lw.lora_down.shape[1]].view(4, B, -1)
        W_up = stack_lora_up(lw).transpose(1, 2)

        def lora_chain():
            torch.bmm(mixes[2:], lw.lora_down.transpose(1, 2), out=low)  # inputs v, w, a, g
            kops.act_inplace(K, low[1], kops.ACT_TANH, low[3], kops.ACT_SIGMOID)
            torch.bmm(low, W_up, out=ups)

        def op():
            if side is None:
                lora_chain()
                torch.bmm(mixes[:3], lw.W_rkv.transpose(1, 2), out=rkv)
                return
            # The LoRA chain needs only the mixes, like r, k, v: it runs on a second stream (a
            # parallel branch of the captured graph), since neither product fills the GPU at B = 64.
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                lora_chain()
            torch.bmm(mixes[:3], lw.W_rkv.transpose(1, 2), out=rkv)
            main.wait_stream(side)

        b.ops.append(op)

    def body(x):
        for lw, st, new in zip(net.layers, src.layers, dst.layers, strict=False):
            first = lw.v0 is None
            if batched:
                b.ln_mix(x, st.att_shift, *lw.ln1, lw.mix.view(6, C), False, out=mixes, shift_out=new.att_shift)
                lora_batched(lw)
            else:
                lo = {n: b.buf(B, getattr(lw, n + "1").shape[0]) for n in ("w", "a", "v", "g") if not (first and n == "v")}
                ir, ik, iv, iw, ia, ig = b.normed(x, st.att_shift, lw.ln1, lw.mix.view(6, C), False, new.att_shift)
                b.products([Seg(W=lw.W_r, y=r, **ir), Seg(W=lw.W_k, y=k, **ik), Seg(W=lw.W_v, y=v, **iv),
                            Seg(W=lw.w1, y=lo["w"], **iw), Seg(W=lw.a1, y=lo["a"], **ia), Seg(W=lw.g1, y=lo["g"], **ig)]
                           + ([] if first else [Seg(W=lw.v1, y=lo["v"], **iv)]))
                b.products([Seg(lo["w"], lw.w2, wz, in_act=1), Seg(lo["a"], lw.a2, az), Seg(lo["g"], lw.g2, g, in_act=2)]
                           + ([] if first else [Seg(lo["v"], lw.v2, vz)]))
            kern = K.get(f"wkv7_step_{kops.SUFFIX[b.dt]}")
            args = (r, k, v, wz, az, None if first else vz, g, vf, int(first), lw.w0, lw.a0,
                    lw.v0, lw.k_k, lw.k_a, lw.r_k, *lw.ln_x, st.wkv, new.wkv, y, H)
            b.ops.append(lambda kern=kern, args=args: kern(B * H, 256, *args))
            b.products([Seg(y, lw.W_o, x, res=x)])
            (fk,) = b.normed(x, st.ffn_shift, lw.ln2, lw.ffn_mix.view(1, C), False, new.ffn_shift)
            b.products([Seg(W=lw.ffn_key, y=hidden, out_act=1, **fk)])
            b.products([Seg(hidden, lw.ffn_value, x, res=x)])

    b.embed_and_head(tokens, logits, body)
    return b.function()


def build_step4(net, K, src, dst, tokens, logits):
    cfg = net.cfg
    b = _Builder(net, K, tokens.shape[0])
    B, C, A = b.B, cfg.n_embd, cfg.dim_att
    k, v = b.buf(B, A, dtype=torch.float32), b.buf(B, A, dtype=torch.float32)
    r, rwkv = b.buf(B, A), b.buf(B, A)
    hidden, rr = b.buf(B, net.layers[0].ffn_key.shape[0]), b.buf(B, C)

    def body(x):
        for lw, st, new in zip(net.layers, src.layers, dst.layers, strict=False):
            ik, iv, ir = b.normed(x, st.att_shift, lw.ln1, lw.att_mix.view(3, C), True, new.att_shift)
            b.products([Seg(W=lw.W_k, y=k, **ik), Seg(W=lw.W_v, y=v, **iv), Seg(W=lw.W_r, y=r, out_act=2, **ir)])
            kern = K.get(f"wkv4_step_{kops.SUFFIX[b.dt]}")
            args = (lw.decay, lw.bonus, k, v, r, st.wkv_num, st.wkv_den, st.wkv_max, rwkv,
                    new.wkv_num, new.wkv_den, new.wkv_max, B, A)
            b.ops.append(lambda kern=kern, args=args: kern(-(-B * A // 256), 256, *args))
            b.products([Seg(rwkv, lw.W_o, x, res=x)])
            fk, fr = b.normed(x, st.ffn_shift, lw.ln2, lw.ffn_mix.view(2, C), True, new.ffn_shift)
            b.products([Seg(W=lw.ffn_key, y=hidden, out_act=1, **fk), Seg(W=lw.ffn_receptance, y=rr, out_act=2, **fr)])
            b.products([Seg(hidden, lw.ffn_value, x, res=x, gate=rr, scale=0.5 if lw.halve_after else 1.0)])

    b.embed_and_head(tokens, logits, body)
    return b.function()


def build_step(net, K, src, dst, tokens, logits):
    """The kernel decoding step for this model (state `src` -> `dst`), for which `net._kernels()`
    gave `K` (RWKV-4, or RWKV-7 with head size 64 and no DeepEmbed)."""
    return (build_step7 if net.cfg.version == "7" else build_step4)(net, K, src, dst, tokens, logits)
