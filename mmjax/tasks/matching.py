"""Single- and two-stream image-text pretraining: MLM, ITM, word-region alignment and masked region modelling.

One task serves ViLT (patches), UNITER and ViLBERT (regions) and the generic fusion models: the model reads the
batch keys of `pipeline.batch_shapes` and returns `itm_logits` / `mlm_logits` (+ `text_tokens`, `image_tokens`,
`image_mask` for WPA, `mrfr_pred` / `mrc_logits` for region models). Objectives and their weights come from
`config.objectives` (e.g. {mlm: 1, itm: 1, wpa: 0.1, mrfr: 1, mrc: 1}); masks and negatives are drawn on device
from the step's key. One forward per step over stacked rows:

  ITM rows     2B   the B true pairs and B mismatches; each mismatch is, by `itm.negatives` weights, an in-batch
                    caption of another image (never an identical caption), or the example's own caption with its
                    colour or its shape changed (the pipeline's hard negatives, which only grounding rejects).
                    WPA (IPOT word-region / word-patch alignment) runs on these rows.
  MLM rows     B    15% of caption tokens masked (80/10/10; `mlm.whole_word` masks whole words).
  region rows  B    (MRFR / MRC) 15% of regions have their features zeroed; targets are the input features
                    (MRFR) and the regions' soft class distributions (MRC, KL).
  `masking = "conditional"` (UNITER) keeps MLM and region rows apart, so one modality is masked at a time and
  the other supplies the evidence; `"joint"` (ViLBERT's masked multimodal modelling) masks both in the same B rows.

Evaluation on the held-out split: ITM accuracy on true pairs, random mismatches and each kind of one-attribute
mismatch; MLM accuracy overall and on masked colour / shape words; MRC accuracy (argmax) for region models.
"""

from __future__ import annotations

import types
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmjax import losses, objectives, sharding
from mmjax.data import easy_vqa_captions, pipeline

NEGATIVE_KINDS = ("in_batch", "other_color", "other_shape")
OBJECTIVES = ("mlm", "itm", "wpa", "mrfr", "mrc")
MASKING = ("conditional", "joint")
# Stand-in for a dry run, which traces the step without loading a tokenizer: BERT-base's special ids and vocab
# (only shapes matter there).
DRY_RUN_TOKENIZER = types.SimpleNamespace(pad_id=0, unk_id=100, cls_id=101, sep_id=102, mask_id=103,
                                          vocab_size=30522, continuation_table=lambda: np.zeros(30522, bool))
# Model outputs each objective needs.
NEEDS = {"mlm": ("mlm_logits",), "itm": ("itm_logits",), "wpa": ("text_tokens", "image_tokens", "image_mask"),
         "mrfr": ("mrfr_pred",), "mrc": ("mrc_logits",)}


