"""Register longsum's LSG model types with transformers without importing it eagerly.

`import longsum` must not import torch or transformers (the CLI has to start fast), yet a user who
runs `import longsum` and then `AutoModelForSeq2SeqLM.from_pretrained(dir)` expects longsum's
checkpoints to load. So: if transformers is already imported, register now; otherwise wait for
its import with a one-shot import hook, and register right after it finishes.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _register() -> None:
    import longsum.lsg  # noqa: F401  (registers on import)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
