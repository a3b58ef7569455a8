"""UNITER (Chen et al. 2020): one transformer over BERT word embeddings and detector region features.

    text:    word + position + token-type (text_type_ids, default 0) -> LN                   (BERT embeddings)
    regions: img = LN(Dense(feat)) (masked regions' features zeroed first, boxes kept);
             pos = LN(Dense([ymin, xmin, ymax, xmax, h, w, h*w]));  LN(img + pos + type row 1)
    concat [text; regions] -> Encoder (post-LN BERT blocks; a final LN only when norm="pre")
    pooled = tanh(Dense(token 0)) (the text [CLS]); heads: MLM (tied decoder), ITM (2-way),
    MRFR (region-feature regression), MRC (region-class logits)

As in UNITER, text token types and the region modality share one type table: regions take row 1. The layout and
defaults follow the UNITER-base release (BERT-base encoder, eps 1e-12, exact GELU, 2048-d Faster R-CNN features,
1601 Visual Genome classes); the MRFR decoder is a free Dense here (UNITER ties it to the feature projection).

Parameters:
    text_embeddings/{word_embedding, pos_embedding, type_embedding, ln}   (layers.TextEmbeddings; type_embedding is
                                                                          the shared type table, regions row 1)
    region_feat_proj, ln_region_feat, region_pos_proj, ln_region_pos, ln_region      (region embeddings)
    encoder/layer_{i}, ln_final (norm="pre"), pooler
    heads: mlm_transform + mlm_bias (decoder tied to text_embeddings/word_embedding), itm_head,
           mrfr_transform + mrfr_decoder, mrc_transform + mrc_decoder
"""
from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import heads, layers
from mmjax.models.layers import Array, Dtype, partitioned

REQUIRED_KEYS = ("text_ids", "text_mask", "region_feats", "region_boxes", "region_mask")


def box_geometry(boxes: Array) -> Array:
    """Normalised boxes [..., 4] (ymin, xmin, ymax, xmax) -> float32 geometry [..., 7] = boxes + (h, w, h*w)."""
    boxes = boxes.astype(jnp.float32)
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    return jnp.concatenate([boxes, jnp.stack([h, w, h * w], axis=-1)], axis=-1)


