"""Faults a real run meets (issue 14): SIGTERM (a preemption) mid-run saves and the rerun ends bitwise where an
uninterrupted run ends, and so does a run killed five times through the CLI (kill -9 at a step and during a save,
SIGTERM); a second run on a busy workdir is refused in one line, a dead run's lock is taken over; a NaN at a
checkpoint step between two logging steps stops the run before that state is saved; a damaged latest checkpoint
falls back to the previous one; a changed model, bad config values, a missing config file, an unknown variant and
a full disk during a save are each one line."""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmjax import pretrained, reliability
from mmjax import train as trainer


@pytest.fixture
def tiny_config(load_config):
    """configs/clip.py:tiny shrunk to seconds per run (8 fake devices, data-parallel), no evaluators."""
    c = load_config("clip.py", "tiny")
    c.model.image.update(dict(patch_size=16, width=32, depth=1, heads=2, mlp_dim=64))
    c.model.text.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    c.model.embed_dim = 32
    c.train.update(dict(batch_size=32, steps=20, log_every=5))
    c.evals = {}
    c.optimizer.warmup_steps = 4
    c.checkpoint.update(dict(every_steps=10, async_save=False))
    return c


def final_params(workdir):
    return jax.tree.leaves(pretrained.load_checkpoint(workdir).params)


def test_sigterm_saves_and_the_rerun_ends_bitwise_equal(tiny_config, tmp_path, monkeypatch):
    straight = str(tmp_path / "straight")
    trainer.train_and_evaluate(tiny_config, straight)

    preempted = str(tmp_path / "preempted")
    real_iterator = trainer.pipeline.train_iterator

    def preempting_iterator(*args, **kwargs):
        for i, batch in enumerate(real_iterator(*args, **kwargs)):
            # The notice arrives while step 7 is being prepared (the trainer pulls batches DEVICE_PREFETCH steps
            # ahead): step 7 finishes, then it saves.
            if i == 6 + trainer.DEVICE_PREFETCH:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(trainer.pipeline, "train_iterator", preempting_iterator)
    with pytest.raises(reliability.Stopped) as stopped:
        trainer.train_and_evaluate(tiny_config, preempted)
    assert stopped.value.step == 7 and stopped.value.exit_code == 143
    assert sorted(os.listdir(os.path.join(preempted, "checkpoints"))) == ["7"]
    assert not os.path.exists(os.path.join(preempted, reliability.LOCK_FILE))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handler is gone again
    monkeypatch.setattr(trainer.pipeline, "train_iterator", real_iterator)
    trainer.train_and_evaluate(tiny_config, preempted)
    for a, b in zip(final_params(straight), final_params(preempted)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_a_busy_workdir_is_refused_and_a_dead_runs_lock_taken_over(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = workdir / reliability.LOCK_FILE
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "earlier"}))
        with pytest.raises(ValueError, match=f"in use by another run .*pid {holder.pid}") as refused:
            trainer.train_and_evaluate(tiny_config, str(workdir))
        assert "\n" not in str(refused.value)
        assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone now: its lock is stale, and the next run takes it over, then removes it.
    tiny_config.train.steps = 2
    trainer.train_and_evaluate(tiny_config, str(workdir))
    assert not lock.exists()
    # A lock from another host cannot be checked from here: refused, naming the host.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "earlier"}))
    with pytest.raises(ValueError, match="host elsewhere"):
        trainer.train_and_evaluate(tiny_config, str(workdir))


