"""Native LSG models on transformers 5.

`register_auto_classes()` (`longsum.register()`; `load_model` calls it) registers the LSG model
types (`lsg_bart`, `lsg_mbart`, `lsg_pegasus`, `lsg_bert`, `lsg_roberta`, `lsg_xlm-roberta`) with
transformers' Auto classes, so longsum's own checkpoints also load with
`AutoModelForSeq2SeqLM.from_pretrained(dir)`. Importing this package changes nothing in transformers.
"""

from __future__ import annotations

import functools

import transformers
from transformers import AutoConfig

from longsum.model.lsg.attention import SPARSE_SELECTORS, SPARSITY_TYPES, LSGSpec, lsg_attention
from longsum.model.lsg.bart import (
    LSGBartConfig,
    LSGBartForConditionalGeneration,
    LSGBartForSequenceClassification,
    LSGBartModel,
)
from longsum.model.lsg.bert import LSGBertConfig, LSGBertForMaskedLM, LSGBertForSequenceClassification, LSGBertModel
from longsum.model.lsg.common import LSG_DEFAULTS
from longsum.model.lsg.mbart import LSGMBartConfig, LSGMBartForConditionalGeneration, LSGMBartModel
from longsum.model.lsg.pegasus import LSGPegasusConfig, LSGPegasusForConditionalGeneration, LSGPegasusModel
from longsum.model.lsg.roberta import (
    LSGRobertaConfig,
    LSGRobertaForMaskedLM,
    LSGRobertaForSequenceClassification,
    LSGRobertaModel,
    LSGXLMRobertaConfig,
    LSGXLMRobertaForMaskedLM,
    LSGXLMRobertaForSequenceClassification,
    LSGXLMRobertaModel,
)
from longsum.registry import TASKS

# Stock model_type -> the LSG classes for each task (the heads `longsum.registry.FAMILIES` lists;
# a test keeps both in step). Original LSG checkpoints keep the stock model_type ("bart");
# longsum's own use "lsg_bart", so both names map here.
LSG_FAMILIES: dict[str, dict[str, type]] = {
    "bart": {
        "config": LSGBartConfig,
        "base": LSGBartModel,
        "seq2seq": LSGBartForConditionalGeneration,
        "classification": LSGBartForSequenceClassification,
    },
    "mbart": {"config": LSGMBartConfig, "base": LSGMBartModel, "seq2seq": LSGMBartForConditionalGeneration},
    "pegasus": {"config": LSGPegasusConfig, "base": LSGPegasusModel, "seq2seq": LSGPegasusForConditionalGeneration},
    # Long-context encoders (classifiers, embedders), from BERT-family checkpoints.
    "bert": {
        "config": LSGBertConfig,
        "base": LSGBertModel,
        "masked_lm": LSGBertForMaskedLM,
        "classification": LSGBertForSequenceClassification,
    },
    "roberta": {
        "config": LSGRobertaConfig,
        "base": LSGRobertaModel,
        "masked_lm": LSGRobertaForMaskedLM,
        "classification": LSGRobertaForSequenceClassification,
    },
    "xlm-roberta": {
        "config": LSGXLMRobertaConfig,
        "base": LSGXLMRobertaModel,
        "masked_lm": LSGXLMRobertaForMaskedLM,
        "classification": LSGXLMRobertaForSequenceClassification,
    },
}
_AUTO = {task: getattr(transformers, auto) for task, auto in TASKS.items()}  # the registry's task table


def lsg_family(model_type: str) -> dict[str, type] | None:
    """The LSG classes for a config's model_type ("bart" or "lsg_bart"), or None."""
    return LSG_FAMILIES.get(model_type.removeprefix("lsg_"))


@functools.cache  # once per process: every checkpoint a run resolves asks for it
def register_auto_classes() -> None:
    """Make transformers' Auto classes know the LSG model types (idempotent)."""
    for family in LSG_FAMILIES.values():
        config_class = family["config"]
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for task, auto in _AUTO.items():
            if task in family:
                auto.register(config_class, family[task], exist_ok=True)


__all__ = [
    "LSG_DEFAULTS",
    "LSG_FAMILIES",
    "SPARSE_SELECTORS",
    "SPARSITY_TYPES",
    "LSGSpec",
    "lsg_attention",
    "lsg_family",
    *(cls.__name__ for family in LSG_FAMILIES.values() for cls in family.values()),
]
