"""The `longsum` command: a thin table of commands.

Each command is one settings dataclass (its options, `--config FILE` and help are built from it by
`longsum.settings.command`) and one `run(cfg)` in its module. `longsum --help` imports only those
light modules, never torch or transformers. Results go to stdout or files; progress and logs go to
stderr. A `LongsumError` becomes one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import sys

import typer

from longsum import __version__, convert, evaluation, summarize, train
from longsum.console import quiet_libraries
from longsum.errors import LongsumError
from longsum.registry import aliases, convertible
from longsum.settings import Action, command

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


CONVERT_EPILOG = f"""Examples:

  longsum convert bart-base                              (-> ./lsg-bart-base-4096)

  longsum convert facebook/bart-large-cnn ./lsg-bart-large-cnn-16384 --max-length 16384

  longsum convert ./lsg-bart-base-4096 --max-length 16384  (re-convert: positions only, globals kept)

  longsum convert roberta-base --max-length 4096 --sparsity-type pooling --num-global-tokens 16

  longsum convert flan-t5-base --to longt5-tglobal --max-length 16384

Converts: {convertible()}.
Aliases: {", ".join(aliases("source"))}
(Hub ids need the Hub once, then the cache)."""

SUMMARIZE_EPILOG = """Examples:

  longsum summarize paper.txt                          (default model: ccdv/lsg-bart-base-4096-pubmed)

  longsum summarize reports/ --glob '*.txt,*.md' -o summaries.jsonl --num-beams 4

  cat chapter.txt | longsum summarize - -o - --long-input chunk

  longsum summarize articles.jsonl --text-field article --id-field id --model ./my-lsg-model

  torchrun --nproc-per-node 4 -m longsum summarize docs/ -o summaries.jsonl

Every input document gets exactly one record, known by its file's resolved
'path' plus, for a JSONL/CSV/parquet record, its id (--id-field, else
NAME:LINE); stdin's id is 'stdin:' + a hash of the text. Rerunning into the
same output skips documents already done and retries failed ones; the output
must come from the same model weights and settings (OUTPUT.run.json), else the
run is refused. One run at a time writes an output (OUTPUT.lock).

The default model is a real long-document summarizer on the Hugging Face Hub
(an LSG-BART fine-tuned on PubMed, 4,096 tokens); it needs the Hub once, then
the local cache. Set LONGSUM_MODEL or --model for another one (a local folder
works offline)."""


EVAL_EPILOG = """Examples:

  longsum eval pubmed --model ccdv/lsg-bart-base-4096-pubmed --limit 200

  longsum eval govreport --model ./my-model --batch-size 8 --compare eval-govreport-test-base/results.json

  longsum eval data/dev.jsonl --text-column document --summary-column summary --model ./my-model

  accelerate launch -m longsum eval arxiv --model ccdv/lsg-bart-base-4096-arxiv

  longsum eval --list

Scores: rouge1/2/L/Lsum F1 x100 (rouge-score, use_stemmer=True; rougeLsum on sentences split offline),
mean over examples with a seeded bootstrap 95% interval. Hub datasets need the Hub once, then the cache."""


TRAIN_EPILOG = """Examples:

  longsum train --model ./lsg-bart-base-4096 --dataset pubmed --output-dir runs/pubmed \\
      --per-device-batch-size 8 --gradient-accumulation-steps 4 --bf16 --gradient-checkpointing \\
      --eval-steps 2000 --save-steps 2000                      (the published recipe: lr 8e-5, warmup 10%)

  longsum train --model ./lsg-bart-base-4096 --dataset train.jsonl --eval-dataset dev.jsonl \\
      --output-dir runs/mine --max-steps 2000 --resume

  accelerate launch -m longsum train --config examples/configs/pubmed.yaml     (multi-GPU; same flags)

  torchrun --nproc-per-node 8 -m longsum train --config examples/configs/pubmed.yaml \\
      --deepspeed examples/configs/ds_zero2.json

--resume alone continues from the newest complete checkpoint in --output-dir; --resume PATH from that one
(the run's model, data and hyper-parameters must be the same: train_run.json names them). An --output-dir
that holds another run is refused; --overwrite removes what longsum train wrote there and starts over.
--config FILE (YAML/JSON) sets any option below or any transformers Seq2SeqTrainingArguments field;
options given on the command line win over the file."""


def _list_aliases() -> None:
    from longsum.data import list_aliases

    for entry in list_aliases():
        typer.echo(f"{entry['alias']:<10} {entry['hub_id']} [{entry['config']}] {entry['text_column']} -> "
                   f"{entry['summary_column']}; preset {entry['preset']}: {entry['description']}")  # fmt: skip


# The commands: name, settings, run(cfg), help, example.
command(app, "convert", convert.ConvertConfig, convert.run, epilog=CONVERT_EPILOG,
        help="Convert a short-context checkpoint into a long-context one (LSG, or LongT5 from T5).")  # fmt: skip
command(app, "summarize", summarize.SummarizeConfig, summarize.run, epilog=SUMMARIZE_EPILOG,
        help="Summarize documents into JSONL, one line per document, resumable.")  # fmt: skip
command(app, "eval", evaluation.EvalConfig, evaluation.run, epilog=EVAL_EPILOG,
        help="Score a model with ROUGE on a summarization dataset (resumable, with provenance).",
        actions=(Action("list_aliases", ("--list",), "Show the dataset aliases and their presets.",
                        _list_aliases),))  # fmt: skip
command(app, "train", train.TrainConfig, train.run, epilog=TRAIN_EPILOG, load=train.load_config_file,
        help="Fine-tune a seq2seq model (LSG, LongT5, BART...) on a summarization dataset.")  # fmt: skip


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
