"""Evaluate a model without training it: the config's evaluators on a run's latest checkpoint, or on weights from
`init_from` (e.g. a directory written by `python -m mmjax.convert --hf=... --out=DIR`, or an HF directory).

    python -m mmjax.evaluate --workdir=/tmp/clip                       # the run's config.json + latest checkpoint
    python -m mmjax.evaluate --workdir=/tmp/vqa --step=1000            # another checkpoint of the run
    python -m mmjax.evaluate --config=configs/lit.py                   # fresh init + config.init_from weights
    python -m mmjax.evaluate --workdir=/tmp/vilt --evals=itm           # only some of the config's evaluators

Prints a table of the metrics and, last, one JSON line of them. With a workdir it also writes eval.json and
eval_report.md there: the table, the run's training curves (eval_curves.png) and sample predictions of the
evaluators that keep some (eval_samples_NAME.png).
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

from mmjax import checkpoint, cli, cli_logging, optim, sharding
from mmjax import state as state_lib
from mmjax.data import pipeline, preprocess
from mmjax.evaluation import report
from mmjax.evaluation.evaluators import build_evaluators, run_evaluators
from mmjax.models import build_model

def define_flags() -> None:
    """This program's flags (defined when it runs, so that importing it beside mmjax.train defines nothing twice)."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (default: WORKDIR/config.json).")
    flags.DEFINE_string("workdir", None, "A training run: its config.json and latest checkpoint.")
    flags.DEFINE_list("evals", None, "Names of config.evals to run (default: all of them).")
    flags.DEFINE_integer("step", None, "The checkpoint step to evaluate (default: the latest).")


def evaluate(config: Any, workdir: str | None = None, only: list[str] | None = None,
             step: int | None = None) -> tuple[dict[str, float], dict[str, list], int | None]:
    """Builds the model as the trainer does, loads weights (the run's checkpoint at `step` or its latest, else
    init_from) and runs the evaluators; returns (metrics, samples by evaluator, the step evaluated)."""
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
    if ckpt is not None and ckpt.latest_step() is not None:
        steps = ckpt.manager.all_steps()
        if step is not None and step not in steps:
            raise ValueError(f"--step={step}: {workdir} has checkpoints at steps {sorted(steps)}")
        state = ckpt.restore(checkpoint.abstract_with_shardings(state, shardings), step)
        logging.info("evaluating %s at step %d", workdir, int(state["step"]))
    else:
        state, how = state_lib.restore_or_init(state, shardings, None, config.get("init_from"), meta.answer_vocab,
                                               tokenizer)
        logging.info("evaluating: %s", how)
    evaluators = build_evaluators(config, model=model, meta=meta, tokenizer=tokenizer, mesh=mesh, only=only,
                                  out_dir=workdir)
    evaluated = int(state["step"]) if ckpt is not None and ckpt.latest_step() is not None else None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        metrics = run_evaluators(evaluators, state["params"], evaluated)
    if ckpt is not None:
        ckpt.close()
    return metrics, {name: ev.samples for name, ev in evaluators.items()}, evaluated


def main(argv: list[str]) -> None:
    """CLI entry point: one JSON line of metrics; input errors end in one line."""
    del argv
    cli_logging.quiet_foreign_info()
    workdir = flags.FLAGS.workdir
    try:
        config = cli.config_flag()
        if config is None:
            if not workdir:
                raise ValueError("give --workdir (a training run) or --config")
            config = checkpoint.load_config(workdir)
        metrics, samples, step = evaluate(config, workdir, flags.FLAGS.evals, flags.FLAGS.step)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report.metrics_table(metrics))
    if workdir:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        mean, std = preprocess.mean_std(config.data.get("normalization") or (tuple(config.data.mean),
                                                                            tuple(config.data.std)))
        path = report.write(workdir, metrics, workdir=workdir, step=step, samples=samples, mean=mean, std=std)
        print(f"report: {path}")
    print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
