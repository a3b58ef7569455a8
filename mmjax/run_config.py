"""What a rerun on an existing workdir may change: the saved config.json against the new one, field by field.

    changes = run_config.diff(saved, config)            # {"train.steps": (1500, 3000), ...}
    run_config.check_resumable(changes)                  # ValueError for shape-changing fields, in one line
    run_config.record(workdir, step, changes)            # appends to WORKDIR/config_history.jsonl

A field that decides the shape of a parameter, or what a token or pixel means (the model's structure, the
vocabulary, image and patch size, text length, the tokenizer), cannot change under a checkpoint: refused with the
advice to use a new workdir. Everything else is allowed; the harmless fields (length of the run and of its schedule,
logging, evaluation and checkpoint frequency) are reported as information, the rest as a warning that the resumed
run is no longer the one the first config described. Each change is appended to config_history.jsonl, so the
config of every segment of the run can be recovered.
"""
from __future__ import annotations

import fnmatch
import json
import os
import time
from typing import Any, Mapping

HISTORY_FILE = "config_history.jsonl"

# Model fields that change only how the computation runs (or only how a fresh start initialises), never a shape.
_MODEL_RUNTIME = ("dtype", "param_dtype", "remat", "remat_policy", "attention", "logit_scale_init")
SHAPE_FIELDS = ("model.*", "data.image_size", "data.max_len", "data.tokenizer", "data.tokenizer.*",
                "data.patch_size", "data.regions.*", "data.audio.*")
# A resumed run restores onto any mesh and ignores init_from (the checkpoint comes first).
HARMLESS_FIELDS = ("train.steps", "train.log_every", "checkpoint.every_steps", "checkpoint.keep",
                   "checkpoint.async_save", "checkpoint.fallback", "evals.*.every_steps", "evals.*.batch_size",
                   "optimizer.warmup_steps", "mesh.*", "sharding.*", "data.prefetch", "init_from.*",
                   "train.accum_steps", "train.peak_tflops", "task.loss_impl")

_MISSING = "<absent>"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for a nested mapping (a ConfigDict's to_dict() or parsed config.json)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _plain(config: Any) -> dict:
    """A config as plain JSON values (what config.json holds: tuples become lists)."""
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(tree, default=str))


def diff(saved: Any, current: Any) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two configs: {dotted name: (saved, current)}; absent fields included."""
    old, new = flatten(_plain(saved)), flatten(_plain(current))
    return {k: (old.get(k, _MISSING), new.get(k, _MISSING)) for k in sorted(set(old) | set(new))
            if old.get(k, _MISSING) != new.get(k, _MISSING)}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def kind(name: str) -> str:
    """'shape' (cannot change under a checkpoint), 'harmless' or 'other' for one dotted config field."""
    if name.startswith("model.") and _matches(name.rsplit(".", 1)[-1], _MODEL_RUNTIME):
        return "other"
    if _matches(name, SHAPE_FIELDS):
        return "shape"
    return "harmless" if _matches(name, HARMLESS_FIELDS) else "other"


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """"field old -> new; ..." for a log or error line."""
    return "; ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())


def check_resumable(changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Raises one ValueError naming every shape-changing difference (the checkpoint cannot hold the new model)."""
    shape = {k: v for k, v in changes.items() if kind(k) == "shape"}
    if shape:
        raise ValueError(f"the config changed fields that decide parameter shapes or what the inputs mean since this "
                         f"workdir's checkpoints were written: {describe(shape)}. Use a new --workdir for a changed "
                         f"model or data, or rerun with the saved values (WORKDIR/config.json)")


def record(workdir: str, step: int, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Appends one line {time, step, changes} to WORKDIR/config_history.jsonl (written by one process only)."""
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step,
            "changes": {k: [a, b] for k, (a, b) in changes.items()}}
    with open(os.path.join(workdir, HISTORY_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def load_saved(workdir: str) -> dict | None:
    """WORKDIR/config.json as a dict, or None when there is none (a new run)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
