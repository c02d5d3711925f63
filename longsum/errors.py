"""User-facing errors.

Every error a user can cause (a bad path, a bad setting, an input that is too long) is a
`LongsumError` whose message is one line that says what is wrong and what to do. The CLI prints
that line and exits non-zero instead of showing a traceback; library users can catch it.
"""

from __future__ import annotations


class LongsumError(Exception):
    """An error caused by the user's input, with a one-line message that says what to do."""

    exit_code = 2


class LSGConfigError(LongsumError, ValueError):
    """An invalid LSG setting (block size, sparsity, global tokens...)."""


class ModelLoadError(LongsumError):
    """A checkpoint that cannot be found, fetched or recognised."""


class InputTooLongError(LongsumError, ValueError):
    """An input longer than the model's position table."""


class DeviceLostError(LongsumError):
    """The accelerator can run nothing more in this process (a sticky CUDA error such as a device-side
    assert): every later document would fail too, so the run stops; a rerun resumes where it stopped."""


def describe(err: BaseException, limit: int = 300) -> str:
    """An exception in one line (for a record or a log line): its type and its message's first line."""
    first = (str(err).strip().splitlines() or [""])[0][:limit]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
