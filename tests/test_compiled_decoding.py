"""decoding.generate(..., compile=True): compiled decoding steps give stock generate's ids, compile once
per model, keep every address a CUDA graph captures, and step aside when they cannot compile.

Dynamo's tracing takes seconds a model on a slow CPU, inductor's C++ tens of seconds: the structural
tests compile with the `eager` backend (dynamo's graph, guards and recompilations, run by torch's
own kernels); one test compiles with inductor (`aot_eager` at 2 layers takes no longer: tracing
dominates), on a one-layer model.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters

from longsum.model import decoding
from tests.conftest import input_dependent
from tests.test_decoding import DIMS, SETTINGS, batch, build


@pytest.fixture
def dynamo(monkeypatch):
    """A fresh dynamo (caches, counters) and fresh step-aside lines; the `eager` backend unless a test asks."""
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(decoding, "_TOLD", set())
    real = torch.compile

    def backend(name):  # the options decoding chose (fullgraph, dynamic) with another backend
        monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: real(fn, backend=name, **kw))

    backend("eager")
    yield backend
    torch._dynamo.reset()


def _asides(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "steps aside" in line]


def _decode(model, ids, mask, seen=None, **kwargs):
    """Stock generate's ids (torch's kernels) and compiled decoding's; `seen` collects each step's cache."""

    def spy(module, args, kw):
        cache = next((kw[name] for name in decoding.CACHE_KEYWORDS if kw.get(name) is not None), None)
        if isinstance(cache, decoding.StaticBeamCache):
            seen.append([(layer.keys, layer.values) for part in (cache.self_attention_cache, cache.cross_attention_cache)
                         for layer in part.layers])  # fmt: skip

    handle = model.register_forward_pre_hook(spy, with_kwargs=True) if seen is not None else None
    try:
        with torch.inference_mode():
            stock = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            ours = decoding.generate(model, ids, mask, exact=True, compile=True, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    return stock, ours


def _addresses(step) -> list[int]:
    return [t.data_ptr() for pair in step for t in pair]


@pytest.mark.parametrize(("family", "setting"), [("bart", "beams4"), ("bart", "greedy"), ("t5", "beams4"),
                                                 ("lsg_bart", "beams4")])  # fmt: skip
def test_compiled_steps_give_stock_ids_once_compiled(family, setting, dynamo, capsys):
    """Stock ids for a padded batch, one graph without breaks, and a second batch of other documents
    (same shapes) decoded by the same graph from the same buffers (marked static for CUDA graphs)."""
    model = build(family)
    if decoding.compiling_fails(model, {}) is not None:
        pytest.skip(decoding.compiling_fails(model, {}))
    seen: list = []
    for seed in (0, 1):
        ids, mask = batch(model, seed=seed)
        stock, ours = _decode(model, ids, mask, seen, **SETTINGS[setting])
        assert len({tuple(row) for row in stock.tolist()}) > 1 and ours.tolist() == stock.tolist(), seed
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], seed
        steps = len(seen)
    assert _asides(capsys) == [] and model not in decoding._UNCOMPILABLE
    # Every step of both calls read and wrote the same tensors: a replayed CUDA graph's addresses.
    assert steps > 12 and all(_addresses(step) == _addresses(seen[0]) for step in seen)
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in seen[0][-1])  # cross-attention K/V
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in seen[0][0])  # self-attention cache
    assert seen[0][-1][0].shape[0] == 3  # one copy of the keys per document, beams or not
    assert "forward" not in vars(model)  # the compiled forward is swapped in only while decoding


def _one_layer_bart():
    """The tiniest model (compiling takes time in proportion to the layers traced)."""
    torch.manual_seed(0)
    config = tf.BartConfig(**{**DIMS, "encoder_layers": 1, "decoder_layers": 1}, max_position_embeddings=128)
    return input_dependent(tf.BartForConditionalGeneration(config).eval())


def test_inductor_compiled_steps_give_stock_ids_without_recompiling(dynamo, capsys):
    """The real thing on CPU (inductor, `compile_mode`'s "default"), on the tiniest model: stock ids, and
    a second call reuses the compiled code."""
    model = _one_layer_bart()
    if (why := decoding.compiling_fails(model, {})) is not None:
        pytest.skip(why)
    dynamo("inductor")
    for seed in (0, 1):
        ids, mask = batch(model, seed=seed)
        stock, ours = _decode(model, ids, mask, **SETTINGS["beams4"])
        assert len({tuple(row) for row in stock.tolist()}) > 1 and ours.tolist() == stock.tolist(), seed
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], seed
    assert _asides(capsys) == [] and decoding._COMPILED[model].mode == "default"


def test_other_source_lengths_reuse_one_dynamic_graph(dynamo):
    """A batch of other lengths compiles once more (its sizes symbolic), then no more: not a graph per batch."""
    model = _one_layer_bart()
    for lengths, graphs in [((57, 40, 23), 1), ((50, 30, 20), 2), ((64, 12, 33), 2)]:
        ids, mask = batch(model, lengths)
        stock, ours = _decode(model, ids, mask, **SETTINGS["beams4"])
        assert ours.tolist() == stock.tolist(), lengths
        assert counters["stats"]["unique_graphs"] == graphs, lengths


def _static_cache(rows: int, length: int = 6) -> decoding.StaticBeamCache:
    config = tf.BartConfig(**DIMS)
    own = tf.StaticCache(config=config, max_cache_len=length)
    own.early_initialization(rows, 4, 8, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for layer in own.layers:
        layer.keys.copy_(torch.randn(layer.keys.shape, generator=g))
        layer.values.copy_(torch.randn(layer.values.shape, generator=g))
    return decoding.StaticBeamCache(own, tf.DynamicCache())


def test_in_place_reorder_is_index_select_at_fixed_addresses():
    cache = _static_cache(rows=8)  # 2 documents x 4 beams
    layers = cache.self_attention_cache.layers
    addresses = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in layers]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        # Beams are picked within their document, with repeats (the overlap an in-place gather must survive).
        beam_idx = torch.cat([torch.randint(0, 4, (4,), generator=g), torch.randint(4, 8, (4,), generator=g)])
        want = [(layer.keys.index_select(0, beam_idx), layer.values.index_select(0, beam_idx)) for layer in layers]
        cache.reorder_cache(beam_idx)
        assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in layers] == addresses
        assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v) for layer, (k, v) in zip(layers, want))


@pytest.mark.parametrize("failure", ["compile raises", "graph break"])
def test_compiling_that_fails_steps_aside_with_one_line(failure, dynamo, monkeypatch, capsys):
    model = _one_layer_bart()
    if failure == "compile raises":

        def broken(*args, **kwargs):
            raise RuntimeError("no compiler for this platform")

        monkeypatch.setattr(torch, "compile", broken)
    else:  # fullgraph: a break anywhere in the step is an error, never a split graph
        model.model.decoder.layers[0].register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    for seed, told in ((0, 1), (1, 0)):  # the line comes with the first batch; the second has none
        ids, mask = batch(model, seed=seed)
        stock, ours = _decode(model, ids, mask, **SETTINGS["beams4"])
        assert ours.tolist() == stock.tolist()
        lines = _asides(capsys)
        assert len(lines) == told and all(line.startswith("compiled decoding steps aside") for line in lines)
        assert all("(eager decoding)" in line for line in lines)
    assert model in decoding._UNCOMPILABLE and model not in decoding._STOCK_ONLY and "forward" not in vars(model)


def test_led_decodes_with_stock_ids_compiled_or_not(dynamo):
    """LED's own shared-keys/values attention subclass: compiled if dynamo can, else stepped aside."""
    model = build("led")
    ids, mask = batch(model)
    stock, ours = _decode(model, ids, mask, **SETTINGS["beams4"])
    assert ours.tolist() == stock.tolist() and (model in decoding._UNCOMPILABLE) != (model in decoding._COMPILED)


def test_compiling_fails_says_why_before_compiling(monkeypatch):
    model = build("bart")
    assert decoding.compiling_fails(model, dict(num_beams=4, cache_implementation="static")) is None
    assert "cache_implementation='offloaded'" in decoding.compiling_fails(model, dict(cache_implementation="offloaded"))
    assert "global_attention_mask" in decoding.compiling_fails(model, dict(global_attention_mask=torch.ones(1, 3)))
    model.config._attn_implementation = "flex_attention"
    assert "not shared" in decoding.compiling_fails(model, {})
    model.config._attn_implementation = "sdpa"
    monkeypatch.setattr(decoding.shutil, "which", lambda name: None)
    assert "no C++ compiler" in decoding.compiling_fails(model, {})
    assert decoding.compile_mode(torch.device("cuda")) == "reduce-overhead"
    assert decoding.compile_mode(torch.device("cpu")) == "default"
