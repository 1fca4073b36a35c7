"""Every script in examples/ runs against a small random model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def env(make_ckpt, tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "rwkv").write_text(f"#!/bin/sh\nexec {sys.executable} -m rwkv_cli \"$@\"\n")  # the console script
    (bin_dir / "rwkv").chmod(0o755)
    return dict(os.environ, RWKV_MODEL=str(make_ckpt("7", 2, 64, 65536)), HF_HUB_OFFLINE="1",
                PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def run(cmd, env):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=EXAMPLES.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    return out


def test_python_api_example(env):
    out = run([sys.executable, str(EXAMPLES / "01_python_api.py")], env)
    assert "RWKV-7" in out.stdout and "state:" in out.stdout and "continued:" in out.stdout


def test_python_api_example_without_a_model(env):
    out = run([sys.executable, str(EXAMPLES / "01_python_api.py")], {k: v for k, v in env.items() if k != "RWKV_MODEL"})
    assert "random RWKV-7" in out.stdout


def test_pipe_example(env):
    out = run(["bash", str(EXAMPLES / "02_pipe.sh"), "README.md"], env)
    assert "[" in out.stderr and "tok/s" in out.stderr


def test_batch_example(env):
    out = run(["bash", str(EXAMPLES / "03_batch.sh")], env)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["capital", "poem", "code"]
    assert all("text" in r and "error" not in r for r in rows)
