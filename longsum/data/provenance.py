"""What produced a result: package versions and the git commit of the longsum checkout."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("longsum", "torch", "transformers", "accelerate", "datasets", "rouge-score", "pysbd", "tokenizers")


def git_commit() -> str | None:
    """The commit of the checkout longsum runs from (None when installed from a wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance() -> dict:
    return {"versions": versions(), "git_commit": git_commit(), "command": sys.argv, "time": now()}
