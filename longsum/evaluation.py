"""`longsum eval`: ROUGE of a model on a summarization dataset, with full provenance.

Outputs in `--output-dir`:
* `predictions.jsonl`: one line per example (id, prediction, reference, per-example scores),
  written as examples finish and resumable like `summarize` (same configuration required);
* `results.json`: metrics with bootstrap intervals, the full configuration, model and dataset
  identity, package versions, git commit and timings.
Generation uses the shared `Summarizer` (batching, dtype, long-input handling of `summarize`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from longsum.console import stderr_console
from longsum.errors import LongsumError
from longsum.generation import GenerationOptions, Result

RUN_KEYS = ("dataset", "split", "model", "limit", "seed", "text_column", "summary_column", "config", "revision",
            "generation")  # fmt: skip


@dataclass
class EvalConfig:
    dataset: str
    model: str
    split: str = "test"
    limit: int | None = None
    seed: int = 0
    text_column: str | None = None
    summary_column: str | None = None
    config: str | None = None
    revision: str | None = None
    output_dir: str | None = None
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    device: str = "auto"
    dtype: str = "auto"
    compare: str | None = None
    overwrite: bool = False


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text.rstrip("/")).name).strip("-") or "model"


def default_output_dir(cfg: EvalConfig) -> Path:
    return Path(f"eval-{_slug(cfg.dataset)}-{cfg.split}-{_slug(cfg.model)}")


def apply_preset(cfg: EvalConfig) -> dict:
    """Fill unset generation options from the dataset's published preset; returns what was used."""
    from longsum.data import PRESETS

    preset = PRESETS.get(cfg.dataset, {})
    for name, value in preset.items():
        if getattr(cfg.generation, name) is None:
            setattr(cfg.generation, name, value)
    return preset


def model_identity(name: str) -> dict:
    from longsum.models import locate, read_config, resolve_name

    folder = locate(name)
    raw = (folder / "config.json").read_bytes()
    config = read_config(folder)
    return {"name": name, "resolved": resolve_name(name), "path": str(folder), "model_type": config.get("model_type"),
            "config_sha256": hashlib.sha256(raw).hexdigest()}  # fmt: skip


def run(cfg: EvalConfig) -> int:

    from longsum import distributed
    from longsum.data import load_examples
    from longsum.models import locate
    from longsum.provenance import now

    console = stderr_console()
    started, t0 = now(), time.perf_counter()
    dist = distributed.init()
    data = load_examples(cfg.dataset, cfg.split, cfg.text_column, cfg.summary_column, cfg.limit, cfg.seed,
                         cfg.revision, cfg.config)  # fmt: skip
    locate(cfg.model)  # an unknown model or unreachable Hub fails before anything is written
    ids = [ex_id for ex_id, _, _ in data.examples]
    if len(set(ids)) != len(ids):  # ids must be unique for resuming: fall back to row positions
        data.examples = [(str(i), text, ref) for i, (_, text, ref) in enumerate(data.examples)]
    preset = apply_preset(cfg)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_file = out_dir / "run.json"
    this_run = {k: v for k, v in asdict(cfg).items() if k in RUN_KEYS}
    predictions = out_dir / "predictions.jsonl"
    if dist.main:
        if run_file.exists() and predictions.exists() and not cfg.overwrite:
            previous = json.loads(run_file.read_text())
            if previous != this_run:
                changed = sorted(k for k in this_run if previous.get(k) != this_run[k])
                raise LongsumError(f"{out_dir} holds predictions of another configuration (differs in "
                                   f"{', '.join(changed)}); use --overwrite or another --output-dir")  # fmt: skip
        run_file.write_text(json.dumps(this_run, indent=2))
    dist.barrier()

    writer, done, _ = distributed.open_output(str(predictions), dist, overwrite=cfg.overwrite)
    references = {ex_id: ref for ex_id, _, ref in data.examples}
    todo = dist.shard([(ex_id, text) for ex_id, text, _ in data.examples if ex_id not in done])
    if dist.main:
        console.print(f"{cfg.dataset} [{cfg.split}]: {len(data.examples)} examples, {len(done & set(references))} "
                      f"already in {predictions}, {len(todo) * dist.world} to generate")  # fmt: skip
    gen_stats = {"examples": 0, "input_tokens": 0, "seconds": 0.0}
    settings: dict = {}
    try:
        if todo:
            settings = _generate(cfg, todo, references, writer, console, dist, gen_stats)
    finally:
        distributed.close_output(writer, str(predictions), dist)
    if not dist.main:
        return 0
    return _score(cfg, data, predictions, out_dir, preset, settings, gen_stats, started, t0, console)


