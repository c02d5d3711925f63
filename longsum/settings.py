"""Typed settings defined once: a dataclass field gives the type, the default, the help text, the
help panel and the bounds; a command's options, its `--config FILE` parsing and its checks are all
built from it. Every `longsum` command is one settings dataclass and one `run(cfg)`:

    learning_rate: float = setting(8e-5, "Peak learning rate.", "Optimization", low=0, strict=True)

    COMMAND = Command("train", TrainConfig, run, help="Fine-tune ...", examples=EXAMPLES)  # in its module

Config-file values are converted to the field's type (YAML reads `1e-4` as a string) and every
bad value is one `LongsumError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from longsum.errors import LongsumError
from longsum.registry import DEFAULT_MODEL, DTYPES, QUANTIZED_DTYPES


def setting(default: Any = dataclasses.MISSING, help: str = "", panel: str | None = None, *,
            flags: tuple[str, ...] = (), low: float | None = None, high: float | None = None,
            strict: bool = False, cli: bool = True, envvar: str | None = None, argument: bool = False,
            missing: str | None = None) -> Any:  # fmt: skip
    """A dataclass field with what the CLI and the checks need.

    `low`/`high`: inclusive bounds (`strict`: `low` excluded); `flags`: option names (default
    `--field-name`; `--x/--no-x` for a yes/no/unset bool); `cli=False`: settable from a config file
    only; `envvar`: an environment variable that sets it; `argument`: positional (required without a
    default); `missing`: the one-line error when the command runs with it unset.
    """
    metadata = {"help": help, "panel": panel, "flags": flags, "low": low, "high": high, "strict": strict, "cli": cli,
                "envvar": envvar, "argument": argument, "missing": missing}  # fmt: skip
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(tp) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of `X | None` / `Optional[X]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def coerce(tp, value: Any, name: str, where: str) -> Any:
    """`value` converted to type `tp`, or a one-line error naming `name` and `where` it came from."""
    inner, nullable = _optional(tp)
    prefix = f"{where}: " if where else ""
    if value is None:
        if nullable:
            return None
        raise LongsumError(f"{prefix}{name} cannot be empty")
    expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}.get(
        inner, getattr(inner, "__name__", str(inner))
    )
    try:
        if typing.get_origin(inner) is Literal:
            choices = typing.get_args(inner)
            if value not in choices:
                raise ValueError(f"one of {', '.join(map(str, choices))}")
            return value
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError("true or false")
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("an integer")
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError("a number")
            result = float(value)
            if not math.isfinite(result):
                raise ValueError("a finite number")
            return result
        if inner is str:
            if isinstance(value, dict | list):
                raise ValueError("a string")
            return str(value)
        if inner is dict and not isinstance(value, dict):
            raise ValueError("a mapping")
        return value
    except (TypeError, ValueError) as err:
        want = str(err) if str(err).startswith(("one of", "an ", "a ", "true")) else expected
        raise LongsumError(f"{prefix}{name} must be {want}, got {value!r}") from None


def check(obj) -> None:
    """Types and bounds of a settings dataclass instance (raises one LongsumError line)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        meta = f.metadata
        if not meta:
            continue
        setattr(obj, f.name, within(meta, coerce(hints[f.name], value, flag(f.name), ""), flag(f.name)))


def within(meta, value: Any, name: str) -> Any:
    """`value`, or a one-line error naming `name` when it is outside the setting's bounds."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return value
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value <= low if meta.get("strict") else value < low):
        raise LongsumError(f"{name} must be {'>' if meta.get('strict') else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise LongsumError(f"{name} must be <= {high}, got {value}")
    return value


def option_name(f: dataclasses.Field) -> str:
    """What a config file calls a setting: its option's long name (`--dataset-config` -> dataset_config)."""
    names = [n.split("/")[0] for n in f.metadata.get("flags", ()) if n.startswith("--")]
    return (names[0][2:] if names else f.name).replace("-", "_")


