"""`longsum train`: fine-tune any seq2seq model `load_model` handles, on transformers' Seq2SeqTrainer.

The Trainer does the loop, mixed precision, gradient accumulation, checkpointing, resuming and
DDP/DeepSpeed/FSDP under `accelerate launch` or `torchrun`. longsum adds: its datasets (aliases,
Hub ids, local files), tokenization cached on disk, LSG-aware padding (inputs padded to whole
blocks), ROUGE through the eval code, a JSONL log and PNG curves, loud NaN and out-of-memory
messages, and the effective configuration saved beside the final model.

An output folder holds one run, named by its `train_run.json` (written when training starts): the model's
weights (fingerprint), the training data and the settings that define the run (`RUN_SETTINGS`). `train`
into a folder that holds a run is refused unless it is `--resume`d (then the model, data and those
settings must be the run's: the checkpoint's weights, optimizer, scheduler and data position carry
them, so a changed value would be ignored or silently mixed in) or `--overwrite` (then what longsum
train wrote there is removed first, and nothing else). What may change on `--resume`: how long the run
goes (--max-steps, --num-train-epochs), evaluation, checkpoint and logging settings, precision,
memory and parallelism options (--bf16, --fp16, --gradient-checkpointing, --deepspeed, --fsdp),
--report-to, and the training_args fields named in `_CHANGEABLE_PREFIXES`.

Every setting is checked before a model or data is loaded: the transformers arguments are built
first (they check most values) and their refusals become one `LongsumError` line.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from longsum.console import log, note
from longsum.errors import LongsumError
from longsum.registry import MAX_SEED
from longsum.settings import Command, check, coerce, config_values, flag, read_config_file, setting

DATA, LENGTHS, OPTIM, MEMORY, EVAL = ("Model and data", "Lengths and batches", "Optimization",
                                     "Precision and memory", "Evaluation, checkpoints and logs")  # fmt: skip


@dataclass
class TrainConfig:
    """Every `longsum train` setting: its type, default, help text, panel and bounds (`longsum.settings`).

    The command line, `--config` files and these checks are all built from this one definition.
    """

    model: str | None = setting(None, "Model to fine-tune (path, Hub id or alias).", DATA, flags=("--model", "-m"))
    dataset: str | None = setting(None, "Alias (pubmed, arxiv, govreport), Hub id, or JSONL/CSV/parquet file.", DATA)
    output_dir: str | None = setting(None, "Checkpoints, log, curves and the final model.", DATA,
                                     flags=("--output-dir", "-o"))  # fmt: skip
    eval_dataset: str | None = setting(None, "Evaluation data (default: --dataset's validation split; a local "
                                             "file holds out 10%).", DATA)  # fmt: skip
    text_column: str | None = setting(None, "Column with the document.", DATA)
    summary_column: str | None = setting(None, "Column with the reference summary.", DATA)
    dataset_config: str | None = setting(None, "Hub dataset configuration (default: the alias's).", DATA)
    train_split: str = setting("train", "Training split.", DATA)
    eval_split: str = setting("validation", "Evaluation split.", DATA)
    limit: int | None = setting(None, "Use only N training examples (seeded subset).", DATA, low=1)
    max_source_length: int | None = setting(None, "Input tokens (default: the model's length).", LENGTHS, low=1)
    max_target_length: int = setting(512, "Summary tokens.", LENGTHS, low=1)
    per_device_batch_size: int = setting(1, "Batch size per device.", LENGTHS, low=1)
    gradient_accumulation_steps: int = setting(1, "Steps accumulated per update.", LENGTHS, low=1)
    learning_rate: float = setting(8e-5, "Peak learning rate.", OPTIM, low=0, strict=True)
    lr_scheduler_type: str = setting("linear", "Scheduler (linear, cosine, constant_with_warmup...).", OPTIM)
    warmup_ratio: float = setting(0.1, "Fraction of the steps spent warming up, in [0, 1).", OPTIM, low=0, high=0.999)
    num_train_epochs: float = setting(3.0, "Epochs (ignored when --max-steps is set).", OPTIM, low=0, strict=True)
    max_steps: int = setting(-1, "Total optimizer steps, overriding epochs (-1: use epochs).", OPTIM, low=-1)
    weight_decay: float = setting(0.0, "AdamW weight decay.", OPTIM, low=0)
    seed: int = setting(42, "Random seed.", OPTIM, low=0, high=MAX_SEED)
    bf16: bool = setting(False, "bf16 mixed precision.", MEMORY)
    fp16: bool = setting(False, "fp16 mixed precision.", MEMORY)
    gradient_checkpointing: bool = setting(False, "Trade compute for memory.", MEMORY)
    deepspeed: str | None = setting(None, "DeepSpeed config file (passed to the Trainer).", MEMORY)
    fsdp: str | None = setting(None, "FSDP options (passed to the Trainer), e.g. 'full_shard auto_wrap'.", MEMORY)
    eval_steps: int | None = setting(None, "Evaluate ROUGE every N steps (keeps the best by rougeLsum).", EVAL, low=1)
    eval_limit: int = setting(100, "Evaluation examples.", EVAL, low=1)
    eval_num_beams: int = setting(1, "Beams when generating for evaluation.", EVAL, low=1)
    save_steps: int = setting(500, "Checkpoint every N steps.", EVAL, low=1)
    save_total_limit: int | None = setting(2, "Checkpoints kept.", EVAL, low=1)
    logging_steps: int = setting(10, "Log every N steps.", EVAL, low=1)
    resume: str | None = setting(None, "Continue: alone = the newest complete checkpoint, or a checkpoint path "
                                       "(the run's model, data and hyper-parameters must match).", EVAL)  # fmt: skip
    overwrite: bool = setting(False, "Start a new run in an --output-dir that holds one: first removes what "
                                     "longsum train wrote there (checkpoints, final/, logs).", EVAL)  # fmt: skip
    report_to: str = setting("none", "none, tensorboard, wandb... (passed to the Trainer).", EVAL)
    # Any other Seq2SeqTrainingArguments field, from --config only.
    training_args: dict = setting({}, "Seq2SeqTrainingArguments fields.", cli=False)

    def __post_init__(self) -> None:
        check(self)
        missing = [flag(k) for k in ("model", "dataset", "output_dir") if not getattr(self, k)]
        if missing:
            raise LongsumError(f"missing {', '.join(missing)} (on the command line or in --config)")
        if self.max_steps == 0:
            raise LongsumError("--max-steps must be >= 1, or -1 to train for --num-train-epochs")
        if self.bf16 and self.fp16:
            raise LongsumError("choose one of --bf16 and --fp16")
        if self.resume and self.overwrite:
            raise LongsumError("choose one of --resume (continue the run) and --overwrite (start it over)")


def load_config_file(path: str) -> dict:
    """Settings from a YAML/JSON file: TrainConfig fields (converted to their types), and other
    Seq2SeqTrainingArguments fields under `training_args`. Unknown keys and bad values: one line."""
    import typing

    from transformers import Seq2SeqTrainingArguments

    where = f"--config {path}"
    data = read_config_file(path)
    ours = {f.name for f in dataclasses.fields(TrainConfig)} - {"training_args"}
    theirs = typing.get_type_hints(Seq2SeqTrainingArguments)
    config, _ = config_values(TrainConfig, {k: v for k, v in data.items() if k != "training_args"}, where)
    # Seq2SeqTrainingArguments fields go at the top level or, as the setting is named, under `training_args:`.
    nested = data.get("training_args", {})
    if nested is None:
        nested = {}
    if not isinstance(nested, dict):
        raise LongsumError(f"{where}: training_args must be a mapping of Seq2SeqTrainingArguments fields to values")
    entries = [(k, v, str(k)) for k, v in data.items() if k != "training_args"]
    entries += [(k, v, f"training_args.{k}") for k, v in nested.items()]
    extra = {}
    for key, value, shown in entries:
        name = str(key).replace("-", "_")
        if name in ours:
            if shown != str(key):  # would reach Seq2SeqTrainingArguments beside longsum's own value of it
                raise LongsumError(f"{where}: {shown} is a longsum train option: write {key} at the top level")
            continue
        if name not in theirs:
            raise LongsumError(f"unknown key '{shown}' in {where} (not a longsum train option nor a "
                               f"Seq2SeqTrainingArguments field)")  # fmt: skip
        if name in extra:
            raise LongsumError(f"{where}: {name} is given twice (at the top level and under training_args); keep one")
        simple = theirs[name] in (int, float, bool, str) or _optional_simple(theirs[name])
        extra[name] = coerce(theirs[name], value, shown, where) if simple else value
    if extra:
        config["training_args"] = extra
    return config


def _optional_simple(tp) -> bool:
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return len(args) == 1 and args[0] in (int, float, bool, str) and len(typing.get_args(tp)) == 2


# ------------------------------------------------------------------------------------------ data
HOLDOUT_FRACTION = 0.1  # of a local file's rows, held out for --eval-steps without --eval-dataset


def _is_local(name: str) -> bool:
    from longsum.data.datasets import LOCAL_SUFFIXES

    return Path(name).suffix.lower() in LOCAL_SUFFIXES or Path(name).exists()


def _datasets(cfg: TrainConfig):
    """(train EvalData, eval EvalData or None). A local file without --eval-dataset gives up a
    seeded held-out part for evaluation (a file has no validation split; its rows are not trained on)."""
    from longsum.data.datasets import load_examples

    train = load_examples(cfg.dataset, cfg.train_split, cfg.text_column, cfg.summary_column, cfg.limit, cfg.seed,
                          config=cfg.dataset_config)  # fmt: skip
    if not cfg.eval_steps:
        return train, None
    if cfg.eval_dataset or not _is_local(cfg.dataset):
        name = cfg.eval_dataset or cfg.dataset
        split = cfg.eval_split if not (cfg.eval_dataset and _is_local(cfg.eval_dataset)) else "test"
        return train, load_examples(name, split, cfg.text_column, cfg.summary_column, cfg.eval_limit, cfg.seed,
                                    config=cfg.dataset_config)  # fmt: skip
    n = len(train)
    held = min(cfg.eval_limit, max(1, int(n * HOLDOUT_FRACTION)))
    if n - held < 1:
        raise LongsumError(f"{cfg.dataset} has {n} example(s): too few to hold some out for evaluation; "
                           f"pass --eval-dataset")  # fmt: skip
    import random

    eval_positions = set(random.Random(cfg.seed).sample(range(n), held))
    note(f"no --eval-dataset: holding out {held} of {n} examples of {cfg.dataset} for evaluation "
         f"(seed {cfg.seed}); they are not trained on")  # fmt: skip
    return (train.subset([k for k in range(n) if k not in eval_positions]),
            train.subset(sorted(eval_positions)))  # fmt: skip


def as_labels(tokenizer, start: int | None):
    """What turns a reference's token ids into labels: a leading decoder start token dropped (the model's
    shift puts it there: Gemma's tokenizer starts every text with `<bos>`, T5Gemma's decoder start) and
    an EOS appended where the tokenizer writes none (Gemma's), so that the model learns to stop. Every
    other family's ids are labels as they are (BART's `<s> ... </s>`, T5's `... </s>`, mBART's `... </s> lang`)."""
    eos = tokenizer.eos_token_id
    append = eos is not None and eos not in tokenizer(text_target="a")["input_ids"]

    def labels(ids: list[int]) -> list[int]:
        ids = ids[1:] if ids and start is not None and ids[0] == start else ids
        return [*ids, eos] if append else ids

    labels.key = (start, append)  # what the tokenized cache's name depends on
    return labels


def _tokenized(cfg: TrainConfig, data, split: str, tokenizer, max_source: int, labels):
    """A tokenized `datasets.Dataset` (cached on disk per source, selection and lengths); `labels`: `as_labels`."""
    view, dropped = data.training_view()
    if dropped:
        note(f"left out {dropped} example(s) of {cfg.dataset} [{split}] without a document or a reference")
    if len(view) == 0:
        raise LongsumError(f"no usable examples in {data.source.get('hub_id') or data.source.get('path')} [{split}]")
    from array import array

    rows = hashlib.sha256(array("q", data.indices).tobytes()).hexdigest()  # which rows (subset, hold-out)
    key = json.dumps([data.source, rows, getattr(tokenizer, "name_or_path", ""), len(tokenizer), max_source,
                      cfg.max_target_length, *labels.key], sort_keys=True, default=str)  # fmt: skip
    cache = Path(cfg.output_dir) / "cache" / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)

    def tokenize(batch):
        features = tokenizer(batch["text"], max_length=max_source, truncation=True)
        targets = tokenizer(text_target=batch["reference"], max_length=cfg.max_target_length, truncation=True)
        features["labels"] = [labels(ids) for ids in targets["input_ids"]]
        return features

    return view.map(tokenize, batched=True, remove_columns=["text", "reference"], cache_file_name=str(cache),
                    load_from_cache_file=True, desc=f"tokenizing {split}")  # fmt: skip


# ------------------------------------------------------------------------------------------ run
def run(cfg: TrainConfig) -> Path:
    """Train; returns the final model folder."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

    from longsum.model.checkpoint import load_model
    from longsum.model.generation import model_max_source_length

    if cfg.eval_steps and cfg.save_steps % cfg.eval_steps:
        raise LongsumError(f"--save-steps ({cfg.save_steps}) must be a multiple of --eval-steps ({cfg.eval_steps}) "
                           f"to keep the best checkpoint by rougeLsum")  # fmt: skip
    out = Path(cfg.output_dir)
    args = training_arguments(cfg)  # every setting checked, before minutes of loading and tokenizing
    _check_output_dir(out)
    resume = _resume_point(cfg, out)
    folder = RunFolder(cfg, out, resume, main=args.process_index == 0)

    model, tokenizer = load_model(cfg.model, device="cpu", dtype="fp32")
    model.train()
    max_source = cfg.max_source_length or model_max_source_length(model.config, tokenizer)
    train_data, eval_data = _datasets(cfg)
    generation = model.generation_config
    start = (
        generation.decoder_start_token_id if generation.decoder_start_token_id is not None else generation.bos_token_id
    )
    labels = as_labels(tokenizer, start)
    train_set = _tokenized(cfg, train_data, cfg.train_split, tokenizer, max_source, labels)
    eval_set = None if eval_data is None else _tokenized(cfg, eval_data, "eval", tokenizer, max_source, labels)

    block = getattr(model.config, "block_size", None) if hasattr(model.config, "sparsity_type") else None
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=block)
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    log_path = out / "train_log.jsonl"
    guard = _make_guard(log_path)
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=_rouge_metrics(tokenizer) if eval_set is not None else None,
        callbacks=[guard],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict on stdout
    if trainer.is_world_process_zero():
        log(f"training {cfg.model} on {len(train_set)} examples "
            f"({'resuming from ' + str(resume) if resume else 'from the start'})")  # fmt: skip
    try:
        if trainer.is_world_process_zero():
            folder.start()
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except torch.OutOfMemoryError:
        raise LongsumError("out of memory: lower --per-device-batch-size (raise --gradient-accumulation-steps to "
                           "keep the effective batch), add --gradient-checkpointing, or lower "
                           "--max-source-length") from None  # fmt: skip
    except OSError as err:  # a checkpoint or log that cannot be written (disk full, permissions)
        if err.errno == errno.ENOSPC:
            raise LongsumError(f"disk full while training into {out}: free some space (or lower --save-total-limit), "
                               f"then continue with --resume") from None  # fmt: skip
        raise LongsumError(
            f"cannot write into {out}: {err.strerror or err}; fix it, then continue with --resume"
        ) from None
    if guard.bad_loss is not None:
        step, value = guard.bad_loss
        precision = "--bf16 instead of --fp16" if cfg.fp16 else ("fp32 (drop --bf16)" if cfg.bf16 else "a lower "
                                                                  "--learning-rate")  # fmt: skip
        raise LongsumError(f"training stopped: the loss became {value} at step {step}; try {precision}, "
                           f"or a lower --learning-rate / more --warmup-ratio")  # fmt: skip

    final = out / "final"
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(final)
        effective = {"longsum": asdict(cfg), "training_arguments": json.loads(args.to_json_string())}
        (out / "train_config.json").write_text(json.dumps(effective, indent=2, default=str))
        plot_curves(log_path, out / "train_curves.png")
        log(f"final model: {final} (log {log_path}, curves {out / 'train_curves.png'})")
    return final


