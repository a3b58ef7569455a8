"""Single-stream image-text pretraining: masked language modelling + image-text matching (ViLT-style).

Per step, with masks and negatives drawn on device from the step's key:
  - ITM on 2B pairs: the B true pairs and B mismatches. Each mismatch is, by `task.negatives` weights, an in-batch
    caption of another image (never an identical caption), or the example's own caption with its colour or its
    shape changed (the data pipeline's hard negatives, which only grounding can reject).
  - MLM on the B true pairs with 15% of caption tokens masked (80/10/10).
Evaluation reports ITM accuracy on true pairs, random mismatches and each kind of one-attribute mismatch, and MLM
accuracy (overall, and on masked colour / shape words), on the held-out split.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax import losses, objectives, sharding
from mmjax.data import easy_vqa_captions, pipeline

MODEL_KEYS = ("image", "text_ids", "text_mask")
NEGATIVE_KINDS = ("in_batch", "other_color", "other_shape")


class MatchingTask:
    """MLM + ITM for single-stream fusion models whose outputs include `mlm_logits` and `itm_logits`."""

    data_options = {"hard_negatives": True}

    def __init__(self, model: nn.Module, config: Any, mesh: Mesh, tokenizer: Any):
        self.model = model
        self.config = config
        self.mesh = mesh
        self.tokenizer = tokenizer
        unknown = sorted(set(config.objectives) - {"mlm", "itm"})
        if unknown:
            raise ValueError(f"objectives {unknown} are not supported by the matching task (known: mlm, itm)")
        self.weights = {k: float(config.objectives.get(k, 0.0)) for k in ("mlm", "itm")}
        neg = config.itm.negatives
        probs = np.array([float(neg[k]) for k in NEGATIVE_KINDS])
        if probs.sum() <= 0:
            raise ValueError(f"itm.negatives must give some weight to one of {NEGATIVE_KINDS}")
        self.negative_logits = np.log(np.maximum(probs / probs.sum(), 1e-12)).astype(np.float32)
        self.mask_prob = float(config.mlm.mask_prob)

        def forward(p, b):
            out = model.apply({"params": p}, b)
            return {k: out[k] for k in ("itm_logits", "mlm_logits")}

        self._forward = jax.jit(forward, out_shardings=sharding.replicated(mesh))

    def dummy_batch(self, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one model batch, for abstract initialisation."""
        return pipeline.batch_shapes(self.config.data, batch_size)

    def _special_ids(self) -> list[int]:
        tok = self.tokenizer
        return [tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id]

    def _mask(self, rng: jax.Array, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return objectives.mask_tokens(rng, ids, mask, mask_id=self.tokenizer.mask_id,
                                      vocab_size=self.tokenizer.vocab_size, special_ids=self._special_ids(),
                                      mask_prob=self.mask_prob)

    def _mismatches(self, rng: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(ids, mask, valid) of one mismatched caption per example, its kind drawn by the configured weights."""
        k_kind, k_batch = jax.random.split(rng)
        ids, mask = batch["text_ids"], batch["text_mask"]
        # Identical captions are not mismatches: forbid them as in-batch negatives.
        same = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
        neg_index, valid = objectives.itm_negatives(k_batch, jnp.zeros(same.shape, jnp.float32),
                                                    same_image=same, hard=False)
        candidates_ids = jnp.stack([ids[neg_index], batch["other_color_text_ids"], batch["other_shape_text_ids"]])
        candidates_mask = jnp.stack([mask[neg_index], batch["other_color_text_mask"],
                                     batch["other_shape_text_mask"]])
        kind = jax.random.categorical(k_kind, jnp.asarray(self.negative_logits), shape=(ids.shape[0],))
        rows = jnp.arange(ids.shape[0])
        valid = jnp.where(kind == 0, valid, True)
        return candidates_ids[kind, rows], candidates_mask[kind, rows], valid

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Weighted MLM + ITM loss; returns (loss, metrics)."""
        k_neg, k_mlm, k_drop = jax.random.split(rng, 3)
        neg_ids, neg_mask, neg_valid = self._mismatches(k_neg, batch)
        masked_ids, labels, label_mask = self._mask(k_mlm, batch["text_ids"], batch["text_mask"])
        b = batch["text_ids"].shape[0]

        # One forward over 3B rows: [true pairs (ITM) ; mismatches (ITM) ; masked true pairs (MLM)].
        model_batch = {
            "image": jnp.concatenate([batch["image"]] * 3),
            "text_ids": jnp.concatenate([batch["text_ids"], neg_ids, masked_ids]),
            "text_mask": jnp.concatenate([batch["text_mask"], neg_mask, batch["text_mask"]]),
        }
        out = self.model.apply({"params": params}, model_batch, train=True, rngs={"dropout": k_drop})
        itm_labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((b,), jnp.int32)])
        itm_weights = jnp.concatenate([jnp.ones((b,), jnp.float32), neg_valid.astype(jnp.float32)])
        itm, itm_acc = losses.itm_loss(out["itm_logits"][: 2 * b], itm_labels, itm_weights)
        mlm, mlm_acc = losses.masked_lm_loss(out["mlm_logits"][2 * b:], labels, label_mask)
        total = self.weights["itm"] * itm + self.weights["mlm"] * mlm
        return total, {"itm_loss": itm, "itm_acc": itm_acc, "mlm_loss": mlm, "mlm_acc": mlm_acc}

    def evaluate(self, params: Any) -> dict[str, float]:
        """Held-out ITM accuracy (true pairs, random and one-attribute mismatches) and MLM accuracy."""
        cfg = self.config
        tok = self.tokenizer
        word_id = {w: tok.encode([w], 3)[0][0][1] for w in (*easy_vqa_captions.COLORS, *easy_vqa_captions.SHAPES)}
        color_ids = np.array([word_id[w] for w in easy_vqa_captions.COLORS])
        shape_ids = np.array([word_id[w] for w in easy_vqa_captions.SHAPES])
        mask_fn = jax.jit(self._mask)
        totals: dict[str, list[float]] = {}

        def add(name, correct, weight):
            s = totals.setdefault(name, [0.0, 0.0])
            s[0] += float(np.sum(correct * weight))
            s[1] += float(np.sum(weight))

        for i, local in enumerate(pipeline.eval_batches(cfg.data, tok, global_batch_size=cfg.eval.batch_size,
                                                        hard_negatives=True)):
            # Metrics see the global batch (every process's rows, in the order of the global arrays).
            local = {k: sharding.global_numpy(v, self.mesh) for k, v in local.items()}
            real = np.asarray(local["mask"], np.float32)
            ids, mask = local["text_ids"], local["text_mask"]
            # Random mismatch: the next example's caption, skipped where that caption is identical.
            rolled_ids, rolled_mask = np.roll(ids, 1, axis=0), np.roll(mask, 1, axis=0)
            differs = np.any(rolled_ids != ids, axis=1).astype(np.float32)
            masked_ids, labels, label_mask = (np.asarray(x) for x in mask_fn(jax.random.key(i), ids, mask))
            variants = {"true": (ids, mask, 1), "random": (rolled_ids, rolled_mask, 0),
                        "other_color": (local["other_color_text_ids"], local["other_color_text_mask"], 0),
                        "other_shape": (local["other_shape_text_ids"], local["other_shape_text_mask"], 0)}
            for name, (t_ids, t_mask, target) in variants.items():
                out = self._run(params, local["image"], t_ids, t_mask)
                correct = (np.argmax(out["itm_logits"], -1) == target).astype(np.float32)
                add(f"itm_acc_{name}", correct, real * (differs if name == "random" else 1.0))
            out = self._run(params, local["image"], masked_ids, mask)
            pred = np.argmax(out["mlm_logits"], -1)
            chosen = (label_mask > 0) * real[:, None]
            hit = (pred == labels).astype(np.float32)
            add("mlm_acc", hit, chosen)
            add("mlm_acc_color_words", hit, chosen * np.isin(labels, color_ids))
            add("mlm_acc_shape_words", hit, chosen * np.isin(labels, shape_ids))

        metrics = {k: s[0] / max(s[1], 1.0) for k, s in totals.items()}
        # Balanced accuracies: true pairs weigh as much as the mismatches they are contrasted with.
        metrics["itm_acc"] = 0.5 * (metrics["itm_acc_true"] + metrics["itm_acc_random"])
        metrics["itm_acc_hard"] = 0.5 * metrics["itm_acc_true"] + 0.25 * (
            metrics["itm_acc_other_color"] + metrics["itm_acc_other_shape"])
        return metrics

    def _run(self, params: Any, image: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Forward one global eval batch, sharded over the mesh; outputs come back whole on every process."""
        shard = sharding.batch_sharding(self.mesh)
        batch = {k: jax.device_put(v, shard) for k, v in (("image", image), ("text_ids", ids), ("text_mask", mask))}
        out = self._forward(params, batch)
        return {k: np.asarray(out[k]) for k in ("itm_logits", "mlm_logits")}
