"""The LSG attention module: kernel chosen once from `config._attn_implementation`, one forward shared by
every family (stock projections -> kernel -> output projection), and a clear warning when attention
weights are asked for."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.bart import modeling_bart as bart
from transformers.models.bert import modeling_bert as bert

from longsum.errors import LSGConfigError
from longsum.model.lsg import common, kernels
from longsum.model.lsg.attention import lsg_attention
from longsum.model.lsg.bart import LSGBartAttention, LSGBartConfig, LSGBartForConditionalGeneration
from longsum.model.lsg.bert import LSGBertConfig, LSGBertModel, LSGBertSelfAttention
from longsum.model.lsg.common import LSGSelfAttention
from longsum.model.lsg.flex import flex_lsg_attention
from longsum.model.lsg.kernels import ATTN_IMPLEMENTATION_KERNELS, LSG_KERNELS, kernel_name, select_kernel
from longsum.model.lsg.mbart import LSGMBartAttention
from longsum.model.lsg.pegasus import LSGPegasusAttention
from longsum.model.lsg.roberta import LSGRobertaSelfAttention, LSGXLMRobertaSelfAttention
from tests.conftest import random_ids
from tests.lsg.test_models import SMALL

ATOL = 1e-5  # fp32, a few hundred keys: summation order only
DOCUMENTED = {None: "sdpa_blocked", "eager": "sdpa_blocked", "sdpa": "sdpa_blocked", "flash_attention_2": "sdpa_blocked",
              "flex_attention": "flex"}  # fmt: skip
BERT_SMALL = dict(
    vocab_size=300,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=256,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    block_size=16,
    sparse_block_size=16,
)


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch):
    """The no-weights warning is once per process: give each test a process that has not warned yet."""
    monkeypatch.setattr(common, "_WARNED", set())


def bart_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LSGBartForConditionalGeneration(LSGBartConfig(**{**SMALL, **overrides})).eval()


def bert_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LSGBertModel(LSGBertConfig(**{**BERT_SMALL, **overrides})).eval()


def lsg_modules(model):
    return [m for m in model.modules() if isinstance(m, LSGSelfAttention)]


def config_with(attn_implementation, config_cls=LSGBartConfig, **kwargs):
    config = config_cls(**kwargs)
    config._attn_implementation_internal = attn_implementation  # as PreTrainedModel.__init__ leaves it
    return config


def attention_module(kind, config):
    """One LSG self-attention module of each stock layout, built as the encoder layers build it."""
    if kind in ("bart", "mbart", "pegasus"):
        cls = {"bart": LSGBartAttention, "mbart": LSGMBartAttention, "pegasus": LSGPegasusAttention}[kind]
        return cls(embed_dim=config.d_model, num_heads=config.encoder_attention_heads, config=config)
    cls = {"bert": LSGBertSelfAttention, "roberta": LSGRobertaSelfAttention, "xlm-roberta": LSGXLMRobertaSelfAttention}
    return cls[kind](config)


KINDS = ["bart", "mbart", "pegasus", "bert", "roberta", "xlm-roberta"]


def kind_config(kind, attn_implementation=None, **overrides):
    if kind in ("bart", "mbart", "pegasus"):
        return config_with(attn_implementation, LSGBartConfig, **{**SMALL, **overrides})
    return config_with(attn_implementation, LSGBertConfig, **{**BERT_SMALL, **overrides})


# ------------------------------------------------------------------------------- kernel choice
def test_documented_values_and_only_those_have_kernels():
    assert ATTN_IMPLEMENTATION_KERNELS == DOCUMENTED
    assert set(ATTN_IMPLEMENTATION_KERNELS.values()) == set(LSG_KERNELS)
    assert LSG_KERNELS["sdpa_blocked"] is lsg_attention and LSG_KERNELS["flex"] is flex_lsg_attention


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", DOCUMENTED, ids=str)
def test_every_attn_implementation_maps_to_its_kernel(kind, value):
    """flex_attention runs the flex kernel, every other backend the blocked SDPA one (kernels.py says why)."""
    assert kernel_name(value) == DOCUMENTED[value]
    module = attention_module(kind, kind_config(kind, value))
    assert module.lsg_kernel is LSG_KERNELS[DOCUMENTED[value]]


@pytest.mark.parametrize("kind", ["bart", "bert"])
@pytest.mark.parametrize("value", ["paged|eager", "flash_attention_3", "kernels-community/flash-attn", "Eager"])
def test_unknown_attn_implementation_is_a_one_line_error(kind, value):
    with pytest.raises(LSGConfigError, match="no kernel for attn_implementation") as err:
        attention_module(kind, kind_config(kind, value))
    message = str(err.value)
    assert "\n" not in message and repr(value) in message and "'sdpa'" in message


def test_unhashable_attn_implementation_is_the_same_error():
    with pytest.raises(LSGConfigError, match="no kernel"):
        kernel_name({"": "sdpa"})


@pytest.mark.parametrize(
    "model_cls, config",
    [(LSGBartForConditionalGeneration, LSGBartConfig(**SMALL)), (LSGBertModel, LSGBertConfig(**BERT_SMALL))],
    ids=["bart", "bert"],
)
def test_an_attention_function_registered_with_transformers_is_refused(monkeypatch, model_cls, config):
    """transformers accepts any registered dense-attention function; LSG has no kernel for it."""
    monkeypatch.setitem(AttentionInterface._global_mapping, "my_dense", sdpa_attention_forward)
    with pytest.raises(LSGConfigError, match="'my_dense'"):
        model_cls._from_config(config, attn_implementation="my_dense")


@pytest.mark.parametrize("build", [bart_model, bert_model], ids=["bart", "bert"])
def test_kernel_is_chosen_once_and_held_by_the_module(monkeypatch, build):
    model = build()
    modules = lsg_modules(model)
    assert len(modules) == 2 and all(m.lsg_kernel is lsg_attention for m in modules)
    ids = random_ids(2, 100)  # > 2 blocks: the block path
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state if build is bert_model else model.get_encoder()(ids)[0]

    # Forward must not look the kernel up again: empty the tables and break the selector...
    monkeypatch.setattr(kernels, "LSG_KERNELS", {})
    monkeypatch.setattr(kernels, "ATTN_IMPLEMENTATION_KERNELS", {})
    monkeypatch.setattr(common, "select_kernel", lambda config: pytest.fail("kernel looked up in forward"))
    # ...and it must call the function the module holds.
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[4])  # the spec
        return lsg_attention(*args, **kwargs)

    for module in modules:
        module.lsg_kernel = spy
    with torch.no_grad():
        after = model(input_ids=ids).last_hidden_state if build is bert_model else model.get_encoder()(ids)[0]
    assert len(calls) == len(modules)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_model_level_attn_implementation_keeps_the_lsg_kernel_and_its_outputs():
    """`attn_implementation="eager"` changes the stock decoder's backend only; the encoder keeps its kernel."""
    sdpa = bart_model(seed=3)
    eager = LSGBartForConditionalGeneration._from_config(copy.deepcopy(sdpa.config), attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    eager.eval()
    assert eager.config._attn_implementation == "eager"
    assert all(m.lsg_kernel is lsg_attention for m in lsg_modules(eager))
    ids, dec = random_ids(1, 120, seed=3), torch.tensor([[2, 7, 9]])
    with torch.no_grad():
        enc_sdpa, enc_eager = sdpa.get_encoder()(ids)[0], eager.get_encoder()(ids)[0]
        logits_sdpa = sdpa(input_ids=ids, decoder_input_ids=dec).logits
        logits_eager = eager(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(enc_eager, enc_sdpa, atol=0, rtol=0)  # the same kernel
    torch.testing.assert_close(logits_eager, logits_sdpa, atol=ATOL, rtol=0)  # decoder: eager vs SDPA


def test_select_kernel_reads_the_config():
    assert select_kernel(config_with("sdpa")) is lsg_attention
    assert select_kernel(object()) is lsg_attention  # no _attn_implementation at all: the default (None)


# ------------------------------------------------------------------------ one shared forward
def test_both_hierarchies_run_the_same_forward():
    families = [LSGBartAttention, LSGMBartAttention, LSGPegasusAttention, LSGBertSelfAttention, LSGRobertaSelfAttention]
    for cls in families:
        assert cls.forward is LSGSelfAttention.forward, cls


def stock_twin(kind, module, config):
    """The stock attention class `module` derives from, with the same weights, running eager attention."""
    eager = copy.deepcopy(config)
    eager._attn_implementation_internal = "eager"
    if kind == "bart":
        stock = bart.BartAttention(embed_dim=config.d_model, num_heads=config.encoder_attention_heads, config=eager)
    else:
        stock = bert.BertSelfAttention(eager)
    stock.load_state_dict(module.state_dict(), strict=True)
    return stock.eval()


@pytest.mark.parametrize("kind", ["bart", "bert"])
@pytest.mark.parametrize("n", [30, 150], ids=["short", "blocks"])  # t = n - 1 global vs 2 * block_size = 32
def test_shared_forward_equals_the_stock_module_when_every_key_is_seen(kind, n):
    """With sparsity_factor 1 and a sparse side >= the length, every query sees every key exactly once, so
    the LSG module is its stock class (eager softmax over all keys); globals first, padding masked."""
    torch.manual_seed(5)
    config = kind_config(kind, "sdpa", sparsity_factor=1, sparse_block_size=160)
    module = attention_module(kind, config).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)  # peaked attention: mistakes show
    stock = stock_twin(kind, module, config)
    hidden = torch.randn(2, n, 32)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, n // 2 :] = False  # padding in row 0
    additive = torch.zeros(2, 1, 1, n).masked_fill(~mask[:, None, None, :], float("-inf"))
    with torch.no_grad():
        out, weights = module(hidden, attention_mask=mask)
        expected = stock(hidden, attention_mask=additive)[0]
    assert weights is None
    assert out.shape == (2, n, 32)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["bart", "bert"])
