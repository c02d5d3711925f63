"""`resolve` and `load_model`: how every command gets a checkpoint, its model and its tokenizer.

`resolve(name_or_path)` gives a `Checkpoint`: where it is, its config, and (read when first asked,
then kept) its generation config, tokenizer and fingerprint. A command resolves its checkpoint once
and hands it to whatever needs it (settings, the output's identity, the weights), so one run reads
each file of the checkpoint once. `load_model` is the same in one call, for library users.

It recognises three kinds of checkpoint:
* LSG checkpoints, by their config keys: longsum's own (`model_type` "lsg_bart", ...) and those of
  the original LSG converter (`model_type` "bart"/"mbart"/"pegasus" plus LSG keys and an
  `auto_map` to a `modeling_lsg_*.py` file). Both load into longsum's classes; no file from the
  checkpoint folder is ever imported or run.
* stock seq2seq checkpoints (BART, Pegasus, T5, LongT5, LED, PEGASUS-X, BigBird-Pegasus, T5Gemma, T5Gemma 2, ...)
  through transformers' Auto classes, with `trust_remote_code=False`.
* a Hub id: the folder is fetched first (configs, tokenizer files and weights; never `*.py`), then
  loaded as a local folder. Without network access, only ids already in the local HF cache work.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from longsum.errors import ModelLoadError
from longsum.registry import DEVICE_TYPES, DTYPE_ALIASES, DTYPES, FAMILIES, QUANTIZED_DTYPES, STOCK_SEQ2SEQ
from longsum.registry import MODEL_ALIASES as REGISTRY_ALIASES
from longsum.registry import TASKS as REGISTRY_TASKS

# Tasks, aliases and families live in `longsum.registry` (read by the CLI, convert and the README too).
TASKS = tuple(REGISTRY_TASKS)
MODEL_ALIASES = {name: alias.hub_id for name, alias in REGISTRY_ALIASES.items()}

# Files fetched from the Hub: configs, tokenizers, weights. Never Python files.
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_name(name_or_path: str | os.PathLike) -> str:
    """Expand an alias (`bart-base` -> `facebook/bart-base`) unless a local folder has that name."""
    name = str(name_or_path)
    if name in MODEL_ALIASES and not Path(name).exists():
        return MODEL_ALIASES[name]
    return name


def locate(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint folder for `name_or_path` (fetching a Hub id if needed)."""
    name = resolve_name(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"'{name}' has no config.json: pass a checkpoint folder (made by save_pretrained)")
        return path
    if path.exists():
        raise ModelLoadError(f"'{name}' is a file; pass the checkpoint folder that contains it")
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise ModelLoadError(f"local path '{name}' does not exist; pass an existing checkpoint folder or a Hub id")
    return _fetch_from_hub(name, revision)


@lru_cache(maxsize=16)  # one fetch per process: library users may load the same id again
def _fetch_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):  # older checkpoints only have pytorch_model.bin
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["pytorch_model*.bin"]))
    except Exception as err:  # offline, unknown repo, gated repo, network error...
        raise ModelLoadError(
            f"'{repo_id}' is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}): check the name, connect to the Hub (and unset HF_HUB_OFFLINE), "
            f"or pass a local checkpoint folder"
        ) from None
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"Hub repo '{repo_id}' has no config.json; it is not a transformers checkpoint")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    return _read_config(folder)[0]


