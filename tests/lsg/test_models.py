"""LSG-BART, LSG-mBART and LSG-Pegasus: invariances, generation, training mechanics."""

from __future__ import annotations

import pytest
import torch

from longsum.errors import InputTooLongError, LSGConfigError
from longsum.model.lsg import (
    LSGBartConfig,
    LSGBartForSequenceClassification,
    LSGMBartConfig,
    LSGMBartForConditionalGeneration,
    LSGPegasusConfig,
    LSGPegasusForConditionalGeneration,
)
from tests.conftest import enable_checkpointing, input_dependent, random_ids
from tests.helpers import BART_DIMS, BART_TOKENS, NO_DROPOUT

SMALL = dict(
    vocab_size=300,
    **BART_DIMS,
    max_position_embeddings=512,
    **NO_DROPOUT,
    **BART_TOKENS,
    block_size=16,
    sparse_block_size=16,
)


def family_models():
    torch.manual_seed(0)
    yield "mbart", LSGMBartForConditionalGeneration(LSGMBartConfig(**SMALL)).eval()
    torch.manual_seed(0)
    yield "pegasus", LSGPegasusForConditionalGeneration(LSGPegasusConfig(**SMALL)).eval()


def padded_batch(lengths, total, seed=0):
    ids = random_ids(len(lengths), total, seed=seed)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, length - 1] = 2
        ids[row, length:] = 1
        mask[row, length:] = 0
    return ids, mask


@pytest.mark.parametrize("sparsity_type", ["norm", "pooling", "bos_pooling", "stride", "none"])
def test_padded_batch_equals_rows_alone(tiny_lsg_bart, sparsity_type):
    model = tiny_lsg_bart(sparsity_type=sparsity_type)
    ids, mask = padded_batch([150, 300], 300)
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model.get_encoder()(input_ids=ids[:1, :150]).last_hidden_state
        dec = torch.tensor([[2, 7, 9, 11]] * 2)
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        logits_alone = model(input_ids=ids[:1, :150], decoder_input_ids=dec[:1]).logits
    assert enc.shape == (2, 1 + 300, 32)
    torch.testing.assert_close(enc[0, : 1 + 150], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0], logits_alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_padded_generate_equals_rows_alone(tiny_lsg_bart, num_beams):
    model = tiny_lsg_bart(seed=1)
    ids, mask = padded_batch([90, 200], 200, seed=1)
    kwargs = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False, min_new_tokens=6)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kwargs)
        first = model.generate(ids[:1, :90], **kwargs)
        second = model.generate(ids[1:], **kwargs)
    assert torch.equal(batch[0, : first.shape[1]], first[0])
    assert torch.equal(batch[1, : second.shape[1]], second[0])


