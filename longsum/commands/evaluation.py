"""`longsum eval`: ROUGE of a model on a summarization dataset, with full provenance.

Outputs in `--output-dir`:
* `predictions.jsonl`: one record per scored example (id, prediction, reference, per-example
  scores), written as examples finish; a `longsum.data.store.ResultStore` with `run.json` as its
  sidecar, so a rerun resumes only with the same data, model weights and output-changing settings,
  and retries examples whose record is an error;
* `results.json`: ROUGE with bootstrap intervals, the `--metric`s (Hugging Face `evaluate`), what
  was left out of the scores and why, the full configuration, model and dataset identity, package
  versions, git commit and timings (schema: docs/eval-results.md); an earlier one is kept as
  `results.<time>.json`.
The scores table goes to stdout, logs to stderr.
Examples without a document or a reference are not generated nor scored: they are counted and
reported (and the run fails if none is left). Generation uses the shared `Summarizer`.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longsum import errors
from longsum.console import alert, log, note, stdout_console
from longsum.data.schema import EvalResults, ExtraMetricResult, ModelIdentity, PredictionRecord
from longsum.errors import LongsumError
from longsum.model.generation import GenerationOptions, Result
from longsum.settings import Action, Command, RunDtype, device_setting, dtype_setting, model_setting, setting

SHOWN_EXCLUDED_IDS = 20  # ids of left-out examples listed in results.json
RESULTS_SCHEMA, RESULTS_SCHEMA_VERSION = "longsum-eval-results", 1  # docs/eval-results.md


@dataclass
class EvalConfig:
    """Every `longsum eval` setting (`longsum.settings`): its options and --config are built from these."""

    dataset: str = setting(None, "Alias (pubmed, arxiv, govreport), Hub id, or JSONL/CSV/parquet file.", argument=True,
                           missing="name a dataset (pubmed, arxiv, govreport, a Hub id or a file); see longsum eval "
                                   "--list")  # fmt: skip
    model: str = model_setting()
    split: str = setting("test", "Dataset split.")
    limit: int | None = setting(None, "Score a seeded random subset of N examples.")
    seed: int = setting(0, "Seed for --limit sampling and the bootstrap.")
    text_column: str | None = setting(None, "Column with the document (default: the alias's, else text).")
    summary_column: str | None = setting(None, "Column with the reference (default: the alias's, else summary).")
    config: str | None = setting(None, "Hub dataset configuration (default: the alias's).", flags=("--dataset-config",))
    revision: str | None = setting(None, "Hub dataset revision (branch, tag or commit).")
    output_dir: str | None = setting(None, "Where results go (default: eval-DATASET-SPLIT-MODEL).",
                                     flags=("--output-dir", "-o"))  # fmt: skip
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    device: str = device_setting()
    dtype: RunDtype = dtype_setting()
    compare: str | None = setting(None, "Another results.json to compare with.")
    overwrite: bool = setting(False, "Discard earlier predictions in the output dir.")
    metric: list[str] = setting([], "Also score with this evaluate metric (repeatable): a Hub name (bertscore, "
                                "meteor, sacrebleu; fetched from the Hub and run, offline from evaluate's cache) or "
                                "a local metric script or folder (imported, so it runs: your own file). Needs "
                                "evaluate, the 'metrics' extra of longsum.")  # fmt: skip
    metric_args: str | None = setting(None, "JSON: each --metric's compute arguments, e.g. "
                                      "'{\"bertscore\": {\"lang\": \"en\"}}'.")  # fmt: skip


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text.rstrip("/")).name).strip("-") or "model"


def default_output_dir(cfg: EvalConfig) -> Path:
    return Path(f"eval-{_slug(cfg.dataset)}-{cfg.split}-{_slug(cfg.model)}")


def apply_preset(cfg: EvalConfig) -> dict:
    """Fill unset generation options from the dataset's published preset; returns what was used."""
    from longsum.model.generation import minimum_gives_way
    from longsum.registry import DATASET_ALIASES

    preset = dict(DATASET_ALIASES[cfg.dataset].preset) if cfg.dataset in DATASET_ALIASES else {}
    chosen = cfg.generation
    if minimum_gives_way(chosen, preset.get("min_new_tokens")):
        del preset["min_new_tokens"]
    for name, value in preset.items():
        if getattr(chosen, name) is None:
            setattr(chosen, name, value)
    return preset


def model_identity(checkpoint) -> ModelIdentity:
    """What results.json says of the model (`checkpoint`: the run's `longsum.model.checkpoint.Checkpoint`)."""
    return {"name": checkpoint.name, "resolved": checkpoint.resolved, "path": str(checkpoint.folder),
            "model_type": checkpoint.model_type, "fingerprint": checkpoint.fingerprint}  # fmt: skip


