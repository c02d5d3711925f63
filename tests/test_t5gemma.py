"""T5Gemma and T5Gemma 2 (tiny configs built in code): loading, decoding with shared cross-attention
keys/values, and the commands end to end.

Special ids as the published checkpoints have them (transformers' config classes: pad 0, eos 1,
bos 2, and the decoder starts from bos). Sliding windows shorter than the documents and the summaries,
so that the local layers' windows are in play in the encoder and in the decoder's self-attention.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from longsum.model import decoding
from tests.conftest import CORPUS, input_dependent
from tests.helpers import cross_caches, padded_batch, run_longsum, stock_and_ours

GEMMA_TOKENS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)  # the published checkpoints' ids
TEXT = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=8, **GEMMA_TOKENS)  # fmt: skip


def t5gemma_config(vocab_size: int = 300, positions: int = 2048):
    """T5Gemma (Gemma 2 layers: local/global pattern, soft-capped attention and logits, GQA)."""
    module = dict(TEXT, vocab_size=vocab_size, max_position_embeddings=positions)
    return tf.T5GemmaConfig(encoder=dict(module), decoder=dict(module), vocab_size=vocab_size, **GEMMA_TOKENS)


def t5gemma2_config(vocab_size: int = 300, positions: int = 131_072):
    """T5Gemma 2 (Gemma 3 layers, merged decoder attention, tied embeddings) with a tiny vision tower."""
    text = dict(TEXT, vocab_size=vocab_size, max_position_embeddings=positions)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    encoder = dict(text_config=dict(text), vision_config=vision, mm_tokens_per_image=4)
    return tf.T5Gemma2Config(encoder=encoder, decoder=dict(text), **GEMMA_TOKENS)


CONFIGS = {"t5gemma": t5gemma_config, "t5gemma2": t5gemma2_config}
CLASSES = {"t5gemma": tf.T5GemmaForConditionalGeneration, "t5gemma2": tf.T5Gemma2ForConditionalGeneration}


def build(family: str, seed: int = 0, attn_implementation: str | None = None, **config):
    torch.manual_seed(seed)
    config = CONFIGS[family](**config)
    if attn_implementation is not None and family == "t5gemma2":  # (T5Gemma runs eager: SDPA has no soft-capping)
        config._attn_implementation = attn_implementation
    return input_dependent(CLASSES[family](config).eval())


def batch(model, lengths=(57, 40, 23), seed: int = 0):
    return padded_batch(model, lengths, seed, bos=True)


SETTINGS = {
    "greedy": dict(num_beams=1, max_new_tokens=14, no_repeat_ngram_size=3),
    "beams4": dict(num_beams=4, max_new_tokens=14, no_repeat_ngram_size=3),
}
FAMILIES = tuple(CONFIGS)


# ------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("exact", [False, True], ids=["packed", "exact"])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_same_ids_as_stock_generate(family, setting, exact):
    model = build(family)
    ids, mask = batch(model)
    assert decoding.sharing(model) is None
    stock, ours = stock_and_ours(model, ids, mask, exact=exact, **SETTINGS[setting])
    assert stock.shape[0] == 3 and len({tuple(row) for row in stock.tolist()}) == 3  # input-dependent outputs
    assert stock.shape[1] == 15  # 14 new tokens: past the decoder's sliding window of 8
    assert ours.tolist() == stock.tolist()
    assert model.config._attn_implementation in ("sdpa", "eager")  # restored after decoding
    assert not any(type(m).__module__.startswith("longsum") for m in model.modules())  # stock classes back


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_ids_as_stock_generate_in_bfloat16_with_exact(family, implementation):
    """bf16 (what a GPU runs), `exact=True`: stock generate's ids with either attention implementation.
    (T5Gemma 2's default merged attention computes in float32, where the stock kernels round in bf16:
    a tiny random model's near-ties then can differ, as with packed linears; T5Gemma's runs the
    model's own attention function on grouped queries.)"""
    model = build(family, attn_implementation=implementation).to(torch.bfloat16)
    assert model.config._attn_implementation == ("eager" if family == "t5gemma" else implementation)
    ids, mask = batch(model)
    stock, ours = stock_and_ours(model, ids, mask, exact=True, **SETTINGS["beams4"])
    assert len({tuple(row) for row in stock.tolist()}) == 3 and ours.tolist() == stock.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_attention_cache_holds_one_copy_per_document(family, monkeypatch):
    """Beams 4 over 3 documents: the cross-attention keys/values are `[3, g, s, d]` in their own storage
    (not a view of 12 expanded rows) at every step; T5Gemma 2's merged attention reads them through
    `merged_shared_attention` with the beams' 12 query rows, T5Gemma's through the grouped-query function."""
    model = build(family)
    ids, mask = batch(model)
    kwargs = dict(num_beams=4, max_new_tokens=5)
    calls = []
    merged = decoding.merged_shared_attention

    def counting(query, self_key, self_value, cross_key, *rest):
        calls.append((query.shape[0], self_key.shape[0], cross_key.shape[0]))
        return merged(query, self_key, self_value, cross_key, *rest)

    monkeypatch.setattr(decoding, "merged_shared_attention", counting)
    stock = cross_caches(model, lambda i, m, **kw: model.generate(input_ids=i, attention_mask=m, **kw), ids, mask,
                          **kwargs)[-1]  # fmt: skip
    ours = cross_caches(model, lambda i, m, **kw: decoding.generate(model, i, m, **kw), ids, mask, **kwargs)
    layers = model.config.decoder.num_hidden_layers
    assert len(ours) == 5 and all(len(cache.layers) == layers for cache in ours)  # every step is over the beams
    for cache in ours:
        for layer in range(layers):
            keys, values = cache.layers[layer].keys, cache.layers[layer].values
            assert stock.layers[layer].keys.shape[0] == 12  # 3 documents x 4 beams
            assert keys.shape == values.shape == (3, *stock.layers[layer].keys.shape[1:])
            assert keys.untyped_storage().nbytes() == keys.numel() * keys.element_size()  # one copy, no more
    merged_layers = 5 * layers if family == "t5gemma2" else 0
    assert calls == [(12, 12, 3)] * merged_layers


def test_merged_shared_attention_matches_one_softmax_over_concatenated_keys():
    """The reference: T5Gemma 2's eager attention over `[self | cross]` keys copied per beam (repeat_interleave),
    with a padded document (additive and bool masks) and grouped-query heads; within 2e-6 in fp32."""
    from transformers.models.t5gemma2.modeling_t5gemma2 import eager_attention_forward

    b, k, h, g, t, n, s, d = 3, 4, 4, 2, 1, 5, 11, 8
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(b * k, h, t, d, generator=gen)
    self_key, self_value = torch.randn(2, b * k, g, n, d, generator=gen)
    cross_key, cross_value = torch.randn(2, b, g, s, d, generator=gen)
    keep = torch.ones(b * k, 1, t, n + s, dtype=torch.bool)
    keep[k : 2 * k, ..., n + 7 :] = False  # the second document is padded after 7 tokens
    keep[:, ..., 0] = False  # and the first self position is masked for all
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module.num_key_value_groups, module.head_dim, module.training = h // g, d, False
    keys = torch.cat([self_key, cross_key.repeat_interleave(k, 0)], dim=2)
    values = torch.cat([self_value, cross_value.repeat_interleave(k, 0)], dim=2)
    want, want_weights = eager_attention_forward(module, query, keys, values, additive, scaling=0.3)
    for mask in (additive, keep):
        got, weights = decoding.merged_shared_attention(query, self_key, self_value, cross_key, cross_value, mask, 0.3)
        assert got.shape == want.shape == (b * k, t, h, d)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(weights, want_weights, atol=2e-6, rtol=1e-5)
    halves = [x.to(torch.bfloat16) for x in (query, self_key, self_value, cross_key, cross_value)]
    got, _ = decoding.merged_shared_attention(*halves, keep, 0.3)  # bf16 in, float32 inside, bf16 out
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_a_family_that_cannot_share_steps_aside_with_one_line_and_stock_ids(monkeypatch, capsys):
    """T5Gemma 2's merged attention changed in a release: stock decoding, the same ids, one stderr line."""
    model = build("t5gemma2")
    ids, mask = batch(model)
    monkeypatch.setattr(decoding, "_merged_interface", lambda: "T5Gemma2MergedAttention.forward takes (x, ...)")
    monkeypatch.setattr(decoding, "_TOLD", set())
    assert decoding.sharing(model) == "T5Gemma2MergedAttention.forward takes (x, ...)"
    stock, ours = stock_and_ours(model, ids, mask, **SETTINGS["beams4"])
    assert ours.tolist() == stock.tolist()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["shared cross-attention keys/values steps aside for the stock path: "
                     "T5Gemma2MergedAttention.forward takes (x, ...)"]  # fmt: skip


# ------------------------------------------------------------------------------ checkpoints, commands
POSITIONS = {"t5gemma": 2048, "t5gemma2": 131_072}  # what their configs say: max_source_length's default


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    """(family, folder): a saved tiny model with a Gemma-style tokenizer (tokenizer.json), 8-token summaries."""
    from longsum.model.tiny import build_gemma_tokenizer

    family = request.param
    tokenizer = build_gemma_tokenizer(CORPUS, vocab_size=300)
    model = build(family, vocab_size=len(tokenizer), positions=POSITIONS[family])
    model.generation_config.max_new_tokens = 8
    folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return family, folder


def test_load_model_round_trip(checkpoint, tmp_path):
    """load_model gives the saved weights and tokenizer back (right padding for documents); saved again
    (as train saves) and loaded, the same logits; max_source_length defaults to the config's positions."""
    from longsum import load_model
    from longsum.model.generation import model_max_source_length

    family, folder = checkpoint
    model, tokenizer = load_model(folder, device="cpu", dtype="fp32")
    assert type(model) is CLASSES[family] and model.config.model_type == family
    assert type(tokenizer).__name__ == "GemmaTokenizer" and tokenizer.padding_side == "right"
    texts = [CORPUS[0], CORPUS[3] + " " + CORPUS[4]]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    assert inputs["input_ids"][0, 0] == 2 and inputs["attention_mask"][0, -1] == 0  # <bos> first, padding last
    start = torch.full((2, 1), model.generation_config.bos_token_id)
    with torch.inference_mode():
        logits = model(**inputs, decoder_input_ids=start).logits
    model.save_pretrained(tmp_path / "again")
    tokenizer.save_pretrained(tmp_path / "again")
    again, tokenizer_again = load_model(tmp_path / "again", device="cpu", dtype="fp32")
    with torch.inference_mode():
        assert torch.equal(again(**inputs, decoder_input_ids=start).logits, logits)
    assert tokenizer_again(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert model_max_source_length(model.config, tokenizer) == POSITIONS[family]
    assert decoding.sharing(model) is None


def _quiet(stderr: str) -> None:
    """No warnings, no tracebacks, and no fast path stepping aside."""
    assert "Warning" not in stderr and "Traceback" not in stderr and "steps aside" not in stderr, stderr


def test_summarize_end_to_end(checkpoint, tmp_path):
    """Three documents of different lengths in one batch; each summary is the one it gets alone."""
    family, folder = checkpoint
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(" ".join(CORPUS[i : i + 4 * (i + 1)]))
    out, alone = tmp_path / "out.jsonl", tmp_path / "alone.jsonl"
    run = run_longsum("summarize", docs, "-m", folder, "-o", out, "--batch-size", 3)
    assert run.returncode == 0, run.stderr
    _quiet(run.stderr)
    assert f"max_source_length={POSITIONS[family]}" in run.stderr
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records) == 3 and all(r["summary"] and not r["truncated"] for r in records.values())
    assert len({r["input_tokens"] for r in records.values()}) == 3
    run = run_longsum("summarize", docs, "-m", folder, "-o", alone, "--batch-size", 1)
    assert run.returncode == 0, run.stderr
    for record in map(json.loads, alone.read_text().splitlines()):
        assert record["summary"] == records[record["id"]]["summary"], record["id"]


def test_eval_end_to_end(checkpoint, tmp_path):
    family, folder = checkpoint
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": f"ex{i}", "text": " ".join(CORPUS[i : i + 6]), "summary": CORPUS[i]}) + "\n")
    out = tmp_path / "run"
    run = run_longsum("eval", data, "-m", folder, "--output-dir", out, "--batch-size", 4)
    assert run.returncode == 0, run.stderr
    _quiet(run.stderr)
    results = json.loads((out / "results.json").read_text())
    assert results["examples"] == 4 and results["failed"] == 0 and results["model"]["model_type"] == family
    assert all(0 <= results["metrics"][name]["mean"] <= 100 for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"))


def test_labels_drop_the_leading_bos_and_end_with_eos(checkpoint):
    """Gemma's tokenizer writes `<bos> text` (T5Gemma's decoder start) and no `<eos>`: labels are `text <eos>`,
    so that a fine-tuned model learns to stop; BART-style ids are left as they are."""
    from longsum.commands.train import as_labels
    from longsum.model.checkpoint import load_tokenizer

    _, folder = checkpoint
    tokenizer = load_tokenizer(folder)
    ids = tokenizer(text_target="Summaries are short.")["input_ids"]
    assert ids[0] == 2 and 1 not in ids
    assert as_labels(tokenizer, start=2)(ids) == [*ids[1:], 1]
    bart_like = as_labels(tokenizer, start=None)
    assert bart_like([2, 7, 8]) == [2, 7, 8, 1]
    # train's collator pads the labels on the tokenizer's side: on the right, after `text <eos>`, not before it
    from transformers import DataCollatorForSeq2Seq

    features = [{"input_ids": [2, 5, 6, 7], "labels": [5, 6, 1]}, {"input_ids": [2, 5], "labels": [5, 1]}]
    collated = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(features)
    assert collated["labels"].tolist() == [[5, 6, 1], [5, 1, -100]]
    assert collated["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_train_bf16_with_gradient_checkpointing_loss_falls(checkpoint, tmp_path):
    """A few steps in bf16 with gradient checkpointing: the loss falls, and the saved model keeps the
    checkpoint's local/global layer pattern and loads back."""
    from longsum import load_model
    from longsum.commands.train import TrainConfig, run

    family, folder = checkpoint
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            text = " ".join(CORPUS[(i + j) % 5] for j in range(3))
            f.write(json.dumps({"id": i, "text": text, "summary": CORPUS[i % 5]}) + "\n")
    out = tmp_path / "run"
    final = run(TrainConfig(model=str(folder), dataset=str(data), output_dir=str(out), max_steps=24, learning_rate=3e-3,
                            per_device_batch_size=4, logging_steps=4, save_steps=24, max_target_length=24, bf16=True,
                            gradient_checkpointing=True, warmup_ratio=0.0))  # fmt: skip
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    seen = [r["loss"] for r in rows if "loss" in r]
    assert len(seen) == 6 and seen[-1] < 0.7 * seen[0], seen
    model, _ = load_model(final, device="cpu", dtype="fp32")
    trained, original = model.config.to_dict(), json.loads((folder / "config.json").read_text())
    assert trained["decoder"]["layer_types"] == original["decoder"]["layer_types"]
    assert trained["decoder"]["sliding_window"] == original["decoder"]["sliding_window"]
