"""`owner/repo` for Hugging Face-layout repositories (config.json + model.safetensors, its shards, or
pytorch_model.bin): the weights, config.json and tokenizer files land in one snapshot folder of
the standard cache and the spec resolves to the weights inside it, which load directly.

As in tests/test_hub.py, the real huggingface_hub code runs against a cache written here in its
real layout; nothing reaches the network (listings from a stand-in for `HfApi.model_info`,
downloads through a stand-in for the HTTP layer under hf_hub_download).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from huggingface_hub import file_download
from safetensors.torch import save

from rwkv_cli import load_model
from rwkv_cli.hub import ModelNotFoundError, resolve_model
from rwkv_cli.testing import random_state_dict

from . import test_hub
from .test_hub import C1, C3, add_to_cache, online
from .test_layouts import TOKENS, to_fla, to_hf

cache = test_hub.cache  # the fixture: an empty Hub cache that HF_HOME points at, offline

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def tokenizer_json(vocab: int = 200) -> bytes:
    """A small but real tokenizer.json (word level), fewer tokens than the model's rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


def rwkv4_bin_repo() -> tuple[dict, dict]:
    """RWKV/rwkv-4-169m-pile's layout: transformers names in a pytorch_model.bin (a torch zip)."""
    sd = random_state_dict("4", 2, 64, vocab_size=256, dtype=torch.float32, seed=11)
    buf = io.BytesIO()
    torch.save(to_hf(sd), buf)
    files = {"config.json": b'{"model_type": "rwkv"}', "pytorch_model.bin": buf.getvalue(),
             "tokenizer.json": tokenizer_json(), "README.md": b"card"}
    return files, sd


def rwkv7_sharded_repo() -> tuple[dict, dict]:
    """fla-hub's layout, saved in two safetensors shards with the index transformers writes."""
    sd = random_state_dict("7", 2, 64, vocab_size=256, dtype=torch.float32, seed=12)
    fla = to_fla(sd)
    names = sorted(fla)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    files = {s: save({n: fla[n].contiguous() for n in part}) for s, part in zip(SHARDS, parts, strict=True)}
    weight_map = {n: shard for shard, part in zip(SHARDS, parts, strict=True) for n in part}
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["config.json"] = b'{"model_type": "rwkv7"}'
    return files, sd


def blinkdl_logits(sd, tmp_path: Path):
    path = tmp_path / "blinkdl.pth"
    torch.save(sd, path)
    return load_model(path, "cpu", "fp32").forward(TOKENS)[0]


@pytest.fixture
def fake_files(monkeypatch):
    """huggingface_hub's HEAD and GET answered from `files` (name -> bytes), every file at commit
    C3; returns the list of file names actually downloaded."""
    fetched = []

    def serve(files: dict):
        def name_of(url):
            return unquote(re.search(r"/resolve/[^/]+/(.+)$", url).group(1))

        def metadata(url, *a, **kw):
            data = files[name_of(url)]
            return file_download.HfFileMetadata(C3, hashlib.sha256(data).hexdigest(), url, len(data), None)

        def http_get(url, temp_file, **kw):
            fetched.append(name_of(url))
            temp_file.write(files[name_of(url)])
            temp_file.flush()

        monkeypatch.setattr(file_download, "get_hf_file_metadata", metadata)
        monkeypatch.setattr(file_download, "http_get", http_get)
        return fetched

    return serve


def test_pytorch_model_bin_repo_offline(cache, tmp_path):
    files, sd = rwkv4_bin_repo()
    snap = add_to_cache(cache, "RWKV/rwkv-4-tiny-pile", files)
    found = resolve_model("RWKV/rwkv-4-tiny-pile")
    assert (found.path, found.revision) == (snap / "pytorch_model.bin", C1)
    assert found.filename == "pytorch_model.bin"
    assert found.directory == snap and (found.directory / "config.json").is_file()
    assert torch.equal(load_model(found.path, "cpu", "fp32").forward(TOKENS)[0], blinkdl_logits(sd, tmp_path))

    from rwkv_cli.cli.common import load_model_for_cli

    _, tok = load_model_for_cli("RWKV/rwkv-4-tiny-pile", None, True, "cpu", "fp32", quiet=True)
    assert tok.vocab_size == 200  # the repo's own tokenizer.json, found beside the weights


def test_sharded_safetensors_repo_offline(cache, tmp_path):
    files, sd = rwkv7_sharded_repo()
    snap = add_to_cache(cache, "fla-hub/rwkv7-tiny", files)
    found = resolve_model("fla-hub/rwkv7-tiny")
    assert found.path == snap / "model.safetensors.index.json"
    assert torch.equal(load_model(found.path, "cpu", "fp32").forward(TOKENS)[0], blinkdl_logits(sd, tmp_path))


