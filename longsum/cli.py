"""The `longsum` command: a thin Typer app.

Each command parses its options, imports its module lazily (so `longsum --help` never imports
torch or transformers) and calls that module's `run()`. Results go to stdout or files; progress
and logs go to stderr. A `LongsumError` becomes one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import sys
from typing import Literal

import typer

from longsum import __version__
from longsum.console import note, quiet_libraries, stderr_console
from longsum.errors import LongsumError
from longsum.registry import DTYPES, LONGT5_TARGETS, SPARSITY_TYPES, aliases, convertible

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

SparsityType = Literal[SPARSITY_TYPES]
LongT5Target = Literal[LONGT5_TARGETS]
SavedDtype = Literal[tuple(DTYPES)]
LSG_PANEL = "LSG settings (defaults: docs/lsg.md; re-converting keeps the source's)"


@app.command(epilog=CONVERT_EPILOG)
def convert(
    source: str = typer.Argument(..., help="Checkpoint folder, Hub id or alias."),
    output_dir: str = typer.Argument(None, help="Where to write (default: ./lsg-NAME-LENGTH)."),
    max_length: int = typer.Option(4096, help="New maximum input length (a multiple of the block size)."),
    block_size: int = typer.Option(None, help="Local block size (default 128).", rich_help_panel=LSG_PANEL),
    sparse_block_size: int = typer.Option(
        None, help="Sparse tokens on each side (default 128); 0 = none.", rich_help_panel=LSG_PANEL
    ),
    sparsity_factor: int = typer.Option(
        None, help="Compression factor of the sparse sequence (default 2).", rich_help_panel=LSG_PANEL
    ),
    sparsity_type: SparsityType = typer.Option(
        None, help="How the sparse sequence is built (default norm).", rich_help_panel=LSG_PANEL
    ),
    num_global_tokens: int = typer.Option(None, help="Global tokens, 1..512 (default 1).", rich_help_panel=LSG_PANEL),
    pass_global_tokens_to_decoder: bool = typer.Option(
        None,
        "--pass-global-tokens-to-decoder/--no-pass-global-tokens-to-decoder",
        help="(default: pass)",
        rich_help_panel=LSG_PANEL,
    ),  # fmt: skip
    mask_first_token: bool = typer.Option(
        None,
        "--mask-first-token/--no-mask-first-token",
        help="Hide token 0, which repeats global 0 (default: no).",
        rich_help_panel=LSG_PANEL,
    ),  # fmt: skip
    adaptive: bool = typer.Option(
        None,
        "--adaptive/--no-adaptive",
        help="Shrink blocks for short inputs (default: adaptive).",
        rich_help_panel=LSG_PANEL,
    ),  # fmt: skip
    pool_with_global: bool = typer.Option(
        None,
        "--pool-with-global/--no-pool-with-global",
        help="Pool global tokens too (default: yes).",
        rich_help_panel=LSG_PANEL,
    ),  # fmt: skip
    lsh_num_pre_rounds: int = typer.Option(
        None, help="Pre-rounds of the lsh sparsity type (default 1).", rich_help_panel=LSG_PANEL
    ),
    random_global_init: bool = typer.Option(False, "--random-global-init", help="Draw globals from a normal fit."),
    global_stride: int = typer.Option(64, help="Positions between consecutive global tokens."),
    to: LongT5Target = typer.Option(None, "--to", help="T5 only: which LongT5 attention."),
    seed: int = typer.Option(0, help="Seed for random global initialisation."),
    dtype: SavedDtype = typer.Option("fp32", help="Saved weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
) -> None:
    """Convert a short-context checkpoint into a long-context one (LSG, or LongT5 from T5)."""
    from rich.table import Table

    from longsum.convert import ConvertOptions
    from longsum.convert import convert as run_convert

    options = ConvertOptions(
        max_length=max_length, block_size=block_size, sparse_block_size=sparse_block_size,
        sparsity_factor=sparsity_factor, sparsity_type=sparsity_type, num_global_tokens=num_global_tokens,
        pass_global_tokens_to_decoder=pass_global_tokens_to_decoder, mask_first_token=mask_first_token,
        adaptive=adaptive, pool_with_global=pool_with_global, lsh_num_pre_rounds=lsh_num_pre_rounds,
        random_global_init=random_global_init, global_stride=global_stride, seed=seed, dtype=dtype,
        overwrite=overwrite, to=to,
    )  # fmt: skip
    report = run_convert(source, output_dir, options)
    table = Table(title=f"converted {report.source}", show_header=False)
    rows = [("architecture", f"{report.architecture} ({report.model_type})"),
            ("parameters", f"{report.params_before:,} -> {report.params_after:,}"),
            ("positions", f"{report.positions_before} -> {report.positions_after}"),
            *((k, str(v)) for k, v in report.settings.items()),
            ("output", report.output), ("seconds", f"{report.seconds:.1f}")]  # fmt: skip
    for key, value in rows:
        table.add_row(key, value)
    stderr_console().print(table)
    for line in report.notes:
        note(f"note: {line}")


# Options shared by the commands that generate (summarize, eval): same names, same meaning.
# The generation options themselves come from `GenerationOptions` (`_with_generation`).
RunDtype = Literal[("auto", *DTYPES)]
DEVICE = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda, cuda:1, mps.")
DTYPE = typer.Option("auto", "--dtype", help="auto: bf16 on CUDA that supports it, else fp32.")
MODEL = typer.Option(
    "ccdv/lsg-bart-base-4096-pubmed", "--model", "-m", envvar="LONGSUM_MODEL", help="Path, Hub id or alias."
)


def _with_generation(command):
    """Give `command` (which takes `**generation`) the options of `GenerationOptions`, where each is
    defined once with its type, default, bounds and help."""
    import inspect

    from longsum.generation import GenerationOptions
    from longsum.settings import cli_parameters

    own = [p for p in inspect.signature(command).parameters.values() if p.kind != p.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*own, *cli_parameters(GenerationOptions)])
    return command


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


@app.command(epilog=SUMMARIZE_EPILOG)
@_with_generation
def summarize(
    inputs: list[str] = typer.Argument(
        ..., help="Text/Markdown/PDF files, folders, '-' for stdin, JSONL/CSV/parquet (text, JSONL, CSV may be .gz)."
    ),
    output: str = typer.Option("summaries.jsonl", "--output", "-o", help="The JSONL output file ('-': stdout)."),
    model: str = MODEL,
    device: str = DEVICE,
    dtype: RunDtype = DTYPE,
    glob: str = typer.Option(
        "*.txt,*.md",
        help="File patterns inside folders (comma-separated, any case; '*.txt' also finds a.txt.gz). The output "
        "and the files longsum keeps beside it are never read from a folder.",
    ),
    text_field: str = typer.Option(None, help="Record field with the text (default: text, then article)."),
    id_field: str = typer.Option(None, help="Record field with the id (default: id, else NAME:LINE)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start over (an output longsum wrote) instead of resuming."
    ),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first document that fails."),
    **generation,
) -> None:
    """Summarize documents into JSONL, one line per document, resumable."""
    from longsum.generation import GenerationOptions
    from longsum.summarize import SummarizeConfig, run

    options = GenerationOptions(**generation)
    config = SummarizeConfig(
        inputs=inputs, output=output, model=model, device=device, dtype=dtype, generation=options, glob=glob,
        text_field=text_field, id_field=id_field, overwrite=overwrite, fail_fast=fail_fast,
    )  # fmt: skip
    raise typer.Exit(run(config))


EVAL_EPILOG = """Examples:

  longsum eval pubmed --model ccdv/lsg-bart-base-4096-pubmed --limit 200

  longsum eval govreport --model ./my-model --batch-size 8 --compare eval-govreport-test-base/results.json

  longsum eval data/dev.jsonl --text-column document --summary-column summary --model ./my-model

  accelerate launch -m longsum eval arxiv --model ccdv/lsg-bart-base-4096-arxiv

  longsum eval --list

