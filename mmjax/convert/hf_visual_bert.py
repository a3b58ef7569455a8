"""Hugging Face VisualBERT <-> mmjax.models.visualbert.VisualBERT: configs and weights, for VisualBertModel and two
of its head classes.

    VisualBertModel                 -> VisualBERT(no heads)                      names without a prefix
    VisualBertForQuestionAnswering  -> VisualBERT(vqa_labels=num_labels)         "visual_bert." + cls.*
    VisualBertForPreTraining        -> VisualBERT(mlm_head=True, itm_head=True)  "visual_bert." + cls.predictions.*,
                                                                                 cls.seq_relationship.*

Inputs: HF's input_ids / attention_mask / token_type_ids / visual_embeds / visual_attention_mask are our text_ids /
text_mask / text_type_ids / region_feats / region_mask; HF's defaults visual_token_type_ids = 1 and no
image_text_alignment are what our model computes (other values of those two are not supported).

Outputs: `last_hidden_state` and `pooler_output` under those names; VisualBertForQuestionAnswering's `logits` are
our `vqa_logits` (and `logits`); VisualBertForPreTraining's `prediction_logits` [B, L+R, V] are our `mlm_logits`
[B, L, V] on the text rows, and its `seq_relationship_logits` are our `itm_logits` in the other column order: HF's
sentence_image_labels take 0 for a matching pair, ours 1, so the two rows of `cls.seq_relationship` are swapped on
the way in and out (itm_logits = seq_relationship_logits[:, ::-1]).

Other head classes (multiple choice, visual reasoning, region-to-phrase alignment), bypass_transformer=True and an
untied MLM decoder raise rather than convert in part.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf
from mmjax.models import build_model

ARCHITECTURES = ("VisualBertModel", "VisualBertForQuestionAnswering", "VisualBertForPreTraining")
BASE_PREFIX = "visual_bert."  # the head classes nest VisualBertModel under this name; it saves without one
ITM = "cls.seq_relationship"  # rows [match, mismatch] in HF; our itm_head columns are [mismatch, match]
DECODER = "cls.predictions.decoder"  # tied to the word table and cls.predictions.bias; older checkpoints repeat it
# Buffers, not weights (older checkpoints save them).
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def detect_architecture(hf_config: Mapping[str, Any], tensors: Mapping[str, Any]) -> tuple[str, str]:
    """(architecture, tensor-name prefix of the VisualBertModel part): from config "architectures", else the names."""
    prefix = BASE_PREFIX if any(k.startswith(BASE_PREFIX) for k in tensors) else ""
    named = list(hf_config.get("architectures") or [])
    bad = [a for a in named if a not in ARCHITECTURES]
    if bad:
        raise ValueError(f"unsupported VisualBERT architecture {bad[0]!r}; supported: {list(ARCHITECTURES)}")
    if named:
        return named[0], prefix
    if ITM + ".weight" in tensors:
        return "VisualBertForPreTraining", prefix
    if "cls.weight" in tensors:
        # Multiple choice and visual reasoning name their heads `cls` too, and classify other tokens.
        raise ValueError("the checkpoint has a `cls` head but config.json names no architecture; set "
                         "architectures to ['VisualBertForQuestionAnswering'] if that is what it is")
    return "VisualBertModel", prefix


def _check_supported(hf_config: Mapping[str, Any], architecture: str) -> None:
    """VisualBERT options our model does not express raise here rather than convert to something else."""
    if hf_config.get("bypass_transformer", False):
        raise ValueError("VisualBERT bypass_transformer=True is not supported (regions join the encoder's input)")
    if architecture == "VisualBertForPreTraining" and not hf_config.get("tie_word_embeddings", True):
        raise ValueError("VisualBERT tie_word_embeddings=False is not supported: our MLM decoder is the word table")


def model_config_from_hf(hf_config: Mapping[str, Any], architecture: str,
                         vqa_labels: Optional[int] = None) -> dict[str, Any]:
    """HF VisualBertConfig dict -> our model config ({"name": "visualbert", ...}, for build_model)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported VisualBERT architecture {architecture!r}; supported: {list(ARCHITECTURES)}")
    _check_supported(hf_config, architecture)
    g = lambda key, default=None: hf_config.get(key, default)  # noqa: E731  (VisualBertConfig's defaults)
    pretraining = architecture == "VisualBertForPreTraining"
    config = {
        "name": "visualbert",
        "vocab_size": g("vocab_size", 30522),
        "max_len": g("max_position_embeddings", 512),
        "region_feat_dim": g("visual_embedding_dim", 512),
        "width": g("hidden_size", 768),
        "depth": g("num_hidden_layers", 12),
        "heads": g("num_attention_heads", 12),
        "mlp_dim": g("intermediate_size", 3072),
        "activation": hf.activation_from_hf(g("hidden_act", "gelu")),
        "ln_epsilon": g("layer_norm_eps", 1e-12),
        # Training only. HF drops out the embeddings, attention probabilities and outputs, the MLP output and the
        # VQA head's input, as ours; our MLP also drops out its hidden activations, which HF's does not.
        "dropout_rate": g("hidden_dropout_prob", 0.1),
        "attention_dropout_rate": g("attention_probs_dropout_prob", 0.1),
        "type_vocab_size": g("type_vocab_size", 2),
        "special_visual_initialize": bool(g("special_visual_initialize", True)),
        "mlm_head": pretraining,
        "itm_head": pretraining,
        "vqa_labels": None,
        "mrfr_head": False,
        "mrc_head": False,
    }
    if architecture == "VisualBertForQuestionAnswering":
        # config.json stores the labels (id2label), not num_labels; the classifier's shape is the ground truth.
        labels = vqa_labels or g("num_labels") or len(g("id2label") or {})
        if not labels:
            raise ValueError("VisualBertForQuestionAnswering needs the label count (num_labels / id2label)")
        config["vqa_labels"] = int(labels)
    return config


