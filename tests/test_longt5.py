"""longsum's LongT5 encoder attention against transformers' own (local and transient-global)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LongT5Config, LongT5ForConditionalGeneration
from transformers.models.longt5 import modeling_longt5 as stock

from longsum.model import longt5
from tests.conftest import enable_checkpointing, input_dependent
from tests.helpers import T5_DIMS, T5_OWN_TOKENS

KINDS = ["local", "transient-global"]
# local_radius 3 -> blocks of 4; global blocks of 4. Lengths: a block multiple, not one, a padded
# batch, and inputs shorter than one block (one global block or none).
LENGTHS = [(36,), (37,), (40, 23, 5), (3,), (2, 1)]


def build(kind: str, seed: int = 0, redraw: bool = True, **overrides) -> LongT5ForConditionalGeneration:
    torch.manual_seed(seed)
    settings = dict(vocab_size=300, **T5_DIMS, dropout_rate=0.0, **T5_OWN_TOKENS, local_radius=3, global_block_size=4,
                    encoder_attention_type=kind)  # fmt: skip
    config = LongT5Config(**{**settings, **overrides})
    model = LongT5ForConditionalGeneration(config).eval()
    return input_dependent(model) if redraw else model


def pair(kind: str, **overrides):
    model = build(kind, **overrides)
    ours = copy.deepcopy(model)
    assert longt5.use_longsum_attention(ours) == 2  # one encoder attention module per layer
    return model, ours


def batch(lengths, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(2, 300, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


@pytest.fixture(params=[None, 1], ids=["one-chunk", "block-per-chunk"])
def chunking(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(longt5, "CHUNK_BYTES", request.param)


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_encoder_states_and_logits_match_transformers(kind, lengths, chunking):
    model, ours = pair(kind)
    ids, mask = batch(lengths)
    decoder_ids = torch.tensor([[0, 5, 9, 13]] * len(lengths))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    assert want.encoder_last_hidden_state.abs().max() > 1  # not a vanishing signal
    torch.testing.assert_close(got.encoder_last_hidden_state, want.encoder_last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_without_an_attention_mask_as_transformers_does(kind):
    model, ours = pair(kind)
    ids, _ = batch((37,))
    with torch.no_grad():
        want, got = model.encoder(input_ids=ids), ours.encoder(input_ids=ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_and_beam_ids_identical(kind):
    model, ours = pair(kind)
    ids, mask = batch((40, 23, 5))
    for kwargs in (dict(num_beams=1), dict(num_beams=4, no_repeat_ngram_size=3, length_penalty=2.0)):
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **kwargs)
            got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **kwargs)
        assert len({tuple(row) for row in want.tolist()}) > 1 and got.tolist() == want.tolist()


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_transformers(kind, checkpointing):
    model, ours = pair(kind)
    ids, mask = batch((40, 23, 5))
    labels = torch.tensor([[5, 9, 13, 1]] * 3)
    for m in (model, ours):
        m.train()
        if checkpointing:
            enable_checkpointing(m)
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grads = dict(model.named_parameters())
    names = [
        n for n, p in ours.named_parameters() if "global_relative_attention_bias" in n or "relative_attention" in n
    ]
    assert names  # the bias tables get gradients through the additive mask
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_as_close_to_fp32_as_transformers(kind, dtype):
    """bf16/fp16 stay finite and no further from the fp32 result than transformers' own half-precision
    forward (which gives NaN for local attention in fp16: its -1e10 masks overflow). Default init:
    the re-drawn weights of the other tests amplify half-precision rounding to 5-30%."""
    model, ours = pair(kind, redraw=False)
    ids, mask = batch((40, 23, 5))
    valid = mask.bool()
    with torch.no_grad():
        want = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[valid]
        theirs = copy.deepcopy(model).to(dtype).encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.to(dtype).encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()[valid]
    their_error = ((theirs.float()[valid] - want).abs().max() / want.abs().max()).item()
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert torch.isfinite(got).all()
    assert error <= 1.25 * (max(their_error, 0.005) if their_error == their_error else 0.02), (error, their_error)


def test_attention_weights_come_from_the_stock_forward():
    model, ours = pair("transient-global")
    ids, mask = batch((37,))
    with torch.no_grad():
        want = model.encoder(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = ours.encoder(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert got.attentions is not None and len(got.attentions) == 2
    torch.testing.assert_close(got.attentions[0], want.attentions[0])


def test_chunks_bound_the_mask():
    """No additive mask bigger than one chunk's budget is built (the stock builds one for the whole sequence)."""
    model, ours = pair("transient-global")
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        seen.append(attn_mask.numel() * attn_mask.element_size())
        return real(*args, attn_mask=attn_mask, **kwargs)

    ids, mask = batch((400,))
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        longt5.CHUNK_BYTES, saved = 64 << 10, longt5.CHUNK_BYTES
        with torch.no_grad():
            ours.encoder(input_ids=ids, attention_mask=mask)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
        longt5.CHUNK_BYTES = saved
    whole = 4 * 100 * 4 * (12 + 100) * 4  # heads x blocks x block x (3 blocks + 100 side keys) x fp32
    assert len(seen) > 2 and max(seen) <= 64 << 10 < whole


def test_load_model_uses_longsum_attention_unless_stock(tmp_path, tokenizer):
    from longsum.model.checkpoint import load_model

    model = build("transient-global", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path, device="cpu", dtype="fp32")
    plain, _ = load_model(tmp_path, device="cpu", dtype="fp32", attention="stock")
    kinds = {type(m) for m in ours.modules()}
    assert longt5.TransientGlobalAttention in kinds and stock.LongT5TransientGlobalAttention not in kinds
    assert stock.LongT5TransientGlobalAttention in {type(m) for m in plain.modules()}
    ids, mask = batch((37, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours.encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   plain.encoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
