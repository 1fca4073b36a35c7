"""`rwkv tokenize`: ids as JSON, --count, --decode, stdin, checkpoints, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rwkv_cli.cli import app
from rwkv_cli.testing import random_checkpoint

try:  # tests/ as a package, or as a plain folder on sys.path
    from .test_tokenizer import train_tokenizer_json, write_hf_cache
except ImportError:
    from test_tokenizer import train_tokenizer_json, write_hf_cache

runner = CliRunner()
CHAT = "User: hi\n\nAssistant:"
CHAT_IDS = [24281, 59, 4571, 261, 5585, 41693, 59]


def rwkv(*args, input=None):
    result = runner.invoke(app, list(args), input=input)
    return result


def test_text_argument_prints_json_ids():
    r = rwkv("tokenize", "-m", "world", CHAT)
    assert r.exit_code == 0 and json.loads(r.stdout) == CHAT_IDS


def test_stdin_is_used_exactly():
    r = rwkv("tokenize", "-m", "world", input=CHAT + "\n")
    assert json.loads(r.stdout) == CHAT_IDS + [11]
    r = rwkv("tokenize", "-m", "world", "-", input=CHAT)
    assert json.loads(r.stdout) == CHAT_IDS


def test_count():
    r = rwkv("tokenize", "-m", "world", "--count", CHAT)
    assert r.exit_code == 0 and r.stdout.strip() == "7"


@pytest.mark.parametrize(
    "ids", [json.dumps(CHAT_IDS), " ".join(map(str, CHAT_IDS)), "24281\n59 4571\t261 5585 41693 59\n"]
)
def test_decode_json_or_whitespace_separated(ids):
    assert rwkv("tokenize", "-m", "world", "--decode", ids).stdout == CHAT
    assert rwkv("tokenize", "-m", "world", "-d", input=ids).stdout == CHAT


@pytest.mark.parametrize("bad", ["[1, 2.5]", "1 two", '{"a": 1}', "[true]"])
def test_decode_rejects_non_ids(bad):
    r = rwkv("tokenize", "-m", "world", "--decode", bad)
    assert r.exit_code == 1 and "expects token ids" in str(r.exception)


def test_count_with_decode_is_a_usage_error():
    assert rwkv("tokenize", "-m", "world", "-d", "-c", "1").exit_code == 2


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_world_checkpoint(tmp_path, suffix):
    path = random_checkpoint(tmp_path / f"m{suffix}", "7", n_layer=1, n_embd=64, vocab_size=65536)
    r = rwkv("tokenize", "-m", str(path), CHAT)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == CHAT_IDS


def test_tokenizer_json_beside_a_checkpoint(tmp_path):
    path = random_checkpoint(tmp_path / "m.pth", "7", n_layer=1, n_embd=64, vocab_size=320)
    train_tokenizer_json(tmp_path / "tokenizer.json")
    ids = json.loads(rwkv("tokenize", "-m", str(path), "naïve café").stdout)
    assert max(ids) < 320
    assert rwkv("tokenize", "-m", str(path), "-d", json.dumps(ids)).stdout == "naïve café"


def test_unknown_vocabulary_size(tmp_path):
    path = random_checkpoint(tmp_path / "m.pth", "7", n_layer=1, n_embd=64, vocab_size=1000)
    r = rwkv("tokenize", "-m", str(path), "x")
    assert r.exit_code == 1 and "no known tokenizer has 1000 tokens" in str(r.exception)


def _run(args, env=None, input=b""):
    """The real command line, in a fresh interpreter: how errors and environment really work."""
    return subprocess.run(
        [sys.executable, "-m", "rwkv_cli", *args], input=input, capture_output=True, env=env, timeout=120
    )


def test_errors_are_one_line_without_traceback(tmp_path):
    r = _run(["tokenize", "-m", "world"], input=b"ok \xff\xfe")
    assert r.returncode == 1
    assert r.stderr.decode() == "error: stdin is not valid UTF-8 (byte 0xff at offset 3)\n"
    r = _run(["tokenize", "-m", str(tmp_path / "missing.pth"), "x"])
    assert r.returncode == 1 and r.stderr.decode().count("\n") == 1 and "no such file" in r.stderr.decode()


def test_gpt_neox_through_a_real_hf_cache(tmp_path):
    """HF_HOME and HF_HUB_OFFLINE as a user sets them, read by huggingface_hub itself."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    missing = _run(["tokenize", "-m", "gpt-neox-20b", "hi"], env=env)
    assert missing.returncode == 1 and "run once online" in missing.stderr.decode()
    source = train_tokenizer_json(tmp_path / "t.json")
    write_hf_cache(tmp_path / "hf" / "hub", "EleutherAI/gpt-neox-20b", "tokenizer.json", source)
    found = _run(["tokenize", "-m", "gpt-neox-20b", "hi"], env=env)
    assert found.returncode == 0, found.stderr.decode()
    ids = json.loads(found.stdout)
    assert _run(["tokenize", "-m", "gpt-neox-20b", "-d", json.dumps(ids)], env=env).stdout == b"hi"


def test_tokenize_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from rwkv_cli.cli import app; "
        "r = CliRunner().invoke(app, ['tokenize', '-m', 'world', 'hi']); "
        "assert r.exit_code == 0, r.output; assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()


@pytest.mark.parametrize(
    "ids, bad",
    [("[-1]", -1), ("[99999999]", 99999999), ("65536", 65536), ("99999999999999999999999999", 10**26 - 1),
     ("[33155,-1,99999999,33]", -1)],
)
def test_decode_rejects_ids_outside_the_vocabulary(ids, bad, tmp_path):
    r = rwkv("tokenize", "-m", "world", "--decode", ids)
    assert r.exit_code == 1 and r.stdout == ""
    assert str(r.exception) == f"token id {bad} is outside the vocabulary [0, 65536)"
    hf = train_tokenizer_json(tmp_path / "tokenizer.json")  # ids past its vocabulary: refused alike
    r = rwkv("tokenize", "-m", str(hf), "--decode", ids.replace("33155", "3"))
    assert r.exit_code == 1 and r.stdout == ""
    assert f"token id {bad} is outside the vocabulary [0, " in str(r.exception)
    assert rwkv("tokenize", "-m", "world", "--decode", "[24281, 65535]").stdout == "User"  # padding: nothing


def test_text_argument_that_is_not_utf8_is_one_line():
    r = _run(["tokenize", "-m", "world", b"ok\xff"])  # argv bytes, as the shell passes $'ok\xff'
    assert r.returncode == 1
    assert r.stderr.decode() == "error: the text argument is not valid UTF-8 (byte 0xff at offset 2)\n"
    r = rwkv("tokenize", "-m", "world", "\ud800")  # a lone surrogate that stands for no byte
    assert r.exit_code == 1 and str(r.exception) == "the text argument is not valid UTF-8"
