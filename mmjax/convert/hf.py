"""Hugging Face model directories (config.json + model.safetensors) <-> mmjax linen models.

    model, variables, config = mmjax.convert.hf.load("path/to/hf_model_dir")
    out = model.apply(variables, batch)          # dict with HF's output names (last_hidden_state, ...)
    model, variables, config = mmjax.convert.hf.load("path/to/hf_model_dir", scan_layers=True)   # nn.scan layout
    mmjax.convert.hf.save("out_dir", config, variables)   # back to a directory transformers can load
    mmjax.convert.hf.save("out_dir", config, variables, tokenizer=tok, max_len=24)   # + tokenizer.json etc.

Weights are read with `safetensors.numpy`: no torch at run time. `load` dispatches on config.json's `model_type`
to one converter module per family (`hf_bert`, `hf_vit`, `hf_clip`, `hf_vilt`, `hf_visual_bert`, `hf_lxmert`); each
exposes `load(hf_config, tensors) -> (module, variables, model_config)` and `export(model_config, variables) ->
(hf_config, tensors)`; an `export` that takes `eos_token_id` gets the tokenizer's sep_id from `save` (`export_kwargs`).

This module also holds the pieces the converters share: a weight mapping is a list of `Rule`s (our param path,
HF tensor name, layout), applied in one direction by `params_from_hf` and in the other by `params_to_hf`, so load
and export cannot drift apart. The rules name the unrolled Encoder layout (encoder/layer_{i}); `load(...,
scan_layers=True)` stacks the converted params for an nn.scan model and `params_to_hf` unstacks a scanned model's
(mmjax.models.scan_params), so both layouts convert.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
from types import ModuleType
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors.numpy import load_file, save_file

from mmjax.models import build_model, scan_params

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded checkpoints: weight name -> shard file

# HF model_type (== our config "name") -> converter module, imported on first use (each pulls in only its family).
CONVERTERS: dict[str, str] = {
    "bert": "mmjax.convert.hf_bert",
    "vit": "mmjax.convert.hf_vit",
    "clip": "mmjax.convert.hf_clip",
    "vilt": "mmjax.convert.hf_vilt",
    "visual_bert": "mmjax.convert.hf_visual_bert",
    "visualbert": "mmjax.convert.hf_visual_bert",  # our config name (HF's model_type has the underscore)
    "lxmert": "mmjax.convert.hf_lxmert",
}
# Task-head classes (BertForMaskedLM, ViTForImageClassification, ...) save the base model under this prefix;
# the base classes (BertModel, sentence-transformers checkpoints) save it without one. CLIP / ViLT converters get
# the names unchanged: their heads live outside the prefix and they map them themselves.
BASE_PREFIX: dict[str, str] = {"bert": "bert.", "vit": "vit."}

# HF hidden_act -> our layers.ACTIVATIONS name. HF "gelu" is exact (erf) GELU; "gelu_new", "gelu_pytorch_tanh" and
# "gelu_fast" are the same tanh approximation written three ways.
ACTIVATIONS_FROM_HF: dict[str, str] = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                                       "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
ACTIVATIONS_TO_HF: dict[str, str] = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu",
                                     "relu": "relu"}

# (our param path, HF tensor name, layout name in LAYOUTS)
Rule = tuple[tuple[str, ...], str, str]

# layout -> (HF -> ours given the head count, ours -> HF). HF Linear weights are [out, in]; our kernels [in, out],
# and attention kernels are heads-major (layers.HeadsProjection [D, H, Dh], layers.HeadsOutput [H, Dh, D]).
LAYOUTS: dict[str, tuple[Callable[[np.ndarray, int], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "copy": (lambda x, h: x, lambda x: x),
    "linear": (lambda x, h: x.T, lambda x: x.T),
    "heads_in": (lambda x, h: x.T.reshape(x.shape[1], h, -1), lambda x: x.reshape(x.shape[0], -1).T),
    "heads_bias": (lambda x, h: x.reshape(h, -1), lambda x: x.reshape(-1)),
    "heads_out": (lambda x, h: x.T.reshape(h, -1, x.shape[0]), lambda x: x.reshape(-1, x.shape[-1]).T),
    "conv": (lambda x, h: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
    "token": (lambda x, h: x.reshape(-1), lambda x: x.reshape(1, 1, -1)),  # cls token [1, 1, D] <-> [D]
    "batch1": (lambda x, h: x[0], lambda x: x[None]),  # position table [1, N, D] <-> [N, D]
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as numpy arrays."""
    return load_file(os.fspath(path))


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Optional[dict[str, str]] = None) -> None:
    """Writes numpy tensors to one .safetensors file (format "pt": transformers refuses files without it)."""
    # safetensors serialises raw buffers: C order (our transposes are views); asarray keeps 0-d arrays 0-d.
    save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, os.fspath(path),
              metadata={"format": "pt"} if metadata is None else metadata)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model directory."""
    file = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{CONFIG_FILE} not found: {file}")
    with open(file) as f:
        return json.load(f)


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The directory's model.safetensors, or all shards named by model.safetensors.index.json."""
    path = os.fspath(path)
    file = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(file):
        return read_safetensors(file)
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(read_safetensors(os.path.join(path, shard)))
        return tensors
    raise ValueError(f"{WEIGHTS_FILE} not found: {file} (only safetensors checkpoints are supported; "
                     "re-save a pytorch_model.bin with save_pretrained(..., safe_serialization=True))")


