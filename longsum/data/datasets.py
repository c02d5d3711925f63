"""Summarization datasets for `eval` and `train`: Hub aliases, any Hub id, or local files.

Data stays in Arrow (memory-mapped by `datasets`), never in Python lists: a 400 MB local file costs
a few MB of memory. Hub datasets load with `datasets` (parquet data, no loading scripts: datasets 5
no longer runs them); local JSONL / CSV / parquet / JSON files are streamed once through
`longsum.data.inputs`' row readers into an Arrow cache (rebuilt when the file changes). Without network
access only Hub datasets already in the local cache load.

Each example is (id, text, reference). An example that cannot be scored (no document, a missing
or empty reference, a malformed row) is kept with its `problem`: eval leaves it out of the scores
and reports how many, train leaves it out of training.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from longsum.errors import LongsumError
from longsum.registry import DATASET_ALIASES, SCRIPT_ONLY_DATASETS

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_LOCAL_FORMAT = 1  # bump when the Arrow cache of local files changes shape


NO_DOCUMENT = "empty or missing document"
NO_REFERENCE = "empty or missing reference"


@dataclass(frozen=True)
class Example:
    id: str
    text: str | None
    reference: str | None
    problem: str | None = None  # why it cannot be scored (None: it can)


@dataclass
class EvalData:
    """A selection of a dataset's rows, read lazily from Arrow.

    `indices[k]` is the row number (in the whole split) of the k-th selected row. Example ids are
    the `id` column's values when they are unique (a row without one is `#ROW`), else the row
    numbers of all examples (`ids_are_rows`).
    """

    dataset: object  # datasets.Dataset, rows already selected
    indices: list[int] | range
    id_column: str | None
    text_column: str
    summary_column: str
    problem_column: str | None
    source: dict  # provenance: id, config, split, revision/fingerprint, columns, selection
    ids_are_rows: bool = False

    def __len__(self) -> int:
        return len(self.indices)

    def examples(self, batch_size: int = 256) -> Iterator[Example]:
        """The selected examples in order, streamed from Arrow in batches."""
        columns = [c for c in (self.id_column, self.text_column, self.summary_column, self.problem_column) if c]
        view = self.dataset.select_columns(columns)
        k = 0
        for batch in view.iter(batch_size=batch_size):
            for j in range(len(batch[self.text_column])):
                row = self.indices[k]
                k += 1
                if self.id_column and not self.ids_are_rows:
                    value = batch[self.id_column][j]
                    ex_id = f"#{row}" if value is None or value == "" else str(value)
                else:
                    ex_id = str(row)
                text, reference = _as_text(batch[self.text_column][j]), _as_text(batch[self.summary_column][j])
                problem = batch[self.problem_column][j] if self.problem_column else None
                if problem is None and not (text and text.strip()):
                    problem = NO_DOCUMENT
                if problem is None and not (reference and reference.strip()):
                    problem = NO_REFERENCE
                yield Example(ex_id, text, reference, problem)

    def subset(self, positions: list[int]) -> EvalData:
        """The examples at `positions` (0-based, in this selection's order)."""
        return replace(self, dataset=self.dataset.select(positions), indices=[self.indices[p] for p in positions])

    def training_view(self):
        """A datasets.Dataset with `text` and `reference` columns, usable rows only (for train)."""
        keep = [k for k, ex in enumerate(self.examples()) if ex.problem is None]
        view = self.dataset.select(keep).select_columns([self.text_column, self.summary_column])
        names = {self.text_column: "text", self.summary_column: "reference"}
        if self.text_column == self.summary_column:
            raise LongsumError("--text-column and --summary-column name the same column")
        return view.rename_columns({k: v for k, v in names.items() if k != v}), len(self) - len(keep)


def _as_text(value) -> str | None:
    return value if value is None or isinstance(value, str) else str(value)


def list_aliases() -> list[dict]:
    return [{"alias": name, **asdict(spec)} for name, spec in DATASET_ALIASES.items()]


def load_examples(name: str, split: str = "test", text_column: str | None = None,
                  summary_column: str | None = None, limit: int | None = None, seed: int = 0,
                  revision: str | None = None, config: str | None = None) -> EvalData:  # fmt: skip
    """Examples of a dataset alias, Hub id or local file; `limit` takes a seeded random subset."""
    if name in SCRIPT_ONLY_DATASETS:
        raise LongsumError(
            f"'{name}' needs a loading script, which datasets 5 no longer runs; use {SCRIPT_ONLY_DATASETS[name]}"
        )
    if limit is not None and limit < 1:
        raise LongsumError(f"--limit must be >= 1, got {limit}")
    import datasets

    datasets.disable_progress_bars()  # our own progress goes to stderr; theirs would too, twice
    path = Path(name)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise LongsumError(f"dataset file does not exist: {name}")
        text_column, summary_column = text_column or "text", summary_column or "summary"
        data = _local(path, text_column, summary_column)
    else:
        spec = DATASET_ALIASES.get(name)
        if spec is None and "/" not in name:
            raise LongsumError(
                f"unknown dataset '{name}'; aliases: {', '.join(DATASET_ALIASES)} (or a Hub id / local file)"
            )
        text_column = text_column or (spec.text_column if spec else "text")
        summary_column = summary_column or (spec.summary_column if spec else "summary")
        data = _hub(spec.hub_id if spec else name, config or (spec.config if spec else None), split, revision,
                    text_column, summary_column)  # fmt: skip
    rows = len(data.indices)
    if rows == 0:
        raise LongsumError(f"dataset '{name}' split '{split}' is empty")
    if limit is not None and limit < rows:
        data = data.subset(sorted(random.Random(seed).sample(range(rows), limit)))
    if data.id_column:  # ids must be unique for resuming; rows without one are named "#ROW"
        values = [
            None if v in (None, "") else str(v) for v in data.dataset.select_columns([data.id_column])[data.id_column]
        ]
        named = [v for v in values if v is not None]
        unnamed = {f"#{row}" for row, v in zip(data.indices, values) if v is None}
        data.ids_are_rows = not named or len(set(named)) != len(named) or bool(unnamed & set(named))
    data.source.update(split=split, text_column=text_column, summary_column=summary_column, rows=rows,
                       selected=len(data), limit=limit, seed=seed,
                       ids=_id_scheme(data))  # fmt: skip
    return data


def _id_scheme(data: EvalData) -> str:
    return "id column" if data.id_column and not data.ids_are_rows else "row numbers"


HUB_PROBE_SECONDS = 3.0  # a connection to the Hub's host takes well under this where there is network
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def unreachable_hub() -> str | None:
    """Why the Hub cannot be reached from here, found in at most `HUB_PROBE_SECONDS` (None: it can,
    offline mode is already on, or a proxy decides). `datasets` retries a failed connection five
    times with backoff (~30 s of "Retrying in Ns" lines) before it falls back to its cache; this
    probe lets a machine without network go straight to the cache."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.is_offline_mode() or any(os.environ.get(name) for name in _PROXIES):
        return None
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as err:
        return f"{host}: {err.strerror or type(err).__name__}"
    return None


@contextmanager
def _offline():
    """Hub libraries in offline mode for this block: they read their caches and never connect."""
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _hub(hub_id: str, config: str | None, split: str, revision: str | None, text_column: str,
         summary_column: str) -> EvalData:  # fmt: skip
    import datasets

    unreachable = unreachable_hub()
    try:
        with _offline() if unreachable else nullcontext():
            ds = datasets.load_dataset(hub_id, config, split=split, revision=revision)
    except ValueError as err:
        if "split" in str(err).lower():
            raise LongsumError(f"dataset '{hub_id}' has no split '{split}': {str(err).splitlines()[0]}") from None
        raise LongsumError(f"cannot load dataset '{hub_id}': {str(err).splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001  offline, unknown repo, gated...
        why = f"the Hub is unreachable: {unreachable}" if unreachable else type(err).__name__
        raise LongsumError(
            f"dataset '{hub_id}' is not cached and could not be fetched from the Hugging Face Hub "
            f"({why}); connect to the Hub or pass a local JSONL/CSV/parquet file"
        ) from None
    _check_columns(hub_id, ds.column_names, text_column, summary_column)
    source = {"hub_id": hub_id, "config": config, "revision": revision or "main", "fingerprint": ds._fingerprint}
    id_column = "id" if "id" in ds.column_names else None
    return EvalData(ds, range(len(ds)), id_column, text_column, summary_column, None, source)


def _check_columns(name: str, columns, text_column: str, summary_column: str) -> None:
    missing = [c for c in (text_column, summary_column) if c not in columns]
    if missing:
        raise LongsumError(
            f"column '{missing[0]}' not in dataset '{name}' (columns: {', '.join(map(str, columns))}); "
            f"use --text-column / --summary-column"
        )


def _local(path: Path, text_column: str, summary_column: str) -> EvalData:
    """A local file through longsum's streaming row readers into an Arrow cache (rebuilt on change)."""
    import datasets

    first = next((record for _, record, _ in _local_rows_raw(path) if record is not None), None)
    if first is None:
        raise LongsumError(f"dataset file {path} has no readable rows")
    _check_columns(str(path), first, text_column, summary_column)
    stat = path.stat()
    features = datasets.Features({name: datasets.Value("string") for name in ("id", "text", "reference", "problem")})
    kwargs = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "text_column": text_column, "summary_column": summary_column, "format": _LOCAL_FORMAT}  # fmt: skip
    try:
        ds = datasets.Dataset.from_generator(_local_rows, features=features, gen_kwargs=kwargs)
    except Exception as err:  # noqa: BLE001  datasets wraps the reader's errors
        cause = err.__cause__ or err
        if isinstance(cause, LongsumError):
            raise LongsumError(str(cause)) from None
        raise LongsumError(f"cannot read dataset file {path}: {cause}") from None
    source = {"path": str(path.resolve()), "size": stat.st_size, "sha256": _sha256(path)}
    return EvalData(ds, range(len(ds)), "id", "text", "reference", "problem", source)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_identity(data: EvalData) -> dict:
    """What decides a selection's examples: the data's content and how it is read and selected."""
    keys = ("sha256", "hub_id", "config", "revision", "fingerprint", "split", "text_column", "summary_column",
            "limit", "seed", "ids")  # fmt: skip
    source = data.source
    return {k: source[k] for k in keys if k in source and not (k == "split" and "sha256" in source)}


