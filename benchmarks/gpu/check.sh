#!/usr/bin/env bash
# longsum's first GPU run, as one prepared call: tests, device checks and bf16 benchmarks in under 8 minutes,
# every result under $OUT (at most 8 files come back: see the end). Steps run in priority order under one
# time budget; a step that would pass the budget is skipped, and the closing table says which.
#
# Where it runs: the device machine gets a copy of the project's working tree (this script included), but
# not its git-ignored folders unless they are named to travel with it. First, once, in the project's root:
#     mkdir -p .whl && cp ../shared/gpu/wheels/*.whl .whl/   (the wheels the GPU image lacks; .whl/ is git-ignored)
# then, on the GPU machine, from the project root: bash benchmarks/gpu/check.sh  (name .whl among the ignored
#         paths that travel with the tree; allow it about 560 s)
# then copy what comes back ($OUT) to benchmarks/results/gpu/ and commit it.
# rerun some steps only:  GPU_CHECK_STEPS=1,7,9 bash benchmarks/gpu/check.sh  (numbers as in the closing table;
#                         keep 1 on a fresh machine: the wheels installed by the last call are gone)
# dry run on a CPU box:   GPU_CHECK_DRY=1 OUT=/tmp/out bash benchmarks/gpu/check.sh  (small sizes, --device cpu;
#                         tests/test_benchmarks.py checks the benchmark flags this script passes)
#
# The machine has no package registry: it runs the image's python3 (torch 2.11+cu130, transformers 5.17 in the
# image as last described), longsum from the tree (PYTHONPATH, no install), and wheels carried in .whl/ for the
# modules the image lacks (pysbd, rouge_score+nltk, datasets+dill+multiprocess, typer if too old).
set -uo pipefail

ROOT=$(pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
BUDGET=${GPU_CHECK_BUDGET:-470}
DRY=${GPU_CHECK_DRY:-0}
ONLY=${GPU_CHECK_STEPS:-}
PY=${PYTHON:-python3}
START=$SECONDS
SUMMARY=()
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ $DRY == 1 ]]; then
    DEV=cpu; LENGTHS="1024"; BEAMS="1"; NEW=4; export OMP_NUM_THREADS=1
else
    DEV=cuda; LENGTHS="4096 16384"; BEAMS="1 4"; NEW=64
fi

step() {  # step NUMBER NAME MAX_SECONDS command...
    local num=$1 name=$2 max=$3
    shift 3
    if [[ -n $ONLY && ",$ONLY," != *",$num,"* ]]; then return; fi
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        echo "== [$num] SKIPPED $name: ${left}s of the budget left"
        SUMMARY+=("$(printf '%2s  %-8s %5s  %s' "$num" SKIPPED - "$name")")
        return
    fi
    ((max > left)) && max=$left
    echo
    echo "== [$num] $name (limit ${max}s; ${left}s of the budget left)"
    local t0=$SECONDS rc
    timeout --kill-after=5 "$max" bash -c '"$@"' _ "$@"  # functions too (exported below)
    rc=$?
    local verdict=OK
    ((rc == 124 || rc == 137)) && verdict=TIMEOUT
    ((rc != 0 && rc != 124 && rc != 137)) && verdict="rc=$rc"
    SUMMARY+=("$(printf '%2s  %-8s %4ss  %s' "$num" "$verdict" $((SECONDS - t0)) "$name")")
}

environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | head -3
    "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()} at {sys.executable}; torch {torch.__version__} (cuda {torch.version.cuda}); "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor},"
          f" bf16 {torch.cuda.is_bf16_supported()}; sdpa flash {torch.backends.cuda.flash_sdp_enabled()} mem-efficient "
          f"{torch.backends.cuda.mem_efficient_sdp_enabled()} cudnn {torch.backends.cuda.cudnn_sdp_enabled()}")
for name in ("transformers", "accelerate", "tokenizers", "safetensors", "huggingface_hub", "triton", "typer", "rich",
             "datasets", "rouge_score", "nltk", "pysbd", "pyarrow", "numpy", "pytest", "xdist", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:<16} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"  {name:<16} MISSING ({type(exc).__name__})")
try:
    import typer._click  # noqa: F401  (longsum.cli needs the typer that vendors click)
except Exception:
    print("  typer._click     MISSING (typer too old for longsum.cli)")
EOF
}

