"""Build an untrained tiny LSG-BART locally, for the offline quickstart (no model hub needed).

    python examples/make_tiny_model.py [OUTPUT_DIR]        # default: tiny-lsg-bart
    longsum summarize examples/docs --model tiny-lsg-bart -o -

The tokenizer is a byte-level BPE trained on examples/docs; the weights are RANDOM, so the
summaries are not meaningful text. This exercises the whole path (tokenizer, LSG encoder over
thousands of tokens, batched beam search, JSONL output) offline. For real summaries use a real
model (see "Real models" in the README).
"""

from __future__ import annotations

import sys
from pathlib import Path

from longsum.console import quiet_libraries
from longsum.model.tiny import build_tiny_lsg_bart

DOCS = Path(__file__).parent / "docs"


def main() -> None:
    quiet_libraries()  # no library progress bars ("Writing model shards") around our one line
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-lsg-bart")
    texts = [p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*")) if p.suffix in (".txt", ".md")]
    model, _ = build_tiny_lsg_bart(texts, out, max_positions=4096, block_size=64, sparse_block_size=64)
    model.generation_config.max_new_tokens = 40
    model.generation_config.num_beams = 2
    model.generation_config.save_pretrained(out)
    # The path as given (absolute or relative): `./` + an absolute path would name another folder.
    note = "random weights: its summaries are not meaningful"
    print(f"wrote an untrained tiny LSG-BART to {out} ({note})", file=sys.stderr)


if __name__ == "__main__":
    main()