Scores: rouge1/2/L/Lsum F1 x100 (rouge-score, use_stemmer=True; rougeLsum on sentences split offline),
mean over examples with a seeded bootstrap 95% interval. Hub datasets need the Hub once, then the cache."""


@app.command("eval", epilog=EVAL_EPILOG)
@_with_generation
def eval_(
    dataset: str = typer.Argument(None, help="Alias (pubmed, arxiv, govreport), Hub id, or JSONL/CSV/parquet file."),
    model: str = MODEL,
    split: str = typer.Option("test", help="Dataset split."),
    limit: int = typer.Option(None, help="Score a seeded random subset of N examples."),
    seed: int = typer.Option(0, help="Seed for --limit sampling and the bootstrap."),
    text_column: str = typer.Option(None, help="Column with the document (default: the alias's, else text)."),
    summary_column: str = typer.Option(None, help="Column with the reference (default: the alias's, else summary)."),
    dataset_config: str = typer.Option(None, help="Hub dataset configuration (default: the alias's)."),
    revision: str = typer.Option(None, help="Hub dataset revision (branch, tag or commit)."),
    output_dir: str = typer.Option(
        None, "--output-dir", "-o", help="Where results go (default: eval-DATASET-SPLIT-MODEL)."
    ),
    device: str = DEVICE,
    dtype: RunDtype = DTYPE,
    compare: str = typer.Option(None, help="Another results.json to compare with."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard earlier predictions in the output dir."),
    list_aliases: bool = typer.Option(False, "--list", help="Show the dataset aliases and their presets."),
    **generation,
) -> None:
    """Score a model with ROUGE on a summarization dataset (resumable, with provenance)."""
    if list_aliases:
        from longsum.data import list_aliases as aliases

        for entry in aliases():
            typer.echo(f"{entry['alias']:<10} {entry['hub_id']} [{entry['config']}] {entry['text_column']} -> "
                       f"{entry['summary_column']}; preset {entry['preset']}: {entry['description']}")  # fmt: skip
        return
    if dataset is None:
        raise LongsumError("name a dataset (pubmed, arxiv, govreport, a Hub id or a file); see longsum eval --list")
    from longsum.evaluation import EvalConfig, run
    from longsum.generation import GenerationOptions

    options = GenerationOptions(**generation)
    config = EvalConfig(
        dataset=dataset, model=model, split=split, limit=limit, seed=seed, text_column=text_column,
        summary_column=summary_column, config=dataset_config, revision=revision, output_dir=output_dir,
        generation=options, device=device, dtype=dtype, compare=compare, overwrite=overwrite,
    )  # fmt: skip
    raise typer.Exit(run(config))


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


def _train(ctx: typer.Context, **values) -> None:
    """Fine-tune a seq2seq model (LSG, LongT5, BART...) on a summarization dataset."""
    from longsum.train import TrainConfig, load_config_file, run

    config = values.pop("config", None)
    if config:  # file values beat defaults; options given on the command line beat the file
        for key, value in load_config_file(config).items():
            if key == "training_args" or getattr(ctx.get_parameter_source(key), "name", "") != "COMMANDLINE":
                values[key] = value
    run(TrainConfig(**values))


def _register_train() -> None:
    """`longsum train`: its options are built from `TrainConfig`, where each is defined once."""
    import inspect

    from longsum.settings import cli_parameters
    from longsum.train import DATA, TrainConfig

    config = typer.Option(None, "--config", help="YAML/JSON file with more options (unknown keys fail).",
                          rich_help_panel=DATA)  # fmt: skip
    _train.__signature__ = inspect.Signature([
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config, annotation=str | None),
        *cli_parameters(TrainConfig),
    ])  # fmt: skip
    app.command("train", epilog=TRAIN_EPILOG)(_train)


_register_train()


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
