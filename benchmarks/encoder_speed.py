"""Encoder speed / activation-memory benchmark: longsum's LSG encoder against dense and long-input baselines.

What it measures: one forward pass of each encoder (batch 1, random weights, random token ids, eval mode,
``torch.no_grad()``) at several sequence lengths: the median wall-clock time of ``--repeats`` passes after a
warm-up, and the peak activation memory of the warm-up pass. CPU: fp32 on ONE thread. CUDA (auto-detected,
or ``--device cuda``): bf16.

Models (bart-base size unless noted):
  lsg-norm-128/128    longsum LSGBartEncoder, block 128, sparse block 128, factor 2, "norm" selection
  lsg-local-256/0     longsum LSGBartEncoder, block 256, local attention only
  dense-sdpa          stock BartEncoder, full attention through torch SDPA
  no-attention-floor  stock BartEncoder with softmax(QK^T)V replaced by the identity (keeps the q/k/v/out
                      projections and FFNs): the floor no attention method can beat
  longt5-local        transformers' LongT5EncoderModel, long-t5-local-base size (radius 127)
  longt5-tglobal      transformers' LongT5EncoderModel, long-t5-tglobal-base size (global block 16)
  longsum-longt5-local / longsum-longt5-tglobal
                      the same models with longsum's LongT5 attention (`longsum.model.longt5`)
  t5-floor            the same LongT5 encoder with attention replaced by the identity (keeps the q/k/v/o
                      projections and the gated FFNs): the floor for the LongT5 rows
  led-base            LED encoder, led-base-16384 size (window 1024)

How: every (model, length) runs in a fresh subprocess (``--worker``) so peak memory is not polluted. The
worker builds the model, runs a short priming pass (lazy kernel/library init is not activation memory), then:
  CPU   baseline = RSS (after gc + malloc_trim); the kernel's peak-RSS counter is reset (/proc/self/clear_refs,
        else ru_maxrss with a warning if building peaked higher); activation_mib = peak RSS of the warm-up pass
        - baseline. RSS carries allocator/BLAS-buffer noise (tens of MiB), so one more untimed pass under
        torch.profiler gives tensor_peak_mib: the peak of torch's CPU allocator total (deterministic; the CPU
        analogue of CUDA's max_memory_allocated). Skip it with --no-tensor-peak.
  CUDA  activation_mib = tensor_peak_mib = max_memory_allocated during the warm-up - memory_allocated before.

Run from the repository root (the full CPU run, up to 16384 tokens, takes a long while):
    python benchmarks/encoder_speed.py
    python benchmarks/encoder_speed.py --lengths 1024 4096 --repeats 1          # quicker
    python benchmarks/encoder_speed.py --models lsg-norm-128/128 dense-sdpa no-attention-floor
Outputs: a table and the target ratios on stdout; encoder_speed.json (every measurement, ratios, provenance)
and encoder_speed.png (time and memory vs length, log-log) in --out-dir (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LSG, FLOOR, DENSE = "lsg-norm-128/128", "no-attention-floor", "dense-sdpa"
T5_FLOOR = "t5-floor"
LONGT5 = ["longt5-local", "longt5-tglobal", "longsum-longt5-local", "longsum-longt5-tglobal", T5_FLOOR]
MODELS = [LSG, "lsg-local-256/0", DENSE, FLOOR, *LONGT5, "led-base"]
# LongT5 targets (issue: tglobal at 16k): speed-up vs transformers, memory rise vs transformers, time vs floor
LONGT5_TARGETS = {"tglobal": (3.0, 1 / 3, 1.7), "local": (None, None, 1.3)}
BART = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12)
BART.update(decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
# length -> (time target vs floor, memory target vs dense, original LSG time ratio, original LSG memory ratio)
TARGETS = {16384: (1.3, 1.5, 2.4, 5.9), 4096: (1.5, 1.5, 2.05, 2.2)}
MIB = 2**20


# ----------------------------------------------------------------------------------------- worker side
def build(name: str, length: int):
    """The encoder for `name`, and a call counter for its attention function (None where not checked)."""
    from transformers import AttentionInterface, BartConfig, LEDConfig, LEDModel, LongT5Config, LongT5EncoderModel
    from transformers.models.bart.modeling_bart import BartEncoder

    if name.startswith("lsg-"):
        from longsum.model.lsg import LSGBartConfig
        from longsum.model.lsg.bart import LSGBartEncoder

        lsg = dict(block_size=128, sparse_block_size=128, sparsity_factor=2, sparsity_type="norm")
        if name == "lsg-local-256/0":
            lsg = dict(block_size=256, sparse_block_size=0, sparsity_type="none")
        config = LSGBartConfig(**BART, max_position_embeddings=length, num_global_tokens=1, **lsg)
        return LSGBartEncoder(config), None
    if name in (DENSE, FLOOR):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        def identity(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
            return value.transpose(1, 2).contiguous(), None  # value [b, h, n, d] -> [b, n, h, d]

        calls = {"n": 0}
        impl, key = (sdpa_attention_forward, "sdpa") if name == DENSE else (identity, "identity")

        def counted(*args, **kwargs):  # proves the registered function is the one the model calls
            calls["n"] += 1
            return impl(*args, **kwargs)

        AttentionInterface.register(key, counted)
        config = BartConfig(**BART, max_position_embeddings=length)
        config._attn_implementation = key
        enc = BartEncoder(config)
        assert enc.config._attn_implementation == key, enc.config._attn_implementation
        return enc, calls
    if name in LONGT5:
        kind = "transient-global" if name.endswith("tglobal") else "local"
        t5 = dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, vocab_size=32128)
        config = LongT5Config(**t5, encoder_attention_type=kind, local_radius=127, global_block_size=16,
                              feed_forward_proj="gated-gelu")  # fmt: skip
        model = LongT5EncoderModel(config)
        if name.startswith("longsum-"):
            from longsum.model.longt5 import use_longsum_attention

            use_longsum_attention(model)
        if name == T5_FLOOR:
            for module in model.modules():
                if type(module).__name__ == "LongT5LocalAttention":
                    module.__class__ = _floor_attention_class()
        return model, None
    if name == "led-base":
        model = LEDModel(LEDConfig(**BART, attention_window=1024, max_encoder_position_embeddings=16384))
        return model.get_encoder(), None  # the decoder is freed with `model`
    raise ValueError(f"unknown model {name!r}")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the RSS baseline is live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tensor_peak_bytes(prof) -> int | None:
    """Peak of torch's CPU allocator total during a profiled pass, over the total at its start."""
    try:  # private profiler API: on failure the RSS number stands alone
        nodes, allocs = list(prof.profiler.kineto_results.experimental_event_tree()), []
        while nodes:
            node = nodes.pop()
            nodes.extend(node.children)
            if "Allocation" in str(node.tag):
                allocs.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
        allocs.sort()
        return max(total for _, total, _ in allocs) - (allocs[0][1] - allocs[0][2])
    except Exception:  # noqa: BLE001
        return None


