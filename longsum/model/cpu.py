"""Which CPU kernels decode fastest on this machine: measured once per CPU model, cached, explained.

Packed oneDNN linear layers (`longsum.model.decoding.PackedLinear`) beat torch's MKL products 1.5-2.7x on a
decoding step's few rows on an AVX-512 EPYC, but are slower than them for greedy decoding on an
AVX2-only one: a fast path must look at the machine. `kernel_choice(rows)` says, for a decoding step
of `rows` rows (documents x beams), which linear kernel to run (`torch`, `packed`, or `packed-padded`:
packed with the rows zero-padded to `MIN_ROWS`, which oneDNN multiplies faster than 1-2 rows on some
CPUs) and whether the few-rows cross-attention (`few_rows_eager`) replaces SDPA's, and why.

The choice comes from `calibrate()`: a short run (6-8 s at one thread on a 2-core VM) timing both kernels
on bart-base-sized layers, out of cache, at one representative row count per `ROW_CLASSES` class, the
two attentions, and the two int8 kernels of `--dtype int8` (`longsum.model.int8`; `Choice.int8`). Its
numbers are cached in `cpu_kernels.json` under the cache folder (`LONGSUM_CACHE`, else
`$XDG_CACHE_HOME/longsum`, else `~/.cache/longsum`), keyed by the CPU's model name, torch's version and
the thread count, so a machine measures once. A candidate replaces torch's kernel only when it wins by
`MARGIN`: the default path is never slower than torch's own kernels by more than the measurement's
noise. Without measurements (`LONGSUM_CALIBRATE=0`) the choice follows
the CPU's features (`from_features`). Reset: `python -m longsum.model.cpu --reset` (measures again and
prints the choice), `reset()` from Python, or delete the file.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

CACHE_FILE = "cpu_kernels.json"
# Decoding-step rows (documents x beams) -> the class whose measurement decides; the row count timed.
# (few: one document's beams, timed at 4; several: a batch's, at 16. fbgemm's int8 product wins the first
# and loses the second on an AMX Xeon: 38 against 50 ms per beams-4 step of bart-base.)
ROW_CLASSES = {
    "one": (1, 2, 1),
    "few": (3, 8, 4),
    "several": (9, 64, 16),
    "many": (65, None, 256),
}  # (low, high, timed)
LINEAR_KERNELS = ("torch", "packed", "packed-padded")
INT8_KERNELS = ("onednn", "fbgemm")  # `--dtype int8`'s products (`longsum.model.int8`)
# The int8 kernel a row class runs unless the other one is measured `MARGIN` faster: fbgemm's fixed cost per
# call is the smaller (half oneDNN's time per call at 1-4 rows on an AMX Xeon), oneDNN's tiles win on many rows.
INT8_DEFAULT = {"one": "fbgemm", "few": "fbgemm", "several": "onednn", "many": "onednn"}
MARGIN = 1.05  # a candidate must be this much faster than torch's kernel to replace it
BUSY_SAMPLE_S = 0.2  # how long the load of other processes is sampled before calibrating
CALIBRATION_VERSION = 4  # bump when what is measured changes: older entries are measured again
# Calibration layers: bart-base's feed-forward (768 -> 3,072), enough of them to leave the caches as a
# decoding step does (8 x 9.4 MB of weights).
D_MODEL, D_FFN, LAYERS = 768, 3072, 8
# Cross-attention of the calibration: 12 heads of 64, 4 query rows against 1,024 keys, 6 layers.
HEADS, HEAD_DIM, KEYS, ATTENTION_LAYERS = 12, 64, 1024, 6
DECODER_LAYERS, VOCAB = 6, 50_265  # int8 calibration: a bart-base decoding step's linear layers and head
# Read before each timed run: the caches then hold none of the weights, as in a decoding step, whose weights,
# head and cross-attention keys (120-350 MB at bart-base size) pass through them once per step.
EVICT_BYTES = 128 << 20


# ------------------------------------------------------------------------------------------ the machine
@dataclass(frozen=True)
class Features:
    """What the CPU is: its model name, its flags (/proc/cpuinfo), torch's vector ISA, threads, torch."""

    name: str
    flags: frozenset[str] = field(default_factory=frozenset)
    capability: str = ""
    threads: int = 1
    torch: str = ""

    @property
    def key(self) -> str:
        """The cache key: measurements hold for the same CPU model, torch release and thread count."""
        return f"{self.name} | torch {self.torch} | {self.threads} threads"

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    def summary(self) -> str:
        isa = "AVX-512" if self.avx512 else "AVX2" if "avx2" in self.flags else self.capability or "?"
        return f"{self.name} ({isa}{', VNNI' if self.vnni else ''}; torch's kernels: {self.capability})"


