"""Start a model (or one of its towers) from pretrained weights: `config.init_from`.

    init_from.path    a training run's workdir (its latest checkpoint, or `init_from.step`), a directory written by
                      `python -m mmjax.convert --out=DIR`, or a Hugging Face model directory (config.json +
                      model.safetensors, converted on the fly by `mmjax.convert.hf.load`)
    init_from.source  "/"-separated path of the subtree to take from those params ("" = all of them)
    init_from.target  "/"-separated path where it goes in the model's params ("" = the whole model)
    init_from.strict  every parameter must be loaded (anything new, skipped or unused is an error)

Every parameter whose path and shape match is loaded; the rest keep their fresh initialisation. One table says
what happened to each: loaded, new (not in the checkpoint: e.g. a fine-tuning head), skipped (a shape mismatch,
both shapes shown) and unused (in the checkpoint, not in the model: e.g. the pretraining heads). Patch-position
tables are resized bicubically on their 2-D grid (cls row kept) when the model's image size differs, and an audio
tower's [time, frequency, D] table is resized linearly when the model's clips are longer or shorter. e.g. LiT's
locked text tower (configs/lit.py): path = the MiniLM directory, source = target = "text_encoder"; VQA
fine-tuning (configs/vqa.py): path = a pretraining run's workdir. Weights are applied only when a run starts
fresh: a resumed run restores its own checkpoint instead. Encoder layers are converted to the model's layout first
(unrolled encoder/layer_{i} or nn.scan-stacked encoder/layers: `scan_layers`), so either loads into either.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import config_dict

from mmjax import checkpoint
from mmjax.models import scan_params
from mmjax.optim import path_str

PARAMS_DIR = "params"  # orbax params of a converted model inside an `mmjax.convert --out` directory
CONFIG_FILE = "config.json"
RUN_CHECKPOINTS = "checkpoints"  # a training workdir's orbax checkpoints (mmjax/checkpoint.py)
ANSWER_VOCAB_FILE = "answer_vocab.json"  # written into a workdir by runs whose data has answers


def default_init_config() -> ml_collections.ConfigDict:
    """`init_from` section: nothing loaded unless `path` is set."""
    return ml_collections.ConfigDict(dict(path=config_dict.placeholder(str), step=config_dict.placeholder(int),
                                          source="", target="", strict=False))


def save_converted(out_dir: str, model_config: Mapping[str, Any], params: Any) -> None:
    """Writes `model_config` (config.json) and `params` (orbax, numpy on restore) into out_dir."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(dict(model_config), f, indent=2, sort_keys=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out_dir, PARAMS_DIR), jax.tree.map(np.asarray, params), force=True)
    checkpointer.wait_until_finished()


@dataclasses.dataclass
class Checkpoint:
    """Pretrained weights as numpy arrays, with what is known about them."""

    params: Any
    model_config: dict[str, Any]
    kind: str                               # "run" | "converted" | "hugging_face"
    step: int | None = None                 # a run's step
    answer_vocab: list[str] | None = None   # the answers its VQA head was trained on (a run, or HF's id2label)
    tokenizer_path: str | None = None       # the tokenizer its token ids belong to (a run's tokenizer.json)


