"""The stderr console every command logs to (stdout is for results)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def stderr_console():
    """A rich Console on stderr that never hard-wraps (paths in messages stay copyable)."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)