# ------------------------------------------------------------------------------------------ settings
# training_args fields set by longsum itself, and the option that sets each (None: longsum's choice).
_SET_BY = {"output_dir": "--output-dir", "per_device_train_batch_size": "--per-device-batch-size",
           "per_device_eval_batch_size": "--per-device-batch-size", "warmup_steps": "--warmup-ratio",
           "activation_checkpointing": "--gradient-checkpointing", "gradient_checkpointing": "--gradient-checkpointing",
           "eval_strategy": "--eval-steps", "load_best_model_at_end": "--eval-steps",
           "metric_for_best_model": "--eval-steps", "save_strategy": "--save-steps",
           "generation_max_length": "--max-target-length", "generation_num_beams": "--eval-num-beams"}  # fmt: skip


def training_arguments(cfg: TrainConfig):
    """The run's `Seq2SeqTrainingArguments`, built before anything is loaded so that every bad
    setting (on the command line, in --config or under training_args) is one line now, not a
    traceback after minutes of loading. What transformers does not check here (the seed range, whether
    a --report-to integration or DeepSpeed is installed) is checked first."""
    import torch
    from transformers import Seq2SeqTrainingArguments

    _check_trainer_settings(cfg)
    ours = dict(
        output_dir=str(cfg.output_dir),
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a value below 1 is a ratio of the training steps
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        weight_decay=cfg.weight_decay,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        **_checkpointing_argument(Seq2SeqTrainingArguments, cfg.gradient_checkpointing),
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=bool(cfg.eval_steps),
        metric_for_best_model="rougeLsum" if cfg.eval_steps else None,
        greater_is_better=True,
        predict_with_generate=True,
        generation_max_length=cfg.max_target_length,
        generation_num_beams=cfg.eval_num_beams,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not hidden
        disable_tqdm=True,  # progress is longsum's own line per logging step, on stderr
        seed=cfg.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA, DDP runs on CPU processes (gloo); accelerate needs to be told.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        deepspeed=cfg.deepspeed,
        fsdp=cfg.fsdp or "",
    )
    for key in sorted(set(cfg.training_args) & set(ours)):  # else a TypeError: "got multiple values"
        option = _SET_BY.get(key) or (flag(key) if key in {f.name for f in dataclasses.fields(cfg)} else None)
        how = f"use {option}" if option else "longsum train needs its own value"
        raise LongsumError(f"training_args field {key} is set by longsum train itself ({how}): remove it from "
                           f"--config")  # fmt: skip
    try:
        return Seq2SeqTrainingArguments(**ours, **cfg.training_args)
    except (ValueError, TypeError, KeyError, ImportError, OSError, NotImplementedError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if cfg.fsdp and "fsdp" in first.lower():
            raise LongsumError(f"--fsdp {cfg.fsdp!r} was refused by transformers ({first}); pass FSDP options such "
                               f"as 'full_shard auto_wrap'") from None  # fmt: skip
        raise LongsumError(f"transformers refused the training settings ({first}); fix that option or --config "
                           f"key") from None  # fmt: skip


def _check_trainer_settings(cfg: TrainConfig) -> None:
    """What Seq2SeqTrainingArguments would only fail on later (or with a long list): one line each."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    schedulers = [s.value for s in SchedulerType]
    if cfg.lr_scheduler_type not in schedulers:
        raise LongsumError(f"--lr-scheduler-type {cfg.lr_scheduler_type!r} is not a scheduler; choose one of "
                           f"{', '.join(schedulers)}")  # fmt: skip
    optim = cfg.training_args.get("optim")
    optimizers = [o.value for o in OptimizerNames]
    if optim is not None and optim not in optimizers:
        raise LongsumError(f"optim {optim!r} (--config) is not an optimizer; choose one of {', '.join(optimizers)}")
    _check_report_to(cfg.report_to)
    if cfg.deepspeed:
        _check_deepspeed(cfg.deepspeed)


# --report-to name -> (transformers' availability check, the package to install); None: no package to check.
_INTEGRATIONS = {"azure_ml": ("is_azureml_available", "azureml-core"), "comet_ml": ("is_comet_available", "comet-ml"),
                 "mlflow": ("is_mlflow_available", "mlflow"), "neptune": ("is_neptune_available", "neptune"),
                 "tensorboard": ("is_tensorboard_available", "tensorboard"),
                 "trackio": ("is_trackio_available", "trackio"), "wandb": ("is_wandb_available", "wandb"),
                 "codecarbon": ("is_codecarbon_available", "codecarbon"),
                 "clearml": ("is_clearml_available", "clearml"), "dagshub": ("is_dagshub_available", "dagshub"),
                 "flyte": ("is_flyte_deck_standard_available", "flytekitplugins-deck-standard"),
                 "dvclive": ("is_dvclive_available", "dvclive"), "swanlab": ("is_swanlab_available", "swanlab"),
                 "kubeflow": None}  # fmt: skip


def _check_report_to(name: str) -> None:
    """A known integration that is installed; the Trainer would fail on either only after the loading."""
    from transformers.integrations import integration_utils

    if name in ("none", "all"):
        return
    known = list(getattr(integration_utils, "INTEGRATION_TO_CALLBACK", _INTEGRATIONS))
    if name not in known:
        raise LongsumError(f"--report-to {name!r} is not an integration transformers knows; choose none, all, or "
                           f"one of {', '.join(known)}")  # fmt: skip
    check, package = _INTEGRATIONS.get(name) or (None, None)
    available = getattr(integration_utils, check, None) if check else None
    if available is not None and not available():
        raise LongsumError(f"--report-to {name} needs the {package} package, which is not installed: "
                           f"pip install {package}, or --report-to none")  # fmt: skip


def _check_deepspeed(path: str) -> None:
    import importlib.util

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise LongsumError(f"cannot read --deepspeed {path}: {err.strerror or err}; pass a DeepSpeed JSON config "
                           f"(for example examples/configs/ds_zero2.json)") from None  # fmt: skip
    try:
        config = json.loads(text)
    except ValueError as err:
        raise LongsumError(f"--deepspeed {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise LongsumError(f"--deepspeed {path} must hold a JSON object (a DeepSpeed config)")
    if importlib.util.find_spec("deepspeed") is None:
        raise LongsumError("--deepspeed needs the deepspeed package, which is not installed: pip install deepspeed "
                           "(on a machine with CUDA), or leave out --deepspeed")  # fmt: skip


def _checkpointing_argument(arguments_class, enabled: bool) -> dict:
    """transformers 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name
    warns); earlier 5.x releases only know the old one. Pass the one this transformers has."""
    fields = getattr(arguments_class, "__dataclass_fields__", {})
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": enabled}


def _check_output_dir(out: Path) -> None:
    """A writable folder, checked before minutes of loading and tokenizing."""
    if out.exists() and not out.is_dir():
        raise LongsumError(f"--output-dir {out} is a file; choose a folder")
    probe = out / f".longsum-write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise LongsumError(
            f"cannot write to --output-dir {out}: {err.strerror or err}; choose another folder"
        ) from None


def _complete(checkpoint: Path) -> bool:
    """A checkpoint the Trainer finished writing: its trainer_state.json (written last) reads, and
    its weights are there."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(checkpoint.glob("*.safetensors")) or any(checkpoint.glob("pytorch_model*.bin"))


