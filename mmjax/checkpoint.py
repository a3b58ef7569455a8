"""Orbax checkpoints under WORKDIR/checkpoints: save every N steps, keep K, resume from the latest.

The data order is a pure function of (seed, step) (see mmjax/data/pipeline.py), so the train state alone is enough
to resume exactly: the input iterator restarts at the restored step. Orbax writes each step to a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging


def default_checkpoint_config() -> ml_collections.ConfigDict:
    """Defaults for the checkpoint section of a config."""
    return ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))


class Checkpointer:
    """Saves and restores the train state (a pytree of sharded jax.Arrays) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, config: Any):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.every_steps = int(config.every_steps)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(config.keep),
            create=True,
            enable_async_checkpointing=bool(config.get("async_save", True)),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest completed checkpoint step, or None."""
        return self.manager.latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores `step` (default: latest) onto the shardings carried by `abstract_state`'s ShapeDtypeStructs."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        logging.info("restoring checkpoint step %d from %s", step, self.directory)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def due(self, step: int) -> bool:
        """Whether `step` is a regular checkpoint step (a multiple of every_steps)."""
        return step % self.every_steps == 0

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves when `step` is a multiple of `every_steps` (or `force`); returns whether a save started."""
        if not force and step % self.every_steps:
            return False
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: what orbax needs to restore straight onto the mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the run's config beside the checkpoints as JSON (written to a temp file, then renamed)."""
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def save_run_files(workdir: str, *, tokenizer: Any = None, answer_vocab: Any = None) -> None:
    """Writes what the run's weights mean beside them: its tokenizer (tokenizer.json: token ids) and, for VQA data,
    its answer vocabulary (answer_vocab.json: answer ids), so fine-tuning from the run can check both."""
    if tokenizer is not None:
        tokenizer.save(os.path.join(workdir, "tokenizer.json"))
    if answer_vocab is not None:
        tmp = os.path.join(workdir, "answer_vocab.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(list(answer_vocab), f)
        os.replace(tmp, os.path.join(workdir, "answer_vocab.json"))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """Reads the config saved by `save_config` (for evaluation or inspection of a run)."""
    with open(os.path.join(workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))
