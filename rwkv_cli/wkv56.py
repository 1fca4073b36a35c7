"""The WKV recurrences of RWKV-5.x and RWKV-6 in plain PyTorch: one step, and whole chunks at once.

Per head, the state S [N, N] is indexed [key i, value j], as in the reference (`rwkv-models.md`
§7.2, §7.3, §9). With decay w (per key channel; one number per head in v5.0/5.1) and bonus u:

    readout:  y_j = sum_i r_i (u_i k_i v_j + S_ij)       i.e.  y = r^T (diag(u) k v^T + S)
    update:   S  <- k v^T + diag(w) S

Decays are handled as logarithms (log w = -exp(time_decay) <= 0). The chunked forms below only
ever exponentiate sums of log-decays that are <= 0, so nothing can overflow whatever the decay
strength: v5.2/v6 decays are unbounded (a trained channel can forget everything in one token),
unlike RWKV-7's, so the factored "divide by the decay so far" trick of `wkv.wkv7_sequence` is
used only inside chunks whose decays stay within a safe range (`_SAFE_RANGE`), and exact
pairwise decays elsewhere. All math is fp32.
"""

from __future__ import annotations

import functools

import torch

from .ops import matmul

# ---------------------------------------------------------------------------------------------
# One token


def wkv5_step(S, r, k, v, log_w, u):
    """One token. S: [B, H, N, N] fp32 [key, value]; r, k, v: [B, H, N]; log_w and u broadcast to
    [B, H, N] (key channels; v5.0/5.1 pass one value per head as [H, 1]).
    Returns (y [B, H, N] fp32, new S)."""
    B, H, N = r.shape
    r, k, v = r.float(), k.float(), v.float()
    # y = r^T S + (r . (u * k)) v
    y = matmul(r.reshape(B * H, 1, N), S.reshape(B * H, N, N)).view(B, H, N)
    y = y + (r * u * k).sum(-1, keepdim=True) * v
    # S <- diag(w) S + k v^T
    decay = torch.exp(log_w).expand(B, H, N).unsqueeze(-1)
    S_new = torch.addcmul(S * decay, k.unsqueeze(-1), v.unsqueeze(-2))
    return y, S_new


# ---------------------------------------------------------------------------------------------
# v5.0 / v5.1: one decay per head, the exact parallel form of §10


def wkv5_sequence(S, r, k, v, log_w, u, chunk: int = 128):
    """T tokens with one decay per head. S: [B, H, N, N] fp32; r, k, v: [B, T, H, N];
    log_w: [H] (log of the per-head decay); u: broadcast to [H, N]. Returns (y [B, T, H, N], S).

    Per chunk of c tokens, with l = log w (§10):
        y_t = sum_{s<t} (r_t . k_s) e^{(t-1-s) l} v_s + e^{t l} r_t^T S_0 + (r_t . (u k_t)) v_t
        S_c = e^{c l} S_0 + sum_s e^{(c-1-s) l} k_s v_s^T
    Every exponent is <= 0. Chunks bound the [c, c] matrices for long prompts.
    """
    B, T, H, N = r.shape
    r, k, v = (t.float().transpose(1, 2) for t in (r, k, v))  # [B, H, T, N]
    lam = log_w.float().reshape(1, H, 1, 1)
    u = u.float().expand(H, N).reshape(1, H, 1, N)
    outs = []
    for t0 in range(0, T, chunk):
        rc, kc, vc = r[:, :, t0 : t0 + chunk], k[:, :, t0 : t0 + chunk], v[:, :, t0 : t0 + chunk]
        c = rc.shape[2]
        pos = torch.arange(c, dtype=torch.float32, device=r.device)
        gap = pos.view(c, 1) - 1 - pos.view(1, c)  # t - 1 - s
        decay = torch.exp(torch.where(_strict_lower(c, r.device), gap * lam, float("-inf")))  # [1, H, c, c]
        A = matmul(rc, kc.transpose(-1, -2)) * decay
        y = matmul(A, vc) + torch.exp(pos.view(c, 1) * lam) * matmul(rc, S)
        y = y + (rc * u * kc).sum(-1, keepdim=True) * vc
        to_end = torch.exp((c - 1 - pos).view(c, 1) * lam)  # e^{(c-1-s) l}
        S = torch.exp(c * lam) * S + matmul((kc * to_end).transpose(-1, -2), vc)
        outs.append(y)
    y = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    return y.transpose(1, 2), S


# ---------------------------------------------------------------------------------------------
# v5.2 / v6: a decay per key channel, data-dependent in v6

# Inside a chunk, the factored form multiplies e^{L_{t-1} - L_0} (<= 1) by e^{L_0 - L_s} (>= 1),
# where L is the running sum of log-decays. That is exact as long as neither factor leaves the
# normal fp32 range (about e^+-87); chunks whose total decay is larger use exact pairwise decays.
_SAFE_RANGE = 60.0


