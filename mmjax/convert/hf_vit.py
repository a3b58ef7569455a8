"""Hugging Face ViTModel <-> mmjax.models.vit.ViTModel (our ViT + HF's tanh pooler).

HF ViT is pre-LN with a final LayerNorm (eps from config), a biased patch conv, a cls token and a learned position
table: exactly our ViT with pool="cls". Tensor names are ViTModel's without the "vit." prefix
(`mmjax.convert.hf.load` strips it from ViTForX checkpoints). The pooler is converted when the checkpoint has one.
Images go in channels-last (batch["image"] [B, H, W, C]) at the config's image_size: HF's
interpolate_pos_encoding is not reproduced.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf
from mmjax.models.vit import HF_VIT_DEFAULTS, ViTModel

# ViTModel(use_mask_token=True) saves a mask token that only masked-image modelling uses.
IGNORED = ("embeddings.mask_token",)
QKV = ("query", "key", "value")


def _rules(depth: int, pooler: bool) -> list[hf.Rule]:
    """Our param path <-> ViTModel tensor name, for the whole model."""
    v = ("image_encoder",)
    rules: list[hf.Rule] = [
        (v + ("patch_kernel",), "embeddings.patch_embeddings.projection.weight", "conv"),
        (v + ("patch_bias",), "embeddings.patch_embeddings.projection.bias", "copy"),
        (v + ("cls",), "embeddings.cls_token", "token"),
        (v + ("pos_embedding",), "embeddings.position_embeddings", "batch1"),
    ]
    for i in range(depth):
        pre = f"encoder.layer.{i}."
        rules += hf.block_rules(v + ("encoder", f"layer_{i}"), {
            **{n: pre + "attention.attention." + n for n in QKV}, "out": pre + "attention.output.dense",
            "ln_1": pre + "layernorm_before", "ln_2": pre + "layernorm_after",  # pre-LN
            "fc1": pre + "intermediate.dense", "fc2": pre + "output.dense",
        })
    rules += hf.layer_norm_rules(v + ("ln_post",), "layernorm")
    if pooler:
        rules += hf.dense_rules(("pooler",), "pooler.dense")
    return rules


def load(hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
         ) -> tuple[ViTModel, dict[str, Any], dict[str, Any]]:
    """HF ViTModel config + tensors -> (ViTModel, variables, model config {"name": "vit", "image", "pooler", ...})."""
    g = lambda key, default=None: hf_config.get(key, default)  # noqa: E731
    image_size, patch_size = g("image_size", 224), g("patch_size", 16)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ValueError(f"only square ViT images and patches are supported; got image_size={image_size!r}, "
                         f"patch_size={patch_size!r}")
    if g("pooler_act", "tanh") != "tanh":
        raise ValueError(f"ViT pooler_act {g('pooler_act')!r} is not supported (only 'tanh')")
    width = g("hidden_size", 768)
    image = dict(
        HF_VIT_DEFAULTS,
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        depth=g("num_hidden_layers", 12),
        heads=g("num_attention_heads", 12),
        mlp_dim=g("intermediate_size", 3072),
        activation=hf.activation_from_hf(g("hidden_act", "gelu")),
        ln_epsilon=g("layer_norm_eps", 1e-12),
        dropout_rate=g("hidden_dropout_prob", 0.0),  # training only (our MLP also drops its hidden units)
        attention_dropout_rate=g("attention_probs_dropout_prob", 0.0),
    )
    pooler = "pooler.dense.weight" in tensors
    pooler_dim = g("pooler_output_size") or width
    config = {"name": "vit", "image": image, "pooler": pooler, "pooler_dim": pooler_dim}
    model = ViTModel(image=image, pooler=pooler, pooler_dim=pooler_dim)

    tensors = dict(tensors)
    if not g("qkv_bias", True):
        # Our attention always has q/k/v biases; zeros reproduce qkv_bias=False exactly.
        for i in range(image["depth"]):
            for n in QKV:
                tensors[f"encoder.layer.{i}.attention.attention.{n}.bias"] = np.zeros(width, np.float32)
    params = hf.params_from_hf(tensors, _rules(image["depth"], pooler), image["heads"], ignore=IGNORED)
    channels = g("num_channels", 3)
    hf.check_params(model, {"image": jnp.zeros((1, image_size, image_size, channels), jnp.float32)}, params)
    return model, hf.to_variables(params), config


def export(model_config: Mapping[str, Any], variables: Mapping[str, Any]
           ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our ViT config + variables -> (HF ViTModel config.json dict, tensors by HF name)."""
    image = {**HF_VIT_DEFAULTS, **dict(model_config["image"])}
    if image["pool"] != "cls" or image["norm"] != "pre" or image["ln_pre"] or image["cls_token"] is False:
        raise ValueError("only HF-structured ViTs export to ViTModel (pool='cls', norm='pre', no ln_pre)")
    pooler = bool(model_config.get("pooler", True))
    params = nn.unbox(variables.get("params", variables))
    patch_kernel = np.asarray(params["image_encoder"]["patch_kernel"])  # [p, p, C, D]
    if not image["patch_bias"]:
        # HF's patch conv always has a bias: a zero one keeps the output exact.
        encoder = dict(params["image_encoder"], patch_bias=np.zeros(patch_kernel.shape[-1], np.float32))
        params = dict(params, image_encoder=encoder)
    tensors = hf.params_to_hf({"params": params}, _rules(image["depth"], pooler))
    image_size = image.get("image_size")
    if image_size is None:  # our ViT accepts any size; the position table fixes the one HF needs
        grid = math.isqrt(np.shape(params["image_encoder"]["pos_embedding"])[0] - 1)
        image_size = grid * image["patch_size"]
    hf_config = {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "image_size": image_size,
        "patch_size": image["patch_size"],
        "num_channels": int(patch_kernel.shape[2]),
        "hidden_size": image["width"],
        "num_hidden_layers": image["depth"],
        "num_attention_heads": image["heads"],
        "intermediate_size": image.get("mlp_dim") or 4 * image["width"],
        "hidden_act": hf.activation_to_hf(image.get("activation", "gelu")),
        "layer_norm_eps": image["ln_epsilon"],
        "hidden_dropout_prob": image.get("dropout_rate", 0.0),
        "attention_probs_dropout_prob": image.get("attention_dropout_rate", 0.0),
        "qkv_bias": True,
        "pooler_output_size": model_config.get("pooler_dim") or image["width"],
        "pooler_act": "tanh",
        "initializer_range": 0.02,
    }
    return hf_config, tensors