@dataclass
class _Plan:
    """What a pass over the examples found: what counts, what is left out, what is still to do."""

    # ids that are scored -> their position in the dataset: the scores are aggregated in that order,
    # so the bootstrap's resamples (seeded) are the same whatever order the records were written in
    # (one process, a resume, or parts gathered from ranks under a launcher)
    wanted: dict = field(default_factory=dict)
    excluded: Counter = field(default_factory=Counter)  # reason -> count
    excluded_ids: list = field(default_factory=list)
    pending: int = 0


def _reason(problem: str) -> str:
    return "malformed row" if problem.startswith("malformed row") else problem


@dataclass
class _EvalRun:
    """One eval run as it goes: what it was given and resolved, then what generation did."""

    cfg: EvalConfig
    checkpoint: Any  # the run's `longsum.model.checkpoint.Checkpoint`
    data: Any  # `longsum.data.datasets.EvalData`
    plan: _Plan
    out_dir: Path
    preset: dict  # the generation options the dataset's preset filled in
    generation: dict  # the settings results.json reports (with the batch size once generation ran)
    comparison: dict | None  # --compare's results.json
    started: str
    t0: float
    throughput: dict = field(default_factory=lambda: {"examples": 0, "input_tokens": 0, "seconds": 0.0})
    metrics: list = field(default_factory=list)  # the --metric's `longsum.data.metrics.ExtraMetric`s

    @property
    def predictions(self) -> Path:
        return self.out_dir / "predictions.jsonl"


def run(cfg: EvalConfig) -> int:
    from longsum import __version__
    from longsum.commands.driver import Tally, summaries
    from longsum.data import distributed
    from longsum.data.datasets import content_identity, load_examples
    from longsum.data.provenance import now
    from longsum.model.checkpoint import resolve
    from longsum.model.generation import plan_settings

    started, t0 = now(), time.perf_counter()
    comparison = check_config(cfg)  # what is wrong with the command fails before any data or model is read
    metrics = load_metrics(cfg)  # so does a --metric that cannot be loaded (offline, not installed)
    dist = distributed.init()
    data = load_examples(cfg.dataset, cfg.split, cfg.text_column, cfg.summary_column, cfg.limit, cfg.seed,
                         cfg.revision, cfg.config)  # fmt: skip
    preset = apply_preset(cfg)
    device = dist.device(cfg.device)
    # An unknown model fails here. Resolved once: settings, identity, weights and results.json read from it.
    checkpoint = resolve(cfg.model)
    settings = plan_settings(checkpoint, cfg.generation, cfg.dtype, device)
    identity = {"dataset": content_identity(data), "model_fingerprint": checkpoint.fingerprint,
                "generation": settings.as_dict()}  # fmt: skip
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)
    if out_dir.exists() and not out_dir.is_dir():
        raise LongsumError(f"--output-dir {out_dir} is a file; choose a folder")
    ev = _EvalRun(cfg, checkpoint, data, _Plan(), out_dir, preset, settings.as_dict(), comparison, started, t0,
                  metrics=metrics)  # fmt: skip
    info = {"dataset_name": cfg.dataset, "model": cfg.model, "longsum": __version__}
    results = distributed.open_results(str(ev.predictions), identity, dist, info=info, overwrite=cfg.overwrite,
                                       sidecar=out_dir / "run.json", other="another --output-dir")  # fmt: skip

    plan = ev.plan
    for ex in data.examples():  # a cheap pass (Arrow) before loading the model
        if ex.problem:
            plan.excluded[_reason(ex.problem)] += 1
            if len(plan.excluded_ids) < SHOWN_EXCLUDED_IDS:
                plan.excluded_ids.append(ex.id)
            continue
        plan.wanted[ex.id] = len(plan.wanted)
        plan.pending += (None, ex.id) not in results.done
    if not plan.wanted:
        results.close()
        raise LongsumError(f"no example of {cfg.dataset} can be scored ({_excluded_text(plan)})")
    if dist.main:
        _report_plan(cfg, data, plan, ev.predictions)

    def pending():
        """This rank's examples still to do: (example, text); the example is the record's payload."""
        index = 0
        for ex in data.examples():
            if ex.problem or (None, ex.id) in results.done:
                continue
            index += 1
            if dist.mine(index - 1):
                yield ex, ex.text

    try:
        if plan.pending:
            tally = Tally()
            for ex, result in summaries(checkpoint, cfg.generation, settings, pending(), tally, device=device,
                                        dtype=cfg.dtype, main=dist.main):  # fmt: skip
                results.write(prediction_record(ex.id, ex.reference, result, checkpoint.tokenizer))
            ev.generation = tally.settings
            ev.throughput = {"examples": tally.done, "input_tokens": tally.tokens, "seconds": tally.seconds}
    finally:
        results.close()
    if not dist.main:
        return 0
    return _score(ev)


