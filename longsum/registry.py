"""Every fact that the CLI, the loaders, `convert`, the help texts and the README share, written once.

No torch or transformers here: the CLI reads these tables to validate options before it imports
anything heavy. A new model family is one entry in `FAMILIES` plus its module under `longsum/model/lsg/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ------------------------------------------------------------------------------------------ tasks, dtypes
# What `load_model(task=...)` gives, and the transformers Auto class that loads stock checkpoints for it.
TASKS = {
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
    "masked_lm": "AutoModelForMaskedLM",
    "base": "AutoModel",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # command-line name -> torch name
# Quantized dtypes (`--dtype int8`, CPU only): the float dtype the weights load in before `longsum.model.int8`
# quantizes the linear layers.
QUANTIZED_DTYPES = {"int8": "fp32"}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DEVICE_TYPES = ("cpu", "cuda", "mps")  # `auto` picks cuda when present
LONG_INPUT_MODES = ("truncate", "chunk")
# The model `summarize` and `eval` use without --model: a real long-document summarizer (LSG-BART, PubMed).
DEFAULT_MODEL = "ccdv/lsg-bart-base-4096-pubmed"
MAX_SEED = 2**32 - 1  # the largest seed every seeded generator of a run (random, numpy, torch) accepts


# ------------------------------------------------------------------------------------------ datasets
@dataclass(frozen=True)
class DatasetSpec:
    """A dataset alias of `eval`/`train`: where it lives on the Hub, its columns, and its preset."""

    hub_id: str
    config: str | None
    text_column: str
    summary_column: str
    description: str = ""
    # Generation settings of the published long-document model cards (ccdv/lsg-*-pubmed, -arxiv,
    # -govreport) that `eval` fills in where the command line sets none.
    preset: dict = field(default_factory=dict)


_CARD_PRESET = {"num_beams": 5, "length_penalty": 2.0, "max_new_tokens": 512, "min_new_tokens": 128}
DATASET_ALIASES = {
    "pubmed": DatasetSpec("ccdv/pubmed-summarization", "document", "article", "abstract",
                          "PubMed articles -> abstracts (Cohan et al. 2018), whole documents", _CARD_PRESET),
    "arxiv": DatasetSpec("ccdv/arxiv-summarization", "document", "article", "abstract",
                         "arXiv papers -> abstracts (Cohan et al. 2018), whole documents", _CARD_PRESET),
    "govreport": DatasetSpec("ccdv/govreport-summarization", "document", "report", "summary",
                             "US GAO/CRS reports -> expert summaries (Huang et al. 2021)", _CARD_PRESET),
}  # fmt: skip
# Hub datasets that only a loading script can build (datasets 5 runs none) -> what to use instead.
SCRIPT_ONLY_DATASETS = {"scientific_papers": "pubmed or arxiv (ccdv/pubmed-summarization, ccdv/arxiv-summarization)"}


# ------------------------------------------------------------------------------------------ LSG
SPARSITY_TYPES = ("norm", "pooling", "lsh", "stride", "block_stride", "bos_pooling", "none")
# Config keys and defaults exactly as the original LSG code has them, so config.json files interoperate.
LSG_DEFAULTS = {
    "block_size": 128,
    "sparse_block_size": 128,
    "sparsity_factor": 2,
    "sparsity_type": "norm",
    "num_global_tokens": 1,
    "adaptive": True,
    "mask_first_token": False,
    "pass_global_tokens_to_decoder": True,
    "pool_with_global": True,
    "lsh_num_pre_rounds": 1,
    "base_model_prefix": "lsg",
    # longsum's own key (the original code ignores it): the sparse windows as docs/lsg.md describes
    # them ("intended"), or as the original code reads them ("original"; see docs/lsg.md).
    "sparse_windows": "intended",
}
SPARSE_WINDOWS = ("intended", "original")
MAX_GLOBAL_TOKENS = 512  # rows of `global_embeddings`
LONGT5_TARGETS = ("longt5-local", "longt5-tglobal")  # what `convert --to` makes of T5


@dataclass(frozen=True)
class Family:
    """An architecture longsum has LSG classes for, and how `convert` turns it into LSG.

    `tasks`: the LSG heads (keys of `TASKS`); `position_offset`: rows before position 0 in its
    learned position table (BART, RoBERTa: 2); `learned_positions` False: sinusoids, recomputed
    (Pegasus); `config_offset`: offset rows counted in `max_position_embeddings` (RoBERTa).
    """

    model_type: str
    kind: str  # "seq2seq" or "encoder"
    tasks: tuple[str, ...]
    position_offset: int
    learned_positions: bool = True
    config_offset: int = 0


FAMILIES = {
    family.model_type: family
    for family in (
        Family("bart", "seq2seq", ("base", "seq2seq", "classification"), 2),
        Family("mbart", "seq2seq", ("base", "seq2seq"), 2),
        Family("pegasus", "seq2seq", ("base", "seq2seq"), 0, learned_positions=False),
        Family("bert", "encoder", ("base", "masked_lm", "classification"), 0),
        Family("roberta", "encoder", ("base", "masked_lm", "classification"), 2, config_offset=2),
        Family("xlm-roberta", "encoder", ("base", "masked_lm", "classification"), 2, config_offset=2),
    )
}
T5_TYPES = ("t5", "mt5")  # converted to LongT5 (`--to`), not to LSG

# Model types whose encoder positions are relative (T5), rotary (T5Gemma) or sinusoids computed for
# any length (PEGASUS-X): an input past `max_position_embeddings` still runs. Every other family looks
# its positions up in a table, and an input past the table fails.
UNBOUNDED_POSITIONS = ("t5", "mt5", "longt5", "pegasus_x", "t5gemma", "t5gemma2")

# Stock seq2seq model types `load_model` is tested with (LSG ones come from FAMILIES).
STOCK_SEQ2SEQ = ("bart", "mbart", "pegasus", "t5", "mt5", "longt5", "led", "pegasus_x", "bigbird_pegasus", "t5gemma",
                 "t5gemma2")  # fmt: skip
# Families checked (tests/test_decoding.py) to decode with each document's cross-attention keys/values
# shared by its beams (`longsum.model.decoding`); another family decodes the stock way, with one line.
SHARED_KV_MODEL_TYPES = ("bart", "mbart", "pegasus", "t5", "mt5", "longt5", "pegasus_x", "bigbird_pegasus",
                         "led", "lsg_bart", "lsg_mbart", "lsg_pegasus", "t5gemma", "t5gemma2")  # fmt: skip


def convertible() -> str:
    """'bart, mbart, pegasus (seq2seq); bert, roberta, xlm-roberta (encoders); t5, mt5 -> longt5'."""
    kinds = {kind: [f.model_type for f in FAMILIES.values() if f.kind == kind] for kind in ("seq2seq", "encoder")}
    return (f"{', '.join(kinds['seq2seq'])} (seq2seq); {', '.join(kinds['encoder'])} (encoders); "
            f"{', '.join(T5_TYPES)} -> longt5")  # fmt: skip


# ------------------------------------------------------------------------------------------ aliases
@dataclass(frozen=True)
class Alias:
    hub_id: str
    role: str  # "source": a short-context checkpoint to convert; "model": ready to summarize or fine-tune


MODEL_ALIASES = {
    "bart-base": Alias("facebook/bart-base", "source"),
    "bart-large": Alias("facebook/bart-large", "source"),
    "bart-large-cnn": Alias("facebook/bart-large-cnn", "source"),
    "distilbart-cnn-12-6": Alias("sshleifer/distilbart-cnn-12-6", "source"),
    "pegasus-large": Alias("google/pegasus-large", "source"),
    "mbart-large-cc25": Alias("facebook/mbart-large-cc25", "source"),
    "t5-base": Alias("google-t5/t5-base", "source"),
    "flan-t5-base": Alias("google/flan-t5-base", "source"),
    "roberta-base": Alias("FacebookAI/roberta-base", "source"),
    "bert-base-uncased": Alias("google-bert/bert-base-uncased", "source"),
    "longt5-tglobal-base": Alias("google/long-t5-tglobal-base", "model"),
    "longt5-local-base": Alias("google/long-t5-local-base", "model"),
    "led-base": Alias("allenai/led-base-16384", "model"),
    "pegasus-x-base": Alias("google/pegasus-x-base", "model"),
    "lsg-bart-base-4096-pubmed": Alias("ccdv/lsg-bart-base-4096-pubmed", "model"),
    "lsg-bart-base-16384-pubmed": Alias("ccdv/lsg-bart-base-16384-pubmed", "model"),
    # T5Gemma 2 (Gemma 3 layers, 128K positions; pretrained only) and T5Gemma (Gemma 2 layers, 8K): gated on the
    # Hub (accept Google's Gemma license there, then log in); "-it": instruction-tuned.
    "t5gemma-2-270m-270m": Alias("google/t5gemma-2-270m-270m", "model"),
    "t5gemma-2-1b-1b": Alias("google/t5gemma-2-1b-1b", "model"),
    "t5gemma-2-4b-4b": Alias("google/t5gemma-2-4b-4b", "model"),
    "t5gemma-b-b-prefixlm": Alias("google/t5gemma-b-b-prefixlm", "model"),
    "t5gemma-b-b-prefixlm-it": Alias("google/t5gemma-b-b-prefixlm-it", "model"),
    "t5gemma-l-l-prefixlm": Alias("google/t5gemma-l-l-prefixlm", "model"),
    "t5gemma-l-l-prefixlm-it": Alias("google/t5gemma-l-l-prefixlm-it", "model"),
    "t5gemma-2b-2b-prefixlm": Alias("google/t5gemma-2b-2b-prefixlm", "model"),
    "t5gemma-2b-2b-prefixlm-it": Alias("google/t5gemma-2b-2b-prefixlm-it", "model"),
}


def aliases(role: str | None = None) -> list[str]:
    return [name for name, alias in MODEL_ALIASES.items() if role is None or alias.role == role]
