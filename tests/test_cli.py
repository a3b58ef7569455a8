"""The command-line experience: config mistakes are one line naming the nearest valid fields; a command starts
without TensorFlow's start-up notices; a rerun with a changed config says what changed, refuses shape-changing
changes, records the allowed ones, and does nothing when the run is already complete; the console shows each
objective's loss, metrics in their natural order, and a last line saying where the results are."""

import copy
import json
import logging as std_logging
import os
import shutil
import subprocess
import sys

import pytest

from mmjax import cli, run_config
from mmjax import train as trainer
from mmjax.data import local_builder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = os.path.join(ROOT, "configs", "clip.py")


@pytest.mark.parametrize("override,expected", [
    ("optimizer.learning_rate", "unknown config field 'optimizer.learning_rate'; the fields of optimizer: b1, b2,"),
    ("optimiser.lr", "unknown config field 'optimiser.lr'; nearest valid: optimizer"),
    ("train.batchsize", "unknown config field 'train.batchsize'; nearest valid: train.batch_size"),
    ("optimizer.lr.x", "config field optimizer.lr is a value (0.002), not a section: it has no field 'x'"),
])
def test_unknown_config_fields_name_the_nearest_valid_ones(override, expected):
    argv = ["mmjax.train", f"--config={CLIP}", f"--config.{override}=1"]
    message = cli.config_error(argv, KeyError(override.split(".")[-1]))
    assert message.startswith(expected), message
    assert "\n" not in message and "\\" not in message


def test_other_config_errors_keep_their_message_without_repr_escapes():
    argv = ["mmjax.train", f"--config={CLIP}", "--config.optimizer.lr=abc"]
    error = KeyError("flag --config.optimizer.lr=abc: could not convert string to float: \\'abc\\'\\n")
    assert cli.config_error(argv, error) == "flag --config.optimizer.lr=abc: could not convert string to float: 'abc'"


def test_a_wrong_config_path_is_one_line_and_startup_is_quiet(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmjax.train", "--config=configs/nope.py",
                           f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --config: [Errno 2] No such file or directory: "
                                                "'configs/nope.py'"], proc.stderr  # no oneDNN / absl notices


def test_offline_builds_do_not_say_downloading(capsys):
    class Builder(local_builder.OfflineMessages):
        data_dir = "/data/x"
        info = type("Info", (), {"full_name": "x/1.0.0", "splits": {}})()

    Builder()._log_download_bytes()
    Builder()._log_download_done()
    assert capsys.readouterr().out == ""


def test_config_fields_are_classified_for_resuming():
    assert run_config.kind("model.text.vocab_size") == "shape"
    assert run_config.kind("data.image_size") == "shape"
    assert run_config.kind("model.image.patch_size") == "shape"
    assert run_config.kind("model.dtype") == "other"
    assert run_config.kind("train.steps") == "harmless"
    assert run_config.kind("evals.retrieval.every_steps") == "harmless"
    assert run_config.kind("optimizer.lr") == "other"
    saved = {"model": {"width": 8, "heads": [1, 2]}, "train": {"steps": 5}}
    current = {"model": {"width": 16, "heads": (1, 2)}, "train": {"steps": 5, "new": 1}}
    assert run_config.diff(saved, current) == {"model.width": (8, 16), "train.new": ("<absent>", 1)}
    with pytest.raises(ValueError, match=r"model.width 8 -> 16\. Use a new --workdir"):
        run_config.check_resumable(run_config.diff(saved, current))


def _copy_run(tiny_run, tmp_path, name="clip.py"):
    workdir, config = tiny_run(name)
    copied = str(tmp_path / "run")
    shutil.copytree(workdir, copied)
    return copied, copy.deepcopy(config)


