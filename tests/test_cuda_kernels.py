"""Each CUDA kernel against its PyTorch twin (rwkv_cli/cuda/twins.py, rwkv_cli/wkv.py), on a GPU.

Inputs are fresh random values in realistic ranges; errors are relative to the twin's output
norm, ||out - twin|| / ||twin||, computed in fp32:
  fp32 results (recurrences, prepared vectors, states):   <= 1e-4  (fast-math exp, summation order,
                                                            the twins' chunked products)
  kernels writing fp16 / bf16 outputs:                     <= 2e-3 / 1.6e-2  (one rounding of the output)
Skipped without a CUDA GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def K():
    from rwkv_cli.cuda import loader

    k = loader.kernels_for(torch.device("cuda"))
    assert k is not None, f"kernels did not load: {loader.status()}"
    return k


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def randn(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v4_order", [False, True])
@pytest.mark.parametrize("C", [320, 4096])  # a partial pass over the columns, and several
def test_ln_mix(K, dtype, v4_order, C):
    from rwkv_cli.cuda import kops, twins

    B, T = 3, 5
    x, shift = randn(B, T, C, dtype=dtype, scale=3), randn(B, C, dtype=dtype)
    w, b = randn(C, dtype=dtype) + 1, randn(C, dtype=dtype, scale=0.1)
    mix = torch.rand(6, C, device="cuda").to(dtype)
    mixes, last, xx = kops.ln_mix(K, x, shift, w, b, mix, v4_order, want_xx=True)
    ref, ref_xx, ref_last = twins.ln_mix(x, shift, w, b, mix, v4_order)
    assert rel_err(mixes, ref) <= HALF_TOL[dtype]
    assert rel_err(xx, ref_xx) <= HALF_TOL[dtype]
    assert rel_err(last, ref_last) <= HALF_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_act_inplace(K, dtype):
    """relu^2, tanh, sigmoid, each alone and two of them in one launch (ranges of unequal length)."""
    from rwkv_cli.cuda import kops, twins

    for act, act2 in ((1, 0), (2, 3), (1, 3), (3, 2)):
        x, x2 = randn(64, 8192, dtype=dtype, scale=3), randn(64, 96, dtype=dtype, scale=3)
        ref, ref2 = x.clone(), x2.clone()
        kops.act_inplace(K, x, act, x2 if act2 else None, act2)
        twins.act_inplace(ref, act, ref2 if act2 else None, act2)
        assert rel_err(x, ref) <= HALF_TOL[dtype]
        assert rel_err(x2, ref2) <= HALF_TOL[dtype]  # untouched when act2 is 0
    with pytest.raises(ValueError):
        kops.act_inplace(K, randn(3, dtype=torch.float16), 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm_matches_twin(K, dtype):
    """kernels/gemm.cu against twins.gemm: tails in M, N and K, odd N, one row, batched products over
    strided views (as prefill.py passes them), the residual, fp32 outputs."""
    from rwkv_cli.cuda import kops, twins

    gen = torch.Generator(device="cuda").manual_seed(0)
    for M, N, Kd in ((1, 65536, 768), (37, 72, 40), (300, 776, 768), (64, 64, 32), (129, 130, 3072), (5, 2, 8), (3, 50277, 768), (70, 65, 16)):
        x, W = randn(M, Kd, dtype=dtype, gen=gen), randn(N, Kd, dtype=dtype, scale=Kd ** -0.5, gen=gen)
        assert kops.gemm_fits(x, W)
        assert rel_err(kops.gemm(K, x, W), twins.gemm(x, W)) <= HALF_TOL[dtype]
        res = randn(M, N, dtype=dtype, gen=gen)
        assert rel_err(kops.gemm(K, x, W, res), twins.gemm(x, W, res)) <= HALF_TOL[dtype]
        y32 = kops.gemm(K, x, W, out_f32=True)
        assert y32.dtype == torch.float32 and rel_err(y32, twins.gemm(x, W, out_f32=True)) <= 1e-5
    # batched over a strided view: rows 2.. of six stacked [R, C] inputs, and a column slice
    R, C, D = 77, 256, 96
    stacked = randn(6, 2, R // 2 + 1, C, dtype=dtype, gen=gen).view(6, -1, C)
    W3 = randn(4, D, C, dtype=dtype, scale=C ** -0.5, gen=gen)
    y = kops.gemm(K, stacked[2:], W3)
    assert y.shape == (4, stacked.shape[1], D) and rel_err(y, twins.gemm(stacked[2:], W3)) <= HALF_TOL[dtype]
    up = randn(3, C, 64, dtype=dtype, scale=0.125, gen=gen)
    lhs = kops.gemm(K, stacked[2:], W3)[:3, :, :64]
    assert rel_err(kops.gemm(K, lhs, up), twins.gemm(lhs, up)) <= HALF_TOL[dtype]
    # a [B, T, C] input with leading dimensions, and what does not fit
    x3 = randn(2, 9, C, dtype=dtype, gen=gen)
    assert kops.gemm(K, x3, W3[0]).shape == (2, 9, D)
    assert not kops.gemm_fits(randn(4, 12, dtype=dtype), randn(8, 12, dtype=dtype))  # K not whole vectors
    assert not kops.gemm_fits(randn(4, 16), randn(8, 16))  # fp32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_gemv_segments(K, dtype, B):
    """Several products in one launch, with every input activation and epilogue; odd row counts.
    Each group runs with the split chosen for this GPU and with splits chosen for other sizes:
    many row tiles per block (4 multiprocessors), rows shared by up to 8 warps (2000), one tile
    per block."""
    from rwkv_cli.cuda import kops
    from rwkv_cli.cuda.twins import Seg, gemv_reference

    def seg(O, I, **kw):
        x = randn(B, I, dtype=dtype)
        W = randn(O, I, dtype=dtype, scale=1 / math.sqrt(I))
        y = torch.full((B, O), float("nan"), device="cuda", dtype=torch.float32 if kw.pop("f32", False) else dtype)
        for name in ("res", "gate"):
            if kw.pop(name, False):
                kw[name] = randn(B, O, dtype=dtype)
        return Seg(x, W, y, **kw)

    def ln_seg(O, I, act, **kw):  # LayerNorm of a residual-like x (+ token shift) staged in the kernel
        s = seg(O, I, in_act=act, **kw)
        s.x = randn(B, I, dtype=dtype, scale=20) + 3
        s.ln = (randn(I, dtype=dtype) + 1, randn(I, dtype=dtype, scale=0.1))
        if act < 5:
            s.shift, s.mix = randn(B, I, dtype=dtype), torch.rand(I, device="cuda").to(dtype)
        s.xx_out = torch.full((B, I), float("nan"), device="cuda", dtype=dtype)
        return s

    def in_place(O, I):  # y += x W^T (res aliases y)
        s = seg(O, I)
        s.y = s.res = randn(B, O, dtype=dtype)
        return s

    for plan in (None, dict(sms=4), dict(sms=2000), dict(sms=30, persistent=False)):
        segs = [seg(300, 2048), seg(64, 768, in_act=1), seg(768, 64, in_act=2, out_act=1), seg(1000, 256, out_act=2),
                seg(520, 512, res=True, gate=True, scale=0.5), seg(200, 4096, f32=True), seg(37, 8192, res=True)]
        ln_segs = [ln_seg(100, 1024, 3), ln_seg(90, 1024, 4, out_act=2), ln_seg(600, 768, 5, f32=True)]
        for group in (segs, ln_segs, [in_place(333, 1536), in_place(2048, 8192)]):
            ref = [Seg(s.x, s.W, torch.empty_like(s.y), None if s.res is None else s.res.clone(), s.gate, s.in_act,
                       s.out_act, s.scale, s.shift, s.ln, s.mix, None if s.xx_out is None else torch.empty_like(s.xx_out))
                   for s in group]
            gemv_reference(ref)
            if plan is None:
                kops.gemv(K, group)
            else:
                payload, grid, smem = kops.gemv_payload(group, **plan)
                kops.gemv_kernel(K, group).launch(grid, 256, payload, smem)
            for s, r in zip(group, ref, strict=False):
                tol = 2e-5 if s.y.dtype == torch.float32 and s.in_act < 3 else HALF_TOL[dtype]
                where = f"plan {plan}, segment O={s.W.shape[0]} I={s.W.shape[1]} in_act={s.in_act}"
                assert rel_err(s.y, r.y) <= tol, where
                if s.xx_out is not None:
                    assert rel_err(s.xx_out, r.xx_out) <= HALF_TOL[dtype], where


def _v7_inputs(R, H, dtype, gen=None, first=False):
    C = H * 64
    t = {n: randn(R, C, dtype=dtype, gen=gen) for n in ("r", "k", "v", "wz", "az", "vz", "vf")}
    if first:
        t["vz"] = t["vf"] = None
    p = dict(w0=randn(C, scale=1.0, gen=gen) - 3.0, a0=randn(C, dtype=dtype, gen=gen),
             v0=randn(C, dtype=dtype, gen=gen) + 1, k_k=randn(C, dtype=dtype, scale=0.05, gen=gen) + 0.85,
             k_a=randn(C, dtype=dtype, scale=0.05, gen=gen) + 1)
    return t, p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [False, True])
def test_wkv7_prep_and_post(K, dtype, first):
    from rwkv_cli.cuda import kops, twins

    R, H = 37, 3
    t, p = _v7_inputs(R, H, dtype, first=first)
    args = (t["r"], t["k"], t["v"], t["wz"], t["az"], t["vz"], t["vf"], p["w0"], p["a0"], p["v0"], p["k_k"], p["k_a"], H)
    for out, ref in zip(kops.wkv7_prep(K, *args), twins.wkv7_prep(*args), strict=False):
        assert rel_err(out, ref) <= 1e-4
    C = H * 64
    y, r, kw, vw = (randn(R, C) for _ in range(4))
    g, r_k = randn(R, C, dtype=dtype), randn(H, 64, dtype=dtype, scale=0.1)
    ln_w, ln_b = randn(C) + 1, randn(C, scale=0.1)
    out = kops.wkv7_post(K, y, r, kw, vw, g, r_k, ln_w, ln_b, H)
    assert rel_err(out, twins.wkv7_post(y, r, kw, vw, g, r_k, ln_w, ln_b, H)) <= HALF_TOL[dtype]


def _v7_sequence_inputs(B, T, H, gen):
    N = 64
    r, k, v = (randn(B, T, H, N, gen=gen) for _ in range(3))
    log_decay = -0.6065 * torch.rand(B, T, H, N, generator=gen, device="cuda")  # decays in (0.545, 1)
    kk = torch.nn.functional.normalize(randn(B, T, H, N, gen=gen), dim=-1)
    a = torch.rand(B, T, H, N, generator=gen, device="cuda")
    S = randn(B, H, N, N, gen=gen, scale=0.3)
    return S, r, log_decay, k, v, kk, a


@pytest.mark.parametrize("kernel", ["wkv7_chunk", "wkv7_seq"])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100, 300])
def test_wkv7_sequence_matches_twin(K, T, kernel):
    """The prefill recurrence with a carried-in state (fla #351's failure case) and state out, on
    both kernels: chunks of 16 tokens (whole, partial, several) and token by token."""
    from rwkv_cli.cuda import kops
    from rwkv_cli.wkv import wkv7_sequence

    gen = torch.Generator(device="cuda").manual_seed(T)
    inputs = _v7_sequence_inputs(2, T, 3, gen)
    y, S = kops.wkv7_sequence(K, *inputs, kernel=kernel)
    y_ref, S_ref = wkv7_sequence(*inputs)
    assert rel_err(y, y_ref) <= 1e-4
    assert rel_err(S, S_ref) <= 1e-4


@pytest.mark.parametrize("T", [15, 33])
def test_wkv7_chunk_mats_matches_twin(K, T):
    """The chunks' factors (Q, W, beta / D written over d, kk, beta; kw / D, Uh, Uy, D_CH in mats),
    the last chunk partial."""
    from rwkv_cli.cuda import kops, twins

    B, H = 2, 3
    gen = torch.Generator(device="cuda").manual_seed(T)
    _, r, log_decay, k, _, kk, a = _v7_sequence_inputs(B, T, H, gen)
    r, log_decay, k, kk, a = (t.reshape(B, T, H * 64) for t in (r, log_decay, k, kk, a))
    d = torch.exp(log_decay)
    ins = [t.contiguous() for t in (r, d, kk, k, kk * a)]
    Q, W, VB, mats = twins.wkv7_chunk_mats(*ins, H)
    outs = [t.clone() for t in ins]
    got = kops.wkv7_chunk_mats(K, *outs, H)
    torch.cuda.synchronize()
    for name, x, ref in (("Q", outs[1], Q), ("W", outs[2], W), ("beta/D", outs[4], VB), ("mats", got, mats)):
        assert rel_err(x.view_as(ref), ref) <= 1e-5, name
    assert torch.equal(outs[0], ins[0]) and torch.equal(outs[3], ins[3])  # r and kw are kept


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [False, True])
def test_wkv7_step_matches_twin(K, dtype, first):
    from rwkv_cli.cuda import kops, twins

    B, H = 3, 4
    C = H * 64
    t, p = _v7_inputs(B, H, dtype, first=first)
    g, r_k = randn(B, C, dtype=dtype), randn(H, 64, dtype=dtype, scale=0.1)
    ln_w, ln_b = randn(C) + 1, randn(C, scale=0.1)
    S = randn(B, H, 64, 64, scale=0.3)
    vf = torch.zeros(B, C, device="cuda", dtype=dtype) if first else t["vf"]
    out, S_out = torch.full_like(g, float("nan")), torch.full_like(S, float("nan"))
    kops.wkv7_step(K, t["r"], t["k"], t["v"], t["wz"], t["az"], t["vz"], g, vf, p["w0"], p["a0"], p["v0"],
                   p["k_k"], p["k_a"], r_k, ln_w, ln_b, S, S_out, out)
    ref_out, ref_S, ref_vf = twins.wkv7_step(t["r"], t["k"], t["v"], t["wz"], t["az"], t["vz"], g, t["vf"], p["w0"],
                                             p["a0"], p["v0"], p["k_k"], p["k_a"], r_k, ln_w, ln_b, S)
    assert rel_err(out, ref_out) <= max(HALF_TOL[dtype], 1e-4)
    assert rel_err(S_out, ref_S) <= 2e-5
    if first:
        assert torch.equal(vf, ref_vf)
    # in place (S_out aliasing S_in), as the decoding step runs it
    kops.wkv7_step(K, t["r"], t["k"], t["v"], t["wz"], t["az"], t["vz"], g, vf, p["w0"], p["a0"], p["v0"],
                   p["k_k"], p["k_a"], r_k, ln_w, ln_b, S, S, out)
    assert torch.equal(S, S_out)


@pytest.mark.parametrize("T", [1, 7, 300])
def test_wkv4_sequence_matches_twin(K, T):
    """Strong and weak decays (w from -e^3 to -e^-5), large keys: the running max must hold."""
    from rwkv_cli.cuda import kops
    from rwkv_cli.wkv import wkv4_sequence

    gen = torch.Generator(device="cuda").manual_seed(T)
    B, A = 2, 300
    w = -torch.exp(torch.linspace(-5, 3, A, device="cuda"))
    u = randn(A, gen=gen)
    k, v = randn(B, T, A, gen=gen, scale=8), randn(B, T, A, gen=gen)
    num, den, mx = randn(B, A, gen=gen), torch.rand(B, A, generator=gen, device="cuda") + 0.1, randn(B, A, gen=gen)
    mx[0] = -1e30  # an empty state
    outs = kops.wkv4_seq(K, w, u, k, v, num, den, mx)
    for out, ref, name in zip(outs, wkv4_sequence(w, u, k, v, num, den, mx), ("y", "num", "den", "max"), strict=False):
        assert rel_err(out, ref) <= 1e-4, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_wkv4_step_matches_twin(K, dtype):
    from rwkv_cli.cuda import kops, twins

    gen = torch.Generator(device="cuda").manual_seed(0)
    B, A = 3, 500
    w, u = -torch.exp(randn(A, gen=gen)), randn(A, gen=gen)
    k, v, r = randn(B, A, gen=gen, scale=5), randn(B, A, gen=gen), torch.rand(B, A, device="cuda").to(dtype)
    num, den, mx = randn(B, A, gen=gen), torch.rand(B, A, device="cuda") + 0.1, randn(B, A, gen=gen)
    out = torch.empty(B, A, device="cuda", dtype=dtype)
    new = [torch.empty_like(num) for _ in range(3)]
    kops.wkv4_step(K, w, u, k, v, r, num, den, mx, out, *new)
    ref = twins.wkv4_step(w, u, k, v, r, num, den, mx)
    assert rel_err(out, ref[0]) <= HALF_TOL[dtype]
    for a, b in zip(new, ref[1:], strict=False):
        assert rel_err(a, b) <= 2e-5


@pytest.mark.parametrize("V", [65536, 50277, 300])
def test_checked_ids_matches_twin(K, V):
    """Argmax (first of equal maxima) or the given ids, and -1 exactly for rows holding a NaN,
    +inf or -inf anywhere: equal to the twin, row by row."""
    from rwkv_cli.cuda import kops
    from rwkv_cli.sampling import checked_ids_torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = randn(7, V, gen=gen, scale=3)
    logits[1, V // 3] = logits[1, V - 1] = logits[1].max() + 1  # a tie: the first index wins
    logits[2, 5] = float("nan")
    logits[3, V - 1] = float("inf")
    logits[4, 0] = float("-inf")
    logits[5] = float("-inf")
    logits[6, : V // 2] = float("nan")
    tokens, ids = kops.checked_ids(K, logits)
    ref_tokens, ref_ids = checked_ids_torch(logits)
    assert ids.tolist() == ref_ids.tolist() and ids.tolist()[2:] == [-1] * 5
    assert tokens[[0, 1]].tolist() == ref_tokens[[0, 1]].tolist() and tokens[1] == V // 3
    assert ((tokens >= 0) & (tokens < V)).all()  # valid ids to feed the next step, whatever the row held
    sampled = torch.arange(7, device="cuda") * 11
    tokens, ids = kops.checked_ids(K, logits, sampled)
    assert tokens is sampled and ids.tolist() == [0, 11, -1, -1, -1, -1, -1]
    out = torch.full((7,), -5, device="cuda")  # a decoding step's input buffer
    for given in (None, sampled):
        tokens, ids = kops.checked_ids(K, logits, given, out)
        want = ref_tokens if given is None else sampled
        assert tokens is out and out[[0, 1]].tolist() == want[[0, 1]].tolist() and ids.tolist()[2:] == [-1] * 5


def test_sampling_kernels_match_the_sampler_twin(K):
    """penalized_softmax against Sampler.penalized + softmax (probabilities, greedy argmax), and
    nucleus_draw against Sampler._truncate + _draw + record from the same sorted input, on rows
    from peaked to flat (V = 65536; a flat row keeps ~65k tokens under top-p 0.99)."""
    from rwkv_cli.cuda import kops
    from rwkv_cli.sampling import Sampler, SamplingParams

    V = 65536
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0),
              SamplingParams(temperature=1.3, top_p=0.99, presence_penalty=0.7),
              SamplingParams(temperature=1.0, top_p=1.0, top_k=5, ban_tokens=(1, 2, 3)),
              SamplingParams(temperature=1.0, min_p=0.2, frequency_penalty=0.9),
              SamplingParams(temperature=2.0, top_p=0.5)]
    B = len(params)
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = Sampler(params, V, device="cuda", uncounted=(7, 8))
    s.record(torch.randint(0, V, (B,), device="cuda", generator=gen))  # some counts to penalise
    s.record(torch.randint(0, 50, (B,), device="cuda", generator=gen))
    logits = torch.randn(B, V, device="cuda", generator=gen) * torch.tensor([[3.0], [0.5], [0.02], [2.0], [1.0], [4.0]], device="cuda")
    probs, argmax = kops.penalized_softmax(K, logits, s.counts, s.seen, s.ban, s.presence, s.frequency)
    pen = s.penalized(logits)
    assert torch.allclose(probs, torch.softmax(pen, -1), rtol=1e-4, atol=1e-9)
    assert argmax.tolist() == pen.argmax(-1).tolist()
    sorted_p, sorted_i = probs.sort(-1, descending=True)
    u = torch.rand(B, device="cuda", generator=gen)
    counts, seen = s.counts.clone(), s.seen.clone()
    tokens = kops.nucleus_draw(K, sorted_p, sorted_i, s.top_p, s.top_k, s.min_p, s.inv_temp, u, argmax,
                               counts, seen, s.weight, s.decay)
    kept, _ = s._truncate(sorted_p, None, check_complete=False)
    drawn = Sampler._draw(kept, sorted_i, u, torch.where(s.inv_temp == 0, 1.0, s.inv_temp))
    want = torch.where(s.inv_temp.view(-1) == 0, argmax, drawn)
    # Exact on rows whose kept set is small. On the flat row (2) the cumulative sums, formed in
    # another order, differ by ~1e-6 where neighbours differ by ~1.5e-5: the draw may land one
    # or two places over in the sorted order, no further.
    where = lambda t: (sorted_i == t.view(-1, 1)).float().argmax(-1)  # noqa: E731 - place in sorted order
    assert [t for b, t in enumerate(tokens.tolist()) if b != 2] == [t for b, t in enumerate(want.tolist()) if b != 2]
    assert abs(int(where(tokens)[2]) - int(where(want)[2])) <= 2
    s.record(tokens)
    assert torch.allclose(counts, s.counts) and torch.equal(seen, s.seen)
