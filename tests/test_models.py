"""`load_model`: original LSG checkpoints, longsum's own, stock seq2seq models, and bad input."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from longsum import load_model
from longsum.errors import ModelLoadError
from tests.conftest import LSG_REF, random_ids

# What README.md and docs/lsg.md promise; measured here (torch 2.13, CPU, fp32): at most 3.4e-6 (a_norm, "long").
ATOL = 4e-6


@pytest.mark.parametrize("name", ["a_norm", "b_pooling", "f_none"])
def test_original_lsg_checkpoints_match_reference_outputs(name):
    """Checkpoints written by the original converter load without running their code and match."""
    folder = LSG_REF / name
    model, tokenizer = load_model(folder)
    assert type(model).__name__ == "LSGBartForConditionalGeneration"
    assert not any("modeling_lsg" in m for m in sys.modules)  # the raising checkpoint file never ran
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    ref = torch.load(folder / "reference_outputs.pt", weights_only=True)
    for x in ("batch", "long", "short"):
        ids, mask = inputs[f"input_ids_{x}"], inputs[f"attention_mask_{x}"]
        with torch.no_grad():
            enc = model.get_encoder()(input_ids=ids, attention_mask=mask.clone()).last_hidden_state
            logits = model(
                input_ids=ids, attention_mask=mask.clone(), decoder_input_ids=inputs[f"decoder_input_ids_{x}"]
            ).logits
            greedy = model.generate(ids, attention_mask=mask.clone(), max_new_tokens=8, num_beams=1, do_sample=False)
            beam = model.generate(ids, attention_mask=mask.clone(), max_new_tokens=8, num_beams=2, do_sample=False)
        real = torch.cat([torch.ones(len(ids), 1, dtype=torch.bool), mask.bool()], dim=1)  # global + real tokens
        torch.testing.assert_close(enc[real], ref[f"enc_{x}"][real], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits, ref[f"logits_{x}"], atol=ATOL, rtol=0)
        assert torch.equal(greedy, ref[f"gen_greedy_{x}"]), x
        assert torch.equal(beam, ref[f"gen_beam2_{x}"]), x
    assert tokenizer.pad_token_id == 1


def test_original_checkpoint_classification_task():
    model, _ = load_model(LSG_REF / "a_norm", task="classification")
    assert type(model).__name__ == "LSGBartForSequenceClassification"
    with torch.no_grad():
        assert model(input_ids=random_ids(1, 100)).logits.shape == (1, 3)


def test_longsum_checkpoint_round_trip_and_plain_transformers(tmp_path, tiny_lsg_bart, tokenizer):
    from transformers import AutoModelForSeq2SeqLM

    model = tiny_lsg_bart(seed=7, sparsity_type="pooling", num_global_tokens=4)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "lsg_bart" and saved["num_global_tokens"] == 4 and "auto_map" not in saved
    assert (tmp_path / "model.safetensors").exists()

    loaded, _ = load_model(tmp_path)
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(plain).__name__ == "LSGBartForConditionalGeneration"
    ids = random_ids(2, 300)
    dec = torch.tensor([[2, 9, 4]] * 2)
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=dec).logits
        torch.testing.assert_close(loaded(input_ids=ids, decoder_input_ids=dec).logits, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(plain(input_ids=ids, decoder_input_ids=dec).logits, want, atol=1e-6, rtol=0)


def test_import_longsum_has_no_side_effects_and_register_is_explicit(tmp_path):
    """`import longsum` imports neither torch nor transformers, and a later `import transformers`
    stays as fast as without longsum (no import hook); `longsum.register()` registers the LSG types."""
    import subprocess

    code = (
        "import sys, longsum; assert 'torch' not in sys.modules and 'transformers' not in sys.modules;"
        "import transformers; from transformers import AutoConfig; assert 'longsum.model.lsg' not in sys.modules;"
        "longsum.register(); print(AutoConfig.for_model('lsg_bart').__class__.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "LSGBartConfig"


def _save_stock(tmp_path, config, model_cls, tokenizer):
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def stock_configs(vocab):
    from transformers import (
        BartConfig,
        BigBirdPegasusConfig,
        LEDConfig,
        LongT5Config,
        PegasusConfig,
        PegasusXConfig,
        T5Config,
    )

    small = dict(
        vocab_size=vocab,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    t5 = dict(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return {
        "bart": BartConfig(**small, max_position_embeddings=256),
        "pegasus": PegasusConfig(**small, max_position_embeddings=256),
        "t5": T5Config(**t5),
        "longt5-local": LongT5Config(**t5, encoder_attention_type="local", local_radius=8),
        "longt5-tglobal": LongT5Config(
            **t5, encoder_attention_type="transient-global", local_radius=8, global_block_size=4
        ),
        "led": LEDConfig(
            **small, max_encoder_position_embeddings=512, max_decoder_position_embeddings=64, attention_window=16
        ),
        "pegasus_x": PegasusXConfig(
            **small, max_position_embeddings=512, block_size=16, num_global_tokens=4, stagger_local_blocks=True
        ),
        "bigbird_pegasus": BigBirdPegasusConfig(
            **small, max_position_embeddings=512, block_size=8, num_random_blocks=2, attention_type="block_sparse"
        ),
    }


@pytest.mark.parametrize(
    "kind", ["bart", "pegasus", "t5", "longt5-local", "longt5-tglobal", "led", "pegasus_x", "bigbird_pegasus"]
)
def test_stock_seq2seq_models_load(kind, tmp_path, tokenizer):
    from transformers import AutoModelForSeq2SeqLM

    config = stock_configs(len(tokenizer))[kind]
    folder = _save_stock(tmp_path, config, AutoModelForSeq2SeqLM.from_config, tokenizer)
    model, tok = load_model(folder)
    assert model.config.model_type == config.model_type
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    ids = tok(["a long document " * 40], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4)
    assert out.shape[0] == 1


def test_missing_local_path_is_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model(tmp_path / "nope")
    assert "\n" not in str(err.value)


def test_unreachable_hub_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not be fetched from the Hugging Face Hub.*local") as err:
        load_model("someone/not-cached-model-xyz")
    assert "\n" not in str(err.value)


def test_alias_without_hub_names_the_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="facebook/bart-base"):
        load_model("bart-base")


def test_unsupported_architecture(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    folder = _save_stock(
        tmp_path,
        BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        ),
        BertModel,
        tokenizer,
    )
    with pytest.raises(ModelLoadError, match="unsupported architecture 'bert'.*bart") as err:
        load_model(folder)
    assert "\n" not in str(err.value)


def test_checkpoint_without_tokenizer(tmp_path):
    shutil.copytree(LSG_REF / "f_none", tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (tmp_path / "m" / name).unlink()
    with pytest.raises(ModelLoadError, match="no usable tokenizer"):
        load_model(tmp_path / "m")


def test_bad_task_and_dtype():
    with pytest.raises(ModelLoadError, match="unknown task"):
        load_model(LSG_REF / "a_norm", task="qa")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(LSG_REF / "a_norm", dtype="int3")


def test_auto_device_and_dtype_on_cpu():
    from longsum.model.checkpoint import resolve_device, resolve_dtype

    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16


@pytest.mark.gpu
def test_cuda_bf16_load_and_generate():
    model, _ = load_model(LSG_REF / "a_norm", device="auto", dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    inputs = torch.load(LSG_REF / "a_norm" / "inputs.pt", weights_only=True)
    with torch.no_grad():
        out = model.generate(inputs["input_ids_long"].cuda(), max_new_tokens=4)
    assert out.shape[0] == 1


def test_the_registry_and_the_lsg_classes_agree():
    """One table (longsum.registry) drives load_model, convert and the CLI: the classes match it."""
    from longsum.model.lsg import LSG_FAMILIES
    from longsum.registry import FAMILIES, TASKS

    assert set(LSG_FAMILIES) == set(FAMILIES)
    for model_type, family in FAMILIES.items():
        assert set(LSG_FAMILIES[model_type]) - {"config"} == set(family.tasks)
        assert set(family.tasks) <= set(TASKS)


def test_every_advertised_task_loads_a_stock_encoder(tmp_path, tokenizer):
    """`task="masked_lm"` on a stock BERT used to end in a KeyError although TASKS listed it."""
    from transformers import BertConfig, BertForMaskedLM

    from longsum.registry import TASKS

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    _save_stock(tmp_path, config, BertForMaskedLM, tokenizer)
    for task in TASKS:
        if task == "seq2seq":
            with pytest.raises(ModelLoadError, match="unsupported architecture 'bert' for task 'seq2seq'"):
                load_model(tmp_path, task=task, device="cpu")
            continue
        model, _ = load_model(tmp_path, task=task, device="cpu")
        assert model.config.model_type == "bert"
    masked, _ = load_model(tmp_path, task="masked_lm", device="cpu")
    assert type(masked).__name__ == "BertForMaskedLM"


def test_22_13_a_config_that_does_not_match_the_weights_is_one_line_naming_a_tensor(tmp_path, tiny_model_dir):
    folder = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["encoder_ffn_dim"] *= 2  # a hand-edited (or another checkpoint's) config.json
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_model(folder, device="cpu")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "does not match its weights" in message
    assert "fc1.bias: [64] in the weights, [128] from config.json" in message
