"""longsum: summarize long documents with long-context encoder-decoder transformers.

`import longsum` is cheap and has no side effects: torch and transformers are imported only when
a model is used. `load_model` registers longsum's LSG model types with transformers' Auto classes;
to load longsum's checkpoints with plain `transformers.AutoModelForSeq2SeqLM.from_pretrained(dir)`
without `load_model`, call `longsum.register()` first.
"""

from __future__ import annotations

from longsum._version import __version__
from longsum.errors import LongsumError

__all__ = ["__version__", "LongsumError", "load_model", "register"]


def register() -> None:
    """Register the LSG model types (`lsg_bart`, `lsg_mbart`, `lsg_pegasus`, `lsg_bert`, `lsg_roberta`,
    `lsg_xlm-roberta`) with transformers' Auto classes. Idempotent; imports torch and transformers."""
    from longsum.model.lsg import register_auto_classes

    register_auto_classes()


def __getattr__(name: str):
    if name == "load_model":
        from longsum.model.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'longsum' has no attribute {name!r}")
