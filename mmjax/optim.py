"""The optimizer from config: AdamW, warmup + cosine, global-norm clipping, weight-decay mask, frozen params.

    optimizer.name           'adamw'
    optimizer.lr             peak learning rate
    optimizer.warmup_steps   linear warmup from 0
    optimizer.end_lr_factor  cosine decays to lr * end_lr_factor at the last train step
    optimizer.b1, b2, eps    Adam moments
    optimizer.weight_decay   decoupled decay, applied only where the mask says (see `decay_mask`)
    optimizer.no_decay       regex on 'a/b/c' parameter paths that never decay (in addition to every 1-D parameter)
    optimizer.grad_clip      global-norm clip (0 or None disables)
    optimizer.freeze         regex on parameter paths that are not trained (LiT-style locked tower), or None
    optimizer.layer_decay    layer-wise learning-rate decay (BEiT / ELECTRA fine-tuning), or None: a parameter of
                             layer i (`layer_<i-1>` in its path) of an encoder with L layers trains at
                             lr * layer_decay^(L + 1 - i); embeddings count as layer 0, the rest (final norms,
                             poolers, heads) as layer L + 1
    optimizer.head           regex on the paths of the task head (default: the VQA answer classifier)
    optimizer.head_lr_mult   the head's learning rate is lr * head_lr_mult (ViLT fine-tunes its VQA head at 10x)
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import ml_collections
import optax

# Embedding tables, position embeddings, cls tokens, attention-pool probes and the contrastive temperature / bias
# are not decayed (as in CLIP / big_vision); 1-D parameters (biases, norm scales) never are.
NO_DECAY_DEFAULT = r"(embedding|pos_embed|cls|probe|logit_scale|logit_bias)"


def default_optimizer_config() -> ml_collections.ConfigDict:
    """Defaults for the optimizer section of a config."""
    return ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, warmup_steps=100, end_lr_factor=0.0, b1=0.9, b2=0.98, eps=1e-6,
        weight_decay=0.1, no_decay=NO_DECAY_DEFAULT, grad_clip=1.0, freeze=ml_collections.config_dict.placeholder(str),
        layer_decay=ml_collections.config_dict.placeholder(float), head="vqa_head", head_lr_mult=1.0,
    ))


def path_str(path: tuple) -> str:
    """'a/b/c' for a jax key path (DictKey/GetAttrKey/SequenceKey entries)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def decay_mask(params: Any, no_decay: str | None = NO_DECAY_DEFAULT) -> Any:
    """True for parameters that get weight decay: kernels with >= 2 dims not matching `no_decay`."""
    pattern = re.compile(no_decay) if no_decay else None

    def decays(path, p):
        if p.ndim < 2:
            return False
        return not (pattern and pattern.search(path_str(path)))

    return jax.tree_util.tree_map_with_path(decays, params)


def frozen_labels(params: Any, freeze: str | None) -> Any:
    """'frozen' for parameters whose path matches `freeze`, else 'trained'."""
    pattern = re.compile(freeze) if freeze else None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if pattern and pattern.search(path_str(path)) else "trained", params)


_LAYER = re.compile(r"(?:^|/)layer_(\d+)(?:/|$)")
_EMBEDDINGS = re.compile(r"(embedding|patch_|/cls$|^cls$|probe|pos_embed|mask_patch)")


def lr_multipliers(params: Any, config: Any) -> Any:
    """A tree of each parameter's learning-rate multiplier (1.0 without layer decay or a head multiplier)."""
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    depth = 1 + max([int(m.group(1)) for p in paths if (m := _LAYER.search(p))] or [-1])
    decay = config.get("layer_decay")
    if decay and any(re.search(r"(?:^|/)encoder/layers(?:/|$)", p) for p in paths):
        # Stacked layers share one leaf per parameter, so one multiplier: per-layer decay cannot be expressed.
        raise ValueError("optimizer.layer_decay needs unrolled layers: set model.scan_layers=False")
    head = re.compile(config.head) if config.get("head") else None
    mult = float(config.get("head_lr_mult", 1.0))

    def multiplier(path, _):
        p = path_str(path)
        if head is not None and head.search(p) and mult != 1.0:
            return mult
        if not decay:
            return 1.0
        if (m := _LAYER.search(p)) is not None:
            layer = int(m.group(1)) + 1
        elif _EMBEDDINGS.search(p):
            layer = 0
        else:
            layer = depth + 1
        return float(decay) ** (depth + 1 - layer)

    return jax.tree_util.tree_map_with_path(multiplier, params)


def learning_rate_schedule(config: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * end_lr_factor` at `total_steps`."""
    warmup = min(int(config.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.lr * config.end_lr_factor)


def make_optimizer(config: Any, total_steps: int, params: Any) -> tuple[optax.GradientTransformation, Callable]:
    """Builds the optax transformation for `params` (a tree of arrays or shape structs) and its lr schedule."""
    if config.name != "adamw":
        raise ValueError(f"unknown optimizer {config.name!r}; known: 'adamw'")
    schedule = learning_rate_schedule(config, total_steps)
    trained = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay,
                    mask=lambda p: decay_mask(p, config.no_decay)),
    )
    multipliers = lr_multipliers(params, config)
    groups = sorted(set(jax.tree.leaves(multipliers)))
    if groups != [1.0]:
        # AdamW's update is -lr (m / (sqrt(v) + eps) + wd p): scaling it per parameter is that parameter's lr
        # scaled (its weight decay too, as layer-decay fine-tuning recipes do).
        by_path = {path_str(p): f"x{m:.6g}" for p, m in jax.tree_util.tree_leaves_with_path(multipliers)}

        def group_of(tree):  # by path, so that trees with frozen (masked) leaves get their labels too
            return jax.tree_util.tree_map_with_path(lambda path, _: by_path[path_str(path)], tree)

        trained = optax.chain(trained, optax.multi_transform(
            {f"x{m:.6g}": optax.scale(m) for m in groups}, group_of))
    if not config.get("freeze"):
        return trained, schedule
    labels = frozen_labels(params, config.freeze)
    if "frozen" not in jax.tree.leaves(labels):
        raise ValueError(f"optimizer.freeze={config.freeze!r} matches no parameter")
    # Clipping lives inside the 'trained' branch, so the clip norm ignores the frozen tower's gradients.
    tx = optax.multi_transform({"trained": trained, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule

