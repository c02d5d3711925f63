"""Fast decoding for encoder-decoder models: `generate(model, input_ids, attention_mask, **kwargs)`.

Returns the ids of `model.generate(...)` with the same arguments (it *is* `model.generate`: the same
beam search, processors and stopping rules) with its costs on long inputs removed: each document's
cross-attention keys/values are computed once and shared by its beams (`shared_kv_attention`,
`BeamCache`; LED's and T5Gemma 2's own attention modules run as one-level subclasses), n-gram
blocking is vectorized (`NoRepeatNGram`), and on CPU the logits run in vocabulary slices and the
linear layers and cross-attention on the kernels measured fastest on this machine
(`linear_kernels`, `longsum.model.cpu`). `compile=True` runs the steps through `torch.compile`
(`CompiledDecoder`: CUDA graphs on a GPU). Why each piece exists and what it costs:
docs/decoding.md.

Contract: the ids are stock generate's; where a kernel rounds differently (packed oneDNN, inductor)
a near-tie may go the other way, and `exact=True` keeps torch's kernels. What the installed
transformers offers is read from its code, never its version (`cache_keyword`, `_interfaces`,
`_led_interface`, `_merged_interface`). Every piece is an optimisation: it steps aside, with one
stderr line (`step_aside`), before decoding when a precondition fails and at run time when it
fails where stock `generate()` does not.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import shutil
import sys
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import DynamicCache, EncoderDecoderCache, LogitsProcessor, LogitsProcessorList, StaticCache
from transformers.modeling_outputs import BaseModelOutput

from longsum.errors import describe
from longsum.registry import SHARED_KV_MODEL_TYPES

# Stock attention implementation -> ours (the same computation, plus shared keys/values).
SHARED_IMPLEMENTATIONS = {"sdpa": "longsum_sdpa", "eager": "longsum_eager"}
# Generation settings under which the fast n-gram blocker's place in the processor list (last
# rather than first) could change a score: then the stock blocker is used.
ORDER_SENSITIVE = ("remove_invalid_values", "renormalize_logits")


_TOLD: set[tuple[str, str]] = set()  # (fast path, reason) lines printed


def step_aside(what: str, reason: str) -> None:
    """The one stderr line a fast path prints when it stands aside for the stock path (once per process)."""
    from longsum.console import note

    if (what, reason) not in _TOLD:
        _TOLD.add((what, reason))
        note(f"{what} steps aside for the stock path: {reason}")


class BeamCache(EncoderDecoderCache):
    """An encoder-decoder cache whose beam reordering leaves the cross-attention part alone.

    Beams only move within their own document and all of a document's beams attend to the same
    encoder output, so reordering the cross-attention keys/values is an identity (a copy of
    `[b*k, h, s, d]` per layer per step with stock caches; nothing at all when they are shared).
    """

    def __init__(self, self_attention_cache=None, cross_attention_cache=None):
        super().__init__(DynamicCache() if self_attention_cache is None else self_attention_cache,
                         DynamicCache() if cross_attention_cache is None else cross_attention_cache)  # fmt: skip

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


def self_attention_cache(model) -> DynamicCache:
    """The beams' self-attention cache as stock generate() makes it: from the decoder's config, so that
    sliding-window layers (T5Gemma's local layers) keep only their window, as in stock decoding."""
    return DynamicCache(config=model.config.get_text_config(decoder=True))


# -- shared keys/values in the attention interface -------------------------------------------------
def _group(x: torch.Tensor | None, b: int, k: int) -> torch.Tensor | None:
    """A mask or bias `[B, h', t, s]` (B in 1, b, b*k) for grouped queries: `[B', h', k*t, s]`."""
    if x is None or x.dim() != 4:
        return x
    n, h, t, s = x.shape
    if n == b * k:  # one row per beam: beam-major within each document
        return x.view(b, k, h, t, s).transpose(1, 2).reshape(b, h, k * t, s)
    return x.unsqueeze(2).expand(n, h, k, t, s).reshape(n, h, k * t, s)  # shared by the beams


def shared_kv_attention(base, few_rows=None):
    """Wrap an attention function so that `k` beams' queries can use their document's keys once.

    Called like any attention-interface function with query `[b*k, h, t, d]` and key/value
    `[b, h, s, d]` (a cross-attention cache filled once per document); equal batches go straight
    to `base`. Returns `base`'s (output `[b*k, t, h, d]`, weights `[b*k, h, t, s]` or None).
    `few_rows`: the same computation as `base`, used for the grouped queries where
    `_few_rows_wins` (few rows per document on CPU, keys past the cache).
    """

    def attention(module, query, key, value, attention_mask, **kwargs):
        if query.shape[0] == key.shape[0]:
            return base(module, query, key, value, attention_mask, **kwargs)
        b, (bk, h, t, d) = key.shape[0], query.shape
        k = bk // b
        q = query.view(b, k, h, t, d).transpose(1, 2).reshape(b, h, k * t, d)  # [b, h, k*t, d]
        if "position_bias" in kwargs:  # T5 family: zeros for cross-attention, plus the mask
            kwargs["position_bias"] = _group(kwargs["position_bias"], b, k)
        kwargs["is_causal"] = False  # cross-attention; k*t query rows must not be read as causal
        fast = few_rows is not None and getattr(module, "num_key_value_groups", 1) == 1
        attend = few_rows if fast and _few_rows_wins(q, key, kwargs) else base
        out, weights = attend(module, q, key, value, _group(attention_mask, b, k), **kwargs)
        out = out.reshape(bk, t, h, d)  # [b, k*t, h, d] -> [b*k, t, h, d] (rows are beam-major)
        if weights is not None:  # [b, h, k*t, s] -> [b*k, h, t, s]
            weights = weights.view(b, h, k, t, -1).transpose(1, 2).reshape(bk, h, t, -1)
        return out, weights

    return attention


# CPU cross-attention of a few query rows per document over many keys: `few_rows_sdpa` beats SDPA's
# flash kernel once the keys/values come from memory, as they do in a decoding step (the weights
# stream through the cache between two visits). Per layer, in decoding, beams 4, 1 thread, AMD EPYC
# Zen 4: 4 documents x 4,097 keys 11.7 vs 15.1 ms; 1 x 1,025 keys 0.83 vs 1.01 ms; 1 x 257 keys equal.
FEW_ROWS = 8  # query rows per (document, head): beams x new tokens
FEW_ROWS_MIN_BYTES = 4 << 20  # keys + values of one layer


# Off while a decoding call runs where SDPA measured faster (`few_rows_attention`); a context variable,
# so that a thread or task decoding with another choice does not see this one.
_FEW_ROWS = contextvars.ContextVar("longsum_few_rows", default=True)


@contextmanager
def few_rows_attention(on: bool):
    """Use (or not) the few-rows cross-attention while decoding (`longsum.model.cpu.kernel_choice` decides)."""
    token = _FEW_ROWS.set(on)
    try:
        yield
    finally:
        _FEW_ROWS.reset(token)


def _few_rows_wins(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> bool:
    """(T5Gemma's soft-capped scores, `softcap`, are left to the family's own function.)"""
    # (a compiled step cannot read a context variable: it keeps the default, which it was checked with)
    on = True if torch.compiler.is_compiling() else _FEW_ROWS.get()
    return (on and query.device.type == "cpu" and query.dtype == torch.float32
            and query.shape[2] <= FEW_ROWS and not kwargs.get("dropout") and kwargs.get("softcap") is None
            and 2 * key.numel() * key.element_size() >= FEW_ROWS_MIN_BYTES)  # fmt: skip


def few_rows_eager(module, query, key, value, attention_mask, scaling=None, position_bias=None, **kwargs):
    """The attention of query `[b, h, r, d]` (r small) over key/value `[b, h, s, d]`, streaming the keys.

    softmax(q k^T * scaling + position_bias + mask) v, as the families' eager functions and SDPA
    compute it, but SDPA's CPU kernel walks the keys in blocks with `r`-row products and the eager
    `q k^T` makes MKL read the keys transposed; here the scores come from one batched product that
    streams each key once (`K q^T`, `[b, h, s, r]`), are turned to `[b, h, r, s]` (small) for the
    bias, mask and softmax, and meet the values in a second product. The same attention up to
    rounding (~1e-7). Not causal and without dropout (callers check). Returns output `[b, r, h, d]`
    and weights `[b, h, r, s]`.
    """
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # (a query laid out [b, r, h, d], as projections give it, makes matmul copy: 25 vs 15 ms)
    weights = torch.matmul(key, (query * scale).contiguous().transpose(-1, -2))  # [b, h, s, r]
    weights = weights.transpose(-1, -2).contiguous()  # [b, h, r, s]
    if position_bias is not None:  # T5 family: an additive bias
        weights += position_bias
    if attention_mask is not None:  # bool (True: attend) or additive
        if attention_mask.dtype == torch.bool:
            weights.masked_fill_(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights += attention_mask
    weights = weights.softmax(-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights  # [b, r, h, d]


def few_rows_sdpa(module, query, key, value, attention_mask, **kwargs):
    """`few_rows_eager` without the weights, as transformers' SDPA function returns none."""
    return few_rows_eager(module, query, key, value, attention_mask, **kwargs)[0], None


def _scaled_query_eager(module, query, key, value, attention_mask, **kwargs):
    """LED's attention math on `[b, h, t, d]` (the query arrives scaled): (q k^T + mask) softmax v."""
    weights = torch.matmul(query, key.transpose(2, 3))
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(-1)
    return torch.matmul(weights, value).transpose(1, 2), weights


@functools.cache
def _led_attention_class():
    from transformers.models.led.modeling_led import LEDDecoderAttention

    class SharedKVLEDDecoderAttention(LEDDecoderAttention):
        """LED's decoder attention, with cross-attention over a cache filled once per document.

        The cache arrives as `cache` (transformers 5.24 on) or `past_key_values` (before); it is passed
        on by position, which both releases' stock forward reads the same way.
        """

        def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None,
                    output_attentions=False, past_key_values=None):  # fmt: skip
            cache = cache if cache is not None else past_key_values
            shared = (key_value_states is not None and isinstance(cache, EncoderDecoderCache)
                      and cache.is_updated.get(self.layer_idx))  # fmt: skip
            if shared:
                layer = cache.cross_attention_cache.layers[self.layer_idx]
                shared = layer.keys.shape[0] != hidden_states.shape[0]
            if not shared:
                return super().forward(hidden_states, key_value_states, cache, attention_mask, output_attentions)
            bk, t, _ = hidden_states.shape
            query = (self.q_proj(hidden_states) * self.scaling).view(bk, t, self.num_heads, self.head_dim)
            out, weights = _LED_ATTENTION(self, query.transpose(1, 2), layer.keys, layer.values, attention_mask)
            out = self.out_proj(out.reshape(bk, t, self.embed_dim))  # [b*k, t, h, d] -> [b*k, t, h*d]
            return out, weights if output_attentions else None, cache

    return SharedKVLEDDecoderAttention


_LED_ATTENTION = shared_kv_attention(_scaled_query_eager, functools.partial(few_rows_eager, scaling=1.0))


# -- T5Gemma 2: merged self- and cross-attention -----------------------------------------------------
def merged_shared_attention(query: torch.Tensor, self_key: torch.Tensor, self_value: torch.Tensor,
                            cross_key: torch.Tensor, cross_value: torch.Tensor, mask: torch.Tensor | None,
                            scaling: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One softmax over `[self | cross]` keys, the cross part read once per document by all its beams.

    query `[b*k, h, t, d]`; self_key/self_value `[b*k, g, n, d]` (each beam's own); cross_key/cross_value
    `[b, g, s, d]` (one per document); `g` key/value heads, `h = g*r` query heads (grouped-query
    attention: head `i` reads key head `i // r`); mask `[b*k, 1 or h, t, n+s]`, bool (True: attend)
    or additive. T5Gemma 2's decoder concatenates the two key sets and attends once; here the
    scores of each part come from its own product (the cross part with every beam's and head's
    query rows of a document as rows of one product, `[b, g, k*r*t, d] x [b, g, d, s]`, so no key
    is copied per beam or per head), are joined for the softmax (in float32, as the eager path),
    and the two weighted sums are added: the same attention up to rounding. Returns output
    `[b*k, t, h, d]` and weights `[b*k, h, t, n+s]`.
    """
    bk, h, t, d = query.shape
    b, g, s, _ = cross_key.shape
    k, r, n = bk // b, h // g, self_key.shape[2]
    dtype = query.dtype  # (bf16/fp16 computed in float32, as SDPA's kernels accumulate, rounded once at the end)
    query, self_key, self_value, cross_key, cross_value = (
        x.float() for x in (query, self_key, self_value, cross_key, cross_value)
    )
    q = query * scaling
    own = torch.matmul(q.reshape(bk, g, r * t, d), self_key.transpose(-1, -2))  # [b*k, g, r*t, n]
    grouped = q.view(b, k, g, r, t, d).transpose(1, 2).reshape(b, g, k * r * t, d)  # rows: (beam, head, step)
    cross = torch.matmul(grouped, cross_key.transpose(-1, -2))  # [b, g, k*r*t, s]
    cross = cross.view(b, g, k, r, t, s).transpose(1, 2).reshape(bk, h, t, s)
    scores = torch.cat([own.view(bk, h, t, n), cross], dim=-1)  # [b*k, h, t, n+s]
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = scores.softmax(-1)  # [b*k, h, t, n+s]
    out = torch.matmul(weights[..., :n].reshape(bk, g, r * t, n), self_value).view(bk, g, r, t, d)
    mixed = weights[..., n:].reshape(b, k, g, r, t, s).transpose(1, 2).reshape(b, g, k * r * t, s)
    shared = torch.matmul(mixed, cross_value).view(b, g, k, r, t, d).transpose(1, 2)  # [b, k, g, r, t, d]
    out = out + shared.reshape(bk, g, r, t, d)
    return out.view(bk, h, t, d).transpose(1, 2).to(dtype), weights.to(dtype)  # [b*k, t, h, d]


def merged_expanded_attention(module, query, self_key, self_value, cross_key, cross_value, mask, scaling):
    """T5Gemma 2's merged attention as its stock module computes it, for `exact=True`: the keys/values
    `[self | cross]` of each beam written into one transient `[b*k, g, n+s, d]` tensor (one layer's,
    as the stock module's own concatenation makes at each step; the cache keeps one copy per
    document) and attended by the model's attention function. The stock bits in every dtype.
    Returns output `[b*k, t, h, d]` and weights `[b*k, h, t, n+s]` or None."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    bk, g, n, d = self_key.shape
    b, s = cross_key.shape[0], cross_key.shape[2]

    def joined(own, shared):
        out = own.new_empty(bk, g, n + s, d)
        out[:, :, :n] = own
        out.view(b, bk // b, g, n + s, d)[..., n:, :] = shared.unsqueeze(1)  # each document's, to its beams
        return out

    attend = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, _family_eager)
    return attend(module, query, joined(self_key, cross_key), joined(self_value, cross_value), mask, dropout=0.0,
                  scaling=scaling)  # fmt: skip


# Which merged attention T5Gemma 2 decodes with: `merged_expanded_attention` under `generate(exact=True)`.
_EXACT = contextvars.ContextVar("longsum_exact", default=False)


MERGED_ARGUMENTS = ["hidden_states", "position_embeddings", "merged_attention_mask", "encoder_hidden_states"]


def _merged_interface() -> str | None:
    """Why T5Gemma 2's stock merged attention does not take what `SharedKVMergedAttention` reads."""
    try:
        from transformers.models.t5gemma2 import modeling_t5gemma2 as modeling

        names = list(inspect.signature(modeling.T5Gemma2MergedAttention.forward).parameters)[1:6]
        assert callable(modeling.apply_rotary_pos_emb)
    except Exception as err:  # noqa: BLE001  any change is a reason to step aside
        return describe(err)
    if names not in [[*MERGED_ARGUMENTS, keyword] for keyword in CACHE_KEYWORDS]:
        return f"T5Gemma2MergedAttention.forward takes ({', '.join(names)}, ...)"
    return None


@functools.cache
def _merged_attention_class():
    from transformers.models.t5gemma2 import modeling_t5gemma2 as modeling

    class SharedKVMergedAttention(modeling.T5Gemma2MergedAttention):
        """T5Gemma 2's merged decoder attention, over a cross-attention cache filled once per document.

        The beams' self-attention part is computed as the stock module computes it (projections,
        norms, rotary positions, the beams' own cache); the cache's cross part `[b, g, s, d]` meets
        the beams' queries `[b*k, h, t, d]` in `merged_shared_attention` (`merged_expanded_attention`
        under `generate(exact=True)`). Anything else (the step that fills the cache, training, equal
        batches) is the stock forward.
        """

        def forward(self, hidden_states, position_embeddings, merged_attention_mask, encoder_hidden_states,
                    cache=None, past_key_values=None, **kwargs):  # fmt: skip
            cache = cache if cache is not None else past_key_values
            shared = isinstance(cache, EncoderDecoderCache) and cache.is_updated.get(self.layer_idx)
            if shared:
                layer = cache.cross_attention_cache.layers[self.layer_idx]
                shared = layer.keys.shape[0] != hidden_states.shape[0]
            if not shared:
                return super().forward(hidden_states, position_embeddings, merged_attention_mask,
                                       encoder_hidden_states, cache, **kwargs)  # fmt: skip
            bk, t, _ = hidden_states.shape
            shape = (bk, t, -1, self.head_dim)
            query = self.q_norm(self.q_proj(hidden_states).view(shape).transpose(1, 2))  # [b*k, h, t, d]
            key = self.k_norm(self.k_proj(hidden_states).view(shape).transpose(1, 2))  # [b*k, g, t, d]
            value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
            query, key = modeling.apply_rotary_pos_emb(query, key, *position_embeddings)
            key, value = cache.self_attention_cache.update(key, value, self.layer_idx)  # [b*k, g, n, d]
            if _EXACT.get():
                out, weights = merged_expanded_attention(self, query, key, value, layer.keys, layer.values,
                                                         merged_attention_mask, self.scaling)  # fmt: skip
            else:
                out, weights = merged_shared_attention(query, key, value, layer.keys, layer.values,
                                                       merged_attention_mask, self.scaling)  # fmt: skip
            out = self.o_proj(out.reshape(bk, t, -1))  # [b*k, t, h, d] -> [b*k, t, h*d]
            if weights is None:
                return out, None, None
            n = key.shape[2]
            return out, weights[..., :n], weights[..., n:]

    return SharedKVMergedAttention


def _family_eager(module, *args, **kwargs):
    """The eager attention of the module's own modeling file (each defines `eager_attention_forward`; for
    longsum's one-level subclasses, such as `SharedKVMergedAttention`, their stock class's file)."""
    files = (sys.modules[cls.__module__] for cls in type(module).__mro__)
    eager = next(f.eager_attention_forward for f in files if hasattr(f, "eager_attention_forward"))
    return eager(module, *args, **kwargs)


_REGISTERED = False


def register() -> None:
    """Register `longsum_sdpa` / `longsum_eager` with transformers' attention and mask interfaces."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for stock, ours in SHARED_IMPLEMENTATIONS.items():
        bases = (sdpa_attention_forward, few_rows_sdpa) if stock == "sdpa" else (_family_eager, few_rows_eager)
        AttentionInterface.register(ours, shared_kv_attention(*bases))
        AttentionMaskInterface.register(ours, ALL_MASK_ATTENTION_FUNCTIONS[stock])
    _REGISTERED = True


# -- what the installed transformers offers: features, never version numbers ---------------------
CACHE_KEYWORDS = ("cache", "past_key_values")  # transformers 5.24 renamed past_key_values to cache


def cache_keyword(model) -> str | None:
    """The keyword `model` takes its decoding cache under: the first forward in its class hierarchy that
    names one (LSG's own forwards pass `**kwargs` on to the stock ones), or None if none does."""
    for cls in type(model).__mro__:
        if "forward" in vars(cls):
            names = inspect.signature(vars(cls)["forward"]).parameters
            found = [name for name in CACHE_KEYWORDS if name in names]
            if found:
                return found[0]
    return None


@functools.cache
def _interfaces() -> str | None:
    """Why this transformers lacks what shared keys/values stand on (None: it has it all): the
    attention and mask interfaces, and an encoder-decoder cache whose parts and layers are reachable."""
    try:
        register()
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        cache.cross_attention_cache.update(torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1), 0)
        assert cache.cross_attention_cache.layers[0].keys.shape == (1, 1, 2, 1)
        assert isinstance(cache.is_updated, dict) and callable(cache.self_attention_cache.reorder_cache)
    except Exception as err:  # noqa: BLE001  any change is a reason to step aside
        return describe(err)
    return None


def _led_interface() -> str | None:
    """Why LED's stock decoder attention does not take what `SharedKVLEDDecoderAttention` passes it."""
    from transformers.models.led.modeling_led import LEDDecoderAttention

    names = list(inspect.signature(LEDDecoderAttention.forward).parameters)[1:6]
    expected = [["hidden_states", "key_value_states", keyword, "attention_mask", "output_attentions"]
                for keyword in CACHE_KEYWORDS]  # fmt: skip
    return None if names in expected else f"LEDDecoderAttention.forward takes ({', '.join(names)}, ...)"


# Families whose decoder attention does not reach shared keys/values through the attention interface:
# model type -> (the one-level subclass its modules run as while decoding, why the stock class changed).
# (Names looked up at each call, so that a test can stand in for a changed release.)
OWN_ATTENTION = {
    "led": (lambda: _led_attention_class(), lambda: _led_interface()),  # LED's attention predates the interface
    "t5gemma2": (lambda: _merged_attention_class(), lambda: _merged_interface()),  # merged self-/cross-attention
}
CROSS_ATTENTION_NAMES = ("encoder_attn", "EncDecAttention", "cross_attn")  # BART-style, T5-style, T5Gemma


def _cross_attention(model):
    """The first decoder cross-attention module (by its name), or the first module of a family's own
    (`OWN_ATTENTION`: T5Gemma 2's merged self- and cross-attention)."""
    own = OWN_ATTENTION.get(model.config.model_type)
    stock = own[0]().__base__ if own is not None else None
    for name, module in model.named_modules():
        if name.endswith(CROSS_ATTENTION_NAMES) or type(module) is stock:
            return module
    return None


def sharing(model) -> str | None:
    """Why `model` cannot share cross-attention keys/values between beams (None: it can)."""
    config = model.config
    if not config.is_encoder_decoder:
        return "not an encoder-decoder model"
    if config.model_type not in SHARED_KV_MODEL_TYPES:
        return f"{config.model_type} is not among the families checked for shared keys/values"
    cross = _cross_attention(model)
    if cross is None:
        return "no decoder cross-attention module found"
    if cache_keyword(model) is None:
        return f"{type(model).__name__}.forward takes neither of {', '.join(CACHE_KEYWORDS)}"
    if (missing := _interfaces()) is not None:
        return f"this transformers' attention or cache interface changed ({missing})"
    if config.model_type in OWN_ATTENTION:  # LED's predates the interface, T5Gemma 2's is merged: subclasses
        if (changed := OWN_ATTENTION[config.model_type][1]()) is not None:
            return changed
    # Older transformers releases (5.5) still compute T5/LongT5 attention by hand.
    elif not hasattr(sys.modules[type(cross).__module__], "ALL_ATTENTION_FUNCTIONS"):
        return f"this transformers version's {type(cross).__name__} does not use the attention interface"
    implementation = config._attn_implementation
    if implementation not in SHARED_IMPLEMENTATIONS and implementation not in SHARED_IMPLEMENTATIONS.values():
        return f"attention implementation {implementation!r} (shared keys/values need sdpa or eager)"
    return None


def _configs(model) -> Iterator:
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen:
            seen.add(id(config))
            yield config


@contextmanager
def shared_attention(model):
    """Run `model`'s attention through the shared-keys/values functions, restoring it after."""
    register()
    saved = [(config, config._attn_implementation) for config in _configs(model)]
    swapped = []
    if model.config.model_type in OWN_ATTENTION:
        shared_class = OWN_ATTENTION[model.config.model_type][0]()
        swapped = [m for m in model.modules() if type(m) is shared_class.__base__ and m.layer_idx is not None]
    try:
        for config, implementation in saved:
            config._attn_implementation = SHARED_IMPLEMENTATIONS.get(implementation, implementation)
        for module in swapped:
            module.__class__ = shared_class
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation = implementation
        for module in swapped:
            module.__class__ = shared_class.__base__


# -- logits on CPU ---------------------------------------------------------------------------------
# Output features per slice: at 1,024, bart-base's lm_head `[4, 768] x [768, 50,265]` takes 17.6 ms
# instead of 28.1 (16 rows: 28.6 vs 39.0 ms; 1 thread, AMD EPYC Zen 4, torch 2.13's MKL).
LOGITS_SLICE = 1024


class SlicedLogits(torch.nn.Linear):
    """The language-model head, computed in slices of `LOGITS_SLICE` output features on CPU.

    MKL multiplies the few rows of a decoding step (`[b*k, 1, d]`) by a vocabulary-sized weight
    `[V, d]` far below memory bandwidth; over 1,024-row slices of the weight it is 1.4-1.7x faster.
    Every logit is still one dot product over `d` by the same kernel, so the numbers are the same
    bits (checked in tests/test_decoding.py). One row (greedy, one document) keeps the stock product,
    which is faster there.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., V]
        if hidden.device.type != "cpu" or hidden[..., 0].numel() < 2 or self.out_features <= LOGITS_SLICE:
            return super().forward(hidden)
        weights = self.weight.split(LOGITS_SLICE)  # [V, d] -> views [<=LOGITS_SLICE, d]
        biases = self.bias.split(LOGITS_SLICE) if self.bias is not None else [None] * len(weights)
        return torch.cat([torch.nn.functional.linear(hidden, w, b) for w, b in zip(weights, biases)], dim=-1)


@contextmanager
def sliced_logits(model):
    """Compute `model`'s logits with `SlicedLogits` while decoding, restoring its head after."""
    head = model.get_output_embeddings()
    swap = type(head) is torch.nn.Linear
    try:
        if swap:
            head.__class__ = SlicedLogits
        yield
    finally:
        if swap:
            head.__class__ = torch.nn.Linear


# -- linear layers on CPU: oneDNN with prepacked weights ------------------------------------------
# Row count the weights are packed for (any count works): a decoding step's beams x documents.
PACK_ROWS = 16
# oneDNN multiplies 1-2 rows by a packed weight ~20% slower than 3-4 rows (AMD EPYC Zen 4, 1 thread,
# out of cache: lm_head 50,265x768 12.96/14.17 ms at 1/2 rows, 10.29/10.38 ms at 3/4; 3072x768
# 0.69/0.79 vs 0.56/0.54 ms), so fewer rows are padded with zeros. Greedy decoding of one document,
# medians of 6 alternated runs (noisy box): 1,024 tokens 38.4 -> 35.5 ms per step, 4,096: 55.1 -> 51.3.
MIN_ROWS = 3


def _packable(module: torch.nn.Module) -> bool:
    """A stock `nn.Linear` with a float32 CPU weight (torch's oneDNN kernels checked by `packing_fails`)."""
    return (
        type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32
    )


@functools.cache
def packing_fails() -> str | None:
    """Why this torch cannot run `PackedLinear` (None: it can), checked once on a small layer against
    `F.linear`: oneDNN's packing ops are private to torch and may change or vanish in a release."""
    try:
        if not torch.backends.mkldnn.is_available():
            return "torch was built without oneDNN"
        g = torch.Generator().manual_seed(0)
        layer = torch.nn.Linear(16, 24)
        rows = torch.randn(2, 16, generator=g)  # fewer than MIN_ROWS: the padded case too
        with torch.no_grad():
            expected = layer(rows)
            layer.packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), PACK_ROWS)
            layer.pad_to = MIN_ROWS
            got = PackedLinear.forward(layer, rows)
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            return "oneDNN's packed product differs from F.linear"
    except Exception as err:  # noqa: BLE001  any change is a reason to step aside
        return describe(err)
    return None


class PackedLinear(torch.nn.Linear):
    """A linear layer computed by oneDNN from a copy of its weight prepacked in oneDNN's blocked layout.

    torch runs `nn.Linear` on CPU through MKL, which multiplies the few rows of a decoding step
    (`[b*k, 1, d]`) far below memory bandwidth (and, on AMD, where CTranslate2 uses oneDNN instead,
    below oneDNN: 1.5-2.7x slower on bart-base's shapes at 4-16 rows, 1.1x at 4,096). The sums run
    in another order than MKL's, so outputs differ from the stock layer by rounding (~4e-6 relative).
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., d_out]
        rows = hidden.reshape(-1, hidden.shape[-1])  # [n, d_in]
        n = rows.shape[0]
        if n < self.pad_to:  # greedy decoding of one document: zero rows up to the faster kernel
            rows = torch.cat([rows, rows.new_zeros(self.pad_to - n, rows.shape[1])])  # [pad_to, d_in]
        out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), self.packed, self.bias, "none", [], "")
        return out[:n].view(*hidden.shape[:-1], -1)  # [n, d_out] -> [..., d_out]


def _sole_weights(model) -> set[int]:
    """ids of the parameters that nothing else in `model` shares (not tied, no other view of their storage)."""
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)] + list(model.buffers())
    users = Counter(t.untyped_storage().data_ptr() for t in tensors if t.numel())
    return {id(t) for t in tensors if t.numel() and users[t.untyped_storage().data_ptr()] == 1}


@contextmanager
def packed_linears(model, pad: bool = True):
    """Run every `nn.Linear` of `model` as a `PackedLinear` while decoding (those with float32 CPU weights).

    `pad`: fewer than `MIN_ROWS` rows are zero-padded to `MIN_ROWS` (faster on CPUs where oneDNN
    multiplies 1-2 rows slowly; `longsum.model.cpu` measures which).

    The packed copy replaces the weight while decoding: a weight that nothing else shares is emptied
    on entry and restored bit for bit from the packed copy on exit (`to_dense()`), so only tied
    weights (BART's lm_head is its embedding matrix: +154 MB at bart-base size) are held twice.
    On exit the modules' own classes are restored. Packing and restoring take ~0.2 s each for
    bart-base, against seconds of decoding per batch. Nested use packs nothing more (the layers
    are no longer stock `nn.Linear`s).
    """
    linears = [m for m in model.modules() if _packable(m)]
    if linears and (why := packing_fails()) is not None:
        step_aside("oneDNN packed linear layers", f"{why} (torch's own kernels)")
        linears = []
    sole, emptied = _sole_weights(model) if linears else set(), set()  # (nothing to pack: nested, GPU)
    try:
        try:
            for module in linears:
                module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), PACK_ROWS)
                module.pad_to = MIN_ROWS if pad else 0
                module.__class__ = PackedLinear
                if id(module.weight) in sole:
                    module.weight.data = module.weight.data.new_empty(0)  # the packed copy is the weight now
                    emptied.add(module)
        except Exception as err:  # noqa: BLE001  a layer the probe did not foresee: none is packed
            _unpack(linears, emptied)
            linears = []
            step_aside("oneDNN packed linear layers", f"{describe(err)} (torch's own kernels)")
        yield
    finally:
        _unpack(linears, emptied)


def _unpack(linears: list, emptied: set) -> None:
    """Undo `packed_linears` (also after a partial packing), layer by layer, so that one layer's two
    copies at most are held at once."""
    for module in linears:
        module.__class__ = torch.nn.Linear
        packed = module.__dict__.pop("packed", None)
        module.__dict__.pop("pad_to", None)
        if module in emptied:
            module.weight.data = packed.to_dense()  # exact: the same values, in torch's layout
        del packed


# id of the model whose kernels an enclosing `linear_kernels` chose: a run chooses once
# (`Summarizer.summarize`) and each batch's decoding call (`generate`) finds the choice made.
_CHOSEN = contextvars.ContextVar("longsum_kernels_chosen", default=None)


@contextmanager
def linear_kernels(model, exact: bool, rows: int = 1):
    """The CPU kernels to decode with, for steps of `rows` rows (documents x beams): torch's own
    (`exact`, or no float32 CPU linear layer), else what `longsum.model.cpu.kernel_choice` measured fastest
    on this CPU: torch's, `packed_linears(model)` (padded or not), and the few-rows cross-attention or
    SDPA's. An int8 model (`longsum.model.int8`) keeps its int8 layers (each runs the int8 kernel chosen
    for the rows it gets); the attention is chosen the same way. Inside a `linear_kernels` of the same
    model (a run's, around each batch's decoding) nothing is chosen again: the run's choice, for its
    full batches, also serves a smaller last batch (re-packing the layers for one batch costs more than
    it saves). `longsum -v` prints the choice and why, once per process."""
    from longsum.model.int8 import int8_layer

    if _CHOSEN.get() == id(model):
        yield
        return
    packable = any(_packable(m) for m in model.modules())
    int8 = int8_layer(model)
    if exact or not (packable or int8):
        yield
        return
    from longsum.console import detail
    from longsum.model.cpu import kernel_choice, row_class

    choice = kernel_choice(rows)
    detail(f"CPU kernels, {choice.describe(rows, int8.kernels[row_class(rows)] if int8 else None)}")
    pad = choice.linear == "packed-padded"
    use_packed = packable and choice.linear != "torch"  # (an int8 model's float head, if any)
    linears = packed_linears(model, pad=pad) if use_packed else contextlib.nullcontext()
    token = _CHOSEN.set(id(model))
    try:
        with linears, few_rows_attention(choice.few_rows):
            yield
    finally:
        _CHOSEN.reset(token)


# -- n-gram blocking -------------------------------------------------------------------------------
class NoRepeatNGram(LogitsProcessor):
    """Ban every token that would complete an n-gram already in the hypothesis (`no_repeat_ngram_size`).

    A token is banned after the last n-1 tokens when some earlier window of n tokens starts with
    those n-1 tokens: all windows `[H, L-n+1, n]` are compared with the suffix `[H, n-1]` at once,
    and each matching window bans its last token. Stock generate runs the n-gram processor before
    the forcing ones (forced BOS at the first step, forced EOS at the last), which overwrite every
    score; this one is appended after them, so it stands aside at those steps (`forced_steps`).
    """

    def __init__(self, n: int, forced_steps: tuple[int, ...] = ()):
        if n <= 0:
            raise ValueError(f"no_repeat_ngram_size must be positive, got {n}")
        self.n, self.forced_steps = n, forced_steps

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length, n = input_ids.shape[1], self.n
        if length < n or length in self.forced_steps:
            return scores
        windows = input_ids.unfold(1, n, 1)  # [H, L-n+1, n]
        suffix = input_ids[:, length - n + 1 :]  # [H, n-1]
        hits = (windows[:, :, :-1] == suffix.unsqueeze(1)).all(-1)  # [H, L-n+1]
        vocab = scores.shape[-1]
        # Windows that do not match (and ids past the scores) ban a spare column, dropped after.
        banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(hits, windows[:, :, -1].clamp(max=vocab), vocab), True)
        return scores.masked_fill(banned[:, :vocab], -float("inf"))


class BanEOSBelow(LogitsProcessor):
    """`min_length`/`min_new_tokens`: the end-of-sequence ids are banned while the decoder holds fewer
    than `length` tokens (its start token included, as transformers counts them).

    The stock processors (both run when `min_new_tokens` is set) rebuild an EOS mask with `isin` over
    the vocabulary and copy the scores at every step, even past the minimum. Stands aside where a
    forcing processor overwrites the scores (`forced_steps`), as `NoRepeatNGram` does.
    """

    def __init__(self, length: int, eos_token_ids: list[int], forced_steps: tuple[int, ...] = ()):
        self.length, self.eos, self.forced_steps = length, eos_token_ids, forced_steps

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        if length >= self.length or length in self.forced_steps:
            return scores
        scores = scores.clone()
        scores[:, [i for i in self.eos if 0 <= i < scores.shape[-1]]] = -float("inf")  # [H, V]
        return scores


def _fast_processors(model, kwargs: dict) -> list[LogitsProcessor]:
    """Our n-gram blocker and EOS ban in place of the stock processors, where they give the same scores.

    Ours run after every stock processor instead of in its place in the list, which changes nothing
    when the processors between only set scores to -inf or add to them (and the forcing ones are
    stood aside from); sampling warpers, renormalization or processors of your own could, so then
    the stock ones stay. `kwargs` is updated to switch the stock ones off.
    """
    config = model.generation_config

    def get(name):
        return kwargs[name] if name in kwargs else getattr(config, name, None)

    max_new = get("max_new_tokens")
    if (max_new is None or get("do_sample") or any(get(name) for name in ORDER_SENSITIVE)
            or "decoder_input_ids" in kwargs or kwargs.get("logits_processor")):  # fmt: skip
        return []
    forced = ()  # decoder lengths at which a forcing processor overwrites the scores
    if get("forced_bos_token_id") is not None:
        forced += (1,)
    if get("forced_eos_token_id") is not None:
        forced += (max_new,)  # length max_length - 1, max_length = 1 + max_new_tokens
    processors = []
    if n := get("no_repeat_ngram_size"):
        kwargs["no_repeat_ngram_size"] = 0
        processors.append(NoRepeatNGram(n, forced))
    # transformers: min_new_tokens, when set, wins over min_length (min_length = 1 + min_new_tokens).
    min_new, eos = get("min_new_tokens"), get("eos_token_id")
    shortest = 1 + min_new if min_new is not None else get("min_length") or 0
    if shortest <= 1 or eos is not None:  # (below 2, the stock processors ban nothing)
        kwargs.update(min_length=0, min_new_tokens=None)
        if shortest > 1:
            processors.append(BanEOSBelow(shortest, torch.as_tensor(eos).flatten().tolist(), forced))
    return processors


# -- generate ----------------------------------------------------------------------------------------
# Models whose fast decoding failed where stock generate() did not: stock generate for them from then on.
_STOCK_ONLY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, exact: bool = False,
             compile: bool = False, **kwargs) -> torch.Tensor:  # fmt: skip
    """`model.generate(input_ids, attention_mask=attention_mask, **kwargs)`, faster.

    input_ids/attention_mask: `[b, s]` (right-padded batch). Returns `[b * num_return_sequences, L]`
    like `model.generate`. See the module docstring for what changes. On CPU (float32) the linear
    layers run through oneDNN (`packed_linears`), which rounds differently from torch's MKL: the
    ids can then differ from stock generate's where two candidates tie to ~1e-6. `exact=True`
    keeps torch's kernels, for stock generate's ids. `compile=True` runs each decoding step through
    `torch.compile` (`compiled_generate`: CUDA graphs on a GPU); where it cannot, it steps aside to
    the eager path with one stderr line.

    The changes are optimisations: if they fail where stock generate() succeeds (a transformers
    release that changed an interface they stand on), the stock ids are returned, one stderr line
    says why, and this model decodes with stock generate() from then on. An error that stock
    generate() raises too (a bad input) is raised as stock raises it.
    """
    failure = None
    if model not in _STOCK_ONLY:
        try:
            if compile and (ids := compiled_generate(model, input_ids, attention_mask, **kwargs)) is not None:
                return ids
            # (a packed head is not sliced: it is no longer an nn.Linear)
            token = _EXACT.set(exact)
            rows = input_ids.shape[0] * (kwargs.get("num_beams", model.generation_config.num_beams) or 1)
            try:
                with linear_kernels(model, exact, rows), sliced_logits(model):
                    return _generate(model, input_ids, attention_mask, **kwargs)
            finally:
                _EXACT.reset(token)
        except torch.OutOfMemoryError:
            raise  # the caller halves the batch
        except Exception as err:  # noqa: BLE001  retried below with stock generate
            failure = describe(err)
    ids = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if failure is not None:
        _STOCK_ONLY[model] = failure
        step_aside("fast decoding", f"{failure} (stock generate() for the rest of this run)")
    return ids


def _static_cache_length(model, kwargs: dict) -> int:
    """The self-attention slots stock generate() gives a static cache: its max_length - 1 (the last
    token is never fed back), max_length being 1 + max_new_tokens for an encoder-decoder."""
    config = model.generation_config
    max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
    return max_new if max_new is not None else kwargs.get("max_length", config.max_length) - 1


def _tensor_arguments(kwargs: dict) -> list[str]:
    """generate() keywords holding tensors (e.g. LED's global attention mask): batch-shaped inputs that the
    shared-keys/values paths do not expand per beam, so those paths stand aside for them."""
    return [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]


def _generate(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    kwargs = dict(kwargs)
    fast = _fast_processors(model, kwargs)
    processors = LogitsProcessorList((kwargs.pop("logits_processor", None) or []) + fast)
    beams = kwargs.get("num_beams", model.generation_config.num_beams) or 1
    # A cache made here is passed as the caller's own, so generate() must not also be asked to make one.
    implementation = kwargs.pop("cache_implementation", model.generation_config.cache_implementation)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    extras = _tensor_arguments(kwargs)
    why = None if beams == 1 or extras else sharing(model)
    if why is not None and model.config.model_type in SHARED_KV_MODEL_TYPES:  # shares on the releases we test
        step_aside("shared cross-attention keys/values", why)
    keyword = cache_keyword(model) or "past_key_values"
    if beams == 1 or extras or why is not None or implementation not in (None, "dynamic", "static"):
        # Stock layout; with beams, a cache that leaves the cross-attention part alone when reordering.
        own = (
            {keyword: BeamCache(self_attention_cache(model))}
            if beams > 1 and implementation in (None, "dynamic")
            else {}
        )
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors,
                              cache_implementation=None if own else implementation, **own, **kwargs)  # fmt: skip
    caches = _static_caches if implementation == "static" else _dynamic_caches
    return _shared_generate(model, input_ids, attention_mask, processors, keyword, caches, kwargs)


def _shared_generate(model, input_ids, attention_mask, processors, keyword, caches, kwargs,
                     steps=contextlib.nullcontext) -> torch.Tensor:  # fmt: skip
    """generate() with the cross-attention keys/values filled once per document and shared by the beams.

    `caches(model, cross, beams, kwargs)` returns the `BeamCache` to decode with, around `cross` (the
    filled cross-attention `DynamicCache`, `[b, h, s, d]` a layer): `_dynamic_caches`, `_static_caches`,
    or a `CompiledDecoder`'s fixed buffers. The decoding steps (not the encoder, nor the step that
    fills the cross-attention cache) run inside `steps(model)`: a `CompiledDecoder` swaps the forward there.
    """
    beams = kwargs.get("num_beams", model.generation_config.num_beams) or 1
    with shared_attention(model):
        encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        hidden = encoder_outputs.last_hidden_state  # [b, s, d]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        # One decoder step on the unexpanded batch fills every layer's cross-attention cache
        # ([b, h, s, d] keys and values); its token and self-attention state are discarded.
        start = torch.zeros(hidden.shape[0], 1, dtype=torch.long, device=hidden.device)
        model(encoder_outputs=encoder_outputs, attention_mask=attention_mask, decoder_input_ids=start,
              use_cache=True, **{keyword: cache})  # fmt: skip
        shared = caches(model, cache.cross_attention_cache, beams, kwargs)
        for layer in range(len(cache.cross_attention_cache)):
            shared.is_updated[layer] = True
        stand_in = BaseModelOutput(last_hidden_state=hidden.new_empty(*hidden.shape[:2], 0))  # [b, s, 0]
        del encoder_outputs, hidden, cache
        with steps(model):
            return model.generate(encoder_outputs=stand_in, attention_mask=attention_mask,
                                  logits_processor=processors, cache_implementation=None, **{keyword: shared},
                                  **kwargs)  # fmt: skip


def _dynamic_caches(model, cross, beams: int, kwargs: dict) -> BeamCache:
    """The beams' self-attention grown step by step (stock generate's default)."""
    return BeamCache(self_attention_cache(model), cross)


def _static_caches(model, cross, beams: int, kwargs: dict) -> BeamCache:
    """The beams' self-attention preallocated (`cache_implementation="static"`), as stock would, reordered in place."""
    length = _static_cache_length(model, kwargs)
    return StaticBeamCache(StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=length), cross)


class StaticBeamCache(BeamCache):
    """A `BeamCache` whose self-attention part is a `StaticCache` reordered in place.

    transformers' static layers reorder by rebinding their keys/values to `index_select`'s new
    tensors; a CUDA graph replays the addresses it captured, so here the reordered rows are copied
    back into the same tensors (`reorder_in_place`). Layers not yet filled are left alone.
    """

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.self_attention_cache.layers:
            if layer.is_initialized:
                reorder_in_place(layer.keys, beam_idx)
                reorder_in_place(layer.values, beam_idx)


def reorder_in_place(x: torch.Tensor, beam_idx: torch.LongTensor) -> None:
    """`x = x.index_select(0, beam_idx)`, written into `x`'s own memory (`[b*k, ...]`, beam_idx `[b*k]`).

    (index_select into its own input is not allowed: beams read and written overlap, hence the temporary.)
    """
    x.copy_(x.index_select(0, beam_idx.to(x.device)))


# -- compiled decoding steps -----------------------------------------------------------------------
# Shapes a compiled step is specialised to: None lets dynamo compile the first shapes statically and,
# when a later call changes one (a batch's source length, a smaller last batch), recompile once with
# that size symbolic; False would recompile for every new source length.
DYNAMIC = None


def compile_mode(device: torch.device) -> str:
    """torch.compile's mode for decoding steps on `device`: CUDA graphs on a GPU, where a step's few
    hundred kernel launches cost more than its reads; inductor's kernels alone elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def compiling_fails(model, kwargs: dict) -> str | None:
    """Why `model`'s decoding steps cannot be compiled with these generate() settings (None: they can)."""
    implementation = kwargs.get("cache_implementation", model.generation_config.cache_implementation)
    if (why := sharing(model)) is not None:
        return f"cross-attention keys/values are not shared ({why})"
    if implementation not in (None, "dynamic", "static"):
        return f"cache_implementation={implementation!r} (compiled steps decode with a static cache)"
    if extras := _tensor_arguments(kwargs):
        return f"tensor arguments {', '.join(extras)}"
    device = model.device
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "triton is not installed"
    if device.type == "cpu":
        from torch._inductor import config as inductor

        compiler = inductor.cpp.cxx[-1]
        return None if shutil.which(compiler) else f"no C++ compiler ({compiler}) for inductor"
    return None


class CompiledDecoder:
    """One model's compiled forward for decoding steps, and the fixed buffers its graphs read.

    Made once per model and mode (`_COMPILED`) and reused across calls and documents. A step reads
    the shared cross-attention keys/values and the beams' static self-attention cache; CUDA graphs
    replay the addresses they captured, so both live in buffers kept from call to call (the last
    call's shapes: a batch of other shapes replaces them) and marked static for dynamo. A new
    document's cross-attention keys/values are copied into them, the self-attention cache is zeroed.
    """

    def __init__(self, model, mode: str):
        self.mode = mode
        # The class's function, bound at each call: this object must not hold the model (a weak key).
        self.forward = torch.compile(type(model).forward, mode=mode, dynamic=DYNAMIC, fullgraph=True)
        self.shapes, self.cross, self.own = None, None, None

    def caches(self, model, cross: DynamicCache, beams: int, kwargs: dict) -> StaticBeamCache:
        keys = cross.layers[0].keys  # [b, h, s, d]
        length = _static_cache_length(model, kwargs)
        shapes = ([(layer.keys.shape, layer.values.shape) for layer in cross.layers], beams, length, keys.dtype,
                  keys.device)  # fmt: skip
        if shapes == self.shapes:
            for mine, new in zip(self.cross.layers, cross.layers):
                mine.keys.copy_(new.keys)
                mine.values.copy_(new.values)
            self.own.reset()
            return StaticBeamCache(self.own, self.cross)
        self.shapes, self.cross, self.own = None, None, None  # (the old buffers go before the new are made)
        for layer in cross.layers:
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)
        b, h, _, d = keys.shape
        own = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=length)
        # Allocated (and marked static) here rather than lazily inside the first compiled step.
        own.early_initialization(b * beams, h, d, keys.dtype, keys.device)
        self.shapes, self.cross, self.own = shapes, cross, own
        return StaticBeamCache(own, cross)

    @contextmanager
    def steps(self, model):
        """Decoding steps through the compiled forward (an instance attribute, which nn.Module calls)."""
        saved = vars(model).get("forward")
        model.forward = functools.partial(self.forward, model)
        try:
            yield
        finally:
            if saved is None:
                del model.forward
            else:
                model.forward = saved


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> CompiledDecoder
_UNCOMPILABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> why compiling failed


