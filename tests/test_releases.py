"""longsum on the installed releases: no warnings from its own calls, and fast paths that step aside.

On a transformers or torch that changed under a fast path, every document still gets the stock
summary, and one stderr line says which fast path stood aside and why. Each step-aside test fakes a changed release (a signature, a removed interface, other numbers) with monkeypatch,
summarizes the same documents through `Summarizer` with the fake and with plain `model.generate`,
and compares. `exact=True` keeps torch's kernels, so the ids must be stock generate's bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf
from transformers.models.longt5 import modeling_longt5 as stock

from longsum.model import decoding, longt5
from longsum.model.generation import GenerationOptions, Summarizer
from tests import helpers
from tests.conftest import CORPUS, input_dependent

DOCS = [" ".join(CORPUS[i : i + n]) for i, n in ((0, 6), (3, 2), (5, 9), (1, 4), (7, 1))]
OPTIONS = dict(num_beams=4, max_new_tokens=8, min_new_tokens=2, no_repeat_ngram_size=2, batch_size=2, exact=True)
BART_DIMS = {**helpers.BART_DIMS, **helpers.NO_DROPOUT, **helpers.BART_TOKENS}


def _lsg_bart(vocab):
    from longsum.model.lsg import LSGBartForConditionalGeneration
    from longsum.model.tiny import tiny_lsg_bart_config

    return LSGBartForConditionalGeneration(tiny_lsg_bart_config(vocab, 1024, block_size=8, sparse_block_size=8))


MODELS = {
    "lsg_bart": _lsg_bart,
    "led": lambda vocab: tf.LEDForConditionalGeneration(tf.LEDConfig(
        vocab_size=vocab, **BART_DIMS, attention_window=8, max_encoder_position_embeddings=256,
        max_decoder_position_embeddings=64)),
    "longt5": lambda vocab: tf.LongT5ForConditionalGeneration(tf.LongT5Config(
        vocab_size=vocab, **helpers.T5_DIMS, dropout_rate=0.0, local_radius=4, encoder_attention_type="local",
        **helpers.T5_TOKENS)),
}  # fmt: skip


def build(name, tokenizer):
    torch.manual_seed(0)
    return input_dependent(MODELS[name](len(tokenizer)).eval())


def summarize(model, tokenizer) -> list[str]:
    out: dict = {}
    summarizer = Summarizer(model, tokenizer, GenerationOptions(**OPTIONS))
    out.update(summarizer.summarize(enumerate(DOCS)))
    assert sorted(out) == list(range(len(DOCS))) and not any(r.error for r in out.values()), out
    return [out[key].summary for key in sorted(out)]


def stock_summaries(model, tokenizer, monkeypatch) -> list[str]:
    """The same run with `decoding.generate` replaced by plain `model.generate`."""
    with monkeypatch.context() as patch:
        patch.setattr(decoding, "generate", lambda model, input_ids, attention_mask=None, exact=False, compile=False,
                      **kwargs: model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs))  # fmt: skip
        return summarize(model, tokenizer)


def asides(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "steps aside for the stock path" in line]


@pytest.fixture(autouse=True)
def fresh_lines(monkeypatch):
    """Each test sees its own step-aside lines (each is printed once per process)."""
    monkeypatch.setattr(decoding, "_TOLD", set())


@pytest.fixture
def fresh_interfaces(monkeypatch):
    """Registration and interface checks run again under the fake, and again after it."""
    monkeypatch.setattr(decoding, "_REGISTERED", False)
    decoding._interfaces.cache_clear()
    yield
    decoding._interfaces.cache_clear()


def test_a_removed_attention_interface_steps_aside(tokenizer, monkeypatch, capsys, fresh_interfaces):
    model = build("lsg_bart", tokenizer)
    want = stock_summaries(model, tokenizer, monkeypatch)
    owner = next(cls for cls in tf.AttentionInterface.__mro__ if "register" in vars(cls))
    monkeypatch.delattr(owner, "register")  # a release without it
    capsys.readouterr()
    assert summarize(model, tokenizer) == want and len(set(want)) > 1
    (line,) = asides(capsys)
    assert line.startswith("shared cross-attention keys/values steps aside") and "interface changed" in line


def _rename_led_cache_keyword(monkeypatch, model):
    """A release whose LED attention takes its cache as `kv_cache` (as 5.24 renamed `past_key_values`)."""
    from transformers.models.led.modeling_led import LEDDecoderAttention

    original = LEDDecoderAttention.forward

    def forward(self, hidden_states, key_value_states=None, kv_cache=None, attention_mask=None,
                output_attentions=False):  # fmt: skip
        return original(self, hidden_states, key_value_states, kv_cache, attention_mask, output_attentions)

    def rename(module, args, kwargs):  # the release's decoder layer passes the new keyword
        kwargs["kv_cache"] = next((kwargs.pop(name) for name in decoding.CACHE_KEYWORDS if name in kwargs), None)
        return args, kwargs

    monkeypatch.setattr(LEDDecoderAttention, "forward", forward)
    for module in model.modules():
        if isinstance(module, LEDDecoderAttention):
            module.register_forward_pre_hook(rename, with_kwargs=True)


def test_a_changed_led_signature_is_seen_before_decoding(tokenizer, monkeypatch, capsys):
    model = build("led", tokenizer)
    _rename_led_cache_keyword(monkeypatch, model)
    want = stock_summaries(model, tokenizer, monkeypatch)
    capsys.readouterr()
    assert summarize(model, tokenizer) == want and len(set(want)) > 1
    (line,) = asides(capsys)
    assert "LEDDecoderAttention.forward takes (hidden_states, key_value_states, kv_cache" in line


def test_an_unknown_keyword_at_run_time_falls_back_to_stock_generate(tokenizer, monkeypatch, capsys):
    """The change slips past the checks (as 5.24's rename did): the first batch fails in the fast path,
    is decoded again by stock generate, and every later batch goes straight to stock generate."""
    model = build("led", tokenizer)
    _rename_led_cache_keyword(monkeypatch, model)
    monkeypatch.setattr(decoding, "_led_interface", lambda: None)
    want = stock_summaries(model, tokenizer, monkeypatch)
    calls = []
    stock_generate = type(model).generate
    monkeypatch.setattr(type(model), "generate", lambda self, *a, **k: calls.append(1) or stock_generate(self, *a, **k))
    capsys.readouterr()
    assert summarize(model, tokenizer) == want and len(set(want)) > 1
    (line,) = asides(capsys)
    assert line.startswith("fast decoding steps aside") and "unexpected keyword argument 'kv_cache'" in line
    # 3 batches: the first failed before its generate() call and was retried, the other two went straight there
    assert decoding._STOCK_ONLY[model].startswith("TypeError") and len(calls) == 3


def test_an_input_that_stock_generate_rejects_too_stays_an_error(tokenizer):
    """The fallback is not a second chance for bad input: stock's own error is raised, nothing is marked."""
    model = build("lsg_bart", tokenizer)
    too_long = torch.full((1, 2000), 5)  # past the 1,024 positions
    with pytest.raises(Exception, match="1024|1,024|longer"):
        decoding.generate(model, too_long, num_beams=2, max_new_tokens=3)
    assert model not in decoding._STOCK_ONLY


def test_packed_kernels_step_aside_when_torch_lacks_them(tokenizer, monkeypatch, capsys):
    model = build("lsg_bart", tokenizer)
    want = stock_summaries(model, tokenizer, monkeypatch)

    def missing(*args):  # a torch without the private op (an op namespace finds a deleted name again)
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_reorder_linear_weight'")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing)
    monkeypatch.setitem(OPTIONS, "exact", False)  # the packed kernels are the default
    decoding.packing_fails.cache_clear()
    try:
        capsys.readouterr()
        got = summarize(model, tokenizer)
        (line,) = asides(capsys)
    finally:
        decoding.packing_fails.cache_clear()
    assert got == want  # torch's own kernels: stock ids
    assert line.startswith("oneDNN packed linear layers steps aside") and "_reorder_linear_weight" in line
    assert all(type(m) is not decoding.PackedLinear for m in model.modules())


def test_a_layer_that_cannot_be_packed_unpacks_the_others(tokenizer, monkeypatch, capsys):
    """The probe passed, but one layer of the model fails to pack: every layer is restored bit for bit
    and the run goes on with torch's kernels."""
    assert decoding.packing_fails() is None  # (the probe ran before the op fails)
    model = build("lsg_bart", tokenizer)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    real, calls = torch.ops.mkldnn._reorder_linear_weight, []

    def fails_third(weight, rows):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("could not create a primitive descriptor")
        return real(weight, rows)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", fails_third)
    capsys.readouterr()
    with decoding.packed_linears(model):
        assert all(type(m) is not decoding.PackedLinear for m in model.modules())
    (line,) = asides(capsys)
    assert "RuntimeError: could not create a primitive descriptor" in line
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_longt5_attention_steps_aside_when_the_stock_numbers_change(tokenizer, monkeypatch, capsys):
    """A release whose LongT5 local attention computes something else: longsum's would no longer be
    the same model, so the stock modules stay (and give the stock summaries)."""
    original = stock.LongT5LocalAttention.forward

    def changed(self, hidden_states, *args, **kwargs):
        out = original(self, hidden_states, *args, **kwargs)
        return (out[0] * 1.5, *out[1:])

    monkeypatch.setattr(stock.LongT5LocalAttention, "forward", changed)
    longt5.differs.cache_clear()
    try:
        model = build("longt5", tokenizer)
        want = stock_summaries(model, tokenizer, monkeypatch)
        capsys.readouterr()
        assert longt5.use_longsum_attention(model) == 0
        (line,) = asides(capsys)
        assert summarize(model, tokenizer) == want and len(set(want)) > 1
    finally:
        longt5.differs.cache_clear()
    assert line.startswith("longsum's LongT5 attention steps aside") and "other numbers" in line
    assert all(type(m) is not longt5.LocalAttention for m in model.modules())


def test_longt5_attention_is_used_where_it_gives_the_stock_numbers(tokenizer, capsys):
    model = build("longt5", tokenizer)
    assert longt5.differs(stock.LongT5LocalAttention) is None
    assert longt5.use_longsum_attention(model) == 2 and not asides(capsys)
    assert sum(type(m) is longt5.LocalAttention for m in model.modules()) == 2


@pytest.mark.parametrize("family", MODELS)
def test_summarize_with_beams_prints_no_warning(tmp_path, tokenizer, family):
    """The whole command in its own process (the way users see it): every document summarized, and
    nothing on stderr but longsum's own lines: no FutureWarning/DeprecationWarning from our calls."""
    model = build(family, tokenizer)
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(DOCS):
        (docs / f"{i}.txt").write_text(text)
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "longsum", "summarize", str(docs), "--model", str(tmp_path / "model"),
                           "--num-beams", "4", "-o", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "always"})  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert proc.returncode == 0, proc.stderr
    assert len(records) == len(DOCS) and all(r.get("summary") for r in records)
    assert not [line for line in proc.stderr.splitlines() if "warn" in line.lower()], proc.stderr
