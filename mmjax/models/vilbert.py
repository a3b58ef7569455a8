"""ViLBERT (Lu et al. 2019): two transformer streams, text and image regions, that meet only in co-attention.

    text:   word + position + token-type -> LN (BERT embeddings) -> text_depth post-LN Blocks
    image:  regions (features with region_feature_mask rows zeroed; boxes [ymin, xmin, ymax, xmax] in [0, 1])
            -> [IMG] token first: feature = masked mean of the (masked) real region features, box = whole image
            -> LN(Dense(feature) + Dense(5-d location [ymin, xmin, ymax, xmax, area])) -> image_depth Blocks
    co_depth x (Co-TRM then TRM), both streams at once:
            text'  = CrossAttentionLayer(queries text,  keys/values image)    (co-attention + FFN, post-LN)
            image' = CrossAttentionLayer(queries image, keys/values text)
            text, image = Block(text'), Block(image')                          (per-stream self-attention)
    pooled = relu(Dense(text token 0)) * relu(Dense(image token 0 = [IMG]))   (element-wise product, as the
             reference code's poolers)
    heads:  ITM Dense(2)(pooled); MLM (tied decoder) on text tokens; MRC Dense(C) on region tokens

Only co-attention mixes the streams: with co_depth=0 the text tokens never see the image. Padding is a key mask
(`layers.padding_bias`) in every attention; padded text ids and padded regions' features and boxes are zeroed
before embedding, so nothing written there (even inf/NaN) reaches any output. The image stream has 1 + R tokens;
`image_tokens` returns the R region tokens (without [IMG]), aligned with `region_feats`.

Simplifications and departures from the reference code (vilbert_beta / vilbert-multi-task), so its weights do not
map one-to-one:
  * one `width` for both streams (the paper: 768 text, 1024 image, 1024 co-attention with 8 heads);
  * the reference location order is (xmin, ymin, xmax, ymax, area); ours follows our boxes (ymin first);
  * the reference loader averages the [IMG] feature *before* masking regions for masked region modelling, which
    leaks the masked features through [IMG]; here the mean is taken after masking (masked regions count as zeros).

Parameters:
    text_embeddings/{word_embedding, pos_embedding, type_embedding, ln}   (layers.TextEmbeddings)
    region_embedding, location_embedding, ln_image                        (region embeddings)
    text_encoder/layer_{i}, image_encoder/layer_{i} (image_depth > 0)
    co_{i}_text, co_{i}_image (layers.CrossAttentionLayer), self_{i}_text, self_{i}_image (layers.Block)
    text_pooler, image_pooler
    heads: itm_head, mlm_transform + mlm_bias (decoder tied to text_embeddings/word_embedding),
           mrc_transform + mrc_decoder
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import heads, layers
from mmjax.models.layers import Array, Block, CrossAttentionLayer, Dtype, partitioned

REQUIRED_KEYS = ("text_ids", "text_mask", "region_feats", "region_boxes", "region_mask")


def location_features(boxes: Array) -> Array:
    """Boxes [..., 4] (ymin, xmin, ymax, xmax), normalised -> ViLBERT's 5-d location [..., 5] (+ box area)."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return jnp.concatenate([boxes, area[..., None]], axis=-1)


