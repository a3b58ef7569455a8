"""Dual encoder over any two towers of the registry, projected to a joint unit-norm space.

    speech <-> image   towers={"audio": {"kind": "audio", ...}, "image": {"kind": "vit", ...}}   (SpokenCOCO-style)
    speech <-> text    towers={"audio": {"kind": "audio", ...}, "text": {"kind": "text", ...}}   (CLAP-style)

`modalities` names the pair in order (a, b); outputs are `{a}_embeds` and `{b}_embeds` with the shared logit
scale (and bias for the sigmoid loss), so the contrastive task, retrieval and zero-shot evaluators treat any pair
alike. Image-text CLIP keeps its own file (configs/clip.py; its parameter names map to Hugging Face's CLIPModel).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.layers import Array, Dtype, partitioned
from mmjax.models.towers import tower_kind


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    """Unit-normalise the last axis in float32."""
    x = x.astype(jnp.float32)
    return x * jnp.reciprocal(jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps))


class DualEncoder(nn.Module):
    """Two registry towers + linear projections + a learnable temperature (softmax) or temperature and bias
    (sigmoid). Parameters: `{modality}_encoder`, `{modality}_projection` per tower, logit_scale (, logit_bias)."""

    towers: Mapping[str, Mapping[str, Any]]  # {modality: {"kind": KIND, **fields}}, exactly the two of `modalities`
    modalities: tuple[str, str] = ("audio", "image")
    embed_dim: int = 512
    loss: str = "softmax"  # "softmax" | "sigmoid"
    logit_scale_init: Optional[float] = None  # default log(1/0.07) for softmax, log(10) for sigmoid
    logit_scale_max: float = math.log(100.0)
    logit_bias_init: float = -10.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the towers' encoder layers (params stacked under */encoder/layers)

    def __post_init__(self) -> None:
        object.__setattr__(self, "towers", flax.core.FrozenDict(self.towers))
        object.__setattr__(self, "modalities", tuple(self.modalities))
        super().__post_init__()

    def setup(self) -> None:
        if self.loss not in ("softmax", "sigmoid"):
            raise ValueError(f"loss must be 'softmax' or 'sigmoid'; got {self.loss!r}")
        if len(self.modalities) != 2 or len(set(self.modalities)) != 2 or set(self.modalities) != set(self.towers):
            raise ValueError(f"DualEncoder: modalities {self.modalities} must be two distinct names, the keys of "
                             f"towers ({sorted(self.towers)})")
        shared = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                      remat_policy=self.remat_policy, attention=self.attention, scan_layers=self.scan_layers)
        proj = dict(features=self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=partitioned(layers.dense_init, ("embed", "joint")))
        encoders, projections, kinds = {}, {}, {}
        for modality in self.modalities:
            fields = dict(self.towers[modality])
            kinds[modality] = tower_kind(fields.pop("kind", None), f"model.towers.{modality}")
            encoders[modality] = kinds[modality].module(**{**fields, **shared}, name=f"{modality}_encoder")
            projections[modality] = layers.Dense(**proj, name=f"{modality}_projection")
        self.encoders, self.projections, self.kinds = encoders, projections, kinds
        scale_init = self.logit_scale_init
        if scale_init is None:
            scale_init = math.log(1 / 0.07) if self.loss == "softmax" else math.log(10.0)
        self.logit_scale_param = self.param(
            "logit_scale", partitioned(nn.initializers.constant(scale_init), ()), (), jnp.float32)
        if self.loss == "sigmoid":
            self.logit_bias_param = self.param(
                "logit_bias", partitioned(nn.initializers.constant(self.logit_bias_init), ()), (), jnp.float32)

    def inputs(self, modality: str) -> tuple[str, ...]:
        """The batch keys the tower of `modality` reads."""
        return tower_kind(dict(self.towers[modality])["kind"]).inputs

    def embed(self, modality: str, batch: Mapping[str, Array], *, train: bool = False) -> Array:
        """Unit-norm float32 embeddings [B, embed_dim] of one modality's inputs in `batch`."""
        if modality not in self.modalities:
            raise ValueError(f"this DualEncoder embeds {self.modalities}, not {modality!r}")
        missing = [k for k in self.inputs(modality) if k not in batch]
        if missing:
            raise KeyError(f"DualEncoder's {modality} tower needs batch keys {missing}; got {sorted(batch)}")
        if self.kinds[modality].pool is None:
            raise ValueError(f"DualEncoder: the {modality} tower's kind has no pooled output (TowerKind.pool)")
        pooled = self.kinds[modality].pool(self.encoders[modality], batch, train)
        return l2_normalize(self.projections[modality](pooled))

    def encode_audio(self, audio: Array, audio_length: Array, *, train: bool = False) -> Array:
        """audio [B, S], audio_length [B] -> unit-norm embeds [B, embed_dim]."""
        return self.embed("audio", {"audio": audio, "audio_length": audio_length}, train=train)

    def encode_image(self, image: Array, *, train: bool = False) -> Array:
        """image [B, H, W, 3] -> unit-norm embeds [B, embed_dim]."""
        return self.embed("image", {"image": image}, train=train)

    def encode_text(self, text_ids: Array, text_mask: Array, *, train: bool = False) -> Array:
        """text_ids, text_mask [B, L] -> unit-norm embeds [B, embed_dim]."""
        return self.embed("text", {"text_ids": text_ids, "text_mask": text_mask}, train=train)

    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch -> {a_embeds, b_embeds, logit_scale, logit_bias, logits} (logits [B_a, B_b], for inspection)."""
        a, b = self.modalities
        za, zb = self.embed(a, batch, train=train), self.embed(b, batch, train=train)
        logit_scale = jnp.exp(jnp.minimum(self.logit_scale_param, self.logit_scale_max))
        logit_bias = self.logit_bias_param if self.loss == "sigmoid" else jnp.zeros((), jnp.float32)
        return {f"{a}_embeds": za, f"{b}_embeds": zb, "logit_scale": logit_scale, "logit_bias": logit_bias,
                "logits": logit_scale * jnp.einsum("id,jd->ij", za, zb) + logit_bias}
