"""What many test files share: the tiny models' sizes and two ways to run the `longsum` command.

Tiny models: `BART_DIMS`/`BART_TOKENS` for BART-like configs (BART, mBART, Pegasus, LED, their LSG
versions), `T5_DIMS` with `T5_TOKENS` (the byte-level tokenizer's ids: pad 1, eos 2) or
`T5_OWN_TOKENS` (T5's own: pad 0, eos 1) for T5 and LongT5. Tests add what is theirs (vocabulary,
positions, dropout, block sizes) so each keeps its exact config.

The command:

* `run_longsum(...)`: in this process, through `longsum.cli.main()` (the console script) with
  `sys.argv` patched: the same `error: ...` line and exit code as a real run, without the seconds
  a fresh interpreter spends importing torch and transformers. For one-line-error contracts and
  runs whose point is what they write, not the process.
* `longsum_process(...)`: a real `python -m longsum` process, for what only a process shows: lazy
  imports, signals, the environment, library output on the real stderr (`-v`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# ------------------------------------------------------------------------------------- tiny models
BART_DIMS = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64)  # fmt: skip
BART_TOKENS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0)
T5_DIMS = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
T5_TOKENS = dict(pad_token_id=1, eos_token_id=2, decoder_start_token_id=1)  # the test tokenizer's ids
T5_OWN_TOKENS = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # T5's own ids


# ----------------------------------------------------------------------------------- decoding
def padded_batch(model, lengths=(57, 40, 23), seed: int = 0, bos: bool = False):
    """A right-padded batch of random documents of different lengths, each ending with EOS (and
    starting with BOS when `bos`, as Gemma's tokenizer writes them): `(ids, mask)`, both `[b, max(lengths)]`."""
    import torch

    config = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), config.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, config.vocab_size, (n,), generator=g)
        ids[row, n - 1] = config.eos_token_id
        if bos:
            ids[row, 0] = config.bos_token_id
        mask[row, :n] = 1
    return ids, mask


def stock_and_ours(model, ids, mask, exact=False, **kwargs):
    """`(model.generate ids, longsum.model.decoding.generate ids)` for the same inputs and settings."""
    import torch

    from longsum.model import decoding

    with torch.inference_mode():
        torch.manual_seed(1)  # BigBird's random blocks
        stock = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        torch.manual_seed(1)
        ours = decoding.generate(model, ids, mask, exact=exact, **kwargs)
    return stock, ours


def cross_caches(model, generate, ids, mask, **kwargs) -> list:
    """The cross-attention caches of `generate(ids, mask, **kwargs)`'s decoding steps over the beams (a
    batch of more than 3 rows), in step order, captured from the model's forward."""
    import torch

    from longsum.model import decoding

    seen = []

    def spy(module, args, kw):
        cache = next((kw[name] for name in decoding.CACHE_KEYWORDS if kw.get(name) is not None), None)
        decoder_ids = kw.get("decoder_input_ids")
        if cache is not None and decoder_ids is not None and decoder_ids.shape[0] > 3:  # a step over the beams
            seen.append(cache.cross_attention_cache)

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.inference_mode():
            generate(ids, mask, **kwargs)
    finally:
        handle.remove()
    return seen


# ----------------------------------------------------------------------------------- the command
@dataclass
class Run:
    """What a `longsum` run left: its exit code, stdout and stderr (as a process would have them)."""

    returncode: int
    stdout: str
    stderr: str


def run_longsum(*args, input: str | None = None, cwd: Path | str | None = None) -> Run:
    """`longsum ARGS` in this process through `longsum.cli.main()`: its exit code, stdout, stderr.

    Restores what `main()` changes for the process: the SIGINT/SIGTERM handlers, `os.environ` (the
    quiet settings), the working directory and `sys.argv`."""
    from typer.testing import CliRunner

    from longsum.cli import main

    saved_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    code: int = 0
    with CliRunner().isolation(input=input) as (_, out, err):
        try:
            sys.argv = ["longsum", *map(str, args)]
            if cwd is not None:
                os.chdir(cwd)
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            for s, handler in saved_handlers.items():
                signal.signal(s, handler)
        return Run(code, out.getvalue().decode(), err.getvalue().decode())


def longsum_process(*args, input: str | None = None, cwd: Path | str | None = None, env: dict | None = None,
                    drop_quiet_env: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:  # fmt: skip
    """A real `python -m longsum ARGS` process (offline, one thread unless `env` says otherwise).

    `drop_quiet_env`: without the quiet settings that in-process runs may have left in os.environ,
    as a user's shell would be."""
    base = dict(os.environ)
    if drop_quiet_env:
        from longsum.console import _QUIET_ENV

        base = {k: v for k, v in base.items() if k not in _QUIET_ENV}
    full_env = {**base, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "longsum", *map(str, args)], capture_output=True, text=True,
                          input=input, cwd=cwd, env=full_env, timeout=timeout)  # fmt: skip


def assert_one_line(run: Run | subprocess.CompletedProcess, message: str, code: int = 2) -> None:
    """Exit `code` and one `error:` line, the last (progress lines of work already started may
    precede it), that contains `message`; never a traceback."""
    assert run.returncode == code, run.stderr
    lines = run.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in run.stderr, run.stderr
    assert message in lines[-1], lines[-1]
