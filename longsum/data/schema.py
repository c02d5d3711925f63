"""The shapes of what longsum writes, in code: `results.json` and the records of `predictions.jsonl`
(`longsum eval`, documented in docs/eval-results.md) and the records of `longsum summarize`
(README, "Commands").

These are `TypedDict`s: type checkers hold the code that builds the outputs to them, and at run time
the outputs stay plain dicts (nothing here is called while a command runs). A key that a record
may lack is `NotRequired`; a record that is either a result or an error is a `Union` of the two.
`tests/test_schema.py` checks them against the documentation and against real outputs.
No torch here: importing this module is cheap.
"""

import sys
from typing import Any, Literal

if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict
else:  # NotRequired is 3.11's; typing_extensions (a dependency of torch and typer) has it before
    from typing_extensions import NotRequired, TypedDict

# Not `from __future__ import annotations`: under it `typing.TypedDict` of Python < 3.13 reads
# `NotRequired[...]` as a plain (required) key.

# ----------------------------------------------------------------------- results.json (longsum eval)


class Interval(TypedDict):
    """One ROUGE type: the mean over scored examples (F1 x 100) and its bootstrap 95% interval."""

    mean: float
    low: float
    high: float


class Metrics(TypedDict):
    rouge1: Interval
    rouge2: Interval
    rougeL: Interval
    rougeLsum: Interval


class Excluded(TypedDict):
    """Examples left out before generation."""

    count: int
    reasons: dict[str, int]  # reason -> count
    first_ids: list[str]


class Throughput(TypedDict):
    """This run's generation (0 and None when everything was resumed)."""

    examples: int
    input_tokens: int
    seconds: float
    examples_per_s: float | None


class ModelIdentity(TypedDict):
    name: str
    resolved: str
    path: str
    model_type: str
    fingerprint: str  # sha256 of weights, config and tokenizer files, 16 hex digits


class Timings(TypedDict):
    started: str  # ISO 8601, UTC
    finished: str
    seconds: float


class ExtraMetricConfig(TypedDict):
    """How a `--metric` was loaded and computed."""

    module: str  # the evaluate module's name
    source: Literal["local script", "Hugging Face Hub"]
    path: str  # the script's resolved path, or the Hub name as given
    script_sha256: str  # of the script evaluate imported (the Hub's cached copy for a Hub metric)
    evaluate: str  # evaluate's version
    load_args: dict[str, Any]  # evaluate.load's keyword arguments
    compute_args: dict[str, Any]  # the metric's compute arguments (--metric-args)


class ExtraMetricResult(TypedDict):
    """One `--metric`: what its `compute` returned (JSON values; its keys are the metric's) and its config."""

    scores: dict[str, Any]
    config: ExtraMetricConfig


class EvalResults(TypedDict):
    """`results.json`, schema version 1 (docs/eval-results.md)."""

    schema: Literal["longsum-eval-results"]
    schema_version: int
    metrics: Metrics
    examples: int
    failed: int
    excluded: Excluded
    mean_prediction_tokens: float
    mean_prediction_words: float
    truncated_inputs: int
    throughput: Throughput
    metric_recipe: dict[str, Any]
    extra_metrics: dict[str, ExtraMetricResult]  # --metric as given -> its result ({} without --metric)
    dataset: dict[str, Any]  # its keys depend on where the data came from (Hub or local file)
    model: ModelIdentity
    generation: dict[str, Any]
    generation_preset: dict[str, Any]
    config: dict[str, Any]  # informational
    provenance: dict[str, Any]  # informational
    timings: Timings


# ------------------------------------------------------------- predictions.jsonl (longsum eval)


class _PredictionBase(TypedDict):
    id: str
    reference: str


class Prediction(_PredictionBase):
    """A scored example."""

    prediction: str
    scores: dict[str, float]  # ROUGE type -> F1 x 100
    input_tokens: int
    output_tokens: int
    truncated: bool
    chunks: int


class FailedPrediction(_PredictionBase):
    """An example whose generation failed (not in the scores)."""

    error: str


PredictionRecord = Prediction | FailedPrediction

# ------------------------------------------------------------------------ longsum summarize records


class _SummaryBase(TypedDict):
    id: Any  # the id as the input gave it: any JSON value
    model: str
    source: NotRequired[str]  # the record file it came from
    path: NotRequired[str]  # the resolved path of its file
    encoding: NotRequired[str]  # when not UTF-8


class Summary(_SummaryBase):
    """A summarized document; it has `truncated` or (long inputs chunked) `chunks`, not both."""

    summary: str
    input_tokens: int
    truncated: NotRequired[bool]
    chunks: NotRequired[int]
    seconds: float


class FailedSummary(_SummaryBase):
    error: str


SummaryRecord = Summary | FailedSummary
