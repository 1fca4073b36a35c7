"""The WKV recurrences of RWKV-4 and RWKV-7 in plain PyTorch: one step, and whole chunks at once.

These are the only sequential parts of the model (`rwkv-models.md` §10); everything else is
batched over time. Each has a single-token form (decoding) and a chunked form (prompts) that
processes T tokens with O(log T) or O(T/64) dependent steps instead of a Python loop per token.
All math is fp32; callers cast the output back to the activation dtype. These functions are also
the reference twins of the CUDA kernels.
"""

from __future__ import annotations

import functools

import torch

from .ops import batched_matvec, matmul

# ---------------------------------------------------------------------------------------------
# RWKV-4: a per-channel decayed average with a running log-scale (paper eq. 14-16, §7.1 of the
# notes). State (num, den, max) means numerator = num * e^max, denominator = den * e^max.


def wkv4_step(w, u, k, v, num, den, mx):
    """One token. w = -exp(time_decay), u = time_first: [A]; k, v, num, den, mx: [B, A] fp32.
    Returns (wkv [B, A], num, den, mx)."""
    uk = u + k
    q = torch.maximum(mx, uk)
    e1, e2 = torch.exp(mx - q), torch.exp(uk - q)
    y = (e1 * num + e2 * v) / (e1 * den + e2)
    decayed = mx + w
    q = torch.maximum(decayed, k)
    e1, e2 = torch.exp(decayed - q), torch.exp(k - q)
    return y, e1 * num + e2 * v, e1 * den + e2, q


# Base-2 logs inside the sequence forms: torch's exp2 runs ~3x faster than exp on the CPU, and
# e^x = 2^(x log2 e) costs one scaling of the inputs.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _merge4(ab1, p1, ab2, p2, gap):
    """Merge an earlier segment into a later one, in place of the later, base-2 logs throughout:
        (ab, p) = (ab1 2^(p1 + gap - q) + ab2 2^(p2 - q), q),   q = max(p1 + gap, p2)
    ab1, ab2: [2, ...] (numerator; denominator), p1, p2: [...], gap: the earlier one's extra decay."""
    p1 = p1 + gap
    q = torch.maximum(p1, p2)
    e1 = p1.sub_(q).exp2_()
    e2 = (p2 - q).exp2_()
    ab2.mul_(e2).addcmul_(ab1, e1)
    p2.copy_(q)


def wkv4_sequence(w, u, k, v, num, den, mx):
    """T tokens at once. k, v: [B, T, A] fp32; state [B, A]. Returns (wkv [B, T, A], num, den, mx).

    The decay is constant per channel, so the recurrence is an associative scan: a segment of
    tokens reduces to one (num, den, max) triple, and two segments merge by decaying the earlier
    one by the later one's length. A Brent-Kung scan (`_scan4`) does this in 2 log2(T) rounds and
    O(T) total work, keeping the running-max rescaling so nothing overflows however strong the
    decay. Row 0 of the buffers holds the carried-in state and row t the state token t reads; the
    carried state is folded into token 0 before the scan (it is simply older history), so every
    prefix already includes it. Logs are base 2 inside (k, w, u, max scaled by log2 e on entry,
    the returned max scaled back).
    """
    B, T, A = k.shape
    w, u, k = w * LOG2E, u * LOG2E, k * LOG2E
    P = 1 << (T - 1).bit_length()  # scan length: T rounded up to a power of two
    ab = k.new_zeros(2, B, 1 + P, A)  # [numerator; denominator] per row
    p = k.new_full((B, 1 + P, A), -1e30)  # their log2 scale
    ab[0, :, 0], ab[1, :, 0], p[:, 0] = num, den, mx * LOG2E
    ab[0, :, 1 : T + 1], ab[1, :, 1 : T + 1], p[:, 1 : T + 1] = v, 1.0, k  # each token alone
    _merge4(ab[:, :, 0], p[:, 0], ab[:, :, 1], p[:, 1], w)  # state + token 0, one step of decay
    _scan4(ab[:, :, 1:], p[:, 1:], w)
    # Token t reads the state after tokens < t (row t), plus its own key with the bonus u:
    #   y = (2^(p - q) num + 2^(u + k - q) v) / (2^(p - q) den + 2^(u + k - q)),  q = max(p, u + k)
    ab_prev, p_prev = ab[:, :, :T], p[:, :T]
    uk = k.add_(u)
    q = torch.maximum(p_prev, uk)
    e1 = (p_prev - q).exp2_()
    e2 = uk.sub_(q).exp2_()
    y = torch.addcmul(e2 * v, e1, ab_prev[0]).div_(torch.addcmul(e2, e1, ab_prev[1]))
    return y, ab[0, :, T].clone(), ab[1, :, T].clone(), p[:, T] * LN2