def features() -> Features:
    """This machine's `Features` now (the thread count can change while a process runs)."""
    name, flags = _cpu_model()
    return Features(name=name, flags=flags, capability=torch.backends.cpu.get_cpu_capability(),
                    threads=torch.get_num_threads(), torch=torch.__version__)  # fmt: skip


@functools.cache
def _cpu_model() -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags, read once (Linux: /proc/cpuinfo; elsewhere the name from `platform`)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:  # the first processor's lines
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    return name, frozenset((info.get("flags") or info.get("Features") or "").split())


# ------------------------------------------------------------------------------------------ the choice
@dataclass(frozen=True)
class Choice:
    """Kernels for a decoding step's row class: `linear` (one of `LINEAR_KERNELS`) and `why` (a
    sentence), `few_rows` (the few-rows cross-attention) and `attention_why`, `source`
    (calibrated/cached/features/forced), and for an int8 model's layers `int8` (one of `INT8_KERNELS`)
    and `int8_why`."""

    linear: str
    few_rows: bool
    why: str
    source: str
    int8: str = INT8_KERNELS[0]  # (`choose` and `from_features` set it per row class)
    int8_why: str = "the default"
    attention_why: str = ""

    def describe(self, rows: int, int8: str | None = None) -> str:
        """What a decoding step of `rows` rows runs, and why; `int8`: the int8 kernel an int8 model's
        layers run at these rows (their own, set when quantized), in place of the float linear layers."""
        attention = "few-rows cross-attention" if self.few_rows else "SDPA cross-attention"
        linear, why = (f"int8 ({int8})", self.int8_why) if int8 else (self.linear, self.why)
        why += f"; {self.attention_why}" if self.attention_why else ""
        return f"{rows} rows per step: {linear} linear layers, {attention} ({self.source}: {why})"


def row_class(rows: int) -> str:
    for name, (low, high, _) in ROW_CLASSES.items():
        if rows >= low and (high is None or rows <= high):
            return name
    return "one"


def choose(measured: dict, rows: int, source: str = "calibrated") -> Choice:
    """The kernels for `rows` rows per step from calibration milliseconds (deterministic: no timing here).

    `measured`: {"linear": {class: {kernel: ms}}, "attention": {"sdpa": ms, "few_rows": ms},
    "int8": {class: {kernel: ms}}}. A kernel replaces torch's only when `MARGIN` times faster; the
    few-rows attention likewise replaces SDPA, and an int8 kernel replaces the class's `INT8_DEFAULT`.
    """
    cls = row_class(rows)
    linear, why = _fastest(measured["linear"][cls], LINEAR_KERNELS, cls, "torch")
    attention = measured.get("attention", {})
    few_rows = bool(attention) and attention["few_rows"] * MARGIN < attention["sdpa"]
    attention_why = (
        f"attention sdpa {attention['sdpa']:.3g} ms, few-rows {attention['few_rows']:.3g} ms" if attention else ""
    )
    int8 = measured.get("int8")  # (none: this torch has no int8 kernels)
    int8_choice = {}
    if int8 is not None:
        int8_choice = dict(zip(("int8", "int8_why"), _fastest(int8[cls], INT8_KERNELS, cls, INT8_DEFAULT[cls])))
    return Choice(linear, few_rows, why, source, attention_why=attention_why, **int8_choice)


