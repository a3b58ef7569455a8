"""Hugging Face ViLT <-> mmjax.models.vilt.ViLT: configs and weights, for ViltModel and three of its heads.

    ViltModel                     -> ViLT(mlm_head=False, itm_head=False)   names without a prefix
    ViltForMaskedLM               -> ViLT(mlm_head=True)                    "vilt." + mlm_score.*
    ViltForQuestionAnswering      -> ViLT(vqa_labels=num_labels)            "vilt." + classifier.{0,1,3}.*
    ViltForImageAndTextRetrieval  -> ViLT(rank_head=True)                   "vilt." + rank_output.*

Outputs: our ViLT returns HF's `last_hidden_state` and `pooler_output` under those names, and each head's HF
`logits` as `mlm_logits` / `vqa_logits` / `rank_logits` (`LOGITS_KEY[architecture]`), and also as `logits` since a
converted model has that one head only. The module is our plain ViLT rather than a wrapper: `model_config` then rebuilds it with `build_model`, its variables
are the ones training and `export` use, and a model with several heads keeps them apart.

Where HF and we differ (parity holds at the training resolution, image_size x image_size, no pixel mask):
- Patch order: HF draws the order of the kept patches with torch.multinomial on every call (even in eval mode and
  when all are kept); ours is raster order. Attention is permutation-invariant over keys, so text tokens, the image
  [CLS], the pooler and every head's logits agree whatever HF draws; only the image-patch rows of
  `last_hidden_state` come in HF's random order.
- max_image_length: HF's -1 (keep every patch) is our max_image_len=None; a cap k > 0 keeps k patches in both, drawn
  at random by HF and (without a "patches" rng) the first valid ones in raster order by us.
- Other image sizes and padded images: converted models use pos_interpolation="hf", HF's own scheme (bilinear with
  aligned corners to each image's pixel-mask extent, zero positions on padding): outputs agree there too.
- ITM and MPP heads (ours) have no HF counterpart: `load` turns ITM off, `export` leaves both out.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf
from mmjax.models import build_model

ARCHITECTURES = ("ViltModel", "ViltForMaskedLM", "ViltForQuestionAnswering", "ViltForImageAndTextRetrieval")
# HF `logits` of each head architecture -> the key of our ViLT's output dict that holds the same array.
LOGITS_KEY: dict[str, Optional[str]] = {"ViltModel": None, "ViltForMaskedLM": "mlm_logits",
                                        "ViltForQuestionAnswering": "vqa_logits",
                                        "ViltForImageAndTextRetrieval": "rank_logits"}
BASE_PREFIX = "vilt."  # the head classes nest ViltModel under this name; ViltModel itself saves without it
DECODER_WEIGHT = "mlm_score.decoder.weight"  # tied to the word embeddings; HF saves it only when untied


def detect_architecture(hf_config: Mapping[str, Any], tensors: Mapping[str, Any]) -> tuple[str, str]:
    """(architecture, tensor-name prefix of the ViltModel part): from config "architectures", else the tensor names."""
    prefix = BASE_PREFIX if any(k.startswith(BASE_PREFIX) for k in tensors) else ""
    named = list(hf_config.get("architectures") or [])
    # Others (ViltForImagesAndTextClassification's two images, ViltForTokenClassification) raise rather than
    # converting only their ViltModel part.
    bad = [a for a in named if a not in ARCHITECTURES]
    if bad:
        raise ValueError(f"unsupported ViLT architecture {bad[0]!r}; supported: {list(ARCHITECTURES)}")
    if named:
        return named[0], prefix
    # No "architectures" (hand-written configs): a head's tensors name it.
    if "classifier.3.weight" in tensors:
        return "ViltForQuestionAnswering", prefix
    if "rank_output.weight" in tensors:
        return "ViltForImageAndTextRetrieval", prefix
    if "mlm_score.decoder.bias" in tensors:
        return "ViltForMaskedLM", prefix
    return "ViltModel", prefix


def _square(value: Any, what: str) -> int:
    """HF allows [h, w] image/patch sizes; our ViLT's position table and patches are square."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {what} {list(value)} is not supported")
        value = value[0]
    return int(value)


