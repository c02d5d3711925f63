"""The `longsum` command: help, version, lazy imports, one-line errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from longsum import __version__
from longsum.cli import app
from longsum.data.store import read_records
from tests.helpers import longsum_process, run_longsum

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("convert", "summarize", "eval", "train"):
        assert command in result.output


def test_each_command_help_shows_an_example():
    """Below the options, "Examples:" and a command line to copy (the usage line names the command
    in every help text, so it proves nothing)."""
    for command in ("convert", "summarize", "eval", "train"):
        result = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0
        _, found, examples = result.output.partition("Examples:")
        assert found, f"{command} --help shows no examples"
        assert any(line.strip().startswith(f"longsum {command} ") for line in examples.splitlines()), examples


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_does_not_import_torch_or_transformers():
    code = (
        "import sys; from longsum.cli import app; from typer.testing import CliRunner;"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0;"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_errors_are_one_line_without_traceback():
    out = subprocess.run([sys.executable, "-m", "longsum", "train"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def longsum(*args, cwd=None) -> subprocess.CompletedProcess:
    """A real `longsum` process, with none of the quiet settings in-process runs left in os.environ."""
    return longsum_process(*args, cwd=cwd, drop_quiet_env=True)


def test_user_text_is_printed_as_written_never_as_markup(tmp_path, tiny_model_dir):
    import json

    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps({"id": "odd [/] id [bold]", "text": ""}) + "\n")
    out = run_longsum("summarize", src, "-m", tiny_model_dir, "-o", tmp_path / "o.jsonl", "--fail-fast")
    assert out.returncode == 1 and "MarkupError" not in out.stderr
    assert "stopped at the first failure (--fail-fast): odd [/] id [bold]: empty document" in out.stderr
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "A long text. " * 5, "summary": "Short."}) + "\n" for _ in range(2)))
    out = run_longsum("eval", data, "-m", tiny_model_dir, "--output-dir", tmp_path / "ev", "--split", "[test]")
    assert out.returncode == 0, out.stderr
    assert f"{data} [[test]]: 2 examples" in out.stderr  # the split name, brackets and all


def test_a_normal_run_prints_only_longsums_lines_and_v_shows_the_libraries(tmp_path, tiny_model_dir):
    doc = tmp_path / "d.txt"
    doc.write_text("A short document about rivers. " * 10)
    out = longsum("summarize", doc, "-m", tiny_model_dir, "-o", tmp_path / "o.jsonl")
    assert out.returncode == 0 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert "\r" not in out.stderr and "Loading weights" not in out.stderr and "Warning" not in out.stderr
    assert lines[0].startswith("model ") and lines[-1].startswith("done 1, skipped 0, failed 0")
    verbose = longsum("-v", "summarize", doc, "-m", tiny_model_dir, "-o", tmp_path / "o2.jsonl")
    assert verbose.returncode == 0 and "Loading weights" in verbose.stderr


def test_eval_prints_scores_on_stdout_and_keeps_earlier_results(tmp_path, tiny_model_dir):
    import json

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"Text number {i}. " * 8, "summary": "Short."}) + "\n" for i in range(3))
    )
    run = ["eval", data, "-m", tiny_model_dir, "--output-dir", tmp_path / "ev"]
    first = longsum(*run)
    assert first.returncode == 0, first.stderr
    assert "rougeLsum" in first.stdout and "rougeLsum" not in first.stderr  # the result on stdout, logs on stderr
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["schema"] == "longsum-eval-results" and results["schema_version"] == 1
    second = run_longsum(*run)  # resumed: nothing to generate, scored again (in this process: quicker)
    assert second.returncode == 0 and "the earlier results.json is kept as" in second.stderr
    kept = [p.name for p in (tmp_path / "ev").glob("results.*.json")]
    assert len(kept) == 1 and json.loads((tmp_path / "ev" / kept[0]).read_text()) == results


def test_readme_and_help_texts_list_what_the_registry_holds():
    """Aliases and families are written once (longsum.registry); the README and --help show them all."""
    from pathlib import Path

    from longsum.registry import MODEL_ALIASES, aliases, convertible

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name, alias in MODEL_ALIASES.items():
        assert f"| `{name}` | `{alias.hub_id}` |" in readme, name
    help_text = plain_help("convert")
    assert convertible() in help_text
    assert ", ".join(aliases("source")) in help_text


def plain_help(*command: str) -> str:
    """A command's --help as one line of words (Rich wraps text inside its boxes)."""
    return " ".join(runner.invoke(app, [*command, "--help"]).output.replace("│", " ").split())


def test_help_shows_defaults_and_choices():
    """Rich used to eat "[default ...]" written in help texts ("Beam size ."); choices are listed."""
    summarize = plain_help("summarize")
    assert "Beam size (default: the preset's, the model's, else 4)." in summarize
    assert "<truncate|chunk>" in summarize and "<auto|fp32|bf16|fp16|int8>" in summarize
    convert = plain_help("convert")
    assert "[default: 4096]" in convert and "<norm|pooling|ls" in convert
    train = runner.invoke(app, ["train", "--help"], terminal_width=300).output
    for panel in ("Model and data", "Optimization", "Precision and memory"):
        assert panel in train


@pytest.mark.slow
def test_22_14_an_interrupted_run_says_so_in_one_line_and_keeps_its_records(tmp_path, tiny_model_dir):
    """Ctrl-C used to end in a silent exit 130 (Typer swallows KeyboardInterrupt): now one line that
    says how to go on, with the records done so far on disk."""
    N = 30  # noqa: N806  enough that the run is still going when the first record is on disk
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(N):
        (docs / f"d{i:03}.txt").write_text(f"Document {i}. " + "Long reports need long-context models. " * 20)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "longsum", "summarize", str(docs), "-m", str(tiny_model_dir), "-o", str(out)]
    # A suite started in the background of a non-interactive shell inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: the child gets the default disposition a terminal's Ctrl-C meets.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "interrupted; rerun the same command to resume (train: with --resume)"
    assert "Traceback" not in err
    assert 0 < len(read_records(out)) < N  # what was done is kept: a rerun resumes (test_summarize)
