"""longsum.model.decoding.generate gives exactly stock `model.generate`'s ids, for every encoder-decoder family."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import NoRepeatNGramLogitsProcessor

from longsum.model import decoding
from tests import helpers
from tests.conftest import input_dependent
from tests.helpers import cross_caches, padded_batch, stock_and_ours

DIMS = dict(vocab_size=300, **helpers.BART_DIMS, **helpers.NO_DROPOUT, **helpers.BART_TOKENS)
T5_DIMS = dict(vocab_size=300, **helpers.T5_DIMS, dropout_rate=0.0, **helpers.T5_OWN_TOKENS)


def _lsg(name):
    from longsum.model import lsg

    config = getattr(lsg, f"LSG{name}Config")(**DIMS, max_position_embeddings=128, block_size=8, sparse_block_size=8)
    return getattr(lsg, f"LSG{name}ForConditionalGeneration")(config)


FAMILIES = {
    "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(**DIMS, max_position_embeddings=128,
                                                                  forced_eos_token_id=2)),
    "mbart": lambda: tf.MBartForConditionalGeneration(tf.MBartConfig(**DIMS, max_position_embeddings=128,
                                                                     forced_bos_token_id=7)),
    "pegasus": lambda: tf.PegasusForConditionalGeneration(tf.PegasusConfig(**DIMS, max_position_embeddings=128)),
    "lsg_bart": lambda: _lsg("Bart"),
    "lsg_mbart": lambda: _lsg("MBart"),
    "lsg_pegasus": lambda: _lsg("Pegasus"),
    "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(**T5_DIMS)),
    "longt5_local": lambda: tf.LongT5ForConditionalGeneration(tf.LongT5Config(**T5_DIMS, local_radius=4,
                                                                             encoder_attention_type="local")),
    "longt5_tglobal": lambda: tf.LongT5ForConditionalGeneration(
        tf.LongT5Config(**T5_DIMS, local_radius=4, global_block_size=4, encoder_attention_type="transient-global")),
    "led": lambda: tf.LEDForConditionalGeneration(tf.LEDConfig(**DIMS, attention_window=8,
                                                               max_encoder_position_embeddings=128,
                                                               max_decoder_position_embeddings=64)),
    "pegasus_x": lambda: tf.PegasusXForConditionalGeneration(tf.PegasusXConfig(
        **DIMS, max_position_embeddings=128, num_global_tokens=4, block_size=8)),
    "bigbird_pegasus": lambda: tf.BigBirdPegasusForConditionalGeneration(tf.BigBirdPegasusConfig(
        **DIMS, max_position_embeddings=128, attention_type="block_sparse", block_size=4, num_random_blocks=2)),
}  # fmt: skip


T5_FAMILIES = ("t5", "longt5_local", "longt5_tglobal")


def build(family: str, seed: int = 0):
    """A tiny model whose outputs depend on its input (default inits give near-constant outputs)."""
    torch.manual_seed(seed)
    return input_dependent(FAMILIES[family]().eval())


def batch(model, lengths=(57, 40, 23), seed: int = 0):
    return padded_batch(model, lengths, seed, bos=False)


SETTINGS = {
    "greedy": dict(num_beams=1, max_new_tokens=12, no_repeat_ngram_size=3),
    "beams4": dict(num_beams=4, max_new_tokens=12, min_new_tokens=6, no_repeat_ngram_size=3, length_penalty=2.0),
}


@pytest.mark.parametrize("exact", [False, True], ids=["packed", "exact"])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_same_ids_as_stock_generate(family, setting, exact):
    """Both CPU paths: oneDNN's packed linears (the default; ids may differ in ~1e-6 near-ties, which
    these models do not have) and torch's own kernels (`exact`)."""
    model = build(family)
    ids, mask = batch(model)
    stock, ours = stock_and_ours(model, ids, mask, exact=exact, **SETTINGS[setting])
    assert stock.shape[0] == 3 and len({tuple(row) for row in stock.tolist()}) > 1  # input-dependent outputs
    assert ours.tolist() == stock.tolist()
    # Every family shares cross-attention keys/values; T5's attention used the interface only after 5.5.
    assert decoding.sharing(model) is None or family in T5_FAMILIES
    assert model.config._attn_implementation in ("sdpa", "eager")  # restored after decoding


