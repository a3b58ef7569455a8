"""VisualBERT (Li et al. 2019): one BERT over [text tokens; visual tokens], the visual tokens being projected
detector region features.

    text:    word + position (0..L-1) + token-type (text_type_ids, default 0)                 (BERT embeddings)
    regions: Dense(feat) (masked regions' features zeroed first) + visual position row 0 + visual type row 1
    LN over the concatenation [text; regions] -> Encoder (post-LN BERT blocks)
    pooled = tanh(Dense(token 0)) (the text [CLS]); heads: MLM (tied decoder), ITM (VisualBERT's sentence-image
    prediction, 2-way on pooled), VQA (Dense on the text token before the last real one, as HF), and optional
    MRFR / MRC (ours: VisualBERT itself has no visual objective)

Layout and numerics follow Hugging Face `VisualBertModel` without `image_text_alignment`, so its weights map
one-to-one (mmjax.convert.hf_visual_bert): the regions have tables of their own (visual token types, visual
positions), initialised as copies of the text ones (HF's special_visual_initialize); every region takes visual
type 1 (HF's default visual_token_type_ids) and visual position 0 (HF gives all visual tokens position id 0
unless an alignment to words is passed; the alignment is not supported here). VisualBERT does not use box
geometry: `region_boxes` is accepted (the region pipeline supplies it) but never read. Defaults are
VisualBERT-base (BERT-base, eps 1e-12, exact GELU, 2048-d Faster R-CNN features).

Parameters:
    text_embeddings/{word_embedding, pos_embedding, type_embedding}   (layers.TextEmbeddings, without its LN)
    visual_projection, visual_type_embedding, visual_pos_embedding     (region embeddings)
    ln_embed (over text and regions), encoder/layer_{i}, pooler
    heads: mlm_transform + mlm_bias (decoder tied to text_embeddings/word_embedding), itm_head, vqa_head,
           mrfr_transform + mrfr_decoder, mrc_transform + mrc_decoder
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import heads, layers
from mmjax.models.layers import Array, Dtype, partitioned

REQUIRED_KEYS = ("text_ids", "text_mask", "region_feats", "region_mask")
VISUAL_TYPE = 1  # HF's default visual_token_type_ids: every region is type 1
VISUAL_POSITION = 0  # HF's visual position id of every region when no image_text_alignment is given


def _copy_init(table: Array) -> Callable:
    """An initialiser returning `table` (HF's special_visual_initialize: visual tables start as the text ones)."""
    return lambda key, shape, dtype: jnp.asarray(table, dtype).reshape(shape)


class VisualBERT(nn.Module):
    """VisualBERT: a single-stream BERT over [text tokens; region tokens] (Hugging Face VisualBertModel).

    `__call__(batch)` reads `text_ids` / `text_mask` [B, L] (1 = real), optional `text_type_ids` [B, L],
    `region_feats` [B, R, region_feat_dim], `region_mask` [B, R] (1 = real region), optional
    `region_feature_mask` [B, R] (1 = that region's features are replaced by zeros before the projection, for
    masked region modelling) and optional `region_boxes` [B, R, 4], which VisualBERT does not use.
    """

    vocab_size: int = 30522
    max_len: int = 512  # text positions (the visual position table has as many rows; only row 0 is read)
    region_feat_dim: int = 2048  # Faster R-CNN (bottom-up attention) pooled features
    num_region_classes: int = 1601  # Visual Genome 1600 object classes + background (MRC targets, ours)
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: Optional[int] = None  # default 4 * width
    activation: str = "gelu"  # exact erf GELU, as BERT
    ln_epsilon: float = 1e-12
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    type_vocab_size: int = 2  # text token types; the visual type table has as many rows (regions use row 1)
    special_visual_initialize: bool = True  # init the visual type / position tables as copies of the text ones
    mlm_head: bool = True
    itm_head: bool = True  # sentence-image prediction; label 1 = matching pair (HF's seq_relationship: 0)
    vqa_labels: Optional[int] = None  # HF VisualBertForQuestionAnswering's answer classifier, this many answers
    mrfr_head: bool = False
    mrc_head: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (layers.remat)
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the encoder's layers (params stacked under encoder/layers)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    norm = "post"  # BERT blocks, read by layers.tower_encoder; a class constant: HF VisualBERT has no other
    image_cls_first = False  # image_tokens are the regions only (no image [CLS] for word-region alignment to skip)

    def _check_batch(self, batch: Mapping[str, Array]) -> None:
        """Raises KeyError / ValueError (naming the key and shape) for a malformed batch."""
        if self.type_vocab_size <= VISUAL_TYPE:
            raise ValueError(f"type_vocab_size must be >= 2 (regions use visual type 1), got {self.type_vocab_size}")
        layers.check_text_region_batch("VisualBERT", batch, REQUIRED_KEYS, max_len=self.max_len,
                                       region_feat_dim=self.region_feat_dim)

    def _table(self, name: str, names: tuple, like: Array) -> Array:
        """A visual embedding table shaped as the text table `like`, initialised as its copy or at random."""
        init = _copy_init(like) if self.special_visual_initialize else layers.embed_init
        return self.param(name, partitioned(init, names), like.shape, self.param_dtype)

    def _embed_regions(self, feats: Array, feature_mask: Optional[Array], text_embeddings: nn.Module) -> Array:
        """Region embeddings Dense(feat) + visual position row 0 + visual type row 1 -> [B, R, D] (before the LN)."""
        if feature_mask is not None:
            # Masked region modelling (ours, as UNITER) hides a region by zeroing its features.
            feats = jnp.where(feature_mask[..., None] > 0, jnp.zeros((), feats.dtype), feats)
        x = layers.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=partitioned(layers.dense_init, (None, "embed")),
                         bias_init=partitioned(layers.zeros_init, ("embed",)), name="visual_projection")(feats)
        pos = self._table("visual_pos_embedding", ("length", "embed"), text_embeddings.pos_embedding)
        types = self._table("visual_type_embedding", (None, "embed"), text_embeddings.type_embedding)
        return x + (pos[VISUAL_POSITION] + types[VISUAL_TYPE]).astype(self.dtype)

    @nn.compact
    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch -> {text_tokens [B, L, D], image_tokens [B, R, D], image_mask [B, R], pooled [B, D], and with
        heads on: mlm_logits [B, L, V], itm_logits [B, 2], vqa_logits [B, vqa_labels], mrfr_pred [B, R, F],
        mrc_logits [B, R, C]}.

        Hugging Face names too: last_hidden_state [B, L+R, D] (= [text_tokens; image_tokens]) and pooler_output
        (= pooled); with the VQA head as the only head, vqa_logits is also `logits` (VisualBertForQuestionAnswering).
        Head outputs are float32 (the losses' softmax / regression run in float32); the rest is in `dtype`.
        """
        self._check_batch(batch)
        deterministic = not train
        text_ids, text_mask = batch["text_ids"], batch["text_mask"]
        region_mask = jnp.asarray(batch["region_mask"]).astype(jnp.int32)
        length = text_ids.shape[1]

        # BERT embeddings without their LayerNorm: VisualBERT normalises text and regions together (below). The
        # word table is also the tied MLM decoder's weight.
        text_embeddings = layers.TextEmbeddings(
            vocab_size=self.vocab_size, max_len=self.max_len, width=self.width, type_vocab_size=self.type_vocab_size,
            use_ln=False, dtype=self.dtype, param_dtype=self.param_dtype, name="text_embeddings")
        text, word_table = text_embeddings(text_ids, batch.get("text_type_ids"))
        regions = self._embed_regions(batch["region_feats"], batch.get("region_feature_mask"), text_embeddings)
        x = layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_embed")(
            jnp.concatenate([text, regions], axis=1))
        # Sown so tests and analyses can see the encoder input (mutable=["intermediates"]; free otherwise).
        self.sow("intermediates", "embeddings", x)
        x = layers.constrain(nn.Dropout(self.dropout_rate)(x, deterministic=deterministic))

        mask = jnp.concatenate([text_mask.astype(jnp.int32), region_mask], axis=1)
        x = layers.constrain(layers.tower_encoder(self)(x, layers.padding_bias(mask), deterministic))
        text_tokens, image_tokens = x[:, :length], x[:, length:]

        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pooled = layers.constrain(heads.pooler(x[:, 0], **dt), layers.POOLED_AXES)  # tanh(Dense(text [CLS]))
        out = {
            "text_tokens": text_tokens,
            "image_tokens": image_tokens,
            "image_mask": region_mask,
            "pooled": pooled,
            # Hugging Face VisualBertModel's names (an extra copy only where a jit returns them).
            "last_hidden_state": x,
            "pooler_output": pooled,
        }
        transform = dict(activation=self.activation, ln_epsilon=self.ln_epsilon, **dt)
        if self.mlm_head:
            out["mlm_logits"] = heads.tied_mlm_logits(self, text_tokens, word_table, **transform)
        if self.itm_head:
            out["itm_logits"] = heads.itm_logits(pooled, **dt)
        if self.vqa_labels is not None:
            # HF VisualBertForQuestionAnswering (from the original code) classifies the text token at
            # sum(text_mask) - 2, not the pooled output: for "[CLS] question [SEP]" the token before [SEP] (the
            # original appends a [MASK] there). Clipped at 0 where HF would fail (texts of under two tokens).
            index = jnp.clip(jnp.sum(text_mask > 0, axis=1) - 2, 0, length - 1)
            token = jnp.take_along_axis(text_tokens, index[:, None, None], axis=1)[:, 0]
            token = nn.Dropout(self.dropout_rate)(token, deterministic=deterministic)
            out["vqa_logits"] = heads.linear_logits(token, self.vqa_labels, name="vqa_head", **dt)
        if self.mrfr_head:
            out["mrfr_pred"] = heads.token_prediction(image_tokens, self.region_feat_dim, prefix="mrfr", **transform)
        if self.mrc_head:
            out["mrc_logits"] = heads.token_prediction(image_tokens, self.num_region_classes, prefix="mrc",
                                                       **transform)
        if "vqa_logits" in out and not (self.mlm_head or self.itm_head or self.mrfr_head or self.mrc_head):
            # The VQA head alone (a converted VisualBertForQuestionAnswering): HF calls its output `logits`.
            out["logits"] = out["vqa_logits"]
        return out
