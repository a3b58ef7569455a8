"""LXMERT (Tan & Bansal 2019): a language encoder, an object-relationship encoder and a cross-modality encoder.

    text:    word + position + token-type (text_type_ids, default 0) -> LN                  (BERT embeddings)
    regions: (LN(Dense(feat)) + LN(Dense(box as x1, y1, x2, y2))) / 2   (masked regions' features zeroed first)
    l_layers post-LN Blocks on the text, r_layers post-LN Blocks on the regions (separately)
    x_layers cross-modality layers, both streams at once (CrossModalityLayer):
             text'  = LN(text  + MHA(text,  kv=image))   one cross-attention, shared by the two directions
             image' = LN(image + MHA(image, kv=text))    (same projections and LayerNorm)
             text, image = Block(text'), Block(image')    per-stream self-attention + FFN, post-LN
    pooled = tanh(Dense(text token 0)); heads: MLM (tied decoder), ITM (2-way), MRFR (region-feature regression),
             MRC (region-class logits), VQA (LXMERT's answer head: Dense(2D) -> GELU -> LN -> Dense(answers))

The layout is Hugging Face's LxmertModel / LxmertForQuestionAnswering (mmjax.convert.hf_lxmert maps checkpoints
one-to-one): every LayerNorm has eps 1e-12, GELU is the exact erf one, and the single `visual_attention` module of
HF's LxmertXLayer is called for both directions, so its weights are shared (checked against transformers).

Boxes: our `region_boxes` are normalised (ymin, xmin, ymax, xmax); LXMERT's `visual_pos` is (x1, y1, x2, y2). The
model swaps the coordinates itself (`to_lxmert_boxes`) before the box projection, whose kernel rows are therefore in
LXMERT's order and map to HF's `box_fc` unchanged.

Only the cross-modality layers mix the streams: with x_layers=0 the text tokens never see the regions. Padding is a
key mask (`layers.padding_bias`) in every attention; padded text ids and padded regions' features and boxes are
zeroed before embedding, so nothing written there (even inf/NaN) reaches a real output.

Departures from the pretraining heads of LXMERT (so LxmertForPreTraining does not convert): MRFR and MRC have a
transform each (LXMERT shares one across its object / attribute / feature decoders) and there is no attribute head.

Parameters:
    text_embeddings/{word_embedding, pos_embedding, type_embedding, ln}   (layers.TextEmbeddings)
    region_feat_proj, ln_region_feat, region_box_proj, ln_region_box      (HF LxmertVisualFeatureEncoder)
    text_encoder/layer_{i} (l_layers), image_encoder/layer_{i} (r_layers)  (layers.Encoder of post-LN Blocks)
    cross_{i}/{cross_attn, ln_cross, text, image}                          (CrossModalityLayer)
    pooler
    heads: mlm_transform + mlm_bias (decoder tied to text_embeddings/word_embedding), itm_head,
           mrfr_transform + mrfr_decoder, mrc_transform + mrc_decoder, vqa_head/{dense, ln, out}
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import heads, layers
from mmjax.models.layers import Array, Block, Dtype, partitioned

REQUIRED_KEYS = ("text_ids", "text_mask", "region_feats", "region_boxes", "region_mask")
# Our (ymin, xmin, ymax, xmax) -> LXMERT's (x1, y1, x2, y2): the permutation is its own inverse.
_XYXY = (1, 0, 3, 2)


def to_lxmert_boxes(boxes: Array) -> Array:
    """Boxes [..., 4] (ymin, xmin, ymax, xmax) -> LXMERT's visual_pos layout (x1, y1, x2, y2); also the inverse."""
    return boxes[..., jnp.array(_XYXY)]


class CrossModalityLayer(nn.Module):
    """One LXMERT cross-modality layer (HF LxmertXLayer) on both streams: shared cross-attention, then a post-LN
    Block (self-attention + FFN) per stream. Parameters: cross_attn, ln_cross (shared), text, image (Blocks)."""

    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "einsum"  # layers.MultiHeadAttention.attention

    @nn.compact
    def __call__(self, text: Array, text_bias: Array, image: Array, image_bias: Array,
                 deterministic: bool = True) -> tuple[Array, Array]:
        """text [B, L, D], image [B, R, D] with their key biases [B, 1, 1, L] / [B, 1, 1, R] -> (text, image)."""
        # One module called twice: HF's LxmertXLayer builds a single `visual_attention` and uses it for
        # language->vision and vision->language, so both directions share projections and LayerNorm.
        attn = layers.MultiHeadAttention(num_heads=self.num_heads, attention_dropout_rate=self.attention_dropout_rate,
                                         dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention,
                                         name="cross_attn")
        ln = layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_cross")
        drop = functools.partial(nn.Dropout(self.dropout_rate), deterministic=deterministic)

        def cross(x: Array, kv: Array, kv_bias: Array) -> Array:
            return ln(x + drop(attn(x, kv=kv, bias=kv_bias, deterministic=deterministic)))

        # Both directions read this layer's inputs, not each other's outputs: the update is simultaneous.
        new_text, new_image = cross(text, image, image_bias), cross(image, text, text_bias)
        block = functools.partial(Block, num_heads=self.num_heads, mlp_dim=self.mlp_dim, norm="post",
                                  activation=self.activation, dropout_rate=self.dropout_rate,
                                  attention_dropout_rate=self.attention_dropout_rate, ln_epsilon=self.ln_epsilon,
                                  dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention)
        text = block(name="text")(new_text, text_bias, deterministic)
        image = block(name="image")(new_image, image_bias, deterministic)
        return text, image


