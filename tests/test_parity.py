"""Parity with BlinkDL's `rwkv` 0.8.32 (fp32, CPU): logits and every state tensor, after a 64-token
prompt and after 32 single steps, within 1e-4 x max(1, max |reference|)."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli import load_model

from .conftest import (
    PARITY_SHAPES,
    check_prompt_then_steps,
    parity_tokens,
    shape_id,
)


@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=shape_id)
def test_prompt_then_steps_match_reference(shape, make_ckpt, reference_outputs, matmul_backend):
    version = shape[0]
    ref = reference_outputs[shape]
    model = load_model(make_ckpt(*shape), device="cpu", dtype="fp32")
    check_prompt_then_steps(model, ref, version, shape[3])


@pytest.mark.parametrize("shape", PARITY_SHAPES[:1] + PARITY_SHAPES[2:3], ids=shape_id)
def test_safetensors_file_gives_same_logits(shape, make_ckpt, tmp_path):
    """The same tensors as safetensors load to the same model as the .pth."""
    from safetensors.torch import save_file

    pth = make_ckpt(*shape)
    st_path = tmp_path / "model.safetensors"
    save_file(torch.load(pth, weights_only=True), str(st_path))
    prompt, _ = parity_tokens(shape[3])
    a, _ = load_model(pth, "cpu", "fp32").forward([prompt])
    b, _ = load_model(st_path, "cpu", "fp32").forward([prompt])
    assert torch.equal(a, b)
