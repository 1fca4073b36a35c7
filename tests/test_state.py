"""The State object: named fields, batch handling, cheap copies, flat-dict round trips."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli import load_model
from rwkv_cli.state import RWKV4LayerState, RWKV7LayerState, State


@pytest.fixture(params=["4", "7"])
def model(request, make_ckpt):
    return load_model(make_ckpt(request.param, 2, 128, 256), "cpu", "fp32")


def test_zero_state_layout(model):
    state = model.zero_state(3)
    cfg = model.cfg
    assert state.batch_size == 3 and len(state.layers) == cfg.n_layer
    layer = state.layers[0]
    if cfg.version == "7":
        assert isinstance(layer, RWKV7LayerState)
        assert layer.wkv.shape == (3, cfg.n_head, cfg.head_size, cfg.head_size) and layer.wkv.dtype == torch.float32
    else:
        assert isinstance(layer, RWKV4LayerState)
        assert (layer.wkv_max == -1e30).all()
    assert state.nbytes == 3 * cfg.state_numel() * 4  # fp32 everywhere in an fp32 model


def test_forward_leaves_the_input_state_untouched(model):
    _, state = model.forward([[1, 2, 3]])
    before = {k: v.clone() for k, v in state.to_dict().items()}
    model.forward([[4, 5]], state)
    model.forward([[6]], state)
    for name, tensor in state.to_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_clone_is_independent(model):
    _, state = model.forward([[1, 2, 3]])
    copy = state.clone()
    copy.layers[0].att_shift.add_(1)
    assert not torch.equal(copy.layers[0].att_shift, state.layers[0].att_shift)


def test_dict_round_trip_resumes_identically(model):
    _, state = model.forward([[1, 2, 3, 4]])
    flat = state.to_dict()
    assert all(k.startswith("blocks.") for k in flat)
    restored = State.from_dict({k: v.clone() for k, v in flat.items()}, model.cfg.version)
    a, _ = model.forward([[7]], state)
    b, _ = model.forward([[7]], restored)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="do not match"):
        State.from_dict({k: v for k, v in flat.items() if not k.endswith("ffn_shift")}, model.cfg.version)


def test_select_and_cat_rebuild_a_batch(model):
    _, s1 = model.forward([[1, 2, 3]])
    _, s2 = model.forward([[9, 8, 7]])
    batch = State.cat([s1, s2])
    assert batch.batch_size == 2
    logits, _ = model.forward([[5], [5]], batch)
    alone, _ = model.forward([[5]], s2)
    assert torch.allclose(logits[1:], alone, atol=1e-5)
    assert torch.equal(batch.select(1).layers[0].att_shift, s2.layers[0].att_shift)


def test_state_moves_dtype_but_keeps_wkv_fp32(model):
    state = model.zero_state().to(dtype=torch.bfloat16)
    for name, tensor in state.to_dict().items():
        assert tensor.dtype == (torch.float32 if name.split(".")[-1].startswith("wkv") else torch.bfloat16)


def test_batch_size_mismatch_is_an_error(model):
    with pytest.raises(ValueError, match="state holds 2"):
        model.forward([[1]], model.zero_state(2))
