"""Every supported version on a CUDA device, including those without fused kernels (RWKV-5.x,
RWKV-6, RWKV-7a: the PyTorch path), against our fp32 CPU path. Skips without a GPU.

Tolerances as in tests/test_dtypes.py: fp16 logits 0.01 x max(1, max |fp32 logits|), states 0.02;
bf16 logits 0.05, states 0.1.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_cli import load_model

from .conftest import assert_close_to_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOLERANCES = {"fp16": (0.01, 0.02), "bf16": (0.05, 0.1)}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("version", ["5.0", "5.1", "5.2", "6", "7", "7a", "4"])
def test_version_on_cuda_matches_cpu_fp32(make_ckpt, version, dtype):
    logit_tol, state_tol = TOLERANCES[dtype]
    path = make_ckpt(version, 3, 128, 1024)
    cpu, gpu = load_model(path, "cpu", "fp32"), load_model(path, "cuda", dtype)
    toks = torch.randint(0, 1024, (2, 45), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_state = cpu.forward(toks[:, :37])
    logits, state = gpu.forward(toks[:, :37])
    assert_close_to_reference(logits.cpu(), ref_logits, f"{version} {dtype} prompt logits", rel=logit_tol)
    for t in range(37, 45):
        ref_logits, ref_state = cpu.forward(toks[:, t : t + 1], ref_state)
        logits, state = gpu.forward(toks[:, t : t + 1], state)
    assert_close_to_reference(logits.cpu(), ref_logits, f"{version} {dtype} step logits", rel=logit_tol)
    ref = ref_state.to_dict()
    for name, tensor in state.to_dict().items():
        assert_close_to_reference(tensor.cpu(), ref[name], f"{version} {dtype} {name}", rel=state_tol)


@pytest.mark.parametrize("version", ["7", "4"])
def test_generation_batch_and_chat_on_cuda(make_ckpt, version):
    """The layers above the engine (sampler, streaming, batching, chat snapshots) on a GPU."""
    from rwkv_cli.generate import BatchRequest, Generation, generate_batch
    from rwkv_cli.sampling import SamplingParams
    from rwkv_cli.session import ChatSession
    from rwkv_cli.tokenizer import load_tokenizer

    world = load_tokenizer("world")
    model = load_model(make_ckpt(version, 3, 128, 65536), "cuda", "fp16")
    ids = world.encode("Once upon a time")
    for params in (SamplingParams(temperature=0), SamplingParams(seed=3), SamplingParams(top_p=1.0, top_k=5, seed=4)):
        gen = Generation(model, world, ids, params, max_tokens=12, stop_at_eos=False)
        gen.run()
        assert len(gen.tokens) == 12 and gen.state.device.type == "cuda"
    requests = [BatchRequest(world.encode(p), SamplingParams(temperature=0), 5 + i) for i, p in enumerate(["a", "bc", "def"])]
    results = dict(generate_batch(model, world, requests, batch_size=2, stop_at_eos=False))
    assert [len(results[i]["tokens"]) for i in range(3)] == [5, 6, 7]
    chat = ChatSession(model, world, SamplingParams(temperature=0), max_tokens=6)
    first = "".join(chat.send("Hello"))
    chat.undo()
    assert "".join(chat.send("Hello")) == first