def worker(name: str, length: int, args) -> dict:
    import torch

    torch.manual_seed(0)
    cuda = args.device == "cuda"
    torch.set_num_threads(args.threads)
    enc, calls = build(name, length)
    enc = enc.to(device=args.device, dtype=torch.bfloat16 if cuda else torch.float32).eval()
    ids = torch.randint(4, enc.config.vocab_size, (1, length), device=args.device)
    mask = torch.ones_like(ids)
    out: dict = {"model": name, "length": length, "attn_implementation": enc.config._attn_implementation}
    warnings: list[str] = []
    with torch.no_grad():
        enc(input_ids=ids[:, :256], attention_mask=mask[:, :256])  # priming pass
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            malloc_trim()
            before, build_peak, reset_ok = rss_bytes(), peak_rss_bytes(), reset_peak_rss()
        if calls is not None:
            calls["n"] = 0
        enc(input_ids=ids, attention_mask=mask)  # warm-up: the memory measurement
        if cuda:
            torch.cuda.synchronize()
            out["activation_mib"] = out["tensor_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / MIB
        else:
            peak = peak_rss_bytes()
            out["activation_mib"] = (peak - before) / MIB
            if not reset_ok and peak <= build_peak:
                warnings.append("building the model peaked above the forward: memory is an upper bound")
        if calls is not None:
            if calls["n"] != len(enc.layers):
                raise RuntimeError(f"attention function ran {calls['n']}x per forward, expected {len(enc.layers)}")
            out["attn_calls_per_forward"] = calls["n"]
        if not cuda and args.tensor_peak:  # one more, untimed pass
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                enc(input_ids=ids, attention_mask=mask)
            peak_bytes = tensor_peak_bytes(prof)
            out["tensor_peak_mib"] = None if peak_bytes is None else peak_bytes / MIB
        times = []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            enc(input_ids=ids, attention_mask=mask)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out.update(seconds=statistics.median(times), times=times, warnings=warnings)
    return out


# ----------------------------------------------------------------------------------------- driver side
def run_one(name: str, length: int, args) -> dict:
    repeats = args.repeats_long if length >= 16384 else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", name, str(length), "--out", str(path), "--device", args.device]
        cmd += ["--repeats", str(repeats), "--threads", str(args.threads)]
        cmd += [] if args.tensor_peak else ["--no-tensor-peak"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"model": name, "length": length, "error": f"timed out after {args.timeout}s"}
        if path.exists():
            return json.loads(path.read_text())
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"model": name, "length": length, "error": f"worker exited {proc.returncode} (killed?): {tail}"}