def _fastest(times: dict[str, float], kernels: tuple[str, ...], cls: str, default: str) -> tuple[str, str]:
    """The kernel to run and why: the fastest of `times` (kernel -> ms) where it beats `default` by
    `MARGIN`, else `default` (else the first of `kernels` timed, where `default` could not be)."""
    timed = [k for k in kernels if k in times]
    default = default if default in times else timed[0]
    best = min(timed, key=lambda k: times[k])
    chosen = best if times[best] * MARGIN < times[default] else default
    shown = ", ".join(f"{k} {times[k]:.3g} ms" for k in timed)
    return chosen, f"{ROW_CLASSES[cls][2]} rows timed: {shown}"


def from_features(feat: Features, rows: int) -> Choice:
    """The choice without measurements: packed oneDNN layers only on AVX-512 (where they were measured
    faster; padded below `MIN_ROWS` rows), torch's elsewhere; the few-rows attention everywhere; int8:
    fbgemm up to `few` rows (half oneDNN's time per call at 1-4 rows on an AMX Xeon), oneDNN above."""
    cls = row_class(rows)
    int8 = INT8_DEFAULT[cls]
    if feat.avx512:
        linear = "packed-padded" if cls == "one" else "packed"
        why = "AVX-512: packed oneDNN layers (LONGSUM_CALIBRATE=0, not measured)"
    else:
        linear, why = "torch", "no AVX-512: torch's kernels (LONGSUM_CALIBRATE=0, not measured)"
    return Choice(linear, True, why, "features", int8, f"{int8} for {cls} rows (from the CPU's features, not measured)")


