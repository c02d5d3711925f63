"""The shared generation engine: OOM halving, failure isolation, windows (decoding exactness: test_decoding)."""

from __future__ import annotations

import pytest
import torch

from longsum.model.generation import GenerationOptions, Summarizer, keep_freed_memory


def test_out_of_memory_halves_the_batch_and_keeps_every_document(tiny_lsg_bart, tokenizer, monkeypatch):
    summarizer = Summarizer(tiny_lsg_bart(), tokenizer, GenerationOptions(batch_size=8, max_new_tokens=4))
    real, sizes = summarizer._generate, []

    def flaky(batch_ids):
        sizes.append(len(batch_ids))
        if len(batch_ids) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch_ids)

    monkeypatch.setattr(summarizer, "_generate", flaky)
    results = {}
    results.update(summarizer.summarize([(i, f"document number {i}. " * (i + 2)) for i in range(7)]))
    assert sorted(results) == list(range(7)) and all(r.summary is not None for r in results.values())
    assert sizes[:3] == [7, 3, 1] and max(sizes[3:]) == 1  # 7 docs -> halved to 3 -> 1, then it stays there


@pytest.mark.parametrize("message", ["kernel failed on this input", ""])  # (an empty one has no first line)
def test_one_failing_document_does_not_take_its_batch_down(tiny_lsg_bart, tokenizer, monkeypatch, message):
    summarizer = Summarizer(tiny_lsg_bart(), tokenizer, GenerationOptions(batch_size=4, max_new_tokens=4))
    real = summarizer._generate
    poison = tokenizer("poison pill text", add_special_tokens=False)["input_ids"][0]

    def picky(batch_ids):
        if any(poison in ids for ids in batch_ids):
            raise RuntimeError(message)
        return real(batch_ids)

    monkeypatch.setattr(summarizer, "_generate", picky)
    results = {}
    items = [("a", "a fine document."), ("b", "poison pill text here."), ("c", "another fine one.")]
    results.update(summarizer.summarize(items))
    assert results["a"].summary is not None and results["c"].summary is not None
    assert results["b"].error == f"generation failed: RuntimeError{': ' + message if message else ''}"


# Run in a fresh process: in the test process, earlier runs may already have set glibc's thresholds and
# left freed heap memory that a big block is then served from, whatever the mmap threshold.
_MALLOC_PROBE = """
import ctypes, json
from longsum.model.generation import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]

def mmapped(size):  # how many more bytes are in mmapped blocks while a `size`-byte block is held
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    try:
        return libc.mallinfo2().hblkhd - before
    finally:
        libc.free(block)

before = mmapped(64 << 20)
applied = keep_freed_memory()
print(json.dumps({"before": before, "applied": applied, "after": mmapped(64 << 20)}))
"""


def test_keep_freed_memory_applies_on_linux_glibc():
    """It returns whether it applied, and when it did, glibc serves a big block from the heap (kept
    for reuse) instead of a fresh mmap: by default anything over 32 MiB is mmapped and unmapped."""
    import json
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        assert keep_freed_memory() is False
        return
    proc = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], capture_output=True, text=True, check=True)
    seen = json.loads(proc.stdout)
    assert seen["before"] >= 64 << 20  # the probe sees a fresh mmap by default
    assert seen["applied"] is True
    assert seen["after"] == 0, "a 64 MiB block was still mmapped"


def test_a_prefix_is_truncated_exactly_like_the_whole_text(tiny_lsg_bart, tokenizer, tmp_path):
    """Only a prefix of each document is read and tokenized; the ids are those of the whole text."""
    from longsum.data.inputs import StringText, read_text_file
    from tests.conftest import CORPUS

    summarizer = Summarizer(tiny_lsg_bart(), tokenizer, GenerationOptions(max_source_length=64))
    body = " ".join(CORPUS)
    texts = [body[:40], body[:200], body, " " * 3000 + body, "x" * 5000 + " " + body, "é" * 700 + body,
             body[:300] + "\n" * 2000 + body]  # fmt: skip
    items = [(i, StringText(t)) for i, t in enumerate(texts)]
    for i, text in enumerate(texts):  # the same through lazily read files
        (tmp_path / f"{i}.txt").write_text(text)
        items.append((f"file{i}", read_text_file(tmp_path / f"{i}.txt").text))
    jobs, long_docs, errors = summarizer._prepare(items)
    assert not errors and not long_docs and len(jobs) == len(items)
    for job in jobs:
        text = texts[job.key] if isinstance(job.key, int) else texts[int(job.key[4:])]
        whole = tokenizer(text, truncation=True, max_length=64)["input_ids"]
        assert list(job.ids) == whole, job.key
        assert job.result.truncated == (len(tokenizer(text)["input_ids"]) > 64)
        assert job.result.input_tokens == len(whole)