def check_config(cfg: EvalConfig) -> dict | None:
    """The values known up front, checked before the run reads data or generates anything (a bad
    --seed or --compare used to fail only at scoring, after the whole generation). Returns the
    --compare results, read now."""
    from longsum.registry import MAX_SEED

    if not 0 <= cfg.seed <= MAX_SEED:
        raise LongsumError(f"--seed must be between 0 and {MAX_SEED}, not {cfg.seed}")
    cfg.metric = metric_names(cfg.metric)
    metric_arguments(cfg)
    return read_comparison(cfg.compare) if cfg.compare else None


def metric_names(given) -> list[str]:
    """--metric's names, each once (a config file may give one name as a string)."""
    names = [given] if isinstance(given, str) else list(given or [])
    if not all(isinstance(name, str) and name.strip() for name in names):
        raise LongsumError(f"--metric takes metric names or paths, not {given!r}")
    return list(dict.fromkeys(names))


def metric_arguments(cfg: EvalConfig) -> dict[str, dict]:
    """--metric-args read: each named --metric's compute arguments (a mapping), or a one-line error."""
    if cfg.metric_args is None:
        return {}
    try:
        args = json.loads(cfg.metric_args)
    except ValueError as err:
        raise LongsumError(f"--metric-args is not valid JSON ({errors.describe(err)})") from None
    if not isinstance(args, dict) or not all(isinstance(v, dict) for v in args.values()):
        raise LongsumError('--metric-args must map metric names to their arguments: \'{"bertscore": {"lang": "en"}}\'')
    if unknown := [name for name in args if name not in cfg.metric]:
        raise LongsumError(
            f"--metric-args names {unknown[0]}, which is not a --metric ({', '.join(cfg.metric) or 'none'})"
        )
    return args


def load_metrics(cfg: EvalConfig) -> list:
    """The --metric's, loaded (`longsum.data.metrics.load_extra_metric`): one that cannot be is one line."""
    if not cfg.metric:
        return []
    from longsum.data.metrics import load_extra_metric

    args = metric_arguments(cfg)
    return [load_extra_metric(name, args.get(name)) for name in cfg.metric]


def read_comparison(path: str) -> dict:
    """Another run's results.json (for --compare): its metrics, or a one-line error."""
    try:
        other = json.loads(Path(path).read_text())
        metrics = other["metrics"]
        if not isinstance(metrics, dict) or not all(isinstance(m, dict) and "mean" in m for m in metrics.values()):
            raise ValueError("its 'metrics' have no means")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LongsumError(f"cannot read --compare file {path} ({errors.describe(err)}); "
                           f"give the results.json of an earlier longsum eval") from None  # fmt: skip
    return other


def _excluded_text(plan: _Plan) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in plan.excluded.most_common()) or "none left out"


def _report_plan(cfg, data, plan, predictions) -> None:
    done = len(plan.wanted) - plan.pending
    log(f"{cfg.dataset} [{cfg.split}]: {len(data)} examples, {done} already in {predictions}, "
        f"{plan.pending} to generate")  # fmt: skip
    if data.source.get("ids") == "row numbers (ids not unique)":
        note("note: the ids of the dataset are not unique: examples are named by row number")
    if plan.excluded:
        note(f"left out of the scores: {_excluded_text(plan)}")


def prediction_record(ex_id: str, reference: str, result: Result, tokenizer) -> PredictionRecord:
    """One example's record in predictions.jsonl (docs/eval-results.md): its prediction and scores, or its error."""
    from longsum.data.metrics import score_pair

    if result.error:
        return {"id": ex_id, "reference": reference, "error": result.error}
    return {"id": ex_id, "reference": reference, "prediction": result.summary,
            "scores": score_pair(result.summary, reference), "input_tokens": result.input_tokens,
            "truncated": result.truncated, "chunks": result.chunks,
            "output_tokens": len(tokenizer(result.summary, add_special_tokens=False)["input_ids"])}  # fmt: skip


