"""`longsum train` on a tiny model built in code: learning, checkpointing, resume, config, DDP."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from longsum.commands.train import TrainConfig, load_config_file, run
from longsum.errors import LongsumError
from tests.helpers import run_longsum

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The summary is the first sentence: learnable by copying."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("train-data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            first = " ".join(rng.choice(WORDS) for _ in range(5)) + "."
            rest = " ".join(" ".join(rng.choice(WORDS) for _ in range(8)) + "." for _ in range(4))
            f.write(json.dumps({"id": i, "text": f"{first} {rest}", "summary": first}) + "\n")
        f.write(json.dumps({"id": 99, "text": "   ", "summary": "empty text is dropped"}) + "\n")
    return path


def losses(out):
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_tiny_model_learns_and_saves_everything(tmp_path, tiny_model_dir, data):
    from longsum import load_model

    out = tmp_path / "run"
    final = run(TrainConfig(model=str(tiny_model_dir), dataset=str(data), output_dir=str(out), max_steps=60,
                            learning_rate=5e-3, per_device_batch_size=4, logging_steps=5, save_steps=30,
                            max_target_length=16, warmup_ratio=0.05))  # fmt: skip
    seen = losses(out)
    assert len(seen) == 12 and seen[-1] < 0.6 * seen[0], seen  # the loss falls clearly
    model, _ = load_model(final)
    assert type(model).__name__ == "LSGBartForConditionalGeneration"
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["longsum"]["learning_rate"] == 5e-3 and saved["training_arguments"]["max_steps"] == 60
    assert (out / "train_curves.png").stat().st_size > 1000
    assert (out / "checkpoint-60" / "trainer_state.json").exists()


def test_lsg_gradient_checkpointing_and_rouge_eval(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    run(TrainConfig(model=str(tiny_model_dir), dataset=str(data), eval_dataset=str(data), output_dir=str(out),
                    max_steps=4, per_device_batch_size=2, gradient_checkpointing=True, eval_steps=2, save_steps=2,
                    eval_limit=4, logging_steps=1, max_target_length=8, max_source_length=128))  # fmt: skip
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_rougeLsum" in r]
    assert len(evals) == 2 and all(0 <= r["eval_rougeLsum"] <= 100 for r in evals)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_metric"] is not None  # best checkpoint tracked by rougeLsum


def test_config_file_sets_options_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("learning_rate: 1.0e-4\nmax-steps: 7\nadam_beta2: 0.98\n")
    assert load_config_file(str(good)) == {"learning_rate": 1e-4, "max_steps": 7, "training_args": {"adam_beta2": 0.98}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rate": 1e-4, "learnin_rate": 3}))
    with pytest.raises(LongsumError, match="unknown key 'learnin_rate'"):
        load_config_file(str(bad))
    proc = run_longsum("train", "--config", bad)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown key 'learnin_rate'")
    assert len(proc.stderr.splitlines()) == 1


def test_nan_loss_stops_with_advice(tmp_path, tiny_model_dir, data):
    with pytest.raises(LongsumError, match="loss became nan at step .*lower --learning-rate"):
        run(TrainConfig(model=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "run"), max_steps=20,
                        learning_rate=1e9, warmup_ratio=0.0, logging_steps=1, save_steps=100,
                        max_target_length=8, training_args={"max_grad_norm": 0.0}))  # fmt: skip


@pytest.mark.slow
def test_kill_then_resume_continues_from_the_last_checkpoint(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "longsum", "train", "--model", str(tiny_model_dir), "--dataset", str(data),
           "--output-dir", str(out), "--max-steps", "60", "--save-steps", "5", "--logging-steps", "1",
           "--max-target-length", "8", "--save-total-limit", "3"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "checkpoint-10" / "trainer_state.json").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert not (out / "final").exists(), "the run should be killed before the end"
    done = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    result = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == ""  # no loss dicts on stdout; progress is longsum's own lines on stderr
    assert "it/s" not in result.stderr and "Warning" not in result.stderr and "step 60/60  loss" in result.stderr
    assert f"resuming from {out / f'checkpoint-{done}'}" in result.stderr.replace("\n", "")
    state = json.loads((out / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60 and (out / "final" / "model.safetensors").exists()


def test_resume_path_must_be_a_checkpoint(tmp_path, tiny_model_dir, data):
    with pytest.raises(LongsumError, match="not a checkpoint folder"):
        run(TrainConfig(model=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path), resume=str(tmp_path)))


@pytest.mark.slow
def test_two_process_ddp(tmp_path, tiny_model_dir, data):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29557",
           "-m", "longsum", "train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(out),
           "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--max-target-length", "8"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and (out / "final" / "model.safetensors").exists()
    assert len([line for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]) == 4


def test_resume_skips_a_checkpoint_interrupted_while_saving(tmp_path, tiny_model_dir, data, capsys):
    out = tmp_path / "run"
    base = dict(model=str(tiny_model_dir), dataset=str(data), output_dir=str(out), save_steps=2, logging_steps=1,
                max_target_length=8, save_total_limit=None)  # fmt: skip
    run(TrainConfig(**base, max_steps=4))
    broken = out / "checkpoint-6"  # what a kill during the save of step 6 leaves: weights cut short, no state
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((out / "checkpoint-4" / "model.safetensors").read_bytes()[:1000])
    run(TrainConfig(**base, max_steps=8, resume="auto"))
    err = capsys.readouterr().err.replace("\n", "")
    assert f"skipping {broken}: incomplete (interrupted while being saved)" in err
    assert f"resuming from {out / 'checkpoint-4'}" in err
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    with pytest.raises(LongsumError, match="incomplete checkpoint"):
        (broken / "trainer_state.json").unlink(missing_ok=True)
        (broken / "trainer_state.json").write_text("{torn")
        run(TrainConfig(**base, max_steps=8, resume=str(broken)))


def test_eval_steps_on_a_local_file_hold_out_rows_instead_of_reusing_training_rows(tmp_path, data):
    from longsum.commands.train import _datasets

    cfg = TrainConfig(model="unused", dataset=str(data), output_dir=str(tmp_path), eval_steps=2, eval_limit=100)
    train, held = _datasets(cfg)
    train_ids, held_ids = {ex.id for ex in train.examples()}, {ex.id for ex in held.examples()}
    assert len(train_ids) + len(held_ids) == 25 and not train_ids & held_ids
    assert len(held_ids) == 2  # 10% of the file
    again_train, again_held = _datasets(cfg)
    assert {ex.id for ex in again_held.examples()} == held_ids  # seeded: the same rows every time
    with_eval = TrainConfig(model="unused", dataset=str(data), eval_dataset=str(data), output_dir=str(tmp_path),
                            eval_steps=2)  # fmt: skip
    assert len(_datasets(with_eval)[0]) == 25  # an explicit eval set: nothing held out


# ------------------------------------------------------------------------------------------ issue 22
def _not_loaded(*args, **kwargs):
    raise AssertionError("a model was loaded before the settings were checked")


def _cli(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    """`longsum ARGS` in this process, through `main()`: (exit code, stderr lines)."""
    import signal

    from longsum.cli import main

    monkeypatch.setattr(sys, "argv", ["longsum", "-v", *map(str, args)])  # -v: leave the warning filters alone
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # main() sets its own
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def _no_package(monkeypatch, name: str) -> None:
    """Make `name` look uninstalled, whether or not it is, for the checks that ask importlib."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n == name else real(n, *a, **k))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lr_scheduler_type": "bogus"}, "--lr-scheduler-type 'bogus' is not a scheduler; choose one of linear, "),
        ({"training_args": {"optim": "bogus"}}, "optim 'bogus' (--config) is not an optimizer; choose one of adamw"),
        ({"report_to": "wandb"}, "--report-to wandb needs the wandb package, which is not installed: pip install"),
        ({"report_to": "bogus"}, "--report-to 'bogus' is not an integration transformers knows"),
        ({"deepspeed": "missing.json"}, "cannot read --deepspeed missing.json: No such file or directory"),
        ({"deepspeed": "ds.json"}, "--deepspeed needs the deepspeed package, which is not installed"),
        ({"fsdp": "bogus"}, "--fsdp 'bogus' was refused by transformers (Unknown `fsdp` option: bogus)"),
        ({"training_args": {"eval_strategy": "epoch"}}, "training_args field eval_strategy is set by longsum train "
                                                        "itself (use --eval-steps)"),  # fmt: skip
        ({"training_args": {"dataloader_prefetch_factor": 2}}, "transformers refused the training settings "
                                                               "(--dataloader_prefetch_factor can only be set"),
    ],
)  # fmt: skip
def test_22_settings_bad_trainer_values_are_refused_before_loading(tmp_path, monkeypatch, settings, message):
    from transformers.integrations import integration_utils

    import longsum.model.checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text('{"train_batch_size": 8}')
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    _no_package(monkeypatch, "deepspeed")
    monkeypatch.setattr(longsum.model.checkpoint, "load_model", _not_loaded)
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(tmp_path / "no-model"), dataset=str(tmp_path / "no-data.jsonl"), output_dir=str(out),
                      **settings)  # fmt: skip
    with pytest.raises(LongsumError) as err:
        run(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    assert not out.exists()  # refused before anything was made


def test_22_settings_cli_bad_values_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """Each one was a traceback after the model and data were loaded (or, for --seed -1, during training)."""
    from transformers.integrations import integration_utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    _no_package(monkeypatch, "deepspeed")
    (tmp_path / "ds.json").write_text('{"train_batch_size": 8}')
    (tmp_path / "nested.yaml").write_text("training_args:\n  optim: bogus\n")
    (tmp_path / "top.yaml").write_text("lr_scheduler_type: bogus\n")
    base = ["train", "--model", tmp_path / "no-model", "--dataset", tmp_path / "no-data.jsonl", "-o", tmp_path / "r"]
    cases = {("--seed", "-1"): "error: --seed must be >= 0, got -1",
             ("--seed", str(2**32)): f"error: --seed must be <= {2**32 - 1}, got {2**32}",
             ("--lr-scheduler-type", "bogus"): "error: --lr-scheduler-type 'bogus' is not a scheduler",
             ("--config", "top.yaml"): "error: --lr-scheduler-type 'bogus' is not a scheduler",
             ("--config", "nested.yaml"): "error: optim 'bogus' (--config) is not an optimizer",
             ("--report-to", "wandb"): "error: --report-to wandb needs the wandb package",
             ("--deepspeed", "missing.json"): "error: cannot read --deepspeed missing.json",
             ("--deepspeed", "ds.json"): "error: --deepspeed needs the deepspeed package",
             ("--fsdp", "bogus"): "error: --fsdp 'bogus' was refused by transformers"}  # fmt: skip
    for args, message in cases.items():
        code, lines = _cli(monkeypatch, capsys, *base, *args)
        assert code == 2 and len(lines) == 1 and lines[0].startswith(message), (args, lines)
    assert not (tmp_path / "r").exists()


def test_22_config_training_args_mapping_is_read_and_checked(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("learning_rate: 1.0e-4\ntraining_args:\n  adam_beta2: '0.98'\n  optim: adafactor\n")
    assert load_config_file(str(nested)) == {"learning_rate": 1e-4,
                                             "training_args": {"adam_beta2": 0.98, "optim": "adafactor"}}  # fmt: skip
    cases = {"training_args:\n  learning_rate: 0.1\n": "training_args.learning_rate is a longsum train option: "
                                                       "write learning_rate at the top level",
             "adam_beta2: 0.9\ntraining_args:\n  adam_beta2: 0.98\n": "adam_beta2 is given twice",
             "training_args:\n  adam_beta3: 1\n": "unknown key 'training_args.adam_beta3'",
             "training_args: [optim]\n": "training_args must be a mapping"}  # fmt: skip
    for text, message in cases.items():
        nested.write_text(text)
        with pytest.raises(LongsumError, match=message.replace(".", r"\.")):
            load_config_file(str(nested))


def test_22_run_folder_every_setting_is_classified():
    """A new TrainConfig field must be declared run-defining or changeable on --resume."""
    import dataclasses

    from longsum.commands.train import RESUMABLE_SETTINGS, RUN_SETTINGS

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    classified = [*RUN_SETTINGS, *RESUMABLE_SETTINGS, "model", "dataset", "training_args"]
    assert sorted(classified) == sorted(fields)


def _base(model, data, out, **more):
    return dict(model=str(model), dataset=str(data), output_dir=str(out), save_steps=2, logging_steps=1,
                max_target_length=8, save_total_limit=None, max_steps=2, **more)  # fmt: skip


def test_22_run_folder_new_run_into_a_run_is_refused_and_overwrite_removes_only_trains_files(
    tmp_path, tiny_model_dir, data, monkeypatch
):
    import longsum.model.checkpoint

    out = tmp_path / "run"
    run(TrainConfig(**_base(tiny_model_dir, data, out)))
    record = json.loads((out / "train_run.json").read_text())
    assert record["model"] == str(tiny_model_dir) and record["identity"]["learning_rate"] == 8e-5
    log_before = (out / "train_log.jsonl").read_bytes()
    weights = (out / "final" / "model.safetensors").read_bytes()

    real_load = longsum.model.checkpoint.load_model
    monkeypatch.setattr(longsum.model.checkpoint, "load_model", _not_loaded)  # refusals come before any loading
    with pytest.raises(LongsumError, match=r"already holds a training run \(checkpoint-2, final, train_config.json, "
                                           r"train_log.jsonl, \.\.\.\): use --resume to continue it, or --overwrite / "
                                           r"another --output-dir"):  # fmt: skip
        run(TrainConfig(**_base(tiny_model_dir, data, out, learning_rate=1e-3)))
    assert (out / "train_log.jsonl").read_bytes() == log_before  # nothing appended
    assert (out / "final" / "model.safetensors").read_bytes() == weights  # nothing replaced

    foreign = tmp_path / "foreign"
    (foreign / "checkpoint-3").mkdir(parents=True)
    (foreign / "final").mkdir()
    with pytest.raises(LongsumError, match=r"holds checkpoint-3, final but no record of longsum train"):
        run(TrainConfig(**_base(tiny_model_dir, data, foreign, overwrite=True)))
    assert sorted(p.name for p in foreign.iterdir()) == ["checkpoint-3", "final"]

    monkeypatch.setattr(longsum.model.checkpoint, "load_model", real_load)
    (out / "notes.txt").write_text("mine")
    run(TrainConfig(**_base(tiny_model_dir, data, out, learning_rate=1e-3, overwrite=True)))
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "train_run.json").read_text())["identity"]["learning_rate"] == 1e-3
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # the new run's lines only (two losses, the run summary)