def test_documents_are_taken_in_bounded_windows(tiny_lsg_bart, tokenizer):
    """The stream is consumed a window at a time: results come before the input is exhausted."""
    summarizer = Summarizer(tiny_lsg_bart(), tokenizer, GenerationOptions(max_new_tokens=2, num_beams=1),
                            window_docs=3)  # fmt: skip
    pulled, events = 0, []

    def items():
        nonlocal pulled
        for i in range(7):
            pulled += 1
            yield i, f"document number {i}. " * 3

    events = [(key, pulled) for key, _ in summarizer.summarize(items())]
    assert sorted(k for k, _ in events) == list(range(7))
    assert max(p for k, p in events if k < 3) == 3  # the first window was done after 3 documents were read


def test_min_new_tokens_above_max_new_tokens_is_refused():
    import pytest

    from longsum.errors import LongsumError

    with pytest.raises(LongsumError, match=r"--min-new-tokens \(50\) is more than --max-new-tokens \(10\)"):
        GenerationOptions(min_new_tokens=50, max_new_tokens=10)
    assert GenerationOptions(min_new_tokens=10, max_new_tokens=10).min_new_tokens == 10  # equal is fine
    assert GenerationOptions(min_new_tokens=50).min_new_tokens == 50  # the maximum may come from the model


def test_a_model_minimum_gives_way_to_a_shorter_maximum_you_chose():
    from transformers import GenerationConfig

    from longsum.model.generation import resolve_generation_kwargs

    model_config = GenerationConfig(min_new_tokens=100, max_new_tokens=300)
    # --max-new-tokens 64 alone: the model's minimum of 100 would force every summary to 64 tokens.
    assert resolve_generation_kwargs(model_config, GenerationOptions(max_new_tokens=64))["min_new_tokens"] == 0
    # Below the maximum, the model's minimum stands; one you chose is never dropped.
    assert resolve_generation_kwargs(model_config, GenerationOptions(max_new_tokens=200))["min_new_tokens"] == 100
    forced = resolve_generation_kwargs(GenerationConfig(max_new_tokens=40), GenerationOptions(min_new_tokens=50))
    assert (forced["min_new_tokens"], forced["max_new_tokens"]) == (40, 40)  # the model's maximum: clamped