def test_dropout_is_read_from_the_stock_attribute_at_each_call(kind):
    module = attention_module(kind, kind_config(kind, "sdpa"))
    seen = []
    module.lsg_kernel = lambda q, k, v, mask, spec, dropout_p: seen.append(dropout_p) or q
    if kind == "bart":
        module.dropout = 0.25  # a float in BART-like attention
    else:
        module.dropout.p = 0.25  # an nn.Dropout in BERT-like attention
    hidden = torch.randn(1, 10, 32)
    module.train()
    module(hidden)
    module.eval()
    module(hidden)
    assert seen == [0.25, 0.0]


@pytest.mark.parametrize("kind", ["bart", "bert"])
def test_mask_must_be_a_boolean_key_mask(kind):
    """A stock encoder forward's 4-D or additive masks would be misread (additive 0 = visible); both layouts refuse."""
    module = attention_module(kind, kind_config(kind, "sdpa"))
    hidden = torch.randn(2, 10, 32)
    for bad in (torch.ones(2, 1, 10, 10, dtype=torch.bool), torch.zeros(2, 10), torch.ones(2, 11, dtype=torch.bool)):
        with pytest.raises(ValueError, match="boolean key mask"):
            module(hidden, attention_mask=bad)
    module(hidden, attention_mask=torch.ones(2, 10, dtype=torch.bool))


