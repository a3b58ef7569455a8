"""Train a model from a config: flags -> config -> mesh -> data -> model -> sharded state -> loop.

    python -m mmjax.train --config=configs/clip.py --workdir=/tmp/clip
    python -m mmjax.train --config=configs/clip.py:base --workdir=/tmp/b --config.train.batch_size=1024
    python -m mmjax.train --config=configs/clip.py:large --dry_run     # build abstractly, print sizes, exit

Rerunning the same command resumes from the latest checkpoint in WORKDIR. WORKDIR receives config.json,
checkpoints/, metrics.jsonl (one JSON record per line) and tensorboard/.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from mmjax import checkpoint, cli_logging, optim, pretrained, sharding
from mmjax.data import pipeline
from mmjax.metrics_writer import MetricWriter
from mmjax.models import build_model
from mmjax.tasks import get_task

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/clip.py:tiny.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the saved config.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the model abstractly, print parameter count and FLOPs, exit.")


# ----------------------------------------------------------------------------------------------------------------
# State: a plain dict {step, params, opt_state}, created already sharded on the mesh.

def init_params(model: nn.Module, task: Any, rng: jax.Array) -> Any:
    """Initial parameters (boxed with their logical axis names) from a batch of one dummy example."""
    batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), task.dummy_batch())
    return model.init({"params": rng, "dropout": rng}, batch, train=False)["params"]


def abstract_params(model: nn.Module, task: Any, seed: int) -> Any:
    """Parameter shapes with their logical axis metadata, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, model, task), jax.random.key(seed))


def create_train_state(model: nn.Module, task: Any, tx: optax.GradientTransformation, mesh, rules, seed: int,
                       boxed_params: Any) -> tuple[dict, dict]:
    """Initialises {step, params, opt_state} directly into its shardings; returns (state, shardings)."""
    param_shardings = sharding.logical_shardings(boxed_params, mesh, rules)
    params_shape = nn.meta.unbox(boxed_params)
    opt_shape = jax.eval_shape(tx.init, params_shape)
    # Optimizer moments mirror the parameters and take their shardings; counters are replicated.
    opt_shardings = sharding.optimizer_shardings(opt_shape, params_shape, param_shardings, mesh)
    shardings = {"step": sharding.replicated(mesh), "params": param_shardings, "opt_state": opt_shardings}

    def init(rng):
        params = nn.meta.unbox(init_params(model, task, rng))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return state, shardings