# ------------------------------------------------------------------------------------------ the cache
def cache_dir() -> Path:
    if os.environ.get("LONGSUM_CACHE"):
        return Path(os.environ["LONGSUM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "longsum"


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(entries: dict) -> None:
    """Write atomically; a read-only cache folder only costs a measurement per process."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass


def reset() -> None:
    """Forget every cached measurement (this process and the cache file): the next use measures again."""
    _MEASURED.clear()
    try:
        cache_path().unlink()
    except FileNotFoundError:
        pass


_MEASURED: dict[str, tuple[dict, str]] = {}  # features key -> (measurements, "calibrated" | "cached")


def measurements(feat: Features | None = None) -> tuple[dict, str]:
    """This CPU's calibration: (milliseconds as `choose` reads them, "cached" or "calibrated"), measured
    on first use and cached per `Features.key`."""
    feat = feat or features()
    if feat.key not in _MEASURED:
        entry = _read_cache().get(feat.key)
        if _usable(entry):
            _MEASURED[feat.key] = entry, "cached"
        else:
            from longsum.console import note

            busy = busy_cores(BUSY_SAMPLE_S)
            # Timings taken while other processes hold the cores would be cached as this CPU's.
            cached = busy is None or (os.cpu_count() or 1) - busy >= torch.get_num_threads() - 0.5
            if cached:
                note(f"measuring this CPU's decoding kernels once ({feat.name}; cached in {cache_path()})")
            else:
                note(f"measuring this CPU's decoding kernels for this run only: other processes keep {busy:.1f} "
                     f"of {os.cpu_count()} cores busy, so the numbers are not cached")  # fmt: skip
            entry = {**calibrate(), "version": CALIBRATION_VERSION, "cpu": feat.summary()}
            if cached:
                _write_cache({**_read_cache(), feat.key: entry})
            _MEASURED[feat.key] = entry, "calibrated"
    return _MEASURED[feat.key]


def _usable(entry) -> bool:
    """Whether a cache entry is this version's and `choose` can read it for every row class (an entry cut
    short or edited by hand is measured again, not trusted, and never stops a run)."""
    try:
        return entry.get("version") == CALIBRATION_VERSION and all(
            choose(entry, rows) for _, _, rows in ROW_CLASSES.values()
        )
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return False


def busy_cores(seconds: float = 1.0) -> float | None:
    """How many cores other processes keep busy now (Linux /proc/stat over `seconds`); None elsewhere."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def kernel_choice(rows: int) -> Choice:
    """The kernels for decoding steps of `rows` rows on this CPU (measured once, then cached).

    `LONGSUM_CPU_KERNELS=torch|packed|packed-padded` forces the linear kernel (with the few-rows
    attention); `LONGSUM_CALIBRATE=0` uses `from_features` instead of measuring.
    """
    forced = os.environ.get("LONGSUM_CPU_KERNELS", "auto")
    if forced in LINEAR_KERNELS:
        int8 = from_features(features(), rows)
        return Choice(forced, True, "LONGSUM_CPU_KERNELS", "forced", int8.int8, int8.int8_why)
    if forced != "auto":
        from longsum.model.decoding import step_aside

        known = ", ".join(LINEAR_KERNELS)
        step_aside(f"LONGSUM_CPU_KERNELS={forced}", f"not one of auto, {known} (the measured choice)")
    feat = features()
    if os.environ.get("LONGSUM_CALIBRATE", "1") == "0":
        return from_features(feat, rows)
    measured, source = measurements(feat)
    return choose(measured, rows, source)


# ------------------------------------------------------------------------------------------ measuring
def _best_ms(candidates: dict, repeats: int, before=lambda: None) -> dict[str, float]:
    """{name: the best of `repeats` timed calls of `candidates[name]()`, in milliseconds}.

    Each candidate runs once untimed first (allocation, primitive creation). The candidates then take
    turns, in an order rotated each round (A B C, B C A, ...): a machine whose speed drifts while it is
    measured (a virtual machine's neighbours: 10-25% between runs minutes apart) tilts no candidate's
    number, as timing one candidate's runs after the other's would. `before()` runs, untimed, before each
    timed call (`calibrate`'s read of `EVICT_BYTES` of other data: the weights then come from memory).
    """
    names = list(candidates)
    for name in names:
        candidates[name]()
    best = dict.fromkeys(names, float("inf"))
    for turn in range(repeats):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            before()
            start = time.perf_counter()
            candidates[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1e3 for name, seconds in best.items()}


def calibrate() -> dict:
    """Time torch's and oneDNN's packed linear products per row class, the two cross-attentions, and the
    two int8 kernels (`longsum.model.int8`) on the same layers.

    Every number is the best of a few runs of a whole stack of layers, each run after `EVICT_BYTES` of other
    data were read (so that the weights come from memory, as in a decoding step), in milliseconds. Kernels
    that fail here are left out (torch's, or oneDNN's int8, then stays).
    """
    from longsum.model.int8 import fbgemm_fails, int8_fails

    other = torch.ones(EVICT_BYTES // 4)  # (written: reading never-written pages reads one cached zero page)
    linear, attention = _time_float(other.sum)
    int8 = {} if int8_fails() else _time_int8(fbgemm_fails() is None, other.sum)
    return {"linear": linear, "attention": attention, **({"int8": int8} if int8 else {})}


def _time_float(evict) -> tuple[dict, dict]:
    """({class: {linear kernel: ms}}, {attention: ms}) for `calibrate`: eight bart-base feed-forward layers
    (768 -> 3,072) per row class, and SDPA's and the few-rows cross-attention over 6 layers' keys."""
    from longsum.model.decoding import MIN_ROWS, PACK_ROWS, few_rows_eager, packing_fails

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(D_FFN, D_MODEL, generator=g) * 0.02 for _ in range(LAYERS)]  # [3072, 768] each
    packed = [] if packing_fails() else [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS) for w in weights]
    linear: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for cls, (_, _, rows) in ROW_CLASSES.items():
            x = torch.randn(rows, D_MODEL, generator=g)
            stack = weights if rows <= 64 else weights[:2]  # (many rows: compute-bound, two layers suffice)
            candidates = {"torch": lambda: [torch.nn.functional.linear(x, w) for w in stack]}  # noqa: B023
            if packed:
                pk = packed[: len(stack)]

                def run(rows_in):
                    return [torch.ops.mkldnn._linear_pointwise(rows_in, p, None, "none", [], "") for p in pk]  # noqa: B023

                candidates["packed"] = lambda: run(x)  # noqa: B023
                if rows < MIN_ROWS:
                    padded = torch.cat([x, x.new_zeros(MIN_ROWS - rows, D_MODEL)])
                    candidates["packed-padded"] = lambda: run(padded)  # noqa: B023
            linear[cls] = _best_ms(candidates, 5 if rows <= 64 else 2, evict)
        q = torch.randn(1, HEADS, 4, HEAD_DIM, generator=g)  # [b, h, rows, d]: 4 beams' queries
        kv = [(torch.randn(1, HEADS, KEYS, HEAD_DIM, generator=g), torch.randn(1, HEADS, KEYS, HEAD_DIM, generator=g))
              for _ in range(ATTENTION_LAYERS)]  # fmt: skip
        sdpa = torch.nn.functional.scaled_dot_product_attention
        attention = _best_ms({"sdpa": lambda: [sdpa(q, k, v) for k, v in kv],
                              "few_rows": lambda: [few_rows_eager(None, q, k, v, None) for k, v in kv]}, 5,
                             evict)  # fmt: skip
    return linear, attention