def last_complete_checkpoint(out: Path, report: bool = False) -> Path | None:
    """The newest complete `checkpoint-N` in `out`; newer incomplete ones (a kill during a save)
    are skipped with a note, and left on disk."""
    import re

    found = []
    for path in out.iterdir() if out.is_dir() else []:
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        if _complete(path):
            return path
        if report:
            note(f"skipping {path}: incomplete (interrupted while being saved)")
    return None


def _resume_point(cfg: TrainConfig, out: Path) -> Path | None:
    if cfg.resume is None:
        return None  # a folder that already holds a run is refused (or emptied by --overwrite) by RunFolder
    if cfg.resume == "auto":
        last = last_complete_checkpoint(out, report=True)
        if last is None:
            log(f"no complete checkpoint in {out} yet: starting from the beginning")
        return last
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise LongsumError(f"--resume {cfg.resume} is not a checkpoint folder (no trainer_state.json)")
    if not _complete(path):
        raise LongsumError(f"--resume {cfg.resume} is an incomplete checkpoint (interrupted while being saved); "
                           f"pass an earlier one, or --resume alone for the newest complete one")  # fmt: skip
    return path


# ------------------------------------------------------------------------------------------ run folder
RUN_RECORD = "train_run.json"  # not "run.json": `longsum eval` writes that name into its --output-dir
RUN_FORMAT = "longsum-train-run"
# Settings that define a run besides its model and training data: a checkpoint carries them (its
# optimizer and scheduler state, its position in the seeded, batched data), so a resumed run must have
# the values it started with. The held-out rows (--eval-steps without --eval-dataset on a local file)
# and the training_args fields not in _CHANGEABLE_PREFIXES count too.
RUN_SETTINGS = ("dataset_config", "train_split", "text_column", "summary_column", "limit", "max_source_length",
                "max_target_length", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate",
                "lr_scheduler_type", "warmup_ratio", "weight_decay", "seed")  # fmt: skip
