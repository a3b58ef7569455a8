"""Faults a real run meets: SIGTERM (a preemption) mid-run saves and the rerun ends bitwise where an uninterrupted
run ends; a second run on a busy workdir is refused in one line, a dead run's lock is taken over; a NaN at a
checkpoint step between two logging steps stops the run before that state is saved."""

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
            if i == 6:  # the notice arrives while step 7 is being prepared: step 7 finishes, then it saves
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
