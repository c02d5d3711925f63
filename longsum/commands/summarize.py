"""`longsum summarize`: files, folders, stdin or records in; one JSON line per document out.

Inputs are streamed (`longsum.data.inputs`): memory grows with the batch, not the corpus. Every input
document ends with exactly one record in the output, keyed by (`source`, `id`) (see
`longsum.data.inputs` for how keys are made unique and stable). Records are flushed as documents finish.

The output is a `longsum.data.store.ResultStore`: rerunning into it skips documents already summarized
and retries those whose record is an error (the newer record replaces the error); it must have been
written by the same model weights and output-changing settings (else a one-line refusal naming the
difference); a file longsum did not write is never touched; a second concurrent run is refused.
A document that cannot be read or summarized gets an `error` record and the others go on. Under
`torchrun`/`accelerate launch` the documents are split between processes and merged into the one output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from longsum.console import alert, log, note
from longsum.data.inputs import (
    DEFAULT_GLOB,
    Document,
    InputPlan,
    Text,
    UnreadableText,
    iter_documents,
    plan_inputs,
    printable,
)
from longsum.data.schema import SummaryRecord
from longsum.errors import LongsumError
from longsum.model.generation import GenerationOptions, Result
from longsum.registry import DEFAULT_MODEL
from longsum.settings import Command, RunDtype, device_setting, dtype_setting, model_setting, setting


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


def _check_output_is_not_an_input(output: str, plan: InputPlan) -> None:
    if output == "-" or not Path(output).exists():
        return
    out = Path(output).resolve()
    for _, path in plan.items:
        if path is not None and path.exists() and path.resolve() == out:
            raise LongsumError(f"the output {output} is also an input; choose another --output")


def run(cfg: SummarizeConfig) -> int:
    """Summarize `cfg.inputs` into `cfg.output`; returns the exit code (1 if any document failed)."""
    from longsum import __version__
    from longsum.commands.driver import Tally, summaries
    from longsum.data import distributed
    from longsum.model.checkpoint import resolve
    from longsum.model.generation import plan_settings

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
    identity = {"model_fingerprint": checkpoint.fingerprint, **settings.as_dict()}
    info = {"model": cfg.model, "model_path": str(checkpoint.folder.resolve()), "longsum": __version__}
    results = distributed.open_results(cfg.output, identity, dist, info=info, overwrite=cfg.overwrite)
    if dist.main:
        for warning in plan.warnings:
            note(f"warning: {warning}")
        if results.repaired:
            log(f"repaired a torn last line in {cfg.output} (interrupted run)")

    todo = _ToDo(plan, cfg, results, dist)
    chunked = cfg.generation.long_input == "chunk"
    tally, finished = Tally(), False
    try:
        for doc, result in summaries(checkpoint, cfg.generation, settings, todo, tally, device=device, dtype=cfg.dtype,
                                     main=dist.main):  # fmt: skip
            results.write(summary_record(doc, result, cfg.model, chunked))
            if result.error and cfg.fail_fast:
                alert(f"stopped at the first failure (--fail-fast): {doc.id}: {result.error}")
                break
        else:
            finished = True
    finally:
        results.close(drop=todo.stale if finished else None)

    if dist.main:
        _report(cfg, plan, todo, tally, dist.world)
    return 1 if tally.failed or plan.unmatched or not todo.seen else 0


class _ToDo:
    """This rank's documents still to do, as (document, text) pairs, streamed from the inputs; counts
    what it skips (done in an earlier run) and retries (failed in an earlier run)."""

    def __init__(self, plan: InputPlan, cfg: SummarizeConfig, results, dist):
        self.plan, self.cfg, self.results, self.dist = plan, cfg, results, dist
        self.seen: set = set()  # keys of this run's documents
        self.skipped = self.retried = 0
        self._sources = {printable(str(path)) for kind, path in plan.items if kind == "records"}  # as records say

    def __iter__(self) -> Iterator[tuple[Document, Text]]:
        index = 0
        for doc in iter_documents(self.plan, self.cfg.text_field, self.cfg.id_field):
            if doc.key in self.seen:  # a bug if it happens: keys are made unique by the readers
                raise RuntimeError(f"document key {doc.key} produced twice")
            self.seen.add(doc.key)
            if doc.key in self.results.done:
                self.skipped += 1
                continue
            self.retried += doc.key in self.results.failed
            index += 1
            if self.dist.mine(index - 1):
                yield doc, UnreadableText(doc.error) if doc.error else doc.text

    def stale(self, record: dict) -> bool:
        """An error record of a record file read whole in this run, for a key it no longer has (a
        fixed line now has its own id): the document it was about has this run's record."""
        from longsum.data.store import is_failure, record_key

        return is_failure(record) and record.get("source") in self._sources and record_key(record) not in self.seen


def _report(cfg: SummarizeConfig, plan: InputPlan, todo: _ToDo, tally, world: int) -> None:
    """The run's last lines: what was done, how fast, and what made the exit code 1."""
    seconds = max(tally.seconds, 1e-9)
    retried = f", retried {todo.retried} that had failed" if todo.retried else ""
    log(f"done {tally.done}, skipped {todo.skipped}, failed {tally.failed}{retried} in {seconds:.1f}s: "
        f"{tally.done / seconds:.2f} docs/s, {tally.tokens / seconds:,.0f} tokens/s"
        + (f" (this process; {world} processes)" if world > 1 else ""))  # fmt: skip
    if plan.unmatched:
        note(f"no file matched '{cfg.glob}' in {', '.join(plan.unmatched)} (exit code 1)")
    if not todo.seen:
        alert("no documents in the inputs")


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


EXAMPLES = f"""Examples:

  longsum summarize paper.txt                          (default model: {DEFAULT_MODEL})

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

COMMAND = Command(
    "summarize",
    SummarizeConfig,
    run,
    examples=EXAMPLES,
    help="Summarize documents into JSONL, one line per document, resumable.",
)
