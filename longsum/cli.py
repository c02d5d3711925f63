"""The `longsum` command: a thin table of commands.

Each command is one settings dataclass (its options, `--config FILE` and help are built from it by
`longsum.settings.command`) and one `run(cfg)` in its module. `longsum --help` imports only those
light modules, never torch or transformers. Results go to stdout or files; progress and logs go to
stderr. A `LongsumError` becomes one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import sys

import typer

from longsum import __version__
from longsum.commands import convert, evaluation, summarize, train
from longsum.console import quiet_libraries, set_verbose
from longsum.errors import LongsumError
from longsum.settings import command

app = typer.Typer(
    name="longsum",
    help="Summarize long documents (4k-16k tokens) with long-context encoder-decoder transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"longsum {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show library logs, warnings and progress bars."),
) -> None:
    """Summarize long documents with LSG, LongT5, LED and other long-context seq2seq models."""
    if not verbose:
        quiet_libraries()
    set_verbose(verbose)


# The commands, each declared in its module (settings, run, help, examples): `longsum.settings.Command`.
COMMANDS = (convert.COMMAND, summarize.COMMAND, evaluation.COMMAND, train.COMMAND)
for _spec in COMMANDS:
    command(app, _spec)


def _optional_values(argv: list[str]) -> list[str]:
    """`--resume` with no value means `--resume auto` (Typer has no optional-value options)."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("auto")
    return out


# What a stopped run leaves: summarize and eval keep every finished record and pick up from there;
# train keeps its checkpoints (see each command's epilog).
RESUME_HINT = "rerun the same command to resume (train: with --resume)"


class _Terminated(BaseException):
    """SIGTERM (a scheduler, `docker stop`, `kill`): stop as Ctrl-C does, through every `finally`
    (records flushed, output closed, lock released). Not an Exception: nothing may take it for a
    failing document."""


class _Interrupted(BaseException):
    """SIGINT (Ctrl-C), raised instead of KeyboardInterrupt: Typer turns a KeyboardInterrupt into a
    silent exit 130, and a library's `except KeyboardInterrupt` must not swallow the user's stop."""


def _on_sigterm(signum, frame):
    raise _Terminated


def _on_sigint(signum, frame):
    raise _Interrupted


def main() -> None:
    """The console script: every failure a user can cause ends in one `error:` line and exit code 2."""
    import signal

    try:  # typer >= 0.26 vendors click
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:
        from click.exceptions import NoArgsIsHelpError, UsageError

    signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a parent ignores SIGINT
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        code = app(args=_optional_values(sys.argv[1:]), prog_name="longsum", standalone_mode=False)
    except NoArgsIsHelpError as err:  # `longsum` or `longsum train` alone: show the help
        err.show()
        sys.exit(2)
    except UsageError as err:  # a bad option or value: click's message, on one line
        command = err.ctx.command_path if err.ctx else "longsum"
        typer.echo(f"error: {' '.join(err.format_message().split())} (see '{command} --help')", err=True)
        sys.exit(2)
    except LongsumError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except _Terminated:
        typer.echo(f"terminated; {RESUME_HINT}", err=True)
        sys.exit(143)
    except (_Interrupted, KeyboardInterrupt, typer.Abort):
        typer.echo(f"interrupted; {RESUME_HINT}", err=True)
        sys.exit(130)
    sys.exit(code or 0)