def test_nan_at_a_checkpoint_step_is_never_saved(tiny_config, tmp_path, monkeypatch):
    # Checkpoints every 3 steps, logs every 5: step 6 saves without logging. The batch of step 6 holds a NaN image.
    tiny_config.checkpoint.every_steps = 3
    real_iterator = trainer.pipeline.train_iterator

    def poisoned_iterator(*args, **kwargs):
        for i, batch in enumerate(real_iterator(*args, **kwargs)):
            if i == 5:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield batch

    monkeypatch.setattr(trainer.pipeline, "train_iterator", poisoned_iterator)
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match="loss is nan at step 6: stopped before saving this state "
                                                 r"\(latest checkpoint: step 3\)"):
        trainer.train_and_evaluate(tiny_config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
    assert all(np.isfinite(np.asarray(x)).all() for x in final_params(workdir))


def _array_files(directory):
    """The data files of a checkpoint step (orbax's ocdbt stores array chunks under .../d/)."""
    return [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names
            if os.path.basename(root) == "d"]


def test_a_damaged_latest_checkpoint_is_reported_and_the_run_resumes_from_the_previous(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(tiny_config, workdir)  # checkpoints at 10 and 20
    victims = _array_files(os.path.join(workdir, "checkpoints", "20", "default", "ocdbt.process_0"))
    assert victims
    for victim in victims:  # truncated array files, as a full disk or a half-copied directory leaves them
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 3)

    tiny_config.checkpoint.fallback = False
    with pytest.raises(ValueError, match="checkpoint step 20 does not restore") as refused:
        trainer.train_and_evaluate(tiny_config, workdir)
    assert "\n" not in str(refused.value)

    tiny_config.checkpoint.fallback = True
    tiny_config.train.steps = 30
    trainer.train_and_evaluate(tiny_config, workdir)  # resumes from 10, trains 11-30
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["10", "20", "30"]
    assert os.listdir(os.path.join(workdir, "corrupt_checkpoints")) == ["20"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [5, 10, 15, 20, 25, 30]  # the records after step 10 were rewritten by the resumed run


def test_a_changed_model_on_resume_names_the_parameters_and_shapes(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    tiny_config.train.steps = 10
    trainer.train_and_evaluate(tiny_config, workdir)
    tiny_config.model.image.mlp_dim = 128
    # The saved config.json tells first, by field; without it the checkpoint's shapes still do, by parameter.
    with pytest.raises(ValueError, match=r"decide parameter shapes .*: model.image.mlp_dim 64 -> 128\. Use a new "
                                         r"--workdir"):
        trainer.train_and_evaluate(tiny_config, workdir)
    os.remove(os.path.join(workdir, "config.json"))
    tiny_config.train.steps = 20  # a run to continue (one at its last step has nothing to restore)
    with pytest.raises(ValueError, match=r"does not fit this model \(9 differences: "
                                         r"params/image_encoder/encoder/layer_0/mlp/fc1/bias: \(64,\) in the "
                                         r"checkpoint vs \(128,\) now") as refused:
        trainer.train_and_evaluate(tiny_config, workdir)
    assert "\n" not in str(refused.value) and "new --workdir" in str(refused.value)


def test_bad_config_values_are_listed_in_one_line_before_anything_is_written(tiny_config, tmp_path):
    tiny_config.train.batch_size = 0
    tiny_config.optimizer.lr = float("nan")
    tiny_config.optimizer.warmup_steps = -4
    tiny_config.checkpoint.every_steps = 0
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as bad:
        trainer.train_and_evaluate(tiny_config, str(workdir))
    message = str(bad.value)
    assert "\n" not in message
    for part in ("train.batch_size=0 (must be an integer >= 1)", "optimizer.lr=nan (must be a finite number >= 0)",
                 "optimizer.warmup_steps=-4 (must be an integer >= 0)", "checkpoint.every_steps=0"):
        assert part in message
    assert not workdir.exists()


@pytest.mark.parametrize("config, says", [("configs/missing.py", "No such file or directory: 'configs/missing.py'"),
                                          ("configs/clip.py:huge", "unknown config argument 'huge'")])
def test_cli_config_file_errors_are_one_line(config, says, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "mmjax.train", f"--config={config}", f"--workdir={tmp_path / 'w'}"],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


TINY_CLI = ["--config=configs/clip.py", "--config.model.image.patch_size=16", "--config.model.image.width=32",
            "--config.model.image.depth=1", "--config.model.image.mlp_dim=64", "--config.model.text.width=32",
            "--config.model.text.mlp_dim=64", "--config.model.embed_dim=32", "--config.train.batch_size=32",
            "--config.train.steps=30", "--config.train.log_every=1", "--config.optimizer.warmup_steps=4",
            "--config.checkpoint.every_steps=5", "--config.evals.zero_shot.every_steps=1000",
            "--config.evals.retrieval.every_steps=1000", "--config.evals.zero_shot.batch_size=200",
            "--config.evals.retrieval.batch_size=200"]


def _cli_run(workdir, data_dir, kill=None):
    """python -m mmjax.train on the tiny CLIP, optionally killed: kill = (signal, "step", N) once metrics.jsonl
    reaches step N, or (signal, "save", N) as soon as orbax starts writing step N's checkpoint. Returns the exit
    code."""
    import time  # pylint: disable=import-outside-toplevel

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "mmjax.train", *TINY_CLI, f"--workdir={workdir}",
                             f"--config.data.sources.easy_vqa.data_dir={data_dir}"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3"))
    deadline = time.time() + 300
    while kill is not None and proc.poll() is None and time.time() < deadline:
        signum, when, n = kill
        if when == "step":
            path = os.path.join(workdir, "metrics.jsonl")
            hit = os.path.exists(path) and any(json.loads(line)["step"] >= n for line in open(path) if line.strip())
        else:
            folder = os.path.join(workdir, "checkpoints")
            hit = os.path.isdir(folder) and any(name.startswith(f"{n}.") or name == str(n)
                                                for name in os.listdir(folder))
        if hit:
            proc.send_signal(signum)
            break
        time.sleep(0.01)
    return proc.wait(timeout=300)


def test_killed_five_times_then_finished_equals_the_uninterrupted_run(embedded_data_dir, tmp_path):
    straight = str(tmp_path / "straight")
    assert _cli_run(straight, embedded_data_dir) == 0
    run = str(tmp_path / "run")
    kills = [(signal.SIGKILL, "step", 3), (signal.SIGKILL, "save", 10), (signal.SIGTERM, "step", 13),
             (signal.SIGKILL, "step", 18), (signal.SIGTERM, "step", 24)]
    for kill in kills:
        code = _cli_run(run, embedded_data_dir, kill)
        assert code in (-signal.SIGKILL, 128 + signal.SIGTERM), (kill, code)
    assert _cli_run(run, embedded_data_dir) == 0
    for a, b in zip(final_params(straight), final_params(run)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_a_full_disk_during_a_save_is_one_line_and_the_earlier_checkpoints_restore(tiny_config, tmp_path,
                                                                                    monkeypatch):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    real_save = ocp.CheckpointManager.save

    def save_until_the_disk_fills(self, step, *args, **kwargs):
        if step >= 15:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    tiny_config.checkpoint.every_steps = 5
    workdir = str(tmp_path / "run")
    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_the_disk_fills)
    with pytest.raises(ValueError, match=r"could not save checkpoint step 15 .*No space left on device; the earlier "
                                         r"checkpoints \(5, 10\) are intact") as full:
        trainer.train_and_evaluate(tiny_config, workdir)
    assert "\n" not in str(full.value)
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    trainer.train_and_evaluate(tiny_config, workdir)  # the disk has room again: resumes from 10 and finishes
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["10", "15", "20"]
