"""Offline text helpers: sentence splitting and sentence-aligned windows of tokens."""

from __future__ import annotations

from functools import lru_cache

SENTENCE_SPLITTER = "pysbd-0.3 (rule-based, offline)"


@lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False, char_span=False)


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`; they concatenate back to `text` (whitespace kept at sentence ends)."""
    if not text.strip():
        return []
    return [s for s in _segmenter().segment(text) if s]


def sentence_windows(text: str, tokenizer, max_tokens: int, overlap: float = 0.1) -> list[str]:
    """Split `text` into windows that each fit `max_tokens` (special tokens included).

    Windows end at sentence boundaries and consecutive windows share about `overlap` of a
    window's tokens (whole sentences), so no sentence is cut unless it alone is too long; such a
    sentence is cut into token pieces.
    """
    budget = max_tokens - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for text")
    sentences = split_sentences(text)
    lengths = [len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]] if sentences else []
    windows: list[str] = []
    current: list[tuple[str, int]] = []
    size = 0
    for sentence, n in zip(sentences, lengths):
        if n > budget:  # one enormous "sentence" (a table, a list without periods): cut by tokens
            if current:
                windows.append("".join(s for s, _ in current))
                current, size = [], 0
            ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
            windows += [tokenizer.decode(ids[i : i + budget]) for i in range(0, len(ids), budget)]
            continue
        if size + n > budget and current:
            windows.append("".join(s for s, _ in current))
            keep: list[tuple[str, int]] = []  # carry the last sentences over, up to `overlap`
            for s, m in reversed(current):
                if sum(k for _, k in keep) + m > overlap * budget or sum(k for _, k in keep) + m + n > budget:
                    break
                keep.insert(0, (s, m))
            current, size = keep, sum(m for _, m in keep)
        current.append((sentence, n))
        size += n
    if current:
        windows.append("".join(s for s, _ in current))
    return windows
