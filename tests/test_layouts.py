"""Other checkpoint layouts load directly (`rwkv_cli.layouts`, `rwkv-models.md` §11): Hugging Face
transformers RWKV-4 (against transformers' own model), the RWKV-5/6 remote-code layout, fla-hub
RWKV-7 (current and legacy fused `x_x`), native names under a prefix, and HF model folders.

Each test writes a random BlinkDL state dict in the other layout (renamed, transposed, squeezed
here, by the rules of §11) and checks that it gives the same logits as the BlinkDL file.
"""

from __future__ import annotations

import json

import pytest
import torch

from rwkv_cli import load_model
from rwkv_cli.checkpoint import load_checkpoint, read_shapes
from rwkv_cli.config import infer_config
from rwkv_cli.errors import CheckpointError, UnsupportedModelError
from rwkv_cli.testing import random_state_dict, write_checkpoint

from .conftest import assert_close_to_reference

TOKENS = [[3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 46, 26, 43, 3, 83, 27, 95, 0, 28, 84]]


def logits_of(path, full_output=False):
    return load_model(path, "cpu", "fp32").forward(TOKENS, full_output=full_output)[0][0]


# -- renamers: BlinkDL -> the other layouts (the inverse of what the loader does) ------------------

def to_hf(sd):
    """§11.1/11.2: `rwkv.` prefix, embeddings, pre_ln, attention, feed_forward, time_mix_key..."""
    long = {"k": "key", "v": "value", "r": "receptance", "g": "gate"}
    out = {}
    for name, t in sd.items():
        if name == "head.weight":
            out[name] = t
            continue
        n = name.replace("emb.weight", "embeddings.weight").replace("blocks.0.ln0.", "blocks.0.pre_ln.")
        n = n.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
        if ".time_mix_" in n:
            head, _, m = n.rpartition("_")
            n = f"{head}_{long[m]}"
        out["rwkv." + n] = t
    return out


