"""Hugging Face CLIPModel <-> mmjax CLIP (`mmjax.models.clip.CLIP`).

    model, variables, config = mmjax.convert.hf.load("openai-clip-dir")     # dispatches here on model_type "clip"
    out = model.apply(variables, {"image": x, "text_ids": ids, "text_mask": mask})
    out["image_embeds"], out["text_embeds"], out["logits_per_image"], out["logits_per_text"]   # as CLIPModel's

What is mapped, and how the two models are made to compute the same thing:

* Images are channels-last here ([B, H, W, 3]); `pixel_values` are [B, 3, H, W]. The patch conv (OIHW, no bias)
  becomes our HWIO `patch_kernel` with `patch_bias=False`; `pre_layrnorm` is our `ln_pre`; `post_layernorm` is our
  `ln_post` (applied to all tokens here, then the cls token pooled: the same pooled vector).
* Per-tower `hidden_act` ("quick_gelu" for OpenAI checkpoints, "gelu" = exact erf GELU for most others) and
  `layer_norm_eps` are kept; they are our towers' `activation` / `ln_epsilon`.
* Text pooling follows transformers 5's CLIPTextModel: with the legacy `eos_token_id == 2` it pools at
  argmax(input_ids) (OpenAI's end-of-text is the highest id), otherwise at the first `eos_token_id` in each row.
  These are our TextTransformer's pool="argmax_id" and pool="eos_id" (with `eos_token_id`). A text without the
  eos id pools at position 0 in both. Position ids are 0..L-1 (HF's default `position_ids`).
* `logit_scale` is stored un-exponentiated in both. Our CLIP clamps it at `logit_scale_max` (log 100) before exp;
  OpenAI checkpoints store 4.6052, a hair above log(100), so `load` raises the clamp to the stored value.
* Projections have no bias in either model.

`export` is the reverse, for any CLIP config HF can express: softmax loss, a pre-LN ViT with cls pooling and
`ln_pre=True` (HF always has pre_layrnorm), and a causal pre-LN text tower with a final LN. A ViT `patch_bias`
(our default) is folded into the patch rows of the position table, which is exact. Text pool="eos" (our default:
the last real token by mask) becomes HF's first-eos pooling, which agrees when every text ends in its first eos
token, as mmjax's tokenizer writes them ([CLS] ... [SEP] pad); pass that id as `eos_token_id`
(`mmjax.convert.hf.save(..., tokenizer=tok)` and `python -m mmjax.convert --workdir` pass `tok.sep_id`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmjax.convert import hf
from mmjax.models import build_model
from mmjax.models.clip import CLIP
from mmjax.models.text import TextTransformer
from mmjax.models.vit import ViT

# HF's hidden_act names -> layers.ACTIVATIONS names (gelu_new and gelu_pytorch_tanh are both the tanh GELU).
ACT_FROM_HF: dict[str, str] = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                               "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
ACT_TO_HF: dict[str, str] = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
                             "relu": "relu"}

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults for the keys we read: config.json files
# written by older transformers versions leave out values equal to the default.
TEXT_DEFAULTS: dict[str, Any] = dict(num_attention_heads=8, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                     attention_dropout=0.0, eos_token_id=49407)
VISION_DEFAULTS: dict[str, Any] = dict(num_attention_heads=12, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                       attention_dropout=0.0, image_size=224)
LOGIT_SCALE_INIT_DEFAULT = 2.6592

# HF's eos_token_id value that switches CLIPTextModel to argmax(input_ids) pooling (configs from before PR #24773).
LEGACY_EOS_ID = 2

# Non-persistent buffers that checkpoints saved by older transformers versions still carry.
IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _layer_count(tensors: Mapping[str, np.ndarray], prefix: str) -> int:
    """Number of encoder layers under `prefix` (layers 0..n-1 must all be there)."""
    ids = {int(k[len(prefix):].split(".")[0]) for k in tensors if k.startswith(prefix)}
    if ids != set(range(len(ids))):
        raise ValueError(f"encoder layers under {prefix!r} are not 0..n-1: {sorted(ids)}")
    return len(ids)


def _block_rules(ours: tuple[str, ...], pre: str) -> list[hf.Rule]:
    """One CLIPEncoderLayer `pre` <-> our layers.Block at `ours`."""
    return hf.block_rules(ours, dict(query=pre + "self_attn.q_proj", key=pre + "self_attn.k_proj",
                                     value=pre + "self_attn.v_proj", out=pre + "self_attn.out_proj",
                                     ln_1=pre + "layer_norm1", ln_2=pre + "layer_norm2",
                                     fc1=pre + "mlp.fc1", fc2=pre + "mlp.fc2"))


def vision_rules(depth: int) -> list[hf.Rule]:
    """CLIPVisionModel (prefix vision_model.) <-> our image_encoder (a ViT with ln_pre, no patch bias)."""
    ours, pre = ("image_encoder",), "vision_model."
    rules: list[hf.Rule] = [
        (ours + ("patch_kernel",), pre + "embeddings.patch_embedding.weight", "conv"),
        (ours + ("cls",), pre + "embeddings.class_embedding", "copy"),
        (ours + ("pos_embedding",), pre + "embeddings.position_embedding.weight", "copy"),
    ]
    rules += hf.layer_norm_rules(ours + ("ln_pre",), pre + "pre_layrnorm")  # sic: HF's spelling
    rules += hf.layer_norm_rules(ours + ("ln_post",), pre + "post_layernorm")
    for i in range(depth):
        rules += _block_rules(ours + ("encoder", f"layer_{i}"), f"{pre}encoder.layers.{i}.")
    return rules


def text_rules(depth: int) -> list[hf.Rule]:
    """CLIPTextModel (prefix text_model.) <-> our text_encoder (a causal pre-LN TextTransformer)."""
    ours, pre = ("text_encoder",), "text_model."
    rules: list[hf.Rule] = [
        (ours + ("embeddings", "word_embedding"), pre + "embeddings.token_embedding.weight", "copy"),
        (ours + ("embeddings", "pos_embedding"), pre + "embeddings.position_embedding.weight", "copy"),
    ]
    rules += hf.layer_norm_rules(ours + ("ln_final",), pre + "final_layer_norm")
    for i in range(depth):
        rules += _block_rules(ours + ("encoder", f"layer_{i}"), f"{pre}encoder.layers.{i}.")
    return rules


# Projections (nn.Linear without bias: weight only) and the temperature.
HEAD_RULES: list[hf.Rule] = [
    (("image_projection", "kernel"), "visual_projection.weight", "linear"),
    (("text_projection", "kernel"), "text_projection.weight", "linear"),
    (("logit_scale",), "logit_scale", "copy"),
]


def _square_size(value: Any, what: str) -> int:
    """HF image_size / patch_size (int or [h, w]) -> one int; our ViT takes square sizes only."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {what} {value} is not supported")
        value = value[0]
    return int(value)