# Settings that may change on --resume: they take effect in the continued run.
RESUMABLE_SETTINGS = ("output_dir", "eval_dataset", "eval_split", "num_train_epochs", "max_steps", "bf16", "fp16",
                      "gradient_checkpointing", "deepspeed", "fsdp", "eval_steps", "eval_limit", "eval_num_beams",
                      "save_steps", "save_total_limit", "logging_steps", "resume", "overwrite", "report_to")  # fmt: skip
_CHANGEABLE_PREFIXES = ("logging_", "save_", "eval_", "dataloader_", "report_", "hub_", "push_to_hub", "run_name",
                        "disable_tqdm", "torch_empty_cache_steps", "ddp_timeout")  # fmt: skip
_DATA_KEYS = {"model", "dataset", "dataset_config", "train_split", "text_column", "summary_column", "limit",
              "held_out", "max_source_length", "max_target_length"}  # fmt: skip
# What longsum train (and the Trainer under it) writes in --output-dir: all that --overwrite removes.
_WRITTEN = (RUN_RECORD, "train_log.jsonl", "train_config.json", "train_curves.png", "final", "cache", "runs")
_RUN_MARKS = (RUN_RECORD, "train_log.jsonl", "train_config.json", "final")  # with checkpoint-N: "holds a run"


