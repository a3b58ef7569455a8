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

from mmjax import checkpoint, models, pretrained, sharding

# Model config fields that the data decides when a config leaves them None: field -> (what, value from).
DATA_FIELDS = {
    "vocab_size": "the tokenizer's vocabulary",
    "region_feat_dim": "the regions' feature width",
    "num_region_classes": "the regions' classes",
    "image_size": "data.image_size",
    "max_len": "data.max_len",
    "sample_rate": "data.audio.sample_rate",
    "vqa_labels": "the answer vocabulary",
}


# Matching objectives -> the model field that turns on the head they train.
OBJECTIVE_HEADS = {"mlm": "mlm_head", "itm": "itm_head", "mpp": "mpp_head", "mrfr": "mrfr_head", "mrc": "mrc_head"}


def resolve_model_config(config: ml_collections.ConfigDict, meta: Any) -> list[str]:
    """Fills the model config's data-given fields (vocab_size, region_feat_dim, num_region_classes, image_size,
    max_len, sample_rate, vqa_labels) wherever they are None, in the model section and its tower dicts, and turns on the
    heads of the matching objectives that have weight (OBJECTIVE_HEADS); returns one line per field set.

    This is the one place where the data sizes the model. A vocab_size set in the config must hold the tokenizer's
    vocabulary; a region width, class count or answer count set in the config must equal the data's.
    """
    values = {"vocab_size": meta.vocab_size, "region_feat_dim": meta.region_feature_dim,
              "num_region_classes": meta.region_classes, "image_size": config.data.image_size,
              "max_len": config.data.max_len,
              "sample_rate": (config.data.get("audio") or {}).get("sample_rate"),
              "vqa_labels": len(meta.answer_vocab) if meta.answer_vocab else None}
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
            elif key in ("region_feat_dim", "num_region_classes", "vqa_labels", "sample_rate") \
                    and value != values[key]:
                raise ValueError(f"{path}.{key}={value} but the data gives {values[key]} ({DATA_FIELDS[key]})")

    visit(config.model, "model")
    # A matching objective switched on from the command line (--config.task.objectives.mpp=1) brings its head.
    weights = config.get("task", {}).get("objectives") or {}
    fields = getattr(models.MODELS.get(config.model.get("name")), "__dataclass_fields__", {})
    for objective, head in OBJECTIVE_HEADS.items():
        if float(weights.get(objective) or 0) > 0 and head in fields and not config.model.get(
                head, fields[head].default):
            config.model[head] = True  # also where the config left the field at the Module's default
            done.append(f"model.{head} = True (task.objectives.{objective})")
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


def train_state_shardings(boxed_params: Any, tx: optax.GradientTransformation, mesh, rules) -> dict:
    """The shardings of {step, params, opt_state}: parameters by their logical axes and the rules, optimizer
    moments as their parameters, counters replicated."""
    param_shardings = sharding.logical_shardings(boxed_params, mesh, rules)
    params_shape = nn.meta.unbox(boxed_params)
    opt_shape = jax.eval_shape(tx.init, params_shape)
    opt_shardings = sharding.optimizer_shardings(opt_shape, params_shape, param_shardings, mesh)
    return {"step": sharding.replicated(mesh), "params": param_shardings, "opt_state": opt_shardings}


def create_train_state(model: nn.Module, batch_shapes: dict, tx: optax.GradientTransformation, mesh, rules,
                       seed: int, boxed_params: Any) -> tuple[dict, dict]:
    """Initialises {step, params, opt_state} directly into its shardings; returns (state, shardings)."""
    shardings = train_state_shardings(boxed_params, tx, mesh, rules)

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
                    init_from: ml_collections.ConfigDict | None, answer_vocab: tuple[str, ...] | None = None,
                    tokenizer: Any = None) -> tuple[dict, str]:
    """The run's latest checkpoint if there is one, else `state` with init_from's weights loaded where path and shape
    match (a fresh start from pretrained weights; a table of what was loaded is logged), else `state` as
    initialised; returns (state, what was done in words). `answer_vocab` and `tokenizer` are the data's: a
    checkpoint whose VQA head answered other answers, or whose word embeddings belong to another tokenizer, is
    refused."""
    if ckpt is not None and ckpt.latest_step() is not None:
        state, problems = ckpt.restore_intact(checkpoint.abstract_with_shardings(state, shardings),
                                              fallback=bool(getattr(ckpt, "fallback", True)))
        skipped = f" (newer steps that did not restore: {'; '.join(problems)})" if problems else ""
        return state, f"restored step {int(state['step'])} from {ckpt.directory}{skipped}"
    if init_from is None or not init_from.get("path"):
        return state, "initialised from scratch"
    source = pretrained.load_checkpoint(init_from.path, init_from.get("step"))
    check_answer_vocab(source, answer_vocab, state["params"])
    check_tokenizer(source, tokenizer)
    # Loaded leaves become numpy arrays; new ones stay the (sharded) fresh arrays: device_put moves only the former.
    params, report = pretrained.graft(state["params"], source.params, init_from.source, init_from.target,
                                      strict=bool(init_from.get("strict")))
    what = f"{source.kind}" + (f" step {source.step}" if source.step is not None else "")
    logging.info("init_from %s (%s): %s", init_from.path, what, report.table())
    state = dict(state, params=jax.device_put(params, shardings["params"]))
    return state, f"initialised {init_from.target or 'the model'} from {init_from.path} ({what}): {report.summary()}"


def check_answer_vocab(source: pretrained.Checkpoint, answer_vocab: tuple[str, ...] | None, params: Any) -> None:
    """A VQA head may only be loaded for the answers it was trained on: a checkpoint whose head answered another
    vocabulary than the data's is an error naming the first difference."""
    if source.answer_vocab is None or answer_vocab is None or "vqa_head" not in params:
        return
    if not any("vqa_head" in path for path in pretrained.flatten(source.params)):
        return
    theirs, ours = list(source.answer_vocab), list(answer_vocab)
    if theirs == ours:
        return
    first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    raise ValueError(f"init_from: the checkpoint's VQA head answers {len(theirs)} answers, the data's vocabulary "
                     f"has {len(ours)}; they differ first at index {first} "
                     f"({theirs[first] if first < len(theirs) else '-'!r} vs "
                     f"{ours[first] if first < len(ours) else '-'!r}). Fine-tune from the pretraining run, or use "
                     f"the same answer vocabulary")


def check_tokenizer(source: pretrained.Checkpoint, tokenizer: Any) -> None:
    """Token ids mean the same in the checkpoint and the data: a run trained with another vocabulary is an error
    (its word embeddings would be read for the wrong words)."""
    if source.tokenizer_path is None or tokenizer is None:
        return
    differ = tokenizer_difference(source.tokenizer_path, tokenizer)
    if differ:
        theirs, ours, examples = differ
        raise ValueError(f"init_from: the checkpoint's tokenizer ({source.tokenizer_path}, {theirs} tokens) is "
                         f"not the data's ({ours} tokens; e.g. {examples}): set data.tokenizer to the "
                         f"checkpoint's tokenizer.json")


def tokenizer_difference(path: str, tokenizer: Any) -> tuple[int, int, list] | None:
    """None when the tokenizer saved at `path` maps the same tokens to the same ids as `tokenizer`, else (its
    size, `tokenizer`'s size, up to three (token, id) pairs that differ)."""
    from mmjax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel

    theirs, ours = Tokenizer.from_path(path).vocab(), tokenizer.vocab()
    if theirs == ours:
        return None
    return len(theirs), len(ours), sorted(set(theirs.items()) ^ set(ours.items()))[:3]
