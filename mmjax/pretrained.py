"""Start a model (or one of its towers) from pretrained weights: `config.init_from`.

    init_from.path    a Hugging Face model directory (config.json + model.safetensors, converted on the fly by
                      `mmjax.convert.hf.load`) or a directory written by `python -m mmjax.convert --out=DIR`
    init_from.source  "/"-separated path of the subtree to take from those params ("" = all of them)
    init_from.target  "/"-separated path where it goes in the model's params ("" = the whole model)

e.g. LiT's locked text tower (configs/lit.py): path = the MiniLM directory, source = "text_encoder",
target = "text_encoder" (and `model.lock_text`, which freezes it). Tree structure and every shape must agree; a
mismatch names the first paths that differ, except patch-position tables, which are resized bicubically on their
2-D grid (cls row kept) when the model's image size differs from the checkpoint's. Weights are applied only when a
run starts fresh: a resumed run restores its own checkpoint instead.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import config_dict

PARAMS_DIR = "params"  # orbax params of a converted model inside an `mmjax.convert --out` directory
CONFIG_FILE = "config.json"


def default_init_config() -> ml_collections.ConfigDict:
    """`init_from` section: nothing loaded unless `path` is set."""
    return ml_collections.ConfigDict(dict(path=config_dict.placeholder(str), source="", target=""))


def save_converted(out_dir: str, model_config: Mapping[str, Any], params: Any) -> None:
    """Writes `model_config` (config.json) and `params` (orbax, numpy on restore) into out_dir."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(dict(model_config), f, indent=2, sort_keys=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out_dir, PARAMS_DIR), jax.tree.map(np.asarray, params), force=True)
    checkpointer.wait_until_finished()


def load_params(path: str) -> tuple[Any, dict[str, Any]]:
    """(params as numpy arrays, model config dict) from an HF directory or an `mmjax.convert --out` directory."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"init_from.path {path!r} is not a directory")
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
        with open(os.path.join(path, CONFIG_FILE)) as f:
            model_config = json.load(f)
        params = ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR))
        return jax.tree.map(np.asarray, params), model_config
    from mmjax.convert import hf  # pylint: disable=import-outside-toplevel  (pulls in every converter)

    _, variables, model_config = hf.load(path)
    return jax.tree.map(np.asarray, variables["params"]), model_config


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
    in `like`: bicubic on the 2-D grid, the cls row kept (fine-tuning at another image size). Others unchanged."""
    like_shapes = _shapes(like)

    def resize(path, x):
        key = jax.tree_util.keystr(path)
        want = like_shapes.get(key)
        if not key.endswith("pos_embedding']") or want is None or np.shape(x) == want or np.ndim(x) != 2:
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


def graft(params: Any, pretrained: Any, source: str = "", target: str = "") -> Any:
    """params with the subtree at `target` replaced by `pretrained`'s subtree at `source` (same tree and shapes;
    patch-position tables are resized to the model's grid, see `resize_position_tables`)."""
    old = _subtree(params, target, "target")
    new = resize_position_tables(_subtree(pretrained, source, "source"), old)
    got, want = _shapes(new), _shapes(old)
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise ValueError("init_from: pretrained weights do not fit the model at target "
                         f"{target!r}: " + "; ".join(f"{k}: model {want.get(k)}, pretrained {got.get(k)}"
                                                    for k in diff[:5]))
    # The model's dtypes win (e.g. a float16 checkpoint into float32 params).
    fitted = jax.tree.map(lambda a, b: np.asarray(b, dtype=a.dtype), old, new)
    keys = [k for k in target.split("/") if k]

    def replace(tree: Mapping, i: int) -> Any:
        if i == len(keys):
            return fitted
        return {**tree, keys[i]: replace(tree[keys[i]], i + 1)}

    return replace(params, 0)