def test_22_run_folder_resume_refuses_another_model_data_or_hyperparameters(tmp_path, tiny_model_dir, data,
                                                                            monkeypatch, capsys):  # fmt: skip
    import longsum.model.checkpoint
    from longsum.model.tiny import build_tiny_lsg_bart

    out = tmp_path / "run"
    run(TrainConfig(**_base(tiny_model_dir, data, out)))
    other_model = tmp_path / "other-model"
    build_tiny_lsg_bart(["alpha beta gamma delta"] * 4, other_model, seed=1, max_positions=256, block_size=16,
                        sparse_block_size=16)  # fmt: skip
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(data.read_text().replace("alpha", "omega"))

    real_load = longsum.model.checkpoint.load_model
    monkeypatch.setattr(longsum.model.checkpoint, "load_model", _not_loaded)
    resume = dict(resume="auto", max_steps=4)
    cases = [
        (dict(model=str(other_model)), rf"another model or data \(--model {tiny_model_dir} then \(weights \w+\), "
                                       rf"{other_model} now \(weights \w+\)\); pass the run's --model"),
        (dict(dataset=str(other_data)), rf"another model or data \(--dataset {data} then \(data sha256:\w+\), "
                                        rf"{other_data} now"),
        (dict(learning_rate=1e-3, per_device_batch_size=2), r"--resume cannot change what the checkpoint's optimizer, "
                                                            r"scheduler and data position carry \(--learning-rate "
                                                            r"8e-05 then, 0.001 now; --per-device-batch-size 1 then, "
                                                            r"2 now\): pass the run's values"),
        (dict(training_args={"adam_beta2": 0.95}), r"\(training_args adam_beta2 unset then, 0.95 now\)"),
        (dict(eval_steps=2), r"rows held out of training for evaluation .* none then, up to 100 now"),
    ]  # fmt: skip
    for change, message in cases:
        with pytest.raises(LongsumError, match=message):
            run(TrainConfig(**{**_base(tiny_model_dir, data, out), **resume, **change}))

    # What may change: how long it runs, evaluation (on its own data), saving and logging. The lines a
    # killed run logged after its last checkpoint are not kept beside the resumed run's.
    monkeypatch.setattr(longsum.model.checkpoint, "load_model", real_load)
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(data.read_bytes())  # the same data under another name
    capsys.readouterr()
    run(TrainConfig(**{**_base(tiny_model_dir, moved, out), **resume, "logging_steps": 2, "save_steps": 4,
                       "eval_steps": 2, "eval_dataset": str(data), "eval_limit": 2}))  # fmt: skip
    err = capsys.readouterr().err.replace("\n", " ")
    assert "left out 2 line(s) of" in err  # the step-3 line and the torn one
    assert "continuing with --logging-steps 2 (the checkpoint's: 1), " in err  # applied, not the checkpoint's
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 4] and any("eval_rougeLsum" in r for r in rows)
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