def _read_config(folder: Path) -> tuple[dict[str, Any], str]:
    """config.json as a dict, and the sha256 of the bytes read (the fingerprint needs no second read)."""
    import hashlib

    try:
        data = (folder / "config.json").read_bytes()
        config = json.loads(data.decode("utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {err}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder / 'config.json'} is not a model config (a JSON object was expected, "
                             f"found a {type(config).__name__})")  # fmt: skip
    return config, hashlib.sha256(data).hexdigest()


def is_lsg_config(config: dict[str, Any]) -> bool:
    """LSG checkpoints carry the LSG keys; longsum's own also have an `lsg_` model_type."""
    return str(config.get("model_type", "")).startswith("lsg_") or (
        "sparsity_type" in config and "block_size" in config and "num_global_tokens" in config
    )


def resolve_device(device: str = "auto") -> str:
    """`auto` is CUDA when present, else CPU; any other device is checked (one-line errors)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = str(device).partition(":")
    if kind not in DEVICE_TYPES or (index and not index.isdigit()):
        raise ModelLoadError(f"unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: no CUDA device here (torch {torch.__version__}); use --device cpu "
                                 f"or auto")  # fmt: skip
        if index and int(index) >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"--device {device}: no Apple GPU (MPS) here; use --device cpu or auto")
    return str(device)


def resolve_dtype(dtype: str = "auto", device: str = "cpu"):
    """The torch dtype the weights load in: `auto` is bf16 on CUDA devices that support it, else fp32;
    `int8` loads fp32 (its linear layers are quantized after: CPU only, a one-line error elsewhere)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in QUANTIZED_DTYPES:
        if not str(device).startswith("cpu"):
            raise ModelLoadError(f"--dtype {dtype} runs on CPU only (oneDNN's int8 kernels), not on {device}: use "
                                 f"--device cpu, or --dtype auto/bf16/fp16 on a GPU")  # fmt: skip
        dtype = QUANTIZED_DTYPES[dtype]
    if dtype == "auto":
        if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def dtype_name(dtype: str = "auto", device: str = "cpu") -> str:
    """What a run's identity records: the torch name of the float dtype (`float32`, `bfloat16`, ...), or
    the quantized dtype's own name (`int8`), so an int8 run never resumes into a float one's output."""
    loaded = str(resolve_dtype(dtype, device)).removeprefix("torch.")
    return dtype if dtype in QUANTIZED_DTYPES else loaded


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """A note on stderr, once per process (a process may resolve the same checkpoint more than once)."""
    if message not in _SAID:
        _SAID.add(message)
        from longsum.console import note

        note(message)


def _model_class(config_dict: dict[str, Any], task: str):
    """(class, config) for an LSG checkpoint, or (Auto class, None) for a stock one."""
    model_type = str(config_dict.get("model_type", ""))
    if is_lsg_config(config_dict):
        from longsum.model.lsg import LSG_DEFAULTS, LSG_FAMILIES, lsg_family
        from longsum.model.lsg.common import needs_original_windows

        family = lsg_family(model_type)
        if family is None:
            raise ModelLoadError(
                f"unsupported LSG architecture '{model_type}'; longsum has LSG versions of {', '.join(LSG_FAMILIES)}"
            )
        if task not in family:
            raise ModelLoadError(f"LSG-{model_type} has no '{task}' head; available: {', '.join(family)}")
        clean = {k: v for k, v in config_dict.items() if k not in ("model_type", "auto_map", "transformers_version")}
        # Checkpoints of the original code (stock model_type) were trained with its sparse windows, which
        # differ from docs/lsg.md's for some settings: reproduce them unless the config says which to use.
        # longsum's own (lsg_* model_type) keep what their config says (by default the intended ones).
        if not model_type.startswith("lsg_") and "sparse_windows" not in clean and needs_original_windows(clean):
            clean["sparse_windows"] = "original"
            keys = ("block_size", "sparse_block_size", "sparsity_factor")
            shape = "/".join(str(clean.get(key, LSG_DEFAULTS[key])) for key in keys)
            _say_once(
                f"LSG checkpoint from the original code with block/sparse block/sparsity {shape}: reproducing the"
                " original's sparse windows (sparse_windows=original), which differ from docs/lsg.md's for these"
                " settings"
            )
        return family[task], family["config"].from_dict(clean)

    import transformers

    return getattr(transformers, REGISTRY_TASKS[task]), None


def _check_supported(auto, config, task: str) -> None:
    if type(config) not in auto._model_mapping:
        supported = (
            sorted({c.model_type for c in auto._model_mapping.keys()} & _KNOWN_SEQ2SEQ) if task == "seq2seq" else []
        )
        hint = f" (supported seq2seq types include {', '.join(supported)})" if supported else ""
        raise ModelLoadError(f"unsupported architecture '{config.model_type}' for task '{task}'{hint}")


_KNOWN_SEQ2SEQ = {*STOCK_SEQ2SEQ, *(f"lsg_{m}" for m, f in FAMILIES.items() if "seq2seq" in f.tasks)}


_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


@dataclass(eq=False)
class Checkpoint:
    """A checkpoint resolved once (`resolve`): what a run needs to know about it, each file read once.

    A command makes one and hands it to whatever needs it (its settings, the output's identity, the
    weights) instead of each resolving the name again. The generation config, the tokenizer and the
    fingerprint are read when first asked for, then kept: `load_model` reads no more than it needs.
    """

    name: str  # as given: what records and results call the model
    resolved: str  # the alias expanded (`resolve_name`): a folder or a Hub id
    folder: Path  # the local folder (a Hub id is fetched into the Hugging Face cache first)
    task: str
    config_dict: dict[str, Any]  # config.json as read
    model_class: Any  # longsum's LSG class, else the transformers Auto class of `task`
    config: Any  # the config object the weights are built with
    config_sha256: str  # of the config.json bytes read: the fingerprint does not read them again

    @property
    def model_type(self) -> str | None:
        return self.config_dict.get("model_type")

    @property
    def is_lsg(self) -> bool:
        return is_lsg_config(self.config_dict)

    @cached_property
    def generation_config(self):
        """The generation config `from_pretrained` would give the model (`load_generation_config`)."""
        return load_generation_config(self.folder, self.config)

    @cached_property
    def tokenizer(self):
        # A stock config is the one AutoTokenizer would build again from config.json: it is handed
        # over. An LSG config is longsum's class, which AutoTokenizer's table does not know: not handed.
        return _build_tokenizer(self.folder, None if self.is_lsg else self.config)

    @cached_property
    def fingerprint(self) -> str:
        """`fingerprint` of the folder."""
        return _fingerprint(self.folder, {"config.json": self.config_sha256})

    def load(self, device: str = "auto", dtype: str = "auto", *, attn_implementation: str | None = None,
             attention: str = "longsum"):  # fmt: skip
        """`(model, tokenizer)` of this checkpoint: `load_model` (which documents the arguments)."""
        device = resolve_device(device)
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, device)}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if not self.is_lsg:
            kwargs["trust_remote_code"] = False
        if attention not in ("longsum", "stock"):
            raise ModelLoadError(f"unknown attention {attention!r}: use 'longsum' or 'stock'")
        tokenizer = self.tokenizer
        # A generation config already read from its file (for a run's settings) is handed over, not read
        # again. Without a file, transformers derives the model's from config.json as it always did.
        if "generation_config" in vars(self) and (self.folder / "generation_config.json").is_file():
            kwargs["generation_config"] = self.generation_config
        model = load_weights(self.model_class, self.folder, config=self.config, **kwargs)
        if attention == "longsum" and self.config.model_type == "longt5":
            from longsum.model.longt5 import use_longsum_attention

            use_longsum_attention(model)
        model.to(device).eval()
        if dtype in QUANTIZED_DTYPES:
            from longsum.model.int8 import quantize_int8

            try:
                quantize_int8(model)
            except RuntimeError as err:
                raise ModelLoadError(str(err)) from None
        return model, tokenizer


