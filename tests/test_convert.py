"""`rwkv convert`: any supported checkpoint to one canonical safetensors file, identical logits."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from rwkv_cli import load_model
from rwkv_cli.cli import app
from rwkv_cli.cli.convert import convert_checkpoint
from rwkv_cli.testing import random_state_dict, write_checkpoint

from .test_layouts import TOKENS, to_fla


def logits_of(path):
    return load_model(path, "cpu", "fp32").forward(TOKENS)[0]


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_converted_file_gives_identical_logits(version, tmp_path):
    pth = write_checkpoint(tmp_path / "m.pth", random_state_dict(version, 3, 128, vocab_size=256))
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(app, ["convert", str(pth), str(out)])
    assert result.exit_code == 0, result.output
    assert torch.equal(logits_of(pth), logits_of(out))
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["rwkv_version"] == version and "emb.weight" in f.keys()


def test_other_layouts_convert_to_blinkdl_names(tmp_path):
    sd = random_state_dict("7", 3, 128, vocab_size=256)
    fla = write_checkpoint(tmp_path / "fla.safetensors", to_fla(sd, fused=True))  # x_x: rows are views
    cfg, _, _ = convert_checkpoint(fla, tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert set(f.keys()) == set(sd) and f.get_tensor("blocks.1.att.w1").shape == (128, 32)
    assert cfg.version == "7"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not 0600
    blinkdl = write_checkpoint(tmp_path / "b.pth", sd)
    assert torch.equal(logits_of(tmp_path / "out.safetensors"), logits_of(blinkdl))


def test_dtype_option_casts_and_still_loads(tmp_path):
    sd = random_state_dict("6", 3, 128, vocab_size=256, dtype=torch.float32)
    pth = write_checkpoint(tmp_path / "m.pth", sd)
    out = tmp_path / "bf16.safetensors"
    assert CliRunner().invoke(app, ["convert", str(pth), str(out), "--dtype", "bf16"]).exit_code == 0
    with safe_open(str(out), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert out.stat().st_size < pth.stat().st_size * 0.6
    ref = logits_of(pth)
    assert float((logits_of(out) - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_usage_errors(tmp_path):
    pth = write_checkpoint(tmp_path / "m.pth", random_state_dict("7", 2, 64, vocab_size=64))
    runner = CliRunner()
    assert runner.invoke(app, ["convert", str(pth), str(tmp_path / "m.bin")]).exit_code == 2
    out = str(tmp_path / "x.safetensors")
    assert runner.invoke(app, ["convert", str(pth), out, "--dtype", "int8"]).exit_code == 2
    (tmp_path / "exists.safetensors").write_bytes(b"")
    assert runner.invoke(app, ["convert", str(pth), str(tmp_path / "exists.safetensors")]).exit_code == 2
    exists = str(tmp_path / "exists.safetensors")
    assert runner.invoke(app, ["convert", str(pth), exists, "--force"]).exit_code == 0
