"""CLIP / SigLIP dual encoder: ViT image tower + text transformer, projected to a joint unit-norm space."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.losses import RANKING_LOSSES
from mmjax.models import layers
from mmjax.models.layers import Array, Dtype, partitioned
from mmjax.models.text import TextTransformer
from mmjax.models.vit import ViT

REQUIRED_KEYS = ("image", "text_ids", "text_mask")
LOSSES = ("softmax", "sigmoid", *RANKING_LOSSES)


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    """Unit-normalise the last axis in float32 (embeds are returned in float32 whatever the compute dtype)."""
    x = x.astype(jnp.float32)
    return x * jnp.reciprocal(jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps))


class CLIP(nn.Module):
    """Dual encoder for contrastive image-text pretraining (softmax = CLIP, sigmoid = SigLIP; the ranking losses
    hinge = DeViSE, triplet = VSE, triplet_hardest = VSE++, with `margin`: losses.RANKING_LOSSES).

    `dtype`, `param_dtype`, `remat`, `remat_policy`, `attention` and `scan_layers` here override the same keys in
    the tower dicts, so the trainer's one setting applies to both towers.

    Parameters: image_encoder (ViT), text_encoder (TextTransformer), image_projection, text_projection (unless
    project_text=False), logit_scale, and logit_bias (sigmoid loss). The ranking losses leave logit_scale unused,
    at its init: kept so that switching between softmax and a ranking loss keeps the checkpoint layout.
    """

    image: Mapping[str, Any]  # ViT kwargs
    text: Mapping[str, Any]  # TextTransformer kwargs
    embed_dim: int = 512
    loss: str = "softmax"  # one of LOSSES
    margin: float = 0.2  # the ranking losses' hinge margin (in cosine similarity)
    logit_scale_init: Optional[float] = None  # default log(10) for sigmoid, else log(1/0.07)
    logit_scale_max: float = math.log(100.0)
    logit_bias_init: float = -10.0  # sigmoid only (SigLIP's b)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (layers.remat)
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the layers of both towers (params stacked under */encoder/layers)
    # LiT: a locked text tower gets no gradient (stop_gradient: no backward pass through it). Pair it with
    # `optimizer.freeze` so that weight decay leaves its parameters unchanged too.
    lock_text: bool = False
    # DeViSE: False maps images into the text tower's own (fixed) space, so the text embeds are the l2-normalised
    # pooled text features, with no text_projection; embed_dim must then equal the text width.
    project_text: bool = True

    def __post_init__(self) -> None:
        # Freeze the tower dicts so the Module stays hashable (jit static args, flax's module caching).
        object.__setattr__(self, "image", flax.core.FrozenDict(self.image))
        object.__setattr__(self, "text", flax.core.FrozenDict(self.text))
        super().__post_init__()

    def setup(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}; got {self.loss!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0; got {self.margin}")
        text_width = self.text.get("width", TextTransformer.width)
        if not self.project_text and self.embed_dim != text_width:
            raise ValueError(f"embed_dim={self.embed_dim} must equal text.width={text_width} with project_text=False")
        shared = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                      remat_policy=self.remat_policy, attention=self.attention, scan_layers=self.scan_layers)
        self.image_encoder = ViT(**{**dict(self.image), **shared})
        self.text_encoder = TextTransformer(**{**dict(self.text), **shared})
        proj = dict(features=self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=partitioned(layers.dense_init, ("embed", "joint")))
        self.image_projection = layers.Dense(**proj)
        if self.project_text:
            self.text_projection = layers.Dense(**proj)

        scale_init = self.logit_scale_init
        if scale_init is None:
            scale_init = math.log(10.0) if self.loss == "sigmoid" else math.log(1 / 0.07)
        self.logit_scale_param = self.param(
            "logit_scale", partitioned(nn.initializers.constant(scale_init), ()), (), jnp.float32)
        if self.loss == "sigmoid":
            self.logit_bias_param = self.param(
                "logit_bias", partitioned(nn.initializers.constant(self.logit_bias_init), ()), (), jnp.float32)

    def encode_image(self, image: Array, *, train: bool = False) -> Array:
        """image float [B, H, W, 3] -> unit-norm float32 embeds [B, embed_dim]."""
        pooled, _ = self.image_encoder(image, train=train)
        return l2_normalize(self.image_projection(pooled))

    def encode_text(self, text_ids: Array, text_mask: Array, *, train: bool = False) -> Array:
        """text_ids, text_mask int [B, L] -> unit-norm float32 embeds [B, embed_dim]."""
        pooled, _ = self.text_encoder(text_ids, text_mask, train=train and not self.lock_text)
        if self.lock_text:
            pooled = jax.lax.stop_gradient(pooled)
        return l2_normalize(self.text_projection(pooled) if self.project_text else pooled)

    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch -> {image_embeds, text_embeds, logit_scale, logit_bias, logits_per_image, logits_per_text}.

        logits_per_image [B_img, B_txt] = logit_scale * image_embeds @ text_embeds^T + logit_bias (bias 0 for
        softmax) and logits_per_text its transpose, as Hugging Face CLIPModel / SiglipModel name them. Under jit
        they cost nothing when unused (the contrastive losses compute their own).
        """
        for key in REQUIRED_KEYS:
            if key not in batch:
                raise KeyError(f"CLIP needs batch key {key!r}; got keys {sorted(batch)}")
        # Clamp before exp (as OpenCLIP clamps the exp'd scale at 100): keeps training stable at large scales.
        logit_scale = jnp.exp(jnp.minimum(self.logit_scale_param, self.logit_scale_max))
        logit_bias = self.logit_bias_param if self.loss == "sigmoid" else jnp.zeros((), jnp.float32)
        image_embeds = self.encode_image(batch["image"], train=train)
        text_embeds = self.encode_text(batch["text_ids"], batch["text_mask"], train=train)
        logits_per_text = logit_scale * jnp.einsum("td,id->ti", text_embeds, image_embeds) + logit_bias
        return {
            "image_embeds": image_embeds,
            "text_embeds": text_embeds,
            "logit_scale": logit_scale,
            "logit_bias": logit_bias,
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text,
        }
