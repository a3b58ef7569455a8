"""Contrastive image-text pretraining (CLIP / SigLIP) and its zero-shot + retrieval evaluation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax import losses, sharding
from mmjax.data import pipeline
from mmjax.evaluation import retrieval, zero_shot

BATCH_KEYS = ("image", "text_ids", "text_mask")


class ContrastiveTask:
    """Symmetric InfoNCE (`loss='softmax'`) or sigmoid (`loss='sigmoid'`) loss over the global batch."""

    data_options: dict = {}  # extra arguments for pipeline.train_iterator

    def __init__(self, model: nn.Module, config: Any, mesh: Mesh, tokenizer: Any):
        self.model = model
        self.config = config
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.loss_name = config.model.get("loss", "softmax")
        if self.loss_name not in ("softmax", "sigmoid"):
            raise ValueError(f"model.loss must be 'softmax' or 'sigmoid', got {self.loss_name!r}")
        # Jitted once here, not per evaluation: embeddings come back replicated on every process.
        replicated = sharding.replicated(mesh)
        self._encode_image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"),
                                     out_shardings=replicated)
        self._encode_text = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method="encode_text"),
                                    out_shardings=replicated)

    def dummy_batch(self, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one batch, for abstract initialisation."""
        return pipeline.batch_shapes(self.config.data, batch_size)

    def train_batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one training batch (for a dry run of the step)."""
        return self.dummy_batch(batch_size)

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Forward pass and contrastive loss; returns (loss, metrics)."""
        out = self.model.apply({"params": params}, {k: batch[k] for k in BATCH_KEYS}, train=True,
                               rngs={"dropout": rng})
        # Keep the embeddings row-sharded so each device builds only its B_local x B_global block of logits.
        zimg = nn.with_logical_constraint(out["image_embeds"], ("batch", "joint"))
        ztxt = nn.with_logical_constraint(out["text_embeds"], ("batch", "joint"))
        if self.loss_name == "softmax":
            loss = losses.softmax_contrastive_loss(zimg, ztxt, out["logit_scale"])
        else:
            loss = losses.sigmoid_contrastive_loss(zimg, ztxt, out["logit_scale"], out["logit_bias"])
        loss = loss[0] if isinstance(loss, tuple) else loss
        logits = zimg @ ztxt.T
        # In-batch accuracy counts identical captions as correct only via the diagonal: a rough progress signal.
        acc = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
        return loss, {"logit_scale": out["logit_scale"], "logit_bias": out["logit_bias"], "batch_i2t_acc": acc}

    def evaluate(self, params: Any) -> dict[str, float]:
        """Retrieval R@1/5/10 on the held-out split, and zero-shot accuracy over the embedded dataset's classes."""
        cfg = self.config
        images, texts, ids, labels = [], [], [], []
        for local in pipeline.eval_batches(cfg.data, self.tokenizer, global_batch_size=cfg.eval.batch_size):
            keep = np.asarray(local["mask"]) > 0
            batch = sharding.make_global_batch({k: local[k] for k in BATCH_KEYS}, self.mesh)
            # Every process holds the whole (small) eval set's embeddings.
            img = np.asarray(self._encode_image(params, batch["image"]))
            txt = np.asarray(self._encode_text(params, batch["text_ids"], batch["text_mask"]))
            mask = sharding.global_numpy(keep.astype(np.float32), self.mesh) > 0
            images.append(img[mask])
            texts.append(txt[mask])
            ids.append(sharding.global_numpy(local["text_ids"], self.mesh)[mask])
            if "label" in local:
                labels.append(sharding.global_numpy(local["label"], self.mesh)[mask])
        image_embeds, text_embeds = np.concatenate(images), np.concatenate(texts)
        keys = retrieval.caption_keys(np.concatenate(ids))
        metrics = {}
        if pipeline.uses_sources(cfg.data):  # real data has no class names to prompt with: retrieval only
            metrics.update(retrieval.retrieval_recall(image_embeds, text_embeds, keys, cfg.eval.retrieval_ks))
            metrics["i2t_r@1_chance"] = retrieval.chance_recall(keys, 1)
            metrics["num_examples"] = float(len(keys))
            return metrics
        labels_np = np.concatenate(labels)

        prompts = pipeline.class_prompts(self.tokenizer, cfg.data.max_len)
        num_classes, num_templates, length = prompts["text_ids"].shape
        prompt_embeds = np.asarray(self._encode_text(
            params, prompts["text_ids"].reshape(-1, length), prompts["text_mask"].reshape(-1, length)))
        class_embeds = zero_shot.class_embeddings(prompt_embeds.reshape(num_classes, num_templates, -1))

        metrics["zero_shot_acc"] = zero_shot.zero_shot_accuracy(image_embeds, class_embeds, labels_np)
        metrics.update(retrieval.retrieval_recall(image_embeds, text_embeds, keys, cfg.eval.retrieval_ks))
        metrics["i2t_r@1_chance"] = retrieval.chance_recall(keys, 1)
        metrics["num_examples"] = float(len(labels_np))
        return metrics