def model_config_from_hf(hf_config: Mapping[str, Any], architecture: str,
                         vqa_labels: Optional[int] = None) -> dict[str, Any]:
    """HF ViltConfig dict -> our model config ({"name": "vilt", ...}, for build_model) for one architecture."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported ViLT architecture {architecture!r}; supported: {list(ARCHITECTURES)}")
    g = lambda key, default=None: hf_config.get(key, default)  # noqa: E731  (ViltConfig's defaults)
    max_image_length = g("max_image_length", -1)
    config = {
        "name": "vilt",
        "vocab_size": g("vocab_size", 30522),
        "max_len": g("max_position_embeddings", 40),
        "image_size": _square(g("image_size", 384), "image_size"),
        "patch_size": _square(g("patch_size", 32), "patch_size"),
        "width": g("hidden_size", 768),
        "depth": g("num_hidden_layers", 12),
        "heads": g("num_attention_heads", 12),
        "mlp_dim": g("intermediate_size", 3072),
        "activation": hf.activation_from_hf(g("hidden_act", "gelu")),
        "ln_epsilon": g("layer_norm_eps", 1e-12),
        # Training only; HF ViLT drops out the same places as our Block (plus our MLP's hidden activations).
        "dropout_rate": g("hidden_dropout_prob", 0.0),
        "attention_dropout_rate": g("attention_probs_dropout_prob", 0.0),
        "norm": "pre",  # HF ViltLayer is pre-LN with a final LayerNorm
        "type_vocab_size": g("type_vocab_size", 2),
        "modality_type_vocab": g("modality_type_vocab_size", 2),
        # HF: a negative (or missing) max_image_length keeps every patch; k >= 0 keeps min(k, patches).
        "max_image_len": None if max_image_length is None or max_image_length < 0 else int(max_image_length),
        # Positions at other sizes as HF computes them: per image's valid patch grid, bilinear, aligned corners.
        "pos_interpolation": "hf",
        "mlm_head": architecture == "ViltForMaskedLM",
        "itm_head": False,  # HF ViLT has no ITM head
        "mpp_head": False,
        "vqa_labels": None,
        "rank_head": architecture == "ViltForImageAndTextRetrieval",
    }
    if architecture == "ViltForQuestionAnswering":
        # config.json stores the labels (id2label), not num_labels; the classifier's shape is the ground truth.
        labels = vqa_labels or g("num_labels") or len(g("id2label") or {})
        if not labels:
            raise ValueError("ViltForQuestionAnswering needs the label count (num_labels / id2label)")
        config["vqa_labels"] = int(labels)
    return config


def _rules(architecture: str, depth: int, prefix: str) -> list[hf.Rule]:
    """Our param path <-> HF tensor name for the whole model of one architecture."""
    emb = prefix + "embeddings."
    text = ("text_embeddings",)  # our layers.TextEmbeddings = HF's ViltEmbeddings.text_embeddings (BertEmbeddings)
    rules: list[hf.Rule] = [
        (text + ("word_embedding",), emb + "text_embeddings.word_embeddings.weight", "copy"),
        (text + ("pos_embedding",), emb + "text_embeddings.position_embeddings.weight", "copy"),
        (text + ("type_embedding",), emb + "text_embeddings.token_type_embeddings.weight", "copy"),
        (("patch_kernel",), emb + "patch_embeddings.projection.weight", "conv"),
        (("patch_bias",), emb + "patch_embeddings.projection.bias", "copy"),
        (("cls",), emb + "cls_token", "token"),
        (("image_pos_embedding",), emb + "position_embeddings", "batch1"),
        (("modality_embedding",), emb + "token_type_embeddings.weight", "copy"),
    ]
    rules += hf.layer_norm_rules(text + ("ln",), emb + "text_embeddings.LayerNorm")
    for i in range(depth):
        pre = f"{prefix}encoder.layer.{i}."
        rules += hf.block_rules(("encoder", f"layer_{i}"), {
            "query": pre + "attention.attention.query", "key": pre + "attention.attention.key",
            "value": pre + "attention.attention.value", "out": pre + "attention.output.dense",
            "ln_1": pre + "layernorm_before", "ln_2": pre + "layernorm_after",  # pre-LN: x + attn(LN(x))
            "fc1": pre + "intermediate.dense", "fc2": pre + "output.dense",
        })
    rules += hf.layer_norm_rules(("ln_final",), prefix + "layernorm")
    rules += hf.dense_rules(("pooler",), prefix + "pooler.dense")
    if architecture == "ViltForMaskedLM":
        # The decoder weight is the word table (tied), so only the transform and the decoder bias are mapped.
        rules += hf.dense_rules(("mlm_transform", "dense"), "mlm_score.transform.dense")
        rules += hf.layer_norm_rules(("mlm_transform", "ln"), "mlm_score.transform.LayerNorm")
        rules.append((("mlm_bias",), "mlm_score.decoder.bias", "copy"))
    elif architecture == "ViltForQuestionAnswering":
        # nn.Sequential(Linear, LayerNorm, GELU, Linear): indices 0, 1, 3.
        rules += hf.dense_rules(("vqa_head", "dense"), "classifier.0")
        rules += hf.layer_norm_rules(("vqa_head", "ln"), "classifier.1")
        rules += hf.dense_rules(("vqa_head", "out"), "classifier.3")
    elif architecture == "ViltForImageAndTextRetrieval":
        rules += hf.dense_rules(("rank_head",), "rank_output")
    return rules


def _with_zero_qkv_bias(tensors: Mapping[str, np.ndarray], depth: int, prefix: str) -> dict[str, np.ndarray]:
    """qkv_bias=False checkpoints lack the q/k/v biases; our attention always has them, so they become zeros."""
    tensors = dict(tensors)
    for i in range(depth):
        for n in ("query", "key", "value"):
            name = f"{prefix}encoder.layer.{i}.attention.attention.{n}"
            tensors.setdefault(name + ".bias", np.zeros(tensors[name + ".weight"].shape[0], np.float32))
    return tensors


def hf_vilt_params(state: Mapping[str, np.ndarray], depth: int, heads: int,
                   architecture: Optional[str] = None) -> dict[str, Any]:
    """HF ViLT state dict / safetensors tensors (numpy) -> our ViLT param tree (float32 numpy; layouts map 1:1)."""
    if architecture is None:
        architecture, prefix = detect_architecture({}, state)
    else:
        prefix = BASE_PREFIX if any(k.startswith(BASE_PREFIX) for k in state) else ""
    if DECODER_WEIGHT in state:
        # state_dict() repeats the tied table; an untied decoder (not expressible by our tied MLM head) raises.
        word = state[prefix + "embeddings.text_embeddings.word_embeddings.weight"]
        if not np.array_equal(np.asarray(state[DECODER_WEIGHT]), np.asarray(word)):
            raise ValueError(f"{DECODER_WEIGHT} differs from the word embeddings: our MLM decoder is tied to them")
    ignore = (DECODER_WEIGHT, prefix + "embeddings.text_embeddings.position_ids",  # buffers in old checkpoints
              prefix + "embeddings.text_embeddings.token_type_ids")
    return hf.params_from_hf(state, _rules(architecture, depth, prefix), heads, ignore=ignore)


def load(hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
         ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """HF ViLT config.json dict + tensors -> (our ViLT, variables {"params": ...}, model config for build_model).

    The module's output dict holds HF's `last_hidden_state` / `pooler_output`, and the head's `logits` under
    `LOGITS_KEY[architecture]` (mlm_logits / vqa_logits / rank_logits).
    """
    architecture, prefix = detect_architecture(hf_config, tensors)
    depth = hf_config.get("num_hidden_layers", 12)
    if not hf_config.get("qkv_bias", True):
        tensors = _with_zero_qkv_bias(tensors, depth, prefix)
    vqa_labels = None
    if architecture == "ViltForQuestionAnswering" and "classifier.3.weight" in tensors:
        vqa_labels = tensors["classifier.3.weight"].shape[0]
    config = model_config_from_hf(hf_config, architecture, vqa_labels)
    model = build_model(config)
    params = hf_vilt_params(tensors, config["depth"], config["heads"], architecture)
    channels = params["patch_kernel"].shape[2]
    size = config["image_size"]
    example = {"image": jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32),
               "text_ids": jax.ShapeDtypeStruct((1, 1), jnp.int32),
               "text_mask": jax.ShapeDtypeStruct((1, 1), jnp.int32)}
    hf.check_params(model, example, params)
    return model, hf.to_variables(params), config


def infer_architecture(model_config: Mapping[str, Any]) -> str:
    """The HF architecture a model config exports to: its one HF head (VQA, retrieval or MLM), else ViltModel."""
    model = build_model(model_config)
    heads = [a for a, on in (("ViltForQuestionAnswering", model.vqa_labels is not None),
                             ("ViltForImageAndTextRetrieval", model.rank_head),
                             ("ViltForMaskedLM", model.mlm_head)) if on]
    if len(heads) > 1:
        raise ValueError(f"the model has several HF heads ({heads}); pass `architecture` to pick the one to export")
    return heads[0] if heads else "ViltModel"


def export(model_config: Mapping[str, Any], variables: Mapping[str, Any],
           architecture: Optional[str] = "ViltForMaskedLM") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our ViLT config + variables -> (HF config.json dict, float32 tensors by HF name) for `architecture`.

    architecture=None picks the model's one HF head (see `infer_architecture`); `mmjax.convert.hf.save` calls
    export(config, variables), i.e. ViltForMaskedLM unless the model lacks the MLM head, in which case it infers.
    Heads other than the architecture's (ITM, MPP, ...) are left out.
    """
    model = build_model(model_config)
    if architecture is None or (architecture == "ViltForMaskedLM" and not model.mlm_head):
        architecture = infer_architecture(model_config)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported ViLT architecture {architecture!r}; supported: {list(ARCHITECTURES)}")
    needs = {"ViltForMaskedLM": model.mlm_head, "ViltForQuestionAnswering": model.vqa_labels is not None,
             "ViltForImageAndTextRetrieval": model.rank_head}.get(architecture, True)
    if not needs:
        raise ValueError(f"{architecture} needs the model's {LOGITS_KEY[architecture]} head, which is off")
    if model.norm != "pre":
        raise ValueError("HF ViLT is pre-LN with a final LayerNorm; a norm='post' ViLT has no HF equivalent")
    # HF's name ours: head classes nest the base model under "vilt."; ViltModel itself has no prefix.
    prefix = "" if architecture == "ViltModel" else BASE_PREFIX
    tensors = hf.params_to_hf(variables, _rules(architecture, model.depth, prefix))
    channels = tensors[prefix + "embeddings.patch_embeddings.projection.weight"].shape[1]
    hf_config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": "vilt",
        "vocab_size": model.vocab_size,
        "type_vocab_size": model.type_vocab_size,
        "modality_type_vocab_size": model.modality_type_vocab,
        "max_position_embeddings": model.max_len,
        "hidden_size": model.width,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.heads,
        "intermediate_size": model.mlp_dim or 4 * model.width,
        "hidden_act": hf.activation_to_hf(model.activation),
        "hidden_dropout_prob": model.dropout_rate,
        "attention_probs_dropout_prob": model.attention_dropout_rate,
        "layer_norm_eps": model.ln_epsilon,
        "image_size": model.image_size,
        "patch_size": model.patch_size,
        "num_channels": int(channels),
        "qkv_bias": True,
        "max_image_length": -1 if model.max_image_len is None else model.max_image_len,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "dtype": "float32",
    }
    if architecture == "ViltForQuestionAnswering":
        # transformers derives num_labels from id2label; the answer strings are not part of our config.
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.vqa_labels)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(model.vqa_labels)}
    return hf_config, tensors


def save_hf(model_config: Mapping[str, Any], variables: Mapping[str, Any], out_dir: str | os.PathLike,
            architecture: Optional[str] = "ViltForMaskedLM") -> dict[str, Any]:
    """Writes out_dir/config.json + model.safetensors for `from_pretrained`; returns the HF config written."""
    hf_config, tensors = export(model_config, variables, architecture)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, hf.CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    hf.write_safetensors(tensors, os.path.join(out_dir, hf.WEIGHTS_FILE))
    return hf_config