def _floor_attention_class():
    from transformers.models.longt5.modeling_longt5 import LongT5LocalAttention

    class FloorAttention(LongT5LocalAttention):
        """The q/k/v/o projections of LongT5 attention with softmax(QK^T)V replaced by V."""

        def forward(self, hidden_states, mask=None, position_bias=None, output_attentions=False):
            self.q(hidden_states), self.k(hidden_states)
            return self.o(self.v(hidden_states)), position_bias

    return FloorAttention


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if a is None or b is None or a.get(key) is None or not b.get(key) or b[key] <= 0:
        return None
    return a[key] / b[key]


def ratios(results: list[dict], lengths: list[int]) -> list[dict]:
    get = {(r["model"], r["length"]): r for r in results if "error" not in r}
    rows = []
    for n in sorted(set(lengths) | set(TARGETS), reverse=True):
        lsg, floor, dense = get.get((LSG, n)), get.get((FLOOR, n)), get.get((DENSE, n))
        t_tgt, m_tgt, t_orig, m_orig = TARGETS.get(n, (None,) * 4)
        rows.append(dict(length=n, time_vs_floor=ratio(lsg, floor, "seconds"), time_target=t_tgt,
                         time_original_lsg=t_orig, memory_vs_dense=ratio(lsg, dense, "activation_mib"),
                         tensor_memory_vs_dense=ratio(lsg, dense, "tensor_peak_mib"), memory_target=m_tgt,
                         memory_original_lsg=m_orig))  # fmt: skip
    return rows


def longt5_ratios(results: list[dict], lengths: list[int]) -> list[dict]:
    """longsum's LongT5 attention against transformers' and the T5 floor, per kind and length."""
    get = {(r["model"], r["length"]): r for r in results if "error" not in r}
    rows = []
    for n in lengths:
        for kind in ("local", "tglobal"):
            ours, theirs, floor = (
                get.get((f"longsum-longt5-{kind}", n)),
                get.get((f"longt5-{kind}", n)),
                get.get((T5_FLOOR, n)),
            )
            if ours is None:
                continue
            speed = ratio(theirs, ours, "seconds")
            memory = ratio(ours, theirs, "activation_mib")
            rows.append(dict(length=n, kind=kind, speedup_vs_transformers=speed, memory_vs_transformers=memory,
                             tensor_memory_vs_transformers=ratio(ours, theirs, "tensor_peak_mib"),
                             time_vs_floor=ratio(ours, floor, "seconds"), targets=LONGT5_TARGETS[kind]))  # fmt: skip
    return rows


def _judge(value: float | None, target: float | None, judged: bool, low: bool = False) -> str:
    if value is None:
        return "n/a"
    if target is None or not judged:
        return f"{value:.2f}x"
    return f"{value:.2f}x [{'PASS' if (value <= target if low else value >= target) else 'FAIL'}]"


def fmt_ratio(value: float | None, target: float | None, original: float | None) -> str:
    if value is None:
        return "n/a (not measured)"
    if target is None:
        return f"{value:5.2f}x  (no target at this length)"
    mark = "PASS" if value <= target else "FAIL"
    return f"{value:5.2f}x  target <= {target}x [{mark}]   original LSG: {original}x"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_report(results: list[dict], lengths: list[int], models: list[str], rows: list[dict]) -> None:
    get = {(r["model"], r["length"]): r for r in results}
    width = max(map(len, models)) + 2
    print("\nmedian forward seconds / activation MiB (peak RSS) / tensor-peak MiB (torch allocator)")
    print("model".ljust(width) + "".join(f"{f'L={n}':>26}" for n in lengths))
    for m in models:
        cells = []
        for n in lengths:
            r = get.get((m, n), {"error": "not run"})
            if "error" in r:
                cells.append("error")
                continue
            star = "*" if r.get("warnings") else ""
            cells.append(f"{r['seconds']:.3f}s / {mib(r['activation_mib'])}{star} / {mib(r.get('tensor_peak_mib'))}")
        print(m.ljust(width) + "".join(f"{c:>26}" for c in cells))
    for r in results:
        for note in [r["error"]] if "error" in r else r.get("warnings", []):
            print(f"  note: {r['model']} @ {r['length']}: {note}")
    print(f"\ntargets: time = {LSG} / {FLOOR}; memory = {LSG} / {DENSE} (RSS, and tensor peak)")
    for row in rows:
        time_ratio = fmt_ratio(row["time_vs_floor"], row["time_target"], row["time_original_lsg"])
        print(f"  L={row['length']:<6} {'time:':<16} {time_ratio}")
        for label, key in (("memory (RSS):", "memory_vs_dense"), ("memory (tensor):", "tensor_memory_vs_dense")):
            print(f"  {'':8} {label:<16} {fmt_ratio(row[key], row['memory_target'], row['memory_original_lsg'])}")


