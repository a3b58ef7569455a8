"""CoCa (Yu et al., 2022): one image encoder and one text decoder trained with a contrastive and a captioning loss
in the same step.

    image -> ViT -> attention-pooled embedding (contrastive)      and its tokens (the captioner's memory)
    text  -> unimodal causal decoder (no cross-attention) -> embedding at the last real token (contrastive)
          -> multimodal decoder (causal self-attention + cross-attention to the image tokens) -> next-token logits

The unimodal decoder is causal, so one pass over [CLS] words [SEP] serves both losses: the [SEP] position sees the
whole caption (CoCa appends a [CLS] token for this; the end token plays its part here) and no earlier position
sees a later one. `encode_image` / `encode_text` give unit embeddings as CLIP's do, so the zero-shot and retrieval
evaluators work unchanged; `image_memory` / `decode_text` are the captioner's interface (mmjax/decoding.py).
"""
from __future__ import annotations

import math
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


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    """Unit-normalise the last axis in float32."""
    x = x.astype(jnp.float32)
    return x * jnp.reciprocal(jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps))


class CoCa(nn.Module):
    """Contrastive captioner. `dtype`, `param_dtype`, `remat`, `remat_policy`, `attention` override the towers' own
    (and the multimodal decoder's); `scan_layers` the image tower's.

    Parameters: image_encoder (ViT, pool="map" by default: its MAP head is CoCa's one-query attentional pooler),
    image_projection, text_decoder (unimodal TextDecoder), text_projection, memory_projection (image and text
    widths differ), multimodal_decoder (layers.Decoder with cross-attention), ln_multimodal, lm_bias / lm_head,
    logit_scale.
    """

    image: Mapping[str, Any]  # ViT kwargs
    text: Mapping[str, Any]  # TextDecoder kwargs of the unimodal decoder (cross_attention / lm_head forced off)
    multimodal_depth: int = 6
    multimodal_heads: Optional[int] = None  # default: the text decoder's heads
    embed_dim: int = 512
    tie_embeddings: bool = True  # the captioning head reads the unimodal decoder's word table
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
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
        self.image_encoder = ViT(**{"pool": "map", **dict(self.image), **shared, "scan_layers": self.scan_layers})
        self.text_decoder = TextDecoder(**{**dict(self.text), **shared, "cross_attention": False,
                                           "lm_head": False, "decode": self.decode})
        width = field_value(TextDecoder, self.text, "width")
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        proj = dict(features=self.embed_dim, use_bias=False, kernel_init=partitioned(layers.dense_init,
                                                                                      ("embed", "joint")), **dense)
        self.image_projection = layers.Dense(**proj)
        self.text_projection = layers.Dense(**proj)
        self.memory_projection: Optional[nn.Module] = None
        if field_value(ViT, self.image, "width") != width:
            self.memory_projection = layers.Dense(width, kernel_init=partitioned(layers.dense_init,
                                                                                 ("embed", "mlp")), **dense)
        heads_ = self.multimodal_heads or field_value(TextDecoder, self.text, "heads")
        self.multimodal_decoder = layers.Decoder(
            depth=self.multimodal_depth, num_heads=heads_,
            mlp_dim=field_value(TextDecoder, self.text, "mlp_dim") or 4 * width, cross_attention=True,
            norm="pre", activation=field_value(TextDecoder, self.text, "activation"),
            dropout_rate=field_value(TextDecoder, self.text, "dropout_rate"),
            attention_dropout_rate=field_value(TextDecoder, self.text, "attention_dropout_rate"),
            ln_epsilon=field_value(TextDecoder, self.text, "ln_epsilon"), remat=self.remat,
            remat_policy=self.remat_policy, decode=self.decode, attention=self.attention, **dense)
        self.ln_multimodal = layers.layer_norm(field_value(TextDecoder, self.text, "ln_epsilon"), self.dtype,
                                               self.param_dtype)
        vocab = field_value(TextDecoder, self.text, "vocab_size")
        if self.tie_embeddings:
            self.lm_bias = self.param("lm_bias", partitioned(layers.zeros_init, ("vocab",)), (vocab,),
                                      self.param_dtype)
        else:
            self.lm_head = layers.Dense(vocab, kernel_init=partitioned(layers.dense_init, ("embed", "vocab")),
                                        bias_init=partitioned(layers.zeros_init, ("vocab",)), **dense)
        self.logit_scale_param = self.param("logit_scale", partitioned(
            nn.initializers.constant(self.logit_scale_init), ()), (), jnp.float32)

    # ------------------------------------------------------------------------------------------ contrastive side

    def _image(self, image: Array, train: bool) -> tuple[Array, Array]:
        pooled, tokens = self.image_encoder(image, train=train)
        return l2_normalize(self.image_projection(pooled)), tokens

    def _text_tokens(self, text_ids: Array, text_mask: Optional[Array], train: bool) -> dict[str, Array]:
        return self.text_decoder(text_ids, text_mask, train=train)

    def _text_embedding(self, tokens: Array, text_mask: Array) -> Array:
        last = jnp.maximum(jnp.sum(jnp.asarray(text_mask) > 0, axis=-1) - 1, 0)
        pooled = jnp.take_along_axis(tokens, last[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return l2_normalize(self.text_projection(pooled))

    def encode_image(self, image: Array, *, train: bool = False) -> Array:
        """image [B, H, W, 3] -> unit-norm float32 embeds [B, embed_dim]."""
        return self._image(image, train)[0]

    def encode_text(self, text_ids: Array, text_mask: Array, *, train: bool = False) -> Array:
        """text_ids, text_mask [B, L] -> unit-norm float32 embeds [B, embed_dim] (at the last real token)."""
        return self._text_embedding(self._text_tokens(text_ids, text_mask, train)["tokens"], text_mask)

    # ------------------------------------------------------------------------------------------- captioning side

    def image_memory(self, image: Array, *, train: bool = False) -> tuple[Array, Array]:
        """image -> (memory [B, N, text width]: the image tokens, mask int32 [B, N] all ones)."""
        return self._memory(self._image(image, train)[1])

    def _memory(self, tokens: Array) -> tuple[Array, Array]:
        if self.memory_projection is not None:
            tokens = self.memory_projection(tokens)
        return tokens, jnp.ones(tokens.shape[:2], jnp.int32)

    def _caption_logits(self, text: dict[str, Array], text_mask: Optional[Array], memory: Array,
                        memory_mask: Array, train: bool) -> Array:
        tokens = text["tokens"]
        bias = None
        if not self.decode:
            bias = layers.causal_bias(tokens.shape[1])
            if text_mask is not None:
                bias = bias + layers.padding_bias(text_mask)
        x = self.multimodal_decoder(tokens, bias, memory, layers.padding_bias(memory_mask), not train)
        x = self.ln_multimodal(x)
        if not self.tie_embeddings:
            return self.lm_head(x).astype(jnp.float32)
        logits = layers.matmul_last(x, text["word_table"].astype(self.dtype).T) + self.lm_bias.astype(self.dtype)
        return logits.astype(jnp.float32)

    def decode_text(self, ids: Array, memory: Array, memory_mask: Array, text_mask: Optional[Array] = None, *,
                    train: bool = False) -> Array:
        """Next-token logits float32 [B, T, V] for ids [B, T] given the image memory."""
        return self._caption_logits(self._text_tokens(ids, text_mask, train), text_mask, memory, memory_mask,
                                    train)

    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch -> {image_embeds, text_embeds, logit_scale, lm_logits [B, L, V]} (lm_logits[:, t] predicts
        text_ids[:, t + 1])."""
        for key in REQUIRED_KEYS:
            if key not in batch:
                raise KeyError(f"CoCa needs batch key {key!r}; got keys {sorted(batch)}")
        image_embeds, image_tokens = self._image(batch["image"], train)
        memory, memory_mask = self._memory(image_tokens)
        text = self._text_tokens(batch["text_ids"], batch["text_mask"], train)
        return {
            "image_embeds": image_embeds,
            "text_embeds": self._text_embedding(text["tokens"], batch["text_mask"]),
            "logit_scale": jnp.exp(jnp.minimum(self.logit_scale_param, self.logit_scale_max)),
            "lm_logits": self._caption_logits(text, batch["text_mask"], memory, memory_mask, train),
        }
