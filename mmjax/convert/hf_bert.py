"""Hugging Face BertModel <-> mmjax.models.bert.BertModel (TextTransformer + pooler).

Tensor names are BertModel's without the "bert." prefix (`mmjax.convert.hf.load` strips it from BertForX
checkpoints). The pooler is converted when the checkpoint has one (BertForMaskedLM etc. are saved without).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf
from mmjax.models.bert import BERT_TEXT_DEFAULTS, BertModel

# Buffers, not weights: older checkpoints save the constant position ids 0..max_len-1.
IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")


def _rules(depth: int, type_vocab_size: int, pooler: bool) -> list[hf.Rule]:
    """Our param path <-> BertModel tensor name, for the whole model."""
    t, e = ("text_encoder",), ("text_encoder", "embeddings")
    rules: list[hf.Rule] = [
        (e + ("word_embedding",), "embeddings.word_embeddings.weight", "copy"),
        (e + ("pos_embedding",), "embeddings.position_embeddings.weight", "copy"),
    ]
    if type_vocab_size:
        rules.append((e + ("type_embedding",), "embeddings.token_type_embeddings.weight", "copy"))
    rules += hf.layer_norm_rules(e + ("ln",), "embeddings.LayerNorm")
    for i in range(depth):
        pre = f"encoder.layer.{i}."
        rules += hf.block_rules(t + ("encoder", f"layer_{i}"), {
            "query": pre + "attention.self.query", "key": pre + "attention.self.key",
            "value": pre + "attention.self.value", "out": pre + "attention.output.dense",
            "ln_1": pre + "attention.output.LayerNorm",  # post-LN: LN(x + attn(x))
            "fc1": pre + "intermediate.dense", "fc2": pre + "output.dense",
            "ln_2": pre + "output.LayerNorm",  # post-LN: LN(z + mlp(z))
        })
    if pooler:
        rules += hf.dense_rules(("pooler",), "pooler.dense")
    return rules


def _check_supported(hf_config: Mapping[str, Any]) -> None:
    """BERT variants our encoder does not express raise here rather than convert to something else."""
    pet = hf_config.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise ValueError(f"BERT position_embedding_type {pet!r} is not supported (only 'absolute')")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
        raise ValueError("BERT decoders / cross-attention are not supported (encoder-only BertModel)")


def load(hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
         ) -> tuple[BertModel, dict[str, Any], dict[str, Any]]:
    """HF BertModel config + tensors -> (BertModel, variables, model config {"name": "bert", "text", "pooler"})."""
    _check_supported(hf_config)
    g = lambda key, default=None: hf_config.get(key, default)  # noqa: E731
    text = dict(
        BERT_TEXT_DEFAULTS,
        vocab_size=g("vocab_size", 30522),
        max_len=g("max_position_embeddings", 512),
        width=g("hidden_size", 768),
        depth=g("num_hidden_layers", 12),
        heads=g("num_attention_heads", 12),
        mlp_dim=g("intermediate_size", 3072),
        type_vocab_size=g("type_vocab_size", 2),
        activation=hf.activation_from_hf(g("hidden_act", "gelu")),
        ln_epsilon=g("layer_norm_eps", 1e-12),
        # Training only. HF drops out the attention and MLP outputs and the attention probabilities, as our Block;
        # our MLP also drops out its hidden activations, which HF BERT does not.
        dropout_rate=g("hidden_dropout_prob", 0.1),
        attention_dropout_rate=g("attention_probs_dropout_prob", 0.1),
    )
    pooler = "pooler.dense.weight" in tensors
    config = {"name": "bert", "text": text, "pooler": pooler}
    model = BertModel(text=text, pooler=pooler)
    params = hf.params_from_hf(tensors, _rules(text["depth"], text["type_vocab_size"], pooler), text["heads"],
                               ignore=IGNORED)
    example = {"text_ids": jnp.zeros((1, 2), jnp.int32), "text_mask": jnp.ones((1, 2), jnp.int32)}
    hf.check_params(model, example, params)
    return model, hf.to_variables(params), config


def export(model_config: Mapping[str, Any], variables: Mapping[str, Any]
           ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our BERT config + variables -> (HF BertModel config.json dict, tensors by HF name)."""
    text = {**BERT_TEXT_DEFAULTS, **dict(model_config["text"])}
    if text["causal"] or text["norm"] != "post" or text.get("final_ln") or text.get("embed_ln") is False:
        raise ValueError("only BERT-structured text encoders export to BertModel (causal=False, norm='post', "
                         "embedding LayerNorm, no final LayerNorm)")
    pooler = bool(model_config.get("pooler", True))
    tensors = hf.params_to_hf(variables, _rules(text["depth"], text["type_vocab_size"], pooler))
    type_vocab_size = text["type_vocab_size"]
    if not type_vocab_size:
        # HF BERT always adds a token-type row (type 0 by default): a single zero row keeps the output exact.
        type_vocab_size = 1
        tensors["embeddings.token_type_embeddings.weight"] = np.zeros((1, text["width"]), np.float32)
    hf_config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": text["vocab_size"],
        "max_position_embeddings": text["max_len"],
        "hidden_size": text["width"],
        "num_hidden_layers": text["depth"],
        "num_attention_heads": text["heads"],
        "intermediate_size": text.get("mlp_dim") or 4 * text["width"],
        "type_vocab_size": type_vocab_size,
        "hidden_act": hf.activation_to_hf(text.get("activation", "gelu")),
        "layer_norm_eps": text["ln_epsilon"],
        "hidden_dropout_prob": text.get("dropout_rate", 0.0),
        "attention_probs_dropout_prob": text.get("attention_dropout_rate", 0.0),
        "position_embedding_type": "absolute",
        "initializer_range": 0.02,
    }
    return hf_config, tensors
