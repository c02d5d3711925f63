"""The route one `longsum summarize` (or `eval`) run takes through the package's files.

Runs the command in this process on a tiny local checkpoint and follows the calls between longsum's
own files (a call made from library code, such as transformers calling an attention function, and
everything below it is model work, not the command's route, and is left out). Each call edge
(calling function -> called function) counts once, at its first use, so loops over documents and
layers do not repeat it. A *stay* is a stretch of the route inside one file; a *return* is a stay in
a file the route had already left. Prints the route and a summary; saves JSON.

    python benchmarks/command_route.py --command summarize --json route.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path.cwd()))  # the checkout to trace (run from its root)


def _package_file(filename: str) -> str | None:
    marker = f"{os.sep}longsum{os.sep}"
    if marker not in filename or f"{os.sep}tests{os.sep}" in filename:
        return None
    return filename.rsplit(marker, 1)[1]


def trace(command: list[str]) -> list[str]:
    """The files of the route (one entry per stay) while `longsum COMMAND` runs in this process."""
    from typer.testing import CliRunner

    from longsum.cli import app

    route: list[str] = []
    seen_edges: set = set()
    # per frame: its state and whether its call was recorded. "pre": above the package (typer, click);
    # "in": longsum code on the command's route; "lib": library code called from it; "cut": below that.
    stack: list[tuple[str, bool]] = []

    calls: list[tuple[str, str, str]] = []  # (caller file, called file, "caller() -> callee()"), once per edge

    def move(file: str) -> None:
        if not route or route[-1] != file:
            route.append(file)

    def profile(frame, event, arg):
        if event == "call":
            callee = _package_file(frame.f_code.co_filename)
            parent = stack[-1][0] if stack else "pre"
            recorded = False
            if parent == "pre":
                state = "in" if callee else "pre"
                if callee:
                    move(callee)
            elif parent == "in":
                state = "in" if callee else "lib"
                caller = _package_file(frame.f_back.f_code.co_filename)
                edge = (frame.f_back.f_code, frame.f_code)
                if callee and callee != caller and edge not in seen_edges:
                    seen_edges.add(edge)
                    pull = " (a stream pulled)" if frame.f_code.co_flags & inspect.CO_GENERATOR else ""
                    calls.append((caller, callee, f"{frame.f_back.f_code.co_name}() -> {frame.f_code.co_name}(){pull}"))
                    move(callee)
                    recorded = True
            else:
                state = "cut"
            stack.append((state, recorded))
        elif event == "return" and stack:
            _, recorded = stack.pop()
            if recorded:
                move(_package_file(frame.f_back.f_code.co_filename))

    sys.setprofile(profile)
    try:
        result = CliRunner().invoke(app, command, catch_exceptions=False)
    finally:
        sys.setprofile(None)
    if result.exit_code != 0:
        raise SystemExit(f"the traced run failed ({result.exit_code}): {result.output[-500:]}")
    return route, calls


def summary(route: list[str], calls: list[tuple[str, str, str]]) -> dict:
    """Stays, files, returns; `entered`: calls into each file; `climbs`: the calls from a file back into
    one that had called it first (a callback, or a generator of the caller's pulled for its items)."""
    returns = sum(n - 1 for n in Counter(route).values())
    first: dict = {}
    for a, b, _ in calls:
        first.setdefault(frozenset((a, b)), (a, b))
    climbs = [f"{a} -> {b}: {how}" for a, b, how in calls if first[frozenset((a, b))] != (a, b)]
    entered = Counter(b for _, b, _ in calls)
    return {"stays": len(route), "files": len(set(route)), "returns": returns, "climbs": climbs,
            "entered": dict(entered.most_common())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", choices=("summarize", "eval"), default="summarize")
    parser.add_argument("--json", help="Save the route and its summary here.")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from longsum.model.tiny import build_tiny_lsg_bart

    tmp = Path(tempfile.mkdtemp())
    folder = tmp / "tiny"
    folder.mkdir()
    texts = ["The cell divides and the nucleus splits in two during mitosis."] * 8
    model, _ = build_tiny_lsg_bart(texts, folder, max_positions=256, block_size=16, sparse_block_size=16)
    model.generation_config.max_new_tokens = 8
    model.generation_config.save_pretrained(folder)
    if args.command == "summarize":
        doc = tmp / "doc.txt"
        doc.write_text(" ".join(texts))
        command = ["summarize", str(doc), "-m", str(folder), "-o", str(tmp / "out.jsonl"), "--num-beams", "2"]
    else:
        data = tmp / "data.jsonl"
        data.write_text("".join(json.dumps({"id": f"e{i}", "text": " ".join(texts[:4]), "summary": texts[0]}) + "\n"
                                for i in range(2)))  # fmt: skip
        command = ["eval", str(data), "-m", str(folder), "-o", str(tmp / "run"), "--num-beams", "2"]
    route, calls = trace(command)
    result = {"command": args.command, "route": route, **summary(route, calls)}
    print(" -> ".join(route))
    print(f"\n{result['stays']} stays in {result['files']} files, {result['returns']} returns to a file already "
          f"left, {len(result['climbs'])} climbs back (calls into a file that called this one)")  # fmt: skip
    print("calls into each file (each call edge once): " + ", ".join(f"{k} {v}" for k, v in result["entered"].items()))
    for climb in result["climbs"]:
        print(f"  climb: {climb}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
