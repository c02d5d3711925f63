"""ROUGE as the published long-document results compute it, offline.

rouge1/rouge2/rougeL/rougeLsum F-measures (x100) with `use_stemmer=True`, from Google's
`rouge-score` package directly (`evaluate.load("rouge")` downloads a script from the Hub, so it
fails offline; it wraps the same package). rougeLsum needs one sentence per line, so predictions
and references are split with an offline splitter first (`longsum.data.text.SENTENCE_SPLITTER`).
The corpus score is the mean over examples, with a seeded bootstrap 95% interval.

More metrics (`longsum eval --metric NAME`) come through Hugging Face `evaluate` (the optional
extra `longsum[metrics]`): `load_extra_metric` loads one before any data or model is read (a local
script or folder runs that file; a Hub name runs evaluate's script from the Hub, or its cached copy
offline), `ExtraMetric.compute` scores the run's predictions with it. ROUGE never goes through it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from longsum.data.text import SENTENCE_SPLITTER, split_sentences
from longsum.errors import LongsumError, describe

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
METRIC_RECIPE = {
    "package": "rouge-score",
    "rouge_types": list(ROUGE_TYPES),
    "use_stemmer": True,
    "measure": "F1 x 100, mean over examples",
    "rougeLsum_sentence_splitter": SENTENCE_SPLITTER,
    "interval": "bootstrap 95% (percentile), 1000 resamples",
}


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def sentences_per_line(text: str) -> str:
    return "\n".join(s.strip() for s in split_sentences(text) if s.strip())


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """F-measures (x100) for one example."""
    scores = _scorer().score(sentences_per_line(reference), sentences_per_line(prediction))
    return {name: 100 * scores[name].fmeasure for name in ROUGE_TYPES}


def aggregate(per_example: list[dict[str, float]], resamples: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Mean and bootstrap 95% interval of each metric: {"rouge1": {"mean", "low", "high"}, ...}."""
    if not per_example:
        raise ValueError("no examples to score")
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per_example), size=(resamples, len(per_example)))  # [resamples, n]
    out = {}
    for name in ROUGE_TYPES:
        values = np.array([example[name] for example in per_example])
        means = values[draws].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        out[name] = {"mean": float(values.mean()), "low": float(low), "high": float(high)}
    return out


# --------------------------------------------------------------------------- more metrics: `evaluate`
METRICS_EXTRA = "pip install 'longsum[metrics]'"  # what installs `evaluate` (pyproject's optional extra)


@dataclass
class ExtraMetric:
    """A metric loaded with `evaluate.load` (`load_extra_metric`): `name` as the user gave it,
    `module` the `evaluate.EvaluationModule`, `config` what results.json records of it."""

    name: str
    module: Any
    config: dict = field(default_factory=dict)

    def compute(self, predictions: list[str], references: list[str]) -> dict[str, Any]:
        """The metric's scores of the predictions against their references (same order), made
        JSON-safe; a failure is one line (`LongsumError`) naming the metric."""
        try:
            scores = self.module.compute(predictions=predictions, references=references,
                                         **self.config["compute_args"])  # fmt: skip
        except Exception as err:  # noqa: BLE001  a metric's own code can fail in any way
            raise LongsumError(f"--metric {self.name} failed on {len(predictions)} predictions "
                               f"({describe(err)})") from None  # fmt: skip
        if not isinstance(scores, dict):
            raise LongsumError(f"--metric {self.name} returned {type(scores).__name__}, not a mapping of scores")
        return _json_safe(scores)


def _json_safe(value: Any) -> Any:
    """`value` with numpy scalars and arrays (what metrics often return) as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _json_safe(value.tolist())
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _import_evaluate():
    try:
        import evaluate
    except ImportError:
        raise LongsumError(f"--metric needs the evaluate package, which is not installed: {METRICS_EXTRA}") from None
    return evaluate


def local_metric_script(name: str) -> Path | None:
    """The metric script `name` names on disk (a `.py` file, or a folder holding `<folder>.py`, as
    `evaluate.load` finds it), None for a Hub name; a path that is not there is one line."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        script = path / f"{path.resolve().name}.py"
        if not script.is_file():
            raise LongsumError(f"--metric {name}: the folder has no {script.name} (a metric folder holds a script "
                               f"named after it)")  # fmt: skip
        return script
    looks_local = name.endswith(".py") or name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name
    if looks_local:
        raise LongsumError(f"--metric {name}: no such metric script or folder")
    return None


@contextmanager
def _evaluate_offline(evaluate):
    """`evaluate` in offline mode for this block: it reads its module cache and never connects."""
    saved = evaluate.config.HF_EVALUATE_OFFLINE
    evaluate.config.HF_EVALUATE_OFFLINE = True
    try:
        yield
    finally:
        evaluate.config.HF_EVALUATE_OFFLINE = saved


def hub_unreachable() -> str | None:
    """Why a Hub metric cannot be fetched now (offline mode, or no connection), None if it can."""
    from huggingface_hub import constants

    from longsum.data.datasets import unreachable_hub

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE=1"
    if os.environ.get("HF_EVALUATE_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_EVALUATE_OFFLINE=1"
    unreachable = unreachable_hub()
    return f"no network: {unreachable}" if unreachable else None


def load_extra_metric(name: str, compute_args: dict | None = None) -> ExtraMetric:
    """`evaluate.load(name)` as a `longsum eval --metric`, or one line saying what is missing.

    A local script or folder (`local_metric_script`) is imported, which runs it: it is the user's
    own file. Any other name is a Hub metric (`bertscore`, `evaluate-metric/meteor`, `user/metric`):
    evaluate fetches its script from the Hub and runs it, or, offline, takes its cached copy; with
    neither, the error names what is missing before the run reads data or generates anything."""
    evaluate = _import_evaluate()
    script = local_metric_script(name)
    offline = None if script else hub_unreachable()
    try:
        with _evaluate_offline(evaluate) if offline else nullcontext():
            module = evaluate.load(str(script) if script else name, keep_in_memory=True)
    except ImportError as err:  # the metric's script imports a package that is not installed
        raise LongsumError(f"--metric {name} needs a package that is not installed ({describe(err)})") from None
    except FileNotFoundError as err:
        if offline:
            raise LongsumError(f"--metric {name} needs the Hugging Face Hub ({offline}): its script is not in "
                               f"evaluate's cache; use a local metric script or folder") from None  # fmt: skip
        raise LongsumError(f"--metric {name}: no such metric on the Hugging Face Hub nor on disk ({describe(err)}); "
                           f"use a Hub metric name or a local metric script or folder") from None  # fmt: skip
    except Exception as err:  # noqa: BLE001  a script that fails on import, a Hub error
        raise LongsumError(f"--metric {name} could not be loaded ({describe(err)})") from None
    source = Path(inspect.getfile(type(module)))
    config = {
        "module": module.name,
        "source": "local script" if script else "Hugging Face Hub",
        "path": str(script.resolve()) if script else name,
        "script_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "evaluate": evaluate.__version__,
        "load_args": {"keep_in_memory": True},
        "compute_args": json.loads(json.dumps(compute_args or {})),
    }
    return ExtraMetric(name, module, config)