@pytest.mark.parametrize("family", FAMILIES)
def test_same_ids_as_stock_generate_in_bfloat16(family):
    """bf16 (what a GPU runs): the shared keys/values, masks and biases keep the model's dtype."""
    model = build(family).to(torch.bfloat16)
    ids, mask = batch(model)
    stock, ours = stock_and_ours(model, ids, mask, **SETTINGS["beams4"])
    assert len({tuple(row) for row in stock.tolist()}) > 1 and ours.tolist() == stock.tolist()


@pytest.mark.parametrize("family", ["bart", "t5", "led"])
def test_same_ids_with_early_stopping_and_several_returned_sequences(family):
    model = build(family, seed=3)
    ids, mask = batch(model, (30, 12), seed=3)
    kwargs = dict(num_beams=5, num_return_sequences=2, max_new_tokens=10, no_repeat_ngram_size=2, early_stopping=True)
    stock, ours = stock_and_ours(model, ids, mask, **kwargs)
    assert ours.shape[0] == 4 and ours.tolist() == stock.tolist()


@pytest.mark.parametrize("family", ["bart", "lsg_bart", "longt5_tglobal", "led"])
def test_cross_attention_cache_holds_one_copy_per_document(family):
    model = build(family)
    if family in T5_FAMILIES and decoding.sharing(model) is not None:
        pytest.skip(decoding.sharing(model))
    ids, mask = batch(model)
    kwargs = dict(num_beams=4, max_new_tokens=5)
    # the cache each decoded with (the last step's)
    stock = cross_caches(model, lambda i, m, **kw: model.generate(input_ids=i, attention_mask=m, **kw), ids, mask,
                         **kwargs)[-1]  # fmt: skip
    ours = cross_caches(model, lambda i, m, **kw: decoding.generate(model, i, m, **kw), ids, mask, **kwargs)[-1]
    for layer in range(model.config.decoder_layers if hasattr(model.config, "decoder_layers") else 2):
        assert stock.layers[layer].keys.shape[0] == 12  # 3 documents x 4 beams
        assert ours.layers[layer].keys.shape[0] == ours.layers[layer].values.shape[0] == 3
        assert ours.layers[layer].keys.shape[1:] == stock.layers[layer].keys.shape[1:]


def test_self_only_reorder_cache_gives_identical_beams():
    model = build("bart", seed=5)
    ids, mask = batch(model)
    kwargs = dict(num_beams=4, max_new_tokens=12, min_new_tokens=12)
    with torch.inference_mode():
        stock = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        own = {decoding.cache_keyword(model): decoding.BeamCache()}
        ours = model.generate(input_ids=ids, attention_mask=mask, **own, **kwargs)
    assert torch.equal(stock, ours)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_blocker_bans_what_transformers_bans(n):
    g = torch.Generator().manual_seed(n)
    ours, stock = decoding.NoRepeatNGram(n), NoRepeatNGramLogitsProcessor(n)
    for length in range(1, 24):
        ids = torch.randint(0, 6, (8, length), generator=g)  # a small vocabulary: many repeats
        scores = torch.randn(8, 11, generator=g)
        assert torch.equal(ours(ids, scores.clone()), stock(ids, scores.clone())), length


def test_ngram_blocker_stands_aside_where_a_forcing_processor_overwrites_scores():
    ids = torch.tensor([[5, 6, 5]])
    scores = torch.zeros(1, 10)
    assert torch.isinf(decoding.NoRepeatNGram(2)(ids, scores.clone())[0, 6])
    assert not torch.isinf(decoding.NoRepeatNGram(2, forced_steps=(3,))(ids, scores.clone())).any()


@pytest.mark.parametrize("bias", [False, True])
def test_sliced_logits_are_the_same_bits_as_the_stock_head(bias):
    torch.manual_seed(0)
    stock = torch.nn.Linear(96, 2 * decoding.LOGITS_SLICE + 37, bias=bias)  # two full slices and a partial one
    sliced = torch.nn.Linear(96, stock.out_features, bias=bias)
    sliced.load_state_dict(stock.state_dict())
    sliced.__class__ = decoding.SlicedLogits
    for rows in (1, 2, 4, 12, 16, 40):
        hidden = torch.randn(rows, 1, 96)  # [b*k, 1, d]: one decoding step
        assert torch.equal(sliced(hidden), stock(hidden)), rows


