"""Evaluate a model without training it: the config's evaluators on a run's latest checkpoint, or on weights from
`init_from` (e.g. a directory written by `python -m mmjax.convert --hf=... --out=DIR`, or an HF directory).

    python -m mmjax.evaluate --workdir=/tmp/clip                       # the run's config.json + latest checkpoint
    python -m mmjax.evaluate --config=configs/lit.py                   # fresh init + config.init_from weights
    python -m mmjax.evaluate --workdir=/tmp/vilt --evals=itm           # only some of the config's evaluators

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
from ml_collections import config_flags

from mmjax import checkpoint, cli_logging, optim, sharding
from mmjax import state as state_lib
from mmjax.data import pipeline
from mmjax.evaluation.evaluators import build_evaluators, run_evaluators
from mmjax.models import build_model

def define_flags() -> None:
    """This program's flags (defined when it runs, so that importing it beside mmjax.train defines nothing twice)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (default: WORKDIR/config.json).")
    flags.DEFINE_string("workdir", None, "A training run: its config.json and latest checkpoint.")
    flags.DEFINE_list("evals", None, "Names of config.evals to run (default: all of them).")


def evaluate(config: Any, workdir: str | None = None, only: list[str] | None = None) -> dict[str, float]:
    """Builds the model as the trainer does, loads weights (checkpoint, else init_from) and runs the evaluators."""
    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.logical_rules(config.sharding.rules)
    tokenizer = pipeline.load_tokenizer(config.data)
    meta = pipeline.dataset_meta(config.data, tokenizer)
    state_lib.resolve_model_config(config, meta)
    model = build_model(config.model)
    batch_shapes = pipeline.batch_shapes(config.data, meta)
    boxed = state_lib.abstract_params(model, batch_shapes, config.seed)
    # The checkpoint holds the whole train state, so restore into the same structure and keep the params.
    tx, _ = optim.make_optimizer(config.optimizer, config.train.steps, nn.meta.unbox(boxed))
    state, shardings = state_lib.create_train_state(model, batch_shapes, tx, mesh, rules, config.seed, boxed)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint) if workdir else None
    if (ckpt is None or ckpt.latest_step() is None) and not (config.get("init_from") and config.init_from.path):
        raise ValueError("nothing to evaluate: no checkpoint in --workdir and no config.init_from.path")
    state, how = state_lib.restore_or_init(state, shardings, ckpt, config.get("init_from"))
    logging.info("evaluating: %s", how)
    evaluators = build_evaluators(config, model=model, meta=meta, tokenizer=tokenizer, mesh=mesh, only=only)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        metrics = run_evaluators(evaluators, state["params"])
    if ckpt is not None:
        ckpt.close()
    return metrics


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
        metrics = evaluate(config, workdir, flags.FLAGS.evals)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(metrics, sort_keys=True))
    if workdir:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
