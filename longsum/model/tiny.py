"""Tiny models and tokenizers built in code, for tests, the offline quickstart and benchmarks.

These machines have no model hub, so anything that needs a model offline builds one here: a
byte-level BPE tokenizer trained on a few texts and a small randomly initialised model. The
weights are untrained: generated text is not meaningful, only the plumbing is exercised.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as BART


def build_tokenizer(texts: Iterable[str], vocab_size: int = 500, model_max_length: int = 4096):
    """A byte-level BPE tokenizer (BART/RoBERTa style: `<s> ... </s>`) trained on `texts`."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(texts), vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False
    )  # (its bars print blank lines off a terminal)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=model_max_length,
    )


def tiny_lsg_bart_config(vocab_size: int, max_positions: int = 4096, **lsg):
    """A 2+2-layer LSG-BART config (d_model 32); `lsg` overrides LSG keys."""
    from longsum.model.lsg import LSGBartConfig

    settings = {"block_size": 32, "sparse_block_size": 32, "sparsity_factor": 2, **lsg}
    return LSGBartConfig(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=max_positions,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        **settings,
    )


def build_tiny_lsg_bart(
    texts: Iterable[str], out_dir: str | Path | None = None, seed: int = 0, max_positions: int = 4096, **lsg
):
    """(model, tokenizer) for an untrained tiny LSG-BART; saved to `out_dir` when given."""
    import torch

    from longsum.model.lsg import LSGBartForConditionalGeneration

    tokenizer = build_tokenizer(texts, model_max_length=max_positions)
    torch.manual_seed(seed)
    model = LSGBartForConditionalGeneration(tiny_lsg_bart_config(len(tokenizer), max_positions, **lsg)).eval()
    model.generation_config.max_new_tokens = 64
    model.generation_config.num_beams = 1
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model, tokenizer


GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0..4, as Gemma's tokenizer


def build_gemma_tokenizer(texts: Iterable[str], vocab_size: int = 300):
    """A Gemma-style tokenizer (T5Gemma, T5Gemma 2) trained on `texts`: transformers' `GemmaTokenizer`
    (BPE with byte fallback over `▁`-joined words, saved as `tokenizer.json`), `<bos>` before every
    text and no `<eos>` after it, padding on the left, the published checkpoints' special ids."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GEMMA_SPECIAL_TOKENS, show_progress=False)
    bpe.train_from_iterator(list(texts), trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return GemmaTokenizer(vocab=trained["vocab"], merges=merges, add_bos_token=True)
