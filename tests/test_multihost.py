"""Multi-host training (issue 16): 2 processes x 4 CPU devices joined by jax.distributed.initialize on loopback
train exactly as 1 process x 8 devices (losses and final parameters to 1e-5, for CLIP and a fusion model), and a
kill -9 of both processes followed by a restart resumes exactly. Also the pieces that make it so: input shards that
give every process count the same global batch, the launch flags, and a mesh whose data axis spans processes."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmjax import checkpoint, distributed, sharding
from mmjax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLIP = ["--config=configs/clip.py", "--config.model.image.depth=1", "--config.model.text.depth=1",
        "--config.model.image.width=32", "--config.model.text.width=32", "--config.model.image.mlp_dim=64",
        "--config.model.text.mlp_dim=64", "--config.model.embed_dim=32",
        "--config.evals.zero_shot.every_steps=1000", "--config.evals.retrieval.every_steps=1000",
        "--config.evals.zero_shot.batch_size=64", "--config.evals.retrieval.batch_size=64",
        "--config.evals.zero_shot.data.split=test[:128]", "--config.evals.retrieval.data.split=test[:128]"]
FUSION = ["--config=configs/fusion.py", "--config.model.towers.image.depth=1", "--config.model.towers.text.depth=1",
          "--config.model.fusion_args.depth=1", "--config.evals.itm.every_steps=1000",
          "--config.evals.mlm.every_steps=1000", "--config.evals.itm.batch_size=32", "--config.evals.mlm.batch_size=32",
          "--config.evals.itm.data.split=test[:64]", "--config.evals.mlm.data.split=test[:64]"]
COMMON = ["--config.train.batch_size=32", "--config.train.log_every=1", "--config.optimizer.warmup_steps=2",
          "--config.checkpoint.async_save=False", "--config.data.input_shards=2",
          "--config.data.sources.easy_vqa.train_split=train[:512]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, workdir, data_dir, processes):
    """`python -m mmjax.train` as `processes` processes splitting 8 CPU devices, joined on loopback."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={8 // processes}".strip())
    port = _free_port()
    cmd = [sys.executable, "-m", "mmjax.train", *args, *COMMON, f"--workdir={workdir}",
           f"--config.data.sources.easy_vqa.data_dir={data_dir}"]
    launch = lambda i: [] if processes == 1 else [f"--coordinator_address=127.0.0.1:{port}",  # noqa: E731
                                                   f"--num_processes={processes}", f"--process_id={i}"]
    return [subprocess.Popen(cmd + launch(i), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(processes)]


def _wait(procs, timeout=600):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outputs


def _run(args, workdir, data_dir, processes):
    codes, outputs = _wait(_launch(args, workdir, data_dir, processes))
    assert codes == [0] * processes, "\n".join(o[-3000:] for o in outputs)


def _records(workdir, kind):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _assert_same_run(reference, run, steps):
    ref_train, got_train = _records(reference, "train"), _records(run, "train")
    assert [r["step"] for r in got_train] == [r["step"] for r in ref_train] == list(range(1, steps + 1))
    for a, b in zip(ref_train, got_train):
        for key in [k for k in a if k.endswith("loss") or k in ("grad_norm", "param_norm")]:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5, err_msg=f"step {a['step']} {key}")
    ref_eval, got_eval = _records(reference, "eval"), _records(run, "eval")
    assert len(got_eval) == len(ref_eval) == 1
    assert got_eval[0].keys() == ref_eval[0].keys()
    for key, value in ref_eval[0].items():
        if isinstance(value, str):  # e.g. the report's file name
            assert got_eval[0][key] == value, key
            continue
        np.testing.assert_allclose(got_eval[0][key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    ref_params = checkpoint.restore_params(os.path.join(reference, "checkpoints"), steps)
    got_params = checkpoint.restore_params(os.path.join(run, "checkpoints"), steps)
    ref_flat, got_flat = _flat(ref_params), _flat(got_params)
    assert ref_flat.keys() == got_flat.keys()
    for name in ref_flat:
        np.testing.assert_allclose(got_flat[name], ref_flat[name], rtol=1e-5, atol=1e-5, err_msg=name)


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_two_processes_train_clip_as_one_and_resume_exactly_after_kill_9(embedded_data_dir, tmp_path):
    steps = ["--config.train.steps=6", "--config.checkpoint.every_steps=2"]
    reference = str(tmp_path / "one_process")
    reference_proc = _launch(CLIP + steps, reference, embedded_data_dir, 1)  # beside the 2-process run

    run = str(tmp_path / "two_processes")
    procs = _launch(CLIP + steps, run, embedded_data_dir, 2)
    deadline = time.time() + 300
    metrics = os.path.join(run, "metrics.jsonl")
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(metrics) and any(r["step"] >= 3 for r in _records(run, "train")):
            break
        time.sleep(0.02)
    for p in procs:  # both hosts lost at once: no checkpoint after step 2's
        p.send_signal(signal.SIGKILL)
    codes, outputs = _wait(procs)
    assert codes == [-signal.SIGKILL] * 2, "\n".join(o[-3000:] for o in outputs)
    assert checkpoint.Checkpointer(run, checkpoint.default_checkpoint_config()).latest_step() == 2
    codes, outputs = _wait(reference_proc)
    assert codes == [0], outputs[0][-3000:]

    _run(CLIP + steps, run, embedded_data_dir, 2)
    _assert_same_run(reference, run, 6)


def test_two_processes_train_a_fusion_model_as_one(embedded_data_dir, tmp_path):
    steps = ["--config.train.steps=3", "--config.checkpoint.every_steps=1000"]
    reference, run = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
    dcn = ["--config.mesh.data=4", "--config.mesh.dcn_data=2"]
    procs = (_launch(FUSION + steps, reference, embedded_data_dir, 1)
             + _launch(FUSION + steps + dcn, run, embedded_data_dir, 2))
    codes, outputs = _wait(procs)
    assert codes == [0, 0, 0], "\n".join(o[-3000:] for o in outputs)
    _assert_same_run(reference, run, 3)


def test_input_shards_make_the_global_batch_independent_of_the_process_count(embedded_data_config):
    c = embedded_data_config
    c.sources.easy_vqa.train_split = "train[:256]"
    c.input_shards = 4
    tokenizer = pipeline.load_tokenizer(c)

    def batches(process_index, process_count):
        it = pipeline.train_iterator(c, tokenizer, global_batch_size=16, seed=3, start_step=5,
                                     process_index=process_index, process_count=process_count)
        return [next(it) for _ in range(3)]

    one = batches(0, 1)
    for count in (2, 4):
        parts = [batches(i, count) for i in range(count)]
        for step, whole in enumerate(one):
            for key, value in whole.items():
                np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), value, err_msg=key)
    c.input_shards = 3
    with pytest.raises(ValueError, match="input_shards=3 must be a multiple of the process count 2"):
        pipeline.train_iterator(c, tokenizer, global_batch_size=16, seed=3, process_index=0, process_count=2)