def wkv6_sequence(S, r, k, v, log_w, u, chunk: int = 16, block: int = 256):
    """T tokens with per-channel decays. S: [B, H, N, N] fp32; r, k, v: [B, T, H, N];
    log_w: broadcast to [B, T, H, N] (log of each token's decay, <= 0); u: broadcast to [H, N].
    Returns (y [B, T, H, N] fp32, S).

    Tokens are cut into chunks of `chunk` (16 measured fastest on the RWKV-6 0.1B shape: 1.2x
    faster than 32, whose chunks more often exceed the factored form's range). With L_t the running sum of log-decays inside a chunk
    (inclusive, so L_{t-1} excludes token t) and S_0 the state entering it:
        y_t = (r_t e^{L_{t-1}})^T S_0 + sum_{s<t} [sum_i r_ti k_si e^{L_{t-1,i} - L_{s,i}}] v_s
              + (r_t . (u k_t)) v_t
        S_end = diag(e^{L_last}) S_0 + sum_s (k_s e^{L_last - L_s}) v_s^T
    Chunk-local parts are batched over all chunks; only the carry of S from chunk to chunk is a
    loop (one multiply-add per chunk). `block` bounds memory for long inputs.
    """
    B, T, H, N = r.shape
    log_w = log_w.float().expand(B, T, H, N)
    u = u.float().expand(H, N)
    outs = []
    for t0 in range(0, T, block):
        sl = slice(t0, t0 + block)
        y, S = _wkv6_block(S, r[:, sl], k[:, sl], v[:, sl], log_w[:, sl], u, chunk)
        outs.append(y)
    return (torch.cat(outs, 1) if len(outs) > 1 else outs[0]), S


def _wkv6_block(S, r, k, v, log_w, u, c):
    B, T, H, N = r.shape
    r, k, v = r.float(), k.float(), v.float()
    bonus = (r * u * k).sum(-1, keepdim=True) * v  # [B, T, H, N]
    c = min(c, T)
    n = -(-T // c)
    pad = n * c - T

    def chunks(t):  # [B, T, H, N] -> [B, H, n, c, N]; padding tokens have k = v = 0, decay 1
        if pad:
            t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad))
        return t.view(B, n, c, H, N).permute(0, 3, 1, 2, 4)

    r, k, v, lw = map(chunks, (r, k, v, log_w))
    L = torch.cumsum(lw, 3)  # L_t, inclusive
    L_prev = L - lw  # L_{t-1}
    L_last = L[..., -1:, :]  # [B, H, n, 1, N]
    A = _intra_chunk_scores(r, k, L, L_prev)  # [B, H, n, c, c]
    y = matmul(A, v)
    # What each chunk writes into the state, and how much it decays what it inherits
    written = matmul((k * torch.exp(L_last - L)).transpose(-1, -2), v)  # [B, H, n, N, N]
    carry = torch.exp(L_last).transpose(-1, -2)  # [B, H, n, N, 1]
    queries = r * torch.exp(L_prev)  # read the state entering the chunk, decayed up to t - 1
    inherited = []
    for j in range(n):
        inherited.append(matmul(queries[:, :, j], S))
        S = torch.addcmul(written[:, :, j], carry[:, :, j], S)
    y = y + torch.stack(inherited, 2)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n * c, H, N)[:, :T]
    return y + bonus, S


def _intra_chunk_scores(r, k, L, L_prev):
    """A[t, s] = sum_i r_ti k_si e^{L_{t-1,i} - L_{s,i}} for s < t, else 0: [B, H, n, c, c].

    Factored through the chunk start (one batched product) where the chunk's total decay is within
    `_SAFE_RANGE`; chunks with stronger decays get the exact pairwise form (a [c, c, N] tensor each).
    """
    c = r.shape[3]
    mask = _strict_lower(c, r.device)
    L_last = L[..., -1, :]  # [B, H, n, N], the most negative
    # e^{-L} is clamped so strong chunks (recomputed below) cannot overflow the product.
    A = matmul(r * torch.exp(L_prev), (k * torch.exp((-L).clamp(max=_SAFE_RANGE))).transpose(-1, -2))
    A = torch.where(mask, A, 0.0)
    strong = (L_last.amin(-1) < -_SAFE_RANGE).nonzero(as_tuple=True)  # chunks to redo exactly
    if strong[0].numel():
        rs, ks, Ls, Lps = (t[strong] for t in (r, k, L, L_prev))  # [m, c, N]
        expo = torch.where(mask.unsqueeze(-1), Lps.unsqueeze(-2) - Ls.unsqueeze(-3), float("-inf"))
        A[strong] = (rs.unsqueeze(-2) * ks.unsqueeze(-3) * torch.exp(expo)).sum(-1)
    return A


@functools.lru_cache(maxsize=16)
def _strict_lower(c: int, device) -> torch.Tensor:
    """[c, c] boolean: s < t (token t reads what tokens before it wrote)."""
    return torch.ones(c, c, dtype=torch.bool, device=device).tril(-1)
