"""Contrastive pretraining of a dual encoder (CLIP / SigLIP for image-text, CLAP and speech-image for audio):
symmetric InfoNCE or the sigmoid loss over the global batch, between the model's two modalities' embeddings.

Evaluation is declared in the config (zero-shot classification, retrieval: mmjax/evaluation/evaluators.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

from mmjax import losses



class ContrastiveTask:
    """Symmetric InfoNCE (the model's `loss='softmax'`) or sigmoid (`loss='sigmoid'`) loss over the global batch,
    between `{a}_embeds` and `{b}_embeds` for the model's `modalities` (a, b) (CLIP: image and text)."""

    def __init__(self, model: nn.Module, config: Any, meta: Any, tokenizer: Any, mesh: Mesh):
        del config, tokenizer  # the model says which loss it was built for and which modalities it pairs
        self.model = model
        self.pair = tuple(getattr(model, "modalities", ("image", "text")))
        self.batch_keys = tuple(meta.model_keys) or ("image", "text_ids", "text_mask")
        self.mesh = mesh
        self.loss_name = getattr(model, "loss", "softmax")
        if self.loss_name not in ("softmax", "sigmoid"):
            raise ValueError(f"model.loss must be 'softmax' or 'sigmoid', got {self.loss_name!r}")

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Forward pass and contrastive loss; returns (loss, metrics)."""
        out = self.model.apply({"params": params}, {k: batch[k] for k in self.batch_keys}, train=True,
                               rngs={"dropout": rng})
        # Keep the embeddings row-sharded so each device builds only its B_local x B_global block of logits.
        zimg = nn.with_logical_constraint(out[f"{self.pair[0]}_embeds"], ("batch", "joint"))
        ztxt = nn.with_logical_constraint(out[f"{self.pair[1]}_embeds"], ("batch", "joint"))
        if self.loss_name == "softmax":
            loss = losses.softmax_contrastive_loss(zimg, ztxt, out["logit_scale"])
        else:
            loss = losses.sigmoid_contrastive_loss(zimg, ztxt, out["logit_scale"], out["logit_bias"])
        # In-batch top-1 (identical captions count as wrong here): a rough progress signal, not an eval.
        metrics = {"logit_scale": out["logit_scale"], "logit_bias": out["logit_bias"],
                   **{f"batch_{k}": v for k, v in losses.contrastive_metrics(zimg, ztxt).items()}}
        return loss, metrics
