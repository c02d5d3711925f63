"""Typed settings defined once: a dataclass field gives the type, the default, the help text, the
help panel and the bounds; the command-line options, the config-file parsing and the checks are
all built from it (`longsum train` uses this: its 36 options exist in one place).

    learning_rate: float = setting(8e-5, "Peak learning rate.", "Optimization", low=0, strict=True)

Config-file values are converted to the field's type (YAML reads `1e-4` as a string) and every
bad value is one `LongsumError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from typing import Any, Literal

from longsum.errors import LongsumError


def setting(default: Any = dataclasses.MISSING, help: str = "", panel: str | None = None, *,
            flags: tuple[str, ...] = (), low: float | None = None, high: float | None = None,
            strict: bool = False, cli: bool = True) -> Any:  # fmt: skip
    """A dataclass field with what the CLI and the checks need.

    `low`/`high`: inclusive bounds (`strict`: `low` excluded); `flags`: option names (default
    `--field-name`); `cli=False`: settable from a config file only.
    """
    metadata = {"help": help, "panel": panel, "flags": flags, "low": low, "high": high, "strict": strict, "cli": cli}
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
        value = coerce(hints[f.name], value, flag(f.name), "")
        setattr(obj, f.name, value)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (value <= low if meta.get("strict") else value < low):
            raise LongsumError(f"{flag(f.name)} must be {'>' if meta.get('strict') else '>='} {low}, got {value}")
        if high is not None and value > high:
            raise LongsumError(f"{flag(f.name)} must be <= {high}, got {value}")


def from_mapping(cls, data: dict, where: str) -> dict:
    """Known keys of `data` (dashes or underscores) converted to `cls`'s field types."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in fields:
            out[name] = coerce(hints[name], value, str(key), where)
    return out


def cli_parameters(cls) -> list[inspect.Parameter]:
    """Keyword parameters (with `typer.Option` defaults) for every CLI setting of `cls`, in order."""
    import typer

    hints = _hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta or not meta.get("cli"):
            continue
        tp, _ = _optional(hints[f.name])
        default = None if f.default is dataclasses.MISSING else f.default
        names = meta["flags"] or (flag(f.name),)
        option = typer.Option(default, *names, help=meta["help"], rich_help_panel=meta["panel"],
                              show_default=default is not None and tp is not bool)  # fmt: skip
        annotation = tp if tp is bool else (tp | None if default is None else tp)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params
