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

from .conftest import (
    check_deep_fp16,
    check_half_precision,
)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", [("7", 4, 256, 1024), ("4", 4, 256, 1024), ("7", 8, 128, 1024)], ids=str)
def test_half_precision_matches_fp32(shape, dtype, make_ckpt):
    check_half_precision(make_ckpt(*shape), dtype, shape[3])


def test_deep_rwkv4_fp16_does_not_overflow(tmp_path):
    """A deep RWKV-4 in fp16 stays finite and close to fp32 (the residual rescale)."""
    check_deep_fp16("4", tmp_path)


def test_non_finite_logits_are_an_error(tmp_path):
    sd = random_state_dict("7", 1, 64, vocab_size=128, dtype=torch.float32)
    sd["head.weight"][5, 0] = float("nan")
    model = load_model(write_checkpoint(tmp_path / "nan.pth", sd), "cpu", "fp32")
    with pytest.raises(NonFiniteError, match="non-finite logits"):
        model.forward([[1, 2, 3]])
