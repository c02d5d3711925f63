"""Offline text helpers: sentence splitting and sentence-aligned windows of tokens, in linear time.

pysbd, the offline sentence splitter, is superlinear in the length of what it is given (50K
characters: 1.6 s, 400K: 82 s). So text is cut into bounded segments first (paragraphs, and long
paragraphs at the last likely sentence end before `SEGMENT_CHARS`) and pysbd splits each
segment: a 1 MB document takes seconds, not minutes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

SENTENCE_SPLITTER = "pysbd-0.3 (rule-based, offline) on paragraphs"
SEGMENT_CHARS = 2000  # pysbd is fast below this
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n\s*")  # a blank line (and the whitespace after it)
_LIKELY_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_SENTENCE_BATCH = 512  # sentences tokenized per call


@lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False, char_span=False)


def segments(text: str, size: int = SEGMENT_CHARS) -> Iterator[str]:
    """Pieces of `text` of about `size` characters at most, cut at paragraph ends, else at a likely
    sentence end, else at whitespace (hard cut only inside a `size`-long word); they concatenate
    back to `text`."""
    start = 0
    for match in _PARAGRAPH_END.finditer(text):
        yield from _cut(text[start : match.end()], size)
        start = match.end()
    if start < len(text):
        yield from _cut(text[start:], size)


def _cut(paragraph: str, size: int) -> Iterator[str]:
    while len(paragraph) > size:
        head = paragraph[:size]
        ends = [m.end() for m in _LIKELY_SENTENCE_END.finditer(head)]
        cut = ends[-1] if ends and ends[-1] > size // 4 else (head.rfind(" ") + 1 or size)
        if cut <= 0:
            cut = size
        yield paragraph[:cut]
        paragraph = paragraph[cut:]
    if paragraph:
        yield paragraph


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`; they concatenate back to `text` (whitespace kept at sentence ends)."""
    return list(iter_sentences(text))


def iter_sentences(text: str) -> Iterator[str]:
    if not text.strip():
        return
    segmenter = _segmenter()
    for segment in segments(text):
        for sentence in segmenter.segment(segment):
            if sentence:
                yield sentence


def sentence_windows(text: str, tokenizer, max_tokens: int, overlap: float = 0.1,
                     stats: dict | None = None) -> Iterator[str]:  # fmt: skip
    """Windows of `text` that each fit `max_tokens` (special tokens included), generated lazily.

    Windows end at sentence boundaries and consecutive windows share about `overlap` of a
    window's tokens (whole sentences), so no sentence is cut unless it alone is too long; such a
    sentence is cut into token pieces. `stats["tokens"]` counts the text's tokens as it goes.
    """
    budget = max_tokens - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for text")
    stats = {} if stats is None else stats
    stats["tokens"] = 0
    current: list[tuple[str, int]] = []  # (sentence, tokens) of the window being filled
    size = 0
    for sentence, n in _measured(iter_sentences(text), tokenizer):
        stats["tokens"] += n
        if n > budget:  # one enormous "sentence" (a table, a list without periods): cut by tokens
            if current:
                yield "".join(s for s, _ in current)
                current, size = [], 0
            ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
            for i in range(0, len(ids), budget):
                yield tokenizer.decode(ids[i : i + budget])
            continue
        if size + n > budget and current:
            yield "".join(s for s, _ in current)
            keep: list[tuple[str, int]] = []  # carry the last sentences over, up to `overlap`
            kept = 0
            for s, m in reversed(current):
                if kept + m > overlap * budget or kept + m + n > budget:
                    break
                keep.append((s, m))
                kept += m
            current, size = keep[::-1], kept
        current.append((sentence, n))
        size += n
    if current:
        yield "".join(s for s, _ in current)


def _measured(sentences: Iterator[str], tokenizer) -> Iterator[tuple[str, int]]:
    """(sentence, token count), tokenizing sentences in batches."""
    batch: list[str] = []
    for sentence in sentences:
        batch.append(sentence)
        if len(batch) == _SENTENCE_BATCH:
            yield from _count(batch, tokenizer)
            batch = []
    if batch:
        yield from _count(batch, tokenizer)


def _count(batch: list[str], tokenizer) -> Iterator[tuple[str, int]]:
    ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
    return zip(batch, (len(x) for x in ids))