def resolve(name_or_path: str | os.PathLike, task: str = "seq2seq", *, revision: str | None = None) -> Checkpoint:
    """The checkpoint `name_or_path` names (a folder, a Hub id or an alias), located (a Hub id is
    fetched) and its config read, without its weights (cheap).

    Raises:
        ModelLoadError: with a one-line message (unknown task, missing folder, unreachable Hub,
            unreadable config, unsupported architecture).
    """
    if task not in TASKS:
        raise ModelLoadError(f"unknown task '{task}'; use one of {', '.join(TASKS)}")
    folder = locate(name_or_path, revision)
    config_dict, config_sha256 = _read_config(folder)

    from transformers import AutoConfig

    from longsum.model.lsg import register_auto_classes

    register_auto_classes()  # longsum's own checkpoints name the lsg_* model types

    cls, config = _model_class(config_dict, task)
    if config is None:
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        except (ValueError, KeyError) as err:
            raise ModelLoadError(
                f"unsupported architecture '{config_dict.get('model_type')}' in {folder}: {_first_line(err)}"
            ) from None
        _check_supported(cls, config, task)
    return Checkpoint(name=str(name_or_path), resolved=resolve_name(name_or_path), folder=folder, task=task,
                      config_dict=config_dict, model_class=cls, config=config, config_sha256=config_sha256)  # fmt: skip


