"""RWKV-7a (DeepEmbed): detection and config, parity with BlinkDL's `rwkv` 0.8.32 run with
RWKV_DE_VERSION=1 (fp32, CPU, both CPU matmul backends), sequence mode against step mode, and
bf16/fp16 against fp32 with the tolerances of tests/test_dtypes.py.

The parity bar is the engine's: logits and every state tensor within 1e-4 x max(1, max |ref|)
after a 64-token prompt and after 32 single steps (`rwkv-models.md` §7.5 for the math).
"""

from __future__ import annotations

import pytest
import torch

from rwkv_cli import load_model
from rwkv_cli.checkpoint import load_checkpoint
from rwkv_cli.config import infer_config
from rwkv_cli.errors import CheckpointError, UnsupportedModelError
from rwkv_cli.testing import random_state_dict, write_checkpoint

from .conftest import (
    check_half_precision,
    check_prompt_then_steps,
    check_sequence_equals_steps,
    parity_tokens,
    shape_id,
)

# (version, layers, width, vocab): >= 3 layers, head size 64, several heads at C = 256
SHAPES7A = [("7a", 3, 128, 1024), ("7a", 4, 256, 2048)]


@pytest.fixture(scope="session")
def reference7a(make_ckpt, tmp_path_factory):
    """The reference's outputs for every SHAPES7A entry, from one child process."""
    pytest.importorskip("rwkv", reason="the reference engine (rwkv==0.8.32) is a test dependency")
    from rwkv_cli.testing import run_reference

    jobs = []
    for shape in SHAPES7A:
        prompt, steps = parity_tokens(shape[3])
        jobs.append({"checkpoint": str(make_ckpt(*shape)), "prompt": prompt, "steps": steps})
    outs = run_reference("7a", jobs, tmp_path_factory.mktemp("reference7a"))
    return dict(zip(SHAPES7A, outs, strict=True))




# -- detection and config -------------------------------------------------------------------------

def test_config_from_shapes():
    sd = random_state_dict("7a", 2, 128, vocab_size=256)
    cfg = infer_config({k: tuple(v.shape) for k, v in sd.items()})
    assert (cfg.version, cfg.variant, cfg.name) == ("7", "7a", "RWKV-7a (DeepEmbed)")
    assert cfg.lora["s"] == 32 and cfg.deep_embed_width == 1024
    assert cfg.describe().startswith("RWKV-7a (DeepEmbed): 2 layers")
    plain_sd = random_state_dict("7", 2, 128, vocab_size=256)
    plain = infer_config({k: tuple(v.shape) for k, v in plain_sd.items()})
    assert plain.variant == "7" and "s" not in plain.lora and plain.deep_embed_width == 0


def test_s0_stored_flat_is_accepted(tmp_path):
    sd = random_state_dict("7a", 1, 64, vocab_size=128)
    sd["blocks.0.ffn.s0"] = sd["blocks.0.ffn.s0"].reshape(-1)  # [F] instead of [1, 1, F]
    cfg, _ = load_checkpoint(write_checkpoint(tmp_path / "m.pth", sd))
    assert cfg.variant == "7a"


def test_incomplete_or_misshaped_deep_embed_is_listed(tmp_path):
    sd = random_state_dict("7a", 2, 64, vocab_size=128)
    del sd["blocks.1.ffn.s2"]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.s2"):
        load_checkpoint(write_checkpoint(tmp_path / "missing.pth", sd))
    sd = random_state_dict("7a", 1, 64, vocab_size=128)
    sd["blocks.0.ffn.s_emb.weight"] = torch.zeros(128, 1000)
    with pytest.raises(CheckpointError, match="rank squared"):
        load_checkpoint(write_checkpoint(tmp_path / "width.pth", sd))


def test_rwkv7b_is_still_refused(tmp_path):
    """7b carries DeepEmbed's ffn.s_emb as well; its qkv branch decides (§3)."""
    sd = {**random_state_dict("7a", 1, 64, vocab_size=128), "blocks.0.qkv.qq": torch.zeros(4)}
    with pytest.raises(UnsupportedModelError, match=r"RWKV-7b .*blocks\.N\.qkv"):
        load_checkpoint(write_checkpoint(tmp_path / "m.pth", sd))


# -- parity with the reference --------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES7A, ids=shape_id)
def test_prompt_then_steps_match_reference(shape, make_ckpt, reference7a, matmul_backend):
    ref = reference7a[shape]
    model = load_model(make_ckpt(*shape), device="cpu", dtype="fp32")
    assert model.cfg.variant == "7a"
    check_prompt_then_steps(model, ref, "7a", shape[3])


def test_deep_embed_changes_the_output(make_ckpt):
    """The same weights without the DeepEmbed tensors give clearly different logits, so the
    parity above exercises the factor (and the reference ran its DeepEmbed class)."""
    path = make_ckpt(*SHAPES7A[0])
    sd = {k: v for k, v in torch.load(path, weights_only=True).items() if ".ffn.s" not in k}
    prompt, _ = parity_tokens(SHAPES7A[0][3])
    with_de, _ = load_model(path, "cpu", "fp32").forward([prompt])
    stripped = write_checkpoint(path.with_name("v7a-stripped.pth"), sd)
    without, _ = load_model(stripped, "cpu", "fp32").forward([prompt])
    assert float((with_de - without).abs().max()) > 0.1 * float(with_de.abs().max())


# -- our sequence mode against our step mode ------------------------------------------------------

@pytest.mark.parametrize("length,chunk", [(2, 256), (13, 5), (40, 16)])
def test_sequence_equals_steps(length, chunk, make_ckpt, matmul_backend):
    """B = 2 rows with different tokens: the DeepEmbed factor must follow each row's own ids
    through prefill chunks, the last-positions-only final layer and the (NumPy) RNN step."""
    model = load_model(make_ckpt(*SHAPES7A[0]), "cpu", "fp32")
    model.prefill_chunk = chunk
    tokens = torch.randint(0, SHAPES7A[0][3], (2, length), generator=torch.Generator().manual_seed(length))
    check_sequence_equals_steps(model, tokens)


def test_blocks_without_token_ids_is_an_error(make_ckpt):
    net = load_model(make_ckpt(*SHAPES7A[0]), "cpu", "fp32").net
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="token ids"):
        net.blocks(net.emb[tokens], net.zero_state())
    x, _ = net.blocks(net.emb[tokens], net.zero_state(), tokens=tokens)
    assert x.shape == (1, 3, 128)


# -- half precision against fp32 ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_matches_fp32(dtype, make_ckpt):
    shape = SHAPES7A[1]
    check_half_precision(make_ckpt(*shape), dtype, shape[3])
