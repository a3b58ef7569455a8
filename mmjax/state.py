"""The train state, shared by train.py and evaluate.py: the model config resolved from the data, abstract
parameters, sharded initialisation, and restore-or-init (a run's checkpoint, else `config.init_from`).

The state is a plain dict {step, params, opt_state}, created already sharded on the mesh:
eval_shape -> logical shardings -> jax.jit(init, out_shardings=...).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from mmjax import checkpoint, pretrained, sharding

# Model config fields that the data decides when a config leaves them None: field -> (what, value from).
DATA_FIELDS = {
    "vocab_size": "the tokenizer's vocabulary",
    "region_feat_dim": "the regions' feature width",
    "num_region_classes": "the regions' classes",
    "image_size": "data.image_size",
    "max_len": "data.max_len",
}


def resolve_model_config(config: ml_collections.ConfigDict, meta: Any) -> list[str]:
    """Fills the model config's data-given fields (vocab_size, region_feat_dim, num_region_classes, image_size,
    max_len) wherever they are None, in the model section and its tower dicts; returns one line per field set.

    This is the one place where the data sizes the model. A vocab_size set in the config must hold the tokenizer's
    vocabulary; a region width or class count set in the config must equal the data's.
    """
    values = {"vocab_size": meta.vocab_size, "region_feat_dim": meta.region_feature_dim,
              "num_region_classes": meta.region_classes, "image_size": config.data.image_size,
              "max_len": config.data.max_len}
    done = []

    def visit(section: ml_collections.ConfigDict, path: str) -> None:
        for key in list(section.keys()):
            value = section[key]
            if isinstance(value, ml_collections.ConfigDict):
                visit(value, f"{path}.{key}")
                continue
            if key not in DATA_FIELDS or values[key] is None:
                continue
            if value is None:
                section[key] = values[key]
                done.append(f"{path}.{key} = {values[key]} ({DATA_FIELDS[key]})")
            elif key == "vocab_size" and value < values[key]:
                raise ValueError(f"{path}.vocab_size={value} is smaller than the tokenizer's {values[key]} tokens")
            elif key in ("region_feat_dim", "num_region_classes") and value != values[key]:
                raise ValueError(f"{path}.{key}={value} but the data gives {values[key]} ({DATA_FIELDS[key]})")

    visit(config.model, "model")
    if config.model.get("lock_text") and not config.optimizer.get("freeze"):
        # A locked tower gets no gradient; frozen, weight decay leaves it bit-identical to its checkpoint too.
        config.optimizer.freeze = "^text_encoder/"
        done.append("optimizer.freeze = '^text_encoder/' (model.lock_text)")
    for line in done:
        logging.info("resolved %s", line)
    return done


def init_params(model: nn.Module, batch_shapes: dict, rng: jax.Array) -> Any:
    """Initial parameters (boxed with their logical axis names) from a dummy batch of the given shapes."""
    batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch_shapes)
    return model.init({"params": rng, "dropout": rng}, batch, train=False)["params"]


def abstract_params(model: nn.Module, batch_shapes: dict, seed: int) -> Any:
    """Parameter shapes with their logical axis metadata, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, model, batch_shapes), jax.random.key(seed))


def count_params(tree: Any) -> int:
    """Total number of parameter elements in a (possibly abstract, possibly boxed) tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree)))


def create_train_state(model: nn.Module, batch_shapes: dict, tx: optax.GradientTransformation, mesh, rules,
                       seed: int, boxed_params: Any) -> tuple[dict, dict]:
    """Initialises {step, params, opt_state} directly into its shardings; returns (state, shardings)."""
    param_shardings = sharding.logical_shardings(boxed_params, mesh, rules)
    params_shape = nn.meta.unbox(boxed_params)
    opt_shape = jax.eval_shape(tx.init, params_shape)
    # Optimizer moments mirror the parameters and take their shardings; counters are replicated.
    opt_shardings = sharding.optimizer_shardings(opt_shape, params_shape, param_shardings, mesh)
    shardings = {"step": sharding.replicated(mesh), "params": param_shardings, "opt_state": opt_shardings}

    def init(rng):
        params = nn.meta.unbox(init_params(model, batch_shapes, rng))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return state, shardings


def abstract_train_state(params_shape: Any, tx: optax.GradientTransformation) -> dict:
    """ShapeDtypeStructs of the train state (for a dry run of the step)."""
    return {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shape,
            "opt_state": jax.eval_shape(tx.init, params_shape)}


def restore_or_init(state: dict, shardings: dict, ckpt: checkpoint.Checkpointer | None,
                    init_from: ml_collections.ConfigDict | None) -> tuple[dict, str]:
    """The run's latest checkpoint if there is one, else `state` with init_from's weights grafted in (a fresh start
    from pretrained weights), else `state` as initialised; returns (state, what was done in words)."""
    if ckpt is not None and ckpt.latest_step() is not None:
        state = ckpt.restore(checkpoint.abstract_with_shardings(state, shardings))
        return state, f"restored step {int(state['step'])} from {ckpt.directory}"
    if init_from is not None and init_from.get("path"):
        weights, _ = pretrained.load_params(init_from.path)
        params = pretrained.graft(state["params"], weights, init_from.source, init_from.target)
        state = dict(state, params=jax.device_put(params, shardings["params"]))
        return state, (f"initialised {init_from.target or 'the model'} from {init_from.path} "
                       f"({init_from.source or 'all of it'})")
    return state, "initialised from scratch"
