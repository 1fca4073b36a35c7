"""The `rwkv` command: fast start without torch, version, `show`, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from rwkv_cli import __version__
from rwkv_cli.cli import app


def run_rwkv(*args, **kw):
    return subprocess.run([sys.executable, "-m", "rwkv_cli", *args], capture_output=True, text=True, **kw)


def test_help_does_not_import_torch():
    code = (
        "import sys; sys.argv = ['rwkv', '--help']\n"
        "from rwkv_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "Usage: rwkv" in out.stdout
    assert out.stderr.strip().endswith("NO-TORCH")


def test_version():
    assert CliRunner().invoke(app, ["--version"]).output.strip() == f"rwkv-cli {__version__}"
    out = run_rwkv("-V")
    assert out.returncode == 0 and out.stdout.strip() == f"rwkv-cli {__version__}"


def test_show_describes_a_checkpoint(make_ckpt):
    result = CliRunner().invoke(app, ["show", str(make_ckpt("7", 3, 128, 1024))])
    assert result.exit_code == 0, result.output
    assert "RWKV-7" in result.output and "2 x 64" in result.output and "1024" in result.output


def test_bad_file_is_one_line_error_and_exit_1(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_text("not a model")
    out = run_rwkv("show", str(bad))
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "not a checkpoint" in out.stderr


def test_unknown_command_is_usage_error():
    assert run_rwkv("frobnicate").returncode == 2


def test_bench_times_prompt_and_generation(make_ckpt):
    """`rwkv bench` (like llama-bench) on the CPU: one JSON object per test, rates > 0, the
    weights counted once, and a table without --json."""
    import json

    ckpt = str(make_ckpt("7", 2, 64, 1024))
    result = CliRunner().invoke(app, ["bench", "-m", ckpt, "-p", "8", "-n", "4", "-b", "1", "-b", "2", "-r", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["test"], r["batch"]) for r in rows] == [("pp8", 1), ("tg4", 1), ("pp8", 2), ("tg4", 2)]
    assert all(r["tok_s"] > 0 for r in rows) and rows[1]["ms_per_step"] > 0
    from rwkv_cli import load_model

    net = load_model(ckpt, "cpu", "fp32").net
    assert rows[0]["weights_bytes"] == sum(t.numel() * t.element_size() for t in net._all_weights())
    table = CliRunner().invoke(app, ["bench", "-m", ckpt, "-p", "8", "-n", "2", "-r", "1"])
    assert table.exit_code == 0 and "| pp8" in table.stdout and "| tg2" in table.stdout


def test_unknown_cpu_matmul_backend_is_said():
    """A mistyped RWKV_CPU_MATMUL must not pass for a choice: one notice, then the default."""
    out = subprocess.run([sys.executable, "-c", "from rwkv_cli import ops; print(ops.cpu_matmul_backend())"],
                         capture_output=True, text=True, env=dict(os.environ, RWKV_CPU_MATMUL="numpi"))
    assert out.returncode == 0 and out.stdout.strip() in ("numpy", "numpy-blas")
    assert out.stderr.strip() == "rwkv-cli: RWKV_CPU_MATMUL='numpi' is not one of numpy, numpy-blas, torch; using numpy"