def _generate(cfg, todo, references, writer, console, dist, stats) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from longsum.generation import Summarizer, keep_freed_memory
    from longsum.metrics import score_pair
    from longsum.models import load_model

    model, tokenizer = load_model(cfg.model, device=dist.device(cfg.device), dtype=cfg.dtype)
    if model.device.type == "cpu":
        keep_freed_memory()  # batched generation on CPU: reuse freed buffers (see its docstring)
    summarizer = Summarizer(model, tokenizer, cfg.generation)
    settings = summarizer.settings()
    if dist.main:
        console.print(f"model {cfg.model} on {model.device}; " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    start = time.perf_counter()

    def on_result(ex_id: str, result: Result) -> None:
        record = {"id": ex_id, "reference": references[ex_id]}
        if result.error:
            record["error"] = result.error
        else:
            record.update(prediction=result.summary, scores=score_pair(result.summary, references[ex_id]),
                          input_tokens=result.input_tokens, truncated=result.truncated, chunks=result.chunks,
                          output_tokens=len(tokenizer(result.summary, add_special_tokens=False)["input_ids"]))  # fmt: skip
            stats["examples"] += 1
            stats["input_tokens"] += result.input_tokens
        writer.write(record)
        progress.update(task, advance=1)

    progress = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not console.is_terminal)  # fmt: skip
    with progress:
        task = progress.add_task("eval", total=len(todo))
        summarizer.summarize(todo, on_result)
    stats["seconds"] = time.perf_counter() - start
    return settings


def _score(cfg, data, predictions, out_dir, preset, settings, gen_stats, started, t0, console) -> int:
    from longsum.jsonl import read_records
    from longsum.metrics import METRIC_RECIPE, ROUGE_TYPES, aggregate
    from longsum.provenance import now, provenance

    wanted = {ex_id for ex_id, _, _ in data.examples}
    records = {r["id"]: r for r in read_records(predictions) if r.get("id") in wanted}
    missing = wanted - set(records)
    if missing:
        raise LongsumError(f"{len(missing)} examples have no prediction in {predictions}; run the same command again")
    ok = [r for r in records.values() if "error" not in r]
    failed = [r for r in records.values() if "error" in r]
    if not ok:
        raise LongsumError(f"every example failed (first error: {failed[0]['error']}); no score to report")
    metrics = aggregate([r["scores"] for r in ok], seed=cfg.seed)
    results = {
        "metrics": metrics,
        "examples": len(ok),
        "failed": len(failed),
        "mean_prediction_tokens": sum(r["output_tokens"] for r in ok) / len(ok),
        "mean_prediction_words": sum(len(r["prediction"].split()) for r in ok) / len(ok),
        "truncated_inputs": sum(bool(r.get("truncated")) for r in ok),
        "throughput": {
            **gen_stats,
            "examples_per_s": gen_stats["examples"] / gen_stats["seconds"] if gen_stats["seconds"] else None,
        },  # fmt: skip
        "metric_recipe": METRIC_RECIPE,
        "dataset": {"name": cfg.dataset, **data.source},
        "model": model_identity(cfg.model),
        "generation": settings or {"preset": preset, **asdict(cfg.generation)},
        "generation_preset": preset,
        "config": asdict(cfg),
        "provenance": provenance(),
        "timings": {"started": started, "finished": now(), "seconds": time.perf_counter() - t0},
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    _print_table(results, console, ROUGE_TYPES)
    if cfg.compare:
        print_comparison(results, cfg.compare, console)
    console.print(f"wrote {out_dir / 'results.json'} and {predictions}")
    if failed:
        console.print(f"[red]{len(failed)} example(s) failed and are not in the scores (see 'error' in {predictions})")
        return 1
    return 0


def _print_table(results: dict, console, rouge_types) -> None:
    from rich.table import Table

    table = Table(title=f"{results['dataset']['name']} ({results['examples']} examples) - {results['model']['name']}")
    for column in ("metric", "F1 x100", "95% interval"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for name in rouge_types:
        m = results["metrics"][name]
        table.add_row(name, f"{m['mean']:.2f}", f"[{m['low']:.2f}, {m['high']:.2f}]")
    table.add_row("gen. length", f"{results['mean_prediction_tokens']:.1f} tok", "")
    console.print(table)


def print_comparison(results: dict, other_path: str, console) -> None:
    from rich.table import Table

    try:
        other = json.loads(Path(other_path).read_text())
        other_metrics = other["metrics"]
    except (OSError, ValueError, KeyError) as err:
        raise LongsumError(f"cannot read --compare file {other_path}: {err}") from None
    table = Table(title=f"this run vs {other_path}")
    for column in ("metric", "this", "other", "difference"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for name, mine in results["metrics"].items():
        theirs = other_metrics.get(name, {}).get("mean")
        diff = "" if theirs is None else f"{mine['mean'] - theirs:+.2f}"
        table.add_row(name, f"{mine['mean']:.2f}", "-" if theirs is None else f"{theirs:.2f}", diff)
    console.print(table)