def default_task_config(**objectives: float) -> ml_collections.ConfigDict:
    """The matching task's config sections (task, objectives with the given weights, itm, mlm, mrm, masking, wpa);
    experiment configs start from it and add model, data, optimizer and train."""
    unknown = sorted(set(objectives) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; known: {OBJECTIVES}")
    c = ml_collections.ConfigDict()
    c.task = "matching"
    c.objectives = ml_collections.ConfigDict(objectives)
    # Half of the mismatches change the shape: the attribute that needs grounding (colour is spotted early).
    c.itm = ml_collections.ConfigDict(dict(negatives=dict(in_batch=1.0, other_color=1.0, other_shape=2.0)))
    c.mlm = ml_collections.ConfigDict(dict(mask_prob=0.15, whole_word=False))
    c.mrm = ml_collections.ConfigDict(dict(mask_prob=0.15))  # masked region modelling (MRFR / MRC)
    c.masking = "conditional"  # UNITER; "joint" = ViLBERT's masked multimodal modelling
    c.wpa = ml_collections.ConfigDict(dict(iterations=50))  # IPOT proximal steps (UNITER / ViLT use 50)
    return c


class MatchingTask:
    """MLM + ITM (+ WPA, MRFR, MRC) for fusion models; see the module docstring for rows, masks and metrics."""

    def __init__(self, model: nn.Module, config: Any, mesh: Mesh, tokenizer: Any):
        self.model = model
        self.config = config
        self.mesh = mesh
        # One-attribute negative captions come with the embedded dataset only; real data uses in-batch negatives.
        self.attribute_negatives = not pipeline.uses_sources(config.data)
        self.data_options = {"hard_negatives": self.attribute_negatives}
        self.tokenizer = DRY_RUN_TOKENIZER if tokenizer is None else tokenizer
        unknown = sorted(set(config.objectives) - set(OBJECTIVES))
        if unknown:
            raise ValueError(f"objectives {unknown} are not supported by the matching task (known: {OBJECTIVES})")
        self.weights = {k: float(config.objectives.get(k, 0.0)) for k in OBJECTIVES}
        if not any(self.weights.values()):
            raise ValueError(f"objectives: give some weight to one of {OBJECTIVES}")
        self.regions = bool(config.data.regions.enabled)
        if (self.weights["mrfr"] or self.weights["mrc"]) and not self.regions:
            raise ValueError("objectives mrfr / mrc need region inputs: set data.regions.enabled=True")
        neg = config.itm.negatives
        probs = np.array([float(neg[k]) for k in NEGATIVE_KINDS])
        if not self.attribute_negatives:
            probs[1:] = 0.0  # real data has no attribute-swapped captions: every mismatch is in-batch
        if probs.sum() <= 0:
            raise ValueError(f"itm.negatives must give some weight to one of {NEGATIVE_KINDS}")
        self.negative_logits = np.log(np.maximum(probs / probs.sum(), 1e-12)).astype(np.float32)
        self.mask_prob = float(config.mlm.mask_prob)
        self.whole_word = bool(config.mlm.whole_word)
        self.region_mask_prob = float(config.mrm.mask_prob)
        self.masking = config.masking
        if self.masking not in MASKING:
            raise ValueError(f"masking must be one of {MASKING}; got {self.masking!r}")
        self.wpa_iterations = int(config.wpa.iterations)
        self.continuation = self.tokenizer.continuation_table() if self.whole_word else None
        self.model_keys = tuple(pipeline.batch_shapes(config.data))
        # Models that put an image [CLS] first (ViLT) leave it out of word-patch alignment, as ViLT does.
        self.skip_image_cls = bool(getattr(model, "image_cls_first", False))
        outputs = ("itm_logits", "mlm_logits") + (("mrc_logits",) if self.regions else ())

        def forward(p, b):
            out = model.apply({"params": p}, b)
            return {k: out[k] for k in outputs if k in out}

        self._forward = jax.jit(forward, out_shardings=sharding.replicated(mesh))

    def dummy_batch(self, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one model batch, for abstract initialisation."""
        shapes = pipeline.batch_shapes(self.config.data, batch_size)
        if self.regions:
            shapes["region_feature_mask"] = jax.ShapeDtypeStruct(shapes["region_mask"].shape, np.int32)
        return shapes

    def train_batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one training batch as the pipeline delivers it (for a dry run of the step)."""
        shapes = pipeline.batch_shapes(self.config.data, batch_size)
        for prefix in ("other_color_", "other_shape_") if self.attribute_negatives else ():
            shapes[prefix + "text_ids"] = shapes["text_ids"]
            shapes[prefix + "text_mask"] = shapes["text_mask"]
        if self.regions and self.weights["mrc"]:
            r = shapes["region_mask"].shape[1]
            shapes["region_targets"] = jax.ShapeDtypeStruct(
                (batch_size, r, pipeline.num_region_classes(self.config.data)), np.float32)
        return shapes

    def _special_ids(self) -> list[int]:
        tok = self.tokenizer
        return [tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id]

    def _mask(self, rng: jax.Array, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        word_ids = None
        if self.whole_word:
            maskable = (mask > 0) & ~jnp.isin(ids, jnp.asarray(self._special_ids(), ids.dtype))
            word_ids = objectives.word_ids_from_pieces(ids, maskable, self.continuation)
        return objectives.mask_tokens(rng, ids, mask, mask_id=self.tokenizer.mask_id,
                                      vocab_size=self.tokenizer.vocab_size, special_ids=self._special_ids(),
                                      mask_prob=self.mask_prob, word_ids=word_ids)

    def _mismatches(self, rng: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(ids, mask, valid) of one mismatched caption per example, its kind drawn by the configured weights."""
        k_kind, k_batch = jax.random.split(rng)
        ids, mask = batch["text_ids"], batch["text_mask"]
        # Identical captions are not mismatches: forbid them as in-batch negatives.
        same = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
        neg_index, valid = objectives.itm_negatives(k_batch, jnp.zeros(same.shape, jnp.float32),
                                                    same_image=same, hard=False)
        if not self.attribute_negatives:
            return ids[neg_index], mask[neg_index], valid
        candidates_ids = jnp.stack([ids[neg_index], batch["other_color_text_ids"], batch["other_shape_text_ids"]])
        candidates_mask = jnp.stack([mask[neg_index], batch["other_color_text_mask"],
                                     batch["other_shape_text_mask"]])
        kind = jax.random.categorical(k_kind, jnp.asarray(self.negative_logits), shape=(ids.shape[0],))
        rows = jnp.arange(ids.shape[0])
        valid = jnp.where(kind == 0, valid, True)
        return candidates_ids[kind, rows], candidates_mask[kind, rows], valid

    def _rows(self, batch: dict, text: tuple[jax.Array, jax.Array], region_masked: jax.Array | None) -> dict:
        """One block of model rows: the batch's image / regions with the given text and masked regions."""
        rows = {k: batch[k] for k in self.model_keys if k not in ("text_ids", "text_mask")}
        rows["text_ids"], rows["text_mask"] = text
        if self.regions:
            zeros = jnp.zeros(batch["region_mask"].shape, jnp.int32)
            rows["region_feature_mask"] = zeros if region_masked is None else region_masked.astype(jnp.int32)
        return rows

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Weighted sum of the configured objectives; returns (loss, metrics)."""
        k_neg, k_mlm, k_region, k_drop = jax.random.split(rng, 4)
        w = self.weights
        b = batch["text_ids"].shape[0]
        text = (batch["text_ids"], batch["text_mask"])
        blocks, offsets = [], {}

        def add(name, rows):
            offsets[name] = b * len(blocks)
            blocks.append(rows)

        if w["itm"] or w["wpa"]:
            neg_ids, neg_mask, neg_valid = self._mismatches(k_neg, batch)
            add("itm_true", self._rows(batch, text, None))
            add("itm_false", self._rows(batch, (neg_ids, neg_mask), None))
        region_masked = None
        if self.regions and (w["mrfr"] or w["mrc"]):
            region_masked = objectives.mask_regions(k_region, batch["region_mask"], self.region_mask_prob)
        if w["mlm"]:
            masked_ids, labels, label_mask = self._mask(k_mlm, *text)
            joint = self.masking == "joint" and region_masked is not None
            add("mlm", self._rows(batch, (masked_ids, batch["text_mask"]), region_masked if joint else None))
            if joint:
                offsets["regions"] = offsets["mlm"]
        if region_masked is not None and "regions" not in offsets:
            add("regions", self._rows(batch, text, region_masked))

        model_batch = {k: jnp.concatenate([rows[k] for rows in blocks]) for k in blocks[0]}
        out = self.model.apply({"params": params}, model_batch, train=True, rngs={"dropout": k_drop})
        for name, weight in w.items():
            missing = [k for k in NEEDS[name] if k not in out]
            if weight and missing:
                raise ValueError(f"objective {name!r} needs model outputs {missing}; {type(self.model).__name__} "
                                 f"returned {sorted(out)} (is its head switched off?)")

        def part(key, name):
            return out[key][offsets[name]: offsets[name] + b]

        total, metrics = jnp.zeros((), jnp.float32), {}
        if "itm_true" in offsets:
            itm_labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((b,), jnp.int32)])
            itm_weights = jnp.concatenate([jnp.ones((b,), jnp.float32), neg_valid.astype(jnp.float32)])
        if w["itm"]:
            logits = jnp.concatenate([part("itm_logits", "itm_true"), part("itm_logits", "itm_false")])
            metrics["itm_loss"], metrics["itm_acc"] = losses.itm_loss(logits, itm_labels, itm_weights)
            total += w["itm"] * metrics["itm_loss"]
        if w["wpa"]:
            txt = jnp.concatenate([part("text_tokens", "itm_true"), part("text_tokens", "itm_false")])
            img = jnp.concatenate([part("image_tokens", "itm_true"), part("image_tokens", "itm_false")])
            img_mask = jnp.concatenate([part("image_mask", "itm_true"), part("image_mask", "itm_false")])
            if self.skip_image_cls:
                img_mask = img_mask.at[:, 0].set(0)
            txt_mask = objectives.content_mask(jnp.concatenate([batch["text_mask"], neg_mask]))
            # Invalid negatives (an identical caption) weigh 0: drop them from both signs of the sum.
            txt_mask = txt_mask * itm_weights[:, None].astype(txt_mask.dtype)
            metrics["wpa_loss"] = losses.word_patch_alignment_loss(txt, txt_mask, img, img_mask, itm_labels,
                                                                   iterations=self.wpa_iterations)
            total += w["wpa"] * metrics["wpa_loss"]
        if w["mlm"]:
            metrics["mlm_loss"], metrics["mlm_acc"] = losses.masked_lm_loss(part("mlm_logits", "mlm"), labels,
                                                                            label_mask)
            total += w["mlm"] * metrics["mlm_loss"]
        if w["mrfr"]:
            metrics["mrfr_loss"] = losses.masked_feature_regression_loss(
                part("mrfr_pred", "regions"), batch["region_feats"], region_masked)
            total += w["mrfr"] * metrics["mrfr_loss"]
        if w["mrc"]:
            metrics["mrc_loss"] = losses.masked_region_classification_loss(
                part("mrc_logits", "regions"), batch["region_targets"], region_masked)
            total += w["mrc"] * metrics["mrc_loss"]
        return total, metrics

    def evaluate(self, params: Any) -> dict[str, float]:
        """Held-out ITM accuracy (true pairs, random and one-attribute mismatches), MLM and MRC accuracy."""
        cfg = self.config
        tok = self.tokenizer
        attributes = self.attribute_negatives  # the embedded dataset's colour / shape words and captions
        word_id = {w: tok.encode([w], 3)[0][0][1] for w in (*easy_vqa_captions.COLORS, *easy_vqa_captions.SHAPES)}
        color_ids = np.array([word_id[w] for w in easy_vqa_captions.COLORS])
        shape_ids = np.array([word_id[w] for w in easy_vqa_captions.SHAPES])
        background = pipeline.num_region_classes(cfg.data) - 1 if self.regions and self.weights["mrc"] else None
        mask_fn = jax.jit(self._mask)
        region_fn = jax.jit(lambda k, m: objectives.mask_regions(k, m, self.region_mask_prob))
        totals: dict[str, list[float]] = {}

        def add(name, correct, weight):
            s = totals.setdefault(name, [0.0, 0.0])
            s[0] += float(np.sum(correct * weight))
            s[1] += float(np.sum(weight))

        for i, local in enumerate(pipeline.eval_batches(cfg.data, tok, global_batch_size=cfg.eval.batch_size,
                                                        hard_negatives=attributes)):
            # Metrics see the global batch (every process's rows, in the order of the global arrays).
            local = {k: sharding.global_numpy(v, self.mesh) for k, v in local.items()}
            real = np.asarray(local["mask"], np.float32)
            ids, mask = local["text_ids"], local["text_mask"]
            # Random mismatch: the next example's caption, skipped where that caption is identical.
            rolled_ids, rolled_mask = np.roll(ids, 1, axis=0), np.roll(mask, 1, axis=0)
            differs = np.any(rolled_ids != ids, axis=1).astype(np.float32)
            masked_ids, labels, label_mask = (np.asarray(x) for x in mask_fn(jax.random.key(i), ids, mask))
            variants = {"true": (ids, mask, 1), "random": (rolled_ids, rolled_mask, 0)}
            if attributes:
                variants["other_color"] = (local["other_color_text_ids"], local["other_color_text_mask"], 0)
                variants["other_shape"] = (local["other_shape_text_ids"], local["other_shape_text_mask"], 0)
            for name, (t_ids, t_mask, target) in variants.items():
                out = self._run(params, local, t_ids, t_mask)
                correct = (np.argmax(out["itm_logits"], -1) == target).astype(np.float32)
                add(f"itm_acc_{name}", correct, real * (differs if name == "random" else 1.0))
            out = self._run(params, local, masked_ids, mask)
            pred = np.argmax(out["mlm_logits"], -1)
            chosen = (label_mask > 0) * real[:, None]
            hit = (pred == labels).astype(np.float32)
            add("mlm_acc", hit, chosen)
            if attributes:
                add("mlm_acc_color_words", hit, chosen * np.isin(labels, color_ids))
                add("mlm_acc_shape_words", hit, chosen * np.isin(labels, shape_ids))
            if self.regions and "mrc_logits" in out and "region_targets" in local:
                masked = np.asarray(region_fn(jax.random.key(10_000 + i), local["region_mask"]))
                out = self._run(params, local, ids, mask, region_masked=masked)
                target = np.argmax(local["region_targets"], -1)
                hit = (np.argmax(out["mrc_logits"], -1) == target).astype(np.float32)
                add("mrc_acc", hit, masked * real[:, None])
                # Most boxes are mostly background; the masked regions whose majority class is an object are
                # the ones where classifying takes evidence (the text and the other regions).
                add("mrc_acc_object", hit, masked * real[:, None] * (target != background))

        metrics = {k: s[0] / max(s[1], 1.0) for k, s in totals.items()}
        # Balanced accuracies: true pairs weigh as much as the mismatches they are contrasted with.
        metrics["itm_acc"] = 0.5 * (metrics["itm_acc_true"] + metrics["itm_acc_random"])
        if not attributes:
            return metrics
        metrics["itm_acc_hard"] = 0.5 * metrics["itm_acc_true"] + 0.25 * (
            metrics["itm_acc_other_color"] + metrics["itm_acc_other_shape"])
        return metrics

    def _run(self, params: Any, local: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray,
             region_masked: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Forward one global eval batch, sharded over the mesh; outputs come back whole on every process."""
        batch = {k: local[k] for k in self.model_keys if k not in ("text_ids", "text_mask")}
        batch["text_ids"], batch["text_mask"] = ids, mask
        if self.regions:
            batch["region_feature_mask"] = (np.zeros(local["region_mask"].shape, np.int32) if region_masked is None
                                            else region_masked.astype(np.int32))
        shard = sharding.batch_sharding(self.mesh)
        out = self._forward(params, {k: jax.device_put(v, shard) for k, v in batch.items()})
        return {k: np.asarray(v) for k, v in out.items()}
