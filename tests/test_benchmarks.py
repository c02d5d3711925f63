"""The GPU check (benchmarks/gpu/check.sh) calls the benchmark scripts with flags that still exist.

A GPU run is rare and short; a flag renamed in a benchmark must fail here, on CPU, not there.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "benchmarks" / "gpu" / "check.sh"
# The dry run's values of the script's variables (GPU_CHECK_DRY=1).
DRY = {"$DEV": "cpu", "$LENGTHS": "1024", "$BEAMS": "1", "$NEW": "4", "$WORK": "/tmp/w", "$PY": sys.executable}


def benchmark_calls() -> list[list[str]]:
    """Each `"$PY" benchmarks/NAME.py ...` call of check.sh as argv, with the dry run's values."""
    text = CHECK.read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        if (at := line.find('"$PY" benchmarks/')) < 0:
            continue
        words = shlex.split(line[at + len('"$PY" ') :])  # [benchmarks/NAME.py, --flag, value, ...]
        calls.append([w for word in words for w in DRY.get(word, word).split()])  # $LENGTHS may be several
    return calls


def test_the_check_script_parses_and_calls_benchmarks():
    assert subprocess.run(["bash", "-n", str(CHECK)]).returncode == 0
    assert len(benchmark_calls()) >= 3


@pytest.mark.parametrize("argv", benchmark_calls(), ids=lambda argv: Path(argv[0]).stem)
def test_each_benchmark_takes_the_flags_check_sh_gives(argv):
    script = ROOT / argv[0]
    args = [re.sub(r"\$(\w+)", lambda m: DRY.get(m.group(0), m.group(0)), a) for a in argv[1:]]  # "$WORK/bench"
    # argparse reads left to right: values and choices before --help are checked, then it exits 0.
    proc = subprocess.run([sys.executable, str(script), *args, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    unknown = [a for a in args if a.startswith("--") and a not in proc.stdout]
    assert not unknown, f"{script.name} has no {unknown}"
