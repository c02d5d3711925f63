"""What the commands print: results on stdout, longsum's own progress and log lines on stderr.

Consoles never interpret Rich markup: messages carry user text (paths, ids, split names such as
`[test]`) that must print as written, so colour is given with `style=`, never with `[tags]`.

`quiet_libraries()` (the default; `longsum -v` skips it) keeps third-party progress bars and logs
(transformers' "Loading weights", datasets' "Generating split", deprecation warnings) off the
terminal, so a normal run prints only longsum's lines.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache


@lru_cache(maxsize=1)
def stderr_console():
    """A Rich Console on stderr: no markup, no highlighting, no hard wrapping (paths stay copyable)."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


@lru_cache(maxsize=1)
def stdout_console():
    """A Rich Console on stdout, for results (tables)."""
    from rich.console import Console

    return Console(soft_wrap=True, markup=False, highlight=False)


def log(message: str) -> None:
    stderr_console().print(message)


_VERBOSE = [False]


def set_verbose(on: bool = True) -> None:
    """`longsum -v`: also print `detail` lines."""
    _VERBOSE[0] = on


_DETAILED: set[str] = set()


def detail(message: str) -> None:
    """What only `longsum -v` shows (which kernels a run chose, and why), once per process."""
    if _VERBOSE[0] and message not in _DETAILED:
        _DETAILED.add(message)
        stderr_console().print(message)


def note(message: str) -> None:
    """Something the user should know (yellow on a terminal)."""
    stderr_console().print(message, style="yellow")


def alert(message: str) -> None:
    """Something went wrong but the run goes on or ends normally (red on a terminal)."""
    stderr_console().print(message, style="red")


_QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' bars ("Loading weights", "Writing model shards")
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_libraries() -> None:
    """Silence third-party progress bars, info logs and warnings (before they are imported).

    Values already set in the environment win, so `TRANSFORMERS_VERBOSITY=info longsum ...` works.
    """
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for module in ("transformers", "datasets", "accelerate", "torch", "huggingface_hub", "pysbd"):
        warnings.filterwarnings("ignore", module=module)