def compiled_generate(model, input_ids, attention_mask=None, **kwargs) -> torch.Tensor | None:
    """`_generate`'s ids with each decoding step run by a compiled forward (`CompiledDecoder`), or None
    where the steps cannot be compiled (one stderr line says why; the caller decodes eagerly).

    Decodes with shared cross-attention keys/values and a static self-attention cache (beams or not),
    torch's own kernels (inductor chooses its own: the rounding, not the search, can differ from
    eager) and the fast logits processors. A failure while compiling or decoding (a graph break,
    an op inductor lacks) marks the model uncompilable for the rest of the run.
    """
    why = _UNCOMPILABLE.get(model) or compiling_fails(model, kwargs)
    if why is not None:
        step_aside("compiled decoding", f"{why} (eager decoding)")
        return None
    kwargs = dict(kwargs, disable_compile=True)  # transformers' own auto-compile (static cache, GPU) would nest
    kwargs.pop("cache_implementation", None)
    processors = LogitsProcessorList((kwargs.pop("logits_processor", None) or []) + _fast_processors(model, kwargs))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keyword = cache_keyword(model) or "past_key_values"
    try:
        mode = compile_mode(model.device)
        decoder = _COMPILED.get(model)
        if decoder is None or decoder.mode != mode:
            decoder = _COMPILED[model] = CompiledDecoder(model, mode)
        return _shared_generate(model, input_ids, attention_mask, processors, keyword, decoder.caches, kwargs,
                                decoder.steps)  # fmt: skip
    except torch.OutOfMemoryError:
        raise  # the caller halves the batch
    except Exception as err:  # noqa: BLE001  decoded eagerly by the caller
        _COMPILED.pop(model, None)
        why = _UNCOMPILABLE[model] = describe(err)
        step_aside("compiled decoding", f"{why} (eager decoding)")
        return None
