"""`longsum convert`: long-context checkpoints from short-context ones, without pretraining.

What the original LSG converter does (docs/lsg.md, "Conversion"), so results compare with
the published ccdv/lsg-* checkpoints:
* positions: BART/mBART tile their learned rows after the 2 offset rows (row 1024+k starts as row
  k), encoder and decoder; Pegasus recomputes its sinusoids; BERT-family encoders tile with their
  own offset;
* global embeddings: the source's (untiled) position rows, one row in every n/512, reordered with
  a stride of `global_stride` so consecutive globals are that many positions apart; global 0 adds
  the `<s>` (or `[CLS]`) embedding, the others the `<mask>` embedding. `--random-global-init`
  draws the token part from a normal fitted to the token embeddings instead;
* re-converting an LSG checkpoint only extends its positions and keeps its trained globals.
T5 / Flan-T5 become LongT5 (`to="longt5-local"` or `"longt5-tglobal"`): the weights carry over.

The result is written to a temporary folder and renamed into place only when complete. Everything a
user can get wrong is refused before any weights are loaded: an output that is (or holds, or sits in)
the source, a symlinked output, an output folder that is not a model folder (`check_output_folder`), a
source without tokenizer files, a `--max-length` whose position tables do not fit in memory or on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from longsum.errors import LongsumError
from longsum.registry import (
    DTYPES,
    FAMILIES,
    LONGT5_TARGETS,
    LSG_DEFAULTS,
    MAX_GLOBAL_TOKENS,
    SPARSITY_TYPES,
    T5_TYPES,  # fmt: skip
    Family,
    aliases,
    convertible,
)
from longsum.settings import Command, check, setting

if TYPE_CHECKING:
    import torch

# The LSG config keys `convert` sets (all of LSG_DEFAULTS but the prefix name).
LSG_OPTION_KEYS = tuple(key for key in LSG_DEFAULTS if key != "base_model_prefix")


LSG_PANEL = "LSG settings (defaults: docs/lsg.md; re-converting keeps the source's)"


@dataclass
class ConvertOptions:
    """How to convert, defined once (`longsum.settings`): the `convert` options are built from these
    fields. None means: the source's value when re-converting an LSG checkpoint, else docs/lsg.md's default."""

    max_length: int = setting(4096, "New maximum input length (a multiple of the block size).", low=1)
    block_size: int | None = setting(None, "Local block size (default 128).", LSG_PANEL, low=1)
    sparse_block_size: int | None = setting(None, "Sparse tokens on each side (default 128); 0 = none.", LSG_PANEL,
                                            low=0)  # fmt: skip
    sparsity_factor: int | None = setting(None, "Compression factor of the sparse sequence (default 2).", LSG_PANEL,
                                          low=1)  # fmt: skip
    sparsity_type: Literal[SPARSITY_TYPES] | None = setting(None, "How the sparse sequence is built (default norm).",
                                                            LSG_PANEL)  # fmt: skip
    num_global_tokens: int | None = setting(None, f"Global tokens, 1..{MAX_GLOBAL_TOKENS} (default 1).", LSG_PANEL,
                                            low=1, high=MAX_GLOBAL_TOKENS)  # fmt: skip
    pass_global_tokens_to_decoder: bool | None = setting(None, "(default: pass)", LSG_PANEL,
        flags=("--pass-global-tokens-to-decoder/--no-pass-global-tokens-to-decoder",))  # fmt: skip
    mask_first_token: bool | None = setting(None, "Hide token 0, which repeats global 0 (default: no).", LSG_PANEL,
                                            flags=("--mask-first-token/--no-mask-first-token",))  # fmt: skip
    adaptive: bool | None = setting(None, "Shrink blocks for short inputs (default: adaptive).", LSG_PANEL,
                                    flags=("--adaptive/--no-adaptive",))  # fmt: skip
    pool_with_global: bool | None = setting(None, "Pool global tokens too (default: yes).", LSG_PANEL,
                                            flags=("--pool-with-global/--no-pool-with-global",))  # fmt: skip
    lsh_num_pre_rounds: int | None = setting(None, "Pre-rounds of the lsh sparsity type (default 1).", LSG_PANEL,
                                             low=0)  # fmt: skip
    random_global_init: bool = setting(False, "Draw globals from a normal fit.")
    global_stride: int = setting(64, "Positions between consecutive global tokens.", low=1)
    to: Literal[LONGT5_TARGETS] | None = setting(None, "T5 only: which LongT5 attention.")
    seed: int = setting(0, "Seed for random global initialisation.")
    dtype: Literal[tuple(DTYPES)] = setting("fp32", "Saved weights.")
    overwrite: bool = setting(False, "Replace an existing model folder.")

    def __post_init__(self) -> None:
        """Cheap checks (no torch, no download): a typo is refused before anything is loaded."""
        check(self)


@dataclass(kw_only=True)
class ConvertConfig(ConvertOptions):
    """Every `longsum convert` setting: what to convert, where to, and how (`ConvertOptions`)."""

    source: str = setting(help="Checkpoint folder, Hub id or alias.", argument=True)
    output_dir: str | None = setting(None, "Where to write (default: ./lsg-NAME-LENGTH).", argument=True)


def run(cfg: ConvertConfig) -> None:
    """`longsum convert`: convert, then show what was done (a table and notes, on stderr)."""
    from rich.table import Table

    from longsum.console import note, stderr_console

    options = ConvertOptions(**{f.name: getattr(cfg, f.name) for f in fields(ConvertOptions)})
    report = convert(cfg.source, cfg.output_dir, options)
    table = Table(title=f"converted {report.source}", show_header=False)
    rows = [("architecture", f"{report.architecture} ({report.model_type})"),
            ("parameters", f"{report.params_before:,} -> {report.params_after:,}"),
            ("positions", f"{report.positions_before} -> {report.positions_after}"),
            *((k, str(v)) for k, v in report.settings.items()),
            ("output", report.output), ("seconds", f"{report.seconds:.1f}")]  # fmt: skip
    for key, value in rows:
        table.add_row(key, value)
    stderr_console().print(table)
    for line in report.notes:
        note(f"note: {line}")


@dataclass
class ConvertReport:
    source: str
    output: str
    architecture: str
    model_type: str
    params_before: int
    params_after: int
    positions_before: int
    positions_after: int
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------ families
# Source architecture class suffix -> LSG head (`registry.TASKS` key), per family kind.
HEADS = {
    "seq2seq": {"ForConditionalGeneration": "seq2seq", "ForSequenceClassification": "classification", "Model": "base"},
    "encoder": {"ForMaskedLM": "masked_lm", "ForSequenceClassification": "classification", "Model": "base"},
}


# Files a model folder may hold: what `save_pretrained` and `tokenizer.save_pretrained` write (and so
# `convert` and `train`). `--overwrite` deletes nothing else (see `check_output_folder`).
_MODEL_FOLDER_FILES = ("config.json", "generation_config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                       "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja",
                       "chat_template.json")  # fmt: skip
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_MODEL_FOLDER_SUFFIXES = (*_WEIGHT_SUFFIXES, ".index.json")


def check_output_folder(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an output that is the source, a symlink, or an existing folder --overwrite must not delete.

    `--overwrite` deletes `out` only when it is empty or is a model folder as `save_pretrained` (so
    `convert` and `train`) writes one: a real folder (not a symlink) whose config.json is a JSON
    object with a `model_type` that transformers or longsum knows, that holds weights (`*.safetensors`
    or `*.bin`), and whose every entry is a plain file named as `save_pretrained` /
    `tokenizer.save_pretrained` name theirs, the README.md being a model card (YAML front matter, as
    convert's cards and the Hub's have). Anything else (a user's notes, a subfolder, a symlink, a git
    clone) means the folder holds something we did not write: refused, naming what is unexpected.
    """
    if source is not None:
        # resolved: a symlink or a `..` path to the source is the source
        src, dst = source.resolve(), out.resolve()
        if dst == src:
            raise LongsumError(f"output {out} is the source checkpoint {source}: converting in place would destroy "
                               f"it; choose another output folder")  # fmt: skip
        if src in dst.parents:
            raise LongsumError(f"output {out} is inside the source checkpoint {source}; choose a folder outside it")
        if dst in src.parents:
            raise LongsumError(f"the source checkpoint {source} is inside the output folder {out}, which "
                               f"--overwrite would delete; choose another output folder")  # fmt: skip
    if out.is_symlink():  # deleting or renaming onto a link replaces the link, not the folder the user means
        raise LongsumError(f"output {out} is a symlink (to {os.readlink(out)}); give the real folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise LongsumError(f"output {out} is a file; choose a folder name")
    if not overwrite:
        raise LongsumError(f"output folder {out} exists; pass --overwrite to replace it")
    problem = _not_a_model_folder(out)
    if problem:
        raise LongsumError(f"--overwrite replaces model folders only; {out} is not one ({problem}): "
                           f"choose another output folder")  # fmt: skip


def _not_a_model_folder(folder: Path) -> str | None:
    """Why `folder` is not a model folder that --overwrite may delete (None: it is one, or is empty)."""
    entries = sorted(folder.iterdir())
    if not entries:
        return None
    foreign = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in entries
               if p.is_symlink() or not p.is_file()
               or not (p.name in _MODEL_FOLDER_FILES or p.name.endswith(_MODEL_FOLDER_SUFFIXES))
               or p.name == "README.md" and not _is_model_card(p)]  # fmt: skip
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        return f"it holds {', '.join(foreign[:5])}{more}"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "it has no config.json"
    except (OSError, ValueError):
        return "its config.json is not valid JSON"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        return "its config.json has no model_type"
    if not _known_model_type(model_type):
        return f"its config.json has an unknown model_type '{model_type}'"
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in entries):
        return "it holds no weights"
    return None


