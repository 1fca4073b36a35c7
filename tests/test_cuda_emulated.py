"""The GPU engine's plumbing on the CPU: every kernel replaced by an emulator that takes the exact
arguments of its CUDA signature (kernels/*.cu) and computes the twin. This checks, without a GPU,
that prefill.py, decode.py and graph.py pass the right tensors in the right order and that the
pieces add up to the model; tests/test_cuda_kernels.py then checks each kernel against the same
twins on a GPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rwkv_cli import errors, ops
from rwkv_cli.cuda import loader, twins
from rwkv_cli.engine import load_model
from rwkv_cli.wkv import wkv4_sequence

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def _rows(t, C):
    return t.reshape(-1, C)


class FakeKernel:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, grid, block, *args, smem=0, stream=None):
        family = next(f for f in sorted(loader.SIGNATURES, key=len, reverse=True) if self.name.startswith(f))
        assert len(args) == len(loader.SIGNATURES[family]), f"{self.name}: {len(args)} arguments"
        self.fn(*args)


def ln_mix(x, shift, w, b, mix, out, xx_out, shift_out, T, C, n, v4):
    B = x.numel() // (T * C)
    mixes, xx, last = twins.ln_mix(x.reshape(B, T, C), shift.reshape(B, C), w, b,
                                   mix.reshape(n, C) if n else torch.zeros(0, C, dtype=x.dtype), bool(v4))
    if n:
        out.reshape(-1)[: n * B * T * C].copy_(mixes.reshape(-1))
    if xx_out is not None:
        xx_out.reshape(-1).copy_(xx.reshape(-1))
    if shift_out is not None:
        shift_out.reshape(-1).copy_(last.reshape(-1))


def wkv7_prep(r, k, v, wz, az, vz, vf, w0, a0, v0, k_k, k_a, r_o, d_o, kk_o, kw_o, vw_o, beta_o, R, H):
    C = k.shape[-1]
    outs = twins.wkv7_prep(*(None if t is None else _rows(t, C) for t in (r, k, v, wz, az, vz, vf)),
                           w0, a0, v0, k_k, k_a, H)
    for dst, src in zip((r_o, d_o, kk_o, kw_o, vw_o, beta_o), outs, strict=False):
        dst.reshape(-1).copy_(src.reshape(-1))


def wkv7_seq(r, d, kk, kw, beta, vw, S_in, S_out, y, T, H):
    S = S_in.clone()
    B, C = S.shape[0], r.shape[-1]
    at = lambda t, i: t.reshape(B, T, C)[:, i]  # noqa: E731
    for i in range(T):
        yi, S = twins.wkv7_recurrence_step(S, *(at(t, i) for t in (r, d, kk, kw, beta, vw)))
        y.reshape(B, T, C)[:, i] = yi
    S_out.copy_(S)


def wkv7_chunk_mats(r, d, kk, kw, beta, mats, T, H):
    B, C = r.numel() // (T * r.shape[-1]), r.shape[-1]
    Q, W, VB, m = twins.wkv7_chunk_mats(*(t.reshape(B, T, C) for t in (r, d, kk, kw, beta)), H)
    for dst, src in ((d, Q), (kk, W), (beta, VB), (mats, m)):  # d, kk, beta are overwritten, as on the GPU
        dst.reshape(-1).copy_(src.reshape(-1))


def wkv7_chunk(Q, W, VB, vw, mats, S_in, S_out, y, T, H):
    B, C = S_in.shape[0], Q.shape[-1]
    yt, S = twins.wkv7_chunk(*(t.reshape(B, T, C) for t in (Q, W, VB, vw)),
                             mats.view(B, H, -1, twins.CHUNK_MATS), S_in)
    y.reshape(B, T, C).copy_(yt)
    S_out.copy_(S)


def wkv7_post(y, r, kw, vw, g, r_k, ln_w, ln_b, out, R, H):
    C = g.shape[-1]
    out.reshape(-1).copy_(twins.wkv7_post(*(_rows(t, C) for t in (y, r, kw, vw, g)), r_k, ln_w, ln_b, H).reshape(-1))


def wkv7_step(r, k, v, wz, az, vz, g, vf, first, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, S_in, S_out, out, H):
    assert bool(first) == (vz is None)
    o, S, v_first = twins.wkv7_step(r, k, v, wz, az, vz, g, vf, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, S_in)
    out.copy_(o)
    S_out.copy_(S)
    if first:
        vf.copy_(v_first)


def wkv4_seq(w, u, k, v, num, den, mx, y, num_o, den_o, mx_o, B, T, A):
    outs = wkv4_sequence(w, u, k, v, num, den, mx)
    for dst, src in zip((y, num_o, den_o, mx_o), outs, strict=False):
        dst.copy_(src)


def wkv4_step(w, u, k, v, r, num, den, mx, out, num_o, den_o, mx_o, B, A):
    outs = twins.wkv4_step(w, u, k, v, r, num, den, mx)
    for dst, src in zip((out, num_o, den_o, mx_o), outs, strict=False):
        dst.copy_(src)


def gemm(x, W, res, y, M, N, K, ldx, sx, sW, ldy, sy, out_f32):
    n = y.numel() // (M * N)
    assert ldy == N and sy == M * N and bool(out_f32) == (y.dtype == torch.float32)
    xs = x.as_strided((n, M, K), (sx, ldx, 1), x.storage_offset())
    Ws = W.reshape(-1, N, K) if sW else W.reshape(1, N, K)
    y.view(n, M, N).copy_(twins.gemm(xs, Ws.expand(n, N, K), None if res is None else res.reshape(n, M, N), True))


def act_inplace(x, n, act, x2, n2, act2):
    assert n == x.numel() and (x2 is None or n2 == x2.numel())
    twins.act_inplace(x, act, x2, act2)


class FakeGemv:
    """kernels/gemv.cu for one prepared launch: the fp32 reference of the same products."""

    def __init__(self, segs):
        self.segs = segs

    def launch(self, grid, block, payload, smem):
        assert payload and grid > 0
        twins.gemv_reference(self.segs)


class FakeKernels:
    """Stands in for loader.Kernels. max_smem = 0 routes decoding products to cuBLAS
    (twins.gemv_torch) with a separate ln_mix launch; otherwise gemv launches run FakeGemv."""

    max_smem = 0
    fns = {"ln_mix": ln_mix, "wkv7_prep": wkv7_prep, "wkv7_seq": wkv7_seq, "wkv7_chunk": wkv7_chunk,
           "wkv7_chunk_mats": wkv7_chunk_mats, "wkv7_post": wkv7_post, "wkv7_step": wkv7_step,
           "wkv4_seq": wkv4_seq, "wkv4_step": wkv4_step, "act_inplace": act_inplace, "gemm": gemm}

    def get(self, name):
        family = next(f for f in sorted(self.fns, key=len, reverse=True) if name.startswith(f))
        return FakeKernel(name, self.fns[family])


@pytest.fixture(params=["gemv", "cublas"])
def emulated(monkeypatch, request):
    """Models built inside this fixture's scope see the emulated kernels on the CPU; decoding
    products through the fused gemv launches (LayerNorm staged inside) or through cuBLAS."""
    from rwkv_cli.cuda import kops

    fake = FakeKernels()
    if request.param == "gemv":
        fake.max_smem = 1 << 20
        monkeypatch.setattr(kops, "gemv_kernel", lambda K, segs: FakeGemv(segs))
    monkeypatch.setattr(loader, "kernels_for", lambda device: fake)
    # a GPU model's weights are plain tensors: no CPU packing of bf16 weights for the kernels
    monkeypatch.setattr(ops, "packs_bf16_weights", lambda: False)
    return fake


def _signature_kinds(params: str) -> str:
    kinds = []
    for p in params.split(","):
        p = p.strip()
        kinds.append("p" if "*" in p else "f" if p.startswith("float") else "l" if p.startswith("long long") else "i")
    return "".join(kinds)


def test_signatures_match_the_cuda_sources():
    """loader.SIGNATURES (how Python packs arguments) agrees with every kernel's C parameter list."""
    found = {}
    for path in KERNELS.glob("*.cu"):
        text = re.sub(r"//[^\n]*", "", path.read_text()).replace("\\\n", " ")
        for name, params in re.findall(r"__global__ void (?:__launch_bounds__\([\d, ]+\) )?([\w#]+)\(([^)]*)\)", text):
            found[name.replace("##SUF", "")] = _signature_kinds(params)
    by_length = sorted(loader.SIGNATURES, key=len, reverse=True)  # the loader's rule: longest prefix
    family_of = {n: next((f for f in by_length if n.rstrip("_") == f or n.startswith(f + "_")), None)
                 for n in found}
    for family, sig in loader.SIGNATURES.items():
        names = [n for n in found if family_of[n] == family]
        assert names, f"no kernel for {family}"
        for n in names:
            assert found[n] == sig, f"{n}: source has {found[n]}, Python packs {sig}"


