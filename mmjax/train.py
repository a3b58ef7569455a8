"""Train a model from a config: flags -> config -> mesh -> data -> model -> sharded state -> loop.

    python -m mmjax.train --config=configs/clip.py --workdir=/tmp/clip
    python -m mmjax.train --config=configs/clip.py:base --workdir=/tmp/b --config.train.batch_size=1024
    python -m mmjax.train --config=configs/clip.py:large --dry_run     # build abstractly, print sizes, exit

Rerunning the same command resumes from the latest checkpoint in WORKDIR. WORKDIR receives config.json,
checkpoints/, metrics.jsonl (one JSON record per line) and tensorboard/. SIGTERM or Ctrl-C saves a checkpoint after
the current step and exits with 143 / 130; a second run on the same WORKDIR is refused while the first one runs.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import signal
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from mmjax import accumulation, checkpoint, cli, cli_logging, config_checks, distributed, host_malloc, optim, perf
from mmjax import reliability, run_config, sharding
from mmjax import state as state_lib
from mmjax.data import pipeline
from mmjax.evaluation import report
from mmjax.evaluation.evaluators import build_evaluators, run_evaluators
from mmjax.metrics_writer import MetricWriter
from mmjax.models import build_model
from mmjax.tasks import get_task

DEVICE_PREFETCH = 2  # batches copied to the devices ahead of the step that uses them (sharding.prefetch_to_mesh)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/clip.py:tiny.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the saved config.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the step with the run's shardings, never run it; print "
                               "its parameters, FLOPs and per-device memory; exit.")
# Multi-host (mmjax/distributed.py): every process runs the same command with its own --process_id.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in [0, num_processes).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", None, "Multi-host with JAX's cluster detection (TPU pods, SLURM, "
                                 "Open MPI); default: on under srun / mpirun with more than one task.")


# ----------------------------------------------------------------------------------------------------------------
# The step: pure, jitted with shardings below.

def train_step(state: dict, batch: dict, rng: jax.Array, *, task: Any, tx: optax.GradientTransformation,
               schedule: optax.Schedule, accum_steps: int = 1) -> tuple[dict, dict]:
    """One optimizer step: task loss -> grads (over accum_steps micro-batches: mmjax/accumulation.py) -> optax
    update. Pure; jitted with shardings below."""
    rng = jax.random.fold_in(rng, state["step"])
    (loss, metrics), grads = accumulation.loss_and_grads(task, state["params"], batch, rng, accum_steps)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   lr=schedule(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def jit_train_step(task: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, mesh,
                   shardings: dict, accum_steps: int = 1) -> Any:
    """`train_step` under jax.jit with explicit in/out shardings and the state donated (updated in place)."""
    return jax.jit(functools.partial(train_step, task=task, tx=tx, schedule=schedule, accum_steps=accum_steps),
                   in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------------------------
# Setup checks that fail in one line, before anything is written.

def check_workdir(workdir: str | None) -> str:
    """Creates WORKDIR if needed and proves it writable."""
    if not workdir:
        raise ValueError("--workdir is required")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ValueError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None
    return workdir


def check_resume(config: ml_collections.ConfigDict, workdir: str, tokenizer: Any, checkpointed: bool) -> dict:
    """The config fields that differ from the run's saved config.json (none for a new run); a difference that
    changes parameter shapes or what the inputs mean (or another tokenizer) is refused in one line."""
    saved = run_config.load_saved(workdir)
    if saved is None or not checkpointed:  # nothing to resume: the saved config describes no weights
        return {}
    changes = run_config.diff(saved, config)
    run_config.check_resumable(changes)
    saved_tokenizer = os.path.join(workdir, "tokenizer.json")
    differ = (state_lib.tokenizer_difference(saved_tokenizer, tokenizer)
              if tokenizer is not None and os.path.exists(saved_tokenizer) else None)
    if differ:
        theirs, ours, examples = differ
        raise ValueError(f"the data's tokenizer ({ours} tokens) is not the one this workdir's checkpoints were "
                         f"trained with ({saved_tokenizer}, {theirs} tokens; e.g. {examples}): use a new --workdir, "
                         f"or set data.tokenizer to {saved_tokenizer}")
    for name, change in changes.items():
        level = logging.INFO if run_config.kind(name) == "harmless" else logging.WARNING
        logging.log(level, "config changed since the last run: %s", run_config.describe({name: change}))
    return changes


def last_eval(workdir: str) -> dict:
    """The last evaluation record in WORKDIR/metrics.jsonl (without step and kind), or {}."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        evals = [json.loads(line) for line in f if line.strip() and '"kind": "eval"' in line]
    return {k: v for k, v in evals[-1].items() if k not in ("step", "kind")} if evals else {}


