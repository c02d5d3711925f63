"""`longsum train`: fine-tune any seq2seq model `load_model` handles, on transformers' Seq2SeqTrainer.

The Trainer does the loop, mixed precision, gradient accumulation, checkpointing, resuming and
DDP/DeepSpeed/FSDP under `accelerate launch` or `torchrun`. longsum adds: its datasets (aliases,
Hub ids, local files), tokenization cached on disk, LSG-aware padding (inputs padded to whole
blocks), ROUGE through the eval code, a JSONL log and PNG curves, loud NaN and out-of-memory
messages, and the effective configuration saved beside the final model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from longsum.console import stderr_console
from longsum.errors import LongsumError


@dataclass
class TrainConfig:
    model: str
    dataset: str
    output_dir: str
    eval_dataset: str | None = None
    text_column: str | None = None
    summary_column: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    limit: int | None = None
    max_source_length: int | None = None
    max_target_length: int = 512
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 8e-5
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.1
    num_train_epochs: float = 3.0
    max_steps: int = -1
    weight_decay: float = 0.0
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    eval_steps: int | None = None
    eval_limit: int = 100
    eval_num_beams: int = 1
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    resume: str | None = None  # "auto" (last checkpoint in output_dir) or a checkpoint path
    seed: int = 42
    report_to: str = "none"
    deepspeed: str | None = None
    fsdp: str | None = None
    training_args: dict = field(default_factory=dict)  # any other Seq2SeqTrainingArguments, from --config


def load_config_file(path: str) -> dict:
    """Keys of a YAML/JSON config; TrainConfig fields, or extra Seq2SeqTrainingArguments."""
    from transformers import Seq2SeqTrainingArguments

    try:
        text = Path(path).read_text()
        data = json.loads(text) if path.endswith(".json") else _yaml(text)
    except (OSError, ValueError) as err:
        raise LongsumError(f"cannot read --config {path}: {err}") from None
    if not isinstance(data, dict):
        raise LongsumError(f"--config {path} must hold a mapping of option names to values")
    ours = {f.name for f in dataclasses.fields(TrainConfig)} - {"training_args"}
    theirs = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    config, extra = {}, {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in ours:
            config[name] = value
        elif name in theirs:
            extra[name] = value
        else:
            raise LongsumError(f"unknown key '{key}' in --config {path} (not a longsum train option nor a "
                               f"Seq2SeqTrainingArguments field)")  # fmt: skip
    if extra:
        config["training_args"] = extra
    return config


def _yaml(text: str):
    import yaml

    return yaml.safe_load(text)


# ------------------------------------------------------------------------------------------ data
HOLDOUT_FRACTION = 0.1  # of a local file's rows, held out for --eval-steps without --eval-dataset


def _is_local(name: str) -> bool:
    from longsum.data import LOCAL_SUFFIXES

    return Path(name).suffix.lower() in LOCAL_SUFFIXES or Path(name).exists()


def _datasets(cfg: TrainConfig, console):
    """(train EvalData, eval EvalData or None). A local file without --eval-dataset gives up a
    seeded held-out part for evaluation (a file has no validation split; its rows are not trained on)."""
    from longsum.data import load_examples

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
    console.print(f"no --eval-dataset: holding out {held} of {n} examples of {cfg.dataset} for evaluation "
                  f"(seed {cfg.seed}); they are not trained on", markup=False, highlight=False)  # fmt: skip
    return (train.subset([k for k in range(n) if k not in eval_positions]),
            train.subset(sorted(eval_positions)))  # fmt: skip


def _tokenized(cfg: TrainConfig, data, split: str, tokenizer, max_source: int, console):
    """A tokenized `datasets.Dataset` (cached on disk per source, selection and lengths)."""
    view, dropped = data.training_view()
    if dropped:
        console.print(f"[yellow]left out {dropped} example(s) of {cfg.dataset} [{split}] without a document or a "
                      f"reference")  # fmt: skip
    if len(view) == 0:
        raise LongsumError(f"no usable examples in {data.source.get('hub_id') or data.source.get('path')} [{split}]")
    from array import array

    rows = hashlib.sha256(array("q", data.indices).tobytes()).hexdigest()  # which rows (subset, hold-out)
    key = json.dumps([data.source, rows, getattr(tokenizer, "name_or_path", ""), len(tokenizer), max_source,
                      cfg.max_target_length], sort_keys=True, default=str)  # fmt: skip
    cache = Path(cfg.output_dir) / "cache" / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)

    def tokenize(batch):
        features = tokenizer(batch["text"], max_length=max_source, truncation=True)
        features["labels"] = tokenizer(text_target=batch["reference"], max_length=cfg.max_target_length,
                                       truncation=True)["input_ids"]  # fmt: skip
        return features

    return view.map(tokenize, batched=True, remove_columns=["text", "reference"], cache_file_name=str(cache),
                    load_from_cache_file=True, desc=f"tokenizing {split}")  # fmt: skip


# ------------------------------------------------------------------------------------------ run
def run(cfg: TrainConfig) -> Path:
    """Train; returns the final model folder."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from longsum.generation import model_max_source_length
    from longsum.models import load_model

    console = stderr_console()
    if cfg.bf16 and cfg.fp16:
        raise LongsumError("choose one of --bf16 and --fp16")
    if cfg.eval_steps and cfg.save_steps % cfg.eval_steps:
        raise LongsumError(f"--save-steps ({cfg.save_steps}) must be a multiple of --eval-steps ({cfg.eval_steps}) "
                           f"to keep the best checkpoint by rougeLsum")  # fmt: skip
    out = Path(cfg.output_dir)
    resume = _resume_point(cfg, out, console)

    model, tokenizer = load_model(cfg.model, device="cpu", dtype="fp32")
    model.train()
    max_source = cfg.max_source_length or model_max_source_length(model.config, tokenizer)
    train_data, eval_data = _datasets(cfg, console)
    train_set = _tokenized(cfg, train_data, cfg.train_split, tokenizer, max_source, console)
    eval_set = None if eval_data is None else _tokenized(cfg, eval_data, "eval", tokenizer, max_source, console)

    block = getattr(model.config, "block_size", None) if hasattr(model.config, "sparsity_type") else None
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=block)
    args = Seq2SeqTrainingArguments(
        output_dir=str(out),
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
        gradient_checkpointing=cfg.gradient_checkpointing,
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
        seed=cfg.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA, DDP runs on CPU processes (gloo); accelerate needs to be told.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        deepspeed=cfg.deepspeed,
        fsdp=cfg.fsdp or "",
        **cfg.training_args,
    )
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
    if trainer.is_world_process_zero():
        console.print(f"training {cfg.model} on {len(train_set)} examples "
                      f"({'resuming from ' + str(resume) if resume else 'from the start'})")  # fmt: skip
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except torch.OutOfMemoryError:
        raise LongsumError("out of memory: lower --per-device-batch-size (raise --gradient-accumulation-steps to "
                           "keep the effective batch), add --gradient-checkpointing, or lower "
                           "--max-source-length") from None  # fmt: skip
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
        console.print(f"final model: {final} (log {log_path}, curves {out / 'train_curves.png'})")
    return final


