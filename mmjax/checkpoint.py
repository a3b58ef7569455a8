"""Orbax checkpoints under WORKDIR/checkpoints: save every N steps, keep K, resume from the latest.

The data order is a pure function of (seed, step) (see mmjax/data/pipeline.py), so the train state alone is enough
to resume exactly: the input iterator restarts at the restored step. Orbax writes each step to a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact. A complete
step whose files were damaged later is reported and skipped for the newest step that restores
(`checkpoint.fallback`); a checkpoint of another model shape is refused naming the parameters and both shapes.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging


def default_checkpoint_config() -> ml_collections.ConfigDict:
    """Defaults for the checkpoint section of a config. fallback: when the latest step does not restore (truncated
    or missing files), say so and resume from the newest step that does."""
    return ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True, fallback=True))


class Checkpointer:
    """Saves and restores the train state (a pytree of sharded jax.Arrays) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, config: Any):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.every_steps = int(config.every_steps)
        self.fallback = bool(config.get("fallback", True))
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

    def shape_mismatches(self, abstract_state: Any, step: int) -> list[str]:
        """Where checkpoint `step`'s tree differs from `abstract_state`'s: "path: shape in the checkpoint vs now",
        missing and extra leaves ([] when they agree or its metadata cannot be read)."""
        def errors_only(record: std_logging.LogRecord) -> bool:
            return record.levelno >= std_logging.ERROR

        absl_logger = logging.get_absl_logger()
        absl_logger.addFilter(errors_only)  # orbax warns that the item has no checkpoint-level metadata file
        try:
            meta = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "default"))
        except Exception:  # unreadable metadata: the restore itself will say what is wrong
            return []
        finally:
            absl_logger.removeFilter(errors_only)
        tree = getattr(meta, "item_metadata", meta)
        saved = _shapes(getattr(tree, "tree", tree))
        wanted = _shapes(abstract_state)
        out = [f"{k}: {saved[k]} in the checkpoint vs {wanted[k]} now" for k in wanted
               if k in saved and saved[k] != wanted[k]]
        out += [f"{k}: not in the checkpoint" for k in wanted if k not in saved]
        out += [f"{k}: only in the checkpoint" for k in saved if k not in wanted]
        return sorted(out, key=lambda line: not line.startswith("params/"))  # the parameters first

    def restore_intact(self, abstract_state: Any, fallback: bool = True) -> tuple[Any, list[str]]:
        """(state, problems): the newest step that restores; each newer step that failed is one line of problems
        (with fallback=False the first failure raises). A checkpoint that does not fit the model (other shapes or
        parameters) is a ValueError naming the parameters and both shapes."""
        problems, failed = [], []
        for step in sorted(self.manager.all_steps(), reverse=True):
            mismatches = self.shape_mismatches(abstract_state, step)
            listed = f"{len(mismatches)} differences: {'; '.join(mismatches[:3])}" + ("; ..." if len(mismatches) > 3
                                                                                    else "")
            if any(" in the checkpoint vs " in m for m in mismatches):  # a parameter of another shape: a changed model
                raise ValueError(f"checkpoint step {step} in {self.directory} does not fit this model ({listed}): use "
                                 f"a new --workdir for a changed model")
            try:
                state = self.restore(abstract_state, step)
            except Exception as e:  # orbax / tensorstore errors vary by storage backend; all mean "not intact"
                # Leaves missing from the metadata are damage or another model; only an earlier step that restores
                # tells them apart, so nothing is set aside unless one does.
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                problems.append(f"checkpoint step {step} does not restore ({first}"
                                f"{'; ' + listed if mismatches else ''})")
                logging.warning("%s", problems[-1])
                if not fallback:
                    raise ValueError(f"{problems[-1]}; checkpoint.fallback=False: not trying earlier steps") from None
                failed.append(step)
                continue
            self._set_aside(failed)
            return state, problems
        raise ValueError(f"no checkpoint in {self.directory} restores: {'; '.join(problems)}")

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged steps to WORKDIR/corrupt_checkpoints/ (kept for a look, out of the way of new saves)."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, str(step))
                if os.path.exists(target):
                    shutil.rmtree(target)
                shutil.move(os.path.join(self.directory, str(step)), target)
                logging.warning("moved damaged checkpoint step %d to %s", step, target)
        self.manager.reload()

    def due(self, step: int) -> bool:
        """Whether `step` is a regular checkpoint step (a multiple of every_steps)."""
        return step % self.every_steps == 0

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves when `step` is a multiple of `every_steps` (or `force`); returns whether a save started."""
        if not force and step % self.every_steps:
            return False
        try:
            return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        except OSError as e:  # a full disk, a lost mount, a permission change: the earlier steps stay as they were
            raise ValueError(f"could not save checkpoint step {step} in {self.directory}: {e.strerror or e}; the "
                             f"earlier checkpoints ({self._steps_text()}) are intact and a rerun resumes from the "
                             f"latest") from None

    def _steps_text(self) -> str:
        steps = sorted(self.manager.all_steps())
        return ", ".join(map(str, steps)) if steps else "none"

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed (a failed one is a one-line ValueError)."""
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            raise ValueError(f"an asynchronous checkpoint save in {self.directory} failed: {e.strerror or e}; the "
                             f"earlier checkpoints ({self._steps_text()}) are intact") from None

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.wait()
        self.manager.close()


def _key_name(key: Any) -> str:
    """One step of a key path as plain text: a dict key, a sequence index or an attribute name."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shapes(tree: Any) -> dict[str, tuple]:
    """"params/a/b" -> shape of every leaf. Plain names, so that a NamedTuple optimizer state (attributes) and its
    saved form (dict keys) compare equal."""
    return {"/".join(_key_name(k) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


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


def restore_params(directory: str, step: int) -> Any:
    """The params of checkpoint `step` under `directory` (a run's checkpoints/) as host numpy arrays, whatever
    device count or mesh the run used; the optimizer state stays on disk."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                    item_handlers=ocp.PyTreeCheckpointHandler())
    try:
        # A restore without a target fails on another device count ("topology mismatch"): name every params leaf
        # as a host numpy array instead.
        tree = manager.item_metadata(step)
        params = getattr(tree, "tree", tree)["params"]
        target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)}
        args = {"params": jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), params)}
        state = manager.restore(step, args=ocp.args.PyTreeRestore(target, restore_args=args, partial_restore=True))
    finally:
        manager.close()
    return state["params"]


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """Reads the config saved by `save_config` (for evaluation or inspection of a run)."""
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise ValueError(f"{workdir} is not a training run: it has no config.json")
    with open(os.path.join(workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))
