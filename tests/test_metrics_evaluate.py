"""`longsum eval --metric NAME`: metrics through Hugging Face `evaluate` (issue 24, part 3), offline:
a local metric script lands in results.json with its config, a Hub-only metric fails in one line
before generating, a missing `evaluate` names the extra, a config file lists metrics, and a new
--metric on a finished run generates nothing."""

from __future__ import annotations

import builtins
import json
import os

import pytest
from typer.testing import CliRunner

from longsum.cli import app
from longsum.data import schema
from longsum.data.store import read_records
from tests.conftest import CORPUS
from tests.helpers import assert_one_line, run_longsum
from tests.test_schema import problems

# A metric script as a user writes one: an `evaluate.Metric` with its own keys and a compute argument.
WORD_MATCH = """
import datasets
import evaluate


class WordMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="exact matches and prediction lengths", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, scale=1.0):
        return {"exact": scale * sum(p == r for p, r in zip(predictions, references)) / len(predictions),
                "words": [len(p.split()) for p in predictions],
                "first_reference": references[0], "scaled_count": scale * len(predictions)}
"""


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"id": f"ex{i}", "document": " ".join(CORPUS[(i + j) % 5] for j in range(3)), "summary": CORPUS[i % 5]}
            for i in range(3)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def word_match(tmp_path):
    path = tmp_path / "word_match.py"
    path.write_text(WORD_MATCH)
    return path


def evaluate_run(dataset, model, out, *args):
    return run_longsum("eval", dataset, "-m", model, "--text-column", "document", "-o", out,
                       "--min-new-tokens", 3, *args)  # fmt: skip


