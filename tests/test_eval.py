"""`longsum eval`: ROUGE recipe, local datasets, resume, provenance, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from rouge_score import rouge_scorer
from typer.testing import CliRunner

from longsum.cli import app
from longsum.jsonl import read_records
from longsum.metrics import aggregate, score_pair
from tests.conftest import CORPUS

runner = CliRunner()


def test_rouge_matches_rouge_score_directly():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = [("the cats were running fast", "a cat runs fast"), ("completely different words", "nothing in common")]
    for prediction, reference in pairs:
        want = scorer.score(reference, prediction)
        got = score_pair(prediction, reference)
        for name in ("rouge1", "rouge2", "rougeL"):
            assert got[name] == pytest.approx(100 * want[name].fmeasure, abs=1e-9)


def test_rouge_lsum_splits_sentences_and_differs_from_rouge_l():
    prediction = "The model reads long papers. It writes short abstracts."
    reference = "It writes short abstracts. The model reads long papers."
    got = score_pair(prediction, reference)
    lsum = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True).score(
        "It writes short abstracts.\nThe model reads long papers.",
        "The model reads long papers.\nIt writes short abstracts.",
    )["rougeLsum"]
    assert got["rougeLsum"] == pytest.approx(100 * lsum.fmeasure) == pytest.approx(100.0)
    assert got["rougeL"] < 70  # summary-level LCS rewards the reordered sentences, plain LCS does not


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    scores = [score_pair(p, r) for p, r in [("a b c", "a b d"), ("x y", "x y"), ("p q r s", "t u"), ("m n", "m o")]]
    first, again = aggregate(scores, seed=3), aggregate(scores, seed=3)
    assert first == again
    for m in first.values():
        assert m["low"] <= m["mean"] <= m["high"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for i in range(8):
            text = " ".join(CORPUS[(i + j) % 5] for j in range(4))
            f.write(json.dumps({"id": f"ex{i}", "document": text, "summary": CORPUS[i % 5]}) + "\n")
    return path


def evaluate(*args):
    return runner.invoke(app, ["eval", *map(str, args)], catch_exceptions=False)


def test_local_dataset_results_and_predictions(tmp_path, model_dir, dataset):
    out = tmp_path / "run"
    result = evaluate(dataset, "-m", model_dir, "--text-column", "document", "--output-dir", out, "--limit", 5)
    assert result.exit_code == 0, result.output
    predictions = read_records(out / "predictions.jsonl")
    assert len(predictions) == 5 and len({p["id"] for p in predictions}) == 5
    for p in predictions:
        assert set(p["scores"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
        assert p["scores"] == score_pair(p["prediction"], p["reference"])
    results = json.loads((out / "results.json").read_text())
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        mean = sum(p["scores"][name] for p in predictions) / 5
        assert results["metrics"][name]["mean"] == pytest.approx(mean)
    assert results["examples"] == 5 and results["failed"] == 0
    assert results["dataset"]["limit"] == 5 and results["dataset"]["rows"] == 8
    assert results["model"]["config_sha256"] and results["model"]["model_type"] == "lsg_bart"
    assert results["metric_recipe"]["use_stemmer"] is True
    assert results["provenance"]["versions"]["rouge-score"]
    assert results["generation"]["max_new_tokens"] == 8  # from the model's generation_config
    assert "rougeLsum" in result.output


def test_limit_is_a_seeded_subset(tmp_path, model_dir, dataset):
    from longsum.data import load_examples

    a = load_examples(str(dataset), text_column="document", limit=3, seed=1).examples
    b = load_examples(str(dataset), text_column="document", limit=3, seed=1).examples
    c = load_examples(str(dataset), text_column="document", limit=3, seed=2).examples
    assert a == b and len(a) == 3 and a != c


def test_resume_generates_only_the_missing_examples(tmp_path, model_dir, dataset):
    out = tmp_path / "run"
    args = [dataset, "-m", model_dir, "--text-column", "document", "--output-dir", out]
    assert evaluate(*args).exit_code == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # interrupted mid-line
    result = evaluate(*args)
    assert result.exit_code == 0
    assert "5 already in" in result.output and "3 to generate" in result.output
    ids = [p["id"] for p in read_records(out / "predictions.jsonl")]
    assert sorted(ids) == [f"ex{i}" for i in range(8)]


def test_changed_configuration_is_refused(tmp_path, model_dir, dataset):
    out = tmp_path / "run"
    args = [dataset, "-m", model_dir, "--text-column", "document", "--output-dir", out, "--limit", 2]
    assert evaluate(*args).exit_code == 0
    proc = subprocess.run([sys.executable, "-m", "longsum", "eval", *map(str, args), "--num-beams", "3"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "another configuration (differs in generation)" in proc.stderr


def test_compare_prints_differences(tmp_path, model_dir, dataset):
    a, b = tmp_path / "a", tmp_path / "b"
    base = [dataset, "-m", model_dir, "--text-column", "document", "--limit", 3]
    assert evaluate(*base, "--output-dir", a).exit_code == 0
    result = evaluate(*base, "--output-dir", b, "--compare", a / "results.json", "--num-beams", 2)
    assert result.exit_code == 0 and "difference" in result.output and "+0.00" in result.output


def test_list_aliases():
    result = evaluate("--list")
    assert result.exit_code == 0
    for alias in ("pubmed", "arxiv", "govreport"):
        assert alias in result.output
    assert "ccdv/pubmed-summarization [document]" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["pubmedx"], "unknown dataset 'pubmedx'; aliases: pubmed, arxiv, govreport"),
        (["scientific_papers"], "needs a loading script, which datasets 5 no longer runs"),
        (["pubmed", "--limit", "2"], "is not cached and could not be fetched from the Hugging Face Hub"),
        (["{data}", "--text-column", "body"], "column 'body' not in dataset"),
        (["missing.jsonl"], "dataset file does not exist: missing.jsonl"),
    ],
)
def test_one_line_errors(tmp_path, dataset, args, message):
    args = [a.replace("{data}", str(dataset)) for a in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "longsum", "eval", *args, "--output-dir", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_processes_gather_before_scoring(tmp_path, model_dir, dataset):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541",
           "-m", "longsum", "eval", str(dataset), "-m", str(model_dir), "--text-column", "document",
           "--output-dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p["id"] for p in read_records(out / "predictions.jsonl")) == [f"ex{i}" for i in range(8)]
    assert json.loads((out / "results.json").read_text())["examples"] == 8
