"""Decoding speed: longsum's generation path against the stock `model.generate` loop, per document.

What it measures: end-to-end seconds per document (encoder + decoding, one document at a time) and the
peak memory of the process, for a bart-base-sized model with random weights, at several input lengths and
beam sizes, with `max_new_tokens == min_new_tokens` (every run decodes the same number of tokens) and
`no_repeat_ngram_size=3`:
  stock     ``model.generate(input_ids, attention_mask=..., **settings)``
  longsum   ``longsum.model.decoding.generate(model, input_ids, attention_mask, **settings)`` (cross-attention
            keys/values once per document, shared by the beams; vectorized n-gram blocking; on CPU the
            kernels `longsum.model.cpu` measured fastest on this CPU (cached per CPU model; the cell reports
            which), or torch's own kernels with ``--exact``)
  int8      (CPU) the same call on the model quantized by ``longsum.model.int8.quantize_int8`` (``--dtype int8``:
            int8 linear layers, inputs quantized per call, the int8 kernels `longsum.model.cpu` measured fastest per
            row class); its ids are compared with stock's, not required equal
  batched   the same call on ``--batch-size`` documents at once, as ``longsum summarize`` decodes them
            (only with ``--batch-size`` > 1; seconds per document = batch seconds / batch size)
  ct2       (1,024 tokens, dense BART-base, only when the optional ``ctranslate2`` package is installed)
            the same weights converted to CTranslate2 and run with ``translate_batch`` (fp32 CPU);
            ``ct2-int8`` the same with ``compute_type="int8"``; ``ct2-batched`` with ``--batch-size``
            documents per call
The model is LSG-BART (bart-base size: 6+6 layers, d_model 768, vocabulary 50,265; block size 128) for
inputs longer than 1,024 tokens and dense BART-base at 1,024; ``--model t5gemma2`` is T5Gemma 2 at its
270M-270M size (18+18 Gemma 3 layers, d_model 640, 4 query heads / 1 key-value head of 256, sliding window
512, vocabulary 262,144; its merged decoder attention decoded by ``SharedKVMergedAttention``) at any length. Each (length, beams, method) cell runs in its
own process (so that its peak RSS is its own), times ``--docs`` documents after a short warm-up document (the
longsum methods inside one `linear_kernels` choice, as ``longsum summarize`` runs its documents: kernels chosen and
layers packed once, in the warm-up) and
reports the median; the fp32 methods' token ids are compared (they must be identical). Nothing is asserted;
the JSON's ``targets`` holds the ratios issue 26 states (longsum fp32 >= stock in every cell, within 1.1x of
CTranslate2 fp32, int8 >= CTranslate2 int8 at 1,024 tokens, int8 >= 1.5x fp32 at 4,096 tokens beams 4 with
no more peak memory), and ``cpu`` the CPU's name and flags.
Every cell gets the same allocator: glibc's defaults, or with ``--allocator tuned`` the setting
`longsum summarize` applies on CPU (``keep_freed_memory()``), which also speeds up the stock loop and
CTranslate2.

Run from the repository root (CPU: 1 thread by default, as the targets are stated):
    python benchmarks/decode_speed.py                                   # the full grid (~30 min on 1 core)
    python benchmarks/decode_speed.py --lengths 4096 --beams 4 --new-tokens 64
    python benchmarks/decode_speed.py --lengths 4096 --beams 4 --docs 4 --batch-size 4   # plus batched decoding
    python benchmarks/decode_speed.py --lengths 1024 --beams 4 --docs 4 --batch-size 4 --allocator tuned
    python benchmarks/decode_speed.py --lengths 1024 4096 --beams 1 4 --docs 2 --allocator tuned   # issue 26's grid
    python benchmarks/decode_speed.py --lengths 1024 --beams 1 4 --methods int8 ct2-int8 --rounds 3 --allocator tuned
    python benchmarks/decode_speed.py --device cuda                     # bf16 on a GPU
    python benchmarks/decode_speed.py --model t5gemma2 --lengths 4096 --beams 1 4 --docs 3 --name decode_speed_t5gemma2
Outputs: a table on stdout; decode_speed.json (cells, settings, provenance) and decode_speed.png in
--out-dir (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from summarize_throughput import cpu_name, provenance  # noqa: E402

BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, dropout=0.0,
            attention_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
            forced_eos_token_id=2)  # fmt: skip
DENSE_MAX = 1024  # BART-base's own length; longer inputs use LSG-BART
# T5Gemma 2 at its smallest published size (270M-270M: Gemma 3 270M's layers), text path; the published
# checkpoints' special ids. The vision tower is tiny here (the published one, ~0.4B parameters, is loaded but
# never run on text, alike for both methods).
T5GEMMA2_TEXT = dict(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                     num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                     sliding_window=512, max_position_embeddings=131_072, pad_token_id=0, eos_token_id=1,
                     bos_token_id=2)  # fmt: skip
# --model: what each builds, and its vocabulary and <bos>/<eos> ids for the random documents.
MODELS = {
    "bart": dict(about="bart-base size, random weights (LSG-BART above 1,024 tokens)", vocab=BASE["vocab_size"],
                 bos=BASE["bos_token_id"], eos=BASE["eos_token_id"]),
    "t5gemma2": dict(about="T5Gemma 2 270M-270M size, random weights, text path (tiny vision tower)",
                     vocab=T5GEMMA2_TEXT["vocab_size"], bos=2, eos=1),
}  # fmt: skip
COLORS = {
    "stock": "C1",
    "longsum": "C0",
    "int8": "C5",
    "batched": "C3",
    "ct2": "C2",
    "ct2-int8": "C6",
    "ct2-batched": "C4",
}


def build_model(length: int, device: str, dtype, family: str = "bart"):
    import torch

    torch.manual_seed(0)
    if family == "t5gemma2":
        from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration

        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)  # fmt: skip
        config = T5Gemma2Config(encoder=dict(text_config=T5GEMMA2_TEXT, vision_config=vision, mm_tokens_per_image=4),
                                decoder=T5GEMMA2_TEXT, pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
        model = T5Gemma2ForConditionalGeneration(config)
    elif length <= DENSE_MAX:
        from transformers import BartConfig, BartForConditionalGeneration

        model = BartForConditionalGeneration(BartConfig(**BASE, max_position_embeddings=DENSE_MAX))
    else:
        from longsum.model.lsg import LSGBartConfig, LSGBartForConditionalGeneration

        config = LSGBartConfig(**BASE, max_position_embeddings=length, block_size=128, sparse_block_size=128)
        model = LSGBartForConditionalGeneration(config)
    return model.to(device=device, dtype=dtype).eval()


def documents(n: int, length: int, seed: int = 0, family: str = "bart"):
    import torch

    ids_of = MODELS[family]
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(5, ids_of["vocab"], (1, length), generator=g)
        ids[0, 0], ids[0, -1] = ids_of["bos"], ids_of["eos"]
        yield ids


def peak_memory(device: str) -> int:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def per_call(args) -> int:
    """Documents per call: `--batch-size` for the batched methods, else one."""
    return args.batch_size if args.cell_method.endswith("batched") else 1


def timed_calls(docs: list, n: int, call, sync=lambda: None) -> tuple[list[float], list]:
    """`call` on `n` documents at a time: seconds per document (each call's time / its size) and outputs."""
    seconds, outputs = [], []
    for i in range(0, len(docs), n):
        batch = docs[i : i + n]
        sync()
        start = time.perf_counter()
        out = call(batch)
        sync()
        seconds += [(time.perf_counter() - start) / len(batch)] * len(batch)
        outputs += out
    return seconds, outputs


def run_cell(args) -> dict:
    """One (length, beams, method) cell, in this process."""
    import torch

    from longsum.model import decoding

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    settings = dict(num_beams=args.cell_beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    no_repeat_ngram_size=3, length_penalty=1.0, do_sample=False)  # fmt: skip
    model = build_model(args.cell_length, device, dtype, args.model)
    if args.cell_method.startswith("ct2"):
        return run_ct2(model, args, settings)
    if args.cell_method == "int8":
        from longsum.model.int8 import quantize_int8

        quantize_int8(model)  # as `--dtype int8` loads: fp32 weights first, then their int8 copies
    loaded = peak_memory(device)

    def generate(ids, **overrides):
        mask, kwargs = torch.ones_like(ids), {**settings, **overrides}
        with torch.inference_mode():
            if args.cell_method == "stock":
                return model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            return decoding.generate(model, ids, mask, exact=args.exact, **kwargs)

    # As `summarize` runs its documents: the run chooses (and packs) its CPU kernels once, for all of them.
    rows = per_call(args) * args.cell_beams
    run = contextlib.nullcontext() if args.cell_method == "stock" else decoding.linear_kernels(model, args.exact, rows)
    with run:
        # First-call costs (allocator, kernels, packing) on a short document.
        generate(next(documents(1, 256, seed=99, family=args.model)).to(device), max_new_tokens=4, min_new_tokens=4)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        # [n, length] per call: equal lengths, no padding
        seconds, outputs = timed_calls(list(documents(args.docs, args.cell_length, family=args.model)),
                                       per_call(args), lambda docs: generate(torch.cat(docs).to(device)).tolist(),
                                       sync)  # fmt: skip
    kernels = None
    if device == "cpu" and args.cell_method != "stock" and not args.exact:
        from longsum.model.cpu import kernel_choice

        layer = None
        if args.cell_method == "int8":  # (the choice's float linear kernel applies to no layer here)
            from longsum.model.cpu import row_class
            from longsum.model.int8 import activation_range, int8_layer

            layer = int8_layer(model)
        kernels = kernel_choice(rows).describe(rows, layer.kernels[row_class(rows)] if layer else None)
        if layer:
            encoder, r = layer.kernels[row_class(args.cell_length)], activation_range()
            kernels += f"; the encoder's {args.cell_length} rows: int8 ({encoder}); int8 inputs in [-{r}, {r}]"
    return dict(seconds=seconds, median_s=statistics.median(seconds), peak_bytes=peak_memory(device),
                model_bytes=loaded, outputs=outputs, kernels=kernels)  # fmt: skip


def run_ct2(model, args, settings) -> dict:
    """The same dense BART through CTranslate2, converted once into a temporary folder.

    Tokens are ids written as strings: a word-level tokenizer whose vocabulary is "0".."50264" is saved
    with the model, so the converter's vocabulary maps each string back to the same id. The method
    ``ct2-batched`` translates ``--batch-size`` documents per call, like ``batched``.
    """
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {str(i): i for i in range(BASE["vocab_size"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="3")), bos_token="0",
                                        pad_token="1", eos_token="2", unk_token="3")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        hf, ct = Path(tmp) / "hf", Path(tmp) / "ct2"
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        config = json.loads((hf / "config.json").read_text())
        # CTranslate2 4.8 reads these BART keys, which transformers 5 no longer writes.
        config.update(normalize_before=False, add_final_layer_norm=False, static_position_embeddings=False)
        (hf / "config.json").write_text(json.dumps(config))
        TransformersConverter(str(hf)).convert(str(ct), force=True)
        del model
        compute_type = "int8" if args.cell_method.startswith("ct2-int8") else "float32"
        translator = ctranslate2.Translator(
            str(ct), device="cpu", compute_type=compute_type, intra_threads=args.threads
        )
        options = dict(beam_size=settings["num_beams"], max_decoding_length=args.new_tokens,
                       min_decoding_length=args.new_tokens, no_repeat_ngram_size=3, length_penalty=1.0,
                       max_input_length=args.cell_length)  # fmt: skip
        warm_up = [str(t) for t in next(documents(1, 256, seed=99))[0].tolist()]
        translator.translate_batch([warm_up], **{**options, "max_decoding_length": 4, "min_decoding_length": 4})
        sources = [[str(t) for t in ids[0].tolist()] for ids in documents(args.docs, args.cell_length)]
        seconds, outputs = timed_calls(sources, per_call(args), lambda batch: [
            [int(t) for t in r.hypotheses[0]] for r in translator.translate_batch(batch, **options)])  # fmt: skip
    return dict(seconds=seconds, median_s=statistics.median(seconds), peak_bytes=peak_memory("cpu"),
                new_tokens=[len(o) for o in outputs], outputs=None)  # fmt: skip


def cell_in_subprocess(args, length: int, beams: int, method: str) -> dict:
    cmd = [sys.executable, __file__, "--cell-length", str(length), "--cell-beams", str(beams), "--cell-method", method,
           "--device", args.device, "--docs", str(args.docs), "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--allocator", args.allocator,
           "--model", args.model] + ["--exact"] * args.exact  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_rounds(cells: list[dict]) -> dict:
    """One cell from its rounds: every document's seconds, their median, the largest peak, the first round's
    ids (each round's ids are the same computation), and `round_medians` to show the drift."""
    if len(cells) == 1 or any("error" in c for c in cells):
        return next((c for c in cells if "error" in c), cells[0])
    seconds = [t for c in cells for t in c["seconds"]]
    return {**cells[0], "seconds": seconds, "median_s": statistics.median(seconds),
            "peak_bytes": max(c["peak_bytes"] for c in cells), "round_medians": [c["median_s"] for c in cells]}  # fmt: skip


def cpu_facts() -> dict:
    """The CPU's name, flags and vector ISA, and the kernels longsum measured for it (`longsum.model.cpu`)."""
    from longsum.model import cpu

    feat = cpu.features()
    return dict(name=feat.name, flags=sorted(feat.flags), torch_capability=feat.capability, avx512=feat.avx512,
                vnni=feat.vnni, cores=os.cpu_count())  # fmt: skip


def targets(rows: list[dict]) -> list[dict]:
    """Issue 26's targets as ratios (above the need: met) for the cells this run has. The int8 against
    fp32 speed and memory targets are stated at 4,096 tokens, beams 4; elsewhere those ratios are
    information (`met` None), not a target missed."""
    cells = {(r["length"], r["beams"], r["method"]): r for r in rows if "median_s" in r}
    out = []

    def ratio(what, length, beams, slow, fast, need=1.0, key="median_s"):
        a, b = cells.get((length, beams, slow)), cells.get((length, beams, fast))
        if a and b:
            value = a[key] / b[key]
            out.append(dict(what=f"{length} tokens, beams {beams}: {what}", ratio=value,
                            met=None if need is None else value >= need))  # fmt: skip

    for length, beams in sorted({(r["length"], r["beams"]) for r in rows}):
        stated = (length, beams) == (4096, 4)
        ratio("longsum fp32 / stock speed (>= 1)", length, beams, "stock", "longsum")
        ratio("longsum fp32 / CTranslate2 fp32 speed (>= 1/1.1)", length, beams, "ct2", "longsum", 1 / 1.1)
        ratio("longsum int8 / CTranslate2 int8 speed (>= 1)", length, beams, "ct2-int8", "int8")
        ratio("longsum int8 / longsum fp32 speed" + (" (>= 1.5)" if stated else ""), length, beams, "longsum", "int8",
              1.5 if stated else None)  # fmt: skip
        ratio("fp32 / int8 peak memory" + (" (>= 1)" if stated else ""), length, beams, "longsum", "int8",
              1.0 if stated else None, key="peak_bytes")  # fmt: skip
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        cells = [r for r in rows if r["length"] == length and "median_s" in r]
        labels = [f"{r['method']}\nbeams {r['beams']}" for r in cells]
        bars = ax.bar(labels, [r["median_s"] for r in cells],
                      color=[COLORS[r["method"]] for r in cells])  # fmt: skip
        ax.bar_label(bars, fmt="%.1f")
        ax.set(title=f"{length} input tokens", ylabel="seconds per document")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--beams", type=int, nargs="+", default=[1, 4, 5])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--docs", type=int, default=1, help="timed documents per cell (after a short warm-up)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="above 1: a 'batched' row decoding this many of the --docs documents per call")  # fmt: skip
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--allocator", choices=["glibc", "tuned"], default="glibc",
                   help="every cell's allocator: glibc's defaults (a hand-written script, or decoding.generate from "
                        "Python) or keep_freed_memory(), which `longsum summarize`/`eval` apply on CPU")  # fmt: skip
    p.add_argument("--exact", action="store_true",
                   help="longsum with torch's own CPU kernels (`--exact`) instead of oneDNN's packed linear layers")  # fmt: skip
    p.add_argument("--model", choices=list(MODELS), default="bart",
                   help="bart: bart-base size (LSG-BART above 1,024 tokens); t5gemma2: T5Gemma 2 270M-270M size "
                        "(merged decoder attention, 128K positions)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1,
                   help="run each (length, beams)'s methods round-robin this many times, each cell its own process "
                        "every round; a cell's median is over all its rounds' documents (a noisy machine drifts "
                        "between cells run minutes apart)")  # fmt: skip
    p.add_argument("--methods", nargs="+", help="only these methods (default: all that apply; stock for the ratio)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="decode_speed")
    p.add_argument("--cell-length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cell-beams", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cell-method", help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.cell_method:  # a child process: one cell, one JSON line
        if args.allocator == "tuned" and args.device == "cpu":
            from longsum.model.generation import keep_freed_memory

            keep_freed_memory()  # process-wide: CTranslate2's allocations get it too
        print(json.dumps(run_cell(args)))
        return

    try:
        import ctranslate2  # noqa: F401

        peer = True
    except ImportError:
        peer = False
        print("ctranslate2 is not installed: no CTranslate2 row (pip install ctranslate2)", file=sys.stderr)
    from longsum.model.cpu import busy_cores

    busy = busy_cores() if args.device == "cpu" else None
    if busy is not None and busy > 0.5:
        print(f"warning: other processes keep {busy:.1f} cores busy; timings will be noisy", file=sys.stderr)
    rows = []
    header = f"{'tokens':>7} {'beams':>5} {'method':>11} {'s/doc':>8} {'peak MiB':>9} {'speed-up':>8}  same ids"
    print(header)
    for length in args.lengths:
        for beams in args.beams:
            methods = ["stock", "longsum"] + (["int8"] if args.device == "cpu" else [])
            methods += ["batched"] if args.batch_size > 1 else []
            if peer and length <= DENSE_MAX and args.device == "cpu" and args.model == "bart":
                methods += ["ct2", "ct2-int8"] + (["ct2-batched"] if args.batch_size > 1 else [])
            methods = [m for m in methods if not args.methods or m in args.methods]
            rounds = {m: [] for m in methods}
            for _ in range(args.rounds):
                for method in methods:
                    rounds[method].append(cell_in_subprocess(args, length, beams, method))
            cells = {}
            for method in methods:
                cell = cells[method] = merge_rounds(rounds[method])
                row = dict(length=length, beams=beams, method=method,
                           **{k: v for k, v in cell.items() if k != "outputs"})  # fmt: skip
                stock = cells.get("stock", {})
                if "median_s" in cell and "median_s" in stock:
                    row["speedup_vs_stock"] = stock["median_s"] / cell["median_s"]
                if method in ("longsum", "batched") and "outputs" in stock and "outputs" in cell:
                    row["same_ids_as_stock"] = stock["outputs"] == cell["outputs"]
                if method == "int8" and "outputs" in stock and "outputs" in cell:  # a share: not bit-identical
                    pairs = list(zip(stock["outputs"], cell["outputs"]))
                    row["identical_to_stock"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
                rows.append(row)
                if "error" in cell:
                    print(f"{length:>7} {beams:>5} {method:>11}  error: {cell['error']}")
                    continue
                same = row.get("same_ids_as_stock", row.get("identical_to_stock", ""))
                print(f"{length:>7} {beams:>5} {method:>11} {cell['median_s']:>8.2f} {cell['peak_bytes'] / 2**20:>9.0f}"
                      f" {row.get('speedup_vs_stock', float('nan')):>7.2f}x  {same}", flush=True)  # fmt: skip
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    result = dict(settings=dict(lengths=args.lengths, beams=args.beams, new_tokens=args.new_tokens, docs=args.docs,
                                rounds=args.rounds,
                                batch_size=args.batch_size, allocator=args.allocator, exact=args.exact,
                                threads=args.threads, device=args.device, no_repeat_ngram_size=3,
                                dtype="bfloat16" if args.device == "cuda" else "float32",
                                model=MODELS[args.model]["about"], busy_cores_at_start=busy),
                  rows=rows, targets=targets(rows), cpu=cpu_facts() if args.device == "cpu" else None,
                  provenance=provenance(device_name))  # fmt: skip
    for line in result["targets"]:
        verdict = "information" if line["met"] is None else "met" if line["met"] else "NOT met"
        print(f"target: {line['what']}: {line['ratio']:.2f} ({verdict})")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out_dir / f"{args.name}.png", f"Seconds per document, {args.new_tokens} new tokens, {device_name}")
    print(f"saved {args.out_dir / (args.name + '.json')} and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
