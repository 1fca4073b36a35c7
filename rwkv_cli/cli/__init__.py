"""The `rwkv` command: a thin Typer layer over the Python API.

Nothing heavy is imported here: each command imports torch and the engine when it runs, so
`rwkv --help` and shell completion start instantly.
"""

from __future__ import annotations

import sys

import typer

from .. import __version__

app = typer.Typer(
    name="rwkv",
    help="Run RWKV language models from the terminal.",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain Click help: rich rendering alone costs ~0.15 s of startup
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rwkv-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run RWKV language models from the terminal."""


# Registration order is the order `rwkv --help` lists the commands in.
from . import info  # noqa: E402,F401,I001  (registers commands)
from . import models  # noqa: E402,F401
from . import tokenize  # noqa: E402,F401
from . import generate  # noqa: E402,F401
from . import bench  # noqa: E402,F401
from . import chat  # noqa: E402,F401
from . import state  # noqa: E402,F401
from . import convert  # noqa: E402,F401


def main() -> None:
    """Console entry point: RWKV errors and running out of memory become one line on stderr and
    exit code 1."""
    from ..errors import RWKVError

    try:
        app()
    except RWKVError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("[interrupted]", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        from ..memory import out_of_memory_message

        message = out_of_memory_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