def _scan4(ab, p, w):
    """In-place inclusive merge-scan over the rows (dim -2, a power of two long) of ab [2, B, P, A]
    and p [B, P, A]: row t ends up holding the merge of rows 0..t. Up-sweep: the last row of each
    2s-block absorbs the summary of its left half; down-sweep: the last row of each odd s-block
    absorbs the complete prefix before it."""
    _, B, P, A = ab.shape
    blocks = lambda s: (ab.view(2, B, P // (2 * s), 2, s, A), p.view(B, P // (2 * s), 2, s, A))  # noqa: E731
    s = 1
    while s < P:
        x, y = blocks(s)
        _merge4(x[:, :, :, 0, -1], y[:, :, 0, -1], x[:, :, :, 1, -1], y[:, :, 1, -1], s * w)
        s *= 2
    s //= 4
    while s >= 1:
        x, y = blocks(s)  # prefixes ending at (m+1)*2s - 1 flow into the s-block right after each
        _merge4(x[:, :, :-1, 1, -1], y[:, :-1, 1, -1], x[:, :, 1:, 0, -1], y[:, 1:, 0, -1], s * w)
        s //= 2


# ---------------------------------------------------------------------------------------------
# RWKV-7: a generalised delta rule on a matrix state S [value, key] per head (§7.4, step 8):
#   S_t = S_{t-1} diag(d_t) + (S_{t-1} alpha_t) beta_t^T + v_t k_t^T,   o_t = S_t r_t
# with alpha = -kk (the normalised removal key) and beta = kk * a.


def wkv7_step(S, r, log_decay, k, v, kk, a):
    """One token. S: [B, H, N, N] fp32; the rest [B, H, N]. Returns (o [B, H, N] fp32, S)."""
    B, H, N = r.shape
    r, k, v, kk, a = (t.float().reshape(B * H, N) for t in (r, k, v, kk, a))
    S_flat = S.reshape(B * H, N, N)
    removed = batched_matvec(S_flat, -kk)  # S alpha: [BH, N]
    # Both rank-1 terms in one batched product: [S alpha | v] @ [beta ; k]  -> [BH, N, N]
    left = torch.stack([removed, v], 2)
    right = torch.stack([kk * a, k], 1)
    S_new = (S_flat * torch.exp(log_decay).reshape(B * H, 1, N)).baddbmm_(left, right)
    return batched_matvec(S_new, r).view(B, H, N), S_new.view(B, H, N, N)


def wkv7_sequence(S, r, log_decay, k, v, kk, a, chunk: int = 16):
    """T tokens. S: [B, H, N, N] fp32; the rest [B, T, H, N]. Returns (o [B, T, H, N] fp32, S).

    The sign of the rank-1 term can move: (S alpha) beta^T = (S kk)(-kk a)^T. Below h_t = S_{t-1} kk_t
    (the state's current reading of the removal key), so S_t = S_{t-1} diag(d_t) - h_t beta_t^T + v_t k_t^T.
    Within a chunk of c tokens, unrolling gives (D_t = prod of decays up to t, S_0 before the chunk):
        S_t = S_0 D_t + sum_{s<=t} (v_s k_s^T - h_s beta_s^T) diag(D_t / D_s)
        h_t = S_0 (D_{t-1} kk_t) + sum_{s<t} (v_s G_ak[t, s] - h_s G_ab[t, s])
        o_t = S_0 (D_t r_t)      + sum_{s<=t} (v_s A_rk[t, s] - h_s A_rb[t, s])
    with G_ab[t, s] = sum_i kk_t,i beta_s,i D_{t-1,i} / D_{s,i} (the others alike: rows kk or r,
    columns beta or k, D_{t-1} or D_t). So (I + G_ab) h = [kk D_{t-1} | G_ak] [S_0^T; v]: with
    Ti = (I + G_ab)^-1 (unit lower triangular, one small solve), h and o are fixed matrices times
    [S_0^T; v], built for all chunks at once (`_wkv7_chunks`). Only the state is carried from chunk
    to chunk, two small products each (the loop below).
    The ratios D_t / D_s are factored around each chunk's middle, so every factor stays within
    e^(+-0.61 * chunk / 2): no overflow for chunk <= 64, since each decay lies in (e^-0.61, 1).
    """
    B, T, H, N = r.shape
    c = min(chunk, T)
    nc = -(-T // c)  # chunks; the last one zero-padded (decay 1, nothing written or read)
    WQ, UO, KT, Dl, v = _wkv7_chunks(*(_chunked(t, c, nc) for t in (r, log_decay, k, v, kk, a)))
    # Per chunk j, with the state transposed (St = S^T, [key, value]):
    #   [h; o] = [W; Q] St + [U; O],   St <- diag(D_last / D_0) St + [-beta'; k']^T [h; v]
    # where beta', k' are beta_s, k_s times D_last / D_s. hv holds [h; v] per chunk.
    hv = v.new_empty(nc, B, H, 2 * c, N)
    hv[..., c:, :] = v
    o = v.new_empty(B, nc, c, H, N)
    St = S.transpose(-1, -2).float()
    for j in range(nc):
        ho = matmul(WQ[j], St)  # [B, H, 2c, N]
        torch.add(ho[..., :c, :], UO[j, ..., :c, :], out=hv[j, ..., :c, :])
        torch.add(ho[..., c:, :], UO[j, ..., c:, :], out=o[:, j].transpose(1, 2))
        St = torch.addcmul(matmul(KT[j], hv[j]), Dl[j], St)
    return o.view(B, nc * c, H, N)[:, :T], St.transpose(-1, -2).contiguous()


def _chunked(x, c: int, nc: int, pad: float = 0.0):
    """[B, T, H, N] -> fp32 [B, nc, c, H, N], padded with `pad` to nc * c tokens (a view if none needed)."""
    B, T, H, N = x.shape
    x = x.float()
    if nc * c != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nc * c - T), value=pad)
    return x.view(B, nc, c, H, N)


def _heads_first(t):
    """[nc, B, H, c, N] storage seen as [B, nc, c, H, N] (to write it from the input layout)."""
    return t.permute(1, 0, 3, 2, 4)


def _wkv7_chunks(r, log_decay, k, v, kk, a):
    """The per-chunk matrices of `wkv7_sequence`, all chunks at once. Inputs [B, nc, c, H, N] fp32.
    Products run per (chunk, head) on [nc, B, H, rows, cols] tensors (contiguous, so BLAS reads
    them in place). Returns WQ, UO: [nc, B, H, 2c, N]; KT: [.., N, 2c]; Dl: [.., N, 1]; v [.., c, N]."""
    B, nc, c, H, N = r.shape
    mask, tril_log2e, eye = _chunk_consts(c, r.device)
    new = lambda *shape: r.new_empty(nc, B, H, *shape)  # noqa: E731
    # log2 D_t within the chunk (a cumulative sum as one product), around the middle token's.
    L = matmul(tril_log2e, log_decay.reshape(B * nc, c, H * N)).view(B, nc, c, H, N)
    mid = L[:, :, c // 2 : c // 2 + 1].clone()
    e = L.sub_(mid).exp2_()  # D_t / D_mid
    D_mid = mid.exp2_()
    # Rows (queries) kk_t D_{t-1} / D_mid and r_t D_t / D_mid; columns beta_s D_mid / D_s and k_s D_mid / D_s.
    # D_{t-1} / D_mid is e shifted by one token (1 / D_mid before the first).
    q = new(2 * c, N)
    q_kk, q_r = _heads_first(q[..., :c, :]), _heads_first(q[..., c:, :])
    torch.mul(kk[:, :, 1:], e[:, :, :-1], out=q_kk[:, :, 1:])
    torch.div(kk[:, :, :1], D_mid, out=q_kk[:, :, :1])
    torch.mul(r, e, out=q_r)
    keys = new(2 * c, N)
    torch.div(kk * a, e, out=_heads_first(keys[..., :c, :]))
    torch.div(k, e, out=_heads_first(keys[..., c:, :]))
    # All four [c, c] blocks in one product, [[G_ab, G_ak], [A_rb, A_rk]]: strictly causal in the
    # kk rows (h_t reads the state before t), causal in the r rows. (torch reads the transposed
    # operand in place; NumPy via ops.matmul would copy it first, measured slower.)
    G = torch.matmul(q, keys.mT).mul_(mask)
    G_ab, G_ak, A_rb, A_rk = G[..., :c, :c], G[..., :c, c:], G[..., c:, :c], G[..., c:, c:]
    D_mid, v, e_last = _heads_first(D_mid), _heads_first(v), _heads_first(e[:, :, -1:])  # [nc, B, H, ., N]
    # h = Ti rhs and o = r D St + A_rk v - A_rb Ti rhs, with rhs = [kk D_{t-1} | G_ak] [St; v]:
    #   [h; o] = F rhs + [0; r D | A_rk] [St; v],   F = [Ti; -A_rb Ti]
    Ti = torch.linalg.solve_triangular(G_ab, eye, upper=False, left=False, unitriangular=True)
    F = new(2 * c, c)
    F[..., :c, :] = Ti
    torch.neg(matmul(A_rb, Ti), out=F[..., c:, :])
    rhs = new(c, N + c)
    torch.mul(q[..., :c, :], D_mid, out=rhs[..., :N])
    rhs[..., N:] = G_ak
    WC = matmul(F, rhs)  # [2c, N + c]: the [W; Q] and [U; O] coefficients of [St; v]
    WC[..., c:, :N].addcmul_(q[..., c:, :], D_mid)
    WC[..., c:, N:] += A_rk
    # The state's update: the keys scaled to the chunk's end (D_last / D_s <= 1), beta's negated.
    KT = (keys * e_last).mT.contiguous()  # [N, 2c]
    KT[..., :c].neg_()
    return WC[..., :N].contiguous(), matmul(WC[..., N:], v), KT, (D_mid * e_last).mT, v


@functools.lru_cache(maxsize=8)
def _chunk_consts(c: int, device):
    """[2c, 2c] mask (strictly causal for the kk rows, causal for the r rows), the [c, c] lower
    triangle times log2(e) (cumulative sums in base 2), and the identity."""
    strict = torch.ones(c, c, device=device).tril(-1)
    causal = torch.ones(c, c, device=device).tril()
    mask = torch.cat([torch.cat([strict, strict], 1), torch.cat([causal, causal], 1)], 0)
    return mask, causal * LOG2E, torch.eye(c, device=device)