def test_same_ids_with_a_vocabulary_over_several_logit_slices():
    vocab = 2 * decoding.LOGITS_SLICE + 300
    torch.manual_seed(2)
    model = input_dependent(tf.BartForConditionalGeneration(tf.BartConfig(**{**DIMS, "vocab_size": vocab},
                                                                          max_position_embeddings=128)).eval())  # fmt: skip
    ids, mask = batch(model, seed=2)
    for kwargs in (SETTINGS["beams4"], SETTINGS["greedy"]):
        stock, ours = stock_and_ours(model, ids, mask, exact=True, **kwargs)  # (packed linears replace the slices)
        assert ours.tolist() == stock.tolist()
    assert type(model.lm_head) is torch.nn.Linear  # restored after decoding


def _masks(b, h, r, s):
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(b, 1, 1, s, generator=g) > 0.3
    keep[..., 0] = True  # every row attends to something
    additive = torch.zeros(b, 1, 1, s).masked_fill(~keep, torch.finfo(torch.float32).min)
    bias = torch.randn(1, h, r, s, generator=g)
    return {"none": {}, "bool": dict(attention_mask=keep), "additive": dict(attention_mask=additive),
            "t5_bias": dict(attention_mask=keep, position_bias=bias, scaling=1.0)}  # fmt: skip


@pytest.mark.parametrize("mask", ["none", "bool", "additive", "t5_bias"])
def test_few_rows_attention_matches_transformers_sdpa(mask):
    import inspect

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if mask == "t5_bias" and "position_bias" not in inspect.signature(sdpa_attention_forward).parameters:
        pytest.skip("this transformers' SDPA function takes no T5 position bias (its T5 attention predates it)")
    b, h, r, s, d = 3, 4, 4, 300, 16
    g = torch.Generator().manual_seed(0)
    query = torch.randn(b, r, h, d, generator=g).transpose(1, 2)  # [b, h, r, d], laid out as projections give it
    key, value = torch.randn(2, b, h, s, d, generator=g)
    kwargs = _masks(b, h, r, s)[mask]
    module = torch.nn.Module()
    module.is_causal = False
    want, _ = sdpa_attention_forward(module, query, key, value, kwargs.pop("attention_mask", None),
                                     scaling=kwargs.get("scaling"), position_bias=kwargs.get("position_bias"))  # fmt: skip
    keep = _masks(b, h, r, s)[mask].get("attention_mask")
    got, weights = decoding.few_rows_sdpa(module, query, key, value, keep, **kwargs)
    eager, probs = decoding.few_rows_eager(module, query, key, value, keep, **kwargs)
    assert torch.equal(eager, got) and probs.shape == (b, h, r, s)
    assert weights is None and got.shape == want.shape == (b, r, h, d)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["bart", "lsg_bart", "t5", "longt5_tglobal", "led", "pegasus_x", "bigbird_pegasus"])
def test_same_ids_with_few_rows_cross_attention(family, monkeypatch):
    """The CPU few-rows cross-attention (used for long inputs) keeps stock generate's ids."""
    used = []

    def wins(query, key, kwargs):
        used.append(query.shape[2] <= decoding.FEW_ROWS)
        return used[-1]

    monkeypatch.setattr(decoding, "_few_rows_wins", wins)  # every size: tiny models' keys are small
    model = build(family)
    if family in T5_FAMILIES and decoding.sharing(model) is not None:
        pytest.skip(decoding.sharing(model))  # T5's attention used the interface only after 5.5
    ids, mask = batch(model)
    stock, ours = stock_and_ours(model, ids, mask, **SETTINGS["beams4"])
    assert any(used) and ours.tolist() == stock.tolist()


@pytest.mark.parametrize("family", ["bart", "mbart", "t5"])
@pytest.mark.parametrize("lengths", [dict(min_new_tokens=12, max_new_tokens=12), dict(min_length=9, max_new_tokens=12),
                                     dict(min_new_tokens=0, min_length=30, max_new_tokens=12)])  # fmt: skip
def test_same_ids_with_minimum_lengths(family, lengths):
    """The fast EOS ban (minimum equal to the maximum meets forced EOS; mBART's forced BOS) keeps stock ids."""
    model = build(family)
    model.generation_config.min_length = 5  # a checkpoint's own minimum, which min_new_tokens overrides
    if family != "t5":  # pull towards EOS, so that the summaries end as soon as they may
        model.final_logits_bias[..., model.config.eos_token_id] += 10.0
    ids, mask = batch(model)
    for beams in (1, 4):
        stock, ours = stock_and_ours(model, ids, mask, num_beams=beams, no_repeat_ngram_size=3, **lengths)
        assert ours.tolist() == stock.tolist()


