"""Which LSG kernel an attention module runs: chosen once, in its `__init__`, from the config.

A kernel computes the whole LSG pattern with the signature of `lsg_attention`:
`(q, k, v, mask, spec, dropout_p) -> out`, with q, k, v `[b, h, n, d]` (globals first), mask `[b, n]`
bool or None, out `[b, h, n, d]`. Every kernel gives the same numbers (tests/lsg/test_flex.py holds
them to 2e-5 in fp32); they differ in how they get there, and so in speed per device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longsum.errors import LSGConfigError
from longsum.model.lsg.attention import LSGSpec, lsg_attention
from longsum.model.lsg.flex import flex_lsg_attention

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, LSGSpec, float], torch.Tensor]

LSG_KERNELS: dict[str, Kernel] = {
    # Blocks gathered from one key bank, softmax in torch's SDPA: exact, any device and float dtype.
    "sdpa_blocked": lsg_attention,
    # One compiled FlexAttention call over a static block mask (built once per length): for GPUs.
    # Slower than the blocked kernel on CPU (1.2-1.4x at 1k-4k tokens) and each new length compiles;
    # steps aside to the blocked kernel where flex cannot serve (dropout, CPU backward, ...).
    "flex": flex_lsg_attention,
}

# transformers' `config._attn_implementation` -> LSG kernel. Those backends name how *dense* attention
# is computed; none of them computes LSG's block pattern, so each maps to the LSG kernel that serves
# it best:
# * None / "sdpa": the same backend, the blocked SDPA kernel;
# * "eager": eager exists to return attention weights; LSG forms none (each block's softmax runs inside
#   SDPA, and a dense t x t map is what LSG avoids), so an eager LSG kernel would only be slower. The
#   encoder warns when weights are asked for (`common.warn_no_attention_weights`); the stock decoder
#   still runs eager and returns its weights;
# * "flash_attention_2": SDPA already dispatches to its flash/memory-efficient kernels on CUDA where
#   the mask allows; a dedicated CUDA path will get its own entry;
# * "flex_attention": the flex kernel.
# The device and dtype play no part: they are only known after `__init__` (`.to()`, `from_pretrained`
# on meta). An unlisted value is an error.
ATTN_IMPLEMENTATION_KERNELS: dict[str | None, str] = {
    None: "sdpa_blocked",
    "eager": "sdpa_blocked",
    "sdpa": "sdpa_blocked",
    "flash_attention_2": "sdpa_blocked",
    "flex_attention": "flex",
}


def kernel_name(attn_implementation: str | None) -> str:
    """The LSG kernel for a `config._attn_implementation` value (a one-line LSGConfigError if it has none)."""
    try:
        return ATTN_IMPLEMENTATION_KERNELS[attn_implementation]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a per-sub-config dict)
        known = ", ".join(repr(k) for k in ATTN_IMPLEMENTATION_KERNELS if k is not None)
        raise LSGConfigError(
            f"LSG encoder attention has no kernel for attn_implementation {attn_implementation!r}; use one of {known}"
        ) from None


def select_kernel(config) -> Kernel:
    """The kernel an LSG attention module built from `config` uses (chosen once, in its `__init__`)."""
    return LSG_KERNELS[kernel_name(getattr(config, "_attn_implementation", None))]
