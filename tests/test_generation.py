"""The shared generation engine: exactness of the beam cache, OOM halving, failure isolation."""

from __future__ import annotations

import torch

from longsum.generation import GenerationOptions, Summarizer, beam_cache, keep_freed_memory
from tests.conftest import random_ids


def test_self_only_reorder_cache_gives_identical_beams(tiny_lsg_bart):
    model = tiny_lsg_bart(seed=5)
    ids = random_ids(3, 150, seed=2)
    ids[0, 90:] = 1
    mask = (ids != 1).long()
    kwargs = dict(num_beams=4, max_new_tokens=12, min_new_tokens=12, no_repeat_ngram_size=3)
    with torch.no_grad():
        stock = model.generate(ids, attention_mask=mask, **kwargs)
        ours = model.generate(ids, attention_mask=mask, past_key_values=beam_cache(), **kwargs)
    assert torch.equal(stock, ours)


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
    summarizer.summarize([(i, f"document number {i}. " * (i + 2)) for i in range(7)], results.__setitem__)
    assert sorted(results) == list(range(7)) and all(r.summary is not None for r in results.values())
    assert sizes[:3] == [7, 3, 1] and max(sizes[3:]) == 1  # 7 docs -> halved to 3 -> 1, then it stays there


def test_one_failing_document_does_not_take_its_batch_down(tiny_lsg_bart, tokenizer, monkeypatch):
    summarizer = Summarizer(tiny_lsg_bart(), tokenizer, GenerationOptions(batch_size=4, max_new_tokens=4))
    real = summarizer._generate
    poison = tokenizer("poison pill text", add_special_tokens=False)["input_ids"][0]

    def picky(batch_ids):
        if any(poison in ids for ids in batch_ids):
            raise RuntimeError("kernel failed on this input")
        return real(batch_ids)

    monkeypatch.setattr(summarizer, "_generate", picky)
    results = {}
    items = [("a", "a fine document."), ("b", "poison pill text here."), ("c", "another fine one.")]
    summarizer.summarize(items, results.__setitem__)
    assert results["a"].summary is not None and results["c"].summary is not None
    assert "RuntimeError: kernel failed" in results["b"].error


def test_keep_freed_memory_applies_on_linux_glibc():
    import sys

    assert keep_freed_memory() is sys.platform.startswith("linux")
