"""Calls without `attention_mask` build it from the padding, as the original LSG models did.

transformers 5 builds no encoder mask in `generate()` for encoder-decoder models (transformers 4
built `input_ids != pad_token_id`, which is what the original LSG checkpoints were used with), so
a padded batch attended to its padding and `mask_first_token` no longer reached cross-attention.
"""

from __future__ import annotations

import pytest
import torch

from longsum.model.lsg import (
    LSGMBartConfig,
    LSGMBartForConditionalGeneration,
    LSGPegasusConfig,
    LSGPegasusForConditionalGeneration,
)
from longsum.model.lsg.common import padding_mask
from tests.conftest import random_ids

PAD, EOS = 1, 2
# Peaked attention (the default init_std 0.02 gives a near-constant untrained model), so that attending to
# padding changes the generated ids.
PEAKED = dict(init_std=0.3)


def padded_batch(lengths: list[int], total: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `<s> ... </s>` rows and their mask."""
    ids = random_ids(len(lengths), total, seed=seed)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, length - 1] = EOS
        ids[row, length:] = PAD
        mask[row, length:] = 0
    return ids, mask


@pytest.mark.parametrize("mask_first_token", [False, True])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_without_mask_equals_explicit_mask(tiny_lsg_bart, mask_first_token, num_beams):
    model = tiny_lsg_bart(seed=1, block_size=16, sparse_block_size=16, mask_first_token=mask_first_token, **PEAKED)
    ids, mask = padded_batch([70, 160], 160, seed=2)  # row 0: 90 pads; long enough for the blocked path
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, num_beams=num_beams, do_sample=False)
    with torch.no_grad():
        explicit = model.generate(ids, attention_mask=mask, **kwargs)
        positional = model.generate(ids, **kwargs)
        keyword = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(positional, explicit)
    assert torch.equal(keyword, explicit)


def test_generate_without_mask_leaves_inputs_untouched(tiny_lsg_bart):
    model = tiny_lsg_bart(mask_first_token=True)
    ids, _ = padded_batch([40, 100], 100)
    before = ids.clone()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2)
    assert torch.equal(ids, before)


def test_forward_without_mask_equals_explicit_mask(tiny_lsg_bart):
    """Direct forward (training loss, scoring) takes the same path."""
    model = tiny_lsg_bart(seed=3, block_size=16, sparse_block_size=16, mask_first_token=True, **PEAKED)
    ids, mask = padded_batch([50, 120], 120)
    dec = torch.tensor([[2, 7, 9, 11]] * 2)
    with torch.no_grad():
        explicit = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        implicit = model(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(implicit, explicit, atol=0, rtol=0)


@pytest.mark.parametrize(
    "config_class, model_class",
    [(LSGMBartConfig, LSGMBartForConditionalGeneration), (LSGPegasusConfig, LSGPegasusForConditionalGeneration)],
    ids=["mbart", "pegasus"],
)
def test_other_families_generate_without_mask(config_class, model_class):
    torch.manual_seed(0)
    config = config_class(
        vocab_size=300, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
        dropout=0.0, attention_dropout=0.0, pad_token_id=PAD, bos_token_id=0, eos_token_id=EOS,
        decoder_start_token_id=EOS, block_size=16, sparse_block_size=16, **PEAKED,
    )  # fmt: skip
    model = model_class(config).eval()
    ids, mask = padded_batch([60, 120], 120, seed=4)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=2, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, attention_mask=mask, **kwargs))


def test_padding_mask_needs_ids_and_a_pad_id():
    ids = torch.tensor([[0, 5, 2, PAD]])
    assert torch.equal(padding_mask(ids, PAD, EOS), torch.tensor([[1, 1, 1, 0]]))
    assert padding_mask(None, PAD, EOS) is None  # inputs_embeds: nothing to build from
    assert padding_mask(ids, None, EOS) is None
    assert padding_mask(ids, EOS, EOS) is None  # padding cannot be told from the end of a text
    assert padding_mask(torch.randn(1, 4, 8), PAD, EOS) is None
