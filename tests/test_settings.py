"""Every command is one settings dataclass (`longsum.settings`): its options, `--config FILE` and help
are built from it, so none can be missed, and `cli.py` declares no option by hand."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longsum import settings
from longsum.cli import app
from tests.helpers import run_longsum

COMMANDS = {info.name: getattr(info.callback, "settings", None) for info in app.registered_commands}


def _help(command: str, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # wide enough that Rich cuts no option name short
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    return result.output


def _expected_names(f: dataclasses.Field) -> list[str]:
    """How `--help` names a setting: its positional name, or each of its option names."""
    if f.metadata["argument"]:
        return [f.name]
    flags = f.metadata["flags"] or (settings.flag(f.name),)
    return [name for flag in flags for name in flag.split("/")]


def test_every_command_is_built_from_its_settings():
    assert set(COMMANDS) == {"convert", "summarize", "eval", "train"}
    for name, cls in COMMANDS.items():
        assert dataclasses.is_dataclass(cls), name


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_every_setting_and_config(command, monkeypatch):
    text = _help(command, monkeypatch)
    table = [line for line in text.splitlines() if line.startswith("│")]  # the options, not the examples
    words = {word.removesuffix("...") for word in " ".join(table).replace("│", " ").split()}  # "inputs...": many
    for f, _ in settings._fields(COMMANDS[command]):
        for name in _expected_names(f):
            assert (name in words) == f.metadata["cli"], (command, name)
    assert "--config" in words and f"longsum {command}" in text  # and a real example (the epilog)


class _Built(Exception):
    """Raised in place of running a command: carries the settings it would run with."""


def _built(monkeypatch, *args):
    """The settings object `longsum ARGS` would run with (the command's run is never called)."""
    real = settings.build

    def capture(cls, values):
        if cls not in COMMANDS.values():  # a group of settings (GenerationOptions)
            return real(cls, values)
        raise _Built(real(cls, values))

    monkeypatch.setattr(settings, "build", capture)
    with pytest.raises(_Built) as built:
        app(args=[str(a) for a in args], prog_name="longsum", standalone_mode=False)
    return built.value.args[0]


# Per command: (the arguments it needs, a config file, an option that overrides the file, what it runs with).
CONFIG_CASES = {
    "convert": (["src"], "max_length: 8192\nseed: 3\nsparsity-type: pooling\nadaptive: false\n", ["--seed", "5"],
                lambda c: (c.max_length, c.seed, c.sparsity_type, c.adaptive, c.source) == (8192, 5, "pooling", False, "src")),
    "summarize": (["doc.txt"], "num_beams: 2\nbatch_size: 3\nglob: '*.md'\n", ["--batch-size", "5"],
                  lambda c: (c.generation.num_beams, c.generation.batch_size, c.glob) == (2, 5, "*.md")),
    "eval": (["pubmed"], "dataset_config: sections\nsplit: validation\nlimit: 5\n", ["--limit", "7"],
             lambda c: (c.dataset, c.config, c.split, c.limit) == ("pubmed", "sections", "validation", 7)),
    "train": (["-m", "m", "--dataset", "d.jsonl", "-o", "out"], "learning_rate: 1e-4\nmax_steps: 7\n", ["--max-steps", "9"],
              lambda c: (c.learning_rate, c.max_steps, c.model) == (1e-4, 9, "m")),
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_config_file_sets_options_and_the_command_line_wins(command, tmp_path, monkeypatch):
    assert set(CONFIG_CASES) == set(COMMANDS)  # a new command brings its case
    needed, text, override, expected = CONFIG_CASES[command]
    config = tmp_path / "c.yaml"
    config.write_text(text)
    cfg = _built(monkeypatch, command, *needed, "--config", config, *override)
    assert isinstance(cfg, COMMANDS[command]) and expected(cfg), cfg


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_config_file_errors_are_one_line_naming_the_key(command, tmp_path):
    needed = CONFIG_CASES[command][0]
    config = tmp_path / "c.yaml"
    integers = [f for f, tp in settings._fields(COMMANDS[command])
                if f.metadata["cli"] and not f.metadata["argument"] and settings._optional(tp)[0] is int]  # fmt: skip
    integer, bounded = integers[0].name, next(f for f in integers if f.metadata["low"] is not None)
    low = bounded.metadata["low"]
    cases = {"bogus_key: 1\n": f"error: unknown key 'bogus_key' in --config {config}",
             f"{integer}: ten\n": f"error: --config {config}: {integer} must be an integer, got 'ten'",
             f"{bounded.name}: {low - 1}\n": f"error: --config {config}: {bounded.name} must be >= {low}"}  # fmt: skip
    for text, message in cases.items():
        config.write_text(text)
        run = run_longsum(command, *needed, "--config", config)
        code, lines = run.returncode, run.stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(message), (command, lines)


def test_cli_declares_no_option_by_hand():
    """cli.py is a table: each command's options come from its settings (`settings.command`); the only
    options written in cli.py are the app's own (--version, --verbose)."""
    tree = ast.parse((Path(__file__).parent.parent / "longsum" / "cli.py").read_text())
    by_hand = []
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef) and function.name != "_main":
            by_hand += [ast.unparse(node.func) for node in ast.walk(function) if isinstance(node, ast.Call)
                        and ast.unparse(node.func) in ("typer.Option", "typer.Argument")]  # fmt: skip
        if isinstance(function, ast.FunctionDef | ast.Call) and any(
            "app.command" in ast.unparse(d) for d in getattr(function, "decorator_list", [])
        ):
            by_hand.append(f"@app.command on {function.name}")
    module_level = [ast.unparse(n.value.func) for n in tree.body if isinstance(n, ast.Assign)
                    and isinstance(n.value, ast.Call) and ast.unparse(n.value.func).startswith("typer.")
                    and ast.unparse(n.value.func) != "typer.Typer"]  # fmt: skip
    assert by_hand + module_level == []
    assert all(hasattr(info.callback, "settings") for info in app.registered_commands)
