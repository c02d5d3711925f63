"""The output schemas in code (`longsum.data.schema`) against their documentation (docs/eval-results.md,
README) and against real outputs of `longsum eval` and `longsum summarize` (issue 25, item 6)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longsum.cli import app
from longsum.data import schema
from longsum.data.store import read_records
from longsum.model.generation import Result
from tests.conftest import CORPUS

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "eval-results.md").read_text()
README = (ROOT / "README.md").read_text()
IDENT = re.compile(r"^[A-Za-z_]\w*$")
runner = CliRunner()


def names(text: str) -> list[str]:
    """The backticked identifiers of some documentation text (not `{...}` examples, not paths)."""
    return [n for n in re.findall(r"`([^`]+)`", text) if IDENT.match(n)]


def keys(td) -> tuple[set, set]:
    """A TypedDict's (required, optional) keys."""
    return set(td.__required_keys__), set(td.__optional_keys__)


def hints(td) -> dict:
    return typing.get_type_hints(td)  # NotRequired[...] stripped


def problems(value, tp, where: str = "") -> list[str]:
    """How `value` (read back from JSON) departs from the type `tp`; empty if it conforms."""
    where = where or "record"
    if tp is typing.Any:
        return []
    if typing.is_typeddict(tp):
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__}, not an object"]
        required, optional = keys(tp)
        found = [f"{where}: missing {k!r}" for k in sorted(required - set(value))]
        found += [f"{where}: key {k!r} not in {tp.__name__}" for k in sorted(set(value) - required - optional)]
        types_ = hints(tp)
        for k in value.keys() & types_.keys():
            found += problems(value[k], types_[k], f"{where}.{k}")
        return found
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return [] if value in args else [f"{where}: {value!r} not one of {args}"]
    if origin in (typing.Union, types.UnionType):
        tried = [problems(value, arg, where) for arg in args]
        return [] if any(not p for p in tried) else min(tried, key=len)
    if tp is type(None):
        return [] if value is None else [f"{where}: {value!r} is not null"]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__}, not an object"]
        return [p for k, v in value.items() for p in problems(v, args[1], f"{where}.{k}")]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {type(value).__name__}, not a list"]
        return [p for i, v in enumerate(value) for p in problems(v, args[0], f"{where}[{i}]")]
    if tp is float:  # JSON does not tell 2.0 from 2
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    return [] if ok else [f"{where}: {value!r} is not {tp.__name__}"]


# ----------------------------------------------------------------------------- the documentation


def results_table() -> dict[str, tuple[str, str]]:
    """docs/eval-results.md's table: key -> (type, meaning)."""
    rows = {}
    for line in DOC.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or cells[0] in ("key", "---"):
            continue
        for key in names(cells[0]):
            rows[key] = (cells[1], cells[2])
    return rows


def test_results_table_matches_the_typeddict():
    rows = results_table()
    required, optional = keys(schema.EvalResults)
    assert set(rows) == required and not optional  # the table lists every key, none optional
    types_ = hints(schema.EvalResults)
    for key, (doc_type, meaning) in rows.items():
        tp = types_[key]
        if doc_type == "int":
            assert tp is int, key
        elif doc_type == "float":
            assert tp is float, key
        elif doc_type == "object":
            assert typing.is_typeddict(tp) or typing.get_origin(tp) is dict, key
            if typing.is_typeddict(tp):  # its keys are the meaning's backticked names
                assert set(names(meaning)) == set(tp.__annotations__), (key, names(meaning))
        else:
            literal = re.fullmatch(r'`"(.+)"`', doc_type)
            assert literal and typing.get_args(tp) == (literal.group(1),), (key, doc_type, tp)
    interval = re.search(r'`\{("[^`]+")\}`', rows["metrics"][1]).group(1)
    assert set(re.findall(r'"(\w+)"', interval)) == set(schema.Interval.__annotations__)


def test_results_schema_name_is_the_one_written():
    from longsum.commands.evaluation import RESULTS_SCHEMA, RESULTS_SCHEMA_VERSION

    assert typing.get_args(hints(schema.EvalResults)["schema"]) == (RESULTS_SCHEMA,)
    assert DOC.splitlines()[0].endswith(f"schema version {RESULTS_SCHEMA_VERSION}")


def test_prediction_records_documented_match_the_typeddicts():
    text = " ".join(DOC.split())
    m = re.search(r"`predictions\.jsonl` beside it holds one record per example generated: (?P<base>.*?), then "
                  r"(?P<scored>.*?); or, where its generation failed, (?P<failed>.*?) in their place", text)  # fmt: skip
    assert m, "the predictions.jsonl sentence of docs/eval-results.md changed: update this test and longsum.data.schema"
    base, scored, failed = (set(names(m.group(g))) for g in ("base", "scored", "failed"))
    assert keys(schema.Prediction) == (base | scored, set())
    assert keys(schema.FailedPrediction) == (base | failed, set())
    assert set(typing.get_args(schema.PredictionRecord)) == {schema.Prediction, schema.FailedPrediction}


