"""`rwkv generate` end to end, in a child process like a user's shell would run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import default_sigint, run_cli

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
GREEDY = ["--temp", "0", "--presence-penalty", "0", "--frequency-penalty", "0"]


def rwkv(*args, stdin: bytes | None = b"", timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "rwkv_cli", *map(str, args)],
        input=stdin, capture_output=True, env=ENV, timeout=timeout,
    )


@pytest.fixture(scope="module")
def model(make_ckpt):
    return make_ckpt("7", 2, 64, 65536)


def test_streams_text_to_stdout_and_stats_to_stderr(model):
    out = rwkv("generate", "-m", model, "Hello", "-n", "8", *GREEDY)
    assert out.returncode == 0, out.stderr
    assert out.stdout and b"gen 8 tok" in out.stderr and b"loaded" in out.stderr
    quiet = rwkv("generate", "-m", model, "Hello", "-n", "8", *GREEDY, "-q")
    assert quiet.stdout == out.stdout and quiet.stderr == b""


def test_json_and_prompt_sources(model, tmp_path):
    from typer.testing import CliRunner

    from rwkv_cli.cli import app

    def run_json(*args, stdin=b""):  # in-process: the same command, without a Python start each time
        out = CliRunner().invoke(app, ["generate", "-m", str(model), "-n", "5", *GREEDY, "--json", "-q", *map(str, args)], input=stdin)
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)

    base = run_json("Summarise:\n\nsome notes")
    assert set(base) >= {"text", "tokens", "finish_reason", "timings"} and base["finish_reason"] == "length"
    assert len(base["tokens"]) == 5 and base["timings"]["prompt_tokens"] > 0
    # argument + stdin: the argument is an instruction placed before stdin's text
    assert run_json("Summarise:", stdin=b"some notes")["tokens"] == base["tokens"]
    (tmp_path / "p.txt").write_text("some notes")
    assert run_json("Summarise:", "-f", tmp_path / "p.txt")["tokens"] == base["tokens"]
    assert run_json("-", stdin=b"Summarise:\n\nsome notes")["tokens"] == base["tokens"]


def test_stop_string_is_not_printed(model):
    full = run_cli("generate", "-m", model, "Hi", "-n", "12", *GREEDY, "-q").stdout.decode()
    stop = full[4:7]
    cut = run_cli("generate", "-m", model, "Hi", "-n", "12", *GREEDY, "-q", "--stop", stop).stdout.decode()
    assert cut == full[: full.find(stop)]


def test_batch_jsonl_in_order_with_error_lines(model, tmp_path):
    lines = [
        {"prompt": "alpha", "id": "a", "max_tokens": 6},
        "this is not json",
        {"prompt": "beta gamma", "temperature": 0.7, "seed": 3},
        {"id": "no-prompt"},
        {"prompt": "delta", "id": 4, "max_tokens": 2, "top_k": -1},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = rwkv("generate", "-m", model, "--batch", path, "-n", "4", "--batch-size", "2", "-q")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(r) for r in out.stdout.decode().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["id"] == "a" and len(rows[0]["tokens"]) == 6 and rows[0]["finish_reason"] == "length"
    assert "error" in rows[1] and "error" in rows[3] and "top_k" in rows[4]["error"]
    assert len(rows[2]["tokens"]) == 4 and "text" in rows[2]


@pytest.mark.parametrize(
    "args, stdin, code, message",
    [
        (["generate", "-m", "{model}", ""], b"", 2, b"empty prompt"),
        (["generate", "-m", "{model}"], b"\xff\xfe bad", 1, b"not valid UTF-8"),
        (["generate", "-m", "no-such-owner/no-such-repo", "hi"], b"", 1, b"error:"),
        (["generate", "-m", "{bad}", "hi"], b"", 1, b"not a checkpoint"),
        (["generate", "-m", "{model}", "hi", "--top-p", "3"], b"", 2, b"top_p"),
        (["generate", "-m", "{model}", "hi", "--device", "tpu"], b"", 2, b"'tpu' is not one of auto, cpu"),
        (["generate", "-m", "{model}", "hi", "--dtype", "fp64"], b"", 2, b"'fp64' is not one of auto, fp32"),
        (["generate", "-m", "{model}", "hi", "--device", "cuda:9"], b"", 1, b"error: --device cuda:9 was requested"),
        (["generate", "-m", "{model}", "hi", "--frob"], b"", 2, b"error: No such option: --frob (see `"),
        (["state", "save", "-m", "{model}", "-p", "x"], b"", 2, b"error: Missing option '--output'"),
    ],
)
def test_bad_input_is_one_clear_line(args, stdin, code, message, model, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("nope")
    out = run_cli(*[a.format(model=model, bad=bad) for a in args], stdin=stdin)
    assert out.returncode == code, out.stderr
    assert message in out.stderr and b"Traceback" not in out.stderr
    # one line, usage errors too (click's own handler prints Usage:, Try:, a blank line, Error:)
    assert out.stderr.count(b"error:") == 1 and b"Usage:" not in out.stderr


def test_ctrl_c_keeps_output_and_exits_130(model):
    proc = subprocess.Popen(
        [sys.executable, "-m", "rwkv_cli", "generate", "-m", str(model), "Go", "-n", "-1", "--ignore-eos"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
        preexec_fn=default_sigint,
    )
    first = proc.stdout.read(1)  # generation has started
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert first and b"[interrupted]" in err and b"Traceback" not in err