def test_eos_ban_replaces_the_stock_processors_and_stands_aside_when_forced():
    model = build("bart")
    kwargs = dict(max_new_tokens=12, min_new_tokens=4, no_repeat_ngram_size=3)
    fast = decoding._fast_processors(model, kwargs)
    assert [type(p).__name__ for p in fast] == ["NoRepeatNGram", "BanEOSBelow"]
    assert kwargs["min_new_tokens"] is None and kwargs["min_length"] == 0 and kwargs["no_repeat_ngram_size"] == 0
    ban = fast[1]
    scores = torch.zeros(2, 10)
    assert torch.isinf(ban(torch.zeros(2, 4, dtype=torch.long), scores)[:, 2]).all()  # 4 tokens < 1 + 4
    assert not torch.isinf(ban(torch.zeros(2, 5, dtype=torch.long), scores)).any()
    assert decoding.BanEOSBelow(9, [2], forced_steps=(3,))(torch.zeros(2, 3, dtype=torch.long), scores) is scores
    assert decoding._fast_processors(model, dict(kwargs, do_sample=True)) == []  # warpers do not commute


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_the_stock_layer_to_rounding(bias):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 200, bias=bias), torch.nn.Linear(200, 40, bias=bias))
    if not decoding._packable(model[0]):
        pytest.skip("torch built without oneDNN")
    for shape in [(1, 96), (4, 96), (16, 1, 96), (3, 7, 96), (64, 96)]:
        hidden = torch.randn(shape)
        want = model(hidden)
        with decoding.packed_linears(model):
            assert all(type(m) is decoding.PackedLinear for m in model)
            got = model(hidden)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(type(m) is torch.nn.Linear and not hasattr(m, "packed") for m in model)  # restored, copies freed
    assert torch.equal(model(hidden), want)  # the weights came back bit for bit
    model[1].to(torch.float64)
    with decoding.packed_linears(model):  # layer by layer: float64 keeps torch's own kernels
        assert [type(m) for m in model] == [decoding.PackedLinear, torch.nn.Linear]
    assert all(type(m) is torch.nn.Linear for m in model)


def test_packed_linears_hold_one_copy_of_each_weight_and_restore_it_exactly():
    """While packed, a weight nothing else shares lives only in its packed copy; a tied one (the lm_head
    is the embedding matrix, which the decoder still looks up) is kept; both come back bit for bit."""
    model = build("bart")
    if not decoding._packable(model.lm_head):
        pytest.skip("torch built without oneDNN")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    params = dict(model.named_parameters())
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with decoding.packed_linears(model):
        fc1 = model.model.encoder.layers[0].fc1
        assert fc1.weight.numel() == 0 and fc1.packed.shape == (fc1.out_features, fc1.in_features)
        assert model.lm_head.weight is model.model.shared.weight and model.lm_head.weight.numel() > 0
        model.generate(ids, max_new_tokens=3)  # decoding runs on the packed copies alone
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert dict(model.named_parameters()) == params  # the same Parameter objects, not new ones


@pytest.mark.parametrize("beams", [1, 4])
@pytest.mark.parametrize("family", ["bart", "lsg_bart", "t5", "pegasus_x"])
def test_static_cache_gives_stock_ids(family, beams):
    """`cache_implementation="static"` (what a CUDA-graph decode needs): stock generate's ids with its own
    static cache; with beams, the beams' self-attention in a StaticCache beside the shared cross part."""
    model = build(family)
    ids, mask = batch(model)
    kwargs = dict(num_beams=beams, max_new_tokens=10, no_repeat_ngram_size=3, cache_implementation="static")
    seen = []

    def spy(module, args, kw):
        cache = next((kw[name] for name in decoding.CACHE_KEYWORDS if kw.get(name) is not None), None)
        if cache is not None and kw.get("decoder_input_ids") is not None:
            seen.append(cache)

    stock, _ = stock_and_ours(model, ids, mask, exact=True, **kwargs)
    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.inference_mode():
            ours = decoding.generate(model, ids, mask, exact=True, **kwargs)
    finally:
        handle.remove()
    assert len({tuple(row) for row in stock.tolist()}) > 1 and ours.tolist() == stock.tolist()
    assert model not in decoding._STOCK_ONLY and seen[-1].self_attention_cache.__class__ is tf.StaticCache
    if beams > 1 and decoding.sharing(model) is None:
        assert seen[-1].cross_attention_cache.layers[0].keys.shape[0] == 3  # one copy per document
