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


def _combine4(a1, b1, p1, a2, b2, p2, gap_decay):
    """Merge an earlier segment (a1, b1, p1) into a later one, decaying it by `gap_decay` (log)."""
    p1 = p1 + gap_decay
    q = torch.maximum(p1, p2)
    e1, e2 = torch.exp(p1 - q), torch.exp(p2 - q)
    return e1 * a1 + e2 * a2, e1 * b1 + e2 * b2, q


def wkv4_sequence(w, u, k, v, num, den, mx):
    """T tokens at once. k, v: [B, T, A] fp32; state [B, A]. Returns (wkv [B, T, A], num, den, mx).

    The decay is constant per channel, so the recurrence is an associative scan: a segment of
    tokens reduces to one (num, den, max) triple, and two segments merge by decaying the earlier
    one by the later one's length. A Brent-Kung scan (`_scan4`) does this in 2 log2(T) rounds and
    O(T) total work, keeping the running-max rescaling so nothing overflows however strong the
    decay. Row 0 of the buffers holds the carried-in state, so row t is the state token t reads.
    """
    B, T, A = k.shape
    P = 1 << (T - 1).bit_length()  # scan length: T rounded up to a power of two
    a = k.new_zeros(B, 1 + P, A)
    b = k.new_zeros(B, 1 + P, A)
    p = k.new_full((B, 1 + P, A), -1e30)
    a[:, 1 : T + 1], b[:, 1 : T + 1], p[:, 1 : T + 1] = v, 1.0, k  # each token alone, from empty
    _scan4(a[:, 1:], b[:, 1:], p[:, 1:], w)
    # Bring in the carried state, decayed by the number of tokens since it was written.
    a[:, 0], b[:, 0], p[:, 0] = num, den, mx
    steps = torch.arange(1, T + 1, device=k.device, dtype=torch.float32).view(1, T, 1)
    rows = slice(1, T + 1)
    a[:, rows], b[:, rows], p[:, rows] = _combine4(num.unsqueeze(1), den.unsqueeze(1), mx.unsqueeze(1), a[:, rows], b[:, rows], p[:, rows], steps * w)
    # Token t reads the state after tokens < t (row t), plus its own key with the bonus u.
    a_prev, b_prev, p_prev = a[:, :T], b[:, :T], p[:, :T]
    uk = u + k
    q = torch.maximum(p_prev, uk)
    e1, e2 = torch.exp(p_prev - q), torch.exp(uk - q)
    y = (e1 * a_prev + e2 * v) / (e1 * b_prev + e2)
    return y, a[:, T].clone(), b[:, T].clone(), p[:, T].clone()


