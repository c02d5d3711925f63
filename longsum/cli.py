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


SUMMARIZE_EPILOG = """Examples:

  longsum summarize paper.txt                          (default model: ccdv/lsg-bart-base-4096-pubmed)

  longsum summarize reports/ --glob '*.txt,*.md' -o summaries.jsonl --num-beams 4

  cat chapter.txt | longsum summarize - -o - --long-input chunk

  longsum summarize articles.jsonl --text-field article --id-field id --model ./my-lsg-model

  torchrun --nproc-per-node 4 -m longsum summarize docs/ -o summaries.jsonl

The default model is a real long-document summarizer on the Hugging Face Hub (an LSG-BART fine-tuned
on PubMed, 4,096 tokens); it needs the Hub once, then the local cache. Set LONGSUM_MODEL or --model
for another one (a local folder works offline)."""


@app.command(epilog=SUMMARIZE_EPILOG)
def summarize(
    inputs: list[str] = typer.Argument(..., help="Text/Markdown files, folders, '-' for stdin, or JSONL/CSV/parquet."),
    output: str = typer.Option("summaries.jsonl", "--output", "-o", help="JSONL output ('-' for stdout)."),
    model: str = typer.Option(
        "ccdv/lsg-bart-base-4096-pubmed", "--model", "-m", envvar="LONGSUM_MODEL", help="Path, Hub id or alias."
    ),
    num_beams: int = typer.Option(None, help="Beam size [default: model's, else 4]."),
    max_new_tokens: int = typer.Option(None, help="Longest summary in tokens [default: model's, else 256]."),
    min_new_tokens: int = typer.Option(None, help="Shortest summary in tokens [default: model's, else 0]."),
    length_penalty: float = typer.Option(None, help="Beam length penalty [default: model's, else 1.0]."),
    no_repeat_ngram_size: int = typer.Option(None, help="Block repeated n-grams [default: model's, else 3]."),
    batch_size: int = typer.Option(4, help="Documents per batch (halved on CUDA out-of-memory)."),
    max_source_length: int = typer.Option(None, help="Input tokens kept [default: the model's length]."),
    long_input: str = typer.Option("truncate", help="Documents longer than the model: truncate | chunk."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda, cuda:1..."),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, else fp32), fp32, bf16, fp16."),
    glob: str = typer.Option("*.txt,*.md", help="File patterns inside folders (comma-separated)."),
    text_field: str = typer.Option(None, help="Record field with the text [default: text, then article]."),
    id_field: str = typer.Option(None, help="Record field with the id [default: id, else file:line]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over instead of skipping ids already done."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first document that fails."),
) -> None:
    """Summarize documents into JSONL, one line per document, resumable."""
    from longsum.generation import GenerationOptions
    from longsum.summarize import SummarizeConfig, run

    options = GenerationOptions(
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        batch_size=batch_size,
        max_source_length=max_source_length,
        long_input=long_input,
    )
    config = SummarizeConfig(
        inputs=inputs, output=output, model=model, device=device, dtype=dtype, generation=options, glob=glob,
        text_field=text_field, id_field=id_field, overwrite=overwrite, fail_fast=fail_fast,
    )  # fmt: skip
    raise typer.Exit(run(config))


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