def _rules(architecture: str, depth: int, prefix: str) -> list[hf.Rule]:
    """Our param path <-> HF tensor name for the whole model of one architecture."""
    emb, text = prefix + "embeddings.", ("text_embeddings",)
    rules: list[hf.Rule] = [
        (text + ("word_embedding",), emb + "word_embeddings.weight", "copy"),
        (text + ("pos_embedding",), emb + "position_embeddings.weight", "copy"),
        (text + ("type_embedding",), emb + "token_type_embeddings.weight", "copy"),
        (("visual_type_embedding",), emb + "visual_token_type_embeddings.weight", "copy"),
        (("visual_pos_embedding",), emb + "visual_position_embeddings.weight", "copy"),
    ]
    rules += hf.dense_rules(("visual_projection",), emb + "visual_projection")
    rules += hf.layer_norm_rules(("ln_embed",), emb + "LayerNorm")
    for i in range(depth):
        pre = f"{prefix}encoder.layer.{i}."
        rules += hf.block_rules(("encoder", f"layer_{i}"), {
            "query": pre + "attention.self.query", "key": pre + "attention.self.key",
            "value": pre + "attention.self.value", "out": pre + "attention.output.dense",
            "ln_1": pre + "attention.output.LayerNorm",  # post-LN: LN(x + attn(x))
            "fc1": pre + "intermediate.dense", "fc2": pre + "output.dense",
            "ln_2": pre + "output.LayerNorm",  # post-LN: LN(z + mlp(z))
        })
    rules += hf.dense_rules(("pooler",), prefix + "pooler.dense")
    if architecture == "VisualBertForQuestionAnswering":
        rules += hf.dense_rules(("vqa_head",), "cls")
    elif architecture == "VisualBertForPreTraining":
        # The decoder weight is the word table and its bias cls.predictions.bias (tied), so neither is mapped.
        rules += hf.dense_rules(("mlm_transform", "dense"), "cls.predictions.transform.dense")
        rules += hf.layer_norm_rules(("mlm_transform", "ln"), "cls.predictions.transform.LayerNorm")
        rules.append((("mlm_bias",), "cls.predictions.bias", "copy"))
        rules += hf.dense_rules(("itm_head",), ITM)
    return rules


