"""Checkpoint reading, architecture detection, config inference and the errors for bad files."""

from __future__ import annotations

import pickle
import sys

import pytest
import torch

from rwkv_cli import load_model
from rwkv_cli.checkpoint import load_checkpoint, read_safetensors_shapes
from rwkv_cli.config import infer_config
from rwkv_cli.errors import CheckpointError, UnsupportedModelError
from rwkv_cli.testing import lora_rank, random_state_dict, write_checkpoint


def v7_dict(**kw):
    return random_state_dict("7", 2, 128, vocab_size=256, **kw)


def test_config_inferred_from_shapes_only(tmp_path):
    path = write_checkpoint(tmp_path / "rwkv7-g1-2.9b-20250519-ctx4096.pth", v7_dict())  # a lying name
    cfg, _ = load_checkpoint(path)
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ffn_dim) == ("7", 2, 128, 256, 512)
    assert (cfg.n_head, cfg.head_size) == (2, 64)
    assert cfg.lora == {"w": 32, "a": 32, "v": 32, "g": 32}
    v4 = load_checkpoint(write_checkpoint(tmp_path / "v4.pth", random_state_dict("4", 3, 64, vocab_size=100)))[0]
    assert (v4.version, v4.n_layer, v4.n_embd, v4.vocab_size, v4.dim_att, v4.ffn_dim) == ("4", 3, 64, 100, 64, 256)


@pytest.mark.parametrize("width, ranks", [(768, (64, 64, 32, 128)), (2048, (96, 96, 64, 256))])
def test_lora_rank_rule_matches_released_models(width, ranks):
    rules = [(1.8, 0.5), (1.8, 0.5), (1.3, 0.5), (0.6, 0.8)]
    assert tuple(lora_rank(width, *r) for r in rules) == ranks


def test_v7_lora_ranks_from_shapes():
    shapes = {k: tuple(v.shape) for k, v in random_state_dict("7", 2, 768, vocab_size=64).items()}
    assert infer_config(shapes).lora == {"w": 64, "a": 64, "v": 32, "g": 128}


def test_layer0_value_lora_is_accepted_and_ignored(tmp_path):
    plain = v7_dict(seed=3)
    extra = dict(plain)
    for name in ("v0", "v1", "v2"):  # layer 1's tensors have the right shapes
        extra[f"blocks.0.att.{name}"] = plain[f"blocks.1.att.{name}"] * 3
    assert "blocks.0.att.v1" not in plain
    tokens = [[1, 2, 3, 4]]
    a, _ = load_model(write_checkpoint(tmp_path / "a.pth", plain), "cpu", "fp32").forward(tokens)
    b, _ = load_model(write_checkpoint(tmp_path / "b.pth", extra), "cpu", "fp32").forward(tokens)
    assert torch.equal(a, b)


def test_safetensors_header_shapes_without_loading(tmp_path):
    path = write_checkpoint(tmp_path / "m.safetensors", v7_dict())
    shapes = read_safetensors_shapes(path)
    assert shapes["emb.weight"] == (256, 128)
    assert infer_config(shapes).version == "7"


# -- refusals of recognised but unsupported models ------------------------------------------------

def _renamed(sd, fn):
    return {fn(k): v for k, v in sd.items()}


REFUSALS = {
    "RWKV-7b": lambda sd: {**sd, "blocks.1.qkv.qq": torch.zeros(4)},
    "pre-converted ChatRWKV": lambda sd: {**sd, "_strategy": torch.zeros(1)},
    "llama.cpp GGUF": lambda sd: _renamed(sd, lambda k: k.replace("blocks.", "blk.").replace("emb.", "token_embd.")),
}


@pytest.mark.parametrize("what", REFUSALS)
def test_recognised_variants_are_refused_by_name(what, tmp_path):
    path = write_checkpoint(tmp_path / "m.pth", REFUSALS[what](v7_dict()))
    with pytest.raises(UnsupportedModelError, match=what.split(" (")[0].replace("(", r"\(")) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# -- bad files ------------------------------------------------------------------------------------

