"""Batched summary generation shared by `summarize` and `eval`.

`Summarizer` turns (key, text) pairs into summaries with `model.generate`:
* documents are tokenized once, sorted by length and batched (padding stays small);
* on CUDA out-of-memory the batch is halved and retried; a batch that fails for another reason is
  retried one document at a time, so one bad document never takes the others down;
* documents longer than the model are truncated, or (`long_input="chunk"`) split at sentence
  boundaries into overlapping windows that are summarized separately, then the joined partial
  summaries are summarized again (map-reduce) until one summary remains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from longsum.errors import LongsumError
from longsum.text import sentence_windows

LONG_INPUT_MODES = ("truncate", "chunk")
# Used when neither the command line nor the model's generation_config sets a value.
GENERATION_DEFAULTS = {"num_beams": 4, "max_new_tokens": 256, "min_new_tokens": 0, "length_penalty": 1.0,
                       "no_repeat_ngram_size": 3}  # fmt: skip
MAX_REDUCE_ROUNDS = 3


@dataclass
class GenerationOptions:
    """Generation settings; None means "the model's generation_config, else our default"."""

    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    batch_size: int = 4
    max_source_length: int | None = None
    long_input: str = "truncate"

    def __post_init__(self) -> None:
        if self.long_input not in LONG_INPUT_MODES:
            raise LongsumError(f"--long-input must be one of {', '.join(LONG_INPUT_MODES)}, got '{self.long_input}'")
        if self.batch_size < 1:
            raise LongsumError(f"--batch-size must be >= 1, got {self.batch_size}")
        for name in ("num_beams", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LongsumError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


@dataclass
class Result:
    """One document's outcome (`summary` or `error`)."""

    summary: str | None = None
    input_tokens: int = 0
    truncated: bool = False
    chunks: int = 1
    seconds: float = 0.0
    error: str | None = None


@dataclass
class _Job:
    key: object
    ids: list[int]
    result: Result = field(default_factory=Result)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS at once.

    By default glibc serves big tensors with mmap and unmaps them when freed, so batched
    generation on CPU page-faults through fresh memory at every decoding step (measured: batched
    beam search 2x slower than needed). This raises the mmap and trim thresholds for the process,
    as the MALLOC_*_ environment variables would. Linux/glibc only; returns whether it applied.
    The commands call it for CPU runs; it is process-wide, so library users opt in.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl...)
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)
                and libc.mallopt(m_top_pad, 1 << 28))  # fmt: skip


def beam_cache():
    """An encoder-decoder cache whose beam reordering leaves the cross-attention part alone.

    Beam search reorders the cache at every step, but beams only move within their own document,
    and all beams of a document hold the same cross-attention keys/values (its encoder output):
    reordering them is an identity that copies [batch*beams, heads, source_len, d] per layer per
    step. Skipping it is exact and saves most of the decoding memory traffic on long inputs.
    """
    from transformers import DynamicCache, EncoderDecoderCache

    class SelfOnlyReorderCache(EncoderDecoderCache):
        def reorder_cache(self, beam_idx):
            self.self_attention_cache.reorder_cache(beam_idx)

    return SelfOnlyReorderCache(DynamicCache(), DynamicCache())


