"""GPU checks that the test suite does not make (run by check.sh beside it; one process, CUDA events for timing).

1. LSG attention on the device vs the CPU in float32 for every sparsity type (bf16 and fp16; NaN check).
2. Host syncs on the device: torch.cuda.set_sync_debug_mode("warn") over an LSG-BART base encoder forward
   and a decoding.generate call; warnings counted per call site.
3. LSG attention alone at 4k/16k tokens, b=1, 12 heads x 64, bf16: the blocked kernel at the device's chunk
   budget and in one chunk, the flex kernel (compiled), dense SDPA.
4. decoding, beams 4: decoding.generate eager vs compile=True (static cache reordered in place, compiled
   decoder step; CUDA graphs on CUDA), 4,096 tokens (ids compared).

usage: python benchmarks/gpu/checks.py [--device cuda] [--lengths 4096 16384] [--parts 1,2,3,4] [--quick]
Prints a table per part; --json PATH writes every number.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: decode_speed
RESULTS: dict = {}
JSON: list[Path] = []  # where RESULTS go (--json), written after each part and each attention length:
# a step that runs out of time keeps what it measured


def timed(fn, device, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def save() -> None:
    for path in JSON:
        path.write_text(json.dumps(RESULTS, indent=1, default=str))


def part(name):
    def deco(fn):
        def run(*a, **k):
            print(f"\n## {name}", flush=True)
            t0 = time.perf_counter()
            try:
                fn(*a, **k)
            except Exception as exc:  # noqa: BLE001  a failed part must not hide the others
                print(f"  FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                traceback.print_exc(limit=6)
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
            save()

        return run

    return deco


def qkv(b, h, n, d, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, length in enumerate(lengths):
        mask[i, :length] = True
    return q, k, v, mask


@part("1. LSG attention on the device vs CPU float32 (b=2, one padded; 12 heads x 64; 1+4096 tokens)")
def correctness(device, quick):
    from longsum.model.lsg.attention import LSGSpec, lsg_attention

    n = 1 + (1024 if quick else 4096)
    out = {}
    for stype in ("norm", "pooling", "stride", "block_stride", "bos_pooling", "none", "lsh"):
        spec = LSGSpec(sparsity_type=stype)
        q, k, v, mask = qkv(2, 12, n, 64, [n, n // 2 + 7])
        torch.manual_seed(0)
        ref = lsg_attention(q, k, v, mask, spec)
        valid = mask[:, None, :, None].expand_as(ref)
        row = []
        for dtype in (torch.bfloat16, torch.float16):
            torch.manual_seed(0)
            got = lsg_attention(*(x.to(device, dtype) for x in (q, k, v)), mask.to(device), spec).float().cpu()
            finite = bool(torch.isfinite(got[valid]).all())
            rel = ((got - ref)[valid].norm() / ref[valid].norm()).item()
            row.append((str(dtype)[6:], rel, finite))
        out[stype] = row
        note = "  (random projections: another generator on the device, so not comparable)" if stype == "lsh" else ""
        print(
            f"  {stype:<13}"
            + "".join(f"  {dt}: rel err {rel:.1e}{'' if fin else ' NON-FINITE'}" for dt, rel, fin in row)
            + note
        )
    RESULTS["correctness"] = out
    # LongT5 (longsum attention) masks with -1e10, which is -inf in float16: fully masked rows (padding)
    # then rely on how the SDPA backend treats them (CPU: zeros; the math path: NaN that spreads)
    import copy

    from transformers import LongT5Config, LongT5EncoderModel

    from longsum.model.longt5 import use_longsum_attention

    nan = {}
    for kind in ("local", "transient-global"):
        torch.manual_seed(0)
        config = LongT5Config(
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            vocab_size=300,
            encoder_attention_type=kind,
            local_radius=127,
            global_block_size=16,
            feed_forward_proj="gated-gelu",
        )
        model = LongT5EncoderModel(config).eval()
        use_longsum_attention(model)
        ids = torch.randint(5, 300, (2, 1000))
        mask = torch.ones_like(ids)
        mask[1, 600:] = 0
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
            for dtype in (torch.bfloat16, torch.float16):
                got = (
                    copy.deepcopy(model)
                    .to(device, dtype)(input_ids=ids.to(device), attention_mask=mask.to(device))
                    .last_hidden_state.float()
                    .cpu()
                )
                real = mask.bool()
                nan[f"{kind} {str(dtype)[6:]}"] = dict(
                    nan_real=bool(got[real].isnan().any()),
                    nan_padding=bool(got[~real].isnan().any()),
                    rel=((got - ref)[real].norm() / ref[real].norm()).item(),
                )
    for key, row in nan.items():
        print(
            f"  LongT5 tiny {key:<26} NaN in real rows {row['nan_real']}, in padding {row['nan_padding']}; "
            f"rel err vs CPU fp32 {row['rel']:.1e}"
        )
    RESULTS["longt5_nan"] = nan


def lsg_model(length, device, dtype, layers=6):
    """LSG-BART at bart-base size (decode_speed.py's BASE), random weights, on `device` in `dtype`."""
    from decode_speed import BASE

    from longsum.model.lsg import LSGBartConfig, LSGBartForConditionalGeneration

    torch.manual_seed(0)
    config = LSGBartConfig(**{**BASE, "encoder_layers": layers, "decoder_layers": layers},
                           max_position_embeddings=length, block_size=128, sparse_block_size=128)  # fmt: skip
    with torch.device(device):
        model = LSGBartForConditionalGeneration(config)
    return model.to(dtype).eval()


@part("2. host syncs on the device (torch.cuda.set_sync_debug_mode), LSG-BART base bf16, 4,096 tokens")
def syncs(device, quick):
    from longsum.model import decoding

    if device != "cuda":
        print("  skipped: needs CUDA")
        return
    n = 4096
    model = lsg_model(n, device, torch.bfloat16)
    ids = torch.randint(5, 50265, (2, n), device=device)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    mask[1, n // 2 :] = 0
    settings = dict(num_beams=4, max_new_tokens=16, min_new_tokens=16, no_repeat_ngram_size=3, do_sample=False)
    with torch.inference_mode():
        model.get_encoder()(input_ids=ids, attention_mask=mask)  # warm-up (block index cache, kernels)
        decoding.generate(model, ids, mask, **settings)
    torch.cuda.synchronize()
    found = {}
    for label, fn in (
        ("encoder forward", lambda: model.get_encoder()(input_ids=ids, attention_mask=mask)),
        ("decoding.generate, beams 4, 16 new tokens", lambda: decoding.generate(model, ids, mask, **settings)),
    ):
        with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = collections.Counter(
            f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
            for w in caught
            if "synchroniz" in str(w.message)
        )
        found[label] = dict(sites)
        print(f"  {label}: {sum(sites.values())} synchronizing ops")
        for where, count in sites.most_common(12):
            print(f"    {count:5d}x {where}")
    RESULTS["syncs"] = found


def attention_row(q, k, v, mask, spec, device) -> dict:
    """One length of part 3: ms per call of each kernel (and flex's compile time and error)."""
    import longsum.model.lsg.attention as A
    from longsum.model.lsg.attention import lsg_attention
    from longsum.model.lsg.flex import flex_lsg_attention

    row = {}
    with torch.no_grad():
        ref = lsg_attention(q, k, v, mask, spec).float()
        row["blocked"] = timed(lambda: lsg_attention(q, k, v, mask, spec), device)
        saved = A.DEVICE_GATHER_BYTES, A.GATHER_BUDGET
        A.DEVICE_GATHER_BYTES = A.GATHER_BUDGET = 1 << 40  # every block in one chunk
        try:
            row["blocked, one chunk"] = timed(lambda: lsg_attention(q, k, v, mask, spec), device)
        finally:
            A.DEVICE_GATHER_BYTES, A.GATHER_BUDGET = saved
        row["dense SDPA"] = timed(lambda: F.scaled_dot_product_attention(q, k, v), device)
        try:
            t0 = time.perf_counter()
            got = flex_lsg_attention(q, k, v, mask, spec).float()  # compiles for this shape
            row["flex first call (compiles) s"] = time.perf_counter() - t0
            row["flex rel err vs blocked"] = ((got - ref).norm() / ref.norm()).item()
            row["flex"] = timed(lambda: flex_lsg_attention(q, k, v, mask, spec), device)
        except Exception as exc:  # noqa: BLE001
            row["flex"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return row


@part("3. LSG attention alone, b=1, 12 heads x 64, bf16 (median of 10, CUDA events): ms")
def attention_speed(device, quick, lengths):
    from longsum.model.lsg.attention import LSGSpec

    rows = RESULTS["attention_ms"] = {}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for t in lengths:
        q, k, v, mask = (x.to(device) for x in qkv(1, 12, 1 + t, 64, [1 + t]))
        rows[t] = row = attention_row(*(x.to(dtype) for x in (q, k, v)), mask, LSGSpec(), device)
        print(f"  t={t}: " + "  ".join(f"{key} {val:.1e}" if "err" in key or key.endswith(" s")
                                        else f"{key} {val * 1e3:.3f}" if isinstance(val, float) else f"{key}: {val}"
                                        for key, val in row.items()), flush=True)  # fmt: skip
        save()


@part("4. decoding, beams 4: decoding.generate eager vs compile=True (4,096 tokens, 32 new; --quick 1,024, 8)")
def compiled_decode(device, quick):
    from longsum.model import decoding

    n, new = (1024, 8) if quick else (4096, 32)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = lsg_model(n, device, dtype)
    ids = torch.randint(5, 50265, (1, n), device=device)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    settings = dict(num_beams=4, max_new_tokens=new, min_new_tokens=new, no_repeat_ngram_size=3, do_sample=False)

    def wall(**options):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = decoding.generate(model, ids, mask, exact=True, **options, **settings)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    wall()  # warm-up
    eager_s, eager_ids = wall()
    first_s, _ = wall(compile=True)  # compiles (and captures CUDA graphs on CUDA)
    compiled_s, compiled_ids = wall(compile=True)
    again_s, _ = wall(compile=True)
    res = dict(mode=decoding.compile_mode(model.device), eager_s=eager_s, compile_first_call_s=first_s,
               compiled_s=compiled_s, compiled_again_s=again_s, same_ids=bool(torch.equal(eager_ids, compiled_ids)),
               compiled=model in decoding._COMPILED)  # fmt: skip
    print(f"  eager decoding.generate {eager_s:.2f}s ({eager_s / new * 1e3:.2f} ms/step); compiled ({res['mode']}): "
          f"first call {first_s:.1f}s, then {compiled_s:.2f}s ({compiled_s / new * 1e3:.2f} ms/step) and {again_s:.2f}s;"
          f" same ids {res['same_ids']}; compiled path used {res['compiled']}")  # fmt: skip
    RESULTS["compiled_decode"] = res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--parts", default="1,2,3")
    p.add_argument("--quick", action="store_true", help="small sizes (a dry run on CPU)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, device {args.device}"
        + (
            f" ({torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()})"
            if args.device == "cuda"
            else ""
        )
    )
    JSON.extend([args.json] if args.json else [])
    parts = set(args.parts.split(","))
    if "1" in parts:
        correctness(args.device, args.quick)
    if "2" in parts:
        syncs(args.device, args.quick)
    if "3" in parts:
        attention_speed(args.device, args.quick, args.lengths)
    if "4" in parts:
        compiled_decode(args.device, args.quick)


if __name__ == "__main__":
    main()