def test_missing_and_misshaped_tensors_are_listed(tmp_path):
    sd = v7_dict()
    del sd["blocks.1.att.k_k"]
    sd["blocks.0.att.key.weight"] = torch.zeros(128, 64)
    sd["blocks.0.att.tiny_attention"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(write_checkpoint(tmp_path / "m.pth", sd))
    msg = str(err.value)
    assert "blocks.1.att.k_k" in msg and "blocks.0.att.key.weight [128, 64]" in msg and "tiny_attention" in msg


def test_rwkv4_with_extra_tensors_is_refused(tmp_path):
    """RWKV-4a/4b add tiny-attention tensors to the v4 set: not silently run as plain v4."""
    sd = random_state_dict("4", 2, 64, vocab_size=100)
    sd["blocks.0.tiny_q.weight"] = torch.zeros(32, 64)
    with pytest.raises(CheckpointError, match="unexpected tensor.*tiny_q"):
        load_checkpoint(write_checkpoint(tmp_path / "m.pth", sd))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"hello, I am not a model\n", "not a checkpoint"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS pointer"),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "GGUF"),
    ],
)
def test_not_a_checkpoint(content, message, tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_files(suffix, tmp_path):
    full = write_checkpoint(tmp_path / f"full{suffix}", v7_dict())
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupted"):
        load_checkpoint(cut)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_RunsCode.marker}",))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    _RunsCode.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(path)
    assert not marker.exists()
    legacy = tmp_path / "evil-legacy.pth"  # a plain (non-zip) pickle stream
    legacy.write_bytes(pickle.dumps({"x": _RunsCode()}, protocol=2))
    with pytest.raises(CheckpointError):
        load_checkpoint(legacy)
    assert not marker.exists()


def test_checkpoint_holding_something_else(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(path)


@pytest.mark.parametrize("version", ["4", "7"])
def test_embedding_of_another_width_is_named(version, tmp_path):
    """A wrong emb.weight width is the one fault named, not every layer tensor as mis-shaped."""
    sd = random_state_dict(version, 2, 64, vocab_size=256)
    sd["emb.weight"] = sd["emb.weight"][:, :32].clone()
    with pytest.raises(CheckpointError, match=r"emb.weight is 256 x 32, but the layers are 64 wide") as e:
        load_checkpoint(write_checkpoint(tmp_path / "m.pth", sd))
    assert "mis-shaped" not in str(e.value)


def test_state_files_given_as_models_are_named(tmp_path):
    """Our own state files and BlinkDL state-tuned files are not models; the error says which
    file it is and where it goes, instead of a missing emb.weight."""
    from rwkv_cli.statefile import save_state

    model = load_model(write_checkpoint(tmp_path / "m.pth", random_state_dict("7", 2, 64, vocab_size=64)))
    st = save_state(tmp_path / "s.rwkvstate", model.zero_state(), model, kind="chat")
    for read in (load_checkpoint, read_safetensors_shapes):
        with pytest.raises(CheckpointError, match=r"s.rwkvstate: an rwkv-cli state file, not a model .*--state"):
            read(st)
    tuned = tmp_path / "tuned.pth"
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(1, 64, 64) for i in range(2)}, tuned)
    with pytest.raises(CheckpointError, match=r"tuned.pth: a state-tuned file .*--init-state"):
        load_checkpoint(tuned)


def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from rwkv_cli.errors import RWKVError

    with pytest.raises(RWKVError, match="no CUDA GPU"):
        load_model(write_checkpoint(tmp_path / "m.pth", v7_dict()), device="cuda")


def test_bad_tokens_are_rejected(tmp_path):
    model = load_model(write_checkpoint(tmp_path / "m.pth", v7_dict()), "cpu", "fp32")
    with pytest.raises(ValueError, match="token ids"):
        model.forward([[256]])
    with pytest.raises(ValueError, match="no tokens"):
        model.forward([])


assert sys.version_info >= (3, 10)