def _local_rows_raw(path: Path):
    from longsum.data.inputs import DocumentError, iter_rows

    if path.suffix.lower() == ".json":
        yield from _json_rows(path)
        return
    try:
        yield from iter_rows(path)
    except DocumentError as err:
        raise LongsumError(f"cannot read dataset file {path}: {err}") from None


def _json_rows(path: Path):
    """A .json file: JSON lines, or one array of objects (read whole: that format has no lines)."""
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith("["):
        from longsum.data.inputs import jsonl_rows

        yield from jsonl_rows(path)
        return
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as err:
        raise LongsumError(f"cannot read dataset file {path}: {err}") from None
    for n, row in enumerate(rows, 1):
        yield (n, row, None) if isinstance(row, dict) else (n, None, "not a JSON object")


def _local_rows(path: str, size: int, mtime_ns: int, text_column: str, summary_column: str, format: int):
    """Rows for the Arrow cache (`size`, `mtime_ns` and `format` only key the cache)."""
    for _, record, problem in _local_rows_raw(Path(path)):
        if record is None:
            yield {"id": None, "text": None, "reference": None, "problem": f"malformed row: {problem}"}
            continue
        value = record.get("id")
        yield {"id": None if value is None else str(value), "text": _as_text(record.get(text_column)),
               "reference": _as_text(record.get(summary_column)), "problem": None}  # fmt: skip