def to_fla(sd, fused=False):
    """§11.3: model.layers.N.{attn,ffn}, LoRA as lora.{0,2} [out, in], squeezed vectors."""
    out, proj = {}, {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
    top = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
           "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
    for name, t in sd.items():
        if name in top:
            out[top[name]] = t
            continue
        _, i, part, *rest = name.split(".")
        p, leaf = f"model.layers.{i}.", ".".join(rest)
        if part in ("ln0", "ln1", "ln2"):
            out[p + {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}[part] + "." + leaf] = t
        elif part == "ffn":
            out[p + "ffn." + leaf] = t.reshape(-1) if leaf == "x_k" else t
        elif leaf.startswith("x_"):
            if not fused:
                out[p + "attn." + leaf] = t
        elif leaf[0] in "wavg" and leaf[1:] in ("0", "1", "2"):
            lora = f"{p}attn.{leaf[0]}_lora.lora."
            if leaf[1] == "0":
                out[lora + "2.bias"] = t.reshape(-1)
            else:
                out[lora + ("0" if leaf[1] == "1" else "2") + ".weight"] = t.t().contiguous()
        elif leaf in ("k_k", "k_a"):
            out[p + "attn." + leaf] = t.reshape(-1)
        elif leaf.endswith(".weight") and leaf.split(".")[0] in proj:
            out[p + "attn." + proj[leaf.split(".")[0]] + ".weight"] = t
        elif leaf.startswith("ln_x."):
            out[p + "attn.g_norm." + leaf[5:]] = t
        else:
            out[p + "attn." + leaf] = t
        if fused and part == "att" and leaf == "x_r":
            out[p + "attn.x_x"] = torch.cat([sd[f"blocks.{i}.att.x_{m}"].reshape(1, -1) for m in "rwkvag"])
    return out


# -- Hugging Face transformers RWKV-4 ------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_rwkv4(tmp_path_factory):
    """A random RWKV-4 as transformers' RwkvForCausalLM, saved by save_pretrained, and its logits."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    sd = random_state_dict("4", 3, 128, vocab_size=512, dtype=torch.float32, seed=4)
    config = transformers.RwkvConfig(
        vocab_size=512, hidden_size=128, num_hidden_layers=3, attention_hidden_size=128,
        intermediate_size=512, context_length=1024,
    )
    model = transformers.RwkvForCausalLM(config).eval()
    model.load_state_dict(to_hf(sd), strict=True)
    folder = tmp_path_factory.mktemp("hf") / "rwkv-4-tiny"
    model.save_pretrained(folder)  # before any forward: transformers rescales weights in eval
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits[0]
    return folder, model, sd, logits


def test_hf_rwkv4_matches_transformers(hf_rwkv4, tmp_path):
    folder, _, sd, hf_logits = hf_rwkv4
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    ours = logits_of(folder, full_output=True)  # the folder itself, as a user passes it
    assert_close_to_reference(ours, hf_logits, "logits vs transformers")
    blinkdl = logits_of(write_checkpoint(tmp_path / "v4.pth", sd), full_output=True)
    assert torch.equal(ours, blinkdl)


def test_hf_pytorch_model_bin_and_shards(hf_rwkv4, tmp_path):
    folder, model, _, hf_logits = hf_rwkv4
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    assert_close_to_reference(logits_of(bin_dir, full_output=True), hf_logits, "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="300KB")
    index = sharded / "model.safetensors.index.json"
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    assert_close_to_reference(logits_of(sharded, full_output=True), hf_logits, "sharded")
    assert infer_config(read_shapes(index)).n_layer == 3  # headers only


@pytest.mark.parametrize("version", ["5.2", "6"])
def test_hf_rwkv5_rwkv6_layout(version, tmp_path):
    sd = random_state_dict(version, 3, 128, vocab_size=256, seed=5)
    a = logits_of(write_checkpoint(tmp_path / "blinkdl.pth", sd))
    hf = to_hf(sd)
    assert f"rwkv.blocks.1.attention.{'time_maa_w1' if version == '6' else 'time_mix_gate'}" in hf
    b = logits_of(write_checkpoint(tmp_path / "model.safetensors", hf))
    assert torch.equal(a, b)


# -- fla-hub RWKV-7 and prefixed native names ----------------------------------------------------

@pytest.mark.parametrize("fused", [False, True], ids=["fla", "fla-legacy-x_x"])
def test_fla_hub_rwkv7(fused, tmp_path):
    sd = random_state_dict("7", 3, 128, vocab_size=256, seed=6)
    fla = to_fla(sd, fused=fused)
    assert ("model.layers.0.attn.x_x" in fla) == fused and "model.layers.1.attn.w_lora.lora.0.weight" in fla
    folder = tmp_path / "fla"
    write_checkpoint(folder / "model.safetensors", fla)
    (folder / "config.json").write_text('{"model_type": "rwkv7"}')
    assert torch.equal(logits_of(folder), logits_of(write_checkpoint(tmp_path / "blinkdl.pth", sd)))
    cfg = infer_config(read_shapes(folder / "model.safetensors"))  # header only, no torch tensors
    assert cfg.version == "7" and cfg.lora == {"w": 32, "a": 32, "v": 32, "g": 32}


@pytest.mark.parametrize("prefix, bare_head", [("rwkv7.", True), ("model.", False)])
def test_native_names_under_a_prefix(prefix, bare_head, tmp_path):
    """transformers PR #47780 (`rwkv7.`, head.weight bare) and official safetensors with layer-0
    v0/v1/v2 present (unused)."""
    sd = random_state_dict("7", 3, 128, vocab_size=256, seed=7, layer0_value_lora=True)
    named = {(k if bare_head and k == "head.weight" else prefix + k): v for k, v in sd.items()}
    a = logits_of(write_checkpoint(tmp_path / "blinkdl.pth", sd))
    assert torch.equal(a, logits_of(write_checkpoint(tmp_path / "model.safetensors", named)))


def test_gguf_and_unknown_names_are_refused(tmp_path):
    sd = random_state_dict("7", 2, 128, vocab_size=64)
    gguf = {k.replace("blocks.", "blk."): v for k, v in sd.items()}
    with pytest.raises(UnsupportedModelError, match="GGUF"):
        load_checkpoint(write_checkpoint(tmp_path / "g.safetensors", gguf))
    with pytest.raises(CheckpointError, match="not an RWKV checkpoint"):
        load_checkpoint(write_checkpoint(tmp_path / "u.safetensors", {"encoder.weight": torch.zeros(2)}))


def test_hub_resolves_a_model_folder_to_its_weights(tmp_path):
    from rwkv_cli.hub import resolve_model

    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"")
    assert resolve_model(str(folder)).path == folder / "pytorch_model.bin"
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert resolve_model(str(folder)).path == folder / "model.safetensors.index.json"
    (folder / "model.safetensors").write_bytes(b"")
    assert resolve_model(str(folder)).path == folder / "model.safetensors"