def test_online_fetches_weights_shards_config_and_tokenizer(cache, monkeypatch, fake_files, tmp_path):
    files, sd = rwkv7_sharded_repo()
    files["tokenizer.json"] = tokenizer_json()
    files["README.md"] = b"card"
    online(monkeypatch, {"fla-hub/rwkv7-tiny": list(files)})
    fetched = fake_files(files)
    found = resolve_model("fla-hub/rwkv7-tiny", progress=False)
    assert sorted(fetched) == sorted(set(files) - {"README.md"})  # no model card, each file once
    assert found.path.name == "model.safetensors.index.json" and found.revision == C3
    assert sorted(p.name for p in found.directory.iterdir()) == sorted(set(files) - {"README.md"})
    assert (cache / "models--fla-hub--rwkv7-tiny" / "refs" / "main").read_text() == C3
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # pulled once: works offline, from the same folder
    assert resolve_model("fla-hub/rwkv7-tiny").path == found.path
    assert torch.equal(load_model(found.path, "cpu", "fp32").forward(TOKENS)[0], blinkdl_logits(sd, tmp_path))


def test_single_model_safetensors_fetched_with_its_config(cache, monkeypatch, fake_files):
    files = {"model.safetensors": save({"x": torch.zeros(2)}), "config.json": b"{}", "notes.md": b"n"}
    online(monkeypatch, {"me/hf": list(files)})
    fetched = fake_files(files)
    found = resolve_model("me/hf", progress=False)
    assert found.filename == "model.safetensors" and sorted(fetched) == ["config.json", "model.safetensors"]


def test_blinkdl_repos_keep_their_behaviour(cache):
    """A BlinkDL checkpoint beside HF weights wins, and an explicit FILE is fetched alone."""
    files, _ = rwkv4_bin_repo()
    snap = add_to_cache(cache, "me/both", {**files, "rwkv-x-20250101.pth": b"blinkdl"})
    assert resolve_model("me/both").path == snap / "rwkv-x-20250101.pth"
    snap = add_to_cache(cache, "me/hf", {"model.safetensors": b"w", "config.json": b"{}"})
    assert resolve_model("me/hf:model.safetensors").path == snap / "model.safetensors"
    add_to_cache(cache, "me/shards", {SHARDS[0]: b"a", SHARDS[1]: b"b"})  # shards without their index
    with pytest.raises(ModelNotFoundError, match="holds 2 checkpoints"):
        resolve_model("me/shards")


def test_offline_missing_shard_and_bad_index_are_one_line_errors(cache):
    files, _ = rwkv7_sharded_repo()
    del files[SHARDS[1]]
    add_to_cache(cache, "me/partial", files)
    missing = f"offline and me/partial:{SHARDS[1]} is not in the cache"
    with pytest.raises(ModelNotFoundError, match=missing) as e:
        resolve_model("me/partial")
    assert "rwkv pull" in str(e.value) and "\n" not in str(e.value)
    index = json.dumps({"weight_map": {"emb.weight": "../../../x.safetensors"}}).encode()
    add_to_cache(cache, "me/escape", {"model.safetensors.index.json": index, "config.json": b"{}"})
    with pytest.raises(ModelNotFoundError, match="lists a shard outside the repository"):
        resolve_model("me/escape")
    add_to_cache(cache, "me/noindex", {"model.safetensors.index.json": b"[]", "config.json": b"{}"})
    not_index = r"^me/noindex:model\.safetensors\.index\.json: not a shard index"
    with pytest.raises(ModelNotFoundError, match=not_index):
        resolve_model("me/noindex")


def test_rwkv_pull_and_show_take_the_repo(cache):
    from .test_cli_models import invoke

    files, _ = rwkv4_bin_repo()
    snap = add_to_cache(cache, "RWKV/rwkv-4-tiny-pile", files)
    result = invoke(cache.parent, "pull", "RWKV/rwkv-4-tiny-pile", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{snap / 'pytorch_model.bin'}\n"
    result = invoke(cache.parent, "show", "RWKV/rwkv-4-tiny-pile")
    assert result.exit_code == 0, result.output
    assert "RWKV-4" in result.stdout and "tokenizer.json beside the checkpoint" in result.stdout


def test_rwkv_list_shows_one_row_per_hugging_face_snapshot(cache):
    """A sharded repo is one row (its index, the shards' total size, the version read across the
    shards), not one unreadable row per shard; a pytorch_model.bin repo is listed too."""
    import json as json_

    from .test_cli_models import invoke

    files, _ = rwkv7_sharded_repo()
    add_to_cache(cache, "fla-hub/rwkv7-tiny", files)
    bin_files, _ = rwkv4_bin_repo()
    add_to_cache(cache, "RWKV/rwkv-4-tiny-pile", bin_files)
    result = invoke(cache.parent, "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["repo"]: r for r in json_.loads(result.stdout)}
    assert set(rows) == {"fla-hub/rwkv7-tiny", "RWKV/rwkv-4-tiny-pile"}
    sharded = rows["fla-hub/rwkv7-tiny"]
    assert sharded["file"] == "model.safetensors.index.json" and sharded["version"] == "RWKV-7"
    assert sharded["size"] == sum(len(files[s]) for s in SHARDS)
    assert rows["RWKV/rwkv-4-tiny-pile"]["file"] == "pytorch_model.bin"
    assert rows["RWKV/rwkv-4-tiny-pile"]["version"] == "RWKV-4"
