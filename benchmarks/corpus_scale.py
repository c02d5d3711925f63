"""Whole `longsum` commands on big, messy corpora: peak memory and time to the first record.

    python benchmarks/corpus_scale.py                       # all scenarios, the checkout's longsum
    python benchmarks/corpus_scale.py --baseline-src /tmp/old --seconds 120   # A/B with another checkout

Scenarios (corpora are generated once into --work-dir):
* big-doc:    a 30 MB single-document text file next to a small one (`summarize`, truncate mode);
* records:    a 400 MB JSONL of 200,000 records (`summarize`);
* eval-local: the same records with references, as a local dataset (`eval`);
* chunk-1mb:  a 1 MB document with `--long-input chunk`: the time to cut it into windows (in process).

Each command runs in a fresh process, sampled every 50 ms (RSS of the process tree, psutil). A run
stops at its end or after --seconds. The model is an untrained tiny LSG-BART built here (the
summaries mean nothing: this measures the plumbing), with short inputs and outputs so that the
reading side, not generation, is what is measured. Results: benchmarks/results/corpus_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORDS = (ROOT / "examples" / "docs" / "river_town_history.txt").read_text().split()


def sentence(rng: random.Random, n: int = 18) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ". "


def make_corpora(work: Path) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    big, small = work / "big.txt", work / "small.txt"
    if not big.exists():
        with open(big, "w") as f:
            size = 0
            while size < 30_000_000:
                paragraph = "".join(sentence(rng) for _ in range(6)) + "\n\n"
                f.write(paragraph)
                size += len(paragraph)
        small.write_text("".join(sentence(rng) for _ in range(20)))
    records = work / "records.jsonl"
    if not records.exists():
        tmp = records.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for i in range(200_000):
                text = "".join(sentence(rng) for _ in range(16))  # ~2 KB
                f.write(json.dumps({"id": f"doc{i}", "text": text, "summary": sentence(rng)}) + "\n")
        tmp.rename(records)
    one_mb = work / "one_mb.txt"
    if not one_mb.exists():
        one_mb.write_text("".join("".join(sentence(rng) for _ in range(5)) + "\n\n" for _ in range(2200))[:1_000_000])
    return {"big": big, "small": small, "records": records, "one_mb": one_mb}


def tiny_model(work: Path) -> Path:
    folder = work / "tiny-lsg-bart"
    if not (folder / "config.json").exists():
        from longsum.model.tiny import build_tiny_lsg_bart

        texts = [p.read_text() for p in (ROOT / "examples" / "docs").glob("*.txt")]
        build_tiny_lsg_bart(texts, folder, max_positions=4096, block_size=64, sparse_block_size=64)
    return folder


def measure(cmd: list[str], output: Path, seconds: float, env: dict, cwd: Path) -> dict:
    """Run `cmd`; peak RSS of its tree, seconds to the first complete output line, records written."""
    import psutil

    for stale in output.parent.glob(output.name + "*"):
        stale.unlink() if stale.is_file() else None
    start = time.perf_counter()
    # cwd: `python -m` puts the current folder first on sys.path, which would shadow --baseline-src
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    ps = psutil.Process(proc.pid)
    peak, peak_anon, first, timeline = 0, 0, None, []
    while proc.poll() is None:
        now = time.perf_counter() - start
        try:
            infos = [p.memory_info() for p in [ps, *ps.children(recursive=True)]]
        except psutil.Error:
            infos = []
        rss = sum(i.rss for i in infos)
        peak = max(peak, rss)
        # RSS minus file-backed pages (memory-mapped Arrow data, libraries): what the process allocated
        peak_anon = max(peak_anon, sum(i.rss - getattr(i, "shared", 0) for i in infos))
        if rss:
            timeline.append((round(now, 2), rss >> 20))
        if first is None and output.exists():
            with open(output, "rb") as f:
                if b"\n" in f.read(1 << 16):
                    first = now
        if now > seconds:
            proc.send_signal(signal.SIGTERM)  # longsum stops cleanly on SIGTERM (SIGINT may be ignored here)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    stderr = proc.stderr.read() if proc.stderr else ""
    lines = output.read_bytes().count(b"\n") if output.exists() else 0
    return {"command": " ".join(cmd), "exit_code": proc.returncode, "seconds": round(elapsed, 1),
            "stopped_at_limit": elapsed > seconds, "first_record_s": None if first is None else round(first, 2),
            "peak_rss_mib": peak >> 20, "peak_anon_mib": peak_anon >> 20, "records": lines, "stderr_tail": stderr.strip().splitlines()[-3:],
            "timeline": timeline[:: max(1, len(timeline) // 400)]}  # fmt: skip


def chunk_time(one_mb: Path, model: Path) -> dict:
    from longsum.data.text import sentence_windows
    from longsum.model.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(model)
    text = one_mb.read_text()
    start = time.perf_counter()
    windows = list(sentence_windows(text, tokenizer, 4096))
    return {"characters": len(text), "windows": len(windows), "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="/tmp/longsum-corpus-scale")
    parser.add_argument("--seconds", type=float, default=600, help="stop a command after this long")
    parser.add_argument("--baseline-src", help="another longsum checkout to run the same commands with (A/B)")
    parser.add_argument("--out", default="corpus_scale", help="name of the JSON/PNG in benchmarks/results/")
    parser.add_argument("--only", nargs="*", default=["big-doc", "records", "eval-local", "chunk-1mb"])
    parser.add_argument("--records-args", default="--max-source-length 256 --max-new-tokens 2 --num-beams 1 "
                        "--batch-size 32", help="generation flags for the record corpora (keep generation cheap)")  # fmt: skip
    args = parser.parse_args()
    work = Path(args.work_dir)
    corpora = make_corpora(work)
    model = tiny_model(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(work / "hf-datasets")}  # fmt: skip
    variants = {"longsum": env}
    if args.baseline_src:
        variants["baseline"] = {**env, "PYTHONPATH": str(Path(args.baseline_src).resolve())}
    light = args.records_args.split()
    scenarios = {
        "big-doc": lambda out: ["summarize", str(corpora["big"]), str(corpora["small"]), "-m", str(model), "-o",
                                str(out), "--max-new-tokens", "8"],
        "records": lambda out: ["summarize", str(corpora["records"]), "-m", str(model), "-o", str(out), *light],
        "eval-local": lambda out: ["eval", str(corpora["records"]), "-m", str(model), "--output-dir", str(out.parent
                                   / "eval"), *light],
    }  # fmt: skip
    report = {"work_dir": str(work), "corpora": {k: os.path.getsize(v) for k, v in corpora.items()}, "runs": {}}
    saved = RESULTS / f"{args.out}.json"
    if saved.exists():  # runs of other scenarios from an earlier invocation are kept
        report["runs"] = json.loads(saved.read_text()).get("runs", {})
    for name, build in scenarios.items():
        if name not in args.only:
            continue
        for variant, variant_env in variants.items():
            out = work / f"out-{name}-{variant}" / "out.jsonl"
            out.parent.mkdir(exist_ok=True)
            watched = out.parent / "eval" / "predictions.jsonl" if name == "eval-local" else out
            if name == "eval-local":
                subprocess.run(["rm", "-rf", str(out.parent / "eval"), str(work / "hf-datasets")])
            result = measure([sys.executable, "-m", "longsum", *build(out)], watched, args.seconds, variant_env, work)
            report["runs"][f"{name}/{variant}"] = result
            print(f"{name:<11} {variant:<9} first record {result['first_record_s']} s, peak RSS "
                  f"{result['peak_rss_mib']:,} MiB (anonymous {result['peak_anon_mib']:,}), {result['records']:,} records in {result['seconds']} s"
                  f"{' (stopped at the limit)' if result['stopped_at_limit'] else ''}, exit {result['exit_code']}",
                  flush=True)  # fmt: skip
    if "chunk-1mb" in args.only:
        report["chunk_1mb"] = chunk_time(corpora["one_mb"], model)
        print(f"chunk-1mb   windows {report['chunk_1mb']['windows']} in {report['chunk_1mb']['seconds']} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2))
    plot(report, RESULTS / f"{args.out}.png")


def plot(report: dict, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, run in report["runs"].items():
        if run["timeline"]:
            ax.plot(*zip(*run["timeline"]), label=name)
    ax.set(xlabel="seconds", ylabel="RSS (MiB)", title="longsum commands on big corpora", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    main()