def test_a_local_metric_script_lands_in_results_with_its_config(tmp_path, tiny_model_dir, dataset, word_match):
    out = tmp_path / "run"
    run = evaluate_run(dataset, tiny_model_dir, out, "--metric", word_match, "--metric-args",
                       json.dumps({str(word_match): {"scale": 100}}))  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    predictions = read_records(out / "predictions.jsonl")
    order = sorted(predictions, key=lambda r: int(r["id"][2:]))  # dataset order
    entry = results["extra_metrics"][str(word_match)]
    assert entry["scores"] == {
        "exact": 100 * sum(r["prediction"] == r["reference"] for r in order) / 3,
        "words": [len(r["prediction"].split()) for r in order],
        "first_reference": CORPUS[0],  # computed on the references in dataset order
        "scaled_count": 300,  # --metric-args reached compute
    }
    config = entry["config"]
    assert config["module"] == "word_match" and config["source"] == "local script"
    assert config["path"] == str(word_match.resolve()) and config["compute_args"] == {"scale": 100}
    assert config["evaluate"] == __import__("evaluate").__version__ and len(config["script_sha256"]) == 64
    assert set(results["metrics"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}  # ROUGE beside it, as before
    assert problems(results, schema.EvalResults) == []  # longsum.data.schema's types, with a metric's entry


def test_the_table_shows_the_metric(tmp_path, tiny_model_dir, dataset, word_match):
    """The scores table on stdout gains the metric's numbers (a per-example list as its mean)."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", str(dataset), "-m", str(tiny_model_dir), "--text-column", "document",
                                      "-o", str(out), "--min-new-tokens", "3", "--metric", str(word_match)], catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    words = json.loads((out / "results.json").read_text())["extra_metrics"][str(word_match)]["scores"]["words"]
    assert sum(words) > 0  # the predictions have words: the mean below is not a zero by chance
    rows = {line.split("│")[2].strip(): line.split("│")[3].strip() for line in result.stdout.splitlines()
            if line.count("│") == 4 and "exact" in line or "words (mean)" in line}  # fmt: skip
    assert rows == {"exact": "0", "words (mean)": f"{sum(words) / 3:.4g}"}, result.stdout


def test_a_hub_only_metric_offline_fails_in_one_line_before_generating(tmp_path, tiny_model_dir, dataset,
                                                                      monkeypatch):  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    requests_made = []  # evaluate reads HF_EVALUATE_OFFLINE, not HF_HUB_OFFLINE: it must not try the Hub either

    def no_network(*args, **kwargs):
        requests_made.append(args)
        raise ConnectionError("no network in this test")

    for name in ("request", "get", "head"):
        monkeypatch.setattr(f"requests.{name}", no_network)
    out = tmp_path / "run"
    run = evaluate_run(dataset, tiny_model_dir, out, "--metric", "a-metric-nobody-cached")
    assert_one_line(run, "--metric a-metric-nobody-cached needs the Hugging Face Hub (HF_HUB_OFFLINE=1)")
    assert "use a local metric script or folder" in run.stderr
    assert not (out / "predictions.jsonl").exists() and requests_made == []


def test_a_missing_metric_script_is_one_line(tmp_path, tiny_model_dir, dataset):
    run = evaluate_run(dataset, tiny_model_dir, tmp_path / "run", "--metric", tmp_path / "nope.py")
    assert_one_line(run, "no such metric script or folder")
    assert not (tmp_path / "run").exists()


def test_without_evaluate_the_error_names_the_extra(tmp_path, tiny_model_dir, dataset, word_match, monkeypatch):
    real_import = builtins.__import__

    def no_evaluate(name, *args, **kwargs):
        if name == "evaluate" or name.startswith("evaluate."):
            raise ImportError("No module named 'evaluate'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_evaluate)
    run = evaluate_run(dataset, tiny_model_dir, tmp_path / "run", "--metric", word_match)
    assert_one_line(run, "pip install 'longsum[metrics]'")
    assert not (tmp_path / "run").exists()


def test_a_config_file_lists_metrics(tmp_path, tiny_model_dir, dataset, word_match):
    folder = tmp_path / "counting"  # a metric folder: counting/counting.py, as evaluate finds one
    folder.mkdir()
    (folder / "counting.py").write_text(WORD_MATCH)
    config = tmp_path / "eval.yaml"
    config.write_text(f"metric: [{word_match}, {folder}]\n")
    out = tmp_path / "run"
    run = evaluate_run(dataset, tiny_model_dir, out, "--config", config)
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["extra_metrics"]) == [str(word_match), str(folder)]
    assert results["extra_metrics"][str(folder)]["config"]["path"] == str((folder / "counting.py").resolve())
    assert results["config"]["metric"] == [str(word_match), str(folder)]


def test_a_new_metric_on_a_finished_run_generates_nothing(tmp_path, tiny_model_dir, dataset, word_match):
    out = tmp_path / "run"
    assert evaluate_run(dataset, tiny_model_dir, out).returncode == 0
    before = (out / "predictions.jsonl").read_text()
    run = evaluate_run(dataset, tiny_model_dir, out, "--metric", word_match)
    assert run.returncode == 0, run.stderr
    assert "3 already in" in run.stderr and "0 to generate" in run.stderr
    assert (out / "predictions.jsonl").read_text() == before
    assert str(word_match) in json.loads((out / "results.json").read_text())["extra_metrics"]


def test_a_metric_that_fails_to_compute_is_one_line_after_the_predictions_are_saved(tmp_path, tiny_model_dir,
                                                                                    dataset, word_match):  # fmt: skip
    out = tmp_path / "run"
    run = evaluate_run(dataset, tiny_model_dir, out, "--metric", word_match, "--metric-args",
                       json.dumps({str(word_match): {"no_such_argument": 1}}))  # fmt: skip
    assert_one_line(run, f"--metric {word_match} failed on 3 predictions (TypeError")
    assert "run the same command again" in run.stderr
    assert len(read_records(out / "predictions.jsonl")) == 3 and not (out / "results.json").exists()
    again = evaluate_run(dataset, tiny_model_dir, out, "--metric", word_match)  # resumes: scores only
    assert again.returncode == 0 and "0 to generate" in again.stderr, again.stderr


@pytest.mark.parametrize("args, message", [
    (["--metric-args", "{not json"], "--metric-args is not valid JSON"),
    (["--metric-args", '{"other": {}}'], "--metric-args names other, which is not a --metric"),
    (["--metric-args", '{"x": 1}', "--metric", "x"], "--metric-args must map metric names to their arguments"),
])  # fmt: skip
def test_bad_metric_args_fail_before_any_work(tmp_path, dataset, args, message):
    out = tmp_path / "run"
    assert_one_line(run_longsum("eval", dataset, "-m", tmp_path / "no-model", "-o", out, *args), message)
    assert not out.exists()


def test_a_hub_metric_in_evaluates_cache_loads_offline(tmp_path, word_match):
    """Offline, a Hub metric that was fetched once comes from evaluate's module cache (here one laid
    out as evaluate leaves it, in a fresh process: evaluate reads its cache folder when imported)."""
    import subprocess
    import sys

    cached = tmp_path / "modules" / "evaluate_modules" / "metrics" / "evaluate-metric--word_match" / ("0" * 64)
    cached.mkdir(parents=True)
    for folder in (cached, *list(cached.parents)[:3]):
        (folder / "__init__.py").touch()
    (cached / "word_match.py").write_text(WORD_MATCH)
    code = ("import json; from longsum.data.metrics import load_extra_metric; m = load_extra_metric('word_match'); "
            "print(json.dumps([m.config, m.compute(['a b'], ['a b'])]))")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    config, scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert config["source"] == "Hugging Face Hub" and config["path"] == "word_match"
    assert scores == {"exact": 1.0, "words": [2], "first_reference": "a b", "scaled_count": 1.0}


def test_a_metric_that_imports_a_missing_package_is_one_line(tmp_path, tiny_model_dir, dataset):
    script = tmp_path / "needs_more.py"
    script.write_text("import longsum_no_such_package\n" + WORD_MATCH)
    run = evaluate_run(dataset, tiny_model_dir, tmp_path / "run", "--metric", script)
    assert_one_line(run, f"--metric {script} needs a package that is not installed")
    assert "longsum_no_such_package" in run.stderr and not (tmp_path / "run").exists()