class UNITER(nn.Module):
    """UNiversal Image-TExt Representation: single-stream encoder over [text tokens; region tokens].

    `__call__(batch)` reads `text_ids` / `text_mask` [B, L] (1 = real), optional `text_type_ids` [B, L],
    `region_feats` [B, R, region_feat_dim], `region_boxes` [B, R, 4] (normalised ymin, xmin, ymax, xmax),
    `region_mask` [B, R] (1 = real region) and optional `region_feature_mask` [B, R] (1 = that region's features
    are replaced by zeros before the embedding, for masked region modelling; its box is kept).
    """

    vocab_size: int = 30522
    max_len: int = 40  # text positions
    region_feat_dim: int = 2048  # Faster R-CNN (bottom-up attention) pooled features
    num_region_classes: int = 1601  # Visual Genome 1600 object classes + background (MRC targets)
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: Optional[int] = None  # default 4 * width
    norm: str = "post"  # BERT/UNITER blocks; "pre" adds a final LayerNorm
    activation: str = "gelu"  # exact erf GELU, as BERT
    ln_epsilon: float = 1e-12
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    type_vocab_size: int = 2  # shared type table: text token types, and row 1 for regions
    mlm_head: bool = True
    itm_head: bool = True
    vqa_labels: Optional[int] = None  # an answer classifier (VQA) on the pooled output with this many answers
    mrfr_head: bool = True
    mrc_head: bool = True
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (layers.remat)
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the encoder's layers (params stacked under encoder/layers)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    image_cls_first = False  # image_tokens are the regions only (no image [CLS] for word-region alignment to skip)

    def _ln(self, name: str) -> nn.LayerNorm:
        """The model's LayerNorm (eps ln_epsilon, ("embed",) params)."""
        return layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name=name)

    def _dense(self, features: int, names: tuple, name: str) -> layers.Dense:
        """layers.Dense with kernel axes `names` and bias axes names[1:]."""
        return layers.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=partitioned(layers.dense_init, names),
                            bias_init=partitioned(layers.zeros_init, names[1:]), name=name)

    def _check_batch(self, batch: Mapping[str, Array]) -> None:
        """Raises KeyError / ValueError (naming the key and shape) for a malformed batch."""
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        if self.type_vocab_size < 2:
            raise ValueError(f"type_vocab_size must be >= 2 (regions use type 1), got {self.type_vocab_size}")
        layers.check_text_region_batch("UNITER", batch, REQUIRED_KEYS, max_len=self.max_len,
                                       region_feat_dim=self.region_feat_dim)

    def _embed_regions(self, feats: Array, boxes: Array, feature_mask: Optional[Array], region_type: Array) -> Array:
        """Region embeddings LN(LN(Dense(feat)) + LN(Dense(geometry)) + region_type) -> [B, R, D]."""
        if feature_mask is not None:
            # UNITER's masked region modelling zeroes the masked regions' features; their geometry stays.
            feats = jnp.where(feature_mask[..., None] > 0, jnp.zeros((), feats.dtype), feats)
        img = self._ln("ln_region_feat")(self._dense(self.width, (None, "embed"), "region_feat_proj")(feats))
        pos = self._ln("ln_region_pos")(self._dense(self.width, (None, "embed"), "region_pos_proj")(
            box_geometry(boxes)))
        return self._ln("ln_region")(img + pos + region_type)

    @nn.compact
    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch -> {text_tokens [B, L, D], image_tokens [B, R, D], image_mask [B, R], pooled [B, D], and with
        heads on: itm_logits [B, 2], mlm_logits [B, L, V], mrfr_pred [B, R, F], mrc_logits [B, R, C]}.

        Head outputs are float32 (the losses' softmax / regression run in float32); the rest is in `dtype`.
        """
        self._check_batch(batch)
        deterministic = not train
        text_ids, text_mask = batch["text_ids"], batch["text_mask"]
        region_mask = jnp.asarray(batch["region_mask"]).astype(jnp.int32)
        length = text_ids.shape[1]

        # BERT embeddings; the word table is also the tied MLM decoder's weight, and the regions share the type
        # table (row 1), as UNITER's image embeddings take the text embeddings' token_type_embeddings.
        text_embeddings = layers.TextEmbeddings(
            vocab_size=self.vocab_size, max_len=self.max_len, width=self.width, type_vocab_size=self.type_vocab_size,
            ln_epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="text_embeddings")
        text, word_table = text_embeddings(text_ids, batch.get("text_type_ids"))
        regions = self._embed_regions(batch["region_feats"], batch["region_boxes"],
                                      batch.get("region_feature_mask"), text_embeddings.type_rows(1))
        x = jnp.concatenate([text, regions], axis=1)
        # Sown so tests and analyses can see the encoder input (mutable=["intermediates"]; free otherwise).
        self.sow("intermediates", "embeddings", x)
        x = layers.constrain(nn.Dropout(self.dropout_rate)(x, deterministic=deterministic))

        mask = jnp.concatenate([text_mask.astype(jnp.int32), region_mask], axis=1)
        x = layers.tower_encoder(self)(x, layers.padding_bias(mask), deterministic)
        if self.norm == "pre":  # post-LN blocks already end in a LayerNorm
            x = self._ln("ln_final")(x)
        x = layers.constrain(x)
        text_tokens, image_tokens = x[:, :length], x[:, length:]

        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pooled = heads.pooler(x[:, 0], **dt)  # tanh(Dense(text [CLS]))
        out = {
            "text_tokens": text_tokens,
            "image_tokens": image_tokens,
            "image_mask": region_mask,
            "pooled": layers.constrain(pooled, layers.POOLED_AXES),
        }
        transform = dict(activation=self.activation, ln_epsilon=self.ln_epsilon, **dt)
        if self.itm_head:
            out["itm_logits"] = heads.itm_logits(pooled, **dt)
        if self.vqa_labels is not None:
            out["vqa_logits"] = heads.AnswerClassifier(self.vqa_labels, **dt, name="vqa_head")(pooled).astype(
                jnp.float32)
        if self.mlm_head:
            out["mlm_logits"] = heads.tied_mlm_logits(self, text_tokens, word_table, **transform)
        if self.mrfr_head:
            out["mrfr_pred"] = heads.token_prediction(image_tokens, self.region_feat_dim, prefix="mrfr", **transform)
        if self.mrc_head:
            out["mrc_logits"] = heads.token_prediction(image_tokens, self.num_region_classes, prefix="mrc",
                                                       **transform)
        return out
