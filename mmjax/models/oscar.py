"""OSCAR (Li et al. 2020): one BERT stream over words, object tags and region features, the tags anchoring the
alignment between the words and the regions they name.

    text:    [CLS] words [SEP]                      word + position + type 0     (BERT embeddings, one table)
    tags:    tag words [SEP]                         word + position + type 1
    regions: Dense([feature; x1, y1, x2, y2, w, h])  (-> LN with `region_ln`, OSCAR+'s option) -> dropout
    concat [text; tags; regions] -> Encoder (post-LN BERT blocks) -> pooled = tanh(Dense(token 0))
    heads: MLM (decoder tied to the word table) over the words AND the tags (OSCAR's masked token loss),
           ITM (2-way) on pooled: OSCAR's contrastive loss, "is this tag sequence the image's own or a polluted one
           (another image's)", which the matching task trains with task.itm.swap="tags"; VQA answer classifier.

Tags arrive as a batch key the pipeline makes (data.regions.tags: the names of the classes the regions hold,
tokenised like a caption, `tags_text_ids` / `tags_text_mask` [B, T] starting with [CLS]); the model drops that
[CLS], so the stream reads [CLS] words [SEP] tags [SEP] as OSCAR does. The tag tokens take positions L .. L+T-2
(after the padded caption) rather than right after the caption's last word: the same slots for every example,
which changes nothing when training from scratch (there is no OSCAR checkpoint import).

Parameters:
    text_embeddings/{word_embedding, pos_embedding, type_embedding, ln}   (layers.TextEmbeddings, shared by tags)
    region_proj (+ ln_region with region_ln)                              (region embeddings)
    encoder/layer_{i}, pooler
    heads: mlm_transform + mlm_bias (decoder tied to text_embeddings/word_embedding), itm_head, vqa_head
"""
from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import heads, layers
from mmjax.models.layers import Array, Dtype, partitioned

REQUIRED_KEYS = ("text_ids", "text_mask", "tags_text_ids", "tags_text_mask", "region_feats", "region_boxes",
                 "region_mask")


def box_position(boxes: Array) -> Array:
    """Normalised boxes [..., 4] (ymin, xmin, ymax, xmax) -> OSCAR's 6-d position [..., 6] = (x1, y1, x2, y2, w, h)."""
    boxes = boxes.astype(jnp.float32)
    ymin, xmin, ymax, xmax = (boxes[..., i] for i in range(4))
    return jnp.stack([xmin, ymin, xmax, ymax, xmax - xmin, ymax - ymin], axis=-1)