def _scan4(a, b, p, w):
    """In-place inclusive merge-scan over dim 1 (a power of two long): row t ends up holding
    the merge of rows 0..t. Up-sweep: the last row of each 2s-block absorbs the summary of its
    left half; down-sweep: the last row of each odd s-block absorbs the complete prefix before it."""
    B, P, A = a.shape
    blocks = lambda t, s: t.view(B, P // (2 * s), 2, s, A)  # noqa: E731
    s = 1
    while s < P:
        left = [blocks(t, s)[:, :, 0, -1] for t in (a, b, p)]
        right = [blocks(t, s)[:, :, 1, -1] for t in (a, b, p)]
        for dst, val in zip(right, _combine4(*left, *right, s * w), strict=False):
            dst.copy_(val)
        s *= 2
    s //= 4
    while s >= 1:
        done = [blocks(t, s)[:, :-1, 1, -1] for t in (a, b, p)]  # prefixes ending at (m+1)*2s - 1
        todo = [blocks(t, s)[:, 1:, 0, -1] for t in (a, b, p)]  # the s-block right after each
        for dst, val in zip(todo, _combine4(*done, *todo, s * w), strict=False):
            dst.copy_(val)
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


def wkv7_sequence(S, r, log_decay, k, v, kk, a, chunk: int = 64):
    """T tokens. S: [B, H, N, N] fp32; the rest [B, T, H, N]. Returns (o [B, T, H, N] fp32, S).

    Within a chunk, unrolling the recurrence gives (D_t = prod of decays up to t, h_s = S_{s-1} alpha_s):
        S_t = S_0 D_t + sum_{s<=t} (h_s beta_s^T + v_s k_s^T) diag(D_t / D_s)
    The h_s depend on each other through a unit lower-triangular system, solved in one call; the
    outputs and the final state are then a few [T, T] and [T, N] matrix products per head. The
    ratios D_t / D_s are factored around the chunk's middle so every factor stays within
    e^(+-0.61 * chunk / 2): no overflow for chunk <= 64, since each decay lies in (e^-0.61, 1).
    """
    B, T, H, N = r.shape
    heads_first = lambda t: t.float().transpose(1, 2)  # noqa: E731  [B, T, H, N] -> [B, H, T, N]
    r, log_decay, k, v, kk, a = map(heads_first, (r, log_decay, k, v, kk, a))
    alpha, beta = -kk, kk * a
    outs = []
    for t0 in range(0, T, chunk):
        sl = slice(t0, t0 + chunk)
        o, S = _wkv7_chunk(S, r[:, :, sl], log_decay[:, :, sl], k[:, :, sl], v[:, :, sl], alpha[:, :, sl], beta[:, :, sl])
        outs.append(o)
    o = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    return o.transpose(1, 2), S


def _wkv7_chunk(S, r, log_decay, k, v, alpha, beta):
    T = r.shape[2]
    L = torch.cumsum(log_decay, 2)  # log D_t, inclusive
    L_prev = L - log_decay  # log D_{t-1}
    mid = L[:, :, T // 2 : T // 2 + 1]  # reference point for the factored ratios
    inv = torch.exp(mid - L)
    # All four [T, T] coefficient blocks in one product: rows (alpha_t, r_t), columns (beta_s, k_s):
    #   A[t, s] = sum_i q_t,i * key_s,i * D_{t or t-1, i} / D_{s, i}, causal-masked.
    queries = torch.cat([alpha * torch.exp(L_prev - mid), r * torch.exp(L - mid)], 2)  # [B, H, 2T, N]
    keys_t = torch.cat([(beta * inv).transpose(-1, -2), (k * inv).transpose(-1, -2)], -1)  # [B, H, N, 2T]
    A = torch.where(_chunk_mask(T, r.device), matmul(queries, keys_t), 0.0)
    A_ab, A_ak, A_rb, A_rk = A[..., :T, :T], A[..., :T, T:], A[..., T:, :T], A[..., T:, T:]
    S_t = S.transpose(-1, -2)  # [B, H, key, value]
    # (I - A_ab) h = S_0 (D_{t-1} alpha_t) + sum_{s<t} A_ak[t, s] v_s, rows are time.
    rhs = matmul(torch.cat([alpha * torch.exp(L_prev), A_ak], -1), torch.cat([S_t, v], -2))
    eye = torch.eye(T, device=r.device)
    h = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    o = matmul(torch.cat([r * torch.exp(L), A_rb, A_rk], -1), torch.cat([S_t, h, v], -2))  # [B, H, T, N]
    to_end = torch.exp(L[:, :, -1:] - L)  # D_last / D_s, <= 1
    written = matmul(torch.cat([h, v], 2).transpose(-1, -2), torch.cat([beta * to_end, k * to_end], 2))
    return o, S * torch.exp(L[:, :, -1]).unsqueeze(2) + written


@functools.lru_cache(maxsize=8)
def _chunk_mask(T: int, device) -> torch.Tensor:
    """[2T, 2T]: strictly causal for the alpha rows (they see the state before t), causal for r."""
    strict = torch.ones(T, T, dtype=torch.bool, device=device).tril(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.cat([strict, strict], 1), torch.cat([causal, causal], 1)], 0)
