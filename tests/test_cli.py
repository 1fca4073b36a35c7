"""The `rwkv` command: fast start without torch, version, `show`, and one-line errors."""

from __future__ import annotations

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
