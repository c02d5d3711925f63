"""Batched summary generation shared by `summarize` and `eval`.

`Summarizer` turns a stream of (key, text) pairs into summaries with `model.generate`, with memory
bounded by a window of documents, never by the corpus or a document's size:

* documents are taken in windows (`window_docs` documents or `window_chars` characters of text in
  memory); each window is tokenized, sorted by length and batched, so padding stays small;
* only a prefix of each text is read and tokenized: about `PREFIX_CHARS_PER_TOKEN` characters per
  token the model can read (more when a prefix turns out too short), and it must reach a few tokens
  past the model's length, so a truncated input is exactly what truncating the whole text gives;
* on CUDA out-of-memory the batch is halved and retried; a batch that fails for another reason is
  retried one document at a time, so one bad document never takes the others down;
* documents longer than the model are truncated, or (`long_input="chunk"`) split at sentence
  boundaries into overlapping windows (in linear time) that are summarized in batches, then the
  joined partial summaries are summarized again (map-reduce) until one summary remains.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

from longsum.data.inputs import DocumentError, StringText, Text
from longsum.data.text import sentence_windows
from longsum.errors import DeviceLostError, LongsumError, describe
from longsum.registry import LONG_INPUT_MODES, UNBOUNDED_POSITIONS
from longsum.settings import check, setting

GENERATION = "Generation"  # the help panel of these options
# Used when neither the command line nor the model's generation_config sets a value.
GENERATION_DEFAULTS = {"num_beams": 4, "max_new_tokens": 256, "min_new_tokens": 0, "length_penalty": 1.0,
                       "no_repeat_ngram_size": 3}  # fmt: skip
MAX_REDUCE_ROUNDS = 3
PREFIX_CHARS_PER_TOKEN = 8  # first guess of the characters needed per token (English BPE: ~4.5)
TRUNCATION_MARGIN = 16  # tokens a prefix must hold beyond the model's length (tokenization is local)
WINDOW_DOCS = 256
WINDOW_CHARS = 32 << 20


def _default_help(what: str, key: str, preset: bool = True) -> str:
    """'WHAT (default: the preset's, the model's, else N).' with N from GENERATION_DEFAULTS."""
    source = "the preset's, the model's" if preset else "the model's"  # (no preset sets no_repeat_ngram_size)
    return f"{what} (default: {source}, else {GENERATION_DEFAULTS[key]})."


@dataclass
class GenerationOptions:
    """Generation settings of `summarize` and `eval`, defined once (`longsum.settings`): both
    commands' options are built from these fields. None means "the preset's, else the model's
    generation_config, else our default" (`resolve_generation_kwargs`)."""

    num_beams: int | None = setting(None, _default_help("Beam size", "num_beams"), GENERATION, low=1)
    max_new_tokens: int | None = setting(None, _default_help("Longest summary in tokens", "max_new_tokens"),
                                         GENERATION, low=1)  # fmt: skip
    min_new_tokens: int | None = setting(None, _default_help("Shortest summary in tokens", "min_new_tokens"),
                                         GENERATION, low=0)  # fmt: skip
    length_penalty: float | None = setting(None, _default_help("Beam length penalty", "length_penalty"), GENERATION)
    no_repeat_ngram_size: int | None = setting(None, _default_help("Block repeated n-grams of this size; 0 = off",
                                                                   "no_repeat_ngram_size", preset=False),
                                               GENERATION, low=0)  # fmt: skip
    batch_size: int = setting(4, "Documents per batch (halved on CUDA out-of-memory).", GENERATION, low=1)
    max_source_length: int | None = setting(None, "Input tokens kept (default: the model's length).", GENERATION,
                                            low=1)  # fmt: skip
    long_input: Literal[LONG_INPUT_MODES] = setting("truncate", "Documents longer than the model: cut them, or "
                                                    "summarize them whole (map-reduce).", GENERATION)  # fmt: skip
    exact: bool = setting(False, "On CPU, keep torch's own matrix kernels: the token ids of transformers' "
                                 "generate(), but decoding ~1.2-1.6x slower than "
                                 "with the kernels measured fastest on this CPU (oneDNN's round differently, so a "
                                 "near-tie can go the other way).", GENERATION)  # fmt: skip
    compile: bool = setting(False, "Compile each decoding step with torch.compile (CUDA graphs on a GPU); each "
                                   "new batch shape compiles first (seconds to minutes). Not faster on CPU at base "
                                   "size. Steps aside to eager decoding where it cannot compile.",
                            GENERATION)  # fmt: skip

    def __post_init__(self) -> None:
        check(self)
        low, high = self.min_new_tokens, self.max_new_tokens
        if low is not None and high is not None and low > high:
            raise LongsumError(f"--min-new-tokens ({low}) is more than --max-new-tokens ({high}); lower one of them")


