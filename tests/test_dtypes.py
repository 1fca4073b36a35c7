"""bf16 and fp16 against our fp32 path, and fp16 safety for deep RWKV-4 models.

Documented tolerances (measured errors on these random models are about 1/3 of them):
  bf16: logits max |err| <= 0.05 x max(1, max |fp32 logits|), KL(fp32 || bf16) <= 2e-3,
        state tensors max |err| <= 0.1 x max(1, max |fp32 state|)
  fp16: logits max |err| <= 0.01 x max(1, max |fp32 logits|), KL <= 1e-4,
        state tensors max |err| <= 0.02 x max(1, max |fp32 state|)
bf16 keeps 8 mantissa bits (relative rounding 2^-9), fp16 keeps 11 (2^-12); errors compound over
layers and tokens, hence the ~5x gap between the two bounds.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_cli import load_model
from rwkv_cli.errors import NonFiniteError
from rwkv_cli.testing import random_state_dict, write_checkpoint

from .conftest import assert_close_to_reference

TOLERANCES = {"bf16": (0.05, 2e-3, 0.1), "fp16": (0.01, 1e-4, 0.02)}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", [("7", 4, 256, 1024), ("4", 4, 256, 1024), ("7", 8, 128, 1024)], ids=str)
def test_half_precision_matches_fp32(shape, dtype, make_ckpt):
    logit_tol, kl_tol, state_tol = TOLERANCES[dtype]
    path = make_ckpt(*shape)
    ref_model, model = load_model(path, "cpu", "fp32"), load_model(path, "cpu", dtype)
    tokens = torch.randint(0, shape[3], (2, 40), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_state = ref_model.forward(tokens)
    logits, state = model.forward(tokens)
    for t in range(8):  # then a few RNN steps in the same precision
        step = tokens[:, t : t + 1]
        ref_logits, ref_state = ref_model.forward(step, ref_state)
        logits, state = model.forward(step, state)
    assert logits.dtype == torch.float32
    assert_close_to_reference(logits, ref_logits, f"{dtype} logits", rel=logit_tol)
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    assert float(kl) <= kl_tol
    ref_dict = ref_state.to_dict()
    for name, tensor in state.to_dict().items():
        want = torch.float32 if name.split(".")[-1].startswith("wkv") else model.dtype
        assert tensor.dtype == want, f"{name} is {tensor.dtype}"
        assert_close_to_reference(tensor, ref_dict[name], f"{dtype} {name}", rel=state_tol)


def test_deep_rwkv4_fp16_does_not_overflow(tmp_path):
    """A 24-layer RWKV-4 whose residual stream passes fp16's 65504 in fp32 (deeper layers write
    larger outputs, as in trained models): fp16 stays finite and close, thanks to halving the
    residual every 6 layers with matching output weights."""
    sd = random_state_dict("4", 24, 64, vocab_size=256, dtype=torch.float32)
    for i in range(24):
        sd[f"blocks.{i}.ffn.value.weight"] *= 4000.0 * 2 ** (i // 6)
    path = write_checkpoint(tmp_path / "deep.pth", sd)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    fp32 = load_model(path, "cpu", "fp32")
    residual, _ = fp32.net.blocks(fp32.net.emb[tokens], fp32.zero_state())
    assert float(residual.abs().max()) > 65504, "the test model must overflow fp16 without rescaling"
    ref_logits, _ = fp32.forward(tokens)
    logits, _ = load_model(path, "cpu", "fp16").forward(tokens)
    assert torch.isfinite(logits).all()
    assert_close_to_reference(logits, ref_logits, "deep fp16 logits", rel=0.02)


def test_non_finite_logits_are_an_error(tmp_path):
    sd = random_state_dict("7", 1, 64, vocab_size=128, dtype=torch.float32)
    sd["head.weight"][5, 0] = float("nan")
    model = load_model(write_checkpoint(tmp_path / "nan.pth", sd), "cpu", "fp32")
    with pytest.raises(NonFiniteError, match="non-finite logits"):
        model.forward([[1, 2, 3]])
