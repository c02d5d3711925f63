"""`--dtype int8` on CPU: int8 linear layers (oneDNN's and fbgemm's kernels), how far results move from fp32,
and the run's identity."""

from __future__ import annotations

import copy

import pytest
import torch

from longsum.errors import ModelLoadError
from longsum.model import int8
from tests.helpers import BART_TOKENS, NO_DROPOUT

pytestmark = pytest.mark.skipif(int8.int8_fails() is not None, reason=f"no oneDNN int8 kernels: {int8.int8_fails()}")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("act_range", [int8.FULL_RANGE, int8.SAFE_RANGE])
def test_int8_linear_matches_float_within_quantization_error(act_range):
    if act_range == int8.FULL_RANGE and int8.activation_range() != int8.FULL_RANGE:
        pytest.skip("this CPU's int8 products saturate for 8-bit inputs")
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(256, 96)
    x = torch.randn(2, 5, 256, generator=g) * torch.logspace(-2, 2, 5).view(1, 5, 1)  # rows of very unequal size
    quantized = int8.Int8Linear(layer, act_range)
    with torch.no_grad():
        expected, got = layer(x), quantized(x)
    assert got.shape == expected.shape == (2, 5, 96) and got.dtype == torch.float32
    # per-row scales: each row as close as the others, however small (per-tensor scales: small rows ~1)
    errors = [relative_error(got[0, i], expected[0, i]) for i in range(5)]
    assert max(errors) < (0.02 if act_range == int8.FULL_RANGE else 0.04) and min(errors) > 1e-4  # quantized
    assert quantized.weight.dtype == torch.int8


KERNELS = {"onednn": int8.ONEDNN_ONLY, "fbgemm": dict.fromkeys(int8.ONEDNN_ONLY, "fbgemm"),
           "chosen": {"one": "fbgemm", "few": "fbgemm", "several": "onednn", "many": "onednn"}}  # fmt: skip
needs_fbgemm = pytest.mark.skipif(int8.fbgemm_fails() is not None, reason=f"no fbgemm: {int8.fbgemm_fails()}")


@needs_fbgemm
@pytest.mark.parametrize("rows", [1, 5])
def test_fbgemm_kernel_matches_float_per_row(rows):
    """fbgemm's one input scale per call, made per row (each row scaled to max |x| = 1): small rows keep their precision."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(256, 96)
    x = torch.randn(rows, 256, generator=g) * torch.logspace(-2, 2, rows).view(rows, 1)  # [rows, 256], unequal sizes
    quantized = int8.Int8Linear(layer, int8.activation_range(), KERNELS["fbgemm"])
    with torch.no_grad():
        expected, got = layer(x), quantized(x)
    errors = [relative_error(got[i], expected[i]) for i in range(rows)]
    assert max(errors) < 0.04 and min(errors) > 1e-4


@needs_fbgemm
@pytest.mark.parametrize("kernel", ["onednn", "fbgemm"])
def test_no_row_depends_on_its_batch_mates(kernel):
    """A row's result is the same, bit for bit, whatever the other rows of the call hold (integer products
    are exact; each row has its own input scale): one document's summary never depends on another's."""
    g = torch.Generator().manual_seed(0)
    layer = int8.Int8Linear(torch.nn.Linear(128, 64), int8.activation_range(), KERNELS[kernel])
    row = torch.randn(1, 128, generator=g)
    with torch.no_grad():
        quiet = layer(torch.cat([row, torch.randn(3, 128, generator=g) * 0.01]))
        loud = layer(torch.cat([row, torch.randn(3, 128, generator=g) * 100]))
    assert torch.equal(quiet[0], loud[0])


@needs_fbgemm
def test_a_layer_packs_only_the_kernels_it_runs_and_each_gives_the_weight_back():
    layer = torch.nn.Linear(128, 64)
    quantized = int8.Int8Linear(layer, int8.activation_range(), KERNELS["chosen"])
    q = quantized.int8_weight().clone()  # [64, 128]
    assert q.dtype == torch.int8 and q.shape == (64, 128) and quantized.packs == {}
    with torch.no_grad():
        quantized(torch.randn(1, 128))  # one row: fbgemm packed, the plain copy dropped
        assert set(quantized.packs) == {"fbgemm"} and quantized.plain is None
        assert torch.equal(quantized.int8_weight(), q)
        quantized(torch.randn(300, 128))  # many rows: oneDNN packed from fbgemm's pack
    assert set(quantized.packs) == {"fbgemm", "onednn"}
    del quantized.packs["fbgemm"]
    assert torch.equal(quantized.int8_weight(), q)  # from oneDNN's pack
    assert quantized.weight.shape == (64, 128) and quantized.weight.dtype == torch.int8


def test_without_fbgemm_onednn_runs_every_layer_with_one_line(monkeypatch, capsys):
    from longsum import console
    from longsum.model import decoding

    def removed(layer, q):  # as a torch release without quantized tensors would fail
        raise RuntimeError("torch 9 removed quantized tensors")

    monkeypatch.setitem(int8.PACK, "fbgemm", removed)
    monkeypatch.setattr(decoding, "_TOLD", set())
    monkeypatch.setattr(console, "_VERBOSE", [False])
    int8.fbgemm_fails.cache_clear()
    try:
        assert int8.int8_kernels() == int8.ONEDNN_ONLY
    finally:
        int8.fbgemm_fails.cache_clear()
    err = capsys.readouterr().err
    assert "torch 9 removed quantized tensors" in err and len(err.strip().splitlines()) == 1


def test_activation_range_is_safe_on_this_cpu():
    """The range chosen gives oneDNN's exact integer products on this CPU (saturation would break them)."""
    r = int8.activation_range()
    weight = torch.randint(-127, 128, (16, 512), dtype=torch.int8)
    rows = torch.randint(1, 2 * r + 2, (4, 512), dtype=torch.uint8)
    out = torch.ops.onednn.qlinear_pointwise(rows, 1.0, 0, torch.ops.onednn.qlinear_prepack(weight, None),
                                             torch.ones(16), torch.zeros(16, dtype=torch.long), None, 1.0, 0,
                                             torch.float32, "none", [], "")  # fmt: skip
    assert torch.equal(out.double(), rows.double() @ weight.double().t())