@pytest.mark.parametrize("build", [bart_model, bert_model], ids=["bart", "bert"])
def test_caller_mask_of_the_wrong_shape_is_a_clear_error(build):
    """Both encoder hierarchies check the caller's mask (the seq2seq one used to fail deep inside SDPA)."""
    model = build()
    ids = random_ids(2, 100)
    encoder = model.get_encoder() if build is bart_model else model
    for bad in (torch.ones(2, 1, 100, 100), torch.ones(2, 99)):
        with pytest.raises(ValueError, match=r"attention_mask must be \[batch, tokens\] = \[2, 100\]"):
            encoder(input_ids=ids, attention_mask=bad)


# ----------------------------------------------------------------------- attention weights
def lsg_warnings(record):
    return [w for w in record if "LSG encoder attention forms no attention weights" in str(w.message)]


def test_output_attentions_warns_once_and_decoder_attentions_come_back():
    model = LSGBartForConditionalGeneration._from_config(LSGBartConfig(**SMALL), attn_implementation="eager").eval()
    ids, dec = random_ids(2, 100), torch.tensor([[2, 7, 9]] * 2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model(input_ids=ids, decoder_input_ids=dec, output_attentions=True)
            again = model(input_ids=ids, decoder_input_ids=dec, output_attentions=True)
    found = lsg_warnings(record)
    assert len(found) == 1  # once per process
    assert found[0].category is UserWarning
    assert "longsum" in found[0].filename.replace("\\", "/").split("/")  # attributed to a longsum module
    assert "decoder" in str(found[0].message) and "eager" in str(found[0].message)
    for result in (out, again):
        assert result.encoder_attentions == ()  # none formed
        assert len(result.decoder_attentions) == len(result.cross_attentions) == SMALL["decoder_layers"]
        assert result.decoder_attentions[0].shape == (2, 4, 3, 3)
        assert result.cross_attentions[0].shape == (2, 4, 3, 1 + 100)  # over the global + the tokens


def test_generate_with_output_attentions_warns_and_returns_decoder_attentions():
    model = LSGBartForConditionalGeneration._from_config(LSGBartConfig(**SMALL), attn_implementation="eager").eval()
    ids = random_ids(1, 100)
    with pytest.warns(UserWarning, match="LSG encoder attention forms no attention weights"):
        out = model.generate(
            ids, max_new_tokens=3, min_new_tokens=3, output_attentions=True, return_dict_in_generate=True
        )
    assert len(out.decoder_attentions) == len(out.cross_attentions) == 3  # one entry per generated token
    assert out.cross_attentions[0][0].shape[-1] == 1 + 100
    assert not out.encoder_attentions


@pytest.mark.parametrize(
    "call",
    [
        lambda m, ids: m.get_encoder()(input_ids=ids, output_attentions=True),
        lambda m, ids: m(input_ids=ids, decoder_input_ids=ids[:, :2], output_attentions=True),
    ],
    ids=["encoder_call", "model_call"],
)
def test_seq2seq_calls_asking_for_weights_warn(call):
    with pytest.warns(UserWarning, match="LSG"):
        with torch.no_grad():
            call(bart_model(), random_ids(1, 60))


def test_config_output_attentions_warns_and_an_explicit_false_does_not():
    model = LSGBartForConditionalGeneration._from_config(LSGBartConfig(**SMALL), attn_implementation="eager").eval()
    model.config.output_attentions = True  # transformers allows it with eager only
    ids = random_ids(1, 60)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            model.get_encoder()(input_ids=ids, output_attentions=False)  # the call wins, as in capture_outputs
    assert not lsg_warnings(record)
    with pytest.warns(UserWarning, match="LSG"):
        with torch.no_grad():
            model.get_encoder()(input_ids=ids)


def test_encoder_only_models_warn_too():
    model = bert_model()
    with pytest.warns(UserWarning, match="LSG encoder attention forms no attention weights"):
        with torch.no_grad():
            out = model(input_ids=random_ids(1, 60), output_attentions=True)
    assert out.attentions == ()


def test_no_warning_when_weights_are_not_asked_for():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            bart_model()(input_ids=random_ids(1, 60), decoder_input_ids=torch.tensor([[2, 5]]))
            bert_model()(input_ids=random_ids(1, 60))
    assert not lsg_warnings(record)
