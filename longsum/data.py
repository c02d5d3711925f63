"""Summarization datasets for `eval` and `train`: Hub aliases, any Hub id, or local files.

Each example is `(id, text, reference summary)`. Hub datasets are loaded with `datasets` (parquet
data, no loading scripts: datasets 5 no longer runs them); local JSONL / CSV / parquet files are
read directly. Without network access only datasets already in the local cache load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from longsum.errors import LongsumError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class DatasetSpec:
    hub_id: str
    config: str | None
    text_column: str
    summary_column: str
    description: str = ""


DATASET_ALIASES = {
    "pubmed": DatasetSpec(
        "ccdv/pubmed-summarization",
        "document",
        "article",
        "abstract",
        "PubMed articles -> abstracts (Cohan et al. 2018), whole documents",
    ),  # fmt: skip
    "arxiv": DatasetSpec(
        "ccdv/arxiv-summarization",
        "document",
        "article",
        "abstract",
        "arXiv papers -> abstracts (Cohan et al. 2018), whole documents",
    ),  # fmt: skip
    "govreport": DatasetSpec(
        "ccdv/govreport-summarization",
        "document",
        "report",
        "summary",
        "US GAO/CRS reports -> expert summaries (Huang et al. 2021)",
    ),  # fmt: skip
}
# Generation settings of the published long-document cards (ccdv/lsg-*-pubmed, -arxiv, -govreport).
PRESETS = {
    "pubmed": {"num_beams": 5, "length_penalty": 2.0, "max_new_tokens": 512, "min_new_tokens": 128},
    "arxiv": {"num_beams": 5, "length_penalty": 2.0, "max_new_tokens": 512, "min_new_tokens": 128},
    "govreport": {"num_beams": 5, "length_penalty": 2.0, "max_new_tokens": 512, "min_new_tokens": 128},
}
_SCRIPT_ONLY = {"scientific_papers": "pubmed or arxiv (ccdv/pubmed-summarization, ccdv/arxiv-summarization)"}


@dataclass
class EvalData:
    examples: list[tuple[str, str, str]]  # (id, text, reference)
    source: dict  # provenance: id, config, split, revision/fingerprint, columns, selection


def list_aliases() -> list[dict]:
    return [{"alias": name, **asdict(spec), "preset": PRESETS.get(name, {})} for name, spec in DATASET_ALIASES.items()]


def load_examples(name: str, split: str = "test", text_column: str | None = None,
                  summary_column: str | None = None, limit: int | None = None, seed: int = 0,
                  revision: str | None = None, config: str | None = None) -> EvalData:  # fmt: skip
    """Examples of a dataset alias, Hub id or local file; `limit` takes a seeded random subset."""
    if name in _SCRIPT_ONLY:
        raise LongsumError(
            f"'{name}' needs a loading script, which datasets 5 no longer runs; use {_SCRIPT_ONLY[name]}"
        )
    path = Path(name)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise LongsumError(f"dataset file does not exist: {name}")
        rows, source = _read_local(path), {"path": str(path.resolve())}
        text_column, summary_column = text_column or "text", summary_column or "summary"
    else:
        spec = DATASET_ALIASES.get(name)
        if spec is None and "/" not in name:
            raise LongsumError(
                f"unknown dataset '{name}'; aliases: {', '.join(DATASET_ALIASES)} (or a Hub id / local file)"
            )
        hub_id = spec.hub_id if spec else name
        config = config or (spec.config if spec else None)
        text_column = text_column or (spec.text_column if spec else "text")
        summary_column = summary_column or (spec.summary_column if spec else "summary")
        rows, source = _read_hub(hub_id, config, split, revision)
    if not rows:
        raise LongsumError(f"dataset '{name}' split '{split}' is empty")
    missing = [c for c in (text_column, summary_column) if c not in rows[0]]
    if missing:
        raise LongsumError(
            f"column '{missing[0]}' not in dataset '{name}' (columns: {', '.join(rows[0])}); "
            f"use --text-column / --summary-column"
        )
    indices = list(range(len(rows)))
    if limit is not None and limit < len(rows):
        import random

        indices = sorted(random.Random(seed).sample(indices, limit))
    examples = [(str(rows[i].get("id") or i), str(rows[i][text_column] or ""), str(rows[i][summary_column] or ""))
                for i in indices]  # fmt: skip
    source.update(split=split, text_column=text_column, summary_column=summary_column, rows=len(rows),
                  selected=len(examples), limit=limit, seed=seed)  # fmt: skip
    return EvalData(examples, source)


def _read_local(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            import csv

            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        raise LongsumError(f"cannot read dataset file {path}: {err}") from None


def _read_hub(hub_id: str, config: str | None, split: str, revision: str | None) -> tuple[list[dict], dict]:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, config, split=split, revision=revision)
    except ValueError as err:
        if "split" in str(err).lower():
            raise LongsumError(f"dataset '{hub_id}' has no split '{split}': {str(err).splitlines()[0]}") from None
        raise LongsumError(f"cannot load dataset '{hub_id}': {str(err).splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001  offline, unknown repo, gated...
        raise LongsumError(
            f"dataset '{hub_id}' is not cached and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}); connect to the Hub or pass a local JSONL/CSV/parquet file"
        ) from None
    source = {"hub_id": hub_id, "config": config, "revision": revision or "main", "fingerprint": ds._fingerprint}
    return ds.to_list(), source