def model_max_source_length(model, tokenizer) -> int:
    """The longest input the model accepts, from its config (positions) or its tokenizer."""
    config = model.config
    for name in ("max_encoder_position_embeddings", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0 and config.model_type not in ("t5", "mt5", "longt5"):
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return 16384 if config.model_type == "longt5" else 512  # relative positions: the trained length


def resolve_generation_kwargs(model, options: GenerationOptions) -> dict:
    """Command line > the model's own generation_config (when it sets a value) > our defaults."""
    from transformers import GenerationConfig

    own, stock = model.generation_config, GenerationConfig()
    kwargs = {}
    for name, default in GENERATION_DEFAULTS.items():
        value = getattr(options, name)
        if value is None:
            model_value = getattr(own, name, None)
            if name == "max_new_tokens" and model_value is None and own.max_length != stock.max_length:
                model_value = own.max_length  # older checkpoints set max_length (decoder length)
            if name == "min_new_tokens" and model_value is None and own.min_length != stock.min_length:
                model_value = own.min_length
            if model_value is not None and model_value != getattr(stock, name, None):
                value = model_value
        kwargs[name] = default if value is None else value
    kwargs["min_new_tokens"] = min(kwargs["min_new_tokens"], kwargs["max_new_tokens"])
    kwargs["do_sample"] = False
    return kwargs


class Summarizer:
    """Summaries for many documents with one model; see the module docstring."""

    def __init__(self, model, tokenizer, options: GenerationOptions):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.max_source_length = options.max_source_length or model_max_source_length(model, tokenizer)
        self.generate_kwargs = resolve_generation_kwargs(model, options)
        self.batch_size = options.batch_size

    def settings(self) -> dict:
        """What this run uses (printed at start, saved with results)."""
        return {**self.generate_kwargs, "batch_size": self.options.batch_size,
                "max_source_length": self.max_source_length, "long_input": self.options.long_input}  # fmt: skip

    # -- public -----------------------------------------------------------------------------
    def summarize(self, items: Iterable[tuple[object, str]], on_result: Callable[[object, Result], None],
                  on_plan: Callable[[int], None] | None = None) -> None:  # fmt: skip
        """Summarize (key, text) pairs; `on_result(key, result)` is called as each document finishes.

        `on_plan(n)` is told, before any generation, how many documents exceed the model's length.
        """
        items = list(items)
        if not items:
            return
        full = self._tokenize([text for _, text in items], truncate=False)
        lengths = [len(ids) for ids in full]
        long = [i for i, n in enumerate(lengths) if n > self.max_source_length]
        if on_plan is not None:
            on_plan(len(long))

        to_chunk = set(long) if self.options.long_input == "chunk" else set()
        truncated = {}  # only documents over the length are tokenized again (with truncation)
        if long and not to_chunk:
            truncated = dict(zip(long, self._tokenize([items[i][1] for i in long], truncate=True)))
        jobs = [
            _Job(key, truncated.get(i, ids), Result(input_tokens=lengths[i], truncated=i in truncated))
            for i, ((key, _), ids) in enumerate(zip(items, full))
            if i not in to_chunk
        ]
        for job in self._run(jobs):
            on_result(job.key, job.result)
        for i in sorted(to_chunk):
            on_result(items[i][0], self._summarize_long(items[i][1], lengths[i]))

    # -- internals --------------------------------------------------------------------------
    def _tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(
            texts, truncation=truncate, max_length=self.max_source_length if truncate else None, verbose=False
        )["input_ids"]

    def _summarize_long(self, text: str, n_tokens: int) -> Result:
        """Map-reduce over sentence-aligned windows until one summary remains."""
        start = time.perf_counter()
        chunks = 0
        for _ in range(MAX_REDUCE_ROUNDS):
            windows = sentence_windows(text, self.tokenizer, self.max_source_length)
            chunks = chunks or len(windows)
            jobs = [_Job(k, ids) for k, ids in enumerate(self._tokenize(windows, truncate=True))]
            done = sorted(self._run(jobs), key=lambda job: job.key)
            failed = next((job.result.error for job in done if job.result.error), None)
            if failed:
                return Result(input_tokens=n_tokens, chunks=chunks, error=failed)
            parts = [job.result.summary for job in done]
            if len(parts) == 1:
                return Result(parts[0], n_tokens, chunks=chunks, seconds=time.perf_counter() - start)
            text = "\n".join(parts)
        # Still too long after the last round: summarize the (truncated) joined summaries once more.
        (job,) = self._run([_Job(0, self._tokenize([text], truncate=True)[0])])
        job.result.input_tokens, job.result.chunks = n_tokens, chunks
        job.result.seconds = time.perf_counter() - start
        return job.result

    def _run(self, jobs: list[_Job]) -> Iterable[_Job]:
        """Generate for jobs in length-sorted batches, yielding each job as its batch finishes."""
        import torch

        jobs = sorted(jobs, key=lambda job: len(job.ids), reverse=True)
        i = 0
        while i < len(jobs):
            batch = jobs[i : i + self.batch_size]
            start = time.perf_counter()
            try:
                summaries = self._generate([job.ids for job in batch])
            except torch.OutOfMemoryError:
                if len(batch) == 1:
                    batch[0].result.error = "out of memory even alone: lower --max-source-length or use a smaller model"
                    yield batch[0]
                    i += 1
                    continue
                self.batch_size = max(1, len(batch) // 2)  # halve and retry the same documents
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            except Exception as err:  # noqa: BLE001  isolate the failing document
                if len(batch) > 1:
                    for job in batch:
                        yield from self._run_alone(job)
                else:
                    batch[0].result.error = f"generation failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    yield batch[0]
                i += len(batch)
                continue
            seconds = (time.perf_counter() - start) / len(batch)
            for job, summary in zip(batch, summaries):
                job.result.summary, job.result.seconds = summary, seconds
                yield job
            i += len(batch)

    def _run_alone(self, job: _Job) -> Iterable[_Job]:
        saved, self.batch_size = self.batch_size, 1
        try:
            yield from self._run([job])
        finally:
            self.batch_size = saved

    def _generate(self, batch_ids: list[list[int]]) -> list[str]:
        import torch

        inputs = self.tokenizer.pad({"input_ids": batch_ids}, return_tensors="pt").to(self.model.device)
        cache = beam_cache() if self.model.config.is_encoder_decoder and self.generate_kwargs["num_beams"] > 1 else None
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generate_kwargs, **({"past_key_values": cache} if cache else {}))
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