def strip_prefix(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Keeps only the names under `prefix`, without it, if any name has it; otherwise returns the names as they are."""
    if not any(k.startswith(prefix) for k in tensors):
        return dict(tensors)
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def converter(model_type: Optional[str]) -> ModuleType:
    """The converter module of an HF model_type (or our config name); unknown types raise naming it."""
    if model_type not in CONVERTERS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(CONVERTERS)}")
    return importlib.import_module(CONVERTERS[model_type])


def load(path: str | os.PathLike, scan_layers: bool = False) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """HF model directory -> (linen module, variables {"params": ...}, our model config dict). scan_layers=True:
    the model runs its encoder layers under nn.scan and the params come stacked (encoder/layers)."""
    hf_config = read_config(path)
    model_type = hf_config.get("model_type")
    conv = converter(model_type)  # before reading weights: an unsupported type fails fast, naming itself
    tensors = read_weights(path)
    if model_type in BASE_PREFIX:
        tensors = strip_prefix(tensors, BASE_PREFIX[model_type])
    model, variables, model_config = conv.load(hf_config, tensors)
    if scan_layers:
        model_config = {**model_config, "scan_layers": True}
        model = build_model(model_config)  # a model without the field raises, naming it
        variables = {**variables, "params": scan_params.stack_layers(variables["params"])}
    return model, variables, model_config


def export_kwargs(export: Callable[..., Any], tokenizer: Any = None) -> dict[str, Any]:
    """What a converter's `export` accepts of the export-time facts a tokenizer gives (eos_token_id: its sep_id, the
    id that ends every text)."""
    if tokenizer is None:
        return {}
    known = {"eos_token_id": int(tokenizer.sep_id)}
    accepted = inspect.signature(export).parameters
    return {k: v for k, v in known.items() if k in accepted}


def save(path: str | os.PathLike, config: Mapping[str, Any], variables: Mapping[str, Any], *,
         tokenizer: Any = None, max_len: Optional[int] = None) -> list[str]:
    """Writes config.json + model.safetensors that transformers' from_pretrained loads (config["name"] picks);
    with our `tokenizer` (mmjax.data.tokenizer.Tokenizer) also its files (model_max_length: max_len, else the text
    position count). Returns the file names written."""
    conv = converter(config.get("name"))
    hf_config, tensors = conv.export(config, variables, **export_kwargs(conv.export, tokenizer))
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    write_safetensors(tensors, os.path.join(path, WEIGHTS_FILE))
    files = [CONFIG_FILE, WEIGHTS_FILE]
    if tokenizer is not None:
        from mmjax.convert import hf_processing  # pylint: disable=import-outside-toplevel

        # Without the run's text length, the position table's: truncation=True must never overrun it.
        positions = (hf_config.get("max_position_embeddings")
                     or (hf_config.get("text_config") or {}).get("max_position_embeddings"))
        files += hf_processing.write_tokenizer(path, tokenizer, max_len or positions)
    return files


# ----------------------------------------------------------------------------------------------------------------
# Shared mapping helpers.


def activation_from_hf(name: str) -> str:
    """Our activation name for an HF hidden_act; unsupported ones raise."""
    if name not in ACTIVATIONS_FROM_HF:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS_FROM_HF)}")
    return ACTIVATIONS_FROM_HF[name]


def activation_to_hf(name: str) -> str:
    """HF hidden_act for one of our activation names."""
    if name not in ACTIVATIONS_TO_HF:
        raise ValueError(f"activation {name!r} has no Hugging Face equivalent; exportable: {sorted(ACTIVATIONS_TO_HF)}")
    return ACTIVATIONS_TO_HF[name]


def dense_rules(ours: tuple[str, ...], hf: str) -> list[Rule]:
    """layers.Dense (kernel [in, out], bias) <-> torch Linear `hf`.weight [out, in] / .bias."""
    return [(ours + ("kernel",), hf + ".weight", "linear"), (ours + ("bias",), hf + ".bias", "copy")]


def layer_norm_rules(ours: tuple[str, ...], hf: str) -> list[Rule]:
    """nn.LayerNorm (scale, bias) <-> torch LayerNorm `hf`.weight / .bias."""
    return [(ours + ("scale",), hf + ".weight", "copy"), (ours + ("bias",), hf + ".bias", "copy")]


def block_rules(ours: tuple[str, ...], hf: Mapping[str, str]) -> list[Rule]:
    """One layers.Block; `hf` maps query/key/value/out/ln_1/ln_2/fc1/fc2 to the HF module names."""
    rules: list[Rule] = []
    for n in ("query", "key", "value"):
        rules += [(ours + ("attn", n, "kernel"), hf[n] + ".weight", "heads_in"),
                  (ours + ("attn", n, "bias"), hf[n] + ".bias", "heads_bias")]
    rules += [(ours + ("attn", "out", "kernel"), hf["out"] + ".weight", "heads_out"),
              (ours + ("attn", "out", "bias"), hf["out"] + ".bias", "copy")]
    rules += layer_norm_rules(ours + ("ln_1",), hf["ln_1"]) + layer_norm_rules(ours + ("ln_2",), hf["ln_2"])
    rules += dense_rules(ours + ("mlp", "fc1"), hf["fc1"]) + dense_rules(ours + ("mlp", "fc2"), hf["fc2"])
    return rules


def params_from_hf(tensors: Mapping[str, np.ndarray], rules: Sequence[Rule], heads: int,
                   ignore: Sequence[str] = ()) -> dict[str, Any]:
    """Nested float32 param dict from HF tensors; missing names raise, unused ones (not in `ignore`) are logged."""
    missing = [hf for _, hf, _ in rules if hf not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} expected tensors, e.g. {missing[:5]}")
    params: dict[str, Any] = {}
    for path, hf, layout in rules:
        x = np.asarray(tensors[hf])
        # Our modules default to float32 params; fp16 / bf16 checkpoints are upcast (lossless).
        x = LAYOUTS[layout][0](x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x, heads)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = x
    unused = sorted(set(tensors) - {hf for _, hf, _ in rules} - set(ignore))
    if unused:
        logging.warning("mmjax.convert.hf: %d checkpoint tensors not used, e.g. %s", len(unused), unused[:5])
    return params


def params_to_hf(variables: Mapping[str, Any], rules: Sequence[Rule]) -> dict[str, np.ndarray]:
    """HF tensors (float32 numpy) from our variables ({"params": ...} or the params; boxed or not; either Encoder
    layout: the rules name the unrolled one)."""
    params = scan_params.unstack_layers(nn.unbox(variables.get("params", variables)))
    tensors = {}
    for path, hf, layout in rules:
        node = params
        for key in path:
            node = node[key]
        # float32 out: safetensors.numpy cannot store bfloat16, and HF checkpoints default to float32.
        tensors[hf] = np.asarray(LAYOUTS[layout][1](np.asarray(node, np.float32)), order="C")
    return tensors


def check_params(model: nn.Module, example_batch: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """Raises if `params` differ from what `model.init` makes (tree or shapes): a wrong mapping fails at load."""
    expected = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), example_batch)["params"])
    flat_expected = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    flat_got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if flat_expected != flat_got:
        diff = sorted(k for k in set(flat_expected) | set(flat_got) if flat_expected.get(k) != flat_got.get(k))
        raise ValueError("converted params do not match the model: " + ", ".join(
            f"{k}: expected {flat_expected.get(k)}, got {flat_got.get(k)}" for k in diff[:5]))


def to_variables(params: Mapping[str, Any]) -> dict[str, Any]:
    """{"params": params} with jax arrays as leaves."""
    return {"params": jax.tree_util.tree_map(jnp.asarray, params)}