def load_config(name_or_path: str | os.PathLike, task: str = "seq2seq", *, revision: str | None = None):
    """(model class, config) of a checkpoint, without loading its weights (cheap).

    The class is longsum's LSG class for LSG checkpoints, else the transformers Auto class.
    """
    checkpoint = resolve(name_or_path, task, revision=revision)
    return checkpoint.model_class, checkpoint.config


def load_tokenizer(name_or_path: str | os.PathLike, *, revision: str | None = None):
    """The checkpoint's tokenizer (a one-line error when the folder has none)."""
    return _build_tokenizer(locate(name_or_path, revision))


def _build_tokenizer(folder: Path, config=None):
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        # transformers would silently build an empty tokenizer with only special tokens
        raise ModelLoadError(
            f"no usable tokenizer in {folder}: none of {', '.join(_TOKENIZER_FILES)}; "
            f"save the source model's tokenizer there (tokenizer.save_pretrained)"
        )
    from transformers import AutoTokenizer

    given = {} if config is None else {"config": config}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **given)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(f"no usable tokenizer in {folder}: {_first_line(err)}") from None
    # Documents and references are padded on the right: Gemma's tokenizer (T5Gemma) pads on the left, as
    # decoder-only prompts need, which would put padding before the reference tokens in train's labels.
    tokenizer.padding_side = "right"
    return tokenizer


def load_generation_config(folder: Path, config):
    """The generation config `from_pretrained` would give the model (file, else from its config)."""
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        try:
            return GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot read {folder / 'generation_config.json'}: {_first_line(err)}") from None
    return GenerationConfig.from_model_config(config)


