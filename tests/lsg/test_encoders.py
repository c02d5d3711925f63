"""LSG-BERT, LSG-RoBERTa and LSG-XLM-RoBERTa encoders: invariances, heads, save/load, training."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
    XLMRobertaModel,
)
from transformers.masking_utils import create_bidirectional_mask

from longsum.errors import InputTooLongError, LSGConfigError
from longsum.model.lsg.bert import LSGBertConfig, LSGBertForMaskedLM, LSGBertForSequenceClassification, LSGBertModel
from longsum.model.lsg.roberta import (
    LSGRobertaConfig,
    LSGRobertaForMaskedLM,
    LSGRobertaForSequenceClassification,
    LSGRobertaModel,
    LSGXLMRobertaConfig,
    LSGXLMRobertaForMaskedLM,
    LSGXLMRobertaForSequenceClassification,
    LSGXLMRobertaModel,
)
from tests.conftest import enable_checkpointing

VOCAB, HIDDEN, G, BS = 300, 32, 2, 8
STOCK = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
LSG = dict(block_size=BS, sparse_block_size=BS, num_global_tokens=G)

# family: (LSG config, base, masked LM, classification, stock config, stock base, stock masked LM,
#          family kwargs, prefix of the base model inside the task models)
FAMILIES = {
    "bert": (
        LSGBertConfig,
        LSGBertModel,
        LSGBertForMaskedLM,
        LSGBertForSequenceClassification,
        BertConfig,
        BertModel,
        BertForMaskedLM,
        dict(max_position_embeddings=256, pad_token_id=0),
        "bert",
    ),
    "roberta": (
        LSGRobertaConfig,
        LSGRobertaModel,
        LSGRobertaForMaskedLM,
        LSGRobertaForSequenceClassification,
        RobertaConfig,
        RobertaModel,
        RobertaForMaskedLM,
        dict(max_position_embeddings=258, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        "roberta",
    ),
    "xlm-roberta": (
        LSGXLMRobertaConfig,
        LSGXLMRobertaModel,
        LSGXLMRobertaForMaskedLM,
        LSGXLMRobertaForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaModel,
        XLMRobertaForMaskedLM,
        dict(max_position_embeddings=258, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        "roberta",
    ),
}
family_param = pytest.mark.parametrize("family", list(FAMILIES))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: thread start-up dominates, and a busy 2-core machine makes it much worse."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lsg_config(family, **overrides):
    config_cls, *_, family_kwargs, _prefix = FAMILIES[family]
    return config_cls(**{**STOCK, **family_kwargs, **LSG, **overrides})


def build(family, kind="base", seed=0, **overrides):
    _, base, masked_lm, classification, *_ = FAMILIES[family]
    model_cls = {"base": base, "masked_lm": masked_lm, "classification": classification}[kind]
    torch.manual_seed(seed)
    return model_cls(lsg_config(family, **overrides)).eval()


def padded_batch(family, lengths, total, seed=0):
    """`<s> random ... </s> <pad>...` rows (ids above the special tokens) and their mask."""
    pad = FAMILIES[family][-2]["pad_token_id"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (len(lengths), total), generator=g)
    mask = torch.ones_like(ids)
    ids[:, 0] = 3
    for row, length in enumerate(lengths):
        ids[row, length - 1] = 4
        ids[row, length:] = pad
        mask[row, length:] = 0
    return ids, mask


@family_param
@pytest.mark.parametrize("sparsity_type", ["norm", "pooling", "bos_pooling"])
def test_padded_batch_equals_rows_alone(family, sparsity_type):
    # 29 and 45 tokens with blocks of 8: the LSG path (t > 2 * block_size) and block padding.
    model = build(family, sparsity_type=sparsity_type)
    ids, mask = padded_batch(family, [29, 45], 45)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        first = model(input_ids=ids[:1, :29])
        second = model(input_ids=ids[1:])
    assert out.last_hidden_state.shape == (2, 45, HIDDEN)  # globals and block padding are dropped
    torch.testing.assert_close(out.last_hidden_state[0, :29], first.last_hidden_state[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.last_hidden_state[1], second.last_hidden_state[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooler_output[0], first.pooler_output[0], atol=1e-5, rtol=0)


@family_param
def test_heads_shapes_and_losses(family):
    ids, mask = padded_batch(family, [20, 37], 37)
    classifier = build(family, "classification", num_labels=3)
    masked_lm = build(family, "masked_lm")
    with torch.no_grad():
        cls_out = classifier(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2]))
        cls_alone = classifier(input_ids=ids[:1, :20]).logits
        mlm_out = masked_lm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert cls_out.logits.shape == (2, 3)
    assert mlm_out.logits.shape == (2, 37, VOCAB)
    assert torch.isfinite(cls_out.loss) and torch.isfinite(mlm_out.loss)
    torch.testing.assert_close(cls_out.logits[0], cls_alone[0], atol=1e-5, rtol=0)
    # The MLM decoder stays tied to the word embeddings.
    assert masked_lm.get_output_embeddings().weight is masked_lm.get_input_embeddings().weight


@family_param
def test_save_and_load_round_trip(family, tmp_path):
    model = build(family, "masked_lm", seed=1, sparsity_type="pooling", mask_first_token=True)
    ids, mask = padded_batch(family, [30, 41], 41, seed=1)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        after = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert loaded.config.model_type == lsg_config(family).model_type
    config = loaded.config
    assert (config.sparsity_type, config.mask_first_token, config.block_size) == ("pooling", True, BS)
    assert "auto_map" not in loaded.config.to_dict()


@family_param
def test_gradient_checkpointing_matches(family):
    ids, mask = padded_batch(family, [26, 43], 43, seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = build(family, "masked_lm", seed=3)
        if checkpointing:
            enable_checkpointing(model)
            assert all(layer.gradient_checkpointing for layer in model.base_model.encoder.layer)
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    prefix = FAMILIES[family][-1]
    assert grads[0].keys() == grads[1].keys()
    assert f"{prefix}.embeddings.global_embeddings.weight" in grads[1]
    assert f"{prefix}.encoder.layer.0.attention.self.query.weight" in grads[1]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


@family_param
def test_train_step_with_dropout_runs(family):
    model = build(family, "classification", seed=9, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model.train()
    ids, mask = padded_batch(family, [25, 40], 40, seed=9)
    loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([1, 0])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.base_model.embeddings.global_embeddings.weight.grad[:G].abs().sum() > 0


@family_param
def test_full_window_equals_stock_dense_encoder_over_globals(family):
    """With f = 1 and sparse_block_size >= length every block sees every token exactly once, so LSG
    equals the stock (dense SDPA) encoder run over `[LayerNorm(globals) | stock embeddings]`."""
    *_, stock_config_cls, stock_base, _, family_kwargs, _ = FAMILIES[family]
    model = build(family, seed=4, sparsity_factor=1, sparse_block_size=64)
    stock = stock_base(stock_config_cls(**STOCK, **family_kwargs)).eval()
    state = model.state_dict()
    glob = state.pop("embeddings.global_embeddings.weight")
    stock.load_state_dict(state, strict=True)

    ids, mask = padded_batch(family, [33, 46], 46, seed=4)  # 46 > 2 * 8: the block path
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        tokens = stock.embeddings(input_ids=ids)  # [b, t, d]
        hidden = torch.cat([stock.embeddings.LayerNorm(glob[:G]).expand(2, G, -1), tokens], dim=1)
        full_mask = torch.cat([torch.ones(2, G, dtype=mask.dtype), mask], dim=1)
        dense_mask = create_bidirectional_mask(config=stock.config, inputs_embeds=hidden, attention_mask=full_mask)
        dense = stock.encoder(hidden, attention_mask=dense_mask).last_hidden_state
        expected = torch.cat([dense[:, :1], dense[:, G + 1 :]], dim=1)  # pool_with_global: token 0 <- global 0
        pooled = stock.pooler(expected)
    for row, length in enumerate([33, 46]):
        torch.testing.assert_close(out.last_hidden_state[row, :length], expected[row, :length], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooler_output, pooled, atol=1e-5, rtol=0)


@family_param
def test_stock_checkpoint_plus_globals_loads_strictly(family):
    *_, stock_config_cls, _, stock_masked_lm, family_kwargs, prefix = FAMILIES[family]
    torch.manual_seed(5)
    stock = stock_masked_lm(stock_config_cls(**STOCK, **family_kwargs))
    model = build(family, "masked_lm")
    state = stock.state_dict()
    global_key = f"{prefix}.embeddings.global_embeddings.weight"  # the original LSG name
    assert set(model.state_dict()) - set(state) == {global_key}
    state[global_key] = torch.randn(512, HIDDEN)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.get_input_embeddings().weight, stock.get_input_embeddings().weight)


@family_param
def test_pool_with_global_and_hidden_states(family):
    ids, mask = padded_batch(family, [40, 35], 40, seed=6)
    pooled = build(family, seed=6)
    plain = build(family, seed=6, pool_with_global=False)
    with torch.no_grad():
        out = pooled(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out_plain = plain(input_ids=ids, attention_mask=mask)
    last = out.hidden_states[-1]  # raw layer output: globals first, block padding kept
    assert last.shape == (2, G + 40, HIDDEN) and len(out.hidden_states) == 3
    torch.testing.assert_close(out.last_hidden_state[:, 0], last[:, 0])  # token 0 <- global 0
    torch.testing.assert_close(out.last_hidden_state[:, 1:], last[:, G + 1 :])
    torch.testing.assert_close(out_plain.last_hidden_state, last[:, G:])
    torch.testing.assert_close(out.pooler_output, pooled.pooler(last[:, :1]))


@family_param
def test_mask_first_token_hides_token_zero_and_leaves_caller_mask(family):
    model = build(family, seed=7, mask_first_token=True)
    assert model.config.pool_with_global
    ids, mask = padded_batch(family, [44, 30], 44, seed=7)
    before = mask.clone()
    other = ids.clone()
    other[:, 0] = 17
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = model(input_ids=other, attention_mask=mask).last_hidden_state
    assert torch.equal(mask, before)
    # Token 0 is no key and its output is global 0's: nothing depends on it.
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[1, :30], b[1, :30], atol=1e-5, rtol=0)


@family_param
def test_inputs_embeds_and_errors(family):
    model = build(family, seed=8)
    ids, _ = padded_batch(family, [24], 24, seed=8)
    with torch.no_grad():
        by_ids = model(input_ids=ids).last_hidden_state
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).last_hidden_state
    torch.testing.assert_close(by_ids, by_embeds, atol=1e-5, rtol=0)
    limit = model.max_tokens()
    assert limit == 256  # RoBERTa positions start after padding_idx: 258 rows, 256 tokens
    with pytest.raises(InputTooLongError, match="256 positions.*longsum convert") as err:
        model(input_ids=torch.full((1, limit + 1), 7))
    assert "\n" not in str(err.value)
    with pytest.raises(LSGConfigError, match="bidirectional"):
        FAMILIES[family][1](lsg_config(family, is_decoder=True))


def test_config_keys_and_names():
    expected = dict(block_size=128, sparse_block_size=128, sparsity_factor=2, sparsity_type="norm", num_global_tokens=1)
    for config_cls, name in [
        (LSGBertConfig, "lsg_bert"),
        (LSGRobertaConfig, "lsg_roberta"),
        (LSGXLMRobertaConfig, "lsg_xlm-roberta"),
    ]:
        config = config_cls(auto_map={"AutoModel": "modeling_lsg.LSGModel"})  # as original checkpoints carry
        saved = config.to_dict()
        assert config.model_type == name
        assert {k: saved[k] for k in expected} == expected
        assert "auto_map" not in saved
    assert issubclass(LSGXLMRobertaConfig, XLMRobertaConfig)
    with pytest.raises(LSGConfigError, match="divisible"):
        LSGBertConfig(block_size=10, sparsity_factor=4)
