"""A checkpoint is resolved once per run (issue 25): `summarize` and `eval` read a local
checkpoint's config, generation config and tokenizer files once each, not once per caller."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from typer.testing import CliRunner

from longsum.cli import app
from tests.conftest import CORPUS

runner = CliRunner()
COUNTED = ("config.json", "generation_config.json", "tokenizer.json")
# The most opens of each file one run may make: config.json is read by longsum, then by AutoTokenizer
# (it is not handed longsum's LSG config); tokenizer.json by the tokenizer, then hashed for the
# fingerprint; generation_config.json once (the run's settings; the weights are handed the same).
# Before the checkpoint was resolved once per run: summarize 6/3/2, eval 7/3/2 (config/tokenizer/generation).
LIMITS = {"config.json": 2, "generation_config.json": 1, "tokenizer.json": 2}

# Audit hooks cannot be removed: the hook does nothing unless a test has put a folder to watch here.
_WATCHED: list[tuple[Path, Counter]] = []


def _count_opens(event: str, args: tuple) -> None:
    if event != "open" or not _WATCHED or not isinstance(args[0], (str, bytes, Path)):
        return
    path = Path(args[0].decode() if isinstance(args[0], bytes) else args[0])
    for folder, counts in _WATCHED:
        if path.name in COUNTED and path.parent.resolve() == folder:
            counts[path.name] += 1


sys.addaudithook(_count_opens)


def opens_during(folder: Path, action) -> Counter:
    counts: Counter = Counter()
    _WATCHED.append((folder.resolve(), counts))
    try:
        action()
    finally:
        _WATCHED.clear()
    return counts


def test_summarize_reads_each_checkpoint_file_once(tmp_path, tiny_model_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(CORPUS[:6]))
    out = tmp_path / "out.jsonl"

    def summarize():
        result = runner.invoke(app, ["summarize", str(doc), "-m", str(tiny_model_dir), "-o", str(out)],
                               catch_exceptions=False)  # fmt: skip
        assert result.exit_code == 0, result.output

    counts = opens_during(tiny_model_dir, summarize)
    assert all(counts[name] <= LIMITS[name] for name in COUNTED), dict(counts)
    assert counts["config.json"] >= 1 and counts["generation_config.json"] == 1  # the hook does see them


def test_eval_reads_each_checkpoint_file_once(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"ex{i}", "document": " ".join(CORPUS[i : i + 4]),
                                        "summary": CORPUS[i]}) + "\n" for i in range(3)))  # fmt: skip

    def evaluate():
        result = runner.invoke(app, ["eval", str(data), "-m", str(tiny_model_dir), "--text-column", "document",
                                     "--output-dir", str(tmp_path / "run")], catch_exceptions=False)  # fmt: skip
        assert result.exit_code == 0, result.output

    counts = opens_during(tiny_model_dir, evaluate)
    assert all(counts[name] <= LIMITS[name] for name in COUNTED), dict(counts)
    assert counts["config.json"] >= 1 and counts["generation_config.json"] == 1


def test_the_checkpoint_fingerprint_is_the_folder_fingerprint(tmp_path, tiny_model_dir, monkeypatch):
    """The fingerprint reuses the config bytes already read: the same value as hashing the folder,
    also in the Hugging Face cache's layout (links to blobs, named by the Hub's own hash)."""
    from longsum.model import checkpoint as models

    cache = tmp_path / "snapshot"
    cache.mkdir()
    (tmp_path / "blobs").mkdir()
    for path in tiny_model_dir.iterdir():
        blob = tmp_path / "blobs" / f"hub-hash-of-{path.name}"
        blob.write_bytes(path.read_bytes())
        (cache / path.name).symlink_to(blob)
    for folder in (tiny_model_dir, cache):
        monkeypatch.setattr(models, "_FINGERPRINTS", {})  # computed afresh each time, not remembered
        via_checkpoint = models.resolve(folder).fingerprint
        models._FINGERPRINTS.clear()
        assert via_checkpoint == models.fingerprint(folder)
    assert models.fingerprint(cache) != models.fingerprint(tiny_model_dir)  # the blob names are used


def test_the_generation_config_handed_to_the_weights_is_the_one_they_would_read(tiny_model_dir):
    from longsum.model.checkpoint import load_model, resolve

    checkpoint = resolve(tiny_model_dir)
    assert checkpoint.generation_config.max_new_tokens == 8  # read for the settings: then handed over
    handed, _ = checkpoint.load("cpu", "fp32")
    read, _ = load_model(tiny_model_dir, device="cpu", dtype="fp32")
    assert handed.generation_config.to_dict() == read.generation_config.to_dict()