def test_every_kernel_family_is_found_in_its_module():
    """loader.MODULE_OF names, for every family in SIGNATURES, the source file that defines it."""
    assert set(loader.MODULE_OF) == set(loader.SIGNATURES)
    for family, module in loader.MODULE_OF.items():
        assert module in loader.SOURCES
        assert re.search(rf"\b{family}(_##SUF|_\w+)?\(", (KERNELS / f"{module}.cu").read_text()), family


@pytest.mark.parametrize("version", ["7", "4"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_emulated_gpu_engine_matches_torch_path(make_ckpt, emulated, version, dtype):
    """Prefill (prefill.py) and decoding (decode.py + graph.GraphStep, eager) through the emulated
    kernels equal the model's own PyTorch code, B = 2, odd prompt length."""
    from rwkv_cli.cuda.graph import GraphStep

    ckpt = make_ckpt(version, 3, 128, 512)
    model = load_model(ckpt, device="cpu", dtype=dtype)
    net = model.net
    from rwkv_cli.models import rwkv4, rwkv7

    for lw in net.layers:  # the GPU layout: prompts take the batched products of prefill.py
        (rwkv7 if version == "7" else rwkv4).stack_for_prompts(lw)
    tol = 1e-4 if dtype == "fp32" else 5e-2
    tokens = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_state = net.forward_torch(tokens, net.zero_state(2))
    net._kernels = lambda: emulated  # this instance takes the GPU branches
    logits, state = net.forward_torch(tokens, net.zero_state(2))
    scale = float(ref_logits.abs().max())
    assert float((logits.float() - ref_logits.float()).abs().max()) <= tol * scale
    for a, b in zip(state.tensors(), ref_state.tensors(), strict=False):
        assert float((a.float() - b.float()).abs().max()) <= tol * max(1.0, float(b.float().abs().max()))

    step = GraphStep(net, 2, use_graph=False)
    assert step.backend == "cuda"
    nxt = torch.tensor([[3], [7]])
    del net._kernels
    ref_logits, ref_state = net.forward_torch(nxt, ref_state)
    logits, new = step(nxt, state)
    assert float((logits - ref_logits.float()).abs().max()) <= tol * float(ref_logits.abs().max())
    for a, b in zip(new.tensors(), ref_state.tensors(), strict=False):
        assert float((a.float() - b.float()).abs().max()) <= tol * max(1.0, float(b.float().abs().max()))
    # the input state is untouched and the returned one is fresh: a second step from `state` agrees
    logits2, _ = step(nxt, state)
    assert torch.equal(logits, logits2)
    # stepping on from the returned state (the copy-free path) equals stepping from a clone of it
    l3, s3 = step(nxt, new)
    l4, _ = step(nxt, new.clone())
    assert torch.equal(l3, l4)


def test_deep_embed_stays_on_the_torch_path(make_ckpt, emulated, monkeypatch, capsys):
    """RWKV-7a (DeepEmbed): the kernels do not know its channel-mix factor (§7.5), so on a GPU its
    layers and its decoding step run the PyTorch code, with a one-line notice; the step's graph
    then captures that code (GraphStep backend "torch") and equals forward_torch."""
    from rwkv_cli.cuda.graph import GraphStep

    monkeypatch.setattr(errors, "_notices", set())
    net = load_model(make_ckpt("7a", 2, 128, 512), device="cpu", dtype="fp32").net
    plain = load_model(make_ckpt("7", 3, 128, 512), device="cpu", dtype="fp32").net
    for n in (net, plain):
        n.device = torch.device("cuda")  # only _kernels() reads it before being restored
    try:
        assert plain._kernels() is emulated  # a plain RWKV-7 would take the kernels
        assert net._kernels() is None
    finally:
        net.device = plain.device = torch.device("cpu")
    assert "RWKV-7a (DeepEmbed); using the PyTorch path" in capsys.readouterr().err

    step = GraphStep(net, 2, use_graph=False)
    assert step.backend == "torch"
    tokens = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    _, state = net.forward_torch(tokens, net.zero_state(2))
    nxt = torch.tensor([[3], [7]])
    ref_logits, ref_state = net.forward_torch(nxt, state)
    logits, new = step(nxt, state)
    assert torch.allclose(logits, ref_logits.float(), rtol=0, atol=1e-5 * float(ref_logits.abs().max()))
    for a, b in zip(new.tensors(), ref_state.tensors(), strict=False):
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("version", ["7", "4"])
def test_decoding_buffers_are_reused_only_when_nobody_holds_them(make_ckpt, emulated, version):
    """graph.GraphStep hands out its destination buffer as the new state and logits (no copy). A
    loop that drops each state ping-pongs between two buffers; states and logits the caller keeps
    (whole, or a single view of one) are never written again, and every step still equals the
    PyTorch path."""
    from rwkv_cli.cuda.graph import GraphStep

    net = load_model(make_ckpt(version, 3, 128, 512), device="cpu", dtype="fp32").net
    toks = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    _, start = net.forward_torch(toks[:, :5], net.zero_state(2))
    net._kernels = lambda: emulated
    step = GraphStep(net, 2, use_graph=False)
    del net._kernels
    st, ref = start, start
    for t in range(5, 15):
        logits, st = step(toks[:, t : t + 1], st)
        ref_logits, ref = net.forward_torch(toks[:, t : t + 1], ref)
        assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-4 * float(ref_logits.abs().max()))
    assert len(step.buffers) == 2 and len(step.steps) == 2
    kept, views = [], []
    for t in range(15, 40):
        lg, st = step(toks[:, t : t + 1], st)
        if t % 5 == 0:
            kept.append((st, [x.clone() for x in st.tensors()]))
        elif t % 5 == 1:
            views.append((lg, lg.clone()))  # logits held without their state
        elif t % 5 == 2:
            views.append((st.layers[1].ffn_shift, st.layers[1].ffn_shift.clone()))
    for held, copy in kept:
        assert all(torch.equal(a, b) for a, b in zip(held.tensors(), copy, strict=False))
    for view, copy in views:
        assert torch.equal(view, copy)
    assert len(step.buffers) <= 3
    # the start state was copied in, never written
    _, again = net.forward_torch(toks[:, :5], net.zero_state(2))
    assert all(torch.equal(a, b) for a, b in zip(start.tensors(), again.tensors(), strict=False))


def test_torch_backend_step_reuses_its_buffers(make_ckpt, emulated):
    """The PyTorch-path step (RWKV-7a here), run eagerly, also ping-pongs between two buffers: its
    per-layer views of the source are made when the step is built, so they count as its own."""
    from rwkv_cli.cuda.graph import GraphStep

    net = load_model(make_ckpt("7a", 2, 128, 512), device="cpu", dtype="fp32").net
    step = GraphStep(net, 1, use_graph=False)
    assert step.backend == "torch"
    _, st = net.forward_torch(torch.tensor([[1, 2, 3]]), net.zero_state(1))
    for t in range(8):
        _, st = step(torch.tensor([[t]]), st)
    assert len(step.buffers) == 2 and len(step.steps) == 2