def test_summary_records_documented_match_the_typeddicts():
    """README's commands table: `... | JSONL: `id`, `source` (records), ..., or `error` |`."""
    cell = next(line for line in README.splitlines() if line.startswith("| `longsum summarize")).split("|")[-2]
    assert cell.strip().startswith("JSONL:")
    documented = names(cell)
    ok_req, ok_opt = keys(schema.Summary)
    failed_req, failed_opt = keys(schema.FailedSummary)
    assert set(documented) == ok_req | ok_opt | failed_req | failed_opt
    *_, alternative = re.split(r",\s*or\s+", cell)  # "..., or `error`": the failure's own key
    assert names(alternative) == ["error"] and "error" in failed_req - ok_req - ok_opt
    # what the README gives a condition, "(...)", or an "X or Y" choice for, a record may lack
    conditional = set(re.findall(r"`(\w+)` \(", cell))
    for a, b in re.findall(r"`(\w+)` or `(\w+)`", cell):
        conditional |= {a, b}
    assert conditional <= ok_opt | failed_opt and {"truncated", "chunks"} <= ok_opt
    assert ok_req & failed_req == {"id", "model"}


def test_schema_module_imports_no_torch():
    code = "import sys, longsum.data.schema; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ----------------------------------------------------------------------------- real outputs


def test_the_checker_reports_extra_missing_and_mistyped_keys():
    good = {"id": "a", "reference": "r", "error": "boom"}
    assert problems(good, schema.PredictionRecord) == []
    assert problems({**good, "extra": 1}, schema.PredictionRecord)
    assert problems({"id": "a", "error": "boom"}, schema.PredictionRecord)
    assert problems({**good, "reference": 3}, schema.PredictionRecord)
    assert problems({"id": 1, "model": "m", "error": "e", "truncated": True}, schema.SummaryRecord)


def test_a_failed_prediction_record_follows_the_schema():
    from longsum.commands.evaluation import prediction_record

    record = prediction_record("ex1", "a reference", Result(error="out of memory"), tokenizer=None)
    assert problems(json.loads(json.dumps(record)), schema.PredictionRecord) == []
    assert "error" in record


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"id": f"ex{i}", "document": " ".join(CORPUS[(i + j) % 5] for j in range(4)), "summary": CORPUS[i % 5]}
            for i in range(4)]  # fmt: skip
    rows.append({"id": "noref", "document": CORPUS[0], "summary": ""})  # excluded: shows in results.json
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_outputs_follow_the_schema(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", str(dataset), "-m", str(tiny_model_dir), "--text-column", "document",
                                 "--output-dir", str(out)], catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert problems(results, schema.EvalResults) == []
    assert results["excluded"]["count"] == 1  # the sub-objects were checked with content
    predictions = read_records(out / "predictions.jsonl")
    assert len(predictions) == 4
    for record in predictions:
        assert problems(record, schema.PredictionRecord) == [], record
        assert problems(record, schema.Prediction) == []


def test_summarize_outputs_follow_the_schema(tmp_path, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(CORPUS[0] + " " + CORPUS[1])
    (docs / "empty.txt").write_text("  \n")  # an error record with a path
    (docs / "latin1.txt").write_bytes("Le caf\xe9 cr\xe8me de la ville.".encode("latin-1"))  # encoding
    src = tmp_path / "records.jsonl"
    src.write_text(json.dumps({"id": 7, "text": CORPUS[2]}) + "\n{not json\n")  # source; an error record
    out, chunked = tmp_path / "out.jsonl", tmp_path / "chunked.jsonl"
    for path, extra in ((out, []), (chunked, ["--long-input", "chunk"])):
        result = runner.invoke(app, ["summarize", str(docs), str(src), "-m", str(tiny_model_dir), "-o", str(path),
                                     *extra], catch_exceptions=False)  # fmt: skip
        assert result.exit_code == 1, result.output  # two documents fail
    got = read_records(out) + read_records(chunked)
    assert len(got) == 10
    for record in got:
        assert problems(record, schema.SummaryRecord) == [], record
        if "error" not in record:
            assert ("truncated" in record) != ("chunks" in record), record
    seen = set().union(*got)
    assert seen == set(schema.Summary.__annotations__) | set(schema.FailedSummary.__annotations__)
