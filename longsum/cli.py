"""The `longsum` command: a thin Typer app.

Each command parses its options, imports its module lazily (so `longsum --help` never imports
torch or transformers) and calls that module's `run()`. Results go to stdout or files; progress
and logs go to stderr. A `LongsumError` becomes one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import sys

import typer

from longsum import __version__
from longsum.errors import LongsumError

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
) -> None:
    """Summarize long documents with LSG, LongT5, LED and other long-context seq2seq models."""


def _not_yet(command: str, issue: int) -> None:
    raise LongsumError(f"`longsum {command}` is not available in longsum {__version__} yet (planned, issue #{issue})")


@app.command(epilog="Example: longsum convert bart-base ./lsg-bart-base-4096 --max-length 4096")
def convert(source: str = typer.Argument(..., help="Checkpoint folder, Hub id or alias.")) -> None:
    """Convert a short-context checkpoint into a long-context LSG one."""
    _not_yet("convert", 3)


@app.command(epilog="Example: longsum summarize report.txt --model ./my-lsg-model -o summaries.jsonl")
def summarize(inputs: list[str] = typer.Argument(..., help="Files, folders, '-' for stdin, or JSONL/CSV.")) -> None:
    """Summarize documents into JSONL."""
    _not_yet("summarize", 4)


@app.command("eval", epilog="Example: longsum eval pubmed --model ccdv/lsg-bart-base-4096-pubmed --limit 100")
def eval_(dataset: str = typer.Argument(..., help="Dataset alias, Hub id or local file.")) -> None:
    """Score a model with ROUGE on a summarization dataset."""
    _not_yet("eval", 5)


@app.command(epilog="Example: longsum train --model ./lsg-bart-base-4096 --dataset pubmed --output-dir runs/pubmed")
def train() -> None:
    """Fine-tune a seq2seq model on a summarization dataset."""
    _not_yet("train", 6)


def main() -> None:
    try:
        app()
    except LongsumError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