def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of every setting of `cls`, a group of settings (a dataclass-typed field such as
    `generation: GenerationOptions`) giving its own fields in its place: the CLI shows them flat."""
    hints, out = _hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out += _fields(tp) if dataclasses.is_dataclass(tp) else [(f, tp)] if f.metadata else []
    return out


def cli_parameters(cls) -> list[inspect.Parameter]:
    """Keyword parameters (`typer.Argument`/`typer.Option` defaults) for every CLI setting of `cls`, in order."""
    import typer

    params = []
    for f, hint in _fields(cls):
        meta = f.metadata
        if not meta.get("cli"):
            continue
        tp, _ = _optional(hint)
        default = None if f.default is dataclasses.MISSING else f.default
        if meta.get("argument"):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            value = typer.Argument(... if required else default, help=meta["help"])
        else:
            names = meta["flags"] or (flag(f.name),)
            value = typer.Option(default, *names, help=meta["help"], rich_help_panel=meta["panel"],
                                 envvar=meta.get("envvar"), show_default=default is not None and tp is not bool)  # fmt: skip
        annotation = tp if tp is bool or meta.get("argument") else (tp | None if default is None else tp)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=annotation))
    return params


def build(cls, values: dict) -> Any:
    """An instance of `cls` from flat `values` (a group's settings fill the group). A setting declared
    with `missing=` that is still None is its one-line error: what to pass."""
    hints = _hints(cls)
    own = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            own[f.name] = build(hints[f.name], values)
        elif f.name in values:
            own[f.name] = values[f.name]
        if f.metadata.get("missing") and own.get(f.name, f.default) is None:
            raise LongsumError(f.metadata["missing"])
    return cls(**own)


# ------------------------------------------------------------------------------------------ --config FILE
def read_config_file(path: str) -> dict:
    """The mapping in a YAML/JSON file (JSON by its suffix), or one line saying what is wrong with it."""
    import json
    from pathlib import Path

    where = f"--config {path}"
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise LongsumError(f"cannot read {where}: {err.strerror or err}") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001  json/yaml syntax errors of every kind
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LongsumError(f"{where} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {first}") from None
    if not isinstance(data, dict):
        raise LongsumError(f"{where} must hold a mapping of option names to values")
    return data


def config_values(cls, data: dict, where: str) -> tuple[dict, dict]:
    """`(settings, rest)`: the settings of `cls` that `data` (a config file's mapping) names by option
    name (dashes or underscores), each converted to its type and checked against its bounds (a bad
    value is one line naming the key, after `where`), keyed by field; `rest`: the keys it names none by."""
    fields = {option_name(f): (f, tp) for f, tp in _fields(cls) if f.metadata.get("cli")}
    out, rest = {}, {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            rest[key] = value
            continue
        f, tp = fields[name]
        out[f.name] = within(f.metadata, coerce(tp, value, str(key), where), f"{where}: {key}")
    return out, rest


def load_config(cls, path: str, command: str) -> dict:
    """The settings of `cls` in a YAML/JSON file (`config_values`); an unknown key is one line."""
    out, rest = config_values(cls, read_config_file(path), f"--config {path}")
    if rest:
        raise LongsumError(f"unknown key '{next(iter(rest))}' in --config {path} (not a longsum {command} option; "
                           f"see 'longsum {command} --help')")  # fmt: skip
    return out


def merge(ctx, values: dict, from_file: dict) -> dict:
    """`values` (parsed options) with `from_file`'s settings: the file beats defaults (and environment
    variables), an option given on the command line beats the file."""
    for key, value in from_file.items():
        if getattr(ctx.get_parameter_source(key), "name", "") != "COMMANDLINE":
            values[key] = value
    return values


# ------------------------------------------------------------------------------------------ commands
@dataclasses.dataclass(frozen=True)
class Action:
    """An eager flag of a command (`longsum eval --list`): `show()` prints, then the command exits."""

    name: str
    flags: tuple[str, ...]
    help: str
    show: Callable[[], None]

    def callback(self, value: bool) -> None:
        import typer

        if value:
            self.show()
            raise typer.Exit()


@dataclasses.dataclass(frozen=True)
class Command:
    """One `longsum` command, declared in its module: its name, its settings dataclass, the `run(cfg)`
    it calls (an int result is the exit code), its one-line help and its examples (the `--help`
    epilog). `load(path)` reads its config file (default: `load_config`); `actions` are eager flags
    that print something and exit (`--list`)."""

    name: str
    config: type
    run: Callable[[Any], Any]
    help: str
    examples: str
    load: Callable[[str], dict] | None = None
    actions: tuple[Action, ...] = ()


def command(app, spec: Command) -> None:
    """Register `spec` on the Typer `app`: its options are its settings plus `--config FILE` (beside
    the first option); it builds one settings object and calls `spec.run(cfg)`."""
    cls, name, load, actions = spec.config, spec.name, spec.load, spec.actions
    import typer

    params = cli_parameters(cls)
    panel = next((p.default.rich_help_panel for p in params if isinstance(p.default, typer.models.OptionInfo)), None)
    config = typer.Option(None, "--config", help="YAML/JSON file with more options (unknown keys fail).",
                          rich_help_panel=panel)  # fmt: skip
    extra = [inspect.Parameter(a.name, inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                               default=typer.Option(False, *a.flags, help=a.help, is_eager=True,
                                                    callback=a.callback)) for a in actions]  # fmt: skip

    def callback(ctx: typer.Context, **values) -> None:
        path = values.pop(CONFIG_FILE)
        for a in actions:
            values.pop(a.name)
        if path:
            merge(ctx, values, load(path) if load else load_config(cls, path, name))
        code = spec.run(build(cls, values))
        if isinstance(code, int) and not isinstance(code, bool):
            raise typer.Exit(code)

    callback.__doc__ = spec.help
    callback.settings = cls  # what the command is built from (tests/test_settings.py reads it)
    callback.__signature__ = inspect.Signature([
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter(CONFIG_FILE, inspect.Parameter.KEYWORD_ONLY, default=config, annotation=str | None),
        *params, *extra,
    ])  # fmt: skip
    # Typer reads the annotations too: the types themselves, not this module's postponed strings.
    callback.__annotations__ = {p.name: p.annotation for p in callback.__signature__.parameters.values()}
    app.command(name, epilog=spec.examples)(callback)


CONFIG_FILE = "config_file"  # the parameter of `--config` (a settings field may be named `config`)


# ------------------------------------------------------------------------------------------ shared settings
# Settings of more than one command (summarize, eval): one name, default and help everywhere.
RunDtype = Literal[("auto", *DTYPES, *QUANTIZED_DTYPES)]


def model_setting() -> Any:
    return setting(DEFAULT_MODEL, "Path, Hub id or alias.", flags=("--model", "-m"), envvar="LONGSUM_MODEL")


def device_setting() -> Any:
    return setting("auto", "auto (CUDA if present), cpu, cuda, cuda:1, mps.")


def dtype_setting() -> Any:
    return setting("auto", "auto: bf16 on CUDA that supports it, else fp32. int8: CPU only, int8 linear layers.")