# What decides a model's outputs: its weights, its config and its tokenizer (not the README, not
# generation_config.json: the generation settings that result from it are compared on their own).
_FINGERPRINT_NAMES = {"config.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "merges.txt", *_TOKENIZER_FILES}  # fmt: skip
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def fingerprint(name_or_path: str | os.PathLike, *, revision: str | None = None) -> str:
    """sha256 (16 hex digits) over the files that decide a checkpoint's outputs.

    Files in the Hugging Face cache are links to blobs named by their content hash, which is used
    as is; other files are hashed (about 0.3 s per GB), once per process while their size and
    modification time stay the same.
    """
    return _fingerprint(locate(name_or_path, revision))


def _fingerprint(folder: Path, known: dict[str, str] | None = None) -> str:
    """`fingerprint` of a folder; `known`: the sha256 of files already read, by name (not read again)."""
    import hashlib

    known = known or {}
    files = [path for path in sorted(folder.iterdir()) if path.is_file() and
             (path.name in _FINGERPRINT_NAMES or path.name.endswith(_WEIGHT_SUFFIXES))]  # fmt: skip
    signature = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if signature not in _FINGERPRINTS:
        total = hashlib.sha256()
        for path in files:
            total.update(path.name.encode() + b"\0" + _file_digest(path, known.get(path.name)).encode() + b"\0")
        _FINGERPRINTS[signature] = total.hexdigest()[:16]
    return _FINGERPRINTS[signature]


_FINGERPRINTS: dict[tuple, str] = {}


def _file_digest(path: Path, known: str | None = None) -> str:
    """The file's digest; `known`: the sha256 of its bytes, already read (the cache's name comes first)."""
    import hashlib

    if path.is_symlink():
        target = Path(os.readlink(path))
        if "blobs" in target.parts:  # the Hugging Face cache: content-addressed already
            return target.name
    if known:
        return known
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else _sha256(f)


def _sha256(f) -> str:
    import hashlib

    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def load_model(
    name_or_path: str | os.PathLike,
    task: str = "seq2seq",
    device: str = "auto",
    dtype: str = "auto",
    *,
    revision: str | None = None,
    attn_implementation: str | None = None,
    attention: str = "longsum",
):
    """Load a checkpoint and its tokenizer, ready for inference.

    Args:
        name_or_path: a local checkpoint folder, a Hub id, or an alias from `MODEL_ALIASES`.
        task: "seq2seq" (conditional generation), "classification" (sequence classification head),
            "masked_lm" (encoders) or "base" (the bare model).
        device: "auto" (CUDA when present, else CPU) or a torch device string.
        dtype: "auto" (bf16 on CUDA that supports it, else fp32), "fp32", "bf16", "fp16", or "int8" (CPU
            only: linear layers with int8 weights and inputs quantized per call, `longsum.model.int8`).
        revision: Hub revision (branch, tag or commit) for Hub ids.
        attn_implementation: transformers attention backend for the stock parts ("sdpa" default).
        attention: "longsum" runs LongT5 encoders with longsum's attention (`longsum.model.longt5`: the
            same numbers in bounded memory, several times faster at 16k); "stock" keeps transformers'.

    Returns:
        `(model, tokenizer)`, the model in eval mode on `device`.

    Raises:
        ModelLoadError: with a one-line message (missing folder, unreachable Hub, unsupported
            architecture, missing tokenizer).
    """
    checkpoint = resolve(name_or_path, task, revision=revision)
    return checkpoint.load(device, dtype, attn_implementation=attn_implementation, attention=attention)


def load_weights(cls, folder: Path, **kwargs):
    """`cls.from_pretrained(folder, **kwargs)` with one-line errors for what goes wrong with weights.

    `.bin` files are read with weights-only loading (transformers' default on torch >= 2.6): a
    pickle that would run code is refused, never executed.
    """
    import pickle

    try:
        return cls.from_pretrained(folder, **kwargs)
    except pickle.UnpicklingError:
        raise ModelLoadError(f"refused to load the .bin weights in {folder}: they are not plain tensors (weights-only "
                             f"loading refused a pickle that could run code); use safetensors weights") from None  # fmt: skip
    except OSError as err:
        raise ModelLoadError(f"cannot load weights from {folder}: {_first_line(err)}") from None
    except RuntimeError as err:  # transformers: "ignore_mismatched_sizes ..." / "size mismatch for ..."
        if "mismatched_sizes" not in str(err) and "size mismatch" not in str(err):
            raise
        example = _first_mismatch(cls, kwargs.get("config"), folder)
        raise ModelLoadError(f"the config.json in {folder} does not match its weights{example}: restore the "
                             f"checkpoint's own config.json (or save the model again)") from None  # fmt: skip
    except Exception as err:  # noqa: BLE001  safetensors' own error type: a cut or corrupt file
        if type(err).__name__ != "SafetensorError" and "safetensors" not in type(err).__module__:
            raise
        raise ModelLoadError(f"the weights in {folder} are incomplete or corrupt ({_first_line(err)}): an interrupted "
                             f"download or copy? Fetch or copy them again") from None  # fmt: skip


def _first_mismatch(cls, config, folder: Path) -> str:
    """' (KEY: WEIGHTS in the weights, CONFIG from config.json)' for the first tensor whose shape
    differs, read from the safetensors headers and a model built on the meta device (no memory);
    '' when it cannot tell (.bin weights, renamed keys)."""
    import torch
    from safetensors import safe_open

    if config is None:
        return ""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls._from_config(config).state_dict().items()}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    shape = tuple(f.get_slice(key).get_shape())
                    want = expected.get(key)
                    if want is not None and want != shape:
                        return f" ({key}: {list(shape)} in the weights, {list(want)} from config.json)"
    except Exception:  # noqa: BLE001  only an example for the message: never in the way of the error
        return ""
    return ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