class OSCAR(nn.Module):
    """Object-Semantics Aligned pre-training: single-stream encoder over [words; tags; regions].

    `__call__(batch)` reads `text_ids` / `text_mask` [B, L] (1 = real), `tags_text_ids` / `tags_text_mask` [B, T]
    ([CLS] tags [SEP], as tokenised captions), `region_feats` [B, R, region_feat_dim], `region_boxes` [B, R, 4]
    (normalised ymin, xmin, ymax, xmax), `region_mask` [B, R] and optional `region_feature_mask` [B, R] (1 = that
    region's features are zeroed first; its box is kept).
    """

    vocab_size: int = 30522
    max_len: int = 50  # positions for words + tags (L + T - 1)
    region_feat_dim: int = 2048
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: Optional[int] = None  # default 4 * width
    norm: str = "post"  # BERT blocks
    activation: str = "gelu"  # exact erf GELU, as BERT
    ln_epsilon: float = 1e-12
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    region_ln: bool = False  # OSCAR+ (VinVL) adds a LayerNorm after the region projection; OSCAR does not
    mlm_head: bool = True
    itm_head: bool = True
    vqa_labels: Optional[int] = None  # an answer classifier (VQA) on the pooled output with this many answers
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the encoder's layers (params stacked under encoder/layers)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    image_cls_first = False  # image_tokens are the regions only

    def _check_batch(self, batch: Mapping[str, Array]) -> None:
        """Raises KeyError / ValueError (naming the key and shape) for a malformed batch."""
        for key in ("tags_text_ids", "tags_text_mask"):
            if key not in batch:
                raise KeyError(f"OSCAR needs batch key {key!r} (set data.regions.tags=True); got keys {sorted(batch)}")
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        b, length, _ = layers.check_text_region_batch("OSCAR", batch, REQUIRED_KEYS, max_len=self.max_len,
                                                      region_feat_dim=self.region_feat_dim)
        tags = tuple(jnp.shape(batch["tags_text_ids"]))
        if len(tags) != 2 or tags[0] != b or tags[1] < 2:
            raise ValueError(f"batch key 'tags_text_ids' must be [B, T] = [{b}, T >= 2]; got shape {tags}")
        if tuple(jnp.shape(batch["tags_text_mask"])) != tags:
            raise ValueError(f"batch key 'tags_text_mask' must have shape {list(tags)}; got "
                             f"{tuple(jnp.shape(batch['tags_text_mask']))}")
        if length + tags[1] - 1 > self.max_len:
            raise ValueError(f"words ({length}) + tags ({tags[1] - 1}) exceed max_len {self.max_len} positions")

    @nn.compact
    def __call__(self, batch: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        """batch -> {text_tokens [B, L, D], tags_tokens [B, T, D], image_tokens [B, R, D], image_mask [B, R],
        pooled [B, D], and with heads on: itm_logits [B, 2], mlm_logits [B, L, V], tags_mlm_logits [B, T, V],
        vqa_logits}. Row 0 of the tag outputs is the dropped [CLS] (zeros; never a target)."""
        self._check_batch(batch)
        deterministic = not train
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        text_ids, text_mask = batch["text_ids"], jnp.asarray(batch["text_mask"]).astype(jnp.int32)
        tag_ids = batch["tags_text_ids"][:, 1:]  # [CLS] w [SEP] q [SEP]: the tags' own [CLS] is dropped
        tag_mask = jnp.asarray(batch["tags_text_mask"])[:, 1:].astype(jnp.int32)
        region_mask = jnp.asarray(batch["region_mask"]).astype(jnp.int32)
        length, num_tags = text_ids.shape[1], tag_ids.shape[1]

        # Words and tags share the word table (a tag is a word) and differ in token type, as OSCAR's segments.
        ids = jnp.concatenate([text_ids, tag_ids], axis=1)
        mask = jnp.concatenate([text_mask, tag_mask], axis=1)
        types = jnp.concatenate([jnp.zeros_like(text_ids), jnp.ones_like(tag_ids)], axis=1)
        words, word_table = layers.TextEmbeddings(
            vocab_size=self.vocab_size, max_len=self.max_len, width=self.width, type_vocab_size=2,
            ln_epsilon=self.ln_epsilon, name="text_embeddings", **dt)(ids, types, mask)

        feats = batch["region_feats"]
        if batch.get("region_feature_mask") is not None:
            feats = jnp.where(batch["region_feature_mask"][..., None] > 0, jnp.zeros((), feats.dtype), feats)
        region_in = jnp.concatenate([feats.astype(jnp.float32), box_position(batch["region_boxes"])], axis=-1)
        regions = layers.Dense(self.width, kernel_init=partitioned(layers.dense_init, (None, "embed")),
                               bias_init=partitioned(layers.zeros_init, ("embed",)), name="region_proj", **dt)(
            region_in.astype(self.dtype))
        if self.region_ln:
            regions = layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_region")(regions)
        # OSCAR drops out the region embeddings apart from the words' (which the encoder input dropout covers).
        regions = nn.Dropout(self.dropout_rate)(regions, deterministic=deterministic)

        x = jnp.concatenate([words, regions], axis=1)
        x = layers.constrain(nn.Dropout(self.dropout_rate)(x, deterministic=deterministic))
        all_mask = jnp.concatenate([mask, region_mask], axis=1)
        x = layers.tower_encoder(self)(x, layers.padding_bias(all_mask), deterministic)
        if self.norm == "pre":
            x = layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_final")(x)
        x = layers.constrain(x)
        text_tokens, tag_tokens = x[:, :length], x[:, length:length + num_tags]
        image_tokens = x[:, length + num_tags:]

        pooled = heads.pooler(x[:, 0], **dt)
        pad_first = lambda y: jnp.pad(y, ((0, 0), (1, 0), (0, 0)))  # noqa: E731  (back to [B, T] rows)
        out = {"text_tokens": text_tokens, "tags_tokens": pad_first(tag_tokens), "image_tokens": image_tokens,
               "image_mask": region_mask, "pooled": layers.constrain(pooled, layers.POOLED_AXES)}
        if self.itm_head:
            out["itm_logits"] = heads.itm_logits(pooled, **dt)
        if self.vqa_labels is not None:
            out["vqa_logits"] = heads.AnswerClassifier(self.vqa_labels, name="vqa_head", **dt)(pooled).astype(
                jnp.float32)
        if self.mlm_head:
            logits = heads.tied_mlm_logits(self, x[:, :length + num_tags], word_table, activation=self.activation,
                                           ln_epsilon=self.ln_epsilon, **dt)
            out["mlm_logits"] = logits[:, :length]
            out["tags_mlm_logits"] = pad_first(logits[:, length:])
        return out
