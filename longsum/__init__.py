"""longsum: summarize long documents with long-context encoder-decoder transformers.

`import longsum` is cheap: torch and transformers are imported only when a model is used. Once
transformers is imported (before or after longsum), longsum's LSG model types are registered with
its Auto classes, so `AutoModelForSeq2SeqLM.from_pretrained(<longsum checkpoint>)` works.
"""

from __future__ import annotations

from longsum._autoregister import install as _install_autoregister
from longsum._version import __version__
from longsum.errors import LongsumError

_install_autoregister()

__all__ = ["__version__", "LongsumError", "load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from longsum.models import load_model

        return load_model
    raise AttributeError(f"module 'longsum' has no attribute {name!r}")