def _score(ev: _EvalRun) -> int:
    """Score the run's predictions, write results.json, print the table; the exit code."""
    from longsum.data.metrics import ROUGE_TYPES, aggregate
    from longsum.data.store import latest_records

    cfg, plan, predictions = ev.cfg, ev.plan, ev.predictions

    scores, failed, first_error = {}, 0, None  # scores: dataset position -> the example's scores
    pairs = {}  # dataset position -> (prediction, reference), for the --metric's
    tokens = words = truncated = 0
    found = set()
    for r in latest_records(predictions):
        if r["id"] not in plan.wanted:
            continue
        found.add(r["id"])
        if "error" in r:
            failed += 1
            first_error = first_error or r["error"]
            continue
        scores[plan.wanted[r["id"]]] = r["scores"]
        if ev.metrics:
            pairs[plan.wanted[r["id"]]] = (r["prediction"], r["reference"])
        tokens += r["output_tokens"]
        words += len(r["prediction"].split())
        truncated += bool(r.get("truncated"))
    missing = len(plan.wanted) - len(found)
    if missing:
        raise LongsumError(f"{missing} examples have no prediction in {predictions}; run the same command again")
    if not scores:
        raise LongsumError(f"every example failed (first error: {first_error}); no score to report")
    metrics = aggregate([scores[i] for i in sorted(scores)], seed=cfg.seed)
    extra = extra_metrics(ev.metrics, [pairs[i] for i in sorted(pairs)], predictions)
    results = results_record(ev, metrics=metrics, examples=len(scores), failed=failed, tokens=tokens, words=words,
                             truncated=truncated, extra_metrics=extra)  # fmt: skip
    kept = _write_results(ev.out_dir / "results.json", results)
    _print_table(results, ROUGE_TYPES)
    if extra:
        _print_extra_table(extra)
    if ev.comparison is not None:
        print_comparison(results, ev.comparison, cfg.compare)
    log(f"wrote {ev.out_dir / 'results.json'} and {predictions}")
    if kept:
        note(f"the earlier results.json is kept as {kept}")
    if plan.excluded:
        note(f"{sum(plan.excluded.values())} example(s) left out of the scores: {_excluded_text(plan)} "
             f"(see 'excluded' in results.json)")  # fmt: skip
    if failed:
        alert(f"{failed} example(s) failed and are not in the scores (see 'error' in {predictions})")
        return 1
    return 0


def extra_metrics(metrics: list, pairs: list[tuple[str, str]], predictions: Path) -> dict[str, ExtraMetricResult]:
    """results.json's `extra_metrics`: each --metric (`ExtraMetric`) computed on the scored examples'
    (prediction, reference) `pairs`, in dataset order. A metric that fails is one line, after the
    predictions are saved: the same command then scores again without generating."""
    out = {}
    for metric in metrics:
        try:
            scores = metric.compute([p for p, _ in pairs], [r for _, r in pairs])
        except LongsumError as err:
            raise LongsumError(f"{err}; the predictions are kept in {predictions}: fix the metric (or --metric-args) "
                               f"and run the same command again, nothing is generated again") from None  # fmt: skip
        out[metric.name] = {"scores": scores, "config": metric.config}
    return out


def results_record(ev: _EvalRun, *, metrics, examples: int, failed: int, tokens: int, words: int,
                   truncated: int, extra_metrics: dict | None = None) -> EvalResults:  # fmt: skip
    """results.json (docs/eval-results.md): `examples` scored, `failed`, the `tokens`, `words` and
    `truncated` inputs of the scored predictions, and the --metric's `extra_metrics` (`extra_metrics()`)."""
    from longsum.data.metrics import METRIC_RECIPE
    from longsum.data.provenance import now, provenance

    plan, gen_stats = ev.plan, ev.throughput

    return {
        "schema": RESULTS_SCHEMA,
        "schema_version": RESULTS_SCHEMA_VERSION,
        "metrics": metrics,
        "examples": examples,
        "failed": failed,
        "excluded": {
            "count": sum(plan.excluded.values()),
            "reasons": dict(plan.excluded),
            "first_ids": plan.excluded_ids,
        },  # fmt: skip
        "mean_prediction_tokens": tokens / examples,
        "mean_prediction_words": words / examples,
        "truncated_inputs": truncated,
        "throughput": {
            **gen_stats,
            "examples_per_s": gen_stats["examples"] / gen_stats["seconds"] if gen_stats["seconds"] else None,
        },  # fmt: skip
        "metric_recipe": METRIC_RECIPE,
        "extra_metrics": extra_metrics or {},
        "dataset": {"name": ev.cfg.dataset, **ev.data.source},
        "model": model_identity(ev.checkpoint),
        "generation": ev.generation,
        "generation_preset": ev.preset,
        "config": asdict(ev.cfg),
        "provenance": provenance(),
        "timings": {"started": ev.started, "finished": now(), "seconds": time.perf_counter() - ev.t0},
    }


