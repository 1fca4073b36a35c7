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


def _click_exception(name: str) -> type:
    """A click exception class as this typer uses it: newer typers vendor their own click, so
    `import click` may name other classes than the ones raised."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


def main() -> None:
    """Console entry point. Every way a command can fail reaches the user as one line on stderr:
    usage errors (a bad flag or value: exit 2, with where to read more), RWKV errors, running out
    of memory and I/O errors (exit 1); Ctrl-C outside a command's own handling exits 130."""
    from ..errors import RWKVError

    usage_error, click_exception = _click_exception("UsageError"), _click_exception("ClickException")

    def fail(message: str, code: int) -> None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)

    try:
        code = app(standalone_mode=False)  # click's own handler would print usage errors in 4 lines
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `rwkv` alone: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        where = e.ctx.command_path if e.ctx is not None else "rwkv"
        fail(f"{e.format_message().rstrip('.')} (see `{where} --help`)", 2)
    except click_exception as e:
        fail(e.format_message(), e.exit_code)
    except RWKVError as e:
        fail(str(e), 1)
    except (KeyboardInterrupt, typer.Abort):
        print("[interrupted]", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`rwkv generate ... | head -1`): nothing to say
        sys.stdout = None  # no flush at exit onto the closed pipe
        sys.exit(1)
    except OSError as e:  # e.g. stdout on a full disk
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}", 1)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        from ..memory import out_of_memory_message

        message = out_of_memory_message(e)
        if message is None:
            raise
        fail(message, 1)
    sys.exit(code if isinstance(code, int) else 0)
