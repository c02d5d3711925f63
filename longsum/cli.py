"""The `longsum` command: a thin Typer app.

Each command parses its options, imports its module lazily (so `longsum --help` never imports
torch or transformers) and calls that module's `run()`. Results go to stdout or files; progress
and logs go to stderr. A `LongsumError` becomes one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import sys

import typer

from longsum import __version__
from longsum.console import stderr_console
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


CONVERT_EPILOG = """Examples:

  longsum convert bart-base                              (-> ./lsg-bart-base-4096)

  longsum convert facebook/bart-large-cnn ./lsg-bart-large-cnn-16384 --max-length 16384

  longsum convert ./lsg-bart-base-4096 --max-length 16384  (re-convert: positions only, globals kept)

  longsum convert roberta-base --max-length 4096 --sparsity-type pooling --num-global-tokens 16

  longsum convert flan-t5-base --to longt5-tglobal --max-length 16384

Aliases: bart-base, bart-large, bart-large-cnn, distilbart-cnn-12-6, pegasus-large, mbart-large-cc25,
t5-base, flan-t5-base, roberta-base, bert-base-uncased (Hub ids need the Hub once, then the cache)."""


@app.command(epilog=CONVERT_EPILOG)
def convert(
    source: str = typer.Argument(..., help="Checkpoint folder, Hub id or alias."),
    output_dir: str = typer.Argument(None, help="Where to write [default: ./lsg-NAME-LENGTH]."),
    max_length: int = typer.Option(4096, help="New maximum input length (a multiple of the block size)."),
    block_size: int = typer.Option(None, help="Local block size [default 128]."),
    sparse_block_size: int = typer.Option(None, help="Sparse tokens on each side [default 128]; 0 = none."),
    sparsity_factor: int = typer.Option(None, help="Compression factor of the sparse sequence [default 2]."),
    sparsity_type: str = typer.Option(None, help="norm|pooling|lsh|stride|block_stride|bos_pooling|none [norm]."),
    num_global_tokens: int = typer.Option(None, help="Global tokens, 1..512 [default 1]."),
    pass_global_tokens_to_decoder: bool = typer.Option(
        None, "--pass-global-tokens-to-decoder/--no-pass-global-tokens-to-decoder", help="[default: pass]"
    ),
    mask_first_token: bool = typer.Option(None, "--mask-first-token", help="Hide token 0 (it repeats global 0)."),
    random_global_init: bool = typer.Option(False, "--random-global-init", help="Draw globals from a normal fit."),
    global_stride: int = typer.Option(64, help="Positions between consecutive global tokens."),
    to: str = typer.Option(None, "--to", help="T5 only: longt5-local | longt5-tglobal."),
    seed: int = typer.Option(0, help="Seed for random global initialisation."),
    dtype: str = typer.Option("fp32", help="Saved weights: fp32, bf16, fp16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Convert a short-context checkpoint into a long-context one (LSG, or LongT5 from T5)."""
    from rich.table import Table

    from longsum.convert import ConvertOptions
    from longsum.convert import convert as run_convert

    options = ConvertOptions(
        max_length=max_length, block_size=block_size, sparse_block_size=sparse_block_size,
        sparsity_factor=sparsity_factor, sparsity_type=sparsity_type, num_global_tokens=num_global_tokens,
        pass_global_tokens_to_decoder=pass_global_tokens_to_decoder, mask_first_token=mask_first_token,
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
    console = stderr_console()
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


# Options shared by the commands that generate (summarize, eval): same names, same meaning.
NUM_BEAMS = typer.Option(None, "--num-beams", help="Beam size [default: preset, model's, else 4].")
MAX_NEW_TOKENS = typer.Option(
    None, "--max-new-tokens", help="Longest summary in tokens [default: preset, model's, else 256]."
)
MIN_NEW_TOKENS = typer.Option(
    None, "--min-new-tokens", help="Shortest summary in tokens [default: preset, model's, else 0]."
)
LENGTH_PENALTY = typer.Option(
    None, "--length-penalty", help="Beam length penalty [default: preset, model's, else 1.0]."
)
NO_REPEAT_NGRAM = typer.Option(
    None, "--no-repeat-ngram-size", help="Block repeated n-grams [default: model's, else 3]."
)
BATCH_SIZE = typer.Option(4, "--batch-size", help="Documents per batch (halved on CUDA out-of-memory).")
MAX_SOURCE_LENGTH = typer.Option(None, "--max-source-length", help="Input tokens kept [default: the model's length].")
LONG_INPUT = typer.Option("truncate", "--long-input", help="Documents longer than the model: truncate | chunk.")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda, cuda:1...")
DTYPE = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, else fp32), fp32, bf16, fp16.")
MODEL = typer.Option(
    "ccdv/lsg-bart-base-4096-pubmed", "--model", "-m", envvar="LONGSUM_MODEL", help="Path, Hub id or alias."
)