@dataclass
class Result:
    """One document's outcome (`summary` or `error`).

    `input_tokens` counts the tokens the model read (all of the document's tokens when chunked).
    """

    summary: str | None = None
    input_tokens: int = 0
    truncated: bool = False
    chunks: int = 1
    seconds: float = 0.0
    error: str | None = None


@dataclass
class _Job:
    key: object
    ids: array
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


def device_lost(device) -> str | None:
    """Why `device` can run nothing more in this process, or None when it still works.

    Some CUDA errors (a device-side assert, an illegal memory access) are sticky: the context is
    poisoned and every later kernel fails. A failed batch is followed by this probe (one tiny op and
    a copy back, which synchronizes) so that such a run stops at once instead of writing an error
    record for every remaining document. A CPU cannot be poisoned so.
    """
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return None
    try:
        torch.ones(1, device=device).add_(1).cpu()
    except Exception as err:  # noqa: BLE001  any failure here means the device is gone
        return describe(err)
    return None


def _config_positions(config) -> int | None:
    """The encoder positions its config names (None: it names none); an encoder-decoder whose config
    nests the encoder's names them there (T5Gemma: `encoder`, T5Gemma 2: `encoder.text_config`)."""
    for nested in ("encoder", "text_config"):
        inner = getattr(config, nested, None)
        if hasattr(inner, "to_dict"):  # a config object
            config = inner
    for name in ("max_encoder_position_embeddings", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_max_source_length(config, tokenizer) -> int:
    """The longest input the model accepts, from its config (positions) or its tokenizer."""
    positions = _config_positions(config)
    if positions and config.model_type not in ("t5", "mt5", "longt5"):
        return positions
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return 16384 if config.model_type == "longt5" else 512  # relative positions: the trained length


def position_limit(config) -> int | None:
    """The rows of the model's encoder position table: an input longer than this fails. None where
    positions are unbounded (`registry.UNBOUNDED_POSITIONS`) or the config does not say."""
    return None if config.model_type in UNBOUNDED_POSITIONS else _config_positions(config)


def minimum_gives_way(options: GenerationOptions, minimum: int | None) -> bool:
    """Whether a minimum length you did not choose (a dataset preset's, the model's) is dropped: you
    chose a shorter maximum, and keeping it would force every summary to that maximum's length."""
    chosen_max = options.max_new_tokens
    return options.min_new_tokens is None and chosen_max is not None and minimum is not None and minimum > chosen_max


def resolve_generation_kwargs(generation_config, options: GenerationOptions) -> dict:
    """Command line > the model's own generation_config (when it sets a value) > our defaults."""
    from transformers import GenerationConfig

    own, stock = generation_config, GenerationConfig()
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
    low, high = kwargs["min_new_tokens"], kwargs["max_new_tokens"]
    if low > high:  # dropped where it gives way to your maximum, else clamped as generate() would
        kwargs["min_new_tokens"] = GENERATION_DEFAULTS["min_new_tokens"] if minimum_gives_way(options, low) else high
    kwargs["do_sample"] = False
    return kwargs


@dataclass(frozen=True)
class RunSettings:
    """Every setting that decides the summaries: what a result file's identity compares.

    `generate`: the keyword arguments of `generate()`; the rest is how the inputs are cut
    (`max_source_length`, `long_input`), the CPU kernels (`exact`), compiled decoding (`compile`) and
    the dtype the weights run in (None when the settings come from a loaded model). The batch size
    is not here: it does not change the summaries.
    """

    generate: dict
    max_source_length: int
    long_input: str
    exact: bool
    compile: bool = False
    dtype: str | None = None

    def as_dict(self) -> dict:
        """The flat form outputs and their sidecars have always had (so older outputs still resume):
        "compile" only when on, "dtype" only when known."""
        return {**self.generate, "max_source_length": self.max_source_length, "long_input": self.long_input,
                "exact": self.exact, **({"compile": True} if self.compile else {}),
                **({"dtype": self.dtype} if self.dtype else {})}  # fmt: skip


def resolve_settings(config, generation_config, tokenizer, options: GenerationOptions) -> RunSettings:
    """The run's `RunSettings`, from the config objects alone, so a run can be checked against an
    existing output before any weights are loaded. A `max_source_length` past the model's position
    table is refused here, before any document (each would fail on its own)."""
    limit = position_limit(config)
    if options.max_source_length and limit and options.max_source_length > limit:
        raise LongsumError(f"--max-source-length {options.max_source_length} is more than the model's {limit} "
                           f"positions; use at most {limit} (--long-input chunk reads longer documents in "
                           f"windows)")  # fmt: skip
    return RunSettings(resolve_generation_kwargs(generation_config, options),
                       options.max_source_length or model_max_source_length(config, tokenizer),
                       options.long_input, options.exact, options.compile)  # fmt: skip


def plan_settings(checkpoint, options: GenerationOptions, dtype: str, device: str) -> RunSettings:
    """`resolve_settings` for a checkpoint plus the dtype it will run in, without its weights.

    `checkpoint` is a `longsum.model.checkpoint.Checkpoint` (a run's, resolved once), or a name to resolve.
    """
    from longsum.model.checkpoint import Checkpoint, dtype_name, resolve, resolve_device

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = resolve(checkpoint)
    settings = resolve_settings(checkpoint.config, checkpoint.generation_config, checkpoint.tokenizer, options)
    return replace(settings, dtype=dtype_name(dtype, resolve_device(device)))


class Summarizer:
    """Summaries for many documents with one model; see the module docstring. Batches decode with
    `longsum.model.decoding.generate` (stock generate's decoding, keys/values shared between beams; on CPU
    the kernels measured fastest on this machine unless `exact`).

    `settings` (a `RunSettings`, from `plan_settings`/`resolve_settings`) may be passed when already
    resolved; by default they are resolved from the model's config and generation config.
    """

    def __init__(self, model, tokenizer, options: GenerationOptions, settings: RunSettings | None = None, *,
                 window_docs: int = WINDOW_DOCS, window_chars: int = WINDOW_CHARS):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.run_settings = settings or resolve_settings(model.config, model.generation_config, tokenizer, options)
        self.max_source_length = self.run_settings.max_source_length
        self.batch_size = options.batch_size
        self.window_docs, self.window_chars = window_docs, window_chars
        self._n_special = tokenizer.num_special_tokens_to_add(pair=False)
        self._batch_size_asked = options.batch_size

    def settings(self) -> dict:
        """What this run uses (printed at start, saved with results)."""
        return {**self.run_settings.as_dict(), "batch_size": self._batch_size_asked}

    # -- public -----------------------------------------------------------------------------
    def summarize(self, items: Iterable[tuple[object, Text | str]]) -> Iterator[tuple[object, Result]]:
        """(key, result) for each of the (key, text) pairs of `items`, as each document finishes.

        `items` is consumed lazily, one window at a time; a text is a `str` or a `longsum.data.inputs.Text`
        (read only as far as needed). A text that cannot be read gets a Result with its `error`.
        On CPU the kernels are chosen and the linear layers packed, where packing was measured faster
        (`longsum.model.decoding.linear_kernels`), once for the whole run, not once per batch.
        """
        from longsum.model.decoding import linear_kernels

        rows = self.batch_size * (self.run_settings.generate.get("num_beams") or 1)  # a decoding step's
        with linear_kernels(self.model, self.run_settings.exact, rows):
            for window in self._windows(items):
                jobs, long_docs, failed = self._prepare(window)
                del window  # the texts are no longer needed (except those to chunk)
                yield from failed
                for job in self._run(jobs):
                    yield job.key, job.result
                for key, text in long_docs:
                    yield key, self._summarize_long(text)

    # -- internals --------------------------------------------------------------------------
    def _windows(self, items: Iterable[tuple[object, Text | str]]) -> Iterator[list[tuple[object, Text]]]:
        window: list[tuple[object, Text]] = []
        chars = 0
        for key, text in items:
            text = StringText(text) if isinstance(text, str) else text
            window.append((key, text))
            chars += text.chars_in_memory
            if len(window) >= self.window_docs or chars >= self.window_chars:
                yield window
                window, chars = [], 0
        if window:
            yield window

    def _count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def _prepare(self, window) -> tuple[list[_Job], list[tuple[object, Text]], list[tuple[object, Result]]]:
        """Token ids (truncated) for the window's documents; documents to chunk are set aside, and
        those that cannot be read or are empty get their (key, error result)."""
        max_len = self.max_source_length
        needed = max_len - self._n_special + TRUNCATION_MARGIN  # tokens a prefix must reach
        budget = max_len * PREFIX_CHARS_PER_TOKEN
        keys, texts, complete, sources, failed = [], [], [], [], []
        for key, text in window:
            try:
                prefix, whole = text.read(budget)
            except DocumentError as err:
                failed.append((key, Result(error=str(err))))
                continue
            keys.append(key)
            texts.append(prefix)
            complete.append(whole)
            sources.append(text)
        counts = self._count(texts)
        for i in range(len(texts)):  # rare: a prefix too short (long runs of spaces, symbols...)
            size = budget
            while not complete[i] and counts[i] < needed:
                size *= 4
                try:
                    texts[i], complete[i] = sources[i].read(size)
                except DocumentError as err:
                    texts[i], complete[i], counts[i] = "", True, -1
                    failed.append((keys[i], Result(error=str(err))))
                    break
                counts[i] = self._count([texts[i]])[0]
        jobs, long_docs, keep = [], [], []
        for i, n in enumerate(counts):
            if n < 0:
                continue
            if n == 0:
                failed.append((keys[i], Result(error="empty document")))
                continue
            too_long = n + self._n_special > max_len
            if too_long and self.run_settings.long_input == "chunk":
                long_docs.append((keys[i], sources[i]))
            else:
                keep.append((i, too_long))
        if keep:
            ids = self.tokenizer([texts[i] for i, _ in keep], truncation=True, max_length=max_len,
                                 verbose=False)["input_ids"]  # fmt: skip
            for (i, too_long), doc_ids in zip(keep, ids):
                jobs.append(_Job(keys[i], array("i", doc_ids), Result(input_tokens=len(doc_ids), truncated=too_long)))
        return jobs, long_docs, failed

    def _tokenize(self, texts: list[str]) -> list[array]:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_source_length, verbose=False)["input_ids"]
        return [array("i", x) for x in ids]

    def _summarize_long(self, text: Text) -> Result:
        """Map-reduce over sentence-aligned windows until one summary remains."""
        start = time.perf_counter()
        try:
            full, _ = text.read(None)
        except DocumentError as err:
            return Result(error=str(err))
        stats: dict = {}
        chunks, n_tokens = 0, 0
        for _ in range(MAX_REDUCE_ROUNDS):
            parts = []
            windows = sentence_windows(full, self.tokenizer, self.max_source_length, stats=stats)
            while group := [w for _, w in zip(range(self.window_docs), windows)]:
                jobs = [_Job(k, ids) for k, ids in enumerate(self._tokenize(group))]
                done = sorted(self._run(jobs), key=lambda job: job.key)
                failed = next((job.result.error for job in done if job.result.error), None)
                if failed:
                    return Result(input_tokens=n_tokens or stats.get("tokens", 0), chunks=chunks, error=failed)
                parts += [job.result.summary for job in done]
            if not n_tokens:
                chunks, n_tokens = len(parts), stats.get("tokens", 0)
            if len(parts) == 1:
                return Result(parts[0], n_tokens, chunks=chunks, seconds=time.perf_counter() - start)
            full = "\n".join(parts)
        # Still too long after the last round: summarize the (truncated) joined summaries once more.
        (job,) = self._run([_Job(0, self._tokenize([full])[0])])
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
                if (lost := device_lost(self.model.device)) is not None:  # no later document could run either
                    raise DeviceLostError(
                        f"the {self.model.device} device stopped working ({lost}) after generation failed with"
                        f" {describe(err)}; rerun the same command to resume: the records written so far are kept"
                    ) from err
                if len(batch) > 1:
                    for job in batch:
                        yield from self._run_alone(job)
                else:
                    batch[0].result.error = f"generation failed: {describe(err)}"
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

        from longsum.model.decoding import generate

        batch = {"input_ids": [ids.tolist() for ids in batch_ids]}
        inputs = self.tokenizer.pad(batch, return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            settings = self.run_settings
            out = generate(self.model, inputs["input_ids"], inputs["attention_mask"], exact=settings.exact,
                           compile=settings.compile, **settings.generate)  # fmt: skip
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
