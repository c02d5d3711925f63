"""`longsum summarize`: files, folders, stdin or records in; one JSON line per document out.

Inputs are streamed (`longsum.inputs`): memory grows with the batch, not the corpus. Every input
document ends with exactly one record in the output, keyed by (`source`, `id`) (see
`longsum.inputs` for how keys are made unique and stable). Records are flushed as documents finish.

The output is a `longsum.store.ResultStore`: rerunning into it skips documents already summarized
and retries those whose record is an error (the newer record replaces the error); it must have been
written by the same model weights and output-changing settings (else a one-line refusal naming the
difference); a file longsum did not write is never touched; a second concurrent run is refused.
A document that cannot be read or summarized gets an `error` record and the others go on. Under
`torchrun`/`accelerate launch` the documents are split between processes and merged into the one output.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from longsum.console import alert, log, note
from longsum.errors import LongsumError
from longsum.generation import GenerationOptions, Result
from longsum.inputs import DEFAULT_GLOB, Document, InputPlan, iter_documents, plan_inputs, printable
from longsum.schema import SummaryRecord
from longsum.settings import RunDtype, device_setting, dtype_setting, model_setting, setting


@dataclass
class SummarizeConfig:
    """Every `longsum summarize` setting (`longsum.settings`): its options and --config are built from these."""

    inputs: list[str] = setting(help="Text/Markdown/PDF files, folders, '-' for stdin, JSONL/CSV/parquet (text, "
                                     "JSONL, CSV may be .gz).", argument=True)  # fmt: skip
    output: str = setting("summaries.jsonl", "The JSONL output file ('-': stdout).", flags=("--output", "-o"))
    model: str = model_setting()
    device: str = device_setting()
    dtype: RunDtype = dtype_setting()
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    glob: str = setting(DEFAULT_GLOB, "File patterns inside folders (comma-separated, any case; '*.txt' also finds "
                        "a.txt.gz). The output and the files longsum keeps beside it are never read from a folder.")  # fmt: skip
    text_field: str | None = setting(None, "Record field with the text (default: text, then article).")
    id_field: str | None = setting(None, "Record field with the id (default: id, else NAME:LINE).")
    overwrite: bool = setting(False, "Start over (an output longsum wrote) instead of resuming.")
    fail_fast: bool = setting(False, "Stop at the first document that fails.")


class _FailFast(Exception):
    pass


def _check_output_is_not_an_input(output: str, plan: InputPlan) -> None:
    if output == "-" or not Path(output).exists():
        return
    out = Path(output).resolve()
    for _, path in plan.items:
        if path is not None and path.exists() and path.resolve() == out:
            raise LongsumError(f"the output {output} is also an input; choose another --output")


def run(cfg: SummarizeConfig) -> int:
    """Summarize `cfg.inputs` into `cfg.output`; returns the exit code (1 if any document failed)."""
    from longsum import __version__, distributed
    from longsum.generation import plan_settings
    from longsum.models import resolve

    # A missing path, or nothing at all to read: error now. The output's own files are left out of
    # folders (a rerun must see the inputs the first run saw); named as an input, the output is refused.
    plan = plan_inputs(cfg.inputs, cfg.glob, output=cfg.output)
    _check_output_is_not_an_input(cfg.output, plan)
    dist = distributed.init()
    device = dist.device(cfg.device)
    # What the output's identity needs, without loading weights: a mismatch is refused before any work.
    # The checkpoint is resolved once: settings, identity and weights all read from it.
    checkpoint = resolve(cfg.model)
    settings = plan_settings(checkpoint, cfg.generation, cfg.dtype, device)
    identity = {"model_fingerprint": checkpoint.fingerprint, **settings}
    info = {"model": cfg.model, "model_path": str(checkpoint.folder.resolve()), "longsum": __version__}
    results = distributed.open_results(cfg.output, identity, dist, info=info, overwrite=cfg.overwrite)
    if dist.main:
        for warning in plan.warnings:
            note(f"warning: {warning}")
        if results.repaired:
            log(f"repaired a torn last line in {cfg.output} (interrupted run)")

    counts: Counter = Counter()
    seen: set = set()  # keys of this run's documents
    start = time.perf_counter()

    def emit(doc: Document, result: Result) -> None:
        record = summary_record(doc, result, cfg.model, chunked=cfg.generation.long_input == "chunk")
        if result.error:
            counts["failed"] += 1
        else:
            counts["done"] += 1
            counts["tokens"] += result.input_tokens
            counts["long"] += bool(result.truncated or result.chunks > 1)
            if counts["long"] == 1 and (result.truncated or result.chunks > 1):
                _note_long(cfg.generation.long_input, settings["max_source_length"])
        results.write(record)
        progress.advance()
        if result.error and cfg.fail_fast:
            raise _FailFast(f"{doc.id}: {result.error}")

    def pending():
        """This rank's documents still to do; errors of reading are emitted as they come."""
        index = 0
        for doc in iter_documents(plan, cfg.text_field, cfg.id_field):
            if doc.key in seen:  # a bug if it happens: keys are made unique by the readers
                raise RuntimeError(f"document key {doc.key} produced twice")
            seen.add(doc.key)
            if doc.key in results.done:
                counts["skipped"] += 1
                continue
            counts["retried"] += doc.key in results.failed
            index += 1
            if not dist.mine(index - 1):
                continue
            if doc.error:
                emit(doc, Result(error=doc.error))
            else:
                yield doc, doc.text

    finished = False
    progress = _Progress()
    try:
        model, tokenizer = _load(cfg, checkpoint, device, settings, dist)
        from longsum.generation import Summarizer

        summarizer = Summarizer(model, tokenizer, cfg.generation, settings)
        with progress:
            summarizer.summarize(pending(), emit)
        finished = True
    except _FailFast as err:
        alert(f"stopped at the first failure (--fail-fast): {err}")
    finally:
        sources = {printable(str(path)) for kind, path in plan.items if kind == "records"}  # as records name them

        def stale(record: dict) -> bool:
            """An error record of a record file read whole in this run, for a key it no longer has
            (a fixed line now has its own id): the document it was about is this run's record."""
            from longsum.store import is_failure, record_key

            return (
                finished and is_failure(record) and record.get("source") in sources and record_key(record) not in seen
            )

        results.close(drop=stale)

    elapsed = max(time.perf_counter() - start, 1e-9)
    if dist.main:
        retried = f", retried {counts['retried']} that had failed" if counts["retried"] else ""
        log(
            f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']}{retried} in "
            f"{elapsed:.1f}s: {counts['done'] / elapsed:.2f} docs/s, {counts['tokens'] / elapsed:,.0f} tokens/s"
            + (f" (this process; {dist.world} processes)" if dist.world > 1 else "")
        )  # fmt: skip
        if plan.unmatched:
            note(f"no file matched '{cfg.glob}' in {', '.join(plan.unmatched)} (exit code 1)")
        if not seen:
            alert("no documents in the inputs")
    if counts["failed"] or plan.unmatched or not seen:
        return 1
    return 0