class RunFolder:
    """The run an --output-dir holds, checked before anything is loaded (module docstring): a new run
    into a folder that holds one is refused (or, with --overwrite, what longsum train wrote there is
    removed); a --resume must be of the same model, data and RUN_SETTINGS. `start()` (main process,
    when training starts) records the run in RUN_RECORD."""

    def __init__(self, cfg: TrainConfig, out: Path, resume: Path | None, *, main: bool = True):
        from longsum import __version__

        self.out, self.main, self.path = out, main, out / RUN_RECORD
        self.identity = run_identity(cfg)  # the model fingerprint and the data first: a bad --model fails here
        self.info = {"model": cfg.model, "dataset": cfg.dataset, "longsum": __version__}
        self.resume_step = _global_step(resume) if resume is not None else 0
        found = _run_entries(out) if cfg.resume is None else []
        if found:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            if not cfg.overwrite:
                raise LongsumError(f"--output-dir {out} already holds a training run ({shown}): use --resume to "
                                   f"continue it, or --overwrite / another --output-dir to start a new one")  # fmt: skip
            if not _is_ours(out):
                raise LongsumError(f"--output-dir {out} holds {shown} but no record of longsum train ({RUN_RECORD}, "
                                   f"train_log.jsonl): --overwrite leaves them; remove them yourself or choose "
                                   f"another --output-dir")  # fmt: skip
            _wait_for_everyone()  # every process has looked before the main one removes anything
            if main:
                removed = _remove_run(out)
                note(f"--overwrite: removed the previous run in {out} ({', '.join(removed)}); other files there "
                     f"are left")  # fmt: skip
        elif cfg.resume is not None:
            folders = [out] + ([resume.parent] if resume is not None else [])
            checked = [f for f in dict.fromkeys(p.resolve() for p in folders) if self._check(f)]
            if not checked and resume is not None and main:
                note(f"{resume.parent} has no {RUN_RECORD} (an older longsum started the run): its model, data and "
                     f"settings cannot be checked; this run's are recorded now")  # fmt: skip
        _wait_for_everyone()  # nothing is written (run record, tokenization cache) before every process checked

    def _check(self, folder: Path) -> bool:
        """Whether `folder` has a run record; refuses (one line) one whose identity is not this run's."""
        record = _read_record(folder / RUN_RECORD)
        if record is None:
            return False
        parts, data = identity_changes(record.get("identity") or {}, self.identity, record, self.info)
        if not parts:
            return True
        if data:
            raise LongsumError(f"--resume: {folder} is a run of another model or data ({'; '.join(parts)}); pass "
                               f"the run's --model, --dataset and data options to continue it, or start a new run "
                               f"in another --output-dir (or with --overwrite)")  # fmt: skip
        raise LongsumError(f"--resume cannot change what the checkpoint's optimizer, scheduler and data position "
                           f"carry ({'; '.join(parts)}): pass the run's values to continue it, or start a new run "
                           f"in another --output-dir")  # fmt: skip

    def start(self) -> None:
        """Record the run (once: a resumed run keeps its record) and drop log lines past the step it
        starts from (what a killed run logged after its last checkpoint would repeat, mixed)."""
        from longsum.data.provenance import now
        from longsum.data.store import write_json_atomic

        if not self.path.exists():
            write_json_atomic(self.path, {"format": RUN_FORMAT, "format_version": 1, "identity": self.identity,
                                          **self.info, "created": now()})  # fmt: skip
        log_path = self.out / "train_log.jsonl"
        if not log_path.exists():
            return
        kept, dropped = [], 0
        for line in log_path.read_text().splitlines():
            try:
                row = json.loads(line)
                keep = isinstance(row, dict) and row.get("step", 0) <= self.resume_step
            except ValueError:  # a line torn by a kill
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += bool(line.strip())
        if dropped:
            tmp = log_path.with_name(f".{log_path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, log_path)
            note(f"left out {dropped} line(s) of {log_path} logged after step {self.resume_step}, where this run "
                 f"continues")  # fmt: skip


def run_identity(cfg: TrainConfig) -> dict:
    """What a resumed run must match (JSON values): the model's weights, the training data and RUN_SETTINGS."""
    from longsum.model.checkpoint import fingerprint

    identity = {"model": fingerprint(cfg.model), "dataset": _dataset_identity(cfg.dataset)}
    identity.update({name: getattr(cfg, name) for name in RUN_SETTINGS})
    holds_out = bool(cfg.eval_steps and not cfg.eval_dataset and _is_local(cfg.dataset))
    identity["held_out"] = cfg.eval_limit if holds_out else None  # at most this many rows are not trained on
    identity["training_args"] = {k: v for k, v in cfg.training_args.items() if not k.startswith(_CHANGEABLE_PREFIXES)}
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def _dataset_identity(name: str) -> str:
    """A local file by its content (moving it is fine, editing it is not); a Hub dataset by its id."""
    from longsum.data.datasets import _sha256
    from longsum.registry import DATASET_ALIASES

    path = Path(name)
    if path.is_file():
        return f"sha256:{_sha256(path)[:16]}"
    return DATASET_ALIASES[name].hub_id if name in DATASET_ALIASES else name


def identity_changes(old: dict, new: dict, then: dict, now: dict) -> tuple[list[str], bool]:
    """('--learning-rate 8e-05 then, 0.001 now', ...) for what differs between two identities (`then`
    and `now`: their run records' names of the model and dataset), and whether the model or data does."""
    parts, data = [], False

    def shown(value) -> str:
        return "unset" if value is None else json.dumps(value)

    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        data = data or key in _DATA_KEYS
        if key in ("model", "dataset"):
            what = "weights" if key == "model" else "data"
            parts.append(f"--{key} {then.get(key)} then ({what} {a}), {now.get(key)} now ({what} {b})")
        elif key == "held_out":
            parts.append(f"rows held out of training for evaluation (--eval-steps without --eval-dataset, on a "
                         f"local file) {'up to ' + str(a) if a else 'none'} then, "
                         f"{'up to ' + str(b) if b else 'none'} now")  # fmt: skip
        elif key == "training_args":
            for name in sorted(set(a or {}) | set(b or {})):
                if (a or {}).get(name) != (b or {}).get(name):
                    parts.append(f"training_args {name} {shown((a or {}).get(name))} then, "
                                 f"{shown((b or {}).get(name))} now")  # fmt: skip
        else:
            parts.append(f"{flag(key)} {shown(a)} then, {shown(b)} now")
    return parts, data


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise LongsumError(f"cannot read {path} ({err}), which names the run in {path.parent}: restore it, or start "
                           f"a new run in another --output-dir (or with --overwrite)") from None  # fmt: skip
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise LongsumError(f"{path} is not a longsum train run record: remove it, or choose another --output-dir")
    return record


def _run_entries(out: Path) -> list[str]:
    """The names in `out` that make it a folder holding a run."""
    import re

    if not out.is_dir():
        return []
    names = sorted(p.name for p in out.iterdir())
    return [n for n in names if n in _RUN_MARKS or re.fullmatch(r"checkpoint-\d+", n)]


def _is_ours(out: Path) -> bool:
    """Whether longsum train recorded the run in `out` (its run record; before run records: its log or
    its saved configuration)."""
    if (out / RUN_RECORD).exists():
        return _read_record(out / RUN_RECORD) is not None
    try:
        config = json.loads((out / "train_config.json").read_text())
        return isinstance(config, dict) and "longsum" in config
    except (OSError, ValueError):
        pass
    try:
        with open(out / "train_log.jsonl") as f:
            first = json.loads(f.readline())
        return isinstance(first, dict) and "step" in first
    except (OSError, ValueError):
        return False


def _remove_run(out: Path) -> list[str]:
    """Remove what longsum train wrote in `out` (its names only); returns them."""
    import re
    import shutil

    removed = []
    for path in sorted(out.iterdir()):
        if path.name not in _WRITTEN and not re.fullmatch(r"checkpoint-\d+", path.name):
            continue
        folder = path.is_dir() and not path.is_symlink()  # a link is removed, never what it points to
        try:
            shutil.rmtree(path) if folder else path.unlink()
        except OSError as err:
            raise LongsumError(f"--overwrite: cannot remove {path}: {err.strerror or err}; remove it yourself, or "
                               f"choose another --output-dir") from None  # fmt: skip
        removed.append(path.name + ("/" if folder else ""))
    return removed


def _global_step(checkpoint: Path) -> int:
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _wait_for_everyone() -> None:
    """A barrier between the processes of a distributed run (nothing when there is one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rouge_metrics(tokenizer):
    import numpy as np

    from longsum.data.metrics import ROUGE_TYPES, score_pair

    def compute(eval_pred):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        predictions = np.where(predictions < 0, tokenizer.pad_token_id, predictions)
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        preds = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        refs = tokenizer.batch_decode(labels, skip_special_tokens=True)
        scores = [score_pair(p.strip(), r.strip()) for p, r in zip(preds, refs)]
        result = {name: sum(s[name] for s in scores) / len(scores) for name in ROUGE_TYPES}
        result["gen_len"] = float(np.mean([np.count_nonzero(p != tokenizer.pad_token_id) for p in predictions]))
        return result

    return compute


def _make_guard(path: Path):
    """A callback that writes the JSONL log and a progress line on stderr (main process), applies
    this run's logging, evaluation and save intervals on --resume, and stops at the first non-finite loss."""
    import time

    from transformers import TrainerCallback

    class Guard(TrainerCallback):
        def __init__(self):
            self.bad_loss = None
            self.start = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed Trainer takes these intervals from the checkpoint's trainer_state.json, silently
            # (a warning hidden with the library logs): the values given now are meant, so they apply.
            changed = []
            for kind in ("logging", "eval", "save"):
                value = getattr(args, f"{kind}_steps")
                strategy = getattr(args, "eval_strategy" if kind == "eval" else f"{kind}_strategy")
                if value is None or value < 1 or getattr(strategy, "value", strategy) != "steps":
                    continue
                if getattr(state, f"{kind}_steps", value) != value:
                    changed.append(f"--{kind}-steps {value} (the checkpoint's: {getattr(state, f'{kind}_steps')})")
                    setattr(state, f"{kind}_steps", int(value))
            if changed and state.is_world_process_zero:
                log(f"continuing with {', '.join(changed)}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if state.is_world_process_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")
                log(_progress_line(state, logs, time.perf_counter() - self.start))
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(loss):
                self.bad_loss = (state.global_step, loss)
                control.should_training_stop = True

    return Guard()


def _progress_line(state, logs: dict, seconds: float) -> str:
    """`step 20/60  loss 3.214  lr 4.0e-05  12s` (or the eval scores, or the run's summary)."""
    step = f"step {state.global_step}/{state.max_steps}"
    if "loss" in logs:
        return f"{step}  loss {logs['loss']:.4g}  lr {logs.get('learning_rate', 0):.2g}  {seconds:.0f}s"
    scores = {k.removeprefix("eval_"): v for k, v in logs.items() if k.startswith("eval_rouge")}
    if scores:
        return f"{step}  eval " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items())
    if "train_runtime" in logs:
        return f"{step}  done in {float(logs['train_runtime']):.0f}s, mean loss {float(logs.get('train_loss', 0)):.4g}"
    return f"{step}  " + "  ".join(f"{k} {v}" for k, v in logs.items())