def _complete(checkpoint: Path) -> bool:
    """A checkpoint the Trainer finished writing: its trainer_state.json (written last) reads, and
    its weights are there."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(checkpoint.glob("*.safetensors")) or any(checkpoint.glob("pytorch_model*.bin"))


def last_complete_checkpoint(out: Path, console=None) -> Path | None:
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
        if console is not None:
            console.print(f"[yellow]skipping {path}: incomplete (interrupted while being saved)", highlight=False)
    return None


def _resume_point(cfg: TrainConfig, out: Path, console) -> Path | None:
    if cfg.resume is None:
        if last_complete_checkpoint(out):
            console.print(f"[yellow]{out} already has checkpoints; pass --resume to continue from the last one")
        return None
    if cfg.resume == "auto":
        last = last_complete_checkpoint(out, console)
        if last is None:
            console.print(f"no complete checkpoint in {out} yet: starting from the beginning", markup=False)
        return last
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise LongsumError(f"--resume {cfg.resume} is not a checkpoint folder (no trainer_state.json)")
    if not _complete(path):
        raise LongsumError(f"--resume {cfg.resume} is an incomplete checkpoint (interrupted while being saved); "
                           f"pass an earlier one, or --resume alone for the newest complete one")  # fmt: skip
    return path


def _rouge_metrics(tokenizer):
    import numpy as np

    from longsum.metrics import ROUGE_TYPES, score_pair

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
    """A callback that writes the JSONL log (main process) and stops at the first non-finite loss."""
    from transformers import TrainerCallback

    class Guard(TrainerCallback):
        def __init__(self):
            self.bad_loss = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if state.is_world_process_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(loss):
                self.bad_loss = (state.global_step, loss)
                control.should_training_stop = True

    return Guard()


def plot_curves(log_path: Path, png: Path) -> None:
    """Training loss and (when evaluated) ROUGE against steps."""
    if not log_path.exists():
        return
    import matplotlib

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
