"""Evaluate a model without training it: the task's held-out eval of a run's latest checkpoint, or of weights
from `init_from` (e.g. a directory written by `python -m mmjax.convert --hf=... --out=DIR`, or an HF directory).

    python -m mmjax.evaluate --workdir=/tmp/clip                       # the run's config.json + latest checkpoint
    python -m mmjax.evaluate --config=configs/lit.py                   # fresh init + config.init_from weights

Prints one JSON object of metrics (and writes it to WORKDIR/eval.json when a workdir is given).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import flax.linen as nn
import jax
from absl import app, flags, logging

from mmjax import checkpoint, cli_logging, optim, pretrained, sharding
# The trainer's module defines --config and --workdir; this program reads the same two flags.
from mmjax import train as trainer
from mmjax.data import pipeline
from mmjax.models import build_model
from mmjax.tasks import get_task


def evaluate(config: Any, workdir: str | None = None) -> dict[str, float]:
    """Builds model and task as the trainer does, loads weights (checkpoint, else init_from) and evaluates."""
    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.logical_rules(config.sharding.rules)
    tokenizer = pipeline.load_tokenizer(config.data)
    trainer.resolve_vocab(config, tokenizer)
    model = build_model(config.model)
    task = get_task(config.task, model=model, config=config, mesh=mesh, tokenizer=tokenizer)
    boxed = trainer.abstract_params(model, task, config.seed)
    # The checkpoint holds the whole train state, so restore into the same structure and keep the params.
    tx, _ = optim.make_optimizer(config.optimizer, config.train.steps, nn.meta.unbox(boxed))
    state, shardings = trainer.create_train_state(model, task, tx, mesh, rules, config.seed, boxed)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint) if workdir else None
    if ckpt is not None and ckpt.latest_step() is not None:
        state = ckpt.restore(checkpoint.abstract_with_shardings(state, shardings))
        logging.info("evaluating %s at step %d", workdir, int(state["step"]))
    elif config.get("init_from") and config.init_from.path:
        weights, _ = pretrained.load_params(config.init_from.path)
        params = pretrained.graft(state["params"], weights, config.init_from.source, config.init_from.target)
        state = dict(state, params=jax.device_put(params, shardings["params"]))
    else:
        raise ValueError("nothing to evaluate: no checkpoint in --workdir and no config.init_from.path")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        metrics = task.evaluate(state["params"])
    if ckpt is not None:
        ckpt.close()
    return {k: float(v) for k, v in metrics.items()}


def main(argv: list[str]) -> None:
    """CLI entry point: one JSON line of metrics; input errors end in one line."""
    del argv
    cli_logging.quiet_foreign_info()
    workdir = flags.FLAGS.workdir
    try:
        config = flags.FLAGS.config
        if config is None:
            if not workdir:
                raise ValueError("give --workdir (a training run) or --config")
            config = checkpoint.load_config(workdir)
        metrics = evaluate(config, workdir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(metrics, sort_keys=True))
    if workdir:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    app.run(main)
