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