def train_step(state: dict, batch: dict, rng: jax.Array, *, task: Any, tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[dict, dict]:
    """One optimizer step: task loss -> grads -> optax update. Pure; jitted with shardings below."""
    rng = jax.random.fold_in(rng, state["step"])
    (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state["params"], batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   lr=schedule(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def jit_train_step(task: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, mesh,
                   shardings: dict) -> Any:
    """`train_step` under jax.jit with explicit in/out shardings and the state donated (updated in place)."""
    return jax.jit(functools.partial(train_step, task=task, tx=tx, schedule=schedule),
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


def count_params(tree: Any) -> int:
    """Total number of parameter elements in a (possibly abstract, possibly boxed) tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree)))


def resolve_vocab(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
    """Sets the model's vocab_size (model.text.vocab_size or model.vocab_size) from the tokenizer unless the config
    fixes it (it must then be large enough)."""
    section = config.model.get("text") if "text" in config.model else config.model
    if tokenizer is None or "vocab_size" not in section:
        return
    if section.get("vocab_size") is None:
        section.vocab_size = tokenizer.vocab_size
    elif section.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocab_size={section.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens")


def step_flops(compiled: Any) -> float | None:
    """FLOPs of one compiled step on one device, from XLA's cost analysis (None where the backend does not say)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:  # cost analysis is best-effort metadata; never fail a run over it
        return None


# ----------------------------------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None, *, dry_run: bool = False) -> dict:
    """Runs (or resumes) training as the config says; returns the final eval metrics."""
    # 1. Mesh and batch split: fail fast on a mesh or batch size that cannot work.
    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.logical_rules(config.sharding.rules)
    sharding.check_batch_size(config.train.batch_size, mesh)
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)

    # 2. Tokenizer (its vocabulary sizes the text tower), model, task, optimizer.
    vocab_fixed = (config.model.get("text") or config.model).get("vocab_size")
    tokenizer = None if dry_run and vocab_fixed else pipeline.load_tokenizer(config.data)
    resolve_vocab(config, tokenizer)
    model = build_model(config.model)
    task = get_task(config.task, model=model, config=config, mesh=mesh, tokenizer=tokenizer)
    boxed = abstract_params(model, task, config.seed)
    n_params = count_params(boxed)
    logging.info("model %s: %s parameters", config.model.name, f"{n_params:,}")
    tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps, nn.meta.unbox(boxed))

    state_shape = None
    if dry_run:
        step_fn = jax.jit(functools.partial(train_step, task=task, tx=tx, schedule=schedule))
        param_shape = nn.meta.unbox(boxed)
        state_shape = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": param_shape,
                       "opt_state": jax.eval_shape(tx.init, param_shape)}
        batch = task.train_batch_shapes(config.train.batch_size)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            flops = step_flops(step_fn.lower(state_shape, batch, jax.random.key(0)).compile())
        # XLA costs the per-device program; the global step does that on every device.
        flops = flops * mesh.size if flops else None
        summary = {"params": n_params, "train_step_flops": flops}
        print(f"{config.model.name}: {n_params:,} parameters; one train step at batch "
              f"{config.train.batch_size}: {flops / 1e12 if flops else float('nan'):.3f} TFLOPs")
        return summary

    # 3. Workdir, state (created sharded), resume.
    workdir = check_workdir(workdir)
    state, shardings = create_train_state(model, task, tx, mesh, rules, config.seed, boxed)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(checkpoint.abstract_with_shardings(state, shardings))
    elif config.get("init_from") and config.init_from.path:
        # Fresh start from pretrained weights (e.g. LiT's locked text tower); a resumed run has them already.
        weights, _ = pretrained.load_params(config.init_from.path)
        params = pretrained.graft(state["params"], weights, config.init_from.source, config.init_from.target)
        state = dict(state, params=jax.device_put(params, shardings["params"]))
        logging.info("initialised %s from %s (%s)", config.init_from.target or "the model", config.init_from.path,
                     config.init_from.source or "all of it")
    start_step = int(state["step"])
    if jax.process_index() == 0:
        checkpoint.save_config(config, workdir)
    writer = MetricWriter(workdir)
    writer.truncate_after(start_step)
    logging.info("starting at step %d of %d", start_step, config.train.steps)

    # 4. Data: each process reads its own shard; the order is a function of (seed, step), so resuming is exact.
    batches = pipeline.train_iterator(config.data, tokenizer, global_batch_size=config.train.batch_size,
                                      seed=config.seed, start_step=start_step, **task.data_options)

    # 5. The jitted step: explicit in/out shardings, state donated so parameters are updated in place.
    step_fn = jit_train_step(task, tx, schedule, mesh, shardings)
    rng = jax.random.key(config.seed + 1)

    # 6. Loop.
    eval_metrics: dict = {}
    log_every, eval_every = config.train.log_every, config.train.eval_every
    compiled, flops = None, 0.0
    t_last, step_last = time.perf_counter(), start_step
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step in range(start_step + 1, config.train.steps + 1):
            batch = sharding.make_global_batch(next(batches), mesh)
            if compiled is None:  # compile once, explicitly, to read the step's FLOPs from XLA
                compiled = step_fn.lower(state, batch, rng).compile()
                flops = step_flops(compiled) or 0.0
            state, metrics = compiled(state, batch, rng)

            if step % log_every == 0 or step == config.train.steps:
                metrics = jax.device_get(metrics)
                if not np.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {step}")
                now = time.perf_counter()
                steps_per_s = (step - step_last) / (now - t_last)
                t_last, step_last = now, step
                metrics.update(examples_per_s=steps_per_s * config.train.batch_size,
                               device_flops_per_s=steps_per_s * flops)
                writer.write(step, "train", metrics)
                eta = (config.train.steps - step) / max(steps_per_s, 1e-9)
                logging.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.0f ex/s  %.1f GFLOP/s/device  ETA %s",
                             step, config.train.steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
                             metrics["examples_per_s"], metrics["device_flops_per_s"] / 1e9,
                             time.strftime("%H:%M:%S", time.gmtime(eta)))

            if step % eval_every == 0 or step == config.train.steps:
                eval_metrics = task.evaluate(state["params"])
                writer.write(step, "eval", eval_metrics)
                logging.info("eval step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                t_last = time.perf_counter()  # keep eval time out of the throughput figure

            ckpt.save(step, state, force=step == config.train.steps)
    ckpt.close()
    writer.close()
    return eval_metrics


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns config errors (unknown field, bad value) into one clear line."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # config_flags raises various types; all are user input errors here
        message = str(e.args[0] if getattr(e, "args", None) else e).replace("\n", " ").strip("'\" ")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    """CLI entry point."""
    del argv
    cli_logging.quiet_foreign_info()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/clip.py")
    try:
        train_and_evaluate(config, _WORKDIR.value, dry_run=_DRY_RUN.value)
    except (ValueError, FileNotFoundError) as e:
        # Input errors (mesh, batch size, workdir, tokenizer path, image/patch size) end in one line.
        if logging.get_verbosity() >= logging.DEBUG:
            raise
        print(f"error: {e}  (rerun with --verbosity=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