def _generation(num_beams, max_new_tokens, min_new_tokens, length_penalty, no_repeat_ngram_size, batch_size,
                max_source_length, long_input):  # fmt: skip
    from longsum.generation import GenerationOptions

    return GenerationOptions(num_beams, max_new_tokens, min_new_tokens, length_penalty, no_repeat_ngram_size,
                             batch_size, max_source_length, long_input)  # fmt: skip


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
def summarize(
    inputs: list[str] = typer.Argument(..., help="Text/Markdown/PDF files, folders, '-' for stdin, JSONL/CSV/parquet."),
    output: str = typer.Option("summaries.jsonl", "--output", "-o", help="JSONL output ('-' for stdout)."),
    model: str = MODEL,
    num_beams: int = NUM_BEAMS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    min_new_tokens: int = MIN_NEW_TOKENS,
    length_penalty: float = LENGTH_PENALTY,
    no_repeat_ngram_size: int = NO_REPEAT_NGRAM,
    batch_size: int = BATCH_SIZE,
    max_source_length: int = MAX_SOURCE_LENGTH,
    long_input: str = LONG_INPUT,
    device: str = DEVICE,
    dtype: str = DTYPE,
    glob: str = typer.Option("*.txt,*.md", help="File patterns inside folders (comma-separated, any case)."),
    text_field: str = typer.Option(None, help="Record field with the text [default: text, then article]."),
    id_field: str = typer.Option(None, help="Record field with the id [default: id, else NAME:LINE]."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start over (an output longsum wrote) instead of resuming."
    ),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first document that fails."),
) -> None:
    """Summarize documents into JSONL, one line per document, resumable."""
    from longsum.summarize import SummarizeConfig, run

    options = _generation(num_beams, max_new_tokens, min_new_tokens, length_penalty, no_repeat_ngram_size,
                          batch_size, max_source_length, long_input)  # fmt: skip
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
def eval_(
    dataset: str = typer.Argument(None, help="Alias (pubmed, arxiv, govreport), Hub id, or JSONL/CSV/parquet file."),
    model: str = MODEL,
    split: str = typer.Option("test", help="Dataset split."),
    limit: int = typer.Option(None, help="Score a seeded random subset of N examples."),
    seed: int = typer.Option(0, help="Seed for --limit sampling and the bootstrap."),
    text_column: str = typer.Option(None, help="Column with the document [default: the alias's, else text]."),
    summary_column: str = typer.Option(None, help="Column with the reference [default: the alias's, else summary]."),
    dataset_config: str = typer.Option(None, help="Hub dataset configuration [default: the alias's]."),
    revision: str = typer.Option(None, help="Hub dataset revision (branch, tag or commit)."),
    output_dir: str = typer.Option(None, help="Where results go [default: eval-DATASET-SPLIT-MODEL]."),
    num_beams: int = NUM_BEAMS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    min_new_tokens: int = MIN_NEW_TOKENS,
    length_penalty: float = LENGTH_PENALTY,
    no_repeat_ngram_size: int = NO_REPEAT_NGRAM,
    batch_size: int = BATCH_SIZE,
    max_source_length: int = MAX_SOURCE_LENGTH,
    long_input: str = LONG_INPUT,
    device: str = DEVICE,
    dtype: str = DTYPE,
    compare: str = typer.Option(None, help="Another results.json to compare with."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard earlier predictions in the output dir."),
    list_aliases: bool = typer.Option(False, "--list", help="Show the dataset aliases and their presets."),
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

    options = _generation(num_beams, max_new_tokens, min_new_tokens, length_penalty, no_repeat_ngram_size,
                          batch_size, max_source_length, long_input)  # fmt: skip
    config = EvalConfig(
        dataset=dataset, model=model, split=split, limit=limit, seed=seed, text_column=text_column,
        summary_column=summary_column, config=dataset_config, revision=revision, output_dir=output_dir,
        generation=options, device=device, dtype=dtype, compare=compare, overwrite=overwrite,
    )  # fmt: skip
    raise typer.Exit(run(config))


TRAIN_EPILOG = """Examples:

  longsum train --model ./lsg-bart-base-4096 --dataset pubmed --output-dir runs/pubmed \\
      --per-device-batch-size 8 --gradient-accumulation-steps 4 --bf16 --gradient-checkpointing \\
      --eval-steps 1000 --save-steps 1000                      (the published recipe: lr 8e-5, warmup 10%)

  longsum train --model ./lsg-bart-base-4096 --dataset train.jsonl --eval-dataset dev.jsonl \\
      --output-dir runs/mine --max-steps 2000 --resume

  accelerate launch -m longsum train --config pubmed.yaml          (multi-GPU; same flags)

  torchrun --nproc-per-node 8 -m longsum train --config pubmed.yaml --deepspeed ds_zero2.json

--resume alone continues from the last checkpoint in --output-dir; --resume PATH from that one.
--config FILE (YAML/JSON) sets any option below or any transformers Seq2SeqTrainingArguments field."""


@app.command(epilog=TRAIN_EPILOG)
def train(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", "-m", help="Model to fine-tune (path, Hub id or alias)."),
    dataset: str = typer.Option(None, help="Alias (pubmed, arxiv, govreport), Hub id, or JSONL/CSV/parquet file."),
    output_dir: str = typer.Option(None, help="Checkpoints, log, curves and the final model."),
    config: str = typer.Option(None, "--config", help="YAML/JSON file with more options (unknown keys fail)."),
    eval_dataset: str = typer.Option(None, help="Evaluation data [default: --dataset's validation split]."),
    text_column: str = typer.Option(None, help="Column with the document."),
    summary_column: str = typer.Option(None, help="Column with the reference summary."),
    dataset_config: str = typer.Option(None, help="Hub dataset configuration [default: the alias's]."),
    train_split: str = typer.Option("train", help="Training split."),
    eval_split: str = typer.Option("validation", help="Evaluation split."),
    limit: int = typer.Option(None, help="Use only N training examples (seeded subset)."),
    max_source_length: int = typer.Option(None, help="Input tokens [default: the model's length]."),
    max_target_length: int = typer.Option(512, help="Summary tokens."),
    per_device_batch_size: int = typer.Option(1, help="Batch size per device."),
    gradient_accumulation_steps: int = typer.Option(1, help="Steps accumulated per update."),
    learning_rate: float = typer.Option(8e-5, help="Peak learning rate."),
    lr_scheduler_type: str = typer.Option("linear", help="Scheduler (linear, cosine, constant_with_warmup...)."),
    warmup_ratio: float = typer.Option(0.1, help="Fraction of steps for warmup."),
    num_train_epochs: float = typer.Option(3.0, help="Epochs (ignored when --max-steps is set)."),
    max_steps: int = typer.Option(-1, help="Total optimizer steps (overrides epochs)."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 mixed precision."),
    fp16: bool = typer.Option(False, "--fp16", help="fp16 mixed precision."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Trade compute for memory."),
    eval_steps: int = typer.Option(None, help="Evaluate ROUGE every N steps (keeps the best by rougeLsum)."),
    eval_limit: int = typer.Option(100, help="Evaluation examples."),
    eval_num_beams: int = typer.Option(1, help="Beams when generating for evaluation."),
    save_steps: int = typer.Option(500, help="Checkpoint every N steps."),
    save_total_limit: int = typer.Option(2, help="Checkpoints kept."),
    logging_steps: int = typer.Option(10, help="Log every N steps."),
    resume: str = typer.Option(None, help="Continue training: alone = last checkpoint, or a checkpoint path."),
    seed: int = typer.Option(42, help="Random seed."),
    report_to: str = typer.Option("none", help="none | tensorboard."),
    deepspeed: str = typer.Option(None, help="DeepSpeed config file (passed to the Trainer)."),
    fsdp: str = typer.Option(None, help="FSDP options (passed to the Trainer), e.g. 'full_shard auto_wrap'."),
) -> None:
    """Fine-tune a seq2seq model (LSG, LongT5, BART...) on a summarization dataset."""
    import dataclasses

    from longsum.train import TrainConfig, load_config_file, run

    values = {k: v for k, v in ctx.params.items() if k != "config"}
    if config:  # file values beat defaults; flags given on the command line beat the file
        for key, value in load_config_file(config).items():
            if key == "training_args" or getattr(ctx.get_parameter_source(key), "name", "") != "COMMANDLINE":
                values[key] = value
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "dataset", "output_dir") if not values.get(k)]
    if missing:
        raise LongsumError(f"missing {', '.join(missing)} (on the command line or in --config)")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    run(TrainConfig(**{k: v for k, v in values.items() if k in fields}))


def _optional_values(argv: list[str]) -> list[str]:
    """`--resume` with no value means `--resume auto` (Typer has no optional-value options)."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("auto")
    return out


class _Terminated(BaseException):
    """SIGTERM (a scheduler, `docker stop`, `kill`): stop as Ctrl-C does, through every `finally`
    (records flushed, output closed, lock released). Not an Exception: nothing may take it for a
    failing document."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app(args=_optional_values(sys.argv[1:]))
    except LongsumError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except _Terminated:
        typer.echo("terminated", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
