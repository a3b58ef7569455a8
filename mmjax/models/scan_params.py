"""The two parameter layouts of a `layers.Encoder`, and conversion between them.

    unrolled (Encoder(scan=False)):  encoder/layer_0/..., ..., encoder/layer_{n-1}/...   (one subtree per layer)
    stacked  (Encoder(scan=True)):   encoder/layers/...   (the same subtree, every leaf with a leading [n] axis)

Checkpoints (Hugging Face conversion rules, saved runs) are written and read in either layout: weights are turned
into the model's layout where they enter it (`mmjax.convert.hf.load(..., scan_layers=True)`, init_from's
`pretrained.graft`, which calls `match_layout` against the model's own params) and unstacked where they leave it
(`mmjax.convert.hf.params_to_hf`). Leaves are plain arrays (numpy or jax; unbox LogicallyPartitioned trees first).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

STACKED = "layers"  # the nn.scan submodule of a scanned Encoder (layers.Encoder)
ENCODER_NAMES = ("encoder",)  # what layers.tower_encoder names its Encoder: the stacks scan_layers applies to
_LAYER = re.compile(r"layer_(\d+)")


def _layer_count(node: Any) -> int:
    """n if `node` is a dict whose keys are exactly layer_0 .. layer_{n-1} (n >= 1), else 0."""
    if not isinstance(node, Mapping) or not node:
        return 0
    ids = set()
    for key in node:
        m = _LAYER.fullmatch(str(key))
        if m is None:
            return 0
        ids.add(int(m.group(1)))
    return len(ids) if ids == set(range(len(ids))) else 0


def _stack(layer_trees: Sequence[Any], where: str) -> Any:
    """Leaves of identically structured layer subtrees stacked on a new leading axis (numpy stays numpy)."""
    structures = {jax.tree_util.tree_structure(t) for t in layer_trees}
    if len(structures) != 1:
        raise ValueError(f"cannot stack the layers of {where or 'the root'}: their parameters differ in structure")

    def stack(*xs: Any) -> Any:
        if all(isinstance(x, np.ndarray) for x in xs):
            return np.stack(xs)
        return jnp.stack([jnp.asarray(x) for x in xs])

    return jax.tree.map(stack, *layer_trees)


def _unstack(stacked: Any, where: str) -> dict[str, Any]:
    """{layer_i: the i-th slice of every leaf} of a stacked subtree."""
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree.leaves(stacked)}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"cannot unstack {where}/{STACKED}: its leaves' leading axes differ ({sorted(sizes)})")
    (n,) = sizes
    return {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def stack_layers(params: Any, encoder_names: Sequence[str] = ENCODER_NAMES) -> Any:
    """params with every unrolled Encoder subtree (a dict under a key in `encoder_names` whose keys are exactly
    layer_0 .. layer_{n-1}) replaced by {"layers": its layers stacked}; everything else unchanged."""

    def walk(node: Any, path: str) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {}
        for key, child in node.items():
            sub = _join(path, key)
            if key in encoder_names and _layer_count(child):
                n = _layer_count(child)
                out[key] = {STACKED: _stack([child[f"layer_{i}"] for i in range(n)], sub)}
            else:
                out[key] = walk(child, sub)
        return out

    return walk(params, "")


def unstack_layers(params: Any) -> Any:
    """params with every stacked Encoder subtree ({"layers": leaves with a leading [n] axis}) replaced by
    layer_0 .. layer_{n-1}; the inverse of `stack_layers`. A tree without "layers" comes back unchanged."""

    def walk(node: Any, path: str) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {}
        for key, child in node.items():
            if key == STACKED and isinstance(child, Mapping):
                out.update(_unstack(child, path))
            else:
                out[key] = walk(child, _join(path, key))
        return out

    return walk(params, "")


def is_stacked(params: Any) -> bool:
    """Whether any Encoder subtree of `params` is in the stacked layout."""
    if not isinstance(params, Mapping):
        return False
    return any((key == STACKED and isinstance(child, Mapping)) or is_stacked(child) for key, child in params.items())


def match_layout(params: Any, like: Any) -> Any:
    """params with each Encoder subtree put in the layout of the same subtree of `like` (e.g. a model's abstract
    params): stacked where `like` has "layers" and params layer_0 .., unrolled in the opposite case. Only keys
    are compared (leaves of `like` may be anything); subtrees `like` lacks are left as they are."""

    def walk(node: Any, ref: Any, path: str) -> Any:
        if not isinstance(node, Mapping) or not isinstance(ref, Mapping):
            return node
        n = _layer_count(node)
        if STACKED in ref and STACKED not in node and n:
            rest = {k: v for k, v in node.items() if not _LAYER.fullmatch(str(k))}
            node = {**rest, STACKED: _stack([node[f"layer_{i}"] for i in range(n)], path)}
        elif STACKED in node and STACKED not in ref and any(_LAYER.fullmatch(str(k)) for k in ref):
            node = {**{k: v for k, v in node.items() if k != STACKED}, **_unstack(node[STACKED], path)}
        return {key: walk(child, ref.get(key), _join(path, key)) for key, child in node.items()}

    return walk(params, like, "")
