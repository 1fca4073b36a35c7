"""Plain PyTorch twins of the CUDA kernels in `kernels/`: same inputs, same outputs, fp32 math.

They are the test oracles (tests/test_cuda_kernels.py compares each kernel with its twin) and
document what each kernel computes. The recurrences' twins live in `rwkv_cli.wkv`
(`wkv7_sequence`, `wkv4_sequence`, `wkv4_step`). Shapes: R rows (= B*T tokens), C = H*N channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import linear_fp32_out
from ..wkv import _chunked

DECAY_SCALE = math.exp(-0.5)


def ln_mix(x, shift, w, b, mix, v4_order: bool):
    """kernels/layernorm.cu. x [B, T, C], shift [B, C], mix [n, C] ->
    (mixes [n, B, T, C], xx = LN(x) [B, T, C], new shift = xx[:, -1])."""
    xx = F.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float()).to(x.dtype).float()
    prev = torch.cat([shift.float().unsqueeze(1), xx[:, :-1]], 1)
    base, other = (prev, xx) if v4_order else (xx, prev)
    out = base + (other - base) * mix.float().view(-1, 1, 1, x.shape[-1])
    return out.to(x.dtype), xx.to(x.dtype), xx[:, -1].to(x.dtype)


@dataclass
class Seg:
    """One product of kernels/gemv.cu: y = ((act_out(in(x) @ W^T) * gate) + res) * scale, where
    in(x) is x, tanh(x), sigmoid(x) (in_act 0-2) or the LayerNorm of the residual x with the token
    shift: 3 xx + (shift - xx) * mix (v7), 4 shift + (xx - shift) * mix (v4), 5 xx."""

    x: torch.Tensor  # [B, I]
    W: torch.Tensor  # [O, I]
    y: torch.Tensor  # [B, O], written
    res: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    in_act: int = 0  # 0 none, 1 tanh, 2 sigmoid, 3/4/5 LayerNorm (+ mix)
    out_act: int = 0  # 0 none, 1 relu^2, 2 sigmoid
    scale: float = 1.0
    shift: torch.Tensor | None = None  # [B, I]
    ln: tuple | None = None  # (weight, bias) [I]
    mix: torch.Tensor | None = None  # [I]
    xx_out: torch.Tensor | None = None  # [B, I]: receives LN(x)

    @property
    def out_f32(self) -> bool:
        return self.y.dtype == torch.float32 and self.W.dtype != torch.float32


def _stage(s: Seg) -> torch.Tensor:
    """The product's input as the kernel stages it (rounded to x's dtype); writes xx_out."""
    x = s.x
    if s.in_act in (1, 2):
        return (torch.tanh if s.in_act == 1 else torch.sigmoid)(x.float()).to(x.dtype)
    if s.in_act >= 3:
        xx = F.layer_norm(x.float(), (x.shape[-1],), s.ln[0].float(), s.ln[1].float()).to(x.dtype)
        if s.xx_out is not None:
            s.xx_out.copy_(xx)
        if s.in_act == 5:
            return xx
        base, other = (xx.float(), s.shift.float()) if s.in_act == 3 else (s.shift.float(), xx.float())
        return (base + (other - base) * s.mix.float()).to(x.dtype)
    return x


def _epilogue(acc, s: Seg):
    if s.out_act == 1:
        acc = torch.relu(acc).square()
    elif s.out_act == 2:
        acc = torch.sigmoid(acc)
    if s.gate is not None:
        acc = acc * s.gate.to(acc.dtype)
    if s.res is not None:
        acc = acc + s.res.to(acc.dtype)
    return acc * s.scale if s.scale != 1.0 else acc


def act_inplace(x, act: int, x2=None, act2: int = 0) -> None:
    """kernels/layernorm.cu act_inplace: act 1 relu^2, 2 tanh, 3 sigmoid, in fp32, rounded."""
    fns = {1: lambda t: torch.relu(t).square(), 2: torch.tanh, 3: torch.sigmoid}
    for t, a in ((x, act), (x2, act2)):
        if t is not None:
            t.copy_(fns[a](t.float()))


def gemv_reference(segs: list[Seg]) -> None:
    """kernels/gemv.cu in fp32 (inputs staged and rounded as the kernel does)."""
    outs = [_epilogue(_stage(s).float() @ s.W.float().t(), s) for s in segs]
    for s, out in zip(segs, outs, strict=False):
        s.y.copy_(out)


def gemv_torch(segs: list[Seg]) -> None:
    """The same products through cuBLAS in the weights' dtype: the path for B > 4 and fp32.
    Plain products and in-place residual adds write straight into y."""
    staged = [_stage(s) for s in segs]  # every input before any output: outputs may feed nothing here
    for s, x in zip(segs, staged, strict=False):
        plain = s.gate is None and s.scale == 1.0 and not s.out_f32
        if plain and s.res is None:
            torch.mm(x, s.W.t(), out=s.y)
            if s.out_act == 1:
                s.y.relu_().square_()
            elif s.out_act == 2:
                s.y.sigmoid_()
        elif plain and s.out_act == 0 and s.res is not None and s.res.data_ptr() == s.y.data_ptr():
            s.y.addmm_(x, s.W.t())
        else:
            acc = linear_fp32_out(x, s.W) if s.out_f32 else F.linear(x, s.W)
            s.y.copy_(_epilogue(acc, s))


def wkv7_prep(r, k, v, wz, az, vz, vf, w0, a0, v0, k_k, k_a, H: int):
    """kernels/rwkv7.cu wkv7_prep (steps 3-7). [R, C] inputs (vz, vf None in layer 0) ->
    fp32 [R, C] each: r, decay d, normalised removal key kk, write key kw, value vw, beta = kk * a."""
    R, C = k.shape
    f = lambda t: t.float()  # noqa: E731
    d = torch.exp(-DECAY_SCALE * torch.sigmoid(w0.float() + f(wz)))
    a = torch.sigmoid(f(a0) + f(az))
    kk = F.normalize((f(k) * f(k_k)).view(R, H, -1), dim=-1).view(R, C)
    kw = f(k) * (1 + (a - 1) * f(k_a))
    vw = f(v) if vz is None else f(v) + (f(vf) - f(v)) * torch.sigmoid(f(v0) + f(vz))
    return f(r), d, kk, kw, vw, kk * a


def wkv7_post(y, r, kw, vw, g, r_k, ln_w, ln_b, H: int):
    """kernels/rwkv7.cu wkv7_post (steps 10-12): fp32 y, r, kw, vw [R, C]; g [R, C] -> out in g's dtype."""
    R, C = y.shape
    yn = F.group_norm(y.float(), H, ln_w.float(), ln_b.float(), eps=64e-5)
    bonus = (r * kw * r_k.float().reshape(1, C)).view(R, H, -1).sum(-1, keepdim=True)
    out = (yn + (bonus * vw.view(R, H, -1)).view(R, C)) * g.float()
    return out.to(g.dtype)


