"""Offline quickstart: build a tiny LSG model locally and summarize the bundled example documents.

    python examples/quickstart.py

No model hub is needed. The model is UNTRAINED (random weights, a tokenizer trained on the example
files), so its "summaries" are not meaningful text: this shows the whole path (tokenizer, LSG
encoder over thousands of tokens, beam search) end to end. For real summaries, see "Real models"
in the README.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from longsum import load_model
from longsum.tiny import build_tiny_lsg_bart

HERE = Path(__file__).parent
DOCS = sorted((HERE / "docs").glob("*.txt")) + sorted((HERE / "docs").glob("*.md"))
DOCS = [p for p in DOCS if p.name != "README.md"]
MODEL_DIR = Path("tiny-lsg-bart")


def main() -> None:
    texts = [p.read_text(encoding="utf-8") for p in DOCS]
    build_tiny_lsg_bart(texts, MODEL_DIR, max_positions=4096, block_size=64, sparse_block_size=64)
    print(
        f"built an untrained tiny LSG-BART in ./{MODEL_DIR} (random weights: output is not meaningful)", file=sys.stderr
    )
    model, tokenizer = load_model(MODEL_DIR)
    for path, text in zip(DOCS, texts):
        start = time.perf_counter()
        batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=4096)
        ids = model.generate(**batch, num_beams=2, max_new_tokens=40, no_repeat_ngram_size=3)
        record = {
            "id": str(path.relative_to(HERE.parent)),
            "summary": tokenizer.decode(ids[0], skip_special_tokens=True),
            "input_tokens": int(batch["input_ids"].shape[1]),
            "seconds": round(time.perf_counter() - start, 2),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