def _check(what: str, config_value: Any, tensor_value: int) -> None:
    """A config.json size must agree with the checkpoint's tensors (a mismatch means a wrong config)."""
    if config_value is not None and int(config_value) != tensor_value:
        raise ValueError(f"config.json says {what}={config_value} but the checkpoint's tensors give {tensor_value}")


def _activation(name: str, tower: str) -> str:
    if name not in ACT_FROM_HF:
        raise ValueError(f"{tower} hidden_act {name!r} is not supported; supported: {sorted(ACT_FROM_HF)}")
    return ACT_FROM_HF[name]


def _example_batch(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """A one-example batch of the model's input shapes (for check_params' abstract init)."""
    size, length = model_config["image"]["image_size"], model_config["text"]["max_len"]
    return {"image": jnp.zeros((1, size, size, 3), jnp.float32), "text_ids": jnp.zeros((1, length), jnp.int32),
            "text_mask": jnp.ones((1, length), jnp.int32)}


def load(hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
         ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """HF CLIPModel config.json dict + state-dict tensors -> (our CLIP module, {"params": ...}, our model config)."""
    if hf_config.get("model_type", "clip") != "clip":
        raise ValueError(f"not a CLIPModel config: model_type {hf_config.get('model_type')!r}")
    tc = {**TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}
    vc = {**VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}

    # Sizes come from the tensors (always present); config.json values, when given, must agree with them.
    vocab_size, text_width = tensors["text_model.embeddings.token_embedding.weight"].shape
    max_len = tensors["text_model.embeddings.position_embedding.weight"].shape[0]
    text_depth = _layer_count(tensors, "text_model.encoder.layers.")
    text_mlp = tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    image_width, channels, patch, _ = tensors["vision_model.embeddings.patch_embedding.weight"].shape
    num_pos = tensors["vision_model.embeddings.position_embedding.weight"].shape[0]
    image_depth = _layer_count(tensors, "vision_model.encoder.layers.")
    image_mlp = tensors["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    embed_dim = tensors["visual_projection.weight"].shape[0]
    for what, cfg, got in (("text_config.vocab_size", tc.get("vocab_size"), vocab_size),
                           ("text_config.hidden_size", tc.get("hidden_size"), text_width),
                           ("text_config.max_position_embeddings", tc.get("max_position_embeddings"), max_len),
                           ("text_config.num_hidden_layers", tc.get("num_hidden_layers"), text_depth),
                           ("text_config.intermediate_size", tc.get("intermediate_size"), text_mlp),
                           ("vision_config.hidden_size", vc.get("hidden_size"), image_width),
                           ("vision_config.num_hidden_layers", vc.get("num_hidden_layers"), image_depth),
                           ("vision_config.intermediate_size", vc.get("intermediate_size"), image_mlp),
                           ("vision_config.num_channels", vc.get("num_channels"), channels),
                           ("projection_dim", hf_config.get("projection_dim"), embed_dim)):
        _check(what, cfg, int(got))
    _check("vision_config.patch_size", _square_size(vc.get("patch_size", patch), "patch_size"), int(patch))
    image_size = _square_size(vc["image_size"], "image_size")
    if (image_size // patch) ** 2 + 1 != num_pos or image_size % patch:
        raise ValueError(f"image_size {image_size} with patch {patch} does not give the checkpoint's {num_pos} "
                         "positions (grid^2 + cls)")
    if channels != 3:
        raise ValueError(f"num_channels {channels}: mmjax batches carry RGB images")

    eos = tc["eos_token_id"]
    if isinstance(eos, bool) or not isinstance(eos, int):
        raise ValueError(f"text_config.eos_token_id must be one int; got {eos!r}")
    # Mirrors CLIPTextModel.forward in transformers 5 (see the module docstring).
    pooling = dict(pool="argmax_id") if eos == LEGACY_EOS_ID else dict(pool="eos_id", eos_token_id=eos)

    logit_scale = float(np.asarray(tensors["logit_scale"]))
    model_config: dict[str, Any] = dict(
        name="clip",
        loss="softmax",
        embed_dim=int(embed_dim),
        logit_scale_init=float(hf_config.get("logit_scale_init_value", LOGIT_SCALE_INIT_DEFAULT)),
        # Never clamp the checkpoint's own scale (OpenAI's 4.6052 > log 100): HF's outputs are unclamped.
        logit_scale_max=max(math.log(100.0), logit_scale),
        dtype="float32",
        image=dict(
            image_size=image_size, patch_size=int(patch), width=int(image_width), depth=image_depth,
            heads=int(vc["num_attention_heads"]), mlp_dim=int(image_mlp), pool="cls", patch_bias=False,
            ln_pre=True, norm="pre", activation=_activation(vc["hidden_act"], "vision"),
            ln_epsilon=float(vc["layer_norm_eps"]), attention_dropout_rate=float(vc["attention_dropout"])),
        text=dict(
            vocab_size=int(vocab_size), max_len=int(max_len), width=int(text_width), depth=text_depth,
            heads=int(tc["num_attention_heads"]), mlp_dim=int(text_mlp), causal=True, norm="pre",
            activation=_activation(tc["hidden_act"], "text"), ln_epsilon=float(tc["layer_norm_eps"]),
            attention_dropout_rate=float(tc["attention_dropout"]), **pooling),
    )

    # One params_from_hf per tower: the head count differs between towers, and each call logs its own leftovers.
    def subset(prefix: str) -> dict[str, np.ndarray]:
        return {k: v for k, v in tensors.items() if k.startswith(prefix)}

    heads = {k: v for k, v in tensors.items() if not k.startswith(("vision_model.", "text_model."))}
    params = {
        **hf.params_from_hf(subset("vision_model."), vision_rules(image_depth), model_config["image"]["heads"],
                            ignore=IGNORED),
        **hf.params_from_hf(subset("text_model."), text_rules(text_depth), model_config["text"]["heads"],
                            ignore=IGNORED),
        **hf.params_from_hf(heads, HEAD_RULES, 1),
    }
    model = build_model(model_config)
    hf.check_params(model, _example_batch(model_config), params)
    return model, hf.to_variables(params), model_config


def export(model_config: Mapping[str, Any], variables: Mapping[str, Any], *, eos_token_id: Optional[int] = None
           ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our CLIP config + variables -> (CLIPModel config.json dict, state-dict tensors) for transformers.

    `eos_token_id` is the id that ends every text (mmjax's tokenizer: its sep_id), used only for text pool="eos"
    (our default; the text config's own eos_token_id when not given); pool="eos_id" / "argmax_id" name their own.
    Whatever HF's CLIPModel cannot express is one ValueError listing every problem.
    """
    cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if cfg.get("name") != "clip":
        raise ValueError(f"not a CLIP model config: name {cfg.get('name')!r}")
    model: CLIP = build_model(cfg)  # validates the field names and fills CLIP's defaults
    # Unbound tower modules: their attributes are the config's fields with every default filled in.
    vit = ViT(**dict(model.image))
    txt = TextTransformer(**dict(model.text))

    problems = []
    if model.loss != "softmax":
        problems.append(f"loss={model.loss!r} (HF CLIPModel is the softmax loss; SigLIP is another class)")
    if not model.project_text:
        problems.append("project_text=False (HF CLIPModel always has a text projection)")
    if vit.pool != "cls" or vit.cls_token is False:
        problems.append(f"image pool={vit.pool!r} (HF pools the cls token)")
    if not vit.ln_pre:
        problems.append("image ln_pre=False (HF CLIPVisionModel always applies pre_layrnorm)")
    if vit.norm != "pre" or txt.norm != "pre":
        problems.append("norm='post' (HF CLIP layers are pre-LN)")
    if not txt.causal:
        problems.append("text causal=False (HF CLIPTextModel is causal)")
    if txt.final_ln is False or txt.embed_ln or txt.type_vocab_size:
        problems.append("text final_ln=False / embed_ln / type_vocab_size (HF: final LN only, no token types)")
    if vit.image_size is None:
        problems.append("image image_size=None (HF needs a fixed image size for its position table)")
    for tower, act in (("image", vit.activation), ("text", txt.activation)):
        if act not in ACT_TO_HF:
            problems.append(f"{tower} activation {act!r}")

    pool = txt.pool or "eos"
    eos = None
    if pool == "argmax_id":
        eos = LEGACY_EOS_ID  # the value that makes HF pool at argmax(input_ids)
    elif pool == "eos_id":
        eos = txt.eos_token_id  # the model names its own id; HF then pools exactly where it does
    elif pool == "eos":
        eos = eos_token_id if eos_token_id is not None else txt.eos_token_id
        if eos is None:
            problems.append("text pool='eos' without eos_token_id (HF pools at the first eos_token_id: pass the "
                            "id that ends every text, the tokenizer's sep_id; `hf.save(..., tokenizer=)` does)")
    else:
        problems.append(f"text pool={pool!r} (HF pools at the eos token)")
    if pool in ("eos_id", "eos") and eos == LEGACY_EOS_ID:
        problems.append(f"eos_token_id {LEGACY_EOS_ID} (HF pools at argmax(input_ids) then, not at the eos id)")
    if problems:
        raise ValueError("HF CLIPModel cannot express this CLIP: " + "; ".join(problems))

    params = dict(nn.unbox(variables.get("params", variables)))
    image = dict(params["image_encoder"])
    if vit.patch_bias:
        # Every patch token gets the bias, the cls token does not: fold it into the patch rows of the positions.
        pos = np.asarray(image["pos_embedding"], np.float32)
        image["pos_embedding"] = np.concatenate([pos[:1], pos[1:] + np.asarray(image["patch_bias"], np.float32)])
    image.pop("patch_bias", None)
    params["image_encoder"] = image
    # HF does not clamp: store what our forward pass uses.
    params["logit_scale"] = np.minimum(np.asarray(params["logit_scale"], np.float32),
                                       np.float32(model.logit_scale_max))

    tensors = {
        **hf.params_to_hf(params, vision_rules(vit.depth)),
        **hf.params_to_hf(params, text_rules(txt.depth)),
        **hf.params_to_hf(params, HEAD_RULES),
    }
    logit_scale_init = model.logit_scale_init if model.logit_scale_init is not None else math.log(1 / 0.07)
    common = dict(initializer_factor=1.0, initializer_range=0.02, projection_dim=model.embed_dim)
    hf_config: dict[str, Any] = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "dtype": "float32",
        "projection_dim": model.embed_dim,
        "logit_scale_init_value": float(logit_scale_init),
        "initializer_factor": 1.0,
        "text_config": {
            **common,
            "model_type": "clip_text_model",
            "vocab_size": txt.vocab_size,
            "hidden_size": txt.width,
            "intermediate_size": txt.mlp_dim or 4 * txt.width,
            "num_hidden_layers": txt.depth,
            "num_attention_heads": txt.heads,
            "max_position_embeddings": txt.max_len,
            "hidden_act": ACT_TO_HF[txt.activation],
            "layer_norm_eps": txt.ln_epsilon,
            "attention_dropout": txt.attention_dropout_rate,
            "eos_token_id": int(eos),
            # HF's defaults (49406 / 1) would name ids outside a small vocabulary; we do not track them.
            "bos_token_id": None,
            "pad_token_id": None,
        },
        "vision_config": {
            **common,
            "model_type": "clip_vision_model",
            "hidden_size": vit.width,
            "intermediate_size": vit.mlp_dim or 4 * vit.width,
            "num_hidden_layers": vit.depth,
            "num_attention_heads": vit.heads,
            "num_channels": int(tensors["vision_model.embeddings.patch_embedding.weight"].shape[1]),
            "image_size": vit.image_size,
            "patch_size": vit.patch_size,
            "hidden_act": ACT_TO_HF[vit.activation],
            "layer_norm_eps": vit.ln_epsilon,
            "attention_dropout": vit.attention_dropout_rate,
        },
    }
    return hf_config, tensors


def save_hf(model_config: Mapping[str, Any], variables: Mapping[str, Any], out_dir: str | os.PathLike, *,
            eos_token_id: Optional[int] = None) -> None:
    """Writes config.json + model.safetensors that `transformers.CLIPModel.from_pretrained(out_dir)` loads."""
    hf_config, tensors = export(model_config, variables, eos_token_id=eos_token_id)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, hf.CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    hf.write_safetensors(tensors, os.path.join(out_dir, hf.WEIGHTS_FILE))