def plot_curves(log_path: Path, png: Path) -> None:
    """Training loss and (when evaluated) ROUGE against steps."""
    if not log_path.exists():
        return
    try:
        import matplotlib
    except ImportError:  # an optional extra: the run itself is done, say so and go on
        note(f"no {png.name}: plotting needs matplotlib (pip install matplotlib); the log is in {log_path}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    rouge = [(r["step"], r["eval_rougeLsum"]) for r in rows if "eval_rougeLsum" in r]
    fig, axes = plt.subplots(1, 2 if rouge else 1, figsize=(10 if rouge else 5, 3.5), squeeze=False)
    if loss:
        axes[0][0].plot(*zip(*loss), marker=".")
    axes[0][0].set(xlabel="step", ylabel="training loss", title="loss")
    if rouge:
        axes[0][1].plot(*zip(*rouge), marker="o", color="tab:green")
        axes[0][1].set(xlabel="step", ylabel="rougeLsum", title="eval rougeLsum")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


EXAMPLES = """Examples:

  longsum train --model ./lsg-bart-base-4096 --dataset pubmed --output-dir runs/pubmed \\
      --per-device-batch-size 8 --gradient-accumulation-steps 4 --bf16 --gradient-checkpointing \\
      --eval-steps 2000 --save-steps 2000                      (the published recipe: lr 8e-5, warmup 10%)

  longsum train --model ./lsg-bart-base-4096 --dataset train.jsonl --eval-dataset dev.jsonl \\
      --output-dir runs/mine --max-steps 2000 --resume

  accelerate launch -m longsum train --config examples/configs/pubmed.yaml     (multi-GPU; same flags)

  torchrun --nproc-per-node 8 -m longsum train --config examples/configs/pubmed.yaml \\
      --deepspeed examples/configs/ds_zero2.json

--resume alone continues from the newest complete checkpoint in --output-dir; --resume PATH from that one
(the run's model, data and hyper-parameters must be the same: train_run.json names them). An --output-dir
that holds another run is refused; --overwrite removes what longsum train wrote there and starts over.
--config FILE (YAML/JSON) sets any option below or any transformers Seq2SeqTrainingArguments field;
options given on the command line win over the file."""

COMMAND = Command(
    "train",
    TrainConfig,
    run,
    examples=EXAMPLES,
    load=load_config_file,
    help="Fine-tune a seq2seq model (LSG, LongT5, BART...) on a summarization dataset.",
)