def load_checkpoint(path: str, step: int | None = None) -> Checkpoint:
    """The weights at `path`: a training workdir (its latest checkpoint, or `step`), a converted directory or a
    Hugging Face directory; anything else is an error naming the path and what was expected there."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"init_from.path {path!r} is not a directory")
    if os.path.isdir(os.path.join(path, RUN_CHECKPOINTS)):
        manager = ocp.CheckpointManager(os.path.join(path, RUN_CHECKPOINTS))
        steps = manager.all_steps()
        if not steps:
            raise ValueError(f"init_from.path {path!r} is a training workdir with no checkpoint yet")
        if step is not None and step not in steps:
            raise ValueError(f"init_from.step={step}: {path} has checkpoints at steps {sorted(steps)}")
        step = max(steps) if step is None else step
        manager.close()
        params = checkpoint.restore_params(os.path.join(path, RUN_CHECKPOINTS), step)  # any device count
        with open(os.path.join(path, CONFIG_FILE)) as f:
            model_config = json.load(f)["model"]
        vocab = None
        if os.path.exists(os.path.join(path, ANSWER_VOCAB_FILE)):
            with open(os.path.join(path, ANSWER_VOCAB_FILE), encoding="utf-8") as f:
                vocab = json.load(f)
        tokenizer = os.path.join(path, "tokenizer.json")
        return Checkpoint(params, model_config, "run", step, vocab,
                          tokenizer if os.path.exists(tokenizer) else None)
    if step is not None:
        raise ValueError(f"init_from.step={step} needs a training workdir; {path} is not one")
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        with open(os.path.join(path, CONFIG_FILE)) as f:
            model_config = json.load(f)
        params = ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR))
        return Checkpoint(jax.tree.map(np.asarray, params), model_config, "converted")
    if not os.path.exists(os.path.join(path, CONFIG_FILE)):
        raise ValueError(f"init_from.path {path!r} holds no checkpoint: expected a training workdir "
                         f"({RUN_CHECKPOINTS}/), a converted directory ({PARAMS_DIR}/ + {CONFIG_FILE}) or a Hugging "
                         f"Face directory ({CONFIG_FILE} + model.safetensors)")
    from mmjax.convert import hf  # pylint: disable=import-outside-toplevel  (pulls in every converter)

    _, variables, model_config = hf.load(path)
    labels = hf.read_config(path).get("id2label") or {}
    vocab = [labels[k] for k in sorted(labels, key=int)] if "vqa_labels" in model_config and labels else None
    return Checkpoint(jax.tree.map(np.asarray, variables["params"]), model_config, "hugging_face", answer_vocab=vocab)


def load_params(path: str) -> tuple[Any, dict[str, Any]]:
    """(params as numpy arrays, model config dict) of `load_checkpoint(path)`."""
    ckpt = load_checkpoint(path)
    return ckpt.params, ckpt.model_config


def _subtree(tree: Any, path: str, what: str) -> Any:
    for key in [k for k in path.split("/") if k]:
        if not isinstance(tree, Mapping) or key not in tree:
            have = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise ValueError(f"init_from.{what}={path!r}: no {key!r} here; available: {have}")
        tree = tree[key]
    return tree


def _shapes(tree: Any) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _grid(rows: int) -> tuple[int, bool] | None:
    """(grid side, has a leading cls row) of a square patch-position table with `rows` rows, else None."""
    for cls in (True, False):
        side = math.isqrt(rows - cls)
        if side * side == rows - cls and side > 0:
            return side, cls
    return None


def resize_position_tables(new: Any, like: Any) -> Any:
    """Patch-position tables of `new` ("...pos_embedding" leaves [rows, D]) resized to the rows of the same leaf
    in `like`: bicubic on the 2-D grid, the cls row kept (fine-tuning at another image size); audio tables
    [time, frequency, D] linearly to the other grid (clips of another length). Others unchanged."""
    like_shapes = _shapes(like)

    def resize(path, x):
        key = jax.tree_util.keystr(path)
        want = like_shapes.get(key)
        if not key.endswith("pos_embedding']") or want is None or np.shape(x) == want:
            return x
        if np.ndim(x) == 3 and len(want) == 3 and want[2] == np.shape(x)[2]:  # AudioEncoder's time x frequency grid
            return np.asarray(jax.image.resize(np.asarray(x, np.float32), want, method="linear"))
        if np.ndim(x) != 2:
            return x
        if "embeddings']" in key:  # a text position table (TextEmbeddings): a sequence, not a patch grid
            return x
        src, dst = _grid(np.shape(x)[0]), _grid(want[0])
        if src is None or dst is None or src[1] != dst[1] or want[1] != np.shape(x)[1]:
            return x  # not a square patch grid: leave it for the shape check to report
        from mmjax.models.layers import interpolate_pos_embedding  # pylint: disable=import-outside-toplevel

        table = np.asarray(x, np.float32)
        if not src[1]:  # no cls row: add a dummy one so the shared helper applies
            table = np.concatenate([np.zeros_like(table[:1]), table])
        out = np.asarray(interpolate_pos_embedding(table, (src[0],) * 2, (dst[0],) * 2))
        return out if src[1] else out[1:]

    return jax.tree_util.tree_map_with_path(resize, new)


@dataclasses.dataclass
class GraftReport:
    """What `graft` did with each parameter path ("/"-joined, relative to the target)."""

    shapes: dict[str, tuple] = dataclasses.field(default_factory=dict)  # the model's, by path
    loaded: list[str] = dataclasses.field(default_factory=list)
    new: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)  # (path, model, checkpoint)
    unused: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """"N loaded, N new, N skipped, N unused"."""
        return (f"{len(self.loaded)} loaded, {len(self.new)} new, {len(self.skipped)} skipped, "
                f"{len(self.unused)} unused")

    def table(self) -> str:
        """The summary, then one line per parameter: status, path, model shape (and the checkpoint's where they
        differ)."""
        rows = [("loaded", p, self.shapes[p], "") for p in self.loaded]
        rows += [("new", p, self.shapes[p], "") for p in self.new]
        rows += [("skipped", p, m, f"checkpoint {c}") for p, m, c in self.skipped]
        rows += [("unused", p, "", "") for p in self.unused]
        width = max([len(r[1]) for r in rows] + [4])
        lines = [f"  {status:<8} {path:<{width}} {str(shape or ''):<18} {note}".rstrip()
                 for status, path, shape, note in rows]
        return self.summary() + "\n" + "\n".join(lines)

    def problems(self) -> list[str]:
        """Everything that is not "loaded", one entry each (what strict refuses)."""
        return ([f"{p} is new" for p in self.new] + [f"{p} skipped: model {m}, checkpoint {c}"
                                                      for p, m, c in self.skipped]
                + [f"{p} unused" for p in self.unused])


def flatten(tree: Any) -> dict[str, Any]:
    """{"a/b/c": leaf} of a nested dict."""
    return {path_str(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def graft(params: Any, pretrained: Any, source: str = "", target: str = "",
          strict: bool = False) -> tuple[Any, GraftReport]:
    """params with every leaf of the subtree at `target` that `pretrained`'s subtree at `source` holds at the same
    path with the same shape replaced by it (Encoder layers first put in the model's layout, stacked or unrolled:
    `scan_params.match_layout`; patch-position tables resized, see `resize_position_tables`); returns (params,
    report). `strict`: anything but "loaded" is a ValueError listing it."""
    old = _subtree(params, target, "target")
    new = scan_params.match_layout(_subtree(pretrained, source, "source"), old)
    new = resize_position_tables(new, old)
    old_flat, new_flat = flatten(old), flatten(new)
    report = GraftReport(shapes={p: tuple(np.shape(x)) for p, x in old_flat.items()})
    for path, leaf in old_flat.items():
        if path not in new_flat:
            report.new.append(path)
        elif np.shape(new_flat[path]) != np.shape(leaf):
            report.skipped.append((path, tuple(np.shape(leaf)), tuple(np.shape(new_flat[path]))))
        else:
            report.loaded.append(path)
    report.unused = sorted(p for p in new_flat if p not in old_flat)
    if strict and report.problems():
        raise ValueError(f"init_from.strict: {len(report.problems())} parameters are not loaded from the "
                         f"checkpoint: " + "; ".join(report.problems()[:8]))
    if not report.loaded:
        raise ValueError(f"init_from: no parameter of the model (at target {target!r}) is in the checkpoint (at "
                         f"source {source!r}); the model has {sorted(old)[:6]}, the checkpoint "
                         f"{sorted(_subtree(pretrained, source, 'source'))[:6]}")
    loaded = set(report.loaded)
    # The model's dtypes win (e.g. a float16 checkpoint into float32 params); new leaves stay as they are.
    fitted = jax.tree_util.tree_map_with_path(
        lambda path, a: np.asarray(new_flat[p], dtype=a.dtype) if (p := path_str(path)) in loaded else a, old)
    keys = [k for k in target.split("/") if k]

    def replace(tree: Mapping, i: int) -> Any:
        if i == len(keys):
            return fitted
        return {**tree, keys[i]: replace(tree[keys[i]], i + 1)}

    return replace(params, 0), report
