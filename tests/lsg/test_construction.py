"""Building an LSG model allocates and initialises every part once, and initialises it as the stock model does.

The stock `__init__`s build their children before the LSG classes replace them; `common.build_once`
builds on the meta device and materialises the finished model once (see its docstring).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.bart import modeling_bart as bart

from longsum.model.lsg import LSG_FAMILIES, LSGBartConfig, LSGBartForConditionalGeneration
from tests.conftest import random_ids

SEQ2SEQ = dict(
    vocab_size=300,
    d_model=32,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=128,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    init_std=0.3,
)
ENCODER = dict(
    vocab_size=300,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=130,
    pad_token_id=1,
    initializer_range=0.3,
)
LSG = dict(block_size=8, sparse_block_size=8)
MODELS = [(family, task) for family, classes in LSG_FAMILIES.items() for task in classes if task != "config"]


def stock_kwargs(family):
    return SEQ2SEQ if family in ("bart", "mbart", "pegasus") else ENCODER


def lsg_build(family, task, seed=0):
    classes = LSG_FAMILIES[family]
    torch.manual_seed(seed)
    return classes[task](classes["config"](**stock_kwargs(family), **LSG))


def stock_class(cls):
    """The transformers class an LSG class derives from (config or model)."""
    return next(base for base in cls.__mro__ if base.__module__.startswith("transformers.models."))


def stock_build(family, task, seed=0):
    classes = LSG_FAMILIES[family]
    torch.manual_seed(seed)
    return stock_class(classes[task])(stock_class(classes["config"])(**stock_kwargs(family)))


def own_tensors(module):
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


@pytest.fixture
def built_modules(monkeypatch):
    """Every nn.Module created while the fixture is active (kept alive, so discarded ones can be inspected)."""
    created = []
    original = nn.Module.__init__

    def recording_init(self, *args, **kwargs):
        created.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", recording_init)
    return created


@pytest.mark.parametrize("family, task", MODELS)
def test_no_part_is_allocated_and_then_replaced(built_modules, family, task):
    """A part with real storage is a part of the finished model: nothing is allocated, initialised and dropped."""
    model = lsg_build(family, task)
    kept = {id(m) for m in model.modules()}
    real = [m for m in built_modules if any(not t.is_meta for t in own_tensors(m))]
    dropped = [type(m).__name__ for m in real if id(m) not in kept]
    assert not dropped, f"built for real, then replaced: {sorted(set(dropped))} ({len(dropped)} modules)"
    assert all(not t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_bart_builds_each_stock_part_once(built_modules):
    """The parts the review named: stock self-attention of the LSG encoder layers, position tables, embeddings."""
    model = LSGBartForConditionalGeneration(LSGBartConfig(**SEQ2SEQ, **LSG))
    real = [m for m in built_modules if any(not p.is_meta for p in m.parameters())]  # counting containers too
    kinds = [type(m) for m in real]
    layers = SEQ2SEQ["decoder_layers"]
    assert kinds.count(bart.BartAttention) == 2 * layers  # decoder self- and cross-attention only
    assert len(model.model.decoder.layers) == layers
    assert kinds.count(bart.BartLearnedPositionalEmbedding) == 2  # one table each for encoder and decoder
    assert kinds.count(bart.BartScaledWordEmbedding) == 3  # shared + encoder + decoder, then tied (as stock)
    assert kinds.count(bart.BartEncoderLayer) == 0  # only the LSG layers (a subclass) are built for real
    assert sum(type(m).__name__ == "LSGBartEncoderLayer" for m in real) == SEQ2SEQ["encoder_layers"]


@pytest.mark.parametrize("family, task", MODELS)
def test_initialised_as_the_stock_model(family, task):
    """Deterministic tensors (layer norms, zero biases, sinusoids, position ids, padding rows) equal the stock
    model's; random ones are drawn from the same distribution; weights stay tied."""
    model = lsg_build(family, task)
    state = model.state_dict()
    stock, other_seed = stock_build(family, task, seed=0), stock_build(family, task, seed=1)
    stock_state, other_state = stock.state_dict(), other_seed.state_dict()
    config = stock.config
    std = config.init_std if hasattr(config, "init_std") else config.initializer_range  # every random tensor: N(0, std)
    assert set(state) - set(stock_state) == {k for k in state if k.endswith("global_embeddings.weight")}
    for key, value in state.items():
        expected = stock_state.get(key, value)
        assert value.dtype == expected.dtype and value.shape == expected.shape, key
        if key in stock_state and torch.equal(expected, other_state[key]):  # not random
            torch.testing.assert_close(value, expected, atol=0, rtol=0, msg=key)
        elif value.numel() >= 256:  # enough draws: the sample std is within ~4% of std
            ratio = value.float().std().item() / std
            assert 0.85 < ratio < 1.15 and abs(value.float().mean().item()) < 5 * std / value.numel() ** 0.5, key
    for name, buffer in stock.named_buffers():  # non-persistent buffers too (position_ids...)
        torch.testing.assert_close(dict(model.named_buffers())[name], buffer, atol=0, rtol=0, msg=name)
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            assert not module.weight[module.padding_idx].any()
    assert model.all_tied_weights_keys.keys() == stock.all_tied_weights_keys.keys()
    for target, source in model.all_tied_weights_keys.items():  # tied copies are the source tensor itself
        assert model.get_parameter(target) is model.get_parameter(source), target


@pytest.mark.parametrize("family, task", [("bart", "seq2seq"), ("pegasus", "seq2seq"), ("roberta", "masked_lm")])
def test_same_seed_same_model(family, task):
    first, second = lsg_build(family, task, seed=4), lsg_build(family, task, seed=4)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_meta_default_device_and_dtype_are_respected():
    """Under `torch.device("meta")` (as `from_pretrained` builds) nothing is materialised; a dtype is kept."""
    config = LSGBartConfig(**SEQ2SEQ, **LSG)
    with torch.device("meta"):
        model = LSGBartForConditionalGeneration(config)
    assert all(p.is_meta for p in model.parameters())
    half = LSGBartForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert all(not p.is_meta for p in half.parameters())


def test_checkpoints_round_trip_bit_identically(tmp_path):
    torch.manual_seed(0)
    model = LSGBartForConditionalGeneration(LSGBartConfig(**SEQ2SEQ, **LSG)).eval()
    model.save_pretrained(tmp_path)
    loaded = LSGBartForConditionalGeneration.from_pretrained(tmp_path).eval()
    fresh = LSGBartForConditionalGeneration(LSGBartConfig(**SEQ2SEQ, **LSG)).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    for other in (loaded, fresh):
        for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    ids, dec = random_ids(2, 50), torch.tensor([[2, 7, 9]] * 2)
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=dec).logits
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=dec).logits, expected)
        assert torch.equal(fresh(input_ids=ids, decoder_input_ids=dec).logits, expected)
