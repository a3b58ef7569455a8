"""Vision Transformer image encoder (ViT / CLIP image tower)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import heads, layers
from mmjax.models.layers import Array, Dtype, partitioned


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision): a learned probe cross-attends to the tokens, then an MLP."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    ln_epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, N, D] -> [B, D]."""
        width = x.shape[-1]
        probe = self.param("probe", partitioned(layers.dense_init, (None, "embed")), (1, width), self.param_dtype)
        probe = jnp.broadcast_to(probe.astype(self.dtype)[None], (x.shape[0], 1, width))
        x = layers.MultiHeadAttention(
            num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention,
            name="attn")(probe, kv=x)
        y = layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln")(x)
        x = x + layers.MLP(
            self.mlp_dim, self.activation, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp"
        )(y)
        return x[:, 0]


class ViT(nn.Module):
    """ViT image encoder: patchify -> (+cls) -> +pos -> (ln_pre) -> Encoder -> LN -> pool.

    Returns `(pooled [B, D], tokens [B, N, D])`; tokens are all encoder outputs after the final LN (including the
    cls token first when `cls_token`), so fusion models can consume them directly.

    Parameters: patch_kernel [p, p, C, D], patch_bias [D] (patch_bias=True), cls [D] (with a cls token),
    mask_patch [D] (mask_token=True), pos_embedding [N, D], ln_pre (ln_pre=True), encoder/layer_{i} (encoder/layers
    with scan_layers), ln_post, map_head (pool="map").
    """

    patch_size: int = 16
    image_size: Optional[int] = None  # if set, inputs must be image_size x image_size (checked at call)
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: Optional[int] = None  # default 4 * width
    pool: str = "cls"  # "cls" | "gap" | "map"
    cls_token: Optional[bool] = None  # default: True iff pool == "cls"
    patch_bias: bool = True  # OpenAI CLIP's patch conv has no bias
    ln_pre: bool = False  # CLIP applies a LayerNorm before the transformer
    mask_token: bool = False  # a learned [MASK] patch that `patch_mask` puts in place of patches (MPP)
    norm: str = "pre"
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-6
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (layers.remat)
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the encoder's layers (params stacked under encoder/layers)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: Array, *, train: bool = False, patch_mask: Optional[Array] = None
                 ) -> tuple[Array, Array]:
        """image: float [B, H, W, C] -> (pooled [B, width], tokens [B, N, width]); patch_mask [B, patches] (1 =
        that patch's embedding is replaced by the learned [MASK] patch; needs mask_token=True)."""
        if self.pool not in ("cls", "gap", "map"):
            raise ValueError(f"pool must be one of 'cls', 'gap', 'map'; got {self.pool!r}")
        use_cls = self.pool == "cls" if self.cls_token is None else self.cls_token
        if self.pool == "cls" and not use_cls:
            raise ValueError("pool='cls' needs cls_token=True")
        if image.ndim != 4:
            raise ValueError(f"ViT expects images [B, H, W, C]; got shape {image.shape}")
        _, h, w, _ = image.shape
        p = self.patch_size
        if self.image_size is not None and (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"ViT built for {self.image_size}x{self.image_size} images; got {h}x{w}")
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}")
        mlp_dim = self.mlp_dim or 4 * self.width
        deterministic = not train

        # Parameters patch_kernel (HWIO, as the checkpoints' patch convs) and patch_bias.
        x = layers.patch_embedding(self, image, p, self.width, use_bias=self.patch_bias, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
        if self.mask_token:  # created whenever asked for, so `init` without a patch_mask makes it too
            mask_patch = self.param("mask_patch", partitioned(layers.embed_init, ("embed",)), (self.width,),
                                    self.param_dtype)
        if patch_mask is not None:
            if not self.mask_token:
                raise ValueError("patch_mask needs mask_token=True (the ViT owns the [MASK] patch)")
            if patch_mask.shape != x.shape[:2]:
                raise ValueError(f"patch_mask must be [B, patches] = {x.shape[:2]}; got {patch_mask.shape}")
            x = jnp.where(patch_mask[..., None] > 0, mask_patch.astype(self.dtype), x)

        if use_cls:
            cls = self.param("cls", partitioned(layers.embed_init, ("embed",)), (self.width,), self.param_dtype)
            cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
        n = x.shape[1]
        pos = self.param("pos_embedding", partitioned(layers.embed_init, ("length", "embed")), (n, self.width),
                         self.param_dtype)
        x = x + pos.astype(self.dtype)[None]
        if self.ln_pre:
            x = layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_pre")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = layers.constrain(x)

        x = layers.tower_encoder(self)(x, None, deterministic)
        tokens = layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_post")(x)
        tokens = layers.constrain(tokens)

        if self.pool == "cls":
            pooled = tokens[:, 0]
        elif self.pool == "gap":
            # Mean over patch tokens only; averaging in float32 keeps bf16 sums accurate.
            patch_tokens = tokens[:, 1:] if use_cls else tokens
            pooled = jnp.mean(patch_tokens.astype(jnp.float32), axis=1).astype(self.dtype)
        else:
            pooled = MAPHead(
                num_heads=self.heads,
                mlp_dim=mlp_dim,
                activation=self.activation,
                ln_epsilon=self.ln_epsilon,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                attention=self.attention,
                name="map_head",
            )(tokens)
        return layers.constrain(pooled, layers.POOLED_AXES), tokens


# Hugging Face ViTModel's structure; the `image` dict of ViTModel adds sizes (patch_size, image_size, width, ...).
HF_VIT_DEFAULTS: dict[str, Any] = dict(pool="cls", cls_token=True, patch_bias=True, ln_pre=False, norm="pre",
                                       ln_epsilon=1e-12)


class ViTModel(nn.Module):
    """ViT with Hugging Face ViTModel's outputs: `image_encoder` (ViT) -> {"last_hidden_state", "pooler_output"}.

    last_hidden_state is every token after the final LayerNorm (cls first); pooler_output is HF's
    tanh(Dense(cls token)). `dtype`, `param_dtype`, `remat`, `remat_policy`, `attention` and `scan_layers` override
    the same keys in `image`.
    `mmjax.convert.hf_vit` maps HF weights onto it.
    """

    image: Mapping[str, Any]  # ViT kwargs, over HF_VIT_DEFAULTS
    pooler: bool = True  # HF add_pooling_layer; False: no pooler params and no "pooler_output"
    pooler_dim: Optional[int] = None  # HF pooler_output_size; default: width
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the encoder's layers (params stacked under encoder/layers)

    def __post_init__(self) -> None:
        # Frozen so the Module stays hashable (jit static args, flax's module caching).
        object.__setattr__(self, "image", flax.core.FrozenDict(self.image))
        super().__post_init__()

    @nn.compact
    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch["image"]: float [B, H, W, C] (channels last; HF's pixel_values transposed)."""
        kwargs = {**HF_VIT_DEFAULTS, **dict(self.image), "dtype": self.dtype, "param_dtype": self.param_dtype,
                  "remat": self.remat, "remat_policy": self.remat_policy, "attention": self.attention,
                  "scan_layers": self.scan_layers}
        _, tokens = ViT(**kwargs, name="image_encoder")(batch["image"], train=train)
        out = {"last_hidden_state": tokens}
        if self.pooler:
            out["pooler_output"] = heads.pooler(tokens[:, 0], features=self.pooler_dim, dtype=self.dtype,
                                                param_dtype=self.param_dtype)
        return out
