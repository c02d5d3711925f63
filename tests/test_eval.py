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
from longsum.data.metrics import aggregate, score_pair
from longsum.data.store import read_records
from tests.conftest import CORPUS
from tests.helpers import run_longsum

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
    """Each ROUGE type: the plain mean of the examples' scores and a 95% interval around it, within
    the scores' range; the same seed gives the same interval, another seed another resampling."""
    scores = [score_pair(p, r) for p, r in [("a b c", "a b d"), ("x y", "x y"), ("p q r s", "t u"), ("m n", "m o")]]
    first, again, other = aggregate(scores, seed=3), aggregate(scores, seed=3), aggregate(scores, seed=4)
    assert first == again and set(first) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    for name, m in first.items():
        values = [s[name] for s in scores]
        assert m["mean"] == pytest.approx(sum(values) / len(values)), name
        assert min(values) <= m["low"] < m["mean"] < m["high"] <= max(values), (name, m, values)
        assert other[name]["mean"] == m["mean"]
    assert other != first  # the seed drives the resampling


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


def test_local_dataset_results_and_predictions(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "run"
    result = evaluate(dataset, "-m", tiny_model_dir, "--text-column", "document", "--output-dir", out, "--limit", 5)
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
    assert len(results["model"]["fingerprint"]) == 16 and results["model"]["model_type"] == "lsg_bart"
    assert results["excluded"] == {"count": 0, "reasons": {}, "first_ids": []}
    assert results["metric_recipe"]["use_stemmer"] is True
    assert results["provenance"]["versions"]["rouge-score"]
    assert results["generation"]["max_new_tokens"] == 8  # from the model's generation_config
    assert "rougeLsum" in result.output


def test_limit_is_a_seeded_subset(tmp_path, tiny_model_dir, dataset):
    from longsum.data.datasets import load_examples

    a, b, c = (list(load_examples(str(dataset), text_column="document", limit=3, seed=seed).examples())
               for seed in (1, 1, 2))  # fmt: skip
    assert a == b and len(a) == 3 and a != c
    assert [ex.id for ex in a] == sorted(ex.id for ex in a)  # in dataset order


def test_resume_generates_only_the_missing_examples(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "run"
    args = [dataset, "-m", tiny_model_dir, "--text-column", "document", "--output-dir", out]
    assert evaluate(*args).exit_code == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # interrupted mid-line
    result = evaluate(*args)
    assert result.exit_code == 0
    assert "5 already in" in result.output and "3 to generate" in result.output
    ids = [p["id"] for p in read_records(out / "predictions.jsonl")]
    assert sorted(ids) == [f"ex{i}" for i in range(8)]


def test_changed_configuration_is_refused(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "run"
    args = [dataset, "-m", tiny_model_dir, "--text-column", "document", "--output-dir", out, "--limit", 2]
    assert evaluate(*args).exit_code == 0
    proc = run_longsum("eval", *args, "--num-beams", "3")
    assert proc.returncode == 2 and "generation.num_beams 1 then, 3 now" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_compare_prints_differences(tmp_path, tiny_model_dir, dataset):
    a, b = tmp_path / "a", tmp_path / "b"
    base = [dataset, "-m", tiny_model_dir, "--text-column", "document", "--limit", 3]
    assert evaluate(*base, "--output-dir", a).exit_code == 0
    results = a / "results.json"
    earlier = json.loads(results.read_text())
    earlier["metrics"]["rouge1"]["mean"] -= 5.0  # the other run scored 5 points lower on rouge1
    results.write_text(json.dumps(earlier))
    result = evaluate(*base, "--output-dir", b, "--compare", results, "--num-beams", 2)
    assert result.exit_code == 0, result.output
    assert f"this run vs {results}" in " ".join(result.stdout.split())
    mine = json.loads((b / "results.json").read_text())["metrics"]
    rows = {cells[0]: cells[1:] for line in result.stdout.splitlines()
            if len(cells := [c.strip() for c in line.strip("│┃ ").split("│")]) == 4}  # fmt: skip
    for name, m in mine.items():  # this run's mean, the other's, this minus the other
        theirs = earlier["metrics"][name]["mean"]
        assert rows[name] == [f"{m['mean']:.2f}", f"{theirs:.2f}", f"{m['mean'] - theirs:+.2f}"], (name, rows)
    assert rows["rouge1"][2] == f"{mine['rouge1']['mean'] - earlier['metrics']['rouge1']['mean']:+.2f}" != "+0.00"


def test_list_aliases():
    result = evaluate("--list")
    assert result.exit_code == 0
    for alias in ("pubmed", "arxiv", "govreport"):
        assert alias in result.output
    assert "ccdv/pubmed-summarization [document]" in result.output


def test_preset_fills_unset_options_and_yields_to_a_shorter_maximum():
    from longsum.commands.evaluation import EvalConfig, apply_preset
    from longsum.model.generation import GenerationOptions

    cfg = EvalConfig("pubmed", "m", generation=GenerationOptions(num_beams=2))
    apply_preset(cfg)
    assert (cfg.generation.num_beams, cfg.generation.max_new_tokens, cfg.generation.min_new_tokens) == (2, 512, 128)
    # --max-new-tokens 64 under the preset's minimum 128: summaries up to 64 tokens, not forced to 64.
    cfg = EvalConfig("pubmed", "m", generation=GenerationOptions(max_new_tokens=64))
    used = apply_preset(cfg)
    assert cfg.generation.min_new_tokens is None and "min_new_tokens" not in used
    assert (cfg.generation.max_new_tokens, cfg.generation.length_penalty) == (64, 2.0)


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
    proc = run_longsum("eval", *args, "--output-dir", tmp_path / "o", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_processes_gather_before_scoring(tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541",
           "-m", "longsum", "eval", str(dataset), "-m", str(tiny_model_dir), "--text-column", "document",
           "--output-dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p["id"] for p in read_records(out / "predictions.jsonl")) == [f"ex{i}" for i in range(8)]
    launched = json.loads((out / "results.json").read_text())
    assert launched["examples"] == 8
    # 22.6: same seed, same numbers, whatever the process count (the ranks' records come in another order)
    alone = tmp_path / "alone"
    result = evaluate(dataset, "-m", tiny_model_dir, "--text-column", "document", "--output-dir", alone)
    assert result.exit_code == 0, result.output
    assert launched["metrics"] == json.loads((alone / "results.json").read_text())["metrics"]


def test_examples_without_reference_or_document_are_left_out_and_reported(tmp_path, tiny_model_dir):
    path = tmp_path / "data.jsonl"
    rows = [{"id": f"ok{i}", "document": CORPUS[i], "summary": CORPUS[i + 1]} for i in range(3)]
    rows += [{"id": "blank", "document": CORPUS[0], "summary": "  "}, {"id": "null", "document": CORPUS[1],
             "summary": None}, {"id": "missing", "document": CORPUS[2]}, {"id": "nodoc", "document": "",
             "summary": "s"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{torn json\n")
    out = tmp_path / "run"
    result = evaluate(path, "-m", tiny_model_dir, "--text-column", "document", "--output-dir", out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["examples"] == 3
    assert results["excluded"]["count"] == 5 and results["excluded"]["reasons"] == {
        "empty or missing reference": 3, "empty or missing document": 1, "malformed row": 1}  # fmt: skip
    assert sorted(results["excluded"]["first_ids"]) == ["#7", "blank", "missing", "nodoc", "null"]
    assert sorted(p["id"] for p in read_records(out / "predictions.jsonl")) == ["ok0", "ok1", "ok2"]
    assert "left out of the scores" in result.output and "3 empty or missing reference" in result.output


def test_no_example_with_a_reference_fails(tmp_path, tiny_model_dir):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"document": CORPUS[i], "summary": ""}) + "\n" for i in range(3)))
    proc = run_longsum("eval", path, "-m", tiny_model_dir, "--text-column", "document", "--output-dir", tmp_path / "o")
    assert proc.returncode == 2 and proc.stderr.startswith("error: no example of") and "3 empty or missing ref" in \
        proc.stderr  # fmt: skip


def test_changed_weights_are_refused_on_resume(tmp_path, tiny_model_dir, dataset):
    from tests.test_summarize import copy_model, perturb_weights

    model = copy_model(tiny_model_dir, tmp_path / "model")
    out = tmp_path / "run"
    args = [dataset, "-m", model, "--text-column", "document", "--output-dir", out, "--limit", 2]
    assert evaluate(*args).exit_code == 0
    perturb_weights(model)
    proc = run_longsum("eval", *args)
    assert proc.returncode == 2 and "model_fingerprint" in proc.stderr and "resuming would mix them" in proc.stderr


def test_eval_reads_a_large_local_dataset_through_arrow(tmp_path):
    """Memory for 20,000 examples stays that of a few (Arrow is memory-mapped), not of the file."""
    import tracemalloc

    from longsum.data.datasets import load_examples

    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(20_000):
            f.write(json.dumps({"id": i, "text": CORPUS[i % 5] * 8, "summary": CORPUS[(i + 1) % 5]}) + "\n")
    data = load_examples(str(path))  # builds the Arrow cache
    tracemalloc.start()
    n = sum(1 for _ in load_examples(str(path)).examples())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == len(data) == 20_000 and peak < 24 << 20, f"peak {peak / 2**20:.1f} MiB"  # file: 16 MB


def test_22_6_the_bootstrap_does_not_depend_on_the_order_records_were_written(tmp_path, tiny_model_dir, dataset):
    """Records in another order (ranks' parts gathered, a resume) give the same intervals for the same seed."""
    out = tmp_path / "run"
    args = [dataset, "-m", tiny_model_dir, "--text-column", "document", "--output-dir", out]
    assert evaluate(*args).exit_code == 0
    path = out / "predictions.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(records):  # the tiny model's summaries all score 0: give each its own scores
        r["scores"] = {name: float((i + j) ** 2) for j, name in enumerate(r["scores"])}
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluate(*args).exit_code == 0
    first = json.loads((out / "results.json").read_text())["metrics"]
    assert all(m["low"] < m["mean"] < m["high"] for m in first.values())
    path.write_text("".join(json.dumps(r) + "\n" for r in records[3:] + records[:3]))
    result = evaluate(*args)
    assert result.exit_code == 0 and "0 to generate" in result.output
    assert json.loads((out / "results.json").read_text())["metrics"] == first


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "-1"], "--seed must be between 0 and 4294967295, not -1"),
        (["--seed", str(2**32)], "--seed must be between 0 and 4294967295"),
        (["--limit", "-3"], "--limit must be >= 1, got -3"),
        (["--compare", "{missing}"], "cannot read --compare file"),
        (["--compare", "{not_results}"], "its 'metrics' have no means"),
    ],
)
def test_22_13_eval_values_known_up_front_fail_before_any_work(tmp_path, dataset, args, message):
    """One line, exit 2, before the data or the model is read: the model path here does not even exist."""
    (tmp_path / "other.json").write_text(json.dumps({"metrics": {"rouge1": 3}}))
    args = [a.replace("{missing}", str(tmp_path / "nope.json")).replace("{not_results}", str(tmp_path / "other.json"))
            for a in args]  # fmt: skip
    proc = run_longsum("eval", dataset, "-m", tmp_path / "no-model", *args, "--output-dir", tmp_path / "o")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_22_14_a_hub_dataset_without_network_fails_fast_in_one_line(tmp_path):
    """Where the Hub cannot be reached, `datasets` used to retry five times with backoff (six
    "Retrying in Ns" lines, ~30 s); the probe sends it straight to its cache. `.invalid` never resolves."""
    drop = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *(p for p in os.environ if p.lower().endswith("_proxy"))}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_ENDPOINT="https://hub.invalid", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "longsum", "eval", "nobody/no-such-dataset", "-m", "m",
                           "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not cached and could not be fetched" in proc.stderr and "the Hub is unreachable: hub.invalid" in proc.stderr
