"""`rwkv pull`, `list`, `show`, `rm` against a Hub cache written by the tests (offline).

In-process runs point HF_HOME at the test cache through CliRunner's environment (rwkv_cli.hub
reads it when a spec is resolved); the exit-code and one-line-error checks run the real console
entry point in a subprocess with the same environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rwkv_cli.cli import app
from rwkv_cli.errors import RWKVError
from tests.test_hub import C1, C2, add_to_cache

V7_FILE = "rwkv7-g1a-0.1b-20250728-ctx4096.pth"
V4_FILE = "RWKV-4-Pile-169M-20220807-8023.pth"


@pytest.fixture
def hf_home(tmp_path, make_ckpt):
    """HF_HOME with a cache holding a v7 `.pth` (as rwkv7-g1), a v4 `.pth` and a v7 safetensors file."""
    cache = tmp_path / "hf" / "hub"
    add_to_cache(cache, "BlinkDL/rwkv7-g1", {V7_FILE: make_ckpt("7", 2, 64, 65536)}, commit=C1)
    add_to_cache(cache, "BlinkDL/rwkv-4-pile-169m", {V4_FILE: make_ckpt("4", 2, 64, 1024)}, commit=C2)
    st = make_ckpt("7", 2, 64, 1024, suffix=".safetensors")
    add_to_cache(cache, "me/tiny", {"tiny.safetensors": st, "README.md": b"hi"}, commit="4" * 40)
    return tmp_path / "hf"


def invoke(hf_home, *args, input=None):
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": None, "RWKV_MODEL": None}
    return CliRunner(env=env).invoke(app, list(args), input=input)


def run_rwkv(hf_home, *args):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "rwkv_cli", *args], capture_output=True, text=True, env=env)


def snapshot(hf_home, repo, commit, name):
    return hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit / name


def test_pull_from_the_cache_prints_the_path(hf_home):
    path = snapshot(hf_home, "BlinkDL/rwkv7-g1", C1, V7_FILE)
    result = invoke(hf_home, "pull", "rwkv7-g1-0.1b", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}\n"
    result = invoke(hf_home, "pull", "BlinkDL/rwkv7-g1", "--revision", "main", "--offline")
    assert result.stdout == f"{path}\n" and f"BlinkDL/rwkv7-g1:{V7_FILE}@{C1[:12]}" in result.stderr


def test_list_shows_cached_checkpoints_with_their_version(hf_home):
    result = invoke(hf_home, "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["REPO", "FILE", "SIZE", "VERSION", "PARAMS", "REVISION"]
    assert [line.split()[0] for line in lines[1:]] == [
        "BlinkDL/rwkv-4-pile-169m",
        "BlinkDL/rwkv7-g1",
        "me/tiny",
    ]
    assert V7_FILE in lines[2] and "RWKV-7" in lines[2] and C1[:8] in lines[2]
    assert "RWKV-4" in lines[1] and "README" not in result.stdout  # checkpoints only
    rows = json.loads(invoke(hf_home, "list", "--json").stdout)
    v7 = next(r for r in rows if r["file"] == V7_FILE)
    assert (v7["version"], v7["layers"], v7["width"], v7["vocab"], v7["tokenizer"]) == (
        "RWKV-7",
        2,
        64,
        65536,
        "world",
    )
    assert v7["revision"] == C1 and v7["refs"] == ["main"] and v7["size"] > 0 and v7["params"] > 8e6
    assert next(r for r in rows if r["repo"] == "me/tiny")["version"] == "RWKV-7"  # from the header


def test_list_reports_unreadable_files_and_an_empty_cache(tmp_path):
    assert invoke(tmp_path / "none", "list", "--json").stdout.strip() == "[]"
    add_to_cache(tmp_path / "hf" / "hub", "me/bad", {"bad.pth": b"not a model"})
    rows = json.loads(invoke(tmp_path / "hf", "list", "--json").stdout)
    assert rows[0]["version"] == "unreadable" and "not a checkpoint" in rows[0]["error"]


def test_show_a_spec_and_a_file(hf_home, make_ckpt):
    result = invoke(hf_home, "show", "rwkv7-g1-0.1b")
    assert result.exit_code == 0, result.output
    out = dict(
        line.split(None, 1) for line in result.stdout.replace("file size", "file_size").splitlines()[:3]
    )
    assert out["model"] == f"BlinkDL/rwkv7-g1:{V7_FILE}@{C1[:12]}"
    assert "RWKV-7" in result.stdout and "world" in result.stdout and "1 x 64" in result.stdout
    result = invoke(hf_home, "show", str(make_ckpt("4", 2, 64, 1024)))
    assert result.exit_code == 0 and "RWKV-4" in result.stdout and "model " not in result.stdout


def test_rm_deletes_cache_entries_only(hf_home, make_ckpt):
    path = snapshot(hf_home, "BlinkDL/rwkv7-g1", C1, V7_FILE)
    result = invoke(hf_home, "rm", "rwkv7-g1-0.1b", input="n\n")  # asks first
    assert result.exit_code == 1 and path.exists()
    result = invoke(hf_home, "rm", "rwkv7-g1-0.1b", "-y")
    assert result.exit_code == 0, result.output
    assert f"BlinkDL/rwkv7-g1:{V7_FILE}" in result.stdout and "deleted 1 file(s)" in result.stdout
    assert not path.exists() and not path.parent.parent.parent.exists()  # the repo's last file
    assert "rwkv7-g1" not in invoke(hf_home, "list").stdout
    result = invoke(hf_home, "rm", str(make_ckpt("4", 2, 64, 1024)), "-y")
    assert isinstance(result.exception, RWKVError) and "local path" in str(result.exception)
    assert make_ckpt("4", 2, 64, 1024).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "nonsense"], "'nonsense' is not a file, a directory, owner/repo[:FILE] or a known alias"),
        (["pull", "rwkv7-world-0.4b"], "offline and BlinkDL/rwkv-7-world has no RWKV-x070-World-0.4B"),
        (["rm", "me/absent", "-y"], "nothing in the Hugging Face cache matches me/absent"),
    ],
)
def test_bad_specs_are_one_line_errors_with_exit_1(hf_home, args, message):
    out = run_rwkv(hf_home, *args)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: " + message) and out.stderr.count("\n") == 1, out.stderr


def test_help_imports_neither_torch_nor_huggingface_hub():
    code = (
        "import sys; sys.argv = ['rwkv', 'pull', '--help']\n"
        "from rwkv_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted({'torch', 'huggingface_hub'} & set(sys.modules)), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "Usage: rwkv pull" in out.stdout and out.stderr.strip() == "[]"


def test_other_commands_take_hub_specs_from_the_cache(hf_home):
    """tokenize, generate and chat resolve an alias through the same offline cache."""
    result = invoke(hf_home, "tokenize", "-m", "rwkv7-g1-0.1b", "User: hi")
    assert result.exit_code == 0 and result.stdout.strip() == "[24281, 59, 4571]"
    out = run_rwkv(hf_home, "generate", "-m", "rwkv7-g1-0.1b", "Hello", "-n", "3", "--temp", "0", "--json", "-q")
    assert out.returncode == 0 and len(json.loads(out.stdout)["tokens"]) == 3, out.stderr
