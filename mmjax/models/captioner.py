"""Encoder-decoder image captioner: ViT image tokens -> a causal text decoder that cross-attends to them.

    out = Captioner(image=dict(...), text=dict(...)).apply(variables, batch)    # {"lm_logits": [B, L, V]}

lm_logits[:, t] predicts text_ids[:, t + 1] (teacher forcing; the captioning task shifts the targets). For
generation (mmjax/decoding.py): `image_memory(image)` once, then `decode_text(ids, memory, memory_mask)` on a
clone with decode=True, one token at a time on the key/value cache.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.layers import Array, Dtype, partitioned
from mmjax.models.text_decoder import TextDecoder
from mmjax.models.towers import field_value
from mmjax.models.vit import ViT

REQUIRED_KEYS = ("image", "text_ids", "text_mask")


class Captioner(nn.Module):
    """ViT encoder + TextDecoder (cross-attention in every block). `dtype`, `param_dtype`, `remat`, `remat_policy`
    and `attention` override the towers' own; `scan_layers` the image tower's.

    Parameters: image_encoder (ViT), memory_projection (when the image and text widths differ), text_decoder.
    """

    image: Mapping[str, Any]  # ViT kwargs
    text: Mapping[str, Any]  # TextDecoder kwargs
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    decode: bool = False
    attention: str = "einsum"  # layers.MultiHeadAttention.attention, for the image tower and the decoder(s)
    scan_layers: bool = False  # nn.scan over the image tower's encoder layers (decoders stay unrolled)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", flax.core.FrozenDict(self.image))
        object.__setattr__(self, "text", flax.core.FrozenDict(self.text))
        super().__post_init__()

    def setup(self) -> None:
        shared = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                      remat_policy=self.remat_policy, attention=self.attention)
        self.image_encoder = ViT(**{**dict(self.image), **shared, "scan_layers": self.scan_layers})
        self.text_decoder = TextDecoder(**{**dict(self.text), **shared, "cross_attention": True,
                                           "decode": self.decode})
        width = field_value(TextDecoder, self.text, "width")
        self.memory_projection: Optional[nn.Module] = None
        if field_value(ViT, self.image, "width") != width:
            self.memory_projection = layers.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                                                  kernel_init=partitioned(layers.dense_init, ("embed", "mlp")))

    def image_memory(self, image: Array, *, train: bool = False) -> tuple[Array, Array]:
        """image [B, H, W, 3] -> (memory [B, N, text width]: every image token, mask int32 [B, N] all ones)."""
        _, tokens = self.image_encoder(image, train=train)
        if self.memory_projection is not None:
            tokens = self.memory_projection(tokens)
        return tokens, jnp.ones(tokens.shape[:2], jnp.int32)

    def decode_text(self, ids: Array, memory: Array, memory_mask: Array, text_mask: Optional[Array] = None, *,
                    train: bool = False) -> Array:
        """Next-token logits float32 [B, T, V] for ids [B, T] given the image memory."""
        return self.text_decoder(ids, text_mask, memory, memory_mask, train=train)["logits"]

    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch (image, text_ids, text_mask) -> {"lm_logits": [B, L, V]}."""
        for key in REQUIRED_KEYS:
            if key not in batch:
                raise KeyError(f"Captioner needs batch key {key!r}; got keys {sorted(batch)}")
        memory, memory_mask = self.image_memory(batch["image"], train=train)
        return {"lm_logits": self.decode_text(batch["text_ids"], memory, memory_mask, batch["text_mask"],
                                              train=train)}
