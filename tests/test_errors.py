"""Every failure a user can cause ends in one `error:` line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import Run, assert_one_line, run_longsum


def longsum(*args, cwd: Path) -> Run:
    """`longsum ARGS` run in this process (main(): the same error line and exit code as a process)."""
    return run_longsum(*args, cwd=cwd)


class _RunsCode:  # unpickling this would create a file: weights-only loading must refuse it
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    cut = root / "cut"
    shutil.copytree(tiny_model_dir, cut)
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # an interrupted download
    evil = root / "evil"
    shutil.copytree(tiny_model_dir, evil)
    (evil / "model.safetensors").unlink()
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": _RunsCode(str(root / "PWNED"))}, f)
    listed = root / "listed"
    shutil.copytree(tiny_model_dir, listed)
    (listed / "config.json").write_text("[1, 2, 3]")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "doc.txt").write_text("A document about rivers and towns. " * 20)
    rows = [{"text": f"Document {i} about rivers. " * 10, "summary": "Rivers."} for i in range(4)]
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("command", ["summarize", "eval", "convert", "train"])
def test_a_cut_weights_file_is_one_line_in_every_command(tmp_path, broken_models, data, command):
    model = broken_models / "cut"
    args = {"summarize": ["summarize", data / "doc.txt", "-m", model, "-o", tmp_path / "o.jsonl"],
            "eval": ["eval", data / "d.jsonl", "-m", model, "-o", tmp_path / "ev"],
            "convert": ["convert", model, tmp_path / "conv", "--max-length", 512],
            "train": ["train", "-m", model, "--dataset", data / "d.jsonl", "-o", tmp_path / "tr"]}[command]  # fmt: skip
    assert_one_line(longsum(*args, cwd=tmp_path), "are incomplete or corrupt")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "conv").exists()


def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path, broken_models, data):
    proc = longsum(
        "summarize", data / "doc.txt", "-m", broken_models / "evil", "-o", tmp_path / "o.jsonl", cwd=tmp_path
    )
    assert_one_line(proc, "refused to load the .bin weights")
    assert not (broken_models / "PWNED").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["summarize", "{doc}", "-m", "{listed}"], "config.json is not a model config (a JSON object was expected"),
        (["summarize", "{doc}", "-m", "{model}", "--device", "tpu"], "unknown device 'tpu'"),
        (["summarize", "{doc}", "-m", "{model}", "--max-source-length", "-3"], "--max-source-length must be >= 1"),
        (["summarize", "{doc}", "-m", "{model}", "-o", "/dev/full"], "cannot write to /dev/full: No space left"),
        (["eval", "{jsonl}", "-m", "{model}", "--limit", "0"], "--limit must be >= 1, got 0"),
        (["eval", "{jsonl}", "-m", "{model}", "--limit", "-2"], "--limit must be >= 1, got -2"),
        (["eval", "{jsonl}", "-m", "{model}", "--output-dir", "{file}"], "is a file; choose a folder"),
        (["train", "-m", "{model}", "--dataset", "{jsonl}", "-o", "{file}"], "--output-dir {file} is a file"),
        (["train", "-m", "{model}", "--dataset", "{jsonl}", "-o", "/proc/nope/run"], "cannot write to --output-dir"),
        (["train", "-m", "{model}", "--dataset", "{jsonl}", "-o", "run", "--per-device-batch-size", "0"],
         "--per-device-batch-size must be >= 1, got 0"),
        (["train", "-m", "{model}", "--dataset", "{jsonl}", "-o", "run", "--max-source-length", "-3"],
         "--max-source-length must be >= 1, got -3"),
        (["train", "-m", "{model}", "--dataset", "{jsonl}", "-o", "run", "--warmup-ratio", "1.5"],
         "--warmup-ratio must be <= 0.999, got 1.5"),
        (["summarize", "{doc}", "-m", "{model}", "--num-beams", "0"], "--num-beams must be >= 1, got 0"),
        (["summarize", "{doc}", "-m", "{model}", "--min-new-tokens", "-1"], "--min-new-tokens must be >= 0, got -1"),
        (["summarize", "{doc}", "-m", "{model}", "--length-penalty", "nan"], "--length-penalty must be a finite"),
        (["eval", "{jsonl}", "-m", "{model}", "--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size must be >= 0"),
        (["eval", "{jsonl}", "-m", "{model}", "--max-source-length", "0"], "--max-source-length must be >= 1, got 0"),
        (["summarize", "{doc}", "--batch-size", "many"], "Invalid value for '--batch-size'"),
        (["summarize", "{doc}", "--long-input", "squash"], "'squash' is not one of 'truncate', 'chunk'"),
    ],
)  # fmt: skip
def test_bad_settings_and_paths(tmp_path, tiny_model_dir, broken_models, data, args, message):
    (tmp_path / "afile").write_text("x")
    subs = {"{doc}": str(data / "doc.txt"), "{jsonl}": str(data / "d.jsonl"), "{model}": str(tiny_model_dir),
            "{listed}": str(broken_models / "listed"), "{file}": str(tmp_path / "afile")}  # fmt: skip
    args = [subs.get(a, a) for a in args]
    for name, value in subs.items():
        message = message.replace(name, value)
    if "-o" not in args and "--output-dir" not in args and args[0] == "summarize":
        args += ["-o", str(tmp_path / "o.jsonl")]
    assert_one_line(longsum(*args, cwd=tmp_path), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cuda_without_cuda(tmp_path, tiny_model_dir, data):
    proc = longsum("summarize", data / "doc.txt", "-m", tiny_model_dir, "--device", "cuda", "-o", tmp_path / "o.jsonl",
                   cwd=tmp_path)  # fmt: skip
    assert_one_line(proc, "--device cuda: no CUDA device here")


def test_corrupt_predictions_or_run_json_are_refused(tmp_path, tiny_model_dir, data):
    out = tmp_path / "ev"
    run = ["eval", data / "d.jsonl", "-m", tiny_model_dir, "-o", out]
    assert longsum(*run, cwd=tmp_path).returncode == 0
    predictions = out / "predictions.jsonl"
    good = predictions.read_bytes()
    predictions.write_bytes(good[:40] + b"\x00garbage\n" + good[40:])
    assert_one_line(longsum(*run, cwd=tmp_path), "is not a longsum record; not touching it")
    predictions.write_bytes(good)
    (out / "run.json").write_text("{not json")
    assert_one_line(longsum(*run, cwd=tmp_path), "cannot read")
    assert predictions.read_bytes() == good


def test_train_config_files_are_typed_and_checked(tmp_path, tiny_model_dir, data):
    """YAML reads `1e-4` as a string: converted; a bad value or bad YAML: one line naming the key."""
    from longsum.commands.train import load_config_file

    good = tmp_path / "good.yaml"
    good.write_text("learning_rate: 1e-4\nmax_steps: '7'\nbf16: false\nadam_beta2: '0.98'\n")
    assert load_config_file(str(good)) == {"learning_rate": 1e-4, "max_steps": 7, "bf16": False,
                                           "training_args": {"adam_beta2": 0.98}}  # fmt: skip
    cases = {"max_steps: ten\n": "--config {f}: max_steps must be an integer, got 'ten'",
             "learning_rate: [1, 2]\n": "--config {f}: learning_rate must be a number, got [1, 2]",
             "bf16: maybe\n": "--config {f}: bf16 must be true or false, got 'maybe'",
             "model: [unclosed\n": "--config {f} is not valid YAML"}  # fmt: skip
    for text, message in cases.items():
        f = tmp_path / "bad.yaml"
        f.write_text(text)
        proc = longsum("train", "-m", tiny_model_dir, "--dataset", data / "d.jsonl", "-o", tmp_path / "r", "--config", f,
                       cwd=tmp_path)  # fmt: skip
        assert_one_line(proc, message.replace("{f}", str(f)))


def test_every_train_setting_is_an_option_and_every_option_a_setting():
    import dataclasses

    from typer.testing import CliRunner

    from longsum.cli import app
    from longsum.commands.train import TrainConfig

    help_text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    for f in dataclasses.fields(TrainConfig):
        option = "--" + f.name.replace("_", "-")
        assert (option in help_text) == (f.name != "training_args"), option