def _swap_itm_rows(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF's seq_relationship rows (0 = matching) in our order (1 = matching), or back: the swap is its own inverse."""
    tensors = dict(tensors)
    for name in (ITM + ".weight", ITM + ".bias"):
        if name in tensors:
            tensors[name] = np.ascontiguousarray(np.asarray(tensors[name])[::-1])
    return tensors


def _check_tied(tensors: Mapping[str, np.ndarray], prefix: str) -> None:
    """A repeated MLM decoder (older state dicts) must equal what ours ties it to; an untied one raises."""
    tied = {DECODER + ".weight": prefix + "embeddings.word_embeddings.weight",
            DECODER + ".bias": "cls.predictions.bias"}
    for name, source in tied.items():
        if name in tensors and not np.array_equal(np.asarray(tensors[name]), np.asarray(tensors[source])):
            raise ValueError(f"{name} differs from {source}: our MLM decoder is tied to it")


def load(hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
         ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """HF VisualBERT config.json dict + tensors -> (our VisualBERT, variables {"params": ...}, model config)."""
    architecture, prefix = detect_architecture(hf_config, tensors)
    vqa_labels = None
    if architecture == "VisualBertForQuestionAnswering" and "cls.weight" in tensors:
        vqa_labels = np.shape(tensors["cls.weight"])[0]
    config = model_config_from_hf(hf_config, architecture, vqa_labels)
    _check_tied(tensors, prefix)
    model = build_model(config)
    ignore = (DECODER + ".weight", DECODER + ".bias") + tuple(prefix + b for b in BUFFERS)
    params = hf.params_from_hf(_swap_itm_rows(tensors), _rules(architecture, config["depth"], prefix),
                               config["heads"], ignore=ignore)
    example = {"text_ids": jax.ShapeDtypeStruct((1, 2), jnp.int32),
               "text_mask": jax.ShapeDtypeStruct((1, 2), jnp.int32),
               "region_feats": jax.ShapeDtypeStruct((1, 1, config["region_feat_dim"]), jnp.float32),
               "region_mask": jax.ShapeDtypeStruct((1, 1), jnp.int32)}
    hf.check_params(model, example, params)
    return model, hf.to_variables(params), config


def infer_architecture(model_config: Mapping[str, Any]) -> str:
    """The HF architecture a model config exports to: VQA, pre-training (MLM + ITM both on), else VisualBertModel."""
    model = build_model(model_config)
    heads = [a for a, on in (("VisualBertForQuestionAnswering", model.vqa_labels is not None),
                             ("VisualBertForPreTraining", model.mlm_head and model.itm_head)) if on]
    if len(heads) > 1:
        raise ValueError(f"the model has several HF heads ({heads}); pass `architecture` to pick the one to export")
    return heads[0] if heads else "VisualBertModel"


def export(model_config: Mapping[str, Any], variables: Mapping[str, Any], architecture: Optional[str] = None
           ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our VisualBERT config + variables -> (HF config.json dict, float32 tensors by HF name) for `architecture`.

    architecture=None (what `mmjax.convert.hf.save` passes) picks it with `infer_architecture`. Heads outside the
    architecture (e.g. MRFR / MRC, or a lone MLM head under VisualBertModel) are left out.
    """
    model = build_model(model_config)
    architecture = architecture or infer_architecture(model_config)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported VisualBERT architecture {architecture!r}; supported: {list(ARCHITECTURES)}")
    needs = {"VisualBertForQuestionAnswering": ("VQA head (vqa_labels)", model.vqa_labels is not None),
             "VisualBertForPreTraining": ("mlm_head and itm_head", model.mlm_head and model.itm_head)}
    what, present = needs.get(architecture, ("", True))
    if not present:
        raise ValueError(f"{architecture} needs the model's {what}, which the config turns off")
    prefix = "" if architecture == "VisualBertModel" else BASE_PREFIX
    tensors = _swap_itm_rows(hf.params_to_hf(variables, _rules(architecture, model.depth, prefix)))
    hf_config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": "visual_bert",
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_len,
        "visual_embedding_dim": model.region_feat_dim,
        "hidden_size": model.width,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.heads,
        "intermediate_size": model.mlp_dim or 4 * model.width,
        "hidden_act": hf.activation_to_hf(model.activation),
        "hidden_dropout_prob": model.dropout_rate,
        "attention_probs_dropout_prob": model.attention_dropout_rate,
        "layer_norm_eps": model.ln_epsilon,
        "type_vocab_size": model.type_vocab_size,
        "bypass_transformer": False,
        "special_visual_initialize": model.special_visual_initialize,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "dtype": "float32",
    }
    if architecture == "VisualBertForQuestionAnswering":
        # transformers derives num_labels from id2label; the answer strings are not part of our config.
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.vqa_labels)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(model.vqa_labels)}
    return hf_config, tensors