def _write_results(path: Path, results: dict) -> Path | None:
    """Write results.json; an earlier one is renamed `results.<its finish time>.json`, never overwritten."""
    from longsum.data.store import write_json_atomic

    kept = None
    if path.exists():
        try:
            stamp = json.loads(path.read_text())["timings"]["finished"]
        except (OSError, ValueError, KeyError, TypeError):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(path.stat().st_mtime))
        kept = path.with_name(f"results.{re.sub(r'[^0-9T]', '', stamp)[:15]}.json")
        n = 1
        while kept.exists():
            n += 1
            kept = kept.with_name(f"results.{re.sub(r'[^0-9T]', '', stamp)[:15]}-{n}.json")
        path.rename(kept)
    write_json_atomic(path, results)
    return kept


def _print_table(results: dict, rouge_types) -> None:
    """The scores as a table on stdout (the run's result; logs go to stderr)."""
    from rich.table import Table

    table = Table(title=f"{results['dataset']['name']} ({results['examples']} examples) - {results['model']['name']}")
    for column in ("metric", "F1 x100", "95% interval"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for name in rouge_types:
        m = results["metrics"][name]
        table.add_row(name, f"{m['mean']:.2f}", f"[{m['low']:.2f}, {m['high']:.2f}]")
    table.add_row("gen. length", f"{results['mean_prediction_tokens']:.1f} tok", "")
    stdout_console().print(table)


def _print_extra_table(extra: dict) -> None:
    """The --metric's numeric scores (a list of per-example values as its mean) on stdout."""
    from rich.table import Table

    table = Table(title="--metric (evaluate)")
    for column in ("metric", "score", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for name, entry in extra.items():
        for key, value in entry["scores"].items():
            if isinstance(value, list) and value and all(_number(v) for v in value):
                table.add_row(name, f"{key} (mean)", f"{sum(value) / len(value):.4g}")
            elif _number(value):
                table.add_row(name, key, f"{value:.4g}")
    stdout_console().print(table)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def print_comparison(results: dict, other: dict, other_path: str) -> None:
    """This run's means beside another run's (`other`: its results.json, from `read_comparison`)."""
    from rich.table import Table

    other_metrics = other["metrics"]
    table = Table(title=f"this run vs {other_path}")
    for column in ("metric", "this", "other", "difference"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for name, mine in results["metrics"].items():
        theirs = other_metrics.get(name, {}).get("mean")
        diff = "" if theirs is None else f"{mine['mean'] - theirs:+.2f}"
        table.add_row(name, f"{mine['mean']:.2f}", "-" if theirs is None else f"{theirs:.2f}", diff)
    stdout_console().print(table)


EXAMPLES = """Examples:

  longsum eval pubmed --model ccdv/lsg-bart-base-4096-pubmed --limit 200

  longsum eval govreport --model ./my-model --batch-size 8 --compare eval-govreport-test-base/results.json

  longsum eval data/dev.jsonl --text-column document --summary-column summary --model ./my-model

  accelerate launch -m longsum eval arxiv --model ccdv/lsg-bart-base-4096-arxiv

  longsum eval data/dev.jsonl --model ./my-model --metric ./my_metric.py --metric bertscore \\
      --metric-args '{"bertscore": {"lang": "en"}}'

  longsum eval --list

Scores: rouge1/2/L/Lsum F1 x100 (rouge-score, use_stemmer=True; rougeLsum on sentences split offline),
mean over examples with a seeded bootstrap 95% interval. Hub datasets need the Hub once, then the cache.
--metric: Hugging Face evaluate metrics on the same predictions (the 'metrics' extra of longsum); a Hub
metric runs evaluate's script from the Hub (needs the Hub once, then its cache), a local one runs your file;
a new --metric on a finished run scores again without generating."""


def list_datasets() -> None:
    """`longsum eval --list`: the dataset aliases, their columns and presets."""
    from longsum.data.datasets import list_aliases

    for entry in list_aliases():
        print(f"{entry['alias']:<10} {entry['hub_id']} [{entry['config']}] {entry['text_column']} -> "
              f"{entry['summary_column']}; preset {entry['preset']}: {entry['description']}")  # fmt: skip


COMMAND = Command("eval", EvalConfig, run, examples=EXAMPLES,
                  help="Score a model with ROUGE on a summarization dataset (resumable, with provenance).",
                  actions=(Action("list_aliases", ("--list",), "Show the dataset aliases and their presets.",
                                  list_datasets),))  # fmt: skip
