"""The run driver of `summarize` and `eval`: documents in, each document's result out, in one stream.

Both commands resolve their checkpoint and settings, open their result store and decide which
documents are still to do; `summaries` does the rest the same way for both: it loads the weights
once, summarizes the documents with a `Summarizer` (memory bounded by its window), and yields each
document's result as it finishes, counting what happened in the run's `Tally`. A document travels
with its *payload* (summarize's `Document`, eval's `Example`: its id and reference), which only
the command reads, to make the record it writes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from longsum.console import log, note
from longsum.data.inputs import Text
from longsum.model.generation import GenerationOptions, Result, RunSettings


@dataclass
class Tally:
    """What a run's generation did."""

    done: int = 0
    failed: int = 0
    tokens: int = 0  # input tokens of the documents done
    long: int = 0  # documents done that were longer than the model (truncated or chunked)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)  # what the run used (`Summarizer.settings()`)


def summaries(checkpoint, options: GenerationOptions, settings: RunSettings, items: Iterable[tuple[Any, Text | str]],
              tally: Tally, *, device: str, dtype: str, main: bool = True) -> Iterator[tuple[Any, Result]]:  # fmt: skip
    """(payload, result) for each (payload, text) of `items`, as each finishes, summarized with
    `checkpoint`'s model (loaded here, once) under `settings`; `tally` counts them. `main`: this
    process reports (the first rank under a launcher). Stopping early (closing the generator) is fine."""
    from longsum.model.generation import Summarizer, keep_freed_memory

    model, tokenizer = checkpoint.load(device, dtype)
    if model.device.type == "cpu":
        keep_freed_memory()  # batched generation on CPU: reuse freed buffers (see its docstring)
    summarizer = Summarizer(model, tokenizer, options, settings)
    tally.settings = summarizer.settings()
    if main:
        log(f"model {checkpoint.name} on {model.device}; {', '.join(f'{k}={v}' for k, v in tally.settings.items())}")
    start = time.perf_counter()
    try:
        with _Progress() as progress:
            for payload, result in summarizer.summarize(items):
                _count(tally, result, settings, main)
                yield payload, result
                progress.advance()
    finally:
        tally.seconds = time.perf_counter() - start


def _count(tally: Tally, result: Result, settings: RunSettings, main: bool) -> None:
    if result.error:
        tally.failed += 1
        return
    tally.done += 1
    tally.tokens += result.input_tokens
    if result.truncated or result.chunks > 1:
        tally.long += 1
        if tally.long == 1 and main:
            _note_long(settings.long_input, settings.max_source_length)


def _note_long(mode: str, max_len: int) -> None:
    action = ("split into chunks and summarized whole (map-reduce)" if mode == "chunk" else
              "truncated (use --long-input chunk to summarize them whole)")  # fmt: skip
    note(f"documents longer than {max_len} tokens are {action}; the records say which")


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