def _is_model_card(path: Path) -> bool:
    """A README.md that is a model card: YAML front matter first, as convert and the Hub write them."""
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().rstrip("\r\n") == "---"
    except (OSError, UnicodeDecodeError):
        return False


def _known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES or model_type.removeprefix("lsg_") in FAMILIES


def default_output_dir(source: str, options: ConvertOptions, model_type: str) -> Path:
    name = Path(source.rstrip("/")).name
    if options.to:
        stem = name.replace("t5", "longt5", 1) if "t5" in name else f"longt5-{name}"
        suffix = "-tglobal" if options.to == "longt5-tglobal" else "-local"
        return Path(f"./{stem}{suffix}-{options.max_length}")
    name = name.removeprefix("lsg-")
    name = "-".join(p for p in name.split("-") if not p.isdigit())  # drop an old length (lsg-bart-base-4096)
    return Path(f"./lsg-{name}-{options.max_length}")


def _check_max_length(options: ConvertOptions, block_size: int) -> None:
    if options.max_length < 1 or options.max_length % block_size:
        low = options.max_length // block_size * block_size
        valid = [v for v in (low, low + block_size) if v > 0]
        raise LongsumError(f"--max-length {options.max_length} is not a multiple of the block size {block_size}; "
                           f"use {' or '.join(map(str, valid))}")  # fmt: skip


