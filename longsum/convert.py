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

The result is written to a temporary folder and renamed into place only when complete.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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
    convertible,
)

if TYPE_CHECKING:
    import torch

# The LSG config keys `convert` sets (all of LSG_DEFAULTS but the prefix name).
LSG_OPTION_KEYS = tuple(key for key in LSG_DEFAULTS if key != "base_model_prefix")


@dataclass
class ConvertOptions:
    """None means: the source's value when re-converting an LSG checkpoint, else docs/lsg.md's default."""

    max_length: int = 4096
    block_size: int | None = None
    sparse_block_size: int | None = None
    sparsity_factor: int | None = None
    sparsity_type: str | None = None
    num_global_tokens: int | None = None
    pass_global_tokens_to_decoder: bool | None = None
    mask_first_token: bool | None = None
    adaptive: bool | None = None
    pool_with_global: bool | None = None
    lsh_num_pre_rounds: int | None = None
    random_global_init: bool = False
    global_stride: int = 64
    seed: int = 0
    dtype: str = "fp32"
    overwrite: bool = False
    to: str | None = None  # T5 only: longt5-local | longt5-tglobal

    def __post_init__(self) -> None:
        """Cheap checks (no torch, no download): a typo is refused before anything is loaded."""
        choices = {"sparsity_type": SPARSITY_TYPES, "to": LONGT5_TARGETS, "dtype": tuple(DTYPES)}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise LongsumError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got '{value}'")
        lows = {"max_length": 1, "block_size": 1, "sparse_block_size": 0, "sparsity_factor": 1, "num_global_tokens": 1,
                "lsh_num_pre_rounds": 0, "global_stride": 1}  # fmt: skip
        for name, low in lows.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise LongsumError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        if self.num_global_tokens is not None and self.num_global_tokens > MAX_GLOBAL_TOKENS:
            raise LongsumError(f"--num-global-tokens must be <= {MAX_GLOBAL_TOKENS}, got {self.num_global_tokens}")


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


# Files a model folder may hold: what `save_pretrained` and `convert` write. `--overwrite` deletes
# nothing else (a folder holding anything more is not a model folder, and is refused).
_MODEL_FOLDER_FILES = ("config.json", "generation_config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                       "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja")  # fmt: skip
_MODEL_FOLDER_SUFFIXES = (".safetensors", ".bin", ".index.json")


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an output that exists (unless --overwrite) or that --overwrite would wrongly delete."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LongsumError(f"output {out} is a file; choose a folder name")
    if not overwrite:
        raise LongsumError(f"output folder {out} exists; pass --overwrite to replace it")
    entries = list(out.iterdir())
    foreign = [p.name for p in entries if not (p.is_file() and (p.name in _MODEL_FOLDER_FILES or
                                                                p.name.endswith(_MODEL_FOLDER_SUFFIXES)))]  # fmt: skip
    if entries and (foreign or not (out / "config.json").is_file()):
        what = f"it holds {foreign[0]}" if foreign else "it has no config.json"
        raise LongsumError(f"--overwrite replaces model folders only; {out} is not one ({what}): "
                           f"choose another output folder")  # fmt: skip


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
    import torch

    from longsum.models import is_lsg_config, locate, read_config, resolve_name

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
    check_output_folder(out, options.overwrite)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(options.seed)
    try:
        if options.to:
            report = _convert_t5(folder, config, tmp, options)
        else:
            report = _convert_lsg(folder, config, model_type, is_lsg, tmp, options)
        report.source, report.output = str(source), str(out)
        report.seconds = time.perf_counter() - start
        _write_card(tmp, report, options)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


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


def _convert_lsg(folder: Path, config: dict, model_type: str, is_lsg: bool, out: Path,
                 options: ConvertOptions) -> ConvertReport:  # fmt: skip
    import torch
    from transformers import AutoTokenizer

    from longsum.lsg import lsg_family
    from longsum.lsg.attention import LSGSpec
    from longsum.models import resolve_dtype

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
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
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

    from longsum.models import _model_class, load_weights
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


def _convert_t5(folder: Path, config: dict, out: Path, options: ConvertOptions) -> ConvertReport:
    import torch
    from transformers import AutoTokenizer, LongT5Config, LongT5ForConditionalGeneration, T5ForConditionalGeneration

    from longsum.models import load_weights, resolve_dtype

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
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
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
