"""What the repository ships beside the package: example configs, docs/lsg.md, the quickstart's files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from longsum.commands.train import TrainConfig, load_config_file

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = EXAMPLES / "configs"
TRAIN_CONFIGS = sorted(p for p in CONFIGS.iterdir() if p.suffix in (".yaml", ".yml"))  # ds_*.json: DeepSpeed
EXAMPLE_DOCS = {"river_town_history.txt", "sleep_memory_review.md", "solar_microgrids_report.txt"}

# The published LSG pubmed recipe, as the README and `longsum train --help` describe it.
PUBMED_RECIPE = {
    "model": "./lsg-bart-base-4096",
    "dataset": "pubmed",
    "output_dir": "runs/pubmed",
    "learning_rate": 8.0e-5,
    "warmup_ratio": 0.1,
    "per_device_batch_size": 8,
    "gradient_accumulation_steps": 4,
    "bf16": True,
    "gradient_checkpointing": True,
    "eval_steps": 2000,
    "save_steps": 2000,
    "num_train_epochs": 8.0,
    "max_target_length": 512,
    "eval_limit": 100,
}


def _field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _has_type(value, hint) -> bool:
    """isinstance for the simple hints config files use; strict about numbers (True is no int, 1 no float)."""
    if hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is not None:  # list[str], dict[str, ...], Literal[...]: check the container only
        if origin is typing.Literal:
            return value in typing.get_args(hint)
        return isinstance(value, origin)
    if hint is float:
        return type(value) is float
    if hint is int:
        return type(value) is int
    if hint is bool:
        return type(value) is bool
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint we cannot check (forward reference, enum wrapper...)


def test_train_configs_are_found():
    assert "pubmed.yaml" in [p.name for p in TRAIN_CONFIGS]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_config_parses_and_every_value_has_its_option_type(path):
    from transformers import Seq2SeqTrainingArguments

    config = load_config_file(str(path))  # unknown keys raise here
    ours, theirs = _field_types(TrainConfig), _field_types(Seq2SeqTrainingArguments)
    for key, value in config.items():
        if key == "training_args":
            for name, extra in value.items():
                assert _has_type(extra, theirs[name]), f"{path.name}: {name}={extra!r} is not {theirs[name]}"
            continue
        assert key in ours, key
        assert _has_type(value, ours[key]), f"{path.name}: {key}={value!r} ({type(value).__name__}) is not {ours[key]}"
    TrainConfig(**config)  # and it builds the run's configuration


def test_pubmed_yaml_is_the_published_recipe():
    config = load_config_file(str(CONFIGS / "pubmed.yaml"))
    assert config == PUBMED_RECIPE
    assert type(config["learning_rate"]) is float and type(config["warmup_ratio"]) is float  # not '8e-5' strings
    effective_batch = config["per_device_batch_size"] * config["gradient_accumulation_steps"]
    assert effective_batch == 32
    assert config["save_steps"] % config["eval_steps"] == 0  # `longsum train` requires it with --eval-steps


def test_pubmed_yaml_header_says_how_to_run_it():
    header = (CONFIGS / "pubmed.yaml").read_text()
    assert "longsum train --config examples/configs/pubmed.yaml" in header
    assert "accelerate launch -m longsum train --config examples/configs/pubmed.yaml" in header


def _deepspeed_config() -> dict:
    return json.loads((CONFIGS / "ds_zero2.json").read_text())


def test_deepspeed_config_is_zero2_with_trainer_filled_values():
    ds = _deepspeed_config()
    assert ds["zero_optimization"]["stage"] == 2
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert ds[key] == "auto", key
    assert ds["fp16"]["enabled"] == "auto" and ds["bf16"]["enabled"] == "auto"
    # The Trainer's optimizer and scheduler (so --lr-scheduler-type etc. apply), or DeepSpeed's filled from them.
    for section in ("optimizer", "scheduler"):
        params = ds.get(section, {}).get("params", {})
        assert all(v == "auto" for v in params.values()), (section, params)


def _trainer_deepspeed_config(config: dict):
    """transformers' `HfTrainerDeepSpeedConfig` (what the Trainer fills "auto" values with) for `config`.

    Its constructor needs the deepspeed package; without it, the same class is combined with the
    accelerate base it normally has, which only parses the dictionary.
    """
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        from accelerate.utils.deepspeed import HfDeepSpeedConfig

        class Filler(HfTrainerDeepSpeedConfig, HfDeepSpeedConfig):
            pass

        filler = Filler.__new__(Filler)
        HfDeepSpeedConfig.__init__(filler, config)
        filler._dtype, filler.mismatches = None, []
        return filler
    return HfTrainerDeepSpeedConfig(config)


def test_transformers_fills_every_auto_of_the_deepspeed_config():
    """The Trainer integration's own filling, with the pubmed recipe on 2 GPUs, leaves no "auto" and no mismatch."""
    recipe = PUBMED_RECIPE
    args = types.SimpleNamespace(
        world_size=2,
        per_device_train_batch_size=recipe["per_device_batch_size"],
        gradient_accumulation_steps=recipe["gradient_accumulation_steps"],
        max_grad_norm=1.0,
        learning_rate=recipe["learning_rate"],
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        save_on_each_node=False,
        fp16=False,
        fp16_full_eval=False,
        bf16=True,
        bf16_full_eval=False,
        get_warmup_steps=lambda steps: int(steps * recipe["warmup_ratio"]),
    )
    filler = _trainer_deepspeed_config(_deepspeed_config())
    assert filler.is_zero2()
    filler.trainer_config_process(args)
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=768))
    filler.trainer_config_finalize(args, model, num_training_steps=1000)

    def autos(node, prefix=""):
        if isinstance(node, dict):
            return [a for k, v in node.items() for a in autos(v, f"{prefix}{k}.")]
        return [prefix.rstrip(".")] if node == "auto" else []

    ds = filler.config
    assert autos(ds) == [] and filler.mismatches == []
    assert ds["train_batch_size"] == 2 * 8 * 4 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == 768 * 768


def test_lsg_doc_covers_every_config_key():
    from longsum.model.lsg.common import LSG_DEFAULTS

    doc = (ROOT / "docs" / "lsg.md").read_text()
    missing = [key for key in LSG_DEFAULTS if key != "base_model_prefix" and f"`{key}`" not in doc]
    assert missing == []
    for name in ("norm", "pooling", "lsh", "stride", "block_stride", "bos_pooling", "none"):
        assert f"`{name}`" in doc, name
    assert "max_position_embeddings" in doc and "shared/design" not in doc


def test_example_docs_are_exactly_the_three_documents():
    from longsum.data.inputs import DEFAULT_GLOB, list_folder

    docs = EXAMPLES / "docs"
    assert {p.name for p in docs.iterdir()} == EXAMPLE_DOCS
    # what `longsum summarize examples/docs` reads with its default --glob
    assert {p.name for p in list_folder(docs, DEFAULT_GLOB)} == EXAMPLE_DOCS
    for name in EXAMPLE_DOCS:
        assert len((docs / name).read_text(encoding="utf-8").split()) > 2000, name


def test_make_tiny_model_prints_an_absolute_output_path_as_is(tmp_path):
    out = tmp_path / "tiny model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_tiny_model.py"), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"to {out} (" in result.stderr, result.stderr
    assert ".//" not in result.stderr
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
