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

import numpy as np
import pytest
import torch

from rwkv_cli import load_model, ops
from rwkv_cli.errors import NonFiniteError
from rwkv_cli.testing import random_state_dict, write_checkpoint

from .conftest import (
    HALF_TOLERANCES,
    assert_close_to_reference,
    check_deep_fp16,
    check_half_precision,
    cpu_matmul,
)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", [("7", 4, 256, 1024), ("4", 4, 256, 1024), ("7", 8, 128, 1024)], ids=str)
def test_half_precision_matches_fp32(shape, dtype, make_ckpt):
    check_half_precision(make_ckpt(*shape), dtype, shape[3])


packed = pytest.mark.skipif(not ops.packs_bf16_weights(),
                            reason="oneDNN cannot pack bf16 weights on this CPU")


@packed
@pytest.mark.parametrize("rows", [1, 37])
def test_packed_weight_products(rows):
    """`PackedWeight` products (prompt rows and a NumPy step's one row) against fp32 products of
    the same bf16 numbers: only the inputs' and outputs' bf16 rounding differs."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 200, generator=gen) * 0.05).bfloat16()
    x = torch.randn(rows, 200, generator=gen)
    want = torch.nn.functional.linear(x.bfloat16().float(), w.float())
    pw = ops.PackedWeight(w)
    got = ops.linear(x.bfloat16().view(1, rows, 200), pw)
    assert got.dtype == torch.bfloat16 and got.shape == (1, rows, 300)
    assert_close_to_reference(got[0].float(), want, "packed linear", rel=2**-8)
    got_np = ops.np_linear(x.numpy(), pw)
    assert got_np.dtype == np.float32 and got_np.shape == (rows, 300)
    assert_close_to_reference(torch.from_numpy(got_np), want, "packed np_linear", rel=2**-8)
    assert ops.linear_fp32_out(x.bfloat16(), pw).dtype == torch.float32


@packed
@pytest.mark.parametrize("version", ["7", "4", "6", "5.2", "5.0"])
def test_bf16_packed_model_matches_its_torch_twin(version, make_ckpt):
    """A bf16 CPU model holds its products packed and steps in NumPy; it agrees with the same
    model on plain torch (unpacked weights, torch steps) within the bf16 tolerances, through a
    prompt and 8 steps, and counts the same weight bytes."""
    path = make_ckpt(version, 4, 256, 1024)
    model = load_model(path, "cpu", "bf16")
    assert model.net.packed and isinstance(model.net.head, ops.PackedWeight)
    with cpu_matmul("torch"):
        twin = load_model(path, "cpu", "bf16")
    assert not twin.net.packed
    assert model.net.weights_nbytes() == twin.net.weights_nbytes()
    tokens = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(0))
    (logits, state), (want, want_state) = model.forward(tokens), twin.forward(tokens)
    for t in range(8):
        logits, state = model.forward(tokens[:, t : t + 1], state)
        with cpu_matmul("torch"):
            want, want_state = twin.forward(tokens[:, t : t + 1], want_state)
    logit_tol, _, state_tol = HALF_TOLERANCES["bf16"]
    assert_close_to_reference(logits, want, "packed bf16 logits", rel=logit_tol)
    want_dict = want_state.to_dict()
    for name, tensor in state.to_dict().items():
        assert tensor.dtype == want_dict[name].dtype, name
        assert_close_to_reference(tensor, want_dict[name], f"packed bf16 {name}", rel=state_tol)


def test_deep_rwkv4_fp16_does_not_overflow(tmp_path):
    """A deep RWKV-4 in fp16 stays finite and close to fp32 (the residual rescale)."""
    check_deep_fp16("4", tmp_path)


def test_non_finite_logits_are_an_error(tmp_path):
    sd = random_state_dict("7", 1, 64, vocab_size=128, dtype=torch.float32)
    sd["head.weight"][5, 0] = float("nan")
    model = load_model(write_checkpoint(tmp_path / "nan.pth", sd), "cpu", "fp32")
    with pytest.raises(NonFiniteError, match="non-finite logits"):
        model.forward([[1, 2, 3]])
