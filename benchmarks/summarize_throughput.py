"""Summarization throughput: longsum's batched `Summarizer` against a naive per-document `model.generate` loop.

What it measures: the wall-clock time to summarize the same N documents (lengths ~300 to ~4000 tokens, word
slices of ``examples/docs``) with the same model and the same generate() settings, each method in a fresh
process of its own (same seed, so the same weights):
  naive        for each document in input order: tokenize (truncate to the model's length), ``model.generate``
               at batch size 1, decode; glibc's default allocator, as in a hand-written script
  naive-tuned  the same loop after ``keep_freed_memory()``, the allocator setting `longsum summarize` applies
               on CPU (glibc hands big tensors back to the OS, so every beam-search step page-faults through
               fresh memory; this row shows how much of the speed-up that setting alone is worth)
  batched      ``longsum.model.generation.Summarizer.summarize`` as `longsum summarize` runs it (tokenize once, sort
               by length, batches of ``--batch-size``, ``keep_freed_memory()`` on CPU); the naive loops reuse
               its ``generate_kwargs`` and ``max_source_length``
  batched-exact  the same with ``--exact`` (torch's own CPU kernels instead of oneDNN's packed linear layers)
Each method is warmed up on 2 documents, then timed over all documents (median of ``--repeats``). The output
length is forced (``min_new_tokens == max_new_tokens``) so all generate the same number of tokens, which is
checked, and so is the text of every summary (each must equal the first method's). Reported: seconds, docs/s,
input tokens/s, peak RSS of each process, and the speed-ups batched/naive (against the issue's target: >= 1.5x
on CPU with a small model, >= 3x on GPU with a base-size model) and batched/naive-tuned. Nothing is asserted.

Model: ``--model PATH_OR_ID`` (through ``longsum.load_model``), else an untrained LSG-BART built in code
(``--size small``: d_model 256, 3+3 layers; ``--size base``: bart-base size) with a BPE tokenizer trained on the
example documents. Untrained weights are fine for throughput. CPU: fp32, all threads; CUDA: bf16.

CPU caveats: time on idle cores (a warning is printed, and saved, when other processes keep cores busy; with more
threads than free cores every parallel op waits for a descheduled thread, which penalises the naive loop's many
small ops and inflates the speed-up). ``--threads 1`` gives the steadiest figures.

Run from the repository root:
    python benchmarks/summarize_throughput.py                                  # default (~2 min on 2 idle CPU cores)
    python benchmarks/summarize_throughput.py --num-docs 8 --max-new-tokens 16  # quick check
    python benchmarks/summarize_throughput.py --device cuda --size base         # the GPU target
    python benchmarks/summarize_throughput.py --size base --vocab-size 50265 --threads 1 --num-docs 4 \
        --min-tokens 3900 --max-tokens 4090 --num-beams 4 --max-new-tokens 64    # the CPU decoding target
Outputs: a table on stdout; summarize_throughput.json (measurements, settings, provenance) and
summarize_throughput.png (docs/s and tokens/s bars) in --out-dir (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "small": dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024),
    "base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
}  # fmt: skip
TARGETS = {"cpu": (1.5, "CPU, small model"), "cuda": (3.0, "GPU, base-size model")}


def example_texts() -> list[str]:
    files = sorted(p for p in (ROOT / "examples" / "docs").iterdir() if p.suffix in (".txt", ".md"))
    return [p.read_text(encoding="utf-8") for p in files]


def build_model(size: str, texts: list[str], device: str, dtype, seed: int, vocab_size: int):
    import torch

    from longsum.model.lsg import LSGBartConfig, LSGBartForConditionalGeneration
    from longsum.model.tiny import build_tokenizer

    tokenizer = build_tokenizer(texts, vocab_size=min(vocab_size, 2000), model_max_length=4096)
    # A bigger vocabulary (bart-base's 50,265) costs every decoding step an lm_head that size; the example
    # texts train only ~2,000 BPE tokens, so filler tokens make up the rest (the untrained model emits them).
    tokenizer.add_tokens([f"<x{i}>" for i in range(len(tokenizer), vocab_size)])
    config = LSGBartConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, block_size=64,
                           sparse_block_size=64, dropout=0.0, attention_dropout=0.0, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
                           **SIZES[size])  # fmt: skip
    torch.manual_seed(seed)
    model = LSGBartForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    return model, tokenizer


def make_documents(texts: list[str], tokenizer, n: int, lo: int, hi: int) -> list[tuple[str, str]]:
    """n documents of ~lo..~hi tokens: word slices of the example texts (cycled), at spread-out offsets."""
    words = " ".join(texts).split()
    words_per_token = len(words) / len(tokenizer(" ".join(words), verbose=False)["input_ids"])
    docs = []
    for i in range(n):
        target = lo + (hi - lo) * ((i * 7) % n) / max(n - 1, 1)  # lengths interleaved, not sorted
        count, start = max(1, round(target * words_per_token)), (i * 997) % len(words)
        for _ in range(2):  # the second pass corrects the word count for this slice's own tokens per word
            text = " ".join(words[(start + k) % len(words)] for k in range(count))
            count = max(1, round(count * target / len(tokenizer(text, verbose=False)["input_ids"])))
        docs.append((f"doc{i:03d}", text))
    return docs


class GenerateCounter:
    """Wraps `model.generate` to count decoder tokens per sequence (to check both methods generate as many)."""

    def __init__(self, model):
        self.model, self.original, self.new_tokens = model, model.generate, []
        model.generate = self

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos) if isinstance(eos, list) else {eos}
        for row in out.tolist():  # row[0] is the decoder start token; count up to the first EOS after it
            self.new_tokens.append(next((i for i, t in enumerate(row) if i > 0 and t in eos), len(row) - 1))
        return out


def run_naive(model, tokenizer, docs, summarizer) -> dict:
    import torch

    summaries = {}
    for key, text in docs:
        inputs = tokenizer(text, truncation=True, max_length=summarizer.max_source_length, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs.to(model.device), **summarizer.run_settings.generate)
        summaries[key] = tokenizer.decode(out[0], skip_special_tokens=True).strip()
    return summaries


def run_batched(docs, summarizer) -> dict:
    results = {}
    results.update(summarizer.summarize(docs))
    return {key: (r.summary if r.error is None else None) for key, r in results.items()}


def timed(method, docs, counter, repeats: int) -> tuple[list[float], dict, list[int]]:
    import torch

    times = []
    for _ in range(repeats):
        counter.new_tokens = []
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        summaries = method(docs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, summaries, counter.new_tokens


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def provenance(device_name: str) -> dict:
    import torch
    import transformers

    import longsum

    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return dict(command=[sys.executable, *sys.argv], device_name=device_name, torch=torch.__version__,
                transformers=transformers.__version__, longsum=longsum.__version__,
                python=platform.python_version(), platform=platform.platform(),
                git_head=git.stdout.strip() if git.returncode == 0 else None,
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))  # fmt: skip


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(axes, ("docs_per_s", "input_tokens_per_s"), ("documents / s", "input tokens / s")):
        bars = ax.bar([r["method"] for r in rows], [r[metric] for r in rows], color=["C0", "C1"])
        ax.bar_label(bars, fmt="%.3g")
        ax.set(ylabel=label, title=label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# Each method runs in a process of its own, with the memory allocator its real user gets: glibc's
# defaults for a hand-written loop, keep_freed_memory() for `longsum summarize` on CPU (which calls it).
# "naive-tuned" is the hand-written loop given that setting too, to show what the allocator alone is worth.
METHODS = {
    "naive": dict(label="naive (batch 1)", tuned_allocator=False),
    "naive-tuned": dict(label="naive, tuned alloc.", tuned_allocator=True),
    "batched": dict(label="batched (batch {batch_size})", tuned_allocator=True),
    "batched-exact": dict(label="batched, --exact", tuned_allocator=True, exact=True),
}


def resolve_device(name: str) -> str:
    import torch

    return "cuda" if name == "auto" and torch.cuda.is_available() else name.replace("auto", "cpu")


def measure(args, method: str) -> dict:
    """One method's timed passes over the documents, in this process (the child side of main())."""
    import resource

    import torch

    from longsum.model.generation import GenerationOptions, Summarizer, keep_freed_memory

    device = resolve_device(args.device)
    tuned = device == "cpu" and METHODS[method]["tuned_allocator"] and keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    texts = example_texts()
    if args.model:
        from longsum import load_model

        model, tokenizer = load_model(args.model, device=device, dtype="bf16" if device == "cuda" else "fp32")
    else:
        model, tokenizer = build_model(args.size, texts, device, dtype, args.seed, args.vocab_size)
    options = GenerationOptions(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                min_new_tokens=args.max_new_tokens, no_repeat_ngram_size=args.no_repeat_ngram_size,
                                length_penalty=1.0, batch_size=args.batch_size,
                                max_source_length=args.max_source_length,
                                exact=METHODS[method].get("exact", False))  # fmt: skip
    summarizer = Summarizer(model, tokenizer, options)
    docs = make_documents(texts, tokenizer, args.num_docs, args.min_tokens, args.max_tokens)
    lengths = [min(len(ids), summarizer.max_source_length) for ids in tokenizer([t for _, t in docs])["input_ids"]]
    cfg = model.config
    model_summary = dict(name=args.model or f"untrained lsg_bart ({args.size})", model_type=cfg.model_type,
                         d_model=cfg.d_model, layers=f"{cfg.encoder_layers}+{cfg.decoder_layers}",
                         heads=cfg.encoder_attention_heads, ffn=cfg.encoder_ffn_dim, vocab_size=cfg.vocab_size,
                         parameters=sum(t.numel() for t in model.parameters()),
                         block_size=getattr(cfg, "block_size", None),
                         sparse_block_size=getattr(cfg, "sparse_block_size", None))  # fmt: skip
    counter = GenerateCounter(model)
    if method.startswith("naive"):
        run = lambda d: run_naive(model, tokenizer, d, summarizer)  # noqa: E731
    else:
        run = lambda d: run_batched(d, summarizer)  # noqa: E731
    run(docs[:2])  # warm-up
    times, summaries, new_tokens = timed(run, docs, counter, args.repeats)
    label = METHODS[method]["label"].format(batch_size=args.batch_size)
    print(f"  {label}: {statistics.median(times):.1f} s", flush=True)
    return dict(method=label, key=method, tuned_allocator=tuned, times=times, summaries=summaries,
                new_tokens=new_tokens, docs=[k for k, _ in docs], lengths=lengths, model=model_summary,
                generate_kwargs=summarizer.run_settings.generate, max_source_length=summarizer.max_source_length,
                device=device, dtype=str(dtype).split(".")[-1],
                threads=torch.get_num_threads() if device == "cpu" else None,
                device_name=torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip


def run_child(method: str) -> dict:
    """Run this script for one method in a fresh process and return what its measure() saw."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", method, "--child-out", str(out)])
        if done.returncode != 0:
            sys.exit(f"the {method} run failed (exit {done.returncode})")
        return json.loads(out.read_text(encoding="utf-8"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder or Hub id (default: an untrained LSG-BART built in code)")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="size of the built model")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=2000,
        help="vocabulary of the built model (50265 is bart-base's; beyond ~2,000 it is filler tokens)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument("--num-docs", type=int, default=24)
    p.add_argument("--min-tokens", type=int, default=300, help="shortest document (approx. tokens)")
    p.add_argument("--max-tokens", type=int, default=4000, help="longest document (approx. tokens)")
    p.add_argument("--batch-size", type=int, default=4, help="the CLI default")
    p.add_argument("--num-beams", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48, help="also min_new_tokens: a fixed output length")
    p.add_argument("--no-repeat-ngram-size", type=int, default=3)
    p.add_argument("--max-source-length", type=int, default=None, help="default: the model's length")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per method (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default="summarize_throughput", help="output file stem")
    p.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.child_out.write_text(json.dumps(measure(args, args.child)), encoding="utf-8")
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--methods: {', '.join(unknown) or 'none given'}; choose from {', '.join(METHODS)}")
    device = resolve_device(args.device)
    if device == "cuda" and "naive-tuned" in methods:  # the allocator setting is for CPU runs only
        methods.remove("naive-tuned")
    from longsum.model.cpu import busy_cores

    busy = busy_cores() if device == "cpu" else None
    import torch

    cores, threads = os.cpu_count() or 1, args.threads or torch.get_num_threads()  # the children's count
    contended = busy is not None and busy + threads > cores + 0.5
    if contended:
        print(f"WARNING: other processes keep ~{busy:.1f} of {cores} cores busy; timings are slowed and noisy"
              + (f" (try --threads {max(1, round(cores - busy))})" if threads > 1 else ""))  # fmt: skip
    results = [run_child(method) for method in methods]  # each prints its time as it ends
    first = results[0]
    print(f"\nmodel: {first['model']}\ndevice: {first['device']} ({first['device_name']}), dtype "
          f"{first['dtype']}, threads {first['threads']}\ngenerate: {first['generate_kwargs']}, batch_size "
          f"{args.batch_size}, max_source_length {first['max_source_length']}\ndocs: {len(first['docs'])}, "
          f"{sum(first['lengths'])} input tokens (min {min(first['lengths'])}, median "
          f"{int(statistics.median(first['lengths']))}, max {max(first['lengths'])})")  # fmt: skip
    keys, n_tokens = first["docs"], sum(first["lengths"])
    rows = []
    for r in results:
        seconds = statistics.median(r["times"])
        missing = [k for k in keys if r["summaries"].get(k) is None]
        rows.append(dict(method=r["method"], key=r["key"], tuned_allocator=r["tuned_allocator"], docs=len(keys),
                         input_tokens=n_tokens, seconds=seconds, all_seconds=r["times"],
                         docs_per_s=len(keys) / seconds, input_tokens_per_s=n_tokens / seconds,
                         generated_tokens=sum(r["new_tokens"]), new_tokens_per_doc=sorted(set(r["new_tokens"])),
                         peak_rss_mib=r["peak_rss_mib"], summaries_ok=len(keys) - len(missing), missing=missing,
                         empty_summaries=sum(1 for k in keys if r["summaries"].get(k) == "")))  # fmt: skip
    by_key = {r["key"]: (row, r) for row, r in zip(rows, results)}
    # Every method must give the per-document loop's summaries (padding and shared keys included).
    reference = results[0]["summaries"]
    for row, r in zip(rows, results):
        row["identical_summaries"] = sum(1 for k in keys if reference.get(k) is not None
                                         and reference.get(k) == r["summaries"].get(k))  # fmt: skip
    speedups = {}  # "batched/naive": seconds of naive / seconds of batched
    for fast in ("batched", "batched-exact"):
        for naive in ("naive", "naive-tuned"):
            if fast in by_key and naive in by_key:
                speedups[f"{fast}/{naive}"] = by_key[naive][0]["seconds"] / by_key[fast][0]["seconds"]
    target, target_case = TARGETS[device]
    headline_pair = "batched/naive" if "batched/naive" in speedups else next(iter(speedups), None)
    headline = speedups.get(headline_pair)
    verdict = None if headline is None else ("PASS" if headline >= target else "FAIL")

    print(f"\n{'method':<22} {'docs':>5} {'in tokens':>10} {'seconds':>9} {'docs/s':>8} {'in tok/s':>9} "
          f"{'gen tok':>8} {'peak MiB':>9} {'ok':>6} {'same':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['method']:<22} {r['docs']:>5} {r['input_tokens']:>10} {r['seconds']:>9.2f} {r['docs_per_s']:>8.3f} "
              f"{r['input_tokens_per_s']:>9.0f} {r['generated_tokens']:>8} {r['peak_rss_mib']:>9.0f} "
              f"{r['summaries_ok']:>3}/{r['docs']:<2} {r['identical_summaries']:>3}/{r['docs']:<2}")  # fmt: skip
    for pair, speedup in speedups.items():
        print(f"speed-up {pair}: {speedup:.2f}x")
    if verdict:
        print(f"target >= {target}x ({target_case}), {headline_pair}: {verdict}")
    print(f"identical summaries (vs {rows[0]['method']}): {min(r['identical_summaries'] for r in rows)}/{len(keys)}")
    if len({tuple(r["new_tokens_per_doc"]) for r in rows}) > 1:
        print(f"WARNING: generated lengths differ: {[(r['method'], r['new_tokens_per_doc']) for r in rows]}")
    if any(r["missing"] for r in rows):
        print(f"WARNING: missing summaries: {[(r['method'], r['missing']) for r in rows if r['missing']]}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = dict(results=rows, speedups=speedups, target=target, target_case=target_case, verdict=verdict,
                  settings=dict(model=first["model"], generate_kwargs=first["generate_kwargs"],
                                batch_size=args.batch_size, max_source_length=first["max_source_length"],
                                device=device, dtype=first["dtype"], threads=first["threads"],
                                busy_cores_before=busy, contended=contended,
                                repeats=args.repeats, seed=args.seed, doc_lengths=first["lengths"]),
                  provenance=provenance(first["device_name"]))  # fmt: skip
    json_path, png_path = args.out_dir / f"{args.name}.json", args.out_dir / f"{args.name}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    where = (
        f"{device}, {first['threads']} threads" + (" (contended)" if contended else "") if first["threads"] else device
    )
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items())
    plot(rows, png_path, f"{first['model']['name']} on {where}, {len(keys)} docs, {n_tokens} input tokens: {ratios}")
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
