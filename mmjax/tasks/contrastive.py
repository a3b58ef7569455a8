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

from mmjax import losses, sharded_losses, sharding

LOSSES = ("softmax", "sigmoid", *losses.RANKING_LOSSES)
LOSS_IMPLS = ("auto", "dense", "sharded")
SHARDABLE_LOSSES = ("softmax", "sigmoid")


class ContrastiveTask:
    """The model's `loss` over the global batch, between `{a}_embeds` and `{b}_embeds` for its `modalities` (a, b)
    (CLIP: image and text): 'softmax' (symmetric InfoNCE), 'sigmoid', or a ranking loss with the model's `margin`:
    'hinge' (DeViSE, a -> b), 'triplet' (VSE) or 'triplet_hardest' (VSE++) (losses.RANKING_LOSSES).

    The ranking losses score by plain cosine similarity: logit_scale gets no gradient and the logged one stays at
    its init. Identical captions (equal text_ids rows) are not negatives of each other for them.

    config.task.loss_impl says how the loss is computed over a batch split across devices (same value and
    gradients either way): 'dense' is the global losses.* under jit (XLA partitions the [B, B] logits by rows);
    'sharded' is mmjax.sharded_losses under shard_map, which guarantees per-device memory of B_local x B_global
    (softmax) or B_local x B_local (sigmoid, SigLIP's ring) logits, the batch metrics computed in the same blocks;
    softmax and sigmoid only. 'auto' (the default) is 'sharded' for those two when the mesh splits the batch
    (data x fsdp > 1) and 'dense' otherwise (one device, no mesh, ranking losses), where there is nothing to split.
    """

    def __init__(self, model: nn.Module, config: Any, meta: Any, tokenizer: Any, mesh: Mesh):
        del tokenizer  # the model says which loss it was built for and which modalities it pairs
        self.model = model
        self.pair = tuple(getattr(model, "modalities", ("image", "text")))
        self.batch_keys = tuple(meta.model_keys) or ("image", "text_ids", "text_mask")
        self.mesh = mesh
        self.loss_name = getattr(model, "loss", "softmax")
        if self.loss_name not in LOSSES:
            raise ValueError(f"model.loss must be one of {LOSSES}; got {self.loss_name!r}")
        self.margin = float(getattr(model, "margin", 0.0))
        self.loss_impl = self._resolve_impl(config)

    def _resolve_impl(self, config: Any) -> str:
        """config.task.loss_impl ('auto' when absent) -> 'dense' or 'sharded'."""
        task = getattr(config, "task", None) if config is not None else None
        impl = task.get("loss_impl", "auto") if hasattr(task, "get") else "auto"
        if impl not in LOSS_IMPLS:
            raise ValueError(f"task.loss_impl must be one of {LOSS_IMPLS}; got {impl!r}")
        if impl == "sharded" and self.loss_name not in SHARDABLE_LOSSES:
            raise ValueError(f"task.loss_impl='sharded' supports model.loss in {SHARDABLE_LOSSES}; got "
                             f"{self.loss_name!r} (use 'dense' or 'auto')")
        if impl == "sharded" and self.mesh is None:
            raise ValueError("task.loss_impl='sharded' needs the task's mesh")
        if impl == "auto":
            splits = self.mesh is not None and sharding.data_parallel_size(self.mesh) > 1
            impl = "sharded" if splits and self.loss_name in SHARDABLE_LOSSES else "dense"
        return impl

    def embed(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> dict[str, jax.Array]:
        """The model's forward pass: its output dict ({a}_embeds, {b}_embeds, logit_scale, logit_bias, ...)."""
        return self.model.apply({"params": params}, {k: batch[k] for k in self.batch_keys}, train=True,
                                rngs={"dropout": rng})

    def loss_from_outputs(self, out: dict[str, jax.Array], batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
        """The loss and metrics of `embed`'s outputs over the whole batch (batch: the ranking losses' captions)."""
        zimg, ztxt = out[f"{self.pair[0]}_embeds"], out[f"{self.pair[1]}_embeds"]
        if self.loss_impl == "sharded":
            if self.loss_name == "softmax":
                loss = sharded_losses.softmax_contrastive_loss_sharded(zimg, ztxt, out["logit_scale"], self.mesh)
            else:
                loss = sharded_losses.sigmoid_contrastive_loss_chunked(zimg, ztxt, out["logit_scale"],
                                                                       out["logit_bias"], self.mesh)
            batch_metrics = sharded_losses.contrastive_metrics_sharded(zimg, ztxt, self.mesh)
        else:
            # Keep the embeddings row-sharded so each device builds only its B_local x B_global block of logits.
            zimg = nn.with_logical_constraint(zimg, ("activation_batch", "activation_joint"))
            ztxt = nn.with_logical_constraint(ztxt, ("activation_batch", "activation_joint"))
            if self.loss_name == "softmax":
                loss = losses.softmax_contrastive_loss(zimg, ztxt, out["logit_scale"])
            elif self.loss_name == "sigmoid":
                loss = losses.sigmoid_contrastive_loss(zimg, ztxt, out["logit_scale"], out["logit_bias"])
            else:
                loss = losses.hinge_rank_loss(zimg, ztxt, self.margin, valid=self._distinct_texts(batch),
                                              **losses.RANKING_LOSSES[self.loss_name])
            batch_metrics = losses.contrastive_metrics(zimg, ztxt)
        # In-batch top-1 (identical captions count as wrong here): a rough progress signal, not an eval.
        metrics = {"logit_scale": out["logit_scale"], "logit_bias": out["logit_bias"],
                   **{f"batch_{k}": v for k, v in batch_metrics.items()}}
        return loss, metrics

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Forward pass and contrastive loss; returns (loss, metrics): loss_from_outputs(embed(...), batch)."""
        return self.loss_from_outputs(self.embed(params, batch, rng), batch)

    @staticmethod
    def _distinct_texts(batch: dict[str, jax.Array]) -> jax.Array | None:
        """[B, B] True where rows i and j hold different captions; None for a batch without text_ids."""
        if "text_ids" not in batch:
            return None
        # A duplicate caption is a second positive, not a negative: pushing it away would fight the true match.
        ids = batch["text_ids"]
        return ~jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