def test_launch_flags_and_environment(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                 "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.resolve_launch().multi_process  # a laptop: nothing to join
    launch = distributed.resolve_launch("10.0.0.1:1234", 4, 3)
    assert (launch.coordinator_address, launch.num_processes, launch.process_id) == ("10.0.0.1:1234", 4, 3)
    with pytest.raises(ValueError, match="--num_processes, --process_id missing"):
        distributed.resolve_launch("10.0.0.1:1234")
    with pytest.raises(ValueError, match="process_id 4 is not in"):
        distributed.resolve_launch("10.0.0.1:1234", 4, 4)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.resolve_launch().process_id == 1
    assert not distributed.resolve_launch(distributed=False).multi_process
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node[001-004]")
    assert distributed.resolve_launch().detect  # srun: JAX reads SLURM's variables itself
    assert distributed.resolve_launch(distributed=True).detect


def test_a_dcn_axis_puts_slices_outermost():
    class Fake:  # stand-ins for TPU devices of 2 slices x 4 chips
        def __init__(self, i):
            self.id, self.slice_index, self.process_index = i, i // 4, i // 2
            self.platform, self.device_kind = "tpu", "fake"

        def __repr__(self):
            return f"d{self.id}"

    devices = [Fake(i) for i in range(8)]
    config = sharding.default_mesh_config()
    config.update(dict(data=2, fsdp=2, dcn_data=2))
    mesh = sharding.create_mesh(config, devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    # The data axis (dcn 2 x ici 2) crosses slices in its outer half; fsdp (ICI only) stays inside a slice.
    assert [[d.slice_index for d in row] for row in mesh.devices[:, :, 0]] == [[0, 0], [0, 0], [1, 1], [1, 1]]
    config.update(dict(data=-1, fsdp=1, dcn_data=1, dcn_fsdp=-1))
    mesh = sharding.create_mesh(config, devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert [[d.slice_index for d in row] for row in mesh.devices[:, :, 0]] == [[0, 1]] * 4
    with pytest.raises(ValueError, match="needs 2 slices but 1 are available"):
        config.update(dict(dcn_data=2, dcn_fsdp=1))
        sharding.create_mesh(config, jax.devices())
