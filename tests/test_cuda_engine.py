"""The CUDA engine end to end, on a GPU: against our fp32 CPU path, against the reference engine
(BlinkDL `rwkv` 0.8.32, "cuda fp16", RWKV_CUDA_ON=1), CUDA-graph replay against eager launches,
snapshot semantics, memory, and the reported fallback when NVRTC is missing.

Tolerances, as in tests/test_dtypes.py (max |err| <= rel x max(1, max |reference|)):
  vs our CPU fp32:      fp16 logits 0.01, KL 1e-4, states 0.02;  bf16 logits 0.05, KL 2e-3, states 0.1
  vs the reference's cuda fp16 (both in fp16, each rounding differently): logits 0.02, states 0.05
The missing-NVRTC notice test also runs without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_cli import load_model
from rwkv_cli.testing import random_state_dict, reference_state_as_dict, run_reference, write_checkpoint

from .conftest import assert_close_to_reference

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCES = {"bf16": (0.05, 2e-3, 0.1), "fp16": (0.01, 1e-4, 0.02)}
SHAPES = [("7", 4, 256, 1024), ("4", 4, 256, 1024)]


def tokens(B, T, vocab, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def kl(logits, ref):
    return float(torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("B,T", [(1, 37), (3, 37), (2, 301), (6, 21)])
@pytest.mark.parametrize("products", ["gemm", "cublas"])
def test_cuda_matches_cpu_fp32(make_ckpt, shape, dtype, B, T, products):
    """Prompt (odd lengths; 301 crosses the GPU prefill chunk) then 8 graph-replayed steps; B = 6
    decodes through cuBLAS (batched products) instead of the gemv kernel (B <= 4). The prompt's
    products run on kernels/gemm.cu (what these small models get) or on cuBLAS (bigger models)."""
    logit_tol, kl_tol, state_tol = TOLERANCES[dtype]
    path = make_ckpt(*shape)
    cpu, gpu = load_model(path, "cpu", "fp32"), load_model(path, "cuda", dtype)
    gpu.net._own_gemm = products == "gemm"
    toks = tokens(B, T + 8, shape[3])
    ref_logits, ref_state = cpu.forward(toks[:, :T])
    logits, state = gpu.forward(toks[:, :T])
    assert_close_to_reference(logits.cpu(), ref_logits, f"{dtype} prompt logits", rel=logit_tol)
    for t in range(T, T + 8):
        ref_logits, ref_state = cpu.forward(toks[:, t : t + 1], ref_state)
        logits, state = gpu.forward(toks[:, t : t + 1], state)
    assert logits.dtype == torch.float32 and logits.is_cuda
    assert_close_to_reference(logits.cpu(), ref_logits, f"{dtype} step logits", rel=logit_tol)
    assert kl(logits.cpu(), ref_logits) <= kl_tol
    ref = ref_state.to_dict()
    for name, t in state.to_dict().items():
        assert_close_to_reference(t.cpu(), ref[name], f"{dtype} {name}", rel=state_tol)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("version", ["7", "4"])
def test_graph_replay_equals_eager_and_snapshots_stay_valid(make_ckpt, version):
    from rwkv_cli.cuda.graph import GraphStep

    path = make_ckpt(*next(s for s in SHAPES if s[0] == version))
    model = load_model(path, "cuda", "fp16")
    toks = tokens(2, 20, 1024, seed=3)
    _, s0 = model.forward(toks[:, :12])
    runs = {}
    for use_graph in (True, False):
        step = GraphStep(model.net, 2, use_graph=use_graph)
        st, logits = s0, []
        for t in range(12, 20):
            lg, st = step(toks[:, t : t + 1].cuda(), st)
            logits.append(lg)
        assert step.backend == "cuda" and step.use_graph == use_graph
        runs[use_graph] = logits, st
    # a loop that drops each state and its logits ping-pongs between two buffers and two graphs
    step, st = GraphStep(model.net, 2), s0
    for t in range(12, 20):
        lg, st = step(toks[:, t : t + 1].cuda(), st)
        assert torch.equal(lg, runs[True][0][t - 12])
    assert len(step.buffers) == 2 and len(step.steps) == 2
    for t, (lg, le) in enumerate(zip(runs[True][0], runs[False][0], strict=False)):
        assert torch.equal(lg, le), f"step {t}: graph and eager launches differ"
    for a, b in zip(runs[True][1].tensors(), runs[False][1].tensors(), strict=False):
        assert torch.equal(a, b)
    # two captured graphs alive and called in turns (GraphCache with several batch sizes) must not
    # touch each other's buffers (prepared launches point into them)
    one, two = GraphStep(model.net, 2), GraphStep(model.net, 2)
    s1 = s2 = s0
    for t in range(12, 20):
        l1, s1 = one(toks[:, t : t + 1].cuda(), s1)
        l2, s2 = two(toks[:, t : t + 1].cuda(), s2)
        assert torch.equal(l1, runs[True][0][t - 12]) and torch.equal(l2, l1), f"step {t - 12}"
    # the engine's contract: forward never changes the state it is given, and old states stay valid
    before = [t.clone() for t in s0.tensors()]
    l1, s1 = model.forward(toks[:, 12:13], s0)
    l2, s2 = model.forward(toks[:, 13:14], s1)
    l1b, _ = model.forward(toks[:, 12:13], s0)
    l2b, _ = model.forward(toks[:, 13:14], s1)
    assert torch.equal(l1, l1b) and torch.equal(l2, l2b)
    assert all(torch.equal(a, b) for a, b in zip(before, s0.tensors(), strict=False))
    # states kept by the caller (chat snapshots), whole or as a single view, are never overwritten
    step, st, kept, views = GraphStep(model.net, 2), s0, [], []
    for t in range(12, 20):
        _, st = step(toks[:, t : t + 1].cuda(), st)
        if t % 2:
            kept.append((st, [x.clone() for x in st.tensors()]))
        else:
            views.append((st.layers[-1].ffn_shift, st.layers[-1].ffn_shift.clone()))
    for _ in range(6):
        _, st = step(toks[:, 19:20].cuda(), st)
    for held, copy in kept:
        assert all(torch.equal(a, b) for a, b in zip(held.tensors(), copy, strict=False))
    for view, copy in views:
        assert torch.equal(view, copy)
    assert len(step.buffers) <= 3


@needs_gpu
@pytest.mark.gpu
def test_deep_rwkv4_fp16_on_gpu(tmp_path):
    """The 24-layer RWKV-4 of test_dtypes whose residual overflows fp16 without the rescale."""
    sd = random_state_dict("4", 24, 64, vocab_size=256, dtype=torch.float32)
    for i in range(24):
        sd[f"blocks.{i}.ffn.value.weight"] *= 4000.0 * 2 ** (i // 6)
    path = write_checkpoint(tmp_path / "deep.pth", sd)
    toks = tokens(1, 24, 256)
    cpu, gpu = load_model(path, "cpu", "fp32"), load_model(path, "cuda", "fp16")
    ref_logits, ref_state = cpu.forward(toks[:, :16])
    logits, state = gpu.forward(toks[:, :16])
    assert_close_to_reference(logits.cpu(), ref_logits, "deep fp16 prompt logits", rel=0.02)
    for t in range(16, 24):
        ref_logits, ref_state = cpu.forward(toks[:, t : t + 1], ref_state)
        logits, state = gpu.forward(toks[:, t : t + 1], state)
    assert torch.isfinite(logits).all()
    assert_close_to_reference(logits.cpu(), ref_logits, "deep fp16 step logits", rel=0.02)


def load_measured(path):
    """(fp16 model on the GPU with its kernels loaded, bytes its weights took)."""
    from rwkv_cli.cuda import loader

    assert loader.kernels_for(torch.device("cuda")) is not None, loader.status()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    model = load_model(path, "cuda", "fp16")
    return model, torch.cuda.memory_allocated() - start


@needs_gpu
@pytest.mark.gpu
def test_decode_memory_within_weights_states_and_10_percent(make_ckpt):
    """While decoding, memory beyond the weights is the states (the caller's, the graph's static
    one and the fresh one handed out) plus at most 10% of the weights."""
    model, weights = load_measured(make_ckpt("7", 6, 768, 65536))
    _, state = model.forward(tokens(1, 100, 65536))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for t in range(20):
        logits, state = model.forward([[t]], state)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    print(f"\ndecode memory: weights {weights / 2**20:.1f} MiB, state {state.nbytes / 2**20:.2f} MiB, "
          f"extra while decoding {extra / 2**20:.2f} MiB")
    assert extra <= 0.10 * weights + 3 * state.nbytes


@needs_gpu
@pytest.mark.gpu
def test_prompt_memory_within_weights_states_and_10_percent(make_ckpt):
    """A long prompt (several GPU chunks) of a small model needs at most 10% of the weights beyond
    them and the states: its products run on kernels/gemm.cu, so cuBLAS's workspace (32 MiB on
    Hopper, 11% of these weights) is never allocated."""
    model, weights = load_measured(make_ckpt("7", 6, 768, 65536))
    prompt = tokens(1, 3 * model.net.gpu_prefill_chunk() + 17, 65536)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _, state = model.forward(prompt)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    print(f"\nprompt memory: weights {weights / 2**20:.1f} MiB, extra {extra / 2**20:.2f} MiB")
    assert model.net._own_gemm
    assert extra <= 0.10 * weights + 3 * state.nbytes


def test_missing_nvrtc_falls_back_with_one_notice(make_ckpt, monkeypatch, capfd):
    """Simulated missing cuda-bindings/NVRTC: one line on stderr, then the PyTorch path (on a GPU,
    checked to give the same numbers as the CPU within the fp16 tolerance)."""
    from rwkv_cli.cuda import loader

    def missing():
        raise ImportError("No module named 'cuda.bindings' (simulated)")

    monkeypatch.setattr(loader, "_import_bindings", missing)
    monkeypatch.delenv("RWKV_KERNELS", raising=False)
    loader.reset()
    try:
        assert loader.kernels_for(torch.device("cuda", 0)) is None
        assert loader.kernels_for(torch.device("cuda", 0)) is None
        if torch.cuda.is_available():
            path = make_ckpt(*SHAPES[0])
            gpu, cpu = load_model(path, "cuda", "fp16"), load_model(path, "cpu", "fp32")
            toks = tokens(2, 21, 1024)
            logits, state = gpu.forward(toks[:, :20])
            logits, state = gpu.forward(toks[:, 20:], state)
            ref, _ = cpu.forward(toks)
            assert_close_to_reference(logits.cpu(), ref, "fallback logits", rel=0.01)
        err = capfd.readouterr().err
        lines = [ln for ln in err.splitlines() if "fused CUDA kernels unavailable" in ln]
        assert len(lines) == 1, err
        assert "simulated" in lines[0] and "using the PyTorch path" in lines[0]
    finally:
        loader.reset()


@pytest.fixture(scope="module")
def cuda_reference(make_ckpt, tmp_path_factory):
    """The reference engine on the GPU: two prompts of 37 tokens per shape, then 8 steps each."""
    pytest.importorskip("rwkv", reason="the reference engine (rwkv==0.8.32) is a test dependency")
    work = tmp_path_factory.mktemp("cuda-reference")
    out = {}
    for shape in SHAPES:
        toks = tokens(2, 45, shape[3], seed=5)
        jobs = [{"checkpoint": str(make_ckpt(*shape)), "prompt": toks[b, :37].tolist(), "steps": toks[b, 37:].tolist(),
                 "strategy": "cuda fp16"} for b in range(2)]
        out[shape] = (toks, run_reference(shape[0], jobs, work, env={"RWKV_CUDA_ON": "1"}))
    return out


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("products", ["gemm", "cublas"])
def test_cuda_matches_reference_cuda_fp16(cuda_reference, make_ckpt, shape, products):
    """Our fp16 engine, both prompts as one batch of 2, against the reference run per prompt, the
    prompt's products on kernels/gemm.cu or on cuBLAS."""
    toks, refs = cuda_reference[shape]
    path = make_ckpt(*shape)
    gpu, cpu = load_model(path, "cuda", "fp16"), load_model(path, "cpu", "fp32")
    gpu.net._own_gemm = products == "gemm"
    logits, state = gpu.forward(toks[:, :37])
    cpu_logits, cpu_state = cpu.forward(toks[:, :37])
    for b in range(2):
        assert_close_to_reference(logits[b].cpu(), refs[b]["prompt.logits"], f"prompt logits [{b}]", rel=0.02)
    for t in range(37, 45):
        logits, state = gpu.forward(toks[:, t : t + 1], state)
        cpu_logits, cpu_state = cpu.forward(toks[:, t : t + 1], cpu_state)
    for b in range(2):
        ref = refs[b]
        assert_close_to_reference(logits[b].cpu(), ref["steps.logits"][-1], f"step logits [{b}]", rel=0.02)
        ref_state = reference_state_as_dict(ref, "steps", shape[0])
        ours = state.select(b).to_dict()
        for name, t in ours.items():
            assert_close_to_reference(t.cpu(), ref_state[name], f"state {name} [{b}]", rel=0.05)
        ours_err = float((logits[b].cpu() - cpu_logits[b]).abs().max())
        ref_err = float((ref["steps.logits"][-1] - cpu_logits[b]).abs().max())
        print(f"\nv{shape[0]} row {b}: max |logit - fp32 CPU|: ours cuda fp16 {ours_err:.2e}, reference cuda fp16 {ref_err:.2e}")