def test_load_model_int8_quantizes_encoder_decoder_and_head(tiny_model_dir):
    from longsum.model.checkpoint import load_model

    fp32, tokenizer = load_model(tiny_model_dir, device="cpu", dtype="fp32")
    model, _ = load_model(tiny_model_dir, device="cpu", dtype="int8")
    linears = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    quantized = {name for name, m in model.named_modules() if isinstance(m, int8.Int8Linear)}
    assert not linears and "lm_head" in quantized
    assert any(name.startswith("model.encoder.") for name in quantized)  # LSG's projections, not its attention
    assert model.get_input_embeddings().weight.dtype == torch.float32  # the embeddings stay float
    ids = tokenizer(["Long documents need long-context models. " * 8], return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids, decoder_input_ids=ids.input_ids[:, :6]).logits
        reference = fp32(**ids, decoder_input_ids=ids.input_ids[:, :6]).logits
    assert 1e-5 < relative_error(logits, reference) < 0.05


def test_longt5_int8_keeps_its_attention_float():
    """LongT5's feed-forward checks its weight's dtype; its encoder attention (longsum's) stays float."""
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    from longsum.model import longt5
    from tests.helpers import T5_DIMS, T5_OWN_TOKENS

    torch.manual_seed(0)
    config = LongT5Config(vocab_size=300, **T5_DIMS, dropout_rate=0.0, **T5_OWN_TOKENS, local_radius=3,
                          global_block_size=4, encoder_attention_type="transient-global")  # fmt: skip
    model = LongT5ForConditionalGeneration(config).eval()
    longt5.use_longsum_attention(model)
    quantized = int8.quantize_int8(copy.deepcopy(model))
    ids = torch.randint(3, 300, (2, 40))
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        got = quantized(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    assert 1e-5 < relative_error(got, expected) < 0.05
    assert isinstance(quantized.encoder.block[0].layer[0].TransientGlobalSelfAttention.q, int8.Int8Linear)


def test_int8_is_cpu_only_with_a_one_line_error():
    from longsum.model.checkpoint import dtype_name, resolve_dtype

    assert resolve_dtype("int8", "cpu") == torch.float32  # loaded as fp32, then quantized
    for device in ("cuda", "cuda:1", "mps"):
        with pytest.raises(ModelLoadError, match=r"--dtype int8 runs on CPU only") as err:
            resolve_dtype("int8", device)
        assert "\n" not in str(err.value)
    assert dtype_name("int8", "cpu") == "int8" and dtype_name("fp32", "cpu") == "float32"


def test_int8_on_a_gpu_device_is_a_one_line_error_from_the_command(tiny_model_dir, tmp_path, monkeypatch):
    from longsum.model import checkpoint
    from tests.helpers import run_longsum

    monkeypatch.setattr(checkpoint, "resolve_device", lambda device="auto": "cuda")  # as on a machine with a GPU
    (tmp_path / "doc.txt").write_text("Long documents need long-context models.")
    run = run_longsum("summarize", str(tmp_path / "doc.txt"), "-m", str(tiny_model_dir), "--dtype", "int8")
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --dtype int8 runs on CPU only") and "Traceback" not in run.stderr


def test_identity_of_an_int8_run_differs_from_fp32(tiny_model_dir):
    from longsum.model.generation import GenerationOptions, plan_settings

    options = GenerationOptions()
    fp32 = plan_settings(str(tiny_model_dir), options, "fp32", "cpu").as_dict()
    quantized = plan_settings(str(tiny_model_dir), options, "int8", "cpu").as_dict()
    assert (fp32["dtype"], quantized["dtype"]) == ("float32", "int8")
    assert {k: v for k, v in fp32.items() if k != "dtype"} == {k: v for k, v in quantized.items() if k != "dtype"}


def test_an_int8_run_does_not_resume_into_an_fp32_output(tiny_model_dir, tmp_path):
    from tests.helpers import run_longsum

    (tmp_path / "doc.txt").write_text("Long documents need long-context models.")
    out = tmp_path / "out.jsonl"
    common = ("summarize", str(tmp_path / "doc.txt"), "-m", str(tiny_model_dir), "--device", "cpu", "-o", str(out))
    assert run_longsum(*common, "--dtype", "fp32").returncode == 0
    run = run_longsum(*common, "--dtype", "int8")
    assert run.returncode != 0 and "dtype" in run.stderr and "int8" in run.stderr


# -- how far int8 moves results, on a model trained to peaked distributions -------------------------------
VOCAB, SOURCE, TARGET = 96, 24, 12


@pytest.fixture(scope="module")
def trained():
    """A tiny BART trained here to write the first 12 tokens of its source reversed (random weights give flat
    distributions, where rounding flips the argmax far more often than in a trained model)."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_position_embeddings=64, forced_eos_token_id=None, **BART_TOKENS, **NO_DROPOUT)  # fmt: skip
    model = BartForConditionalGeneration(config)
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        source, target = task(32, g)
        loss = model(input_ids=source, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5, "the tiny model did not learn its task: its distributions are not peaked"
    return model.eval(), task(32, g)[0]


def task(n: int, g: torch.Generator):
    source = torch.randint(5, VOCAB, (n, SOURCE), generator=g)  # [n, 24]
    return source, torch.cat([source[:, :TARGET].flip(1), torch.full((n, 1), BART_TOKENS["eos_token_id"])], 1)


@pytest.mark.slow
@pytest.mark.parametrize("kernels,head", [("onednn", True), ("onednn", False), ("fbgemm", True)],
                         ids=["onednn", "onednn-fp32-head", "fbgemm"])  # fmt: skip
@pytest.mark.parametrize("beams", [1, 4])
def test_int8_moves_results_little_on_a_trained_model(trained, kernels, head, beams):
    """Tolerances from the measurement in docs/cpu-decoding.md (1.0-1.7% median logit error, 6.5-16% at most,
    99.8-100% top-1 agreement, 90-100% identical summaries over 448 steps of 32 documents, with 8-bit and
    7-bit inputs), with room for another CPU's rounding."""
    model, sources = trained
    if kernels == "fbgemm" and int8.fbgemm_fails():
        pytest.skip(int8.fbgemm_fails())
    quantized = int8.quantize_int8(copy.deepcopy(model), head=head, kernels=KERNELS[kernels])
    assert isinstance(quantized.lm_head, int8.Int8Linear) == head
    stats = int8.compare(model, quantized, sources, num_beams=beams, max_new_tokens=TARGET + 2,
                         min_new_tokens=TARGET + 2, do_sample=False)  # fmt: skip
    assert stats["steps"] >= 400
    # (the largest single-step error moves most between CPUs and trainings: 7-bit inputs measured 16-31%)
    assert 1e-4 < stats["logit_rel_error"] < 0.03 and stats["logit_rel_error_max"] < 0.4
    assert stats["top1_agreement"] >= 0.98 and stats["identical_summaries"] >= 0.75


def test_int8_decoding_through_longsum_matches_stock_generate_on_the_int8_model(tiny_model_dir):
    """longsum's decoding of an int8 model gives stock generate's ids on that same int8 model."""
    from longsum.model import decoding
    from longsum.model.checkpoint import load_model

    model, tokenizer = load_model(tiny_model_dir, device="cpu", dtype="int8")
    ids = tokenizer(["Long documents need long-context models. " * 6, "Summaries are short."], padding=True,
                    return_tensors="pt")  # fmt: skip
    kwargs = dict(num_beams=3, max_new_tokens=8, min_new_tokens=8, no_repeat_ngram_size=3, do_sample=False)
    with torch.no_grad():
        stock = model.generate(**ids, **kwargs)
        ours = decoding.generate(model, ids.input_ids, ids.attention_mask, **kwargs)
    assert torch.equal(stock, ours)
