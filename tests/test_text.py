"""Sentence splitting and windows in linear time."""

from __future__ import annotations

from longsum.data import text as text_module
from longsum.data.text import SEGMENT_CHARS, segments, sentence_windows, split_sentences
from tests.conftest import CORPUS


def long_document(paragraphs: int = 200) -> str:
    paragraph = " ".join(CORPUS[:5])
    return "\n\n".join(paragraph for _ in range(paragraphs)) + "\n" + "no sentence end here " * 400


def test_segments_are_bounded_and_lossless():
    text = long_document()
    pieces = list(segments(text))
    assert "".join(pieces) == text
    assert max(map(len, pieces)) <= SEGMENT_CHARS
    assert pieces[0].endswith("\n\n")  # cut at a paragraph end


def test_the_sentence_splitter_only_ever_sees_bounded_segments(monkeypatch):
    """pysbd is superlinear in its input: it must never get a whole long document."""
    real, seen = text_module._segmenter(), []

    class Spy:
        def segment(self, segment):
            seen.append(len(segment))
            return real.segment(segment)

    monkeypatch.setattr(text_module, "_segmenter", lambda: Spy())
    text = long_document(400)  # ~180K characters
    sentences = split_sentences(text)
    assert max(seen) <= SEGMENT_CHARS and len(seen) > 50
    assert "".join(sentences) == text


def test_windows_are_generated_lazily_and_count_tokens(tokenizer):
    text = long_document(50)
    stats = {}
    windows = sentence_windows(text, tokenizer, 128, stats=stats)
    first = next(windows)
    assert len(tokenizer(first)["input_ids"]) <= 128 and stats["tokens"] < len(tokenizer(text)["input_ids"])
    rest = list(windows)
    assert all(len(tokenizer(w)["input_ids"]) <= 128 for w in rest)
    total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert abs(stats["tokens"] - total) <= 0.02 * total  # sentences tokenized apart: a few merges differ
