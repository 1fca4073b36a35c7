"""Python entry points of the CUDA kernels: shape checks, grids, outputs. `K` is a loaded
`loader.Kernels`; each function matches the twin of the same name in `twins.py` (or `rwkv_cli.wkv`).

Inputs must be contiguous; [B, T, C] tensors are treated as R = B*T rows of C channels.
"""

from __future__ import annotations

import os
import struct

import torch

from .loader import GEMV_PARAMS_FMT
from .twins import CHUNK, CHUNK_MATS, Seg

SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
HEAD_SIZE = 64  # the RWKV-7 kernels are written for N = 64 (every released model)

LN_MIX_BLOCK, LN_MAX_MIX = 256, 6  # kernels/layernorm.cu: a block per row, mixing vectors at most

# kernels/gemv.cu
GEMV_MAX_B = 4
GEMV_MAX_SEG = 8
GEMV_WARPS = 8  # WARPS: a block is 8 warps
GEMV_ROWS_PER_WARP = 2  # RW: a tile is GEMV_WARPS // ks * GEMV_ROWS_PER_WARP rows
GEMV_MAX_KS = 8  # warps sharing a row pair (1, 2, 4, 8)
GEMV_BLOCKS_PER_SM = 2  # MINB: blocks a multiprocessor holds at once; a launch is one wave of them
GEMV_DEFAULT_SMS = 132  # multiprocessors assumed for tensors not on a GPU (tests, emulation)
WKV7_SEQ_SMEM = 3 * 16 * 6 * 64 * 4 + 16 * 16 * 8 * 4  # kernels/rwkv7.cu WKV7_SEQ_SMEM (3 stages)
WKV7_CHUNK_MATS_SMEM = (5 * 16 * 68 + 4 * 16 * 20 + 2 * 64) * 4  # MatsSmem
WKV7_CHUNK_SMEM = (2 * 32 * 84 + 2 * 32 * 72 + 16 * 116 + 2 * 64) * 4  # ChunkSmem
# A prompt's RWKV-7 recurrence: "wkv7_chunk" (16 tokens at a time), or "wkv7_seq" (token by token)
# with RWKV_WKV7_SEQ=serial, for A/B measurements.
WKV7_SEQ_KERNEL = "wkv7_seq" if os.environ.get("RWKV_WKV7_SEQ") == "serial" else "wkv7_chunk"
_sm_counts: dict[int, int] = {}


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is not None and not t.is_contiguous():
        raise ValueError("kernel inputs must be contiguous")
    return t


