"""Model specs and the Hub cache: parsing, aliases, offline resolution, download failures, deletion.

Every test runs the real huggingface_hub code (hf_hub_download, scan_cache_dir, the deletion
strategies) against a cache written here in the real layout (`models--owner--name/blobs`,
`snapshots/<commit>/<file>` symlinks, `refs/main`). Nothing reaches the network: listings come
from the cache, or from a stand-in for `HfApi.model_info`, and the one download that "happens"
goes through a stand-in for the HTTP layer underneath hf_hub_download.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, constants, file_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from rwkv_cli import hub
from rwkv_cli.hub import ModelNotFoundError, parse_spec, resolve_model

C1, C2, C3 = "1" * 40, "2" * 40, "3" * 40
G1_FILES = [
    "rwkv7-g1-0.1b-20250307-ctx4096.pth",
    "rwkv7-g1a-0.1b-20250728-ctx4096.pth",
    "rwkv7a-g1b-0.1b-20250819-ctx4096.pth",  # DeepEmbed: newer, but not for this engine
    "rwkv7b-g1b-0.1b-20250822-ctx4096.pth",
    "rwkv7-g1-0.4b-20250324-ctx4096.pth",
    "rwkv7-g1-1.5b-20250429-ctx4096.pth",
    "rwkv7-g1b-1.5b-20251202-ctx8192.pth",
    "rwkv7-g0a-7.2b-20250829-ctx4096.pth",
    "README.md",
]


def add_to_cache(cache: Path, repo_id: str, files: dict, commit: str = C1, ref: str | None = "main") -> Path:
    """Put files (name -> bytes or a Path to copy) in a Hub cache as huggingface_hub lays it out:
    content-addressed blobs, relative symlinks in snapshots/<commit>/, refs/<ref> -> commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache that the environment points at (HF_HOME), offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("RWKV_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "hf" / "hub"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def g1_cache(cache):
    add_to_cache(cache, "BlinkDL/rwkv7-g1", {name: name.encode() for name in G1_FILES})
    return cache


def online(monkeypatch, listing: dict[str, list[str]] | Exception | None = None):
    """Let resolution go online, with `HfApi.model_info` answering from `listing` (repo -> files,
    all at commit C1) or raising it."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def model_info(self, repo_id, revision=None, **kw):
        if isinstance(listing, Exception):
            raise listing
        return SimpleNamespace(sha=C1, siblings=[SimpleNamespace(rfilename=f) for f in listing[repo_id]])

    monkeypatch.setattr(HfApi, "model_info", model_info)


def http_error(cls, status: int):
    return cls("refused", response=SimpleNamespace(status_code=status, headers={}, request=None))


# --------------------------------------------------------------------------------- parsing


def test_parse_spec_forms():
    assert parse_spec("BlinkDL/rwkv7-g1") == hub.HubSpec("BlinkDL/rwkv7-g1", None)
    assert parse_spec("BlinkDL/rwkv7-g1:*-0.4b-*@v1.0") == hub.HubSpec("BlinkDL/rwkv7-g1", "*-0.4b-*", "v1.0")
    assert parse_spec("o/r:sub/m.pth@refs/pr/3") == hub.HubSpec("o/r", "sub/m.pth", "refs/pr/3")
    assert parse_spec("rwkv7-g1-0.4b@" + C2) == hub.HubSpec("BlinkDL/rwkv7-g1", "rwkv7-g1*-0.4b-*.pth", C2)
    assert hub.DEFAULT_MODEL in hub.ALIASES


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gpt4", "not a file, a directory, owner/repo[:FILE] or a known alias"),
        ("models/x.pth", "no such file or directory"),
        ("./weights", "no such file or directory"),
        ("owner/repo:", "after ':'"),
        ("owner/repo@", "SPEC@REVISION"),
    ],
)
def test_parse_spec_errors(spec, message):
    with pytest.raises(ModelNotFoundError, match=re.escape(message)):
        parse_spec(spec)


# ----------------------------------------------------------------------------------- local


def test_local_paths_win_over_hub_specs(tmp_path, monkeypatch, make_ckpt, cache):
    ckpt = make_ckpt("7", 2, 64, 1024)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.pth").write_bytes(ckpt.read_bytes())
    monkeypatch.chdir(tmp_path)
    found = resolve_model("models/x.pth")  # looks like owner/repo, but the file exists
    assert found.path == Path("models/x.pth") and found.repo_id is None
    assert resolve_model("models").path == Path("models/x.pth")  # a directory with one checkpoint
    assert resolve_model(str(ckpt)).directory == ckpt.parent
    with pytest.raises(ModelNotFoundError, match="applies only to Hub models"):
        resolve_model("models/x.pth", revision="main")


def test_directory_with_several_or_no_checkpoints(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no .pth or .safetensors file"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "a.pth").write_bytes(b"x")
    (tmp_path / "b.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="holds 2 checkpoints; pass one of: a.pth, b.safetensors"):
        resolve_model(str(tmp_path))


def test_default_model_and_rwkv_model_env(g1_cache, monkeypatch):
    assert resolve_model().filename == "rwkv7-g1-0.4b-20250324-ctx4096.pth"  # the default alias
    monkeypatch.setenv("RWKV_MODEL", "rwkv7-g1-1.5b")
    assert resolve_model().filename == "rwkv7-g1b-1.5b-20251202-ctx8192.pth"
    assert hub.resolve_model_option("", offline=True, revision="").filename.startswith("rwkv7-g1b-1.5b")


# ------------------------------------------------------------------------ offline, from the cache


def test_aliases_resolve_to_the_newest_matching_file(g1_cache):
    found = resolve_model("rwkv7-g1-0.1b")  # g1a is newer than g1; rwkv7a/rwkv7b are not RWKV-7
    assert found.filename == "rwkv7-g1a-0.1b-20250728-ctx4096.pth"
    assert (found.repo_id, found.revision) == ("BlinkDL/rwkv7-g1", C1)
    assert found.path == g1_cache / "models--BlinkDL--rwkv7-g1" / "snapshots" / C1 / found.filename
    assert found.path.read_bytes() == found.filename.encode()
    assert found.source == f"BlinkDL/rwkv7-g1:{found.filename}@{C1[:12]}"
    assert resolve_model("rwkv7-g1-1.5b").filename == "rwkv7-g1b-1.5b-20251202-ctx8192.pth"
    with pytest.raises(ModelNotFoundError, match="^BlinkDL/rwkv7-g1 holds 8 checkpoints; pick one with"):
        resolve_model("BlinkDL/rwkv7-g1")  # dated names, but the repo alone names no file
    assert resolve_model("BlinkDL/rwkv7-g1:rwkv7-*-0.1b-*").filename == found.filename  # a user glob
    assert resolve_model("BlinkDL/rwkv7-g1:*-0.1b-*").filename.startswith("rwkv7b-")  # as asked
    with pytest.raises(ModelNotFoundError, match="offline and BlinkDL/rwkv7-g1 has no rwkv7-g1\\*-2.9b"):
        resolve_model("rwkv7-g1-2.9b")


def test_several_checkpoints_need_a_file_and_undated_globs_are_ambiguous(cache):
    add_to_cache(cache, "me/mine", {"a.pth": b"a", "b.pth": b"b", "notes.txt": b"n"})
    with pytest.raises(ModelNotFoundError, match=r"^me/mine holds 2 checkpoints; pick one .*: a.pth, b.pth$"):
        resolve_model("me/mine")
    with pytest.raises(
        ModelNotFoundError,
        match=r"^\*.pth matches 2 files in me/mine, not all dated; name one: a.pth, b.pth$",
    ):
        resolve_model("me/mine:*.pth")
    assert resolve_model("me/mine:b.pth").filename == "b.pth"
    add_to_cache(cache, "me/one", {"only.safetensors": b"o", "config.json": b"{}"})
    assert resolve_model("me/one").filename == "only.safetensors"


def test_offline_miss_says_what_to_do(cache):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("BlinkDL/rwkv-7-world:RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth")
    msg = str(e.value)
    assert msg.startswith("offline and BlinkDL/rwkv-7-world has no RWKV-x070-World-0.1B")
    assert "rwkv pull" in msg and "local file" in msg and "\n" not in msg


def test_revisions_branches_and_commits(cache):
    add_to_cache(cache, "me/m", {"m-20240101.pth": b"old"}, commit=C1, ref="main")
    add_to_cache(cache, "me/m", {"m-20250101.pth": b"new"}, commit=C2, ref="v2")
    add_to_cache(cache, "me/m", {"m-20260101.pth": b"detached"}, commit=C3, ref=None)
    assert resolve_model("me/m").revision == C1  # main's snapshot has what was asked
    assert resolve_model("me/m:m-*.pth").filename == "m-20240101.pth"
    assert resolve_model("me/m@v2").path.read_bytes() == b"new"
    found = resolve_model("me/m", revision=C3)
    assert (found.revision, found.path.read_bytes()) == (C3, b"detached")
    found = resolve_model("me/m:m-202[56]*")  # not in main's snapshot: the newest cached anywhere
    assert (found.filename, found.revision) == ("m-20260101.pth", C3)
    add_to_cache(cache, "me/nomain", {"x.pth": b"x"}, commit=C2, ref=None)  # fetched by commit only
    assert resolve_model("me/nomain").revision == C2
    with pytest.raises(ModelNotFoundError, match="names revision v2 but --revision says main"):
        resolve_model("me/m@v2", revision="main")
    with pytest.raises(
        ModelNotFoundError,
        match=r"^offline and me/m@nope has no checkpoint \(.pth or .safetensors\) in the cache",
    ):
        resolve_model("me/m@nope")


def test_a_snapshot_entry_without_its_blob_does_not_count(cache):
    snap = add_to_cache(cache, "me/m", {"m.pth": b"weights"})
    (snap / "m.pth").resolve().unlink()
    with pytest.raises(ModelNotFoundError, match="offline"):
        resolve_model("me/m")


# ------------------------------------------------------------------------------------ online


def test_online_listing_picks_the_newest_then_the_cache_serves_it(g1_cache, monkeypatch):
    online(monkeypatch, {"BlinkDL/rwkv7-g1": G1_FILES})
    found = resolve_model("rwkv7-g1-0.1b")  # already cached at the listed commit: no download
    assert found.filename == "rwkv7-g1a-0.1b-20250728-ctx4096.pth" and found.revision == C1
    with pytest.raises(ModelNotFoundError, match=r"BlinkDL/rwkv7-g1 has no nope.pth; checkpoints there:"):
        resolve_model("BlinkDL/rwkv7-g1:nope.pth")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (http_error(RepositoryNotFoundError, 404), "no such model on the Hub, or it is private"),
        (http_error(GatedRepoError, 403), "is gated: accept its conditions at https://huggingface.co/"),
    ],
)
def test_hub_refusals_are_one_line_errors(cache, monkeypatch, error, message):
    online(monkeypatch, error)
    with pytest.raises(ModelNotFoundError, match=message) as e:
        resolve_model("someone/missing")
    assert "\n" not in str(e.value)


def test_unreachable_hub_falls_back_to_the_cache(g1_cache, monkeypatch):
    online(monkeypatch, ConnectionError("Name or service not known"))
    assert resolve_model("rwkv7-g1-0.4b").filename == "rwkv7-g1-0.4b-20250324-ctx4096.pth"
    with pytest.raises(ModelNotFoundError, match=r"^cannot reach the Hub \(ConnectionError: Name or service"):
        resolve_model("rwkv7-world-0.1b")


@pytest.fixture
def fake_http(monkeypatch):
    """huggingface_hub's HEAD and GET, answered locally: `fake_http(data, fail)` serves `data`
    for any file at commit C3, writing half of it and then raising `fail` if given."""

    def serve(data: bytes, fail: Exception | None = None):
        etag = hashlib.sha256(data).hexdigest()
        meta = file_download.HfFileMetadata(C3, etag, "https://cdn.invalid/blob", len(data), None)
        monkeypatch.setattr(file_download, "get_hf_file_metadata", lambda *a, **kw: meta)

        def http_get(url, temp_file, **kw):
            temp_file.write(data[: len(data) // 2] if fail else data)
            temp_file.flush()
            if fail:
                raise fail

        monkeypatch.setattr(file_download, "http_get", http_get)

    return serve


def test_download_goes_through_hf_hub_download(cache, monkeypatch, fake_http):
    online(monkeypatch, {"me/m": ["m.pth", "tokenizer.json"]})
    fake_http(b"weights")
    found = resolve_model("me/m", progress=False)
    assert found.path.read_bytes() == b"weights" and found.path.is_symlink() and found.revision == C3
    assert (cache / "models--me--m" / "refs" / "main").read_text() == C3  # so offline runs find it
    assert (found.directory / "tokenizer.json").is_file()  # shipped beside the model: fetched too


@pytest.mark.parametrize(
    ("fail", "message"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk full while downloading me/m:m.pth"),
        (ConnectionResetError("peer closed connection"), "cannot download me/m:m.pth"),
    ],
)
def test_a_failed_download_leaves_nothing_loadable(cache, monkeypatch, fake_http, fail, message):
    online(monkeypatch, {"me/m": ["m.pth"]})
    fake_http(b"weights" * 1000, fail)
    with pytest.raises(ModelNotFoundError, match=message) as e:
        resolve_model("me/m", progress=False)
    assert "\n" not in str(e.value)
    repo = cache / "models--me--m"
    assert [p for p in repo.rglob("*") if p.is_file() and "refs" not in p.parts] == []  # no partial blob
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="offline and me/m has no"):
        resolve_model("me/m")


# ----------------------------------------------------------------------------- list and delete


@pytest.mark.parametrize("hub_version", ["new", "old"])
def test_cached_files_and_deletion(cache, tmp_path, hub_version, monkeypatch):
    if hub_version == "old":  # huggingface_hub < 2.0 has no HFCacheInfo.delete_files
        from huggingface_hub import HFCacheInfo

        monkeypatch.delattr(HFCacheInfo, "delete_files")
    add_to_cache(cache, "me/m", {"a.pth": b"a", "b.pth": b"b"}, commit=C1)
    add_to_cache(cache, "me/m", {"a.pth": b"a"}, commit=C2, ref="v2")  # same blob as C1's a.pth
    add_to_cache(cache, "me/other", {"o.pth": b"o"}, commit=C3)  # commits are unique across repos
    listed = [(c.repo_id, c.filename, c.commit, c.refs) for c in hub.cached_files()]
    assert listed == [
        ("me/m", "a.pth", C1, ("main",)),
        ("me/m", "a.pth", C2, ("v2",)),
        ("me/m", "b.pth", C1, ("main",)),
        ("me/other", "o.pth", C3, ("main",)),
    ]
    assert [c.commit for c in hub.find_cached("me/m:a.pth@v2")] == [C2]
    hub.delete_cached(hub.find_cached("me/m:b.pth"))  # one file of a revision: the others stay
    assert [(c.filename, c.commit) for c in hub.cached_files() if c.repo_id == "me/m"] == [
        ("a.pth", C1),
        ("a.pth", C2),
    ]
    assert resolve_model("me/m:a.pth").path.read_bytes() == b"a"
    assert hub.delete_cached(hub.find_cached("me/m")) == 1  # the whole repo; the shared blob once
    assert not (cache / "models--me--m").exists()
    assert [c.filename for c in hub.cached_files()] == ["o.pth"]
    with pytest.raises(ModelNotFoundError, match="local path"):
        hub.find_cached(str(tmp_path))
