"""Hugging Face LXMERT <-> mmjax.models.lxmert.LXMERT: configs and weights, for LxmertModel and its VQA head.

    LxmertModel                  -> LXMERT(no heads)                   names without a prefix
    LxmertForQuestionAnswering   -> LXMERT(vqa_labels=num_qa_labels)   "lxmert." + answer_head.logit_fc.{0,2,3}.*

Outputs: our LXMERT returns HF's `language_output`, `vision_output`, `pooled_output` and (with the answer head)
`question_answering_score` under those names, next to our own (text_tokens, image_tokens, pooled, vqa_logits).

Inputs: HF's `visual_pos` is (x1, y1, x2, y2); our `region_boxes` are (ymin, xmin, ymax, xmax) and the model swaps
them itself (mmjax.models.lxmert.to_lxmert_boxes), so `box_fc` maps unchanged and the same boxes give the same
outputs in each layout. HF's `visual_attention_mask` is our `region_mask` (ours is required; HF's None means all
regions are real).

Not converted: LxmertForPreTraining (its object/attribute/feature decoders share one transform and it has an
attribute head; ours has a transform per MRFR / MRC head and no attributes), and visual_pos_dim other than 4 (our
boxes are 4 numbers). Our MLM / ITM / MRFR / MRC heads are left out of `export` and off after `load`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf
from mmjax.models import build_model

ARCHITECTURES = ("LxmertModel", "LxmertForQuestionAnswering")
BASE_PREFIX = "lxmert."  # LxmertForQuestionAnswering nests LxmertModel under this name; LxmertModel has none
ANSWER_OUT = "answer_head.logit_fc.3.weight"  # the QA classifier's last Linear: its rows are the answers
LN_EPSILON = 1e-12  # HF LXMERT hard-codes this in every LayerNorm (the config has no layer_norm_eps)


def detect_architecture(hf_config: Mapping[str, Any], tensors: Mapping[str, Any]) -> tuple[str, str]:
    """(architecture, tensor-name prefix of the LxmertModel part): from config "architectures", else tensor names."""
    prefix = BASE_PREFIX if any(k.startswith(BASE_PREFIX) for k in tensors) else ""
    named = list(hf_config.get("architectures") or [])
    bad = [a for a in named if a not in ARCHITECTURES]
    if bad:
        raise ValueError(f"unsupported LXMERT architecture {bad[0]!r}; supported: {list(ARCHITECTURES)}")
    if named:
        return named[0], prefix
    if "cls.predictions.bias" in tensors or any(k.startswith("obj_predict_head.") for k in tensors):
        raise ValueError(f"unsupported LXMERT architecture 'LxmertForPreTraining'; supported: {list(ARCHITECTURES)}")
    return ("LxmertForQuestionAnswering" if ANSWER_OUT in tensors else "LxmertModel"), prefix


def model_config_from_hf(hf_config: Mapping[str, Any], architecture: str,
                         vqa_labels: Optional[int] = None) -> dict[str, Any]:
    """HF LxmertConfig dict -> our model config ({"name": "lxmert", ...}, for build_model) for one architecture."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported LXMERT architecture {architecture!r}; supported: {list(ARCHITECTURES)}")
    g = lambda key, default=None: hf_config.get(key, default)  # noqa: E731  (LxmertConfig's defaults)
    if g("visual_pos_dim", 4) != 4:
        raise ValueError(f"visual_pos_dim {g('visual_pos_dim')} is not supported (our region_boxes have 4 numbers)")
    config = {
        "name": "lxmert",
        "vocab_size": g("vocab_size", 30522),
        "max_len": g("max_position_embeddings", 512),
        "region_feat_dim": g("visual_feat_dim", 2048),
        "num_region_classes": g("num_object_labels", 1600),
        "width": g("hidden_size", 768),
        "l_layers": g("l_layers", 9),
        "r_layers": g("r_layers", 5),
        "x_layers": g("x_layers", 5),
        "heads": g("num_attention_heads", 12),
        "mlp_dim": g("intermediate_size", 3072),
        "activation": hf.activation_from_hf(g("hidden_act", "gelu")),
        "ln_epsilon": LN_EPSILON,
        # Training only. HF drops out the same places as our blocks (plus our MLP's hidden activations).
        "dropout_rate": g("hidden_dropout_prob", 0.1),
        "attention_dropout_rate": g("attention_probs_dropout_prob", 0.1),
        "type_vocab_size": g("type_vocab_size", 2),
        "mlm_head": False,
        "itm_head": False,
        "mrfr_head": False,
        "mrc_head": False,
        "vqa_labels": None,
    }
    if architecture == "LxmertForQuestionAnswering":
        config["vqa_labels"] = int(vqa_labels or g("num_qa_labels", 9500))
    return config