def plot(results: list[dict], models: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    for i, m in enumerate(models):
        ok = sorted((r["length"], r) for r in results if r["model"] == m and "error" not in r)
        style = dict(color=f"C{i}", marker="o", linestyle="--" if m == FLOOR else "-")
        if ok:
            ax_t.plot([n for n, _ in ok], [r["seconds"] for _, r in ok], label=m, **style)
            ax_m.plot([n for n, _ in ok], [max(r["activation_mib"], 1e-3) for _, r in ok], label=m, **style)
        tensor = [(n, r["tensor_peak_mib"]) for n, r in ok if r.get("tensor_peak_mib")]
        if tensor:
            ax_m.plot(*zip(*tensor), color=f"C{i}", marker=".", linestyle=":", alpha=0.6)
    ax_t.set(title="forward time", ylabel="seconds (median)")
    ax_m.set(title="activation memory (solid: peak RSS, dotted: torch tensor peak)", ylabel="MiB")
    lengths = sorted({r["length"] for r in results})
    for ax in (ax_t, ax_m):
        ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)")
        ax.set_xticks(lengths, [str(n) for n in lengths], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def provenance(args, dtype: str) -> dict:
    import torch
    import transformers

    import longsum

    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")]
        device_name = f"{names[0] if names else platform.processor() or 'cpu'} ({os.cpu_count()} cores)"
    return dict(command=[sys.executable, *sys.argv], device=args.device, device_name=device_name, dtype=dtype,
                threads=args.threads if args.device == "cpu" else None, torch=torch.__version__,
                transformers=transformers.__version__, longsum=longsum.__version__,
                python=platform.python_version(), platform=platform.platform(),
                git_head=git.stdout.strip() if git.returncode == 0 else None,
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up")
    p.add_argument("--repeats-long", type=int, default=2, help="timed passes at lengths >= 16384")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the benchmark is defined on 1)")
    p.add_argument("--no-tensor-peak", dest="tensor_peak", action="store_false", help="skip the profiled CPU pass")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per (model, length) subprocess")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        name, length = args.worker[0], int(args.worker[1])
        try:
            result = worker(name, length, args)
        except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
            result = {"model": name, "length": length, "error": f"{type(exc).__name__}: {exc}"[:500]}
        args.out.write_text(json.dumps(result))
        return

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for length in args.lengths:
        for name in args.models:
            t0 = time.perf_counter()
            r = run_one(name, length, args)
            status = r.get("error") or f"{r['seconds']:.3f}s  {mib(r['activation_mib'])} MiB"
            print(f"[{time.perf_counter() - t0:6.1f}s] {name:<20} L={length:<6} {status}", flush=True)
            results.append(r)

    rows = ratios(results, args.lengths)
    print_report(results, args.lengths, args.models, rows)
    t5_rows = longt5_ratios(results, args.lengths)
    if t5_rows:
        print("\nLongT5: longsum's attention vs transformers' (speed-up, activation-memory ratio) and vs the T5 floor")
        for row in t5_rows:
            speed, memory, floor = row["targets"]
            judged = row["length"] >= 16384  # the targets are stated at 16,384 tokens
            print(f"  L={row['length']:<6} {row['kind']:<8} speed-up {_judge(row['speedup_vs_transformers'], speed, judged)}"
                  f"   memory {_judge(row['memory_vs_transformers'], memory, judged, low=True)}"
                  f" (tensor {_judge(row['tensor_memory_vs_transformers'], None, False)})"
                  f"   vs floor {_judge(row['time_vs_floor'], floor, judged, low=True)}")  # fmt: skip
    meta = provenance(args, dtype)
    report = {"provenance": meta, "results": results, "ratios": rows, "longt5_ratios": t5_rows}
    (args.out_dir / "encoder_speed.json").write_text(json.dumps(report, indent=2))
    threads = f", {args.threads} thread(s)" if args.device == "cpu" else ""
    plot(results, args.models, args.out_dir / "encoder_speed.png", f"encoder forward, batch 1, {dtype}{threads}, "
         f"{meta['device_name']}")  # fmt: skip
    print(f"\nwrote {args.out_dir / 'encoder_speed.json'} and {args.out_dir / 'encoder_speed.png'}")


if __name__ == "__main__":
    main()