def wkv7_recurrence_step(S, r, d, kk, kw, beta, vw):
    """Step 8-9 for one token from prepared fp32 vectors [B, C]; S [B, H, N, N] -> (y [B, C], S)."""
    B, H, N, _ = S.shape
    h = lambda t: t.view(B, H, N)  # noqa: E731
    sa = -(S @ h(kk).unsqueeze(-1))  # S alpha, alpha = -kk: [B, H, N, 1]
    S = S * h(d).unsqueeze(2) + sa * h(beta).unsqueeze(2) + h(vw).unsqueeze(-1) * h(kw).unsqueeze(2)
    return (S @ h(r).unsqueeze(-1)).view(B, H * N), S


# kernels/rwkv7_chunk.cu's split of the prompt recurrence, 16 tokens a chunk (derivation there):
# wkv7_chunk_mats forms every chunk's state-independent factors, wkv7_chunk carries the state.
# CH and CHUNK_MATS there (kops launches with these): tokens a chunk, and floats a (sequence, head,
# chunk) in its buffer: kw / D, Uh, Uy, D_CH
CHUNK = 16
CHUNK_MATS = CHUNK * 64 + 2 * CHUNK * CHUNK + 64


def _per_chunk(x, T: int, H: int, inert: float = 0.0):
    """[B, T, C] -> fp32 [B, H, chunks, CHUNK, N], the last chunk padded with `inert`."""
    return _chunked(x.view(x.shape[0], T, H, -1), CHUNK, -(-T // CHUNK), inert).permute(0, 3, 1, 2, 4)


def _to_rows(x, T: int):
    """_per_chunk's inverse, dropping the padding: [B, H, chunks, CHUNK, N] -> [B, T, C]."""
    B, H, nc, _, N = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, nc * CHUNK, H * N)[:, :T]


def wkv7_chunk_mats(r, d, kk, kw, beta, H: int):
    """kernels/rwkv7_chunk.cu wkv7_chunk_mats: fp32 [B, T, C] r, d, kk, kw, beta -> (Q, W, B',
    mats). With D_t the decays' product inside a chunk (D_-1 = 1), per chunk and head:
    Q, W, B' [B, T, C] (the kernel writes them over d, kk and beta) are Q = r D - A_rb W,
    W = (I + G_ab)^-1 (kk D_-1) and B' = beta / D; mats [B, H, chunks, CHUNK_MATS] holds
    kw / D [16, N], Uh = (I + G_ab)^-1 G_ak, Uy = A_rk - A_rb Uh ([16, 16] each) and D_CH [N]."""
    B, T, _ = r.shape
    r, kk, kw, beta = (_per_chunk(t, T, H) for t in (r, kk, kw, beta))
    D = torch.cumprod(_per_chunk(d, T, H, inert=1.0), dim=-2)
    D_prev = torch.cat([torch.ones_like(D[..., :1, :]), D[..., :-1, :]], -2)
    Kd, Rd, VW, VB = kk * D_prev, r * D, kw / D, beta / D
    strict = torch.ones(CHUNK, CHUNK, device=r.device).tril(-1)
    causal = strict + torch.eye(CHUNK, device=r.device)
    G_ab, G_ak = (Kd @ VB.mT) * strict, (Kd @ VW.mT) * strict
    A_rb, A_rk = (Rd @ VB.mT) * causal, (Rd @ VW.mT) * causal
    X = torch.linalg.solve_triangular(G_ab + torch.eye(CHUNK, device=r.device), torch.cat([Kd, G_ak], -1),
                                      upper=False, unitriangular=True)
    W, Uh = X[..., :-CHUNK], X[..., -CHUNK:]
    Q, Uy = Rd - A_rb @ W, A_rk - A_rb @ Uh
    mats = torch.cat([VW.flatten(-2), Uh.flatten(-2), Uy.flatten(-2), D[..., -1, :]], -1)
    return _to_rows(Q, T), _to_rows(W, T), _to_rows(VB, T), mats


def wkv7_chunk(Q, W, VB, vw, mats, S):
    """kernels/rwkv7_chunk.cu wkv7_chunk: wkv7_chunk_mats' outputs, the values vw [B, T, C] and
    the state S [B, H, N, N] -> (y [B, T, C], S). Per chunk, for each row s of S with its values
    v_t (t < 16): h = W s + Uh v, y = Q s + Uy v, s <- D_CH * (s + sum_t v_t kw_t / D_t - h_t B'_t)."""
    B, T, _ = Q.shape
    H, N = S.shape[1], S.shape[-1]
    Q, W, VB, V = (_per_chunk(t, T, H) for t in (Q, W, VB, vw))
    VW, Uh, Uy, Dc = mats.split([CHUNK * N, CHUNK * CHUNK, CHUNK * CHUNK, N], -1)
    VW, Uh, Uy = VW.unflatten(-1, (CHUNK, N)), *(m.unflatten(-1, (CHUNK, CHUNK)) for m in (Uh, Uy))
    S, ys = S.float(), []
    for j in range(Q.shape[2]):  # rows of S are values i, columns keys; V[..., j, :, :] is [t, i]
        Vt = V[:, :, j].mT  # [B, H, N (i), 16 (t)]
        h = S @ W[:, :, j].mT + Vt @ Uh[:, :, j].mT  # [B, H, i, t]
        ys.append(S @ Q[:, :, j].mT + Vt @ Uy[:, :, j].mT)
        S = (S + Vt @ VW[:, :, j] - h @ VB[:, :, j]) * Dc[:, :, j].unsqueeze(-2)
    y = torch.stack(ys, 2).mT  # [B, H, chunks, t, i]
    return _to_rows(y, T), S


def wkv7_step(r, k, v, wz, az, vz, g, vf, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, S):
    """kernels/rwkv7.cu wkv7_step: steps 3-12 for one token of B sequences ([B, C] inputs,
    vz None in layer 0, where v_first becomes v). Returns (out [B, C], S, v_first)."""
    H = S.shape[1]
    r32, d, kk, kw, vw, beta = wkv7_prep(r, k, v, wz, az, vz, vf, w0, a0, v0, k_k, k_a, H)
    y, S = wkv7_recurrence_step(S.float(), r32, d, kk, kw, beta, vw)
    out = wkv7_post(y, r32, kw, vw, g, r_k, ln_w, ln_b, H)
    return out, S, (v if vz is None else vf)


def wkv4_step(w, u, k, v, r, num, den, mx):
    """kernels/rwkv4.cu wkv4_step: (r * wkv in r's dtype, num, den, max)."""
    from ..wkv import wkv4_step as step

    y, num, den, mx = step(w, u, k, v, num, den, mx)
    return (r.float() * y).to(r.dtype), num, den, mx


def gemm(x, W, res=None, out_f32: bool = False):
    """kernels/gemm.cu: x [..., K] @ W [N, K]^T, or batched [n, M, K] @ [n, N, K]^T, summed in fp32,
    plus res, rounded once to the inputs' dtype (or left in fp32)."""
    y = torch.matmul(x.float(), W.float().transpose(-1, -2))
    if res is not None:
        y = y + res.float()
    return y if out_f32 else y.to(x.dtype)