def _attention_rules(ours: tuple[str, ...], qkv: str, out: str) -> list[hf.Rule]:
    """One layers.MultiHeadAttention <-> HF LxmertAttention `qkv`.{query,key,value} + output Linear `out`."""
    rules: list[hf.Rule] = []
    for n in ("query", "key", "value"):
        rules += [(ours + (n, "kernel"), f"{qkv}.{n}.weight", "heads_in"),
                  (ours + (n, "bias"), f"{qkv}.{n}.bias", "heads_bias")]
    return rules + [(ours + ("out", "kernel"), out + ".weight", "heads_out"),
                    (ours + ("out", "bias"), out + ".bias", "copy")]


def _layer_rules(ours: tuple[str, ...], pre: str, attention: str, inter: str, output: str) -> list[hf.Rule]:
    """One post-LN layers.Block <-> an HF self-attention layer `pre + attention` and FFN `pre + inter / output`."""
    return hf.block_rules(ours, {
        "query": f"{pre}{attention}.self.query", "key": f"{pre}{attention}.self.key",
        "value": f"{pre}{attention}.self.value", "out": f"{pre}{attention}.output.dense",
        "ln_1": f"{pre}{attention}.output.LayerNorm",  # post-LN: LN(x + attn(x))
        "fc1": f"{pre}{inter}.dense", "fc2": f"{pre}{output}.dense",
        "ln_2": f"{pre}{output}.LayerNorm",  # post-LN: LN(z + mlp(z))
    })


def _rules(architecture: str, l_layers: int, r_layers: int, x_layers: int, prefix: str) -> list[hf.Rule]:
    """Our param path <-> HF tensor name for the whole model of one architecture."""
    emb, enc, text = prefix + "embeddings.", prefix + "encoder.", ("text_embeddings",)
    rules: list[hf.Rule] = [
        (text + ("word_embedding",), emb + "word_embeddings.weight", "copy"),
        (text + ("pos_embedding",), emb + "position_embeddings.weight", "copy"),
        (text + ("type_embedding",), emb + "token_type_embeddings.weight", "copy"),
    ]
    rules += hf.layer_norm_rules(text + ("ln",), emb + "LayerNorm")
    # LxmertVisualFeatureEncoder; box_fc's input rows are in HF's (x1, y1, x2, y2) order, as our model feeds it.
    rules += hf.dense_rules(("region_feat_proj",), enc + "visn_fc.visn_fc")
    rules += hf.layer_norm_rules(("ln_region_feat",), enc + "visn_fc.visn_layer_norm")
    rules += hf.dense_rules(("region_box_proj",), enc + "visn_fc.box_fc")
    rules += hf.layer_norm_rules(("ln_region_box",), enc + "visn_fc.box_layer_norm")
    for i in range(l_layers):
        rules += _layer_rules(("text_encoder", f"layer_{i}"), f"{enc}layer.{i}.", "attention", "intermediate",
                              "output")
    for i in range(r_layers):
        rules += _layer_rules(("image_encoder", f"layer_{i}"), f"{enc}r_layers.{i}.", "attention", "intermediate",
                              "output")
    for i in range(x_layers):
        ours, pre = (f"cross_{i}",), f"{enc}x_layers.{i}."
        # The one `visual_attention` HF uses for both directions = our shared cross_attn + ln_cross.
        rules += _attention_rules(ours + ("cross_attn",), pre + "visual_attention.att",
                                  pre + "visual_attention.output.dense")
        rules += hf.layer_norm_rules(ours + ("ln_cross",), pre + "visual_attention.output.LayerNorm")
        rules += _layer_rules(ours + ("text",), pre, "lang_self_att", "lang_inter", "lang_output")
        rules += _layer_rules(ours + ("image",), pre, "visn_self_att", "visn_inter", "visn_output")
    rules += hf.dense_rules(("pooler",), prefix + "pooler.dense")
    if architecture == "LxmertForQuestionAnswering":
        # nn.Sequential(Linear, GeLU, LayerNorm, Linear): indices 0, 2, 3.
        rules += hf.dense_rules(("vqa_head", "dense"), "answer_head.logit_fc.0")
        rules += hf.layer_norm_rules(("vqa_head", "ln"), "answer_head.logit_fc.2")
        rules += hf.dense_rules(("vqa_head", "out"), "answer_head.logit_fc.3")
    return rules