def ln_mix(K, x, shift, w, b, mix, v4_order: bool, want_xx: bool = False):
    """x [B, T, C], shift [B, C], mix [n, C] -> (mixes [n, B, T, C], new shift [B, C][, xx])."""
    B, T, C = x.shape
    n = mix.shape[0] if mix is not None else 0
    if n > LN_MAX_MIX or C % (16 // x.element_size()):
        raise ValueError(f"ln_mix takes at most {LN_MAX_MIX} mixes and rows of whole 16-byte vectors")
    out = torch.empty(max(n, 1), B, T, C, dtype=x.dtype, device=x.device)
    shift_out = torch.empty(B, C, dtype=x.dtype, device=x.device)
    xx = torch.empty_like(x) if want_xx else None
    K.get(f"ln_mix_{SUFFIX[x.dtype]}")(B * T, LN_MIX_BLOCK, _c(x), _c(shift), w, b, _c(mix), out, xx, shift_out,
                                       T, C, n, int(v4_order))
    return (out[:n], shift_out, xx) if want_xx else (out[:n], shift_out)


ACT_RELU_SQUARE, ACT_TANH, ACT_SIGMOID = 1, 2, 3  # kernels/layernorm.cu act_inplace


def act_inplace(K, x, act: int, x2=None, act2: int = 0) -> None:
    """`act` applied to x and `act2` to x2 (or nothing), in place, in one launch."""
    n, n2 = x.numel(), 0 if x2 is None else x2.numel()
    per16 = 16 // x.element_size()
    if n % per16 or n2 % per16 or (x2 is not None and x2.dtype != x.dtype):
        raise ValueError("act_inplace takes whole 16-byte vectors of one dtype")
    threads = 256
    blocks = max(1, min(-(-(n + n2) // (per16 * threads)), 4 * _sm_count(x)))
    K.get(f"act_inplace_{SUFFIX[x.dtype]}")(blocks, threads, _c(x), n, act, _c(x2), n2, act2)


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _check_seg(s: Seg, B: int) -> None:
    O, In = s.W.shape
    if s.x.shape[0] != B or s.y.shape[0] != B or s.x.shape[1] != In or s.y.shape[1] != O:
        raise ValueError(f"gemv shapes do not match: x {list(s.x.shape)}, W {[O, In]}, y {list(s.y.shape)}")
    if s.x.dtype != s.W.dtype or s.W.dtype not in (torch.float16, torch.bfloat16) or not s.W.is_contiguous():
        raise ValueError("gemv needs contiguous fp16/bf16 weights and inputs of the same type")
    if In % 8 or s.x.stride(1) != 1 or s.x.stride(0) % 8 or s.x.data_ptr() % 16 or s.W.data_ptr() % 16:
        raise ValueError("gemv needs 16-byte aligned rows (I a multiple of 8)")
    ys = s.y.stride(0)
    for t in (s.res, s.gate):
        if t is not None and (t.stride(0) != ys or t.stride(1) != 1 or t.dtype != s.W.dtype):
            raise ValueError("gemv res/gate must share y's row stride and the weights' dtype")
    if s.y.stride(1) != 1 or (s.y.dtype != s.W.dtype and s.y.dtype != torch.float32):
        raise ValueError("gemv output must have unit column stride and be fp32 or the weights' dtype")
    if s.in_act >= 3:
        vecs = [*s.ln] + ([s.mix, s.shift] if s.in_act < 5 else [])
        if s.x.stride(0) != In or any(v.dtype != s.W.dtype or not v.is_contiguous() or v.data_ptr() % 16 for v in vecs) \
                or (s.in_act < 5 and tuple(s.shift.shape) != (B, In)):
            raise ValueError("gemv LayerNorm staging needs contiguous, aligned [B, I] x/shift and [I] vectors")
    if s.xx_out is not None and (not s.xx_out.is_contiguous() or s.xx_out.data_ptr() % 16 or s.xx_out.dtype != s.W.dtype):
        raise ValueError("gemv xx_out must be contiguous and aligned")


def _sm_count(t: torch.Tensor) -> int:
    if not t.is_cuda:
        return GEMV_DEFAULT_SMS
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def gemv_plan(shapes: list[tuple[int, int]], sms: int, persistent: bool = True) -> list[tuple[int, int]]:
    """How kernels/gemv.cu splits products [(O, I)] over the GPU: (ks, n_blocks) for each.

    The launch aims at one wave of GEMV_BLOCKS_PER_SM blocks on every multiprocessor. Products whose
    rows make too few tiles for that have their rows shared by ks = 2, 4 or 8 warps (each then
    sums an interleaved ks-th of I: shorter loops, more blocks) as long as the grid still fits the
    wave and every warp has at least one 512-byte piece of a row; products with more tiles than
    the wave has blocks give each block several tiles (it stages its input once for all of them).
    `persistent=False` gives every tile its own block instead (tests cover the kernel both ways)."""
    cap = GEMV_BLOCKS_PER_SM * sms
    rows = lambda k: GEMV_WARPS // k * GEMV_ROWS_PER_WARP  # noqa: E731
    ks = [1] * len(shapes)

    def tiles(i: int, k: int) -> int:
        return -(-shapes[i][0] // rows(k))

    while True:
        split = [i for i, (_, In) in enumerate(shapes) if ks[i] < GEMV_MAX_KS and In // 8 >= 32 * 2 * ks[i]]
        total = sum(tiles(i, 2 * ks[i] if i in split else ks[i]) for i in range(len(shapes)))
        if not split or total > cap:
            break
        for i in split:
            ks[i] *= 2
    n_tiles = [tiles(i, ks[i]) for i in range(len(shapes))]
    per_block = 1
    if persistent:
        per_block = max(1, -(-sum(n_tiles) // cap))
        while sum(-(-n // per_block) for n in n_tiles) > cap:
            per_block += 1
    return [(k, -(-n // per_block)) for k, n in zip(ks, n_tiles, strict=False)]


def gemv_smem_bytes(B: int, In: int, in_act: int) -> int:
    """Shared memory kernels/gemv.cu stages one product's input in (stage_issue): the B input
    rows, and for a LayerNorm (in_act 3-5) its weight and bias, plus for a token shift (3, 4)
    the B shift rows and the mix vector (all 16-bit)."""
    rows = B + (B if in_act in (3, 4) else 0)
    vecs = 0 if in_act < 3 else (3 if in_act < 5 else 2)
    return (rows + vecs) * In * 2


def gemv_payload(segs: list[Seg], sms: int | None = None, persistent: bool = True) -> tuple[bytes, int, int]:
    """Pack up to 8 products for one gemv launch: (parameter bytes, grid, dynamic shared memory).
    The split (`gemv_plan`) is made for the GPU of the weights unless `sms` says otherwise."""
    if not 1 <= len(segs) <= GEMV_MAX_SEG:
        raise ValueError(f"gemv takes 1 to {GEMV_MAX_SEG} products, got {len(segs)}")
    B = segs[0].x.shape[0]
    for s in segs:
        _check_seg(s, B)
    plan = gemv_plan([tuple(s.W.shape) for s in segs], sms or _sm_count(segs[0].W), persistent)
    fields, start, smem = [], 0, 0
    for s, (ks, n_blocks) in zip(segs, plan, strict=False):
        O, In = s.W.shape
        ln = s.ln or (None, None)
        fields += [s.x.data_ptr(), s.W.data_ptr(), s.y.data_ptr(), _ptr(s.res), _ptr(s.gate), _ptr(s.shift),
                   _ptr(ln[0]), _ptr(ln[1]), _ptr(s.mix), _ptr(s.xx_out),
                   O, In, s.x.stride(0), s.y.stride(0), s.in_act, s.out_act, int(s.y.dtype == torch.float32),
                   float(s.scale), start, n_blocks, ks, 0]
        start += n_blocks
        smem = max(smem, gemv_smem_bytes(B, In, s.in_act))
    for _ in range(GEMV_MAX_SEG - len(segs)):
        fields += [0] * 10 + [0] * 7 + [1.0, start, 0, 1, 0]
    payload = struct.pack(GEMV_PARAMS_FMT, *fields, len(segs))
    return payload, start, smem


def gemv_kernel(K, segs: list[Seg]):
    """The loaded kernel for these products (B and dtype decide the instantiation)."""
    B = segs[0].x.shape[0]
    if B > GEMV_MAX_B:
        raise ValueError(f"gemv handles B <= {GEMV_MAX_B}")
    return K.raw("gemv", f"gemv_{SUFFIX[segs[0].W.dtype]}_b{B}", struct.calcsize(GEMV_PARAMS_FMT))


def gemv(K, segs: list[Seg]) -> None:
    payload, grid, smem = gemv_payload(segs)
    if smem > K.max_smem:
        raise ValueError(f"gemv input too wide for shared memory ({smem} bytes)")
    gemv_kernel(K, segs).launch(grid, 256, payload, smem)


GEMM_TILE = 64  # kernels/gemm.cu: a block of 128 threads per 64 x 64 tile of y
GEMM_SMEM = 2 * (64 + 64) * 40 * 2  # its dynamic shared memory: two stages of padded A and B tiles


def gemm_fits(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether kernels/gemm.cu takes x [..., K] or [n, M, K] against W [N, K] or [n, N, K]: 16-bit,
    same dtype, K-contiguous rows of whole 16-byte vectors, W contiguous."""
    if x.dtype not in (torch.float16, torch.bfloat16) or W.dtype != x.dtype or not W.is_contiguous():
        return False
    K = W.shape[-1]
    return x.shape[-1] == K and K % 8 == 0 and x.stride(-1) == 1 \
        and all(st % 8 == 0 for st in x.stride()[:-1]) and x.data_ptr() % 16 == 0 and W.data_ptr() % 16 == 0


def gemm(K, x: torch.Tensor, W: torch.Tensor, res: torch.Tensor | None = None, out_f32: bool = False):
    """x W^T (+ res) through kernels/gemm.cu (check `gemm_fits` first). Either x [..., K] and W [N, K]
    -> [..., N], or batched x [n, M, K] (any row and batch strides) and W [n, N, K] -> [n, M, N].
    res is shaped like the output and in its dtype (the inputs' one, or fp32 with out_f32)."""
    N, Kd = W.shape[-2], W.shape[-1]
    if W.dim() == 3:
        n, M = W.shape[0], x.shape[1]
        if x.dim() != 3 or x.shape[0] != n:
            raise ValueError(f"gemm: batched inputs {list(x.shape)} against weights {list(W.shape)}")
        x3, out_shape = x, (n, M, N)
    else:
        n, lead = 1, x.shape[:-1]
        x2 = x.reshape(-1, Kd)  # a view where the leading dimensions allow it
        M = x2.shape[0]
        x3, out_shape = x2.unsqueeze(0), (*lead, N)
    y = torch.empty(out_shape, dtype=torch.float32 if out_f32 else x.dtype, device=x.device)
    if res is not None:
        res = _c(res)
        if res.shape != y.shape or res.dtype != y.dtype:
            raise ValueError(f"gemm: residual {list(res.shape)} {res.dtype} for output {list(y.shape)} {y.dtype}")
    tiles = n * -(-M // GEMM_TILE) * -(-N // GEMM_TILE)
    if tiles:
        K.get(f"gemm_{SUFFIX[x.dtype]}")(tiles, 128, x3, W, res, y, M, N, Kd, x3.stride(1), x3.stride(0),
                                         N * Kd if W.dim() == 3 else 0, N, M * N, int(out_f32), smem=GEMM_SMEM)
    return y


def wkv7_prep(K, r, k, v, wz, az, vz, vf, w0, a0, v0, k_k, k_a, H: int):
    """[R, C] (or [B, T, C]) inputs -> fp32 r, d, kk, kw, vw, beta shaped like k."""
    C = k.shape[-1]
    R = k.numel() // C
    outs = torch.empty(6, *k.shape, dtype=torch.float32, device=k.device).unbind(0)  # one allocation
    K.get(f"wkv7_prep_{SUFFIX[k.dtype]}")(-(-R * H // 8), 256, *map(_c, (r, k, v, wz, az, vz, vf)),
                                          w0, a0, v0, k_k, k_a, *outs, R, H)
    return outs


def wkv7_seq(K, S, r, d, kk, kw, beta, vw, kernel: str | None = None):
    """Prepared fp32 [B, T, C] vectors, S [B, H, N, N] fp32 -> (y [B, T, C] fp32, new S), through
    `kernel` ("wkv7_chunk" or "wkv7_seq"; WKV7_SEQ_KERNEL by default). The chunked kernels use d,
    kk and beta up: they are overwritten with the chunks' factors (r, kw and vw are kept)."""
    B, H, N, _ = S.shape
    if N != HEAD_SIZE:
        raise ValueError(f"wkv7_seq is written for head size {HEAD_SIZE}")
    T = r.shape[1]
    y = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    S_out = torch.empty_like(S)
    if (kernel or WKV7_SEQ_KERNEL) == "wkv7_chunk":
        mats = wkv7_chunk_mats(K, r, d, kk, kw, beta, H)  # now d, kk, beta hold Q, W and beta / D
        K.get("wkv7_chunk")(B * H * 4, 128, *map(_c, (d, kk, beta, vw)), mats, _c(S), S_out, y, T, H,
                            smem=WKV7_CHUNK_SMEM)
    else:
        K.get("wkv7_seq")(B * H * 4, 64, *map(_c, (r, d, kk, kw, beta, vw, S)), S_out, y, T, H,
                          smem=WKV7_SEQ_SMEM)
    return y, S_out


def wkv7_chunk_mats(K, r, d, kk, kw, beta, H: int) -> torch.Tensor:
    """Every 16-token chunk's state-independent factors (twin: `twins.wkv7_chunk_mats`): writes Q,
    W and beta / D over d, kk and beta, and returns mats [B * H * chunks, CHUNK_MATS]."""
    B, T, _ = r.shape
    chunks = -(-T // CHUNK)
    mats = torch.empty(B * H * chunks, CHUNK_MATS, dtype=torch.float32, device=r.device)
    if chunks:  # a grid of no blocks is a launch error; with T = 0 the state just passes through
        K.get("wkv7_chunk_mats")(B * H * chunks, 128, *map(_c, (r, d, kk, kw, beta)), mats, T, H,
                                 smem=WKV7_CHUNK_MATS_SMEM)
    return mats


def wkv7_sequence(K, S, r, log_decay, k, v, kk, a, kernel: str | None = None):
    """Same inputs and outputs as `rwkv_cli.wkv.wkv7_sequence` ([B, T, H, N]), through the kernel."""
    B, T, H, N = r.shape
    f = lambda t: t.float().reshape(B, T, H * N).contiguous()  # noqa: E731
    kk32 = f(kk).clone()  # the chunked kernels overwrite it; the caller's kk stays as it was
    d = f(torch.exp(log_decay.float()))
    y, S = wkv7_seq(K, S.float().contiguous(), f(r), d, kk32, f(k), kk32 * f(a), f(v), kernel)
    return y.view(B, T, H, N), S


def wkv7_post(K, y, r, kw, vw, g, r_k, ln_w, ln_b, H: int):
    """fp32 y, r, kw, vw and g (activation dtype), all [R, C] or [B, T, C] -> out like g."""
    C = g.shape[-1]
    R = g.numel() // C
    out = torch.empty_like(g)
    K.get(f"wkv7_post_{SUFFIX[g.dtype]}")(-(-R * H // 8), 256, *map(_c, (y, r, kw, vw, g)), r_k, ln_w, ln_b,
                                          out, R, H)
    return out


def wkv7_step(K, r, k, v, wz, az, vz, g, vf, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, S_in, S_out, out):
    """One token ([B, C] inputs). Writes out [B, C] and S_out (may be S_in); in layer 0 (vz None)
    it writes v into vf (v_first for the later layers). A programmatic dependent launch on sm_90+
    that reads S_in before waiting for the previous kernel: S_in must not be written by the run of
    dependent launches (gemv, wkv steps) right before it (a decoding step's state never is)."""
    B, H, N, _ = S_in.shape
    if N != HEAD_SIZE:
        raise ValueError(f"wkv7_step is written for head size {HEAD_SIZE}")
    K.get(f"wkv7_step_{SUFFIX[k.dtype]}")(B * H, 256, *map(_c, (r, k, v, wz, az, vz, g, vf)), int(vz is None),
                                          w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, _c(S_in), _c(S_out), out, H)


def wkv4_seq(K, w, u, k, v, num, den, mx):
    """Same as `rwkv_cli.wkv.wkv4_sequence`: k, v [B, T, A] fp32, state [B, A] -> (y, num, den, max)."""
    B, T, A = k.shape
    y = torch.empty_like(k)
    num_o, den_o, mx_o = torch.empty_like(num), torch.empty_like(den), torch.empty_like(mx)
    K.get("wkv4_seq")(-(-B * A // 128), 128, w, u, *map(_c, (k, v, num, den, mx)), y, num_o, den_o, mx_o, B, T, A)
    return y, num_o, den_o, mx_o


def wkv4_step(K, w, u, k, v, r, num, den, mx, out, num_o, den_o, mx_o):
    """One token: k, v fp32 [B, A], r [B, A] -> out = r * wkv; the state may be updated in place.
    Reads the state before waiting for the previous kernel, as `wkv7_step`."""
    B, A = k.shape
    K.get(f"wkv4_step_{SUFFIX[r.dtype]}")(-(-B * A // 256), 256, w, u, *map(_c, (k, v, r, num, den, mx)), out,
                                          num_o, den_o, mx_o, B, A)


def checked_ids(K, logits, sampled=None, out=None):
    """Same as its twin `sampling.checked_ids_torch`, in one launch: fp32 logits [B, V] ->
    (tokens [B], ids [B]); the tokens (the argmax, or `sampled`) are written into `out` when given."""
    B, V = logits.shape
    if logits.dtype != torch.float32:
        raise ValueError("checked_ids reads fp32 logits")
    tokens = out if out is not None else sampled if sampled is not None else \
        torch.empty(B, dtype=torch.long, device=logits.device)
    ids = torch.empty(B, dtype=torch.long, device=logits.device)
    K.get("checked_ids")(B, 1024, _c(logits), None if sampled is None else _c(sampled),
                         None if tokens is sampled else _c(tokens), ids, V)
    return tokens, ids


def penalized_softmax(K, logits, counts, seen, ban, presence, frequency):
    """Sampler.penalized + softmax in one launch: fp32 logits [B, V] -> (probs [B, V], argmax [B]
    of the penalised logits). counts/seen None: no penalties; ban None: no bans."""
    B, V = logits.shape
    probs = torch.empty_like(logits)
    argmax = torch.empty(B, dtype=torch.long, device=logits.device)
    K.get("penalized_softmax")(B, 1024, _c(logits), counts, seen, ban, presence, frequency, probs, argmax, V)
    return probs, argmax


def nucleus_draw(K, sorted_p, sorted_i, top_p, top_k, min_p, inv_temp, u, argmax, counts, seen, weight, decay):
    """Truncation, temperature and the draw on probabilities sorted descending [B, V] (with their
    ids), as Sampler._truncate + Sampler._draw; rows with inv_temp 0 take `argmax`. Updates
    counts/seen as Sampler.record when counts is given. -> tokens [B]"""
    B, V = sorted_p.shape
    tokens = torch.empty(B, dtype=torch.long, device=sorted_p.device)
    K.get("nucleus_draw")(B, 1024, *map(_c, (sorted_p, sorted_i, top_p, top_k, min_p, inv_temp, u, argmax)),
                          counts, seen, weight, decay, tokens, V)
    return tokens
