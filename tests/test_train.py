"""`longsum train` on a tiny model built in code: learning, checkpointing, resume, config, DDP."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from longsum.errors import LongsumError
from longsum.train import TrainConfig, load_config_file, run

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
    proc = subprocess.run([sys.executable, "-m", "longsum", "train", "--config", str(bad)], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown key 'learnin_rate'")


def test_nan_loss_stops_with_advice(tmp_path, tiny_model_dir, data):
    with pytest.raises(LongsumError, match="loss became nan at step .*lower --learning-rate"):
        run(TrainConfig(model=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "run"), max_steps=20,
                        learning_rate=1e9, warmup_ratio=0.0, logging_steps=1, save_steps=100,
                        max_target_length=8, training_args={"max_grad_norm": 0.0}))  # fmt: skip


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
    from longsum.train import _datasets

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