class AnswerHead(nn.Module):
    """LXMERT's answer head (HF LxmertVisualAnswerHead): Dense(2D) -> exact GELU -> LayerNorm -> Dense(num_labels).

    The activation comes before the LayerNorm (ViLT's heads.AnswerClassifier has them the other way round).
    Parameters: dense, ln, out.
    """

    num_labels: int
    ln_epsilon: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., D] -> logits [..., num_labels] (in dtype; callers cast)."""
        dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(2 * x.shape[-1], kernel_init=partitioned(layers.dense_init, ("embed", "mlp")),
                  bias_init=partitioned(layers.zeros_init, ("mlp",)), name="dense")(x)
        x = layers.gelu_exact(x)  # HF's GeLU(): exact, whatever the model's activation
        x = nn.LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                         scale_init=partitioned(layers.ones_init, ("mlp",)),
                         bias_init=partitioned(layers.zeros_init, ("mlp",)), name="ln")(x)
        return dense(self.num_labels, kernel_init=partitioned(layers.dense_init, ("mlp", None)),
                     bias_init=partitioned(layers.zeros_init, (None,)), name="out")(x)


class LXMERT(nn.Module):
    """LXMERT two-stream encoder (language, object-relationship, cross-modality) and its heads.

    `__call__(batch)` reads `text_ids` / `text_mask` [B, L] (1 = real), optional `text_type_ids` [B, L],
    `region_feats` [B, R, region_feat_dim], `region_boxes` [B, R, 4] (normalised ymin, xmin, ymax, xmax),
    `region_mask` [B, R] (1 = real region; HF's visual_attention_mask) and optional `region_feature_mask` [B, R]
    (1 = that region's features are replaced by zeros before the embedding, for masked object prediction; its box
    is kept).
    """

    vocab_size: int = 30522
    max_len: int = 20  # text positions (LXMERT pretrains with 20 tokens; HF checkpoints have 512)
    region_feat_dim: int = 2048  # Faster R-CNN (bottom-up attention) RoI features
    num_region_classes: int = 1600  # Visual Genome object classes (LXMERT's num_object_labels): MRC targets
    width: int = 768
    l_layers: int = 9  # language encoder
    r_layers: int = 5  # object-relationship encoder
    x_layers: int = 5  # cross-modality encoder
    heads: int = 12
    mlp_dim: Optional[int] = None  # default 4 * width
    activation: str = "gelu"  # exact erf GELU, as BERT / HF "gelu"
    ln_epsilon: float = 1e-12  # HF LXMERT hard-codes 1e-12 in every LayerNorm
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    type_vocab_size: int = 2
    mlm_head: bool = True
    itm_head: bool = True
    mrfr_head: bool = True
    mrc_head: bool = True
    vqa_labels: Optional[int] = None  # LXMERT's answer head on the pooled output with this many answers
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name (layers.remat)
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
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

    def _layer_kwargs(self) -> dict:
        """Fields shared by every Block and CrossModalityLayer (all post-LN, as BERT/LXMERT)."""
        return dict(num_heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width, activation=self.activation,
                    dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                    ln_epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                    attention=self.attention)

    def _validate(self, batch: Mapping[str, Array]) -> dict[str, Array]:
        """Checks keys and shapes; returns the inputs as arrays, masks as int32 0/1, optional ones filled in."""
        for key in REQUIRED_KEYS:
            if key not in batch:
                raise KeyError(f"LXMERT needs batch key {key!r}; got keys {sorted(batch)}")
        x = {k: jnp.asarray(batch[k]) for k in REQUIRED_KEYS}
        if x["text_ids"].ndim != 2:
            raise ValueError(f"batch key 'text_ids' must be [B, L]; got shape {x['text_ids'].shape}")
        b, length = x["text_ids"].shape
        if length > self.max_len:
            raise ValueError(f"batch key 'text_ids' has length {length} > max_len {self.max_len}")
        feats = x["region_feats"]
        if feats.ndim != 3 or feats.shape[0] != b or feats.shape[2] != self.region_feat_dim:
            raise ValueError(f"batch key 'region_feats' must be [B, R, region_feat_dim] = [{b}, R, "
                             f"{self.region_feat_dim}]; got shape {feats.shape}")
        r = feats.shape[1]
        for key, shape in (("text_type_ids", (b, length)), ("region_feature_mask", (b, r))):
            x[key] = jnp.zeros(shape, jnp.int32) if batch.get(key) is None else jnp.asarray(batch[key])
        expected = {"text_mask": ((b, length), "[B, L]"), "text_type_ids": ((b, length), "[B, L]"),
                    "region_boxes": ((b, r, 4), "[B, R, 4]"), "region_mask": ((b, r), "[B, R]"),
                    "region_feature_mask": ((b, r), "[B, R]")}
        for key, (shape, dims) in expected.items():
            if x[key].shape != shape:
                raise ValueError(f"batch key {key!r} must be {dims} = {shape}; got shape {x[key].shape}")
        for key in ("text_mask", "region_mask", "region_feature_mask"):
            x[key] = (x[key] > 0).astype(jnp.int32)
        return x

    def _embed_regions(self, feats: Array, boxes: Array, region_mask: Array, feature_mask: Array) -> Array:
        """HF LxmertVisualFeatureEncoder: (LN(Dense(feat)) + LN(Dense(x1, y1, x2, y2))) / 2 -> [B, R, D]."""
        real = region_mask > 0
        # Masked objects' features become zeros (their boxes stay), as LXMERT's masked object prediction; padded
        # regions are zeroed too, so garbage there cannot reach the (masked) keys.
        feats = jnp.where((real & (feature_mask == 0))[..., None], feats.astype(jnp.float32), 0.0)
        boxes = jnp.where(real[..., None], to_lxmert_boxes(boxes.astype(jnp.float32)), 0.0)
        # Input dims unnamed: detector channels / 4 box numbers are never sharded.
        x = self._ln("ln_region_feat")(self._dense(self.width, (None, "embed"), "region_feat_proj")(
            feats.astype(self.dtype)))
        y = self._ln("ln_region_box")(self._dense(self.width, (None, "embed"), "region_box_proj")(
            boxes.astype(self.dtype)))
        return (x + y) / 2

    @nn.compact
    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch -> {text_tokens [B, L, D], image_tokens [B, R, D], image_mask [B, R], pooled [B, D], the same three
        under HF's names language_output / vision_output / pooled_output, and with heads on: mlm_logits [B, L, V],
        itm_logits [B, 2], mrfr_pred [B, R, F], mrc_logits [B, R, C], vqa_logits [B, vqa_labels] (also as HF's
        question_answering_score)}.

        Head outputs are float32 (the losses' softmax / regression run in float32); the rest is in `dtype`. Padded
        output positions hold unspecified values.
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
        image = self._embed_regions(x["region_feats"], x["region_boxes"], x["region_mask"],
                                    x["region_feature_mask"])
        # Sown so tests and analyses can see each stream's input (mutable=["intermediates"]; free otherwise).
        self.sow("intermediates", "embeddings", {"text": text, "image": image})
        text, image = layers.constrain(drop(text)), layers.constrain(drop(image))
        text_bias, image_bias = layers.padding_bias(x["text_mask"]), layers.padding_bias(x["region_mask"])

        def encoder(depth: int, name: str) -> layers.Encoder:
            """A single-stream stack of post-LN Blocks."""
            return layers.Encoder(depth=depth, norm="post", remat=self.remat, remat_policy=self.remat_policy, **kw,
                                  name=name)

        text = encoder(self.l_layers, "text_encoder")(text, text_bias, deterministic)
        image = encoder(self.r_layers, "image_encoder")(image, image_bias, deterministic)

        # static_argnums counts `self` as 0: `deterministic` (5) is a Python bool that picks code paths.
        cross_cls = layers.remat(CrossModalityLayer, self.remat, self.remat_policy, static_argnums=(5,))
        for i in range(self.x_layers):
            text, image = cross_cls(**kw, name=f"cross_{i}")(text, text_bias, image, image_bias, deterministic)
        text, image = layers.constrain(text), layers.constrain(image)

        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pooled = layers.constrain(heads.pooler(text[:, 0], **dt), layers.POOLED_AXES)  # tanh(Dense(text [CLS]))
        out = {"text_tokens": text, "image_tokens": image, "image_mask": x["region_mask"], "pooled": pooled,
               # Hugging Face LxmertModel's names for the same arrays.
               "language_output": text, "vision_output": image, "pooled_output": pooled}
        transform = dict(activation=self.activation, ln_epsilon=self.ln_epsilon, **dt)
        if self.mlm_head:
            out["mlm_logits"] = heads.tied_mlm_logits(self, text, word_table, **transform)
        if self.itm_head:
            # Cross-modality matching; label 1 = the pair matches (HF LxmertForPreTraining's matched_label too).
            out["itm_logits"] = heads.itm_logits(pooled, **dt)
        if self.mrfr_head:
            out["mrfr_pred"] = heads.token_prediction(image, self.region_feat_dim, prefix="mrfr", **transform)
        if self.mrc_head:
            out["mrc_logits"] = heads.token_prediction(image, self.num_region_classes, prefix="mrc", **transform)
        if self.vqa_labels is not None:
            out["vqa_logits"] = AnswerHead(self.vqa_labels, ln_epsilon=self.ln_epsilon, **dt, name="vqa_head")(
                pooled).astype(jnp.float32)
            out["question_answering_score"] = out["vqa_logits"]  # HF LxmertForQuestionAnswering's name
        return out


__all__ = ["AnswerHead", "CrossModalityLayer", "LXMERT", "REQUIRED_KEYS", "to_lxmert_boxes"]