def console_line(step: int, last: int, metrics: dict, eta_s: float) -> str:
    """The progress line: step, loss (and each objective's loss when there are several), lr, throughput, ETA."""
    parts = [f"step {step}/{last}", f"loss {metrics['loss']:.4f}"]
    objectives = sorted(k for k in metrics if k.endswith("_loss"))
    if len(objectives) > 1:
        parts.append("(" + " ".join(f"{k[:-5]} {metrics[k]:.4f}" for k in objectives) + ")")
    parts += [f"lr {metrics['lr']:.2e}", f"grad_norm {metrics['grad_norm']:.3f}",
              f"{metrics['examples_per_s']:.0f} ex/s", f"{metrics['device_flops_per_s'] / 1e9:.1f} GFLOP/s/device",
              *([f"MFU {metrics['mfu']:.1%}"] if "mfu" in metrics else []),
              f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta_s))}"]
    return "  ".join(parts)


def eval_line(step: int, metrics: dict) -> str:
    """One evaluation on one line, metrics in their natural order (R@1, R@5, R@10; counts as integers)."""
    return f"eval step {step}: " + "  ".join(f"{k} {report.format_value(k, v)}" for k, v in report.ordered(metrics))


# ----------------------------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None, *, dry_run: bool = False) -> dict:
    """Runs (or resumes) training as the config says; returns the last evaluation's metrics."""
    # 1. The config's values, the mesh and the batch split: fail fast on anything that cannot work.
    config_checks.check(config)
    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.logical_rules(config.sharding.rules)
    sharding.check_batch_size(config.train.batch_size, mesh)
    accum_steps = int(config.train.get("accum_steps", 1))
    accumulation.check_accumulation(config.train.batch_size, accum_steps, mesh)
    logging.info("mesh %s over %d devices (%s); host allocator %s", dict(mesh.shape), mesh.size,
                 jax.devices()[0].platform, host_malloc.loaded_allocator())

    # 2. Data: the tokenizer and what the data offers (classes, attributes, regions, vocabulary) size the model.
    tokenizer = pipeline.load_tokenizer(config.data)
    meta = pipeline.dataset_meta(config.data, tokenizer)
    state_lib.resolve_model_config(config, meta)
    if not dry_run:
        for warning in pipeline.small_data_warnings(config.data, meta, config.train.batch_size, config.get("evals")):
            logging.warning("%s", warning)

    # 3. Model, task, optimizer; parameters abstract until the state is created on the mesh.
    model = build_model(config.model)
    task = get_task(config.task, model=model, config=config, meta=meta, tokenizer=tokenizer, mesh=mesh)
    batch_shapes = pipeline.batch_shapes(config.data, meta)
    boxed = state_lib.abstract_params(model, batch_shapes, config.seed)
    n_params = state_lib.count_params(boxed)
    logging.info("model %s: %s parameters", config.model.name, f"{n_params:,}")
    tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps, nn.meta.unbox(boxed))

    if dry_run:  # the step compiled with the run's shardings, never run: FLOPs and per-device memory
        shardings = state_lib.train_state_shardings(boxed, tx, mesh, rules)
        state_shape = state_lib.abstract_train_state(nn.meta.unbox(boxed), tx)
        batch = pipeline.train_batch_shapes(config.data, meta, config.train.batch_size)
        step_fn = jit_train_step(task, tx, schedule, mesh, shardings, accum_steps)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            compiled = step_fn.lower(state_shape, batch, jax.random.key(0)).compile()
        flops, memory = perf.step_flops(compiled), perf.memory(compiled)
        memory["state_bytes_per_device"] = perf.bytes_per_device(state_shape, shardings)
        # XLA costs the per-device program; the global step does that on every device.
        flops = flops * mesh.size if flops else None
        print(f"{config.model.name}: {n_params:,} parameters; one train step at batch "
              f"{config.train.batch_size}: {flops / 1e12 if flops else float('nan'):.3f} TFLOPs")
        print(f"parameters + optimizer state per device: {perf.human_bytes(memory['state_bytes_per_device'])}")
        if line := perf.memory_line(memory):
            print(line)
        return {"params": n_params, "train_step_flops": flops, "memory": memory}

    # 4. Workdir (one run writes to it at a time), state (created sharded), resume or a fresh start (from
    #    init_from's weights, if any).
    #    A rerun may change harmless fields (run length, logging, eval frequency: recorded in config_history.jsonl),
    #    never the model's shapes or the meaning of its inputs.
    workdir = check_workdir(workdir)
    lock = reliability.WorkdirLock(workdir, process_index=jax.process_index())
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    latest = ckpt.latest_step()
    try:
        changes = check_resume(config, workdir, tokenizer, checkpointed=latest is not None)
    except ValueError:
        lock.release()
        raise
    state, shardings = state_lib.create_train_state(model, batch_shapes, tx, mesh, rules, config.seed, boxed)
    state, how = state_lib.restore_or_init(state, shardings, ckpt, config.get("init_from"), meta.answer_vocab,
                                           tokenizer)
    logging.info("%s", how)
    start_step = int(state["step"])
    if start_step >= config.train.steps:
        ckpt.close()
        lock.release()
        logging.info("already at step %d (train.steps=%d): nothing to do; raise --config.train.steps to train on",
                     start_step, config.train.steps)
        return last_eval(workdir)
    if jax.process_index() == 0:
        if changes:
            run_config.record(workdir, start_step, changes)
        checkpoint.save_config(config, workdir)
        checkpoint.save_run_files(workdir, tokenizer=tokenizer, answer_vocab=meta.answer_vocab)
    writer = MetricWriter(workdir)
    writer.truncate_after(start_step)
    logging.info("starting at step %d of %d", start_step, config.train.steps)

    # 5. Input: each process reads its own shard; the order is a function of (seed, step), so resuming is exact.
    batches = sharding.prefetch_to_mesh(pipeline.train_iterator(
        config.data, tokenizer, global_batch_size=config.train.batch_size, seed=config.seed, start_step=start_step),
        mesh, DEVICE_PREFETCH)
    evaluators = build_evaluators(config, model=model, meta=meta, tokenizer=tokenizer, mesh=mesh, out_dir=workdir)

    # 6. The jitted step: explicit in/out shardings, state donated so parameters are updated in place.
    step_fn = jit_train_step(task, tx, schedule, mesh, shardings, accum_steps)
    rng = jax.random.key(config.seed + 1)

    # 7. Loop. SIGTERM / SIGINT finish the step, save and stop (reliability.StopSignals); a non-finite loss,
    #    gradient or parameter norm stops the run before that state can be saved.
    eval_metrics: dict = {}
    log_every, last = config.train.log_every, config.train.steps
    compiled, flops = None, 0.0
    peak = perf.peak_flops(override_tflops=config.train.get("peak_tflops"))
    t_last, step_last = time.perf_counter(), start_step
    with lock, jax.set_mesh(mesh), nn.logical_axis_rules(rules), reliability.StopSignals() as signals:
        for step in range(start_step + 1, last + 1):
            batch = next(batches)
            if compiled is None:  # compile once, explicitly, to read the step's FLOPs and memory from XLA
                logging.info("compiling the train step (once per run; seconds to minutes)")
                compiled = step_fn.lower(state, batch, rng).compile()
                flops = perf.step_flops(compiled) or 0.0
                if memory_line := perf.memory_line(perf.memory(compiled)):
                    logging.info("%s", memory_line)
                t_last = time.perf_counter()  # keep compile time out of the first throughput and ETA
            state, metrics = compiled(state, batch, rng)
            stopping = signals.requested(ckpt.manager, step)
            saving = stopping or step == last or ckpt.due(step)
            recorded = step % log_every == 0 or step == last  # metrics.jsonl keeps the log_every grid
            logging_step = recorded or step == start_step + 1  # the console also shows the first step
            if saving or logging_step:  # the host looks at the metrics (and so waits for the step) here
                metrics = jax.device_get(metrics)
                reliability.check_finite(metrics, step, ckpt.latest_step())

            if logging_step:
                now = time.perf_counter()
                steps_per_s = (step - step_last) / (now - t_last)
                t_last, step_last = now, step
                metrics.update(examples_per_s=steps_per_s * config.train.batch_size,
                               device_flops_per_s=steps_per_s * flops)
                if peak:
                    metrics["mfu"] = steps_per_s * flops / peak
                if recorded:
                    writer.write(step, "train", metrics)
                logging.info("%s", console_line(step, last, metrics, (last - step) / max(steps_per_s, 1e-9)))

            due = {name: ev for name, ev in evaluators.items() if step % ev.every_steps == 0 or step == last}
            if due and not stopping:  # a preempted run saves first; the evaluation can wait for the rerun
                eval_metrics = run_evaluators(due, state["params"], step)
                writer.write(step, "eval", eval_metrics)
                logging.info("%s", eval_line(step, eval_metrics))
                t_last = time.perf_counter()  # keep eval time out of the throughput figure

            if saving:
                ckpt.save(step, state, force=True)
            if stopping:
                ckpt.close()
                writer.close()
                raise reliability.Stopped(signals.signum or signal.SIGTERM, step)
    ckpt.close()
    writer.close()
    return eval_metrics