def test_mask_first_token_leaves_caller_mask_untouched(tiny_lsg_bart):
    model = tiny_lsg_bart(mask_first_token=True)
    ids, mask = padded_batch([120, 120], 120)
    before = mask.clone()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor([[2, 5]] * 2)).logits
        model.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(mask, before)
    assert torch.isfinite(out).all()
    # Token 0 is hidden from the encoder: changing it changes nothing but its own output.
    ids2 = ids.clone()
    ids2[:, 0] = 17
    with torch.no_grad():
        a = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        b = model.get_encoder()(input_ids=ids2, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[:, 2:], b[:, 2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[:, 0], b[:, 0], atol=1e-5, rtol=0)


def test_globals_not_passed_to_decoder_pool_into_token_zero(tiny_lsg_bart):
    passed = tiny_lsg_bart(seed=2)
    pooled = tiny_lsg_bart(seed=2, pass_global_tokens_to_decoder=False)
    plain = tiny_lsg_bart(seed=2, pass_global_tokens_to_decoder=False, pool_with_global=False)
    ids = random_ids(1, 200)
    with torch.no_grad():
        full = passed.get_encoder()(input_ids=ids).last_hidden_state  # [1, G + t, d]
        out = pooled.get_encoder()(input_ids=ids).last_hidden_state  # [1, t, d]
        out_plain = plain.get_encoder()(input_ids=ids).last_hidden_state
        logits = pooled(input_ids=ids, decoder_input_ids=torch.tensor([[2, 5]])).logits
    assert out.shape == (1, 200, 32)
    torch.testing.assert_close(out[:, 0], full[:, 0])  # token 0 <- global 0
    torch.testing.assert_close(out[:, 1:], full[:, 2:])
    torch.testing.assert_close(out_plain, full[:, 1:])
    assert logits.shape == (1, 2, pooled.config.vocab_size)


def test_gradient_checkpointing_whole_model_matches(tiny_lsg_bart):
    ids, mask = padded_batch([100, 260], 260)
    labels = random_ids(2, 12, seed=5)
    grads = []
    for checkpointing in (False, True):
        model = tiny_lsg_bart(seed=3, sparsity_type="pooling")
        model.config.dropout = 0.0
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert "model.encoder.global_embeddings.weight" in grads[1]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_train_step_with_dropout_runs(tiny_lsg_bart):
    """LSG attention dropout acts in training only: each step draws its masks (seeded: the same seed,
    the same loss), eval is deterministic, and the step's loss and the attention's gradients are finite."""
    model = input_dependent(tiny_lsg_bart(seed=4))  # the default init's loss hardly depends on the encoder
    # no other dropout in the tiny config: any change between passes is the LSG attention's
    model.config.attention_dropout = 0.1
    for layer in model.model.encoder.layers:
        layer.self_attn.dropout = 0.1
    ids, labels = random_ids(2, 200), random_ids(2, 8)

    def loss_with_seed(seed):
        torch.manual_seed(seed)
        return model(input_ids=ids, labels=labels).loss

    model.eval()
    with torch.no_grad():
        clean = loss_with_seed(0)
        assert torch.equal(loss_with_seed(1), clean)
    model.train()
    loss = loss_with_seed(0)
    with torch.no_grad():
        assert torch.equal(loss_with_seed(0), loss) and not torch.equal(loss_with_seed(1), loss)
        assert not torch.equal(loss, clean)
    loss.backward()
    assert torch.isfinite(loss)
    for layer in model.model.encoder.layers:
        grad = layer.self_attn.q_proj.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("family, model", list(family_models()), ids=["mbart", "pegasus"])
def test_other_families_padded_and_generate(family, model):
    ids, mask = padded_batch([70, 200], 200)
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model.get_encoder()(input_ids=ids[:1, :70]).last_hidden_state
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=2)
    torch.testing.assert_close(enc[0, :71], alone[0], atol=1e-5, rtol=0)
    assert gen.shape[0] == 2
    assert model.model.encoder.global_embeddings.weight.shape == (512, 32)


def test_classification_head():
    torch.manual_seed(0)
    model = LSGBartForSequenceClassification(LSGBartConfig(**SMALL, num_labels=3)).eval()
    ids, mask = padded_batch([60, 180], 180)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:1, :60]).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=0)


def test_input_longer_than_positions_is_a_one_line_error(tiny_lsg_bart):
    model = tiny_lsg_bart()
    with pytest.raises(InputTooLongError, match="1024 positions.*longsum convert") as err:
        model.get_encoder()(input_ids=random_ids(1, 1100))
    assert "\n" not in str(err.value)


def test_config_keys_defaults_and_validation():
    config = LSGBartConfig()
    expected = dict(
        block_size=128,
        sparse_block_size=128,
        sparsity_factor=2,
        sparsity_type="norm",
        num_global_tokens=1,
        adaptive=True,
        mask_first_token=False,
        pass_global_tokens_to_decoder=True,
        pool_with_global=True,
        lsh_num_pre_rounds=1,
        base_model_prefix="lsg",
    )
    saved = config.to_dict()
    assert {k: saved[k] for k in expected} == expected
    assert "auto_map" not in saved
    with pytest.raises(LSGConfigError, match="divisible"):
        LSGBartConfig(block_size=100, sparsity_factor=8)
    with pytest.raises(LSGConfigError, match="unknown sparsity_type"):
        LSGBartConfig(sparsity_type="dense")
    with pytest.raises(LSGConfigError, match="between 1 and 512"):
        LSGBartConfig(num_global_tokens=600)