def summary_record(doc: Document, result: Result, model: str, chunked: bool) -> SummaryRecord:
    """A document's output record (README, "Commands"): its summary, or its error. `chunked`: the
    run summarizes long inputs in chunks (the record then says `chunks`, not `truncated`)."""
    record: dict[str, Any] = {"id": doc.id}
    if doc.source is not None:
        record["source"] = doc.source
    if doc.path is not None:
        record["path"] = doc.path
    record["model"] = model
    if result.error:
        record["error"] = result.error
    else:
        record["summary"] = result.summary
        record["input_tokens"] = result.input_tokens
        if result.chunks > 1 or chunked:
            record["chunks"] = result.chunks
        else:
            record["truncated"] = result.truncated
        record["seconds"] = round(result.seconds, 3)
    if doc.encoding not in (None, "utf-8", "utf-8-sig"):
        record["encoding"] = doc.encoding
    return cast(SummaryRecord, record)  # built key by key to keep the keys' order: a plain dict


def _note_long(mode: str, max_len: int) -> None:
    action = ("split into chunks and summarized whole (map-reduce)" if mode == "chunk" else
              "truncated (use --long-input chunk to summarize them whole)")  # fmt: skip
    note(f"documents longer than {max_len} tokens are {action}; the records say which")


def _load(cfg: SummarizeConfig, checkpoint, device: str, settings: dict, dist):
    from longsum.generation import keep_freed_memory

    model, tokenizer = checkpoint.load(device, cfg.dtype)
    if model.device.type == "cpu":
        keep_freed_memory()  # batched generation on CPU: reuse freed buffers (see its docstring)
    if dist.main:
        shown = ", ".join(f"{k}={v}" for k, v in {**settings, "batch_size": cfg.generation.batch_size}.items())
        log(f"model {cfg.model} on {model.device}; {shown}")
    return model, tokenizer


class _Progress:
    """A live count on a terminal (the total is unknown: inputs are streamed); nothing otherwise."""

    def __init__(self):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from longsum.console import stderr_console

        console = stderr_console()

        self._progress = Progress(SpinnerColumn(), TextColumn("summarized {task.completed}"), TimeElapsedColumn(),
                                  TextColumn("{task.fields[rate]}"), console=console,
                                  disable=not console.is_terminal)  # fmt: skip
        self._task = None
        self._start = time.perf_counter()

    def __enter__(self):
        self._progress.__enter__()
        self._task = self._progress.add_task("docs", total=None, rate="")
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def advance(self) -> None:
        if self._task is None:
            return
        done = self._progress.tasks[0].completed + 1
        rate = f"{done / max(time.perf_counter() - self._start, 1e-9):.2f} docs/s"
        self._progress.update(self._task, advance=1, rate=rate)