def finished_line(workdir: str, metrics: dict, seconds: float) -> str:
    """The run's last line: wall time, the last evaluation and where the results are."""
    shown, per_evaluator = [], {}
    for name, value in report.ordered(metrics):  # the first three results of each evaluator; no chance or counts
        evaluator, _, metric = name.rpartition("/")
        if "chance" in metric or metric.startswith("num_") or per_evaluator.get(evaluator, 0) >= 3:
            continue
        per_evaluator[evaluator] = per_evaluator.get(evaluator, 0) + 1
        shown.append(f"{name} {report.format_value(name, value)}")
    shown = "  ".join(shown)
    return (f"done in {datetime.timedelta(seconds=round(seconds))}; last eval: {shown or 'none'}; results in "
            f"{workdir} (metrics.jsonl, checkpoints/; `python -m mmjax.evaluate --workdir={workdir}` writes a report, "
            f"`tensorboard --logdir={workdir}` shows the curves)")


def main(argv: list[str]) -> None:
    """CLI entry point."""
    del argv
    cli_logging.quiet_foreign_info()
    started = time.perf_counter()
    try:  # before anything asks JAX for its devices
        distributed.initialize(distributed.resolve_launch(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                                          _DISTRIBUTED.value))
    except ValueError as e:
        cli.fail(str(e))
    if jax.process_index() > 0 and logging.get_verbosity() == logging.INFO:
        logging.set_verbosity(logging.WARNING)  # one host tells the story; the others speak up only on problems
    config = cli.config_flag()
    if config is None:
        cli.fail("--config is required, e.g. --config=configs/clip.py")
    try:
        metrics = train_and_evaluate(config, _WORKDIR.value, dry_run=_DRY_RUN.value)
    except reliability.Stopped as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except FloatingPointError as e:
        cli.fail(str(e), status=1)
    except (ValueError, FileNotFoundError) as e:
        # Input errors (mesh, batch size, workdir, tokenizer path, image/patch size) end in one line.
        if logging.get_verbosity() >= logging.DEBUG:
            raise
        cli.fail(f"{e}  (rerun with --verbosity=1 for the traceback)")
    if not _DRY_RUN.value and jax.process_index() == 0:
        print(finished_line(_WORKDIR.value, metrics, time.perf_counter() - started))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