# ------------------------------------------------------------------------------------ tensors
def tile_positions(table: torch.Tensor, offset: int, max_length: int) -> torch.Tensor:
    """[offset + n, d] -> [offset + max_length, d]; row offset+n+k starts as row offset+k."""
    import torch

    rows = table[offset:]
    repeats = -(-max_length // rows.shape[0])
    return torch.cat([table[:offset], rows.repeat(repeats, 1)[:max_length]], dim=0)


def order_positions(positions: torch.Tensor, stride: int) -> torch.Tensor:
    """512 position rows, one in every n/512, ordered so consecutive ones are `stride` apart."""
    import torch

    n, d = positions.shape
    if n % MAX_GLOBAL_TOKENS:
        if n > MAX_GLOBAL_TOKENS:
            positions = positions[: MAX_GLOBAL_TOKENS * (n // MAX_GLOBAL_TOKENS)]
        else:  # fewer than 512 positions: complete with draws from their own statistics (as the original)
            extra = MAX_GLOBAL_TOKENS - n
            mean, std = positions.mean(0, keepdim=True), positions.std(0, keepdim=True)
            positions = torch.cat([positions, torch.normal(mean.expand(extra, -1), std.expand(extra, -1))])
        n = positions.shape[0]
    factor = n // MAX_GLOBAL_TOKENS
    step = max(1, stride // factor)
    if MAX_GLOBAL_TOKENS % step:
        raise LongsumError(f"--global-stride {stride} does not fit 512 global tokens; use a power of two such as 64")
    positions = positions.reshape(MAX_GLOBAL_TOKENS, factor, d)[:, 0]  # [512, d]
    return positions.reshape(-1, step, d).transpose(0, 1).reshape(-1, d)  # [512, d], stride apart


def global_embeddings(positions: torch.Tensor, tokens: torch.Tensor, bos_id: int, mask_id: int | None,
                      stride: int, random_init: bool) -> torch.Tensor:  # fmt: skip
    """The [512, d] global embeddings as the original converter builds them."""
    import torch

    ordered = order_positions(positions.float(), stride)
    tokens = tokens.float()
    if random_init:
        from torch.distributions.multivariate_normal import MultivariateNormal

        cov = torch.cov(tokens.T) + 1e-6 * torch.eye(tokens.shape[1])  # keep it positive definite
        draws = MultivariateNormal(tokens.mean(0), cov).sample((MAX_GLOBAL_TOKENS,))
        draws[0] = tokens[bos_id]
        return draws + ordered
    ordered[0] += tokens[bos_id]
    ordered[1:] += tokens[mask_id].unsqueeze(0)
    return ordered


# ------------------------------------------------------------------------------------ convert
def convert(source: str, output_dir: str | Path | None = None, options: ConvertOptions | None = None) -> ConvertReport:
    """Convert `source` (folder, Hub id or alias) and write the result to `output_dir`."""
    from longsum.model.checkpoint import is_lsg_config, locate, read_config, resolve_name

    options = options or ConvertOptions()
    start = time.perf_counter()
    folder = locate(source)
    config = read_config(folder)
    model_type = str(config.get("model_type", "")).removeprefix("lsg_")
    is_lsg = is_lsg_config(config)
    if options.to and model_type not in T5_TYPES:
        raise LongsumError(f"--to {options.to} converts T5 checkpoints; '{source}' is {model_type}")
    if model_type in T5_TYPES and not options.to:
        raise LongsumError(f"'{source}' is a T5 model: choose --to longt5-local or --to longt5-tglobal")
    if model_type not in FAMILIES and model_type not in T5_TYPES:
        raise LongsumError(f"cannot convert architecture '{model_type}'; supported: {convertible()}")

    out = Path(output_dir) if output_dir else default_output_dir(resolve_name(source), options, model_type)
    check_output_folder(out, options.overwrite, folder)
    _check_tokenizer_files(folder)
    if model_type in FAMILIES:
        _check_sizes(folder, config, FAMILIES[model_type], options, out, _resolve_settings(config, is_lsg, options))

    import torch  # (after the checks above: a refusal comes in about a second, before torch loads)

    tokenizer = _load_tokenizer(folder)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(options.seed)
    try:
        if options.to:
            report = _convert_t5(folder, config, tokenizer, tmp, options)
        else:
            report = _convert_lsg(folder, config, model_type, is_lsg, tokenizer, tmp, options)
        report.source, report.output = str(source), str(out)
        report.seconds = time.perf_counter() - start
        _write_card(tmp, report, options)
        check_output_folder(out, options.overwrite, folder)  # again: the folder may have changed meanwhile
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


# ------------------------------------------------------------------------------------ up-front checks
def _check_tokenizer_files(folder: Path) -> None:
    """Refuse a source without tokenizer files: transformers would build a tokenizer of special tokens
    only, and every document summarized with the converted model would then be an empty document."""
    from longsum.model.checkpoint import _TOKENIZER_FILES

    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise LongsumError(f"{folder} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}): copy them "
                           f"from the checkpoint these weights were trained from (its Hub repo or folder) into "
                           f"{folder}, then convert again")  # fmt: skip


def _load_tokenizer(folder: Path):
    """The source's tokenizer, refused when it has no vocabulary beyond its special tokens (a
    tokenizer_config.json without the vocabulary file it names loads as such a tokenizer)."""
    from longsum.model.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(folder)
    if not set(tokenizer.get_vocab().values()) - set(tokenizer.all_special_ids):
        raise LongsumError(f"the tokenizer in {folder} has only special tokens (its vocabulary file is missing): "
                           f"copy the tokenizer files from the checkpoint these weights were trained from into "
                           f"{folder}, then convert again")  # fmt: skip
    return tokenizer


# While converting, each new position table exists about 3 times in fp32: the new model's own, the
# tiled table, and the repeated rows it is cut from (measured: 2.4x the tables' size in peak memory);
# the source model and the new one each hold the other weights once in fp32.
_TABLE_COPIES = 3


def _size(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def _check_sizes(folder: Path, config: dict, family: Family, options: ConvertOptions, out: Path,
                 settings: dict) -> None:  # fmt: skip
    """Refuse a --max-length whose position tables do not fit in memory or on disk, before anything is
    loaded: past that, the OOM killer ends the process with no message (or the disk fills at the end)."""
    hidden = config.get("d_model", config.get("hidden_size"))
    if not isinstance(hidden, int) or hidden < 1:
        return  # a broken config: loading it says what is wrong
    tables = 2 if family.kind == "seq2seq" else 1  # encoder and decoder positions; encoders have one table
    rows = options.max_length + family.position_offset
    table_bytes = tables * rows * hidden * 4
    saved_dtype = {"fp32": 4, "bf16": 2, "fp16": 2}[options.dtype]
    weights = _weights_bytes(folder, config)
    shape = f"{tables} position table{'s' if tables > 1 else ''} of {rows:,} x {hidden}"
    block = settings["block_size"]

    def advice(budget: int, per_row: int, otherwise: str) -> str:
        fit = (budget // per_row - family.position_offset) // block * block
        return f"use --max-length {fit} or less, or {otherwise}" if fit >= block else otherwise

    memory = _available_memory()
    need = _TABLE_COPIES * table_bytes + 2 * weights
    if memory is not None and need > memory:
        what = advice(memory - 2 * weights, _TABLE_COPIES * tables * hidden * 4, "use a machine with more memory")
        raise LongsumError(f"--max-length {options.max_length} needs {shape} ({_size(table_bytes)} in fp32, about "
                           f"{_size(need)} of memory to convert) but {_size(max(memory, 0))} is available; {what}")  # fmt: skip
    saved = (table_bytes + weights) // 4 * saved_dtype
    parent = next((p for p in (out.absolute(), *out.absolute().parents) if p.is_dir()), None)
    free = shutil.disk_usage(parent).free if parent is not None else None
    if free is not None and saved > free:
        what = advice(free - weights // 4 * saved_dtype, tables * hidden * saved_dtype, "write to a larger disk")
        raise LongsumError(f"--max-length {options.max_length} needs {shape}: about {_size(saved)} to save in "
                           f"{options.dtype}, but {parent} has {_size(free)} free; {what}")  # fmt: skip


def _weights_bytes(folder: Path, config: dict) -> int:
    """The source's weights in fp32 bytes, from its files' sizes (safetensors, else .bin)."""
    files = [p for p in folder.glob("*.safetensors") if p.is_file()] or [
        p for p in folder.glob("*.bin") if p.is_file() and p.name != "training_args.bin"
    ]
    stored = sum(p.stat().st_size for p in files)
    half = str(config.get("dtype", config.get("torch_dtype"))) in ("float16", "bfloat16")
    return stored * 2 if half else stored


def _available_memory() -> int | None:
    """Bytes of memory this process can still get (None: unknown). A container's cgroup limit counts:
    that is what the OOM killer enforces, whatever the host has."""
    available = None
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        try:
            meminfo = Path("/proc/meminfo").read_text()
            available = int(next(line for line in meminfo.splitlines() if line.startswith("MemAvailable:")).split()[1])
            available *= 1024
        except (OSError, StopIteration, ValueError, IndexError):
            try:
                available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (AttributeError, OSError, ValueError):
                pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def _task_for(config: dict, family: Family) -> tuple[str, str]:
    architecture = (config.get("architectures") or [""])[0].removeprefix("LSG")
    for suffix, task in HEADS[family.kind].items():
        if architecture.endswith(suffix) and task != "base":
            return task, architecture
    default = "seq2seq" if family.kind == "seq2seq" else "masked_lm"
    return ("base", architecture) if architecture.endswith("Model") else (default, architecture or default)


def _resolve_settings(config: dict, is_lsg: bool, options: ConvertOptions) -> dict:
    settings = {}
    for key in LSG_OPTION_KEYS:
        value = getattr(options, key, None)  # sparse_windows: from the source (LSG) or the default
        settings[key] = (
            value if value is not None else (config.get(key, LSG_DEFAULTS[key]) if is_lsg else LSG_DEFAULTS[key])
        )
    return settings


def _convert_lsg(folder: Path, config: dict, model_type: str, is_lsg: bool, tokenizer, out: Path,
                 options: ConvertOptions) -> ConvertReport:  # fmt: skip
    import torch

    from longsum.model.checkpoint import resolve_dtype
    from longsum.model.lsg import lsg_family
    from longsum.model.lsg.attention import LSGSpec

    family, classes = FAMILIES[model_type], lsg_family(model_type)
    if classes is None:
        raise LongsumError(f"LSG-{model_type} is not available in this version of longsum; supported: {convertible()}")
    settings = _resolve_settings(config, is_lsg, options)
    LSGSpec(
        **{
            k: settings[k]
            for k in ("block_size", "sparse_block_size", "sparsity_factor", "sparsity_type", "num_global_tokens")
        }
    )  # fmt: skip  (one-line error on bad settings)
    _check_max_length(options, settings["block_size"])
    task, architecture = _task_for(config, family)
    if task not in classes:
        raise LongsumError(f"{architecture} has no LSG counterpart; supported heads: {', '.join(classes)}")

    source_model = _load_source(folder, config, model_type, is_lsg, task, classes)
    state = source_model.state_dict()
    source_config = source_model.config
    positions_before = source_config.max_position_embeddings - family.config_offset
    notes: list[str] = []

    new_config = classes["config"].from_dict(
        {**{k: v for k, v in source_config.to_dict().items() if k not in ("model_type", "auto_map", "architectures",
                                                                            "transformers_version")},
         **settings, "max_position_embeddings": options.max_length + family.config_offset})  # fmt: skip
    torch.manual_seed(options.seed)
    new_model = classes[task](new_config)
    encoder = _encoder_of(source_model, family)
    if not is_lsg:  # globals from the untiled positions (re-conversion keeps trained globals)
        bos_id, mask_id = _special_ids(tokenizer, source_config)
        tokens = source_model.get_input_embeddings().weight.detach()
        random_init = options.random_global_init
        if not random_init and (mask_id is None or not 0 <= mask_id < tokens.shape[0]):
            random_init = True
            notes.append(f"mask token id {mask_id} is outside the vocabulary: globals drawn at random instead")
        globals_ = global_embeddings(_position_table(encoder, family), tokens, bos_id, mask_id,
                                     options.global_stride, random_init)  # fmt: skip
        state[_global_key(new_model)] = globals_.to(tokens.dtype)
    for key in list(state):
        if key.endswith("embed_positions.weight") or key.endswith("position_embeddings.weight"):
            if family.learned_positions:
                state[key] = tile_positions(state[key], family.position_offset, options.max_length)
            else:
                del state[key]  # sinusoids: recomputed by the new model at its length
    missing, unexpected = new_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "embed_positions" not in k and "position_ids" not in k]
    if missing or unexpected:
        raise LongsumError(f"weights do not match the LSG model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    new_model.tie_weights()
    new_model.to(resolve_dtype(options.dtype))
    if getattr(source_model, "generation_config", None) is not None and hasattr(new_model, "generation_config"):
        new_model.generation_config = source_model.generation_config
    new_model.save_pretrained(out)
    tokenizer.model_max_length = options.max_length
    tokenizer.save_pretrained(out)
    return ConvertReport(
        source="",
        output="",
        architecture=type(new_model).__name__,
        model_type=new_config.model_type,
        params_before=sum(p.numel() for p in source_model.parameters()),
        params_after=sum(p.numel() for p in new_model.parameters()),
        positions_before=positions_before,
        positions_after=options.max_length,
        settings={
            **settings,
            "global_stride": options.global_stride,
            "random_global_init": options.random_global_init,
            "kept_trained_globals": is_lsg,
        },  # fmt: skip
        notes=notes,
    )


def _load_source(folder, config, model_type, is_lsg, task, classes):
    """The source model with its weights (LSG sources through longsum's classes)."""
    import torch
    import transformers

    from longsum.model.checkpoint import _model_class, load_weights
    from longsum.registry import TASKS

    if is_lsg:
        cls, cfg = _model_class(config, task)
        return load_weights(cls, folder, config=cfg, dtype=torch.float32).eval()
    auto = getattr(transformers, TASKS[task])
    return load_weights(auto, folder, dtype=torch.float32, trust_remote_code=False).eval()


def _encoder_of(model, family: Family):
    base = getattr(model, model.base_model_prefix, model)
    return base.encoder if family.kind == "seq2seq" else base.embeddings


def _position_table(encoder, family: Family) -> torch.Tensor:
    table = (encoder.embed_positions if family.kind == "seq2seq" else encoder.position_embeddings).weight.detach()
    return table[family.position_offset :]


def _global_key(model) -> str:
    keys = [k for k in model.state_dict() if k.endswith("global_embeddings.weight")]
    if len(keys) != 1:
        raise LongsumError(f"expected one global embedding table in {type(model).__name__}, found {keys}")
    return keys[0]


def _special_ids(tokenizer, config) -> tuple[int, int | None]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    bos = bos if bos is not None else (config.bos_token_id if config.bos_token_id is not None else 0)
    return bos, tokenizer.mask_token_id


def _convert_t5(folder: Path, config: dict, tokenizer, out: Path, options: ConvertOptions) -> ConvertReport:
    import torch
    from transformers import LongT5Config, LongT5ForConditionalGeneration, T5ForConditionalGeneration

    from longsum.model.checkpoint import load_weights, resolve_dtype

    source = load_weights(T5ForConditionalGeneration, folder, dtype=torch.float32, trust_remote_code=False).eval()
    c = source.config
    attention = "local" if options.to == "longt5-local" else "transient-global"
    target = LongT5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance, dropout_rate=c.dropout_rate,
        layer_norm_epsilon=c.layer_norm_epsilon, feed_forward_proj=c.feed_forward_proj,
        tie_word_embeddings=c.tie_word_embeddings, pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id,
        decoder_start_token_id=c.decoder_start_token_id, encoder_attention_type=attention,
    )  # fmt: skip
    model = LongT5ForConditionalGeneration(target)
    name = "LocalSelfAttention" if attention == "local" else "TransientGlobalSelfAttention"
    state = {}
    for key, value in source.state_dict().items():
        if key.startswith("encoder.") and ".SelfAttention." in key:
            key = key.replace(".SelfAttention.", f".{name}.")
        state[key] = value
    for key, value in model.state_dict().items():  # the new tglobal parameters
        if key.endswith("global_relative_attention_bias.weight"):
            # the side keys' buckets mean what the local buckets mean: start from the trained bias
            state[key] = state[key.replace("global_relative_attention_bias", "relative_attention_bias")].clone()
        elif key.endswith("global_input_layer_norm.weight"):
            state[key] = torch.ones_like(value)  # T5 layer norms are scale-only: start as identity
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LongsumError(f"T5 weights do not map onto LongT5 (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.to(resolve_dtype(options.dtype))
    model.generation_config = source.generation_config
    model.save_pretrained(out)
    tokenizer.model_max_length = options.max_length
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in source.parameters())
    return ConvertReport(
        source="", output="", architecture="LongT5ForConditionalGeneration", model_type="longt5",
        params_before=n, params_after=sum(p.numel() for p in model.parameters()),
        positions_before=config.get("n_positions", 512), positions_after=options.max_length,
        settings={"encoder_attention_type": attention, "local_radius": target.local_radius,
                  "global_block_size": target.global_block_size},
    )  # fmt: skip


def command_line(report: ConvertReport, options: ConvertOptions) -> str:
    """The `longsum convert` command that reproduces this conversion."""
    defaults = ConvertOptions()
    parts = ["longsum convert", report.source, report.output]
    for key, value in asdict(options).items():
        if key == "overwrite" or value == getattr(defaults, key) and key != "max_length":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def _write_card(folder: Path, report: ConvertReport, options: ConvertOptions) -> None:
    from longsum import __version__

    settings = "\n".join(f"| {k} | {v} |" for k, v in report.settings.items())
    card = f"""---
tags: [summarization, long-context, longsum]
---
# {Path(report.output).name}

A long-context ({report.positions_after} tokens) version of `{report.source}`, converted by
longsum {__version__} without further pretraining. Fine-tune it before use
(`longsum train`); it loads with `longsum.load_model("{report.output}")` and, after `import longsum`,
with `transformers.AutoModelForSeq2SeqLM` / `AutoModel` as fits. No custom code is needed.

| | |
|---|---|
| source | `{report.source}` |
| architecture | {report.architecture} (`{report.model_type}`) |
| positions | {report.positions_before} -> {report.positions_after} |
| parameters | {report.params_before:,} -> {report.params_after:,} |
{settings}

Command: `{command_line(report, options)}`
"""
    if report.notes:
        card += "\nNotes:\n" + "\n".join(f"- {note}" for note in report.notes) + "\n"
    (folder / "README.md").write_text(card)


EXAMPLES = f"""Examples:

  longsum convert bart-base                              (-> ./lsg-bart-base-4096)

  longsum convert facebook/bart-large-cnn ./lsg-bart-large-cnn-16384 --max-length 16384

  longsum convert ./lsg-bart-base-4096 --max-length 16384  (re-convert: positions only, globals kept)

  longsum convert roberta-base --max-length 4096 --sparsity-type pooling --num-global-tokens 16

  longsum convert flan-t5-base --to longt5-tglobal --max-length 16384

Converts: {convertible()}.
Aliases: {", ".join(aliases("source"))}
(Hub ids need the Hub once, then the cache)."""

COMMAND = Command("convert", ConvertConfig, run, examples=EXAMPLES,
                  help="Convert a short-context checkpoint into a long-context one (LSG, or LongT5 from T5).")  # fmt: skip