install_wheels() {  # only the modules the image lacks, from the carried .whl/ folder
    local want=()
    "$PY" -c "import pysbd" 2>/dev/null || want+=(pysbd)
    "$PY" -c "import rouge_score" 2>/dev/null || want+=(rouge_score)
    "$PY" -c "import nltk" 2>/dev/null || want+=(nltk)
    "$PY" -c "import datasets" 2>/dev/null || want+=(datasets)
    "$PY" -c "import dill" 2>/dev/null || want+=(dill)
    "$PY" -c "import multiprocess" 2>/dev/null || want+=(multiprocess)
    "$PY" -c "import typer._click" 2>/dev/null || want+=(typer)
    if ((${#want[@]} == 0)); then echo "all modules present"; return 0; fi
    local files=()
    for name in "${want[@]}"; do
        for f in "$ROOT"/.whl/"$name"-*.whl; do [[ -e $f ]] && files+=("$f"); done
    done
    echo "missing: ${want[*]}; carried wheels: ${#files[@]}"
    ((${#files[@]})) || return 0
    local f
    for f in "${files[@]}"; do  # one by one: a wheel this python refuses does not stop the others
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$f" ||
            echo "could not install $(basename "$f")"
    done
}

sanity() {
    "$PY" - "$DEV" <<'EOF'
import sys, time
import torch
from longsum import decoding
from longsum.model.lsg import LSGBartForConditionalGeneration
from longsum.model.tiny import tiny_lsg_bart_config
device = sys.argv[1]
torch.manual_seed(0)
model = LSGBartForConditionalGeneration(tiny_lsg_bart_config(300, 1024)).eval()
model = model.to(device, torch.bfloat16 if device == "cuda" else torch.float32)
ids = torch.randint(5, 300, (2, 700), device=device)
ids[:, 0], ids[:, -1] = 0, 2
mask = torch.ones_like(ids)
mask[1, 400:] = 0
t0 = time.perf_counter()
with torch.inference_mode():
    out = decoding.generate(model, ids, mask, num_beams=4, max_new_tokens=8, no_repeat_ngram_size=3)
    stock = model.generate(input_ids=ids, attention_mask=mask, num_beams=4, max_new_tokens=8, no_repeat_ngram_size=3)
print(f"tiny LSG-BART on {device}: decoding.generate {tuple(out.shape)} on {out.device}, same ids as stock generate: "
      f"{torch.equal(out, stock)} ({time.perf_counter() - t0:.1f}s)")
EOF
}

smoke() {  # smoke JSON_NAME PARTS [extra args]
    local name=$1 parts=$2
    shift 2
    local quick=()
    [[ $DRY == 1 ]] && quick=(--quick)
    # shellcheck disable=SC2086
    "$PY" "$HERE/checks.py" --device "$DEV" --parts "$parts" --lengths $LENGTHS "${quick[@]}" --json "$WORK/$name.json" "$@"
}

pytest_subset() {  # the CLI tests pick CUDA and bf16 by themselves (--device auto) on this machine
    local extra=()
    "$PY" -c "import xdist" 2>/dev/null && [[ $DRY != 1 ]] && extra+=(-n 8)
    "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 100)
    "$PY" -m pytest -q -p no:cacheprovider "${extra[@]}" -rfE tests/test_summarize.py tests/test_generation.py \
        tests/test_cli.py tests/test_decoding.py tests/test_longt5.py tests/lsg/test_attention.py
}

export ROOT HERE OUT WORK DRY PY DEV LENGTHS BEAMS NEW
export -f environment install_wheels sanity smoke pytest_subset

main() {
    echo "longsum GPU check: $(date -u +%FT%TZ), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET}s, device $DEV"
    step 0 "environment" 40 environment
    step 1 "carried wheels for missing modules" 30 install_wheels
    export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    step 2 "sanity: tiny LSG-BART, decoding.generate vs stock on $DEV" 60 sanity
    step 3 "pytest -m gpu (the flex kernel compiles forward and backward)" 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rA tests
    step 4 "smoke: LSG attention dtype/device correctness, host syncs (sync debug mode)" 90 smoke smoke_correct 1,2
    # shellcheck disable=SC2086
    step 5 "encoder_speed.py --device $DEV (bf16 on cuda)" 150 "$PY" benchmarks/encoder_speed.py --device "$DEV" \
        --lengths $LENGTHS --models lsg-norm-128/128 dense-sdpa no-attention-floor longsum-longt5-tglobal \
        longt5-tglobal --repeats 5 --repeats-long 5 --timeout 60 --no-tensor-peak --out-dir "$WORK/bench"
    # shellcheck disable=SC2086
    step 6 "decode_speed.py --device $DEV (bf16 on cuda)" 120 "$PY" benchmarks/decode_speed.py --device "$DEV" \
        --lengths $LENGTHS --beams $BEAMS --new-tokens "$NEW" --docs 2 --out-dir "$WORK/bench"
    step 7 "smoke: LSG attention alone: blocked kernel, one chunk, flex kernel, dense SDPA" 120 smoke smoke_attention 3
    step 8 "pytest subset (CLI tests run on CUDA via --device auto)" 120 pytest_subset
    step 9 "smoke: decoding.generate eager vs compile=True (CUDA graphs on cuda)" 150 smoke smoke_compile 4
    step 10 "summarize_throughput.py --device $DEV --size base" 90 "$PY" benchmarks/summarize_throughput.py --device "$DEV" \
        --size base --num-docs 8 --max-new-tokens 32 --repeats 1 --methods naive,batched --out-dir "$WORK/bench"

    # what comes back: at most 8 files (the log is the 8th)
    for f in "$WORK"/smoke_correct.json "$WORK"/smoke_attention.json "$WORK"/smoke_compile.json \
        "$WORK"/bench/encoder_speed.json "$WORK"/bench/decode_speed.json "$WORK"/bench/summarize_throughput.json \
        "$WORK"/bench/encoder_speed.png; do
        [[ -e $f ]] && cp "$f" "$OUT/"
    done
    echo
    echo "== summary ($((SECONDS - START))s of ${BUDGET}s; files in \$OUT: $(ls "$OUT" | tr '\n' ' '))"
    printf '%s\n' "${SUMMARY[@]}"
}

main 2>&1 | tee "$OUT/gpu_check.log"
