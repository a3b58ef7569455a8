"""Contrastive pretraining of a dual encoder (CLIP / SigLIP for image-text, CLAP and speech-image for audio):
symmetric InfoNCE, the sigmoid loss or a ranking hinge (DeViSE, VSE, VSE++) over the global batch, between the
model's two modalities' embeddings.

Evaluation is declared in the config (zero-shot classification, retrieval: mmjax/evaluation/evaluators.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mmjax import losses

LOSSES = ("softmax", "sigmoid", *losses.RANKING_LOSSES)


class ContrastiveTask:
    """The model's `loss` over the global batch, between `{a}_embeds` and `{b}_embeds` for its `modalities` (a, b)
    (CLIP: image and text): 'softmax' (symmetric InfoNCE), 'sigmoid', or a ranking loss with the model's `margin`:
    'hinge' (DeViSE, a -> b), 'triplet' (VSE) or 'triplet_hardest' (VSE++) (losses.RANKING_LOSSES).

    The ranking losses score by plain cosine similarity: logit_scale gets no gradient and the logged one stays at
    its init. Identical captions (equal text_ids rows) are not negatives of each other for them.
    """

    def __init__(self, model: nn.Module, config: Any, meta: Any, tokenizer: Any, mesh: Mesh):
        del config, tokenizer  # the model says which loss it was built for and which modalities it pairs
        self.model = model
        self.pair = tuple(getattr(model, "modalities", ("image", "text")))
        self.batch_keys = tuple(meta.model_keys) or ("image", "text_ids", "text_mask")
        self.mesh = mesh
        self.loss_name = getattr(model, "loss", "softmax")
        if self.loss_name not in LOSSES:
            raise ValueError(f"model.loss must be one of {LOSSES}; got {self.loss_name!r}")
        self.margin = float(getattr(model, "margin", 0.0))

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Forward pass and contrastive loss; returns (loss, metrics)."""
        out = self.model.apply({"params": params}, {k: batch[k] for k in self.batch_keys}, train=True,
                               rngs={"dropout": rng})
        # Keep the embeddings row-sharded so each device builds only its B_local x B_global block of logits.
        zimg = nn.with_logical_constraint(out[f"{self.pair[0]}_embeds"], ("batch", "joint"))
        ztxt = nn.with_logical_constraint(out[f"{self.pair[1]}_embeds"], ("batch", "joint"))
        if self.loss_name == "softmax":
            loss = losses.softmax_contrastive_loss(zimg, ztxt, out["logit_scale"])
        elif self.loss_name == "sigmoid":
            loss = losses.sigmoid_contrastive_loss(zimg, ztxt, out["logit_scale"], out["logit_bias"])
        else:
            loss = losses.hinge_rank_loss(zimg, ztxt, self.margin, valid=self._distinct_texts(batch),
                                          **losses.RANKING_LOSSES[self.loss_name])
        # In-batch top-1 (identical captions count as wrong here): a rough progress signal, not an eval.
        metrics = {"logit_scale": out["logit_scale"], "logit_bias": out["logit_bias"],
                   **{f"batch_{k}": v for k, v in losses.contrastive_metrics(zimg, ztxt).items()}}
        return loss, metrics

    @staticmethod
    def _distinct_texts(batch: dict[str, jax.Array]) -> jax.Array | None:
        """[B, B] True where rows i and j hold different captions; None for a batch without text_ids."""
        if "text_ids" not in batch:
            return None
        # A duplicate caption is a second positive, not a negative: pushing it away would fight the true match.
        ids = batch["text_ids"]
        return ~jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