def test_resume_refuses_shape_changes_in_one_message(tiny_run, tmp_path):
    workdir, config = _copy_run(tiny_run, tmp_path)
    with open(os.path.join(workdir, "config.json")) as f:
        before = f.read()
    config.model.embed_dim = 32
    config.data.image_size = 48
    config.train.steps = 3
    with pytest.raises(ValueError) as e:
        trainer.train_and_evaluate(config, workdir)
    message = str(e.value)
    assert "data.image_size 64 -> 48" in message and "model.embed_dim 64 -> 32" in message
    assert "train.steps" not in message and "Use a new --workdir" in message
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == before  # nothing was written
    assert not os.path.exists(os.path.join(workdir, run_config.HISTORY_FILE))


def test_resume_refuses_another_tokenizer(tiny_run, tmp_path):
    workdir, config = _copy_run(tiny_run, tmp_path)
    with open(os.path.join(workdir, "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    a, b = sorted(k for k in vocab if not k.startswith("["))[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same size, two words swapped: shapes alone cannot tell
    with open(os.path.join(workdir, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    config.train.steps = 3
    with pytest.raises(ValueError, match="tokenizer .* is not the one this workdir's checkpoints were trained with"):
        trainer.train_and_evaluate(config, workdir)


def test_resume_records_allowed_changes_and_a_finished_run_does_nothing(tiny_run, tmp_path, caplog):
    workdir, config = _copy_run(tiny_run, tmp_path)
    caplog.set_level(std_logging.INFO)
    shorter = copy.deepcopy(config)
    shorter.train.steps = 1
    assert trainer.train_and_evaluate(shorter, workdir) == {}  # no evaluators ran in the shared run
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("already at step 2 (train.steps=1): nothing to do") for m in messages), messages[-6:]
    assert not os.path.exists(os.path.join(workdir, run_config.HISTORY_FILE))

    config.train.update(dict(steps=3, log_every=2))
    trainer.train_and_evaluate(config, workdir)
    messages = [r.getMessage() for r in caplog.records]
    assert "config changed since the last run: train.log_every 1 -> 2" in messages
    assert "config changed since the last run: train.steps 2 -> 3" in messages
    with open(os.path.join(workdir, run_config.HISTORY_FILE)) as f:
        history = [json.loads(line) for line in f]
    assert [h["step"] for h in history] == [2]
    assert history[0]["changes"] == {"train.log_every": [1, 2], "train.steps": [2, 3]}
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 3
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]  # the resumed step is logged too


def test_console_lines():
    metrics = dict(loss=1.5, itm_loss=0.5, mlm_loss=1.0, lr=1e-3, grad_norm=2.0, examples_per_s=10.0,
                   device_flops_per_s=2e9)
    line = trainer.console_line(3, 10, metrics, 70.0)
    assert line.startswith("step 3/10  loss 1.5000  (itm 0.5000 mlm 1.0000)  lr 1.00e-03") and "ETA 00:01:10" in line
    one_objective = {k: v for k, v in metrics.items() if k != "mlm_loss"}
    assert "(" not in trainer.console_line(3, 10, one_objective, 0.0)  # its loss is the loss
    evals = {"retrieval/i2t_r@10": 0.9, "retrieval/i2t_r@5": 0.8, "retrieval/i2t_r@1": 0.5,
             "retrieval/num_images": 1000.0}
    assert trainer.eval_line(7, evals) == ("eval step 7: retrieval/i2t_r@1 0.5000  retrieval/i2t_r@5 0.8000  "
                                           "retrieval/i2t_r@10 0.9000  retrieval/num_images 1000")
    done = trainer.finished_line("/tmp/run", dict(evals, **{"retrieval/t2i_r@1": 0.6, "retrieval/i2t_r@1_chance": 0.1,
                                                            "zero_shot/accuracy": 0.95}), 3725.2)
    assert done.startswith("done in 1:02:05; last eval: retrieval/i2t_r@1 0.5000  retrieval/i2t_r@5 0.8000  "
                           "retrieval/i2t_r@10 0.9000  zero_shot/accuracy 0.9500; results in /tmp/run"), done
    assert "tensorboard --logdir=/tmp/run" in done