def test_linear_layers_are_packed_once_for_a_whole_run(tiny_lsg_bart, tokenizer, monkeypatch):
    from longsum.model import decoding

    model, real, seen = tiny_lsg_bart(), decoding.generate, []

    def spy(model, *args, **kwargs):  # which classes the linear layers have while each batch decodes
        seen.append({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(decoding, "generate", spy)
    docs = [(i, f"document number {i}. " * (i + 2)) for i in range(5)]
    for exact, during in ((False, {"PackedLinear"}), (True, {"Linear"})):
        seen.clear()
        summarizer = Summarizer(model, tokenizer, GenerationOptions(batch_size=2, max_new_tokens=4, exact=exact))
        results = {}
        results.update(summarizer.summarize(docs))
        assert len(results) == 5 and len(seen) == 3 and all(s == during for s in seen), (exact, seen)
        assert all(type(m) is torch.nn.Linear and not hasattr(m, "packed")
                   for m in model.modules() if isinstance(m, torch.nn.Linear))  # fmt: skip


@pytest.mark.parametrize(
    "model_type, positions, refused",
    [("bart", {"max_position_embeddings": 1024}, True), ("lsg_bart", {"max_position_embeddings": 1024}, True),
     ("led", {"max_encoder_position_embeddings": 1024}, True), ("pegasus_x", {"max_position_embeddings": 1024}, False),
     ("longt5", {}, False)],
)  # fmt: skip
def test_22_13_a_source_length_past_the_position_table_is_refused_up_front(tokenizer, model_type, positions, refused):
    """Each document would fail on its own (an index past the table); a model whose positions are
    relative or computed runs past its config's number, so it is not refused."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from longsum.errors import LongsumError
    from longsum.model.generation import resolve_settings

    config = SimpleNamespace(model_type=model_type, **positions)
    ok = resolve_settings(config, GenerationConfig(), tokenizer, GenerationOptions(max_source_length=1024))
    assert ok.max_source_length == 1024
    options = GenerationOptions(max_source_length=1025)
    if refused:
        with pytest.raises(LongsumError, match="--max-source-length 1025 is more than the model's 1024 positions"):
            resolve_settings(config, GenerationConfig(), tokenizer, options)
    else:
        assert resolve_settings(config, GenerationConfig(), tokenizer, options).max_source_length == 1025


def test_22_13_summarize_refuses_a_source_length_past_the_positions_before_any_output(tmp_path, tiny_model_dir):
    from longsum.commands.summarize import SummarizeConfig, run
    from longsum.errors import LongsumError

    (tmp_path / "a.txt").write_text("A short document.")
    out = tmp_path / "out.jsonl"
    config = SummarizeConfig(inputs=[str(tmp_path / "a.txt")], output=str(out), model=str(tiny_model_dir),
                             device="cpu", dtype="fp32", generation=GenerationOptions(max_source_length=257))  # fmt: skip
    with pytest.raises(LongsumError, match="^--max-source-length 257 is more than the model's 256 positions; use at "
                                           "most 256 "):  # fmt: skip
        run(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_lost_device_stops_the_run_instead_of_failing_every_later_document(tiny_lsg_bart, tokenizer, monkeypatch):
    """A sticky device error (a CUDA device-side assert poisons the context) stops the run with one line
    saying to rerun; the failing batch gets no error record, so the rerun summarizes it."""
    from longsum.errors import DeviceLostError
    from longsum.model import generation

    summarizer = Summarizer(tiny_lsg_bart(), tokenizer, GenerationOptions(batch_size=1, max_new_tokens=2))
    real, calls = summarizer._generate, []

    def poisoned(batch_ids):
        calls.append(len(batch_ids))
        if len(calls) == 2:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(batch_ids)

    monkeypatch.setattr(summarizer, "_generate", poisoned)
    monkeypatch.setattr(generation, "device_lost", lambda device: "AcceleratorError: CUDA error: device-side assert")
    results = {}
    items = [(i, f"document number {i}. " * (6 - i)) for i in range(4)]  # longest first: the order of the run
    with pytest.raises(DeviceLostError) as caught:
        results.update(summarizer.summarize(items))
    assert list(results) == [0] and results[0].summary is not None  # done before; nothing for the rest
    assert calls == [1, 1]  # stopped at the failure: the other documents were not tried
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "rerun the same command to resume" in message
    assert "device-side assert" in message


def test_an_ordinary_failure_on_a_working_device_is_one_documents_error(tiny_lsg_bart, tokenizer, monkeypatch):
    from longsum.model import generation

    probed = []
    monkeypatch.setattr(generation, "device_lost", lambda device: probed.append(str(device)))  # works: None
    summarizer = Summarizer(tiny_lsg_bart(), tokenizer, GenerationOptions(batch_size=1, max_new_tokens=2))
    monkeypatch.setattr(summarizer, "_generate", lambda ids: (_ for _ in ()).throw(RuntimeError("bad input")))
    results = {}
    results.update(summarizer.summarize([("a", "one text."), ("b", "another text.")]))
    assert {k: r.error for k, r in results.items()} == {k: "generation failed: RuntimeError: bad input" for k in "ab"}
    assert probed == ["cpu", "cpu"]


def test_the_device_probe():
    from longsum.model.generation import device_lost

    assert device_lost("cpu") is None  # a CPU cannot be poisoned
    # A device whose tensors cannot be brought back (here meta, which holds no data) counts as lost.
    assert "meta" in device_lost("meta").lower()


def test_compile_reaches_decoding_and_is_part_of_the_identity_only_when_on(tiny_lsg_bart, tokenizer, monkeypatch):
    """--compile is passed to decoding.generate, and is in the settings a result file's identity compares
    only when on (so outputs written before the option existed still resume)."""
    from longsum.model import decoding

    calls = []
    monkeypatch.setattr(decoding, "compiled_generate", lambda model, ids, mask, **kw: calls.append(tuple(ids.shape)))
    model = tiny_lsg_bart()
    summarizer = Summarizer(model, tokenizer, GenerationOptions(compile=True, max_new_tokens=2, num_beams=1))
    results = {}
    results.update(summarizer.summarize([("a", "a short text.")]))
    assert len(calls) == 1 and results["a"].error is None  # (the stand-in returned None: decoded eagerly)
    assert summarizer.settings()["compile"] is True
    assert "compile" not in Summarizer(model, tokenizer, GenerationOptions(max_new_tokens=2)).settings()
