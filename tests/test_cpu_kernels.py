"""longsum.model.cpu: CPU kernels chosen from measurements (injected here, never timed in an assertion), cached per CPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

from longsum.model import cpu, decoding


def measured(one=None, few=None, many=None, sdpa=1.0, few_rows=1.0, several=None) -> dict:
    default = {"torch": 1.0}
    return {"linear": {"one": one or default, "few": few or default, "several": several or default,
                       "many": many or default},  # fmt: skip
            "attention": {"sdpa": sdpa, "few_rows": few_rows}}  # fmt: skip


def test_row_classes_cover_every_row_count():
    assert [cpu.row_class(n) for n in (1, 2, 3, 8, 9, 64, 65, 4096)] == ["one", "one", "few", "few", "several",
                                                                         "several", "many", "many"]  # fmt: skip


def test_a_kernel_replaces_torch_only_when_faster_by_the_margin():
    # packed 1.2x faster on few rows: chosen; on one row, packed only 1.02x faster: torch stays
    numbers = measured(one={"torch": 1.02, "packed": 1.0, "packed-padded": 1.5}, few={"torch": 1.2, "packed": 1.0})
    assert cpu.choose(numbers, rows=4).linear == "packed"
    assert cpu.choose(numbers, rows=1).linear == "torch"
    # slower than torch (the AVX2 greedy case of issue 26): torch
    assert cpu.choose(measured(one={"torch": 10.0, "packed": 13.0, "packed-padded": 14.0}), rows=1).linear == "torch"


def test_padding_chosen_where_padded_rows_are_fastest():
    numbers = measured(one={"torch": 2.0, "packed": 1.6, "packed-padded": 1.2})
    choice = cpu.choose(numbers, rows=2)
    assert choice.linear == "packed-padded" and "packed-padded 1.2 ms" in choice.why
    assert cpu.choose(measured(one={"torch": 2.0, "packed": 1.2, "packed-padded": 1.6}), rows=1).linear == "packed"


def test_few_rows_attention_only_where_measured_faster():
    assert cpu.choose(measured(sdpa=1.3, few_rows=1.0), rows=4).few_rows
    assert not cpu.choose(measured(sdpa=1.0, few_rows=1.0), rows=4).few_rows
    assert not cpu.choose(measured(sdpa=1.0, few_rows=1.3), rows=4).few_rows


def test_an_int8_kernel_replaces_its_row_class_default_only_by_the_margin():
    """fbgemm by default up to a few rows, oneDNN above (`INT8_DEFAULT`): the other kernel must be measured
    `MARGIN` faster. (A near-tie at 4 rows, 11.8 against 11.7 ms, once picked oneDNN, which took 1.45x
    fbgemm's time per decoding step there.)"""
    numbers = {**measured(), "int8": {"one": {"onednn": 1.42, "fbgemm": 1.4}, "few": {"onednn": 11.7, "fbgemm": 11.8},
                                      "several": {"onednn": 3.1, "fbgemm": 3.0},
                                      "many": {"onednn": 10.0, "fbgemm": 17.0}}}  # fmt: skip
    assert [cpu.choose(numbers, rows=n).int8 for n in (1, 4, 16, 256)] == ["fbgemm", "fbgemm", "onednn", "onednn"]
    assert "fbgemm 1.4 ms" in cpu.choose(numbers, rows=1).int8_why
    numbers["int8"]["few"] = {"onednn": 2.0, "fbgemm": 2.5}
    numbers["int8"]["several"] = {"onednn": 3.1, "fbgemm": 2.5}
    assert [cpu.choose(numbers, rows=n).int8 for n in (4, 16)] == ["onednn", "fbgemm"]
    numbers["int8"] = {cls: {"onednn": 1.0} for cls in cpu.ROW_CLASSES}  # fbgemm unusable: not timed
    assert [cpu.choose(numbers, rows=n).int8 for n in (1, 4, 16, 256)] == ["onednn"] * 4
    assert cpu.choose(measured(), rows=1).int8 == "onednn"  # no int8 numbers (a torch without its kernels)


def test_choice_without_measurements_follows_the_features():
    avx512 = cpu.Features("EPYC Zen 4", frozenset({"avx2", "avx512f"}))
    avx2 = cpu.Features("EPYC Zen 2", frozenset({"avx2"}))
    assert cpu.from_features(avx512, 1).linear == "packed-padded" and cpu.from_features(avx512, 8).linear == "packed"
    assert cpu.from_features(avx2, 1).linear == "torch" and cpu.from_features(avx2, 8).linear == "torch"
    assert [cpu.from_features(avx2, n).int8 for n in (1, 4, 16, 256)] == ["fbgemm", "fbgemm", "onednn", "onednn"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder in tmp_path, measurements counted and injected instead of timed."""
    monkeypatch.setenv("LONGSUM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LONGSUM_CALIBRATE", "1")
    monkeypatch.delenv("LONGSUM_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu, "_MEASURED", {})
    calls = []

    def fake():
        calls.append(1)
        return measured(few={"torch": 2.0, "packed": 1.0})

    monkeypatch.setattr(cpu, "calibrate", fake)
    monkeypatch.setattr(cpu, "busy_cores", lambda seconds: 0.0)  # an idle machine (the suite's may be busy)
    return calls


def test_measured_once_then_read_from_the_cache(cache, tmp_path, monkeypatch):
    first = cpu.kernel_choice(8)
    assert (first.linear, first.source, len(cache)) == ("packed", "calibrated", 1)
    entries = json.loads((tmp_path / "cache" / cpu.CACHE_FILE).read_text())
    assert list(entries) == [cpu.features().key] and cpu.features().name in cpu.features().key
    monkeypatch.setattr(cpu, "_MEASURED", {})  # a new process
    second = cpu.kernel_choice(8)
    assert (second.linear, second.source, len(cache)) == ("packed", "cached", 1)
    cpu.reset()
    assert not (tmp_path / "cache" / cpu.CACHE_FILE).exists()
    assert cpu.kernel_choice(8).source == "calibrated" and len(cache) == 2


def test_a_busy_machine_is_measured_for_the_run_but_not_cached(cache, tmp_path, monkeypatch, capsys):
    """Timings taken while other processes hold the cores are not this CPU's: used once, never cached."""
    monkeypatch.setattr(cpu, "busy_cores", lambda seconds: float(os.cpu_count() or 1))
    assert cpu.kernel_choice(8).linear == "packed" and len(cache) == 1
    assert "for this run only: other processes keep" in capsys.readouterr().err
    assert not (tmp_path / "cache" / cpu.CACHE_FILE).exists()
    monkeypatch.setattr(cpu, "_MEASURED", {})  # the next process, on an idle machine, measures and caches
    monkeypatch.setattr(cpu, "busy_cores", lambda seconds: 0.0)
    assert cpu.kernel_choice(8).source == "calibrated" and len(cache) == 2
    assert (tmp_path / "cache" / cpu.CACHE_FILE).exists()


def test_busy_cores_reads_the_machine():
    busy = cpu.busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6


def test_another_cpu_or_torch_or_an_old_entry_is_measured_again(cache, monkeypatch):
    cpu.kernel_choice(8)
    other = cpu.Features("another CPU", torch=torch.__version__)
    assert cpu.measurements(other)[1] == "calibrated" and len(cache) == 2
    path = cpu.cache_path()
    entries = json.loads(path.read_text())
    entries[cpu.features().key]["version"] = cpu.CALIBRATION_VERSION - 1
    path.write_text(json.dumps(entries))
    monkeypatch.setattr(cpu, "_MEASURED", {})
    assert cpu.kernel_choice(8).source == "calibrated" and len(cache) == 3


@pytest.mark.parametrize("damage", [{"linear": {}}, {"attention": {"sdpa": "fast"}}, {"int8": {"one": {}}}, None])
def test_a_damaged_cache_entry_is_measured_again(cache, monkeypatch, damage):
    """An entry cut short or edited by hand costs a measurement, never the run (it used to raise KeyError)."""
    cpu.kernel_choice(8)
    path = cpu.cache_path()
    entries = json.loads(path.read_text())
    key = cpu.features().key
    entries[key] = None if damage is None else {**entries[key], **damage}
    path.write_text(json.dumps(entries))
    monkeypatch.setattr(cpu, "_MEASURED", {})
    assert cpu.kernel_choice(8).source == "calibrated" and len(cache) == 2
    assert json.loads(path.read_text())[key]["linear"]  # measured again and cached in its place


def test_cache_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LONGSUM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu.cache_path() == tmp_path / "xdg" / "longsum" / cpu.CACHE_FILE
    monkeypatch.setenv("LONGSUM_CACHE", str(tmp_path / "mine"))
    assert cpu.cache_path() == tmp_path / "mine" / cpu.CACHE_FILE


def test_an_unknown_forced_kernel_is_said_and_ignored(cache, monkeypatch, capsys):
    monkeypatch.setenv("LONGSUM_CPU_KERNELS", "mkl")
    assert cpu.kernel_choice(8).source == "calibrated"
    assert "LONGSUM_CPU_KERNELS=mkl steps aside for the stock path: not one of auto, torch" in capsys.readouterr().err


def test_forced_and_feature_choices_skip_measuring(cache, monkeypatch):
    monkeypatch.setenv("LONGSUM_CPU_KERNELS", "torch")
    assert cpu.kernel_choice(8).source == "forced" and cpu.kernel_choice(8).linear == "torch"
    monkeypatch.delenv("LONGSUM_CPU_KERNELS")
    monkeypatch.setenv("LONGSUM_CALIBRATE", "0")
    assert cpu.kernel_choice(8).source == "features" and not cache


def test_reset_from_the_command_line(cache, capsys):
    cpu.kernel_choice(8)
    assert cpu.main(["--reset"]) == 0
    out = capsys.readouterr().out
    assert len(cache) == 2 and "few: 4 rows per step: packed linear layers" in out and str(cpu.cache_path()) in out
    assert cpu.main(["--bogus"]) == 2


class FakeClock:
    """`time.perf_counter` for `cpu._best_ms`: a call costs what its candidate says, times the machine's
    speed at that moment (`slowdown` per timed call: a machine slowing down while it is measured)."""

    def __init__(self, slowdown: float = 0.0):
        self.now, self.calls, self.slowdown = 0.0, [], slowdown

    def perf_counter(self) -> float:
        return self.now

    def candidate(self, name: str, cost: float):
        def run():
            self.calls.append(name)
            self.now += cost * (1 + self.slowdown * len(self.calls))

        return run


def test_calibration_candidates_take_turns_and_keep_their_best(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(cpu, "time", clock)
    best = cpu._best_ms(
        {name: clock.candidate(name, cost) for name, cost in [("a", 0.002), ("b", 0.005), ("c", 0.001)]}, 3
    )
    assert best == pytest.approx({"a": 2.0, "b": 5.0, "c": 1.0})
    # one untimed call each, then turns in an order rotated each round
    assert clock.calls == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["c", "a", "b"]


def test_a_machine_slowing_down_while_measured_tilts_no_candidate(monkeypatch):
    # Two equal kernels on a machine losing 5% per call: timed one after the other, the first would
    # look 1.27x faster (and be chosen over the margin); in turns they come out within 5%.
    clock = FakeClock(slowdown=0.05)
    monkeypatch.setattr(cpu, "time", clock)
    best = cpu._best_ms({"torch": clock.candidate("torch", 0.01), "packed": clock.candidate("packed", 0.01)}, 5)
    assert best["torch"] / best["packed"] == pytest.approx(1.0, abs=0.05)
    assert best["torch"] * cpu.MARGIN >= best["packed"] and best["packed"] * cpu.MARGIN >= best["torch"]


def test_each_timed_run_follows_an_untimed_eviction(monkeypatch):
    """`before` (the calibration's read of other data) runs before every timed call and is not timed."""
    clock = FakeClock()
    monkeypatch.setattr(cpu, "time", clock)
    evict = clock.candidate("evict", 1.0)  # far slower than the candidates: it would swamp their times
    best = cpu._best_ms({"a": clock.candidate("a", 0.002), "b": clock.candidate("b", 0.001)}, 2, before=evict)
    assert best == pytest.approx({"a": 2.0, "b": 1.0})
    assert clock.calls == ["a", "b", "evict", "a", "evict", "b", "evict", "b", "evict", "a"]


def test_int8_calibration_times_a_decoding_steps_layers_with_the_head(monkeypatch):
    """Up to 64 rows the int8 stack is a bart-base step's linear layers and its 768 x 50,265 head (the
    largest product of a step, where the kernels differ most); many rows: one layer's eight."""
    from longsum.model import int8

    if int8.int8_fails():
        pytest.skip(int8.int8_fails())
    seen: dict[int, list[int]] = {}

    def record(layer, rows):
        seen.setdefault(rows.shape[0], []).append(layer.out_features)
        return rows.new_zeros(rows.shape[0], layer.out_features)

    monkeypatch.setitem(int8.RUN, "onednn", record)
    monkeypatch.setitem(int8.RUN, "fbgemm", record)
    cpu._time_int8(fbgemm=False, evict=lambda: None)
    step = ([cpu.D_MODEL] * 6 + [cpu.D_FFN, cpu.D_MODEL]) * cpu.DECODER_LAYERS + [cpu.VOCAB]
    for rows in (1, 4, 16):
        assert seen[rows] == step * 5  # one untimed run, four timed
    assert seen[256] == step[:8] * 3


def test_calibration_measures_every_candidate():
    """The real (timed) calibration: every class has torch's time and the packed ones (no timing compared)."""
    numbers = cpu.calibrate()
    assert set(numbers["linear"]) == set(cpu.ROW_CLASSES) and set(numbers["attention"]) == {"sdpa", "few_rows"}
    kernels = {"torch"} if decoding.packing_fails() else {"torch", "packed"}
    assert set(numbers["linear"]["few"]) == kernels and set(numbers["linear"]["many"]) == kernels
    from longsum.model import int8

    if not int8.int8_fails():
        int8_kernels = set(cpu.INT8_KERNELS) if int8.fbgemm_fails() is None else {"onednn"}
        assert set(numbers["int8"]) == set(cpu.ROW_CLASSES)
        assert all(set(times) == int8_kernels for times in numbers["int8"].values())
    assert all(ms > 0 for times in numbers["linear"].values() for ms in times.values())


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    from tests.helpers import BART_DIMS, BART_TOKENS, NO_DROPOUT

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(vocab_size=64, **BART_DIMS, **BART_TOKENS, **NO_DROPOUT)).eval()


@pytest.mark.parametrize("linear", ["torch", "packed", "packed-padded"])
@pytest.mark.parametrize("few_rows", [False, True])
def test_decoding_runs_the_chosen_kernels(monkeypatch, linear, few_rows):
    from longsum import console

    model = tiny_bart()
    seen = {}
    monkeypatch.setattr(cpu, "kernel_choice", lambda rows: cpu.Choice(linear, few_rows, f"{rows} rows", "forced"))
    monkeypatch.setattr(console, "_VERBOSE", [True])
    with decoding.linear_kernels(model, exact=False, rows=4):
        layer = model.model.encoder.layers[0].fc1
        seen = {"class": type(layer), "pad": getattr(layer, "pad_to", None), "few_rows": decoding._FEW_ROWS.get()}
    packed = linear != "torch"
    assert (seen["class"] is decoding.PackedLinear) == packed and seen["few_rows"] == few_rows
    assert seen["pad"] == (decoding.MIN_ROWS if linear == "packed-padded" else 0 if packed else None)
    assert type(model.model.encoder.layers[0].fc1) is torch.nn.Linear and decoding._FEW_ROWS.get()  # restored
    with decoding.linear_kernels(model, exact=True, rows=4):  # exact: torch's, nothing asked
        assert type(model.model.encoder.layers[0].fc1) is torch.nn.Linear


def test_an_int8_model_keeps_its_layers_and_gets_the_chosen_attention(monkeypatch, capsys):
    from longsum import console
    from longsum.model.int8 import Int8Linear, int8_fails, quantize_int8

    if int8_fails():
        pytest.skip(int8_fails())
    model = quantize_int8(
        tiny_bart(), kernels={"one": "fbgemm", "few": "onednn", "several": "onednn", "many": "onednn"}
    )
    monkeypatch.setattr(cpu, "kernel_choice", lambda rows: cpu.Choice("packed", False, "measured", "cached"))
    monkeypatch.setattr(console, "_DETAILED", set())
    monkeypatch.setattr(console, "_VERBOSE", [True])
    with decoding.linear_kernels(model, exact=False, rows=4):
        assert isinstance(model.model.encoder.layers[0].fc1, Int8Linear) and not decoding._FEW_ROWS.get()
    assert "4 rows per step: int8 (onednn) linear layers, SDPA cross-attention" in capsys.readouterr().err


def test_verbose_says_which_kernels_and_why(monkeypatch, capsys):
    from longsum import console

    monkeypatch.setattr(cpu, "kernel_choice", lambda rows: cpu.Choice("torch", False, "measured 1 < 2", "cached"))
    monkeypatch.setattr(console, "_DETAILED", set())
    monkeypatch.setattr(console, "_VERBOSE", [False])
    with decoding.linear_kernels(tiny_bart(), exact=False, rows=4):
        pass
    assert "CPU kernels" not in capsys.readouterr().err
    monkeypatch.setattr(console, "_VERBOSE", [True])
    for _ in range(2):  # once per process
        with decoding.linear_kernels(tiny_bart(), exact=False, rows=4):
            pass
    err = capsys.readouterr().err
    assert err.count("CPU kernels") == 1
    assert "CPU kernels, 4 rows per step: torch linear layers, SDPA cross-attention (cached: measured 1 < 2)" in err


def test_a_run_chooses_once(monkeypatch, capsys):
    # A run's choice (`Summarizer.summarize`) holds for each batch's decoding call (`generate`), a
    # smaller last batch's too: not chosen, packed or printed again.
    from longsum import console

    asked = []

    def choice(rows):
        asked.append(rows)
        return cpu.Choice("packed", False, "measured", "cached")

    monkeypatch.setattr(cpu, "kernel_choice", choice)
    monkeypatch.setattr(console, "_DETAILED", set())
    monkeypatch.setattr(console, "_VERBOSE", [True])
    model = tiny_bart()
    with decoding.linear_kernels(model, exact=False, rows=8):
        packed = model.model.encoder.layers[0].fc1
        for rows in (8, 1):  # a full batch, a last batch of one document
            with decoding.linear_kernels(model, exact=False, rows=rows):
                assert model.model.encoder.layers[0].fc1 is packed and not decoding._FEW_ROWS.get()
        assert type(packed) is decoding.PackedLinear and not decoding._FEW_ROWS.get()
    assert asked == [8] and capsys.readouterr().err.count("CPU kernels") == 1
    assert type(packed) is torch.nn.Linear and decoding._FEW_ROWS.get()
    with decoding.linear_kernels(model, exact=False, rows=8):  # a new run chooses again
        pass
    assert asked == [8, 8]