def _time_int8(fbgemm: bool, evict) -> dict:
    """{class: {int8 kernel: ms}}: the linear layers of a bart-base decoding step (`DECODER_LAYERS` x six
    768 x 768 projections and the two feed-forward ones, then the 768 x 50,265 head: fbgemm's fixed cost per
    call is smaller, oneDNN's product above a few rows faster, so the mix decides; 89 MB of int8 weights,
    from memory after `evict()`, as in a decoding step; many rows: the first layer's eight, compute-bound).
    One stack of layers holds both kernels' packs (each packs on first use, outside the timing)."""
    from longsum.model.int8 import PACK, RUN, Int8Linear, activation_range

    g = torch.Generator().manual_seed(1)
    body = ([(D_MODEL, D_MODEL)] * 6 + [(D_FFN, D_MODEL), (D_MODEL, D_FFN)]) * DECODER_LAYERS  # [d_out, d_in]
    shapes = body + [(VOCAB, D_MODEL)]
    kernels = INT8_KERNELS if fbgemm else INT8_KERNELS[:1]
    stack = []
    for d_out, d_in in shapes:
        # bfloat16 (quantized from it all the same): the head's float copy is 77 MB, not 154, while quantized
        layer = torch.nn.utils.skip_init(torch.nn.Linear, d_in, d_out, dtype=torch.bfloat16)  # (set just below)
        torch.nn.init.normal_(layer.weight, std=0.02, generator=g)
        torch.nn.init.zeros_(layer.bias)
        quantized = Int8Linear(layer, activation_range())
        # Both packs from the plain int8 weight (`Int8Linear.packed` would make the second from the first).
        quantized.packs, quantized.plain = {k: PACK[k](quantized, quantized.plain) for k in kernels}, None
        stack.append(quantized)
    timed = {}
    with torch.inference_mode():
        for cls, (_, _, rows) in ROW_CLASSES.items():
            inputs = {D_MODEL: torch.randn(rows, D_MODEL, generator=g), D_FFN: torch.randn(rows, D_FFN, generator=g)}
            count, repeats = (len(shapes), 4) if rows <= 64 else (len(body) // DECODER_LAYERS, 2)
            # Each kernel's function on the layers directly: what `Int8Linear.forward` runs at these rows.
            timed[cls] = _best_ms({kernel: functools.partial(_run_int8, RUN[kernel], stack[:count], inputs)
                                   for kernel in kernels}, repeats, evict)  # fmt: skip
    return timed


def _run_int8(kernel, layers: list, inputs: dict) -> list:
    return [kernel(m, inputs[m.in_features]) for m in layers]


def main(argv: list[str] | None = None) -> int:
    """`python -m longsum.model.cpu [--reset]`: this CPU, its measurements and the kernels chosen per row class."""
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--reset"]):
        print("usage: python -m longsum.model.cpu [--reset]   (--reset: forget the cached measurements, measure again)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args == ["--reset"]:
        reset()
    feat = features()
    print(f"CPU: {feat.summary()}; cache: {cache_path()}")
    for cls, (_, _, rows) in ROW_CLASSES.items():
        choice = kernel_choice(rows)
        print(f"  {cls}: {choice.describe(rows)}; --dtype int8: {choice.int8} ({choice.int8_why})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
