"""Captioning: teacher-forced next-token prediction of a caption from an image (the encoder-decoder captioner),
and CoCa's contrastive + captioning objective when the model also gives embeddings.

Each training batch holds one caption per image (drawn from its references); text_ids are [CLS] words [SEP] pad,
so [CLS] is the start token and the decoder learns to end with [SEP]. Position t of `lm_logits` predicts token
t + 1; the targets are text_ids[:, 1:] under text_mask[:, 1:]. `config.task`: label_smoothing, caption_weight and
contrastive_weight (CoCa's paper weighs captioning 2 and contrastive 1). Evaluation is declared in the config (the
`captioning` evaluator: BLEU and CIDEr of decoded captions, mmjax/evaluation/captioning.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from mmjax import losses

BATCH_KEYS = ("image", "text_ids", "text_mask")


def default_task_config(**fields: Any) -> ml_collections.ConfigDict:
    """`config.task` of the captioning task with the given fields changed."""
    c = ml_collections.ConfigDict(dict(name="captioning", label_smoothing=0.0, caption_weight=1.0,
                                       contrastive_weight=1.0))
    c.update(fields)
    return c


class CaptioningTask:
    """Caption cross-entropy (+ the symmetric InfoNCE of a model that also returns image and text embeddings)."""

    def __init__(self, model: nn.Module, config: Any, meta: Any, tokenizer: Any, mesh: Mesh):
        del meta, tokenizer, mesh
        for method in ("image_memory", "decode_text"):
            if not hasattr(model, method):
                raise ValueError(f"the captioning task needs a captioner (a model with {method}: captioner, coca); "
                                 f"got {type(model).__name__}")
        self.model = model
        task = config.task
        self.label_smoothing = float(task.get("label_smoothing", 0.0))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing must be in [0, 1); got {self.label_smoothing}")
        self.caption_weight = float(task.get("caption_weight", 1.0))
        self.contrastive_weight = float(task.get("contrastive_weight", 1.0))

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Forward pass, caption loss (and the contrastive one for CoCa); returns (loss, metrics)."""
        out = self.model.apply({"params": params}, {k: batch[k] for k in BATCH_KEYS}, train=True,
                               rngs={"dropout": rng})
        caption, accuracy = losses.caption_loss(out["lm_logits"][:, :-1], batch["text_ids"][:, 1:],
                                                batch["text_mask"][:, 1:], self.label_smoothing)
        metrics = {"caption_loss": caption, "token_accuracy": accuracy}
        total = self.caption_weight * caption
        if "image_embeds" in out:
            zimg = nn.with_logical_constraint(out["image_embeds"], ("activation_batch", "activation_joint"))
            ztxt = nn.with_logical_constraint(out["text_embeds"], ("activation_batch", "activation_joint"))
            contrastive = losses.softmax_contrastive_loss(zimg, ztxt, out["logit_scale"])
            total = total + self.contrastive_weight * contrastive
            metrics.update(contrastive_loss=contrastive, logit_scale=out["logit_scale"],
                           **{f"batch_{k}": v for k, v in losses.contrastive_metrics(zimg, ztxt).items()})
        return jnp.asarray(total, jnp.float32), metrics
