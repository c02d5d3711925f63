"""ROUGE as the published long-document results compute it, offline.

rouge1/rouge2/rougeL/rougeLsum F-measures (x100) with `use_stemmer=True`, from Google's
`rouge-score` package directly (`evaluate.load("rouge")` downloads a script from the Hub, so it
fails offline; it wraps the same package). rougeLsum needs one sentence per line, so predictions
and references are split with an offline splitter first (`longsum.data.text.SENTENCE_SPLITTER`).
The corpus score is the mean over examples, with a seeded bootstrap 95% interval.
"""

from __future__ import annotations

from functools import lru_cache

from longsum.data.text import SENTENCE_SPLITTER, split_sentences

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