class ViLBERT(nn.Module):
    """ViLBERT two-stream encoder with co-attentional layers and its pretraining heads (MLM, ITM, MRC).

    `__call__(batch)` reads `text_ids` / `text_mask` [B, L] (1 = real), optional `text_type_ids` [B, L],
    `region_feats` [B, R, region_feat_dim], `region_boxes` [B, R, 4] (normalised ymin, xmin, ymax, xmax),
    `region_mask` [B, R] (1 = real) and optional `region_feature_mask` [B, R] (1 = replace that region's feature
    by zeros before embedding, for masked region classification; its box is kept).
    """

    vocab_size: int = 30522
    max_len: int = 40  # text positions
    region_feat_dim: int = 2048  # Faster R-CNN (bottom-up attention) region features
    num_region_classes: int = 1601  # Visual Genome detector classes (+ background): the MRC targets
    width: int = 768  # both streams (the paper: 768 text, 1024 image)
    text_depth: int = 6  # text-only Blocks before the first co-attentional layer
    image_depth: int = 0  # image-only Blocks before the first co-attentional layer
    co_depth: int = 6  # co-attentional layers (Co-TRM + TRM per stream)
    heads: int = 12
    mlp_dim: Optional[int] = None  # default 4 * width
    activation: str = "gelu"  # exact erf GELU, as BERT
    ln_epsilon: float = 1e-12
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    type_vocab_size: int = 2
    mlm_head: bool = True
    itm_head: bool = True
    vqa_labels: Optional[int] = None  # an answer classifier (VQA) on the pooled output with this many answers
    mrc_head: bool = True
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (layers.remat)
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _dense(self, features: int, names: tuple, name: str) -> layers.Dense:
        """layers.Dense with kernel axes `names` and bias axes (names[1],)."""
        return layers.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=partitioned(layers.dense_init, names),
                            bias_init=partitioned(layers.zeros_init, (names[1],)), name=name)

    def _ln(self, name: str) -> nn.LayerNorm:
        """A logically partitioned LayerNorm with this model's epsilon."""
        return layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name=name)

    def _layer_kwargs(self) -> dict:
        """Fields shared by every Block and CrossAttentionLayer (all post-LN, as BERT/ViLBERT)."""
        return dict(num_heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width, norm="post",
                    activation=self.activation, dropout_rate=self.dropout_rate,
                    attention_dropout_rate=self.attention_dropout_rate, ln_epsilon=self.ln_epsilon,
                    dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention)

    def _validate(self, batch: Mapping[str, Array]) -> dict[str, Array]:
        """Checks keys and shapes; returns the inputs as arrays, masks as int32 0/1, optional ones filled in."""
        for key in REQUIRED_KEYS:
            if key not in batch:
                raise KeyError(f"ViLBERT needs batch key {key!r}; got keys {sorted(batch)}")
        x = {k: jnp.asarray(batch[k]) for k in REQUIRED_KEYS}
        if x["text_ids"].ndim != 2:
            raise ValueError(f"text_ids must be [B, L]; got shape {x['text_ids'].shape}")
        b, length = x["text_ids"].shape
        if length > self.max_len:
            raise ValueError(f"text length {length} (text_ids shape {x['text_ids'].shape}) exceeds max_len "
                             f"{self.max_len}")
        feats = x["region_feats"]
        if feats.ndim != 3 or feats.shape[0] != b or feats.shape[2] != self.region_feat_dim:
            raise ValueError(f"region_feats must be [B, R, region_feat_dim] = [{b}, R, {self.region_feat_dim}]; "
                             f"got shape {feats.shape}")
        r = feats.shape[1]
        x["text_type_ids"] = (jnp.zeros((b, length), jnp.int32) if batch.get("text_type_ids") is None
                              else jnp.asarray(batch["text_type_ids"]))
        x["region_feature_mask"] = (jnp.zeros((b, r), jnp.int32) if batch.get("region_feature_mask") is None
                                    else jnp.asarray(batch["region_feature_mask"]))
        expected = {"text_mask": (b, length), "text_type_ids": (b, length), "region_boxes": (b, r, 4),
                    "region_mask": (b, r), "region_feature_mask": (b, r)}
        for key, shape in expected.items():
            if x[key].shape != shape:
                raise ValueError(f"{key} must have shape {shape} (from text_ids {x['text_ids'].shape} and "
                                 f"region_feats {feats.shape}); got {x[key].shape}")
        for key in ("text_mask", "region_mask", "region_feature_mask"):
            x[key] = (x[key] > 0).astype(jnp.int32)
        return x

    def _embed_image(self, feats: Array, boxes: Array, region_mask: Array, feature_mask: Array
                     ) -> tuple[Array, Array]:
        """Region embeddings with the [IMG] token first -> (x [B, 1+R, D], mask [B, 1+R])."""
        b, r, _ = feats.shape
        real = region_mask > 0
        # Masked-out features become zeros *before* the [IMG] mean; padded regions are zeroed so that garbage
        # there never reaches the mean or the (masked) keys.
        feats = jnp.where((real & (feature_mask == 0))[..., None], feats.astype(jnp.float32), 0.0)
        boxes = jnp.where(real[..., None], boxes.astype(jnp.float32), 0.0)
        # [IMG]: mean over the real regions (float32 sum), box = the whole image.
        img_feat = layers.masked_mean(feats, region_mask)
        img_box = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32), (b, 4))
        feats = jnp.concatenate([img_feat[:, None], feats], axis=1).astype(self.dtype)
        loc = location_features(jnp.concatenate([img_box[:, None], boxes], axis=1)).astype(self.dtype)

        # Input dims unnamed: 2048 detector channels / 5 location numbers are never sharded.
        x = self._ln("ln_image")(self._dense(self.width, (None, "embed"), "region_embedding")(feats)
                                 + self._dense(self.width, (None, "embed"), "location_embedding")(loc))
        mask = jnp.concatenate([jnp.ones((b, 1), jnp.int32), region_mask], axis=1)
        return x, mask

    @nn.compact
    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch -> {text_tokens [B, L, D], image_tokens [B, R, D], image_mask [B, R], pooled [B, D], and with
        heads on: itm_logits [B, 2], mlm_logits [B, L, V], mrc_logits [B, R, C]}.

        Head outputs are float32 (the losses' softmax runs in float32); the rest is in `dtype`. Padded output
        positions hold unspecified values.
        """
        x = self._validate(batch)
        deterministic = not train
        drop = functools.partial(nn.Dropout(self.dropout_rate), deterministic=deterministic)
        kw = self._layer_kwargs()

        # BERT embeddings (padded ids zeroed: see layers.TextEmbeddings); the word table is also the tied MLM
        # decoder's weight.
        text, word_table = layers.TextEmbeddings(
            vocab_size=self.vocab_size, max_len=self.max_len, width=self.width, type_vocab_size=self.type_vocab_size,
            ln_epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
            name="text_embeddings")(x["text_ids"], x["text_type_ids"], x["text_mask"])
        image, image_mask = self._embed_image(x["region_feats"], x["region_boxes"], x["region_mask"],
                                              x["region_feature_mask"])
        # Sown so tests and analyses can see each stream's input (mutable=["intermediates"]; free otherwise), as
        # one "embeddings" entry like ViLT's and UNITER's ("text_embeddings" names the embedding submodule).
        self.sow("intermediates", "embeddings", {"text": text, "image": image})
        text, image = layers.constrain(drop(text)), layers.constrain(drop(image))
        text_bias, image_bias = layers.padding_bias(x["text_mask"]), layers.padding_bias(image_mask)

        def encoder(depth: int, name: str) -> layers.Encoder:
            """A single-stream stack of post-LN Blocks."""
            return layers.Encoder(depth=depth, remat=self.remat, remat_policy=self.remat_policy, **kw, name=name)

        text = encoder(self.text_depth, "text_encoder")(text, text_bias, deterministic)
        if self.image_depth > 0:
            image = encoder(self.image_depth, "image_encoder")(image, image_bias, deterministic)

        # static_argnums count `self` as 0: `deterministic` (a Python bool that picks code paths) stays static.
        cross_cls = layers.remat(CrossAttentionLayer, self.remat, self.remat_policy, static_argnums=(4,))
        block_cls = layers.remat(Block, self.remat, self.remat_policy, static_argnums=(3,))
        for i in range(self.co_depth):
            # Both directions read this layer's inputs, not each other's outputs: the update is simultaneous.
            new_text = cross_cls(**kw, name=f"co_{i}_text")(text, image, image_bias, deterministic)
            new_image = cross_cls(**kw, name=f"co_{i}_image")(image, text, text_bias, deterministic)
            text = block_cls(**kw, name=f"self_{i}_text")(new_text, text_bias, deterministic)
            image = block_cls(**kw, name=f"self_{i}_image")(new_image, image_bias, deterministic)
        text, image = layers.constrain(text), layers.constrain(image)

        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        text_pooled = heads.pooler(text[:, 0], name="text_pooler", activation=nn.relu, **dt)
        image_pooled = heads.pooler(image[:, 0], name="image_pooler", activation=nn.relu, **dt)
        pooled = layers.constrain(text_pooled * image_pooled, layers.POOLED_AXES)
        regions = image[:, 1:]
        out = {"text_tokens": text, "image_tokens": regions, "image_mask": x["region_mask"], "pooled": pooled}

        transform = dict(activation=self.activation, ln_epsilon=self.ln_epsilon, **dt)
        if self.itm_head:
            out["itm_logits"] = heads.itm_logits(pooled, **dt)
        if self.vqa_labels is not None:
            out["vqa_logits"] = heads.AnswerClassifier(self.vqa_labels, **dt, name="vqa_head")(pooled).astype(
                jnp.float32)
        if self.mlm_head:
            out["mlm_logits"] = heads.tied_mlm_logits(self, text, word_table, **transform)
        if self.mrc_head:
            # Masked region classification: predict the detector's class distribution of masked regions.
            out["mrc_logits"] = heads.token_prediction(regions, self.num_region_classes, prefix="mrc", **transform)
        return out


__all__ = ["REQUIRED_KEYS", "ViLBERT", "location_features"]
