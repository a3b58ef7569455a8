"""The trainer end to end on the embedded dataset: loss falls, metrics and checkpoints are written, a resumed
run equals an uninterrupted one, and bad input fails in one line before anything is written."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmjax import checkpoint
from mmjax import train as trainer


@pytest.fixture
def tiny_config(load_config):
    """configs/clip.py:tiny shrunk to seconds per run (8 fake devices, data-parallel)."""
    c = load_config("clip.py", "tiny")
    c.model.image.update(dict(patch_size=16, width=32, depth=1, heads=2, mlp_dim=64))
    c.model.text.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    c.model.embed_dim = 32
    c.train.update(dict(batch_size=32, steps=24, log_every=4))
    for evaluator in c.evals.values():
        evaluator.update(dict(every_steps=24, batch_size=200))
    c.optimizer.warmup_steps = 4
    c.checkpoint.update(dict(every_steps=12, async_save=False))
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_short_run_learns_and_writes_everything(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    final = trainer.train_and_evaluate(tiny_config, workdir)
    records = read_metrics(workdir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(4, 25, 4))
    assert train[-1]["loss"] < train[0]["loss"] - 0.2
    for key in ("loss", "lr", "grad_norm", "examples_per_s"):
        assert key in train[0]
    assert len(evals) == 1 and evals[0]["step"] == 24
    assert evals[0]["zero_shot/num_examples"] == evals[0]["retrieval/num_images"] == 1000
    assert final["zero_shot/accuracy"] == evals[0]["zero_shot/accuracy"]
    assert final["zero_shot/chance"] == pytest.approx(1 / 24)
    for key in ("i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10"):
        assert 0.0 <= final[f"retrieval/{key}"] <= 1.0
    assert final["retrieval/i2t_r@10"] >= final["retrieval/i2t_r@1"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "24"]
    assert checkpoint.load_config(workdir).train.steps == 24
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_resumed_run_equals_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    straight = str(tmp_path / "straight")
    trainer.train_and_evaluate(tiny_config, straight)

    # Killed right after the checkpoint at step 12 (the input iterator dies on the 13th batch), then the same
    # command is run again in the same workdir.
    resumed = str(tmp_path / "resumed")
    real_iterator = trainer.pipeline.train_iterator

    def dying_iterator(*args, **kwargs):
        for i, batch in enumerate(real_iterator(*args, **kwargs)):
            if i == 12 + trainer.DEVICE_PREFETCH:  # the trainer pulls batches that far ahead of its step
                raise KeyboardInterrupt("killed")
            yield batch

    monkeypatch.setattr(trainer.pipeline, "train_iterator", dying_iterator)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(tiny_config, resumed)
    monkeypatch.setattr(trainer.pipeline, "train_iterator", real_iterator)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["12"]
    trainer.train_and_evaluate(tiny_config, resumed)

    a = read_metrics(straight)
    b = read_metrics(resumed)
    assert [r["step"] for r in b if r["kind"] == "train"] == [4, 8, 12, 16, 20, 24]
    loss_a = {r["step"]: r["loss"] for r in a if r["kind"] == "train" and r["step"] > 12}
    loss_b = {r["step"]: r["loss"] for r in b if r["kind"] == "train" and r["step"] > 12}
    assert loss_a.keys() == loss_b.keys()
    for step in loss_a:
        np.testing.assert_allclose(loss_b[step], loss_a[step], rtol=1e-5)


def expect_setup_error(config, workdir, match):
    with pytest.raises(ValueError, match=match):
        trainer.train_and_evaluate(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "config.json"))
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_batch_not_divisible_by_data_parallel_degree(tiny_config, tmp_path):
    tiny_config.train.batch_size = 12
    expect_setup_error(tiny_config, str(tmp_path / "w"), "not divisible by the data-parallel degree 8")


def test_mesh_not_matching_devices(tiny_config, tmp_path):
    tiny_config.mesh.update(dict(data=3, fsdp=1, tensor=1))
    expect_setup_error(tiny_config, str(tmp_path / "w"), "needs 3 devices but 8 are available")


def test_image_size_not_divisible_by_patch(tiny_config, tmp_path):
    tiny_config.data.image_size = 60
    expect_setup_error(tiny_config, str(tmp_path / "w"), "not divisible by patch")


def test_missing_tokenizer_path(tiny_config, tmp_path):
    tiny_config.data.tokenizer = str(tmp_path / "nope" / "vocab.txt")
    expect_setup_error(tiny_config, str(tmp_path / "w"), "tokenizer path does not exist")


def test_unwritable_workdir(tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="is not writable"):
        trainer.train_and_evaluate(tiny_config, str(blocker / "run"))


def test_cli_unknown_field_is_one_line_naming_nearest(tmp_path):
    workdir = tmp_path / "w"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "mmjax.train", "--config=configs/clip.py", f"--workdir={workdir}",
         "--config.train.stpes=3"], cwd=root, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    expected = "error: unknown config field 'train.stpes'; nearest valid: train.steps, train.accum_steps"
    assert errors == [expected], proc.stderr
    assert not workdir.exists()


def test_dry_run_builds_base_abstractly(load_config):
    config = load_config("clip.py", "base")
    config.train.batch_size = 8
    summary = trainer.train_and_evaluate(config, None, dry_run=True)
    # CLIP ViT-B/32 has 151.3M parameters (OpenAI release); ours matches the architecture up to biases/LN details.
    assert 149e6 < summary["params"] < 153e6, summary["params"]
    # Forward per image-text pair: ViT-B/32 (50 tokens) 8.8 GFLOPs + text (77 tokens, 12x512) 6.0 GFLOPs; a train
    # step costs about 3x the forward (plus the optimizer and loss).
    forward = 14.8e9
    assert 0.95 * 3 * forward * 8 < summary["train_step_flops"] < 1.25 * 3 * forward * 8
    assert jax.device_count() == 8


def test_evaluate_cli_reproduces_the_final_eval(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    final = trainer.train_and_evaluate(tiny_config, workdir)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "mmjax.evaluate", f"--workdir={workdir}"], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(os.path.join(workdir, "eval.json")) as f:
        assert json.load(f) == printed
    for key, value in final.items():
        assert printed[key] == pytest.approx(float(value), abs=1e-6), key