def load(hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
         ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """HF LXMERT config.json dict + tensors -> (our LXMERT, variables {"params": ...}, model config for build_model).

    The module's outputs hold HF's language_output / vision_output / pooled_output (and question_answering_score).
    """
    architecture, prefix = detect_architecture(hf_config, tensors)
    vqa_labels = tensors[ANSWER_OUT].shape[0] if ANSWER_OUT in tensors else None
    config = model_config_from_hf(hf_config, architecture, vqa_labels)
    model = build_model(config)
    rules = _rules(architecture, config["l_layers"], config["r_layers"], config["x_layers"], prefix)
    # A QA checkpoint loaded as LxmertModel (architectures says so) leaves its answer head out, silently.
    ignore = [prefix + "embeddings.position_ids"] + [k for k in tensors if k.startswith("answer_head.")]
    params = hf.params_from_hf(tensors, rules, config["heads"], ignore=ignore)
    example = {"text_ids": jax.ShapeDtypeStruct((1, 1), jnp.int32),
               "text_mask": jax.ShapeDtypeStruct((1, 1), jnp.int32),
               "region_feats": jax.ShapeDtypeStruct((1, 1, config["region_feat_dim"]), jnp.float32),
               "region_boxes": jax.ShapeDtypeStruct((1, 1, 4), jnp.float32),
               "region_mask": jax.ShapeDtypeStruct((1, 1), jnp.int32)}
    hf.check_params(model, example, params)
    return model, hf.to_variables(params), config


def export(model_config: Mapping[str, Any], variables: Mapping[str, Any],
           architecture: Optional[str] = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our LXMERT config + variables -> (HF config.json dict, float32 tensors by HF name) for `architecture`.

    architecture=None: LxmertForQuestionAnswering when the model has the answer head, else LxmertModel. Our other
    heads (MLM, ITM, MRFR, MRC) have no place in these classes and are left out.
    """
    model = build_model(model_config)
    if architecture is None:
        architecture = "LxmertModel" if model.vqa_labels is None else "LxmertForQuestionAnswering"
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported LXMERT architecture {architecture!r}; supported: {list(ARCHITECTURES)}")
    if architecture == "LxmertForQuestionAnswering" and model.vqa_labels is None:
        raise ValueError("LxmertForQuestionAnswering needs the model's answer head (vqa_labels), which is off")
    if model.ln_epsilon != LN_EPSILON:
        raise ValueError(f"ln_epsilon {model.ln_epsilon} cannot be exported: HF LXMERT hard-codes {LN_EPSILON}")
    prefix = "" if architecture == "LxmertModel" else BASE_PREFIX
    rules = _rules(architecture, model.l_layers, model.r_layers, model.x_layers, prefix)
    type_vocab_size = model.type_vocab_size
    if not type_vocab_size:
        # HF always adds a token-type row (type 0 by default): a single zero row keeps the outputs exact.
        rules = [r for r in rules if r[0] != ("text_embeddings", "type_embedding")]
        type_vocab_size = 1
    tensors = hf.params_to_hf(variables, rules)
    if not model.type_vocab_size:
        tensors[prefix + "embeddings.token_type_embeddings.weight"] = np.zeros((1, model.width), np.float32)
    hf_config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": "lxmert",
        "vocab_size": model.vocab_size,
        "hidden_size": model.width,
        "num_attention_heads": model.heads,
        "intermediate_size": model.mlp_dim or 4 * model.width,
        "hidden_act": hf.activation_to_hf(model.activation),
        "hidden_dropout_prob": model.dropout_rate,
        "attention_probs_dropout_prob": model.attention_dropout_rate,
        "max_position_embeddings": model.max_len,
        "type_vocab_size": type_vocab_size,
        "l_layers": model.l_layers,
        "r_layers": model.r_layers,
        "x_layers": model.x_layers,
        "visual_feat_dim": model.region_feat_dim,
        "visual_pos_dim": 4,
        "num_object_labels": model.num_region_classes,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }
    if architecture == "LxmertForQuestionAnswering":
        hf_config["num_qa_labels"] = model.vqa_labels
    return hf_config, tensors
