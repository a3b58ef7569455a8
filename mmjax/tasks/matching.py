"""Single- and two-stream image-text pretraining: MLM, ITM, word-region alignment, masked region and patch modelling.

One task serves ViLT (patches), UNITER and ViLBERT (regions) and the generic fusion models: the model reads the
batch's model inputs (`meta.model_keys`) and returns `itm_logits` / `mlm_logits` (+ `text_tokens`,
`image_tokens`, `image_mask` for WPA, `mrfr_pred` / `mrc_logits` for region models, `mpp_pred` / `patch_index`
for masked patch prediction). Objectives and their weights come from `config.task.objectives` (e.g. {mlm: 1,
itm: 1, wpa: 0.1, mrfr: 1, mrc: 1}); masks and negatives are drawn on device from the step's key. One forward per
step over stacked rows:

  ITM rows     2B   the B true pairs and B mismatches; each mismatch is, by `task.itm.negatives` weights, an
                    in-batch caption of another image (never an identical caption), or the example's own caption
                    with one attribute word swapped (`other_NAME`: the hard negatives a source offers, see
                    mmjax/data/sources.py; only grounding rejects them), or a `mined` hard negative: a few random
                    in-batch candidates (`task.itm.mine.candidates`) scored by the model's own ITM head without
                    gradient, one drawn by softmax(score / temperature) (UNITER's hard-negative mining, sampled as
                    ALBEF samples; costs candidates x B forward rows). WPA (IPOT word-region / word-patch
                    alignment) runs on these rows. With `task.itm.swap = "audio"` (or "image") a mismatch keeps
                    the text and the other inputs and takes another example's clip (image) instead: audio-visual
                    matching (configs/audio_visual.py); never one whose caption is identical. `swap = "tags"` is
                    OSCAR's contrastive loss: another example's object tags ("polluted"), never identical ones.
  MLM rows     B    15% of caption tokens masked (80/10/10; `task.mlm.whole_word` masks whole words); with object
                    tags in the batch (OSCAR) 15% of the tag words too, one loss over both (`task.mlm.tags`).
  visual rows  B    15% of the regions have their features zeroed (MRFR regresses them, MRC matches the regions'
                    soft class distributions by KL), or 15% of the patches are replaced by the [MASK] patch (MPP
                    regresses their normalised pixels).
  `task.masking = "conditional"` (UNITER) keeps MLM and visual rows apart, so one modality is masked at a time and
  the other supplies the evidence; `"joint"` (ViLBERT's masked multimodal modelling) masks both in the same B rows.

Evaluation is declared in the config (ITM, MLM, MRC evaluators: mmjax/evaluation/evaluators.py).
"""

from __future__ import annotations

import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmjax import losses, objectives
from mmjax.models import layers

OBJECTIVES = ("mlm", "itm", "wpa", "mrfr", "mrc", "mpp")
REGION_OBJECTIVES = ("mrfr", "mrc")
MASKING = ("conditional", "joint")
# Stand-in for a dry run, which traces the step without loading a tokenizer: BERT-base's special ids and vocab
# (only shapes matter there).
DRY_RUN_TOKENIZER = types.SimpleNamespace(pad_id=0, unk_id=100, cls_id=101, sep_id=102, mask_id=103,
                                          vocab_size=30522, continuation_table=lambda: np.zeros(30522, bool))
# The inputs a mismatch replaces, by task.itm.swap.
SWAP_KEYS = {"text": ("text_ids", "text_mask"), "audio": ("audio", "audio_length"), "image": ("image",),
             "tags": ("tags_text_ids", "tags_text_mask")}
# The ids that tell whether two examples' swapped inputs say the same thing (never a mismatch): the captions, or the
# tag sequences when tags are swapped (OSCAR's polluted tags).
SAME_KEY = {"tags": "tags_text_ids"}
# Model outputs each objective needs (mlm_tags: the MLM objective when the batch carries object tags).
NEEDS = {"mlm": ("mlm_logits",), "mlm_tags": ("tags_mlm_logits",), "itm": ("itm_logits",),
         "wpa": ("text_tokens", "image_tokens", "image_mask"), "mrfr": ("mrfr_pred",), "mrc": ("mrc_logits",),
         "mpp": ("mpp_pred", "patch_index")}


def default_task_config(**objective_weights: float) -> ml_collections.ConfigDict:
    """The matching task's `config.task`: objectives with the given weights and every knob's default."""
    unknown = sorted(set(objective_weights) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; known: {OBJECTIVES}")
    return ml_collections.ConfigDict(dict(
        name="matching",
        # Every objective has a weight (0 = off), so any of them can be switched on from the command line.
        objectives={k: float(objective_weights.get(k, 0.0)) for k in OBJECTIVES},
        # Mismatch kinds by weight: in_batch, mined (in-batch candidates scored by the model's own ITM head, see
        # `mine`), and other_NAME for each attribute the data offers hard negatives for. swap: the modality a
        # mismatch replaces ("tags": OSCAR's polluted tag sequences).
        itm=dict(negatives=dict(in_batch=1.0, mined=0.0), swap="text",
                 mine=dict(candidates=4, temperature=1.0)),
        mlm=dict(mask_prob=0.15, whole_word=False, tags=True),  # tags: also mask the tag words (OSCAR)
        mrm=dict(mask_prob=0.15),  # masked region modelling (MRFR / MRC)
        mpp=dict(mask_prob=0.15),  # masked patch prediction
        masking="conditional",     # UNITER; "joint" = ViLBERT's masked multimodal modelling
        wpa=dict(iterations=50),   # IPOT proximal steps (UNITER / ViLT use 50)
    ))


class MatchingTask:
    """MLM + ITM (+ WPA, MRFR, MRC, MPP) for fusion models; see the module docstring for rows and masks."""

    def __init__(self, model: nn.Module, config: Any, meta: Any, tokenizer: Any, mesh: Mesh):
        self.model = model
        self.mesh = mesh
        self.meta = meta
        task = config.task
        self.tokenizer = DRY_RUN_TOKENIZER if tokenizer is None else tokenizer
        unknown = sorted(set(task.objectives) - set(OBJECTIVES))
        if unknown:
            raise ValueError(f"task.objectives {unknown} are not supported by the matching task (known: "
                             f"{OBJECTIVES})")
        self.weights = {k: float(task.objectives.get(k, 0.0)) for k in OBJECTIVES}
        if not any(self.weights.values()):
            raise ValueError(f"task.objectives: give some weight to one of {OBJECTIVES}")
        self.model_keys = tuple(meta.model_keys)
        self.regions = "region_mask" in self.model_keys
        if any(self.weights[k] for k in REGION_OBJECTIVES) and not self.regions:
            raise ValueError("task.objectives mrfr / mrc need region inputs: set data.regions.enabled=True")
        if self.weights["mpp"] and self.regions:
            raise ValueError("task.objectives.mpp predicts image patches; this model reads regions")
        self.swap = task.itm.get("swap", "text")
        if self.swap not in SWAP_KEYS or any(k not in self.model_keys for k in SWAP_KEYS[self.swap]):
            raise ValueError(f"task.itm.swap={self.swap!r}: must be one of {sorted(SWAP_KEYS)} whose inputs the "
                             f"model reads ({list(self.model_keys)})")
        if self.swap != "text" and self.weights["wpa"]:
            raise ValueError("task.objectives.wpa aligns words with patches: it needs task.itm.swap='text'")
        # Mismatch kinds: in_batch, mined, then the attributes the data offers hard-negative captions for (those
        # are captions with a word swapped: only when captions are what a mismatch replaces).
        attributes = tuple(f"other_{name}" for name in meta.attributes) if self.swap == "text" else ()
        self.negative_kinds = ("in_batch", "mined") + attributes
        weights = {k: float(v) for k, v in dict(task.itm.negatives).items()}
        missing = [k for k, v in weights.items() if k not in self.negative_kinds and v > 0]
        if missing:
            raise ValueError(f"task.itm.negatives {missing} need hard-negative captions the data does not offer "
                             f"(it offers {list(self.negative_kinds)}; a source's `negatives` field adds them)")
        if any(v < 0 for v in weights.values()):
            raise ValueError(f"task.itm.negatives weights must be >= 0; got {weights}")
        probs = np.array([weights.get(k, 0.0) for k in self.negative_kinds])
        if probs.sum() <= 0:
            raise ValueError(f"task.itm.negatives must give some weight to one of {list(self.negative_kinds)}")
        self.negative_logits = np.log(np.maximum(probs / probs.sum(), 1e-12)).astype(np.float32)
        self.mined = probs[1] > 0
        mine = task.itm.get("mine") or {}
        self.mine_candidates = int(mine.get("candidates", 4))
        self.mine_temperature = float(mine.get("temperature", 1.0))
        if self.mined and (self.mine_candidates < 1 or self.mine_temperature <= 0):
            raise ValueError(f"task.itm.mine needs candidates >= 1 and temperature > 0; got {dict(mine)}")
        # OSCAR: the tag words are masked and predicted like the caption's (masked token loss over words + tags).
        self.mask_tags = "tags_text_ids" in self.model_keys and bool(task.mlm.get("tags", True))
        self.mask_prob = float(task.mlm.mask_prob)
        self.continuation = self.tokenizer.continuation_table() if task.mlm.whole_word else None
        self.region_mask_prob = float(task.mrm.mask_prob)
        self.patch_mask_prob = float(task.mpp.mask_prob)
        self.masking = task.masking
        if self.masking not in MASKING:
            raise ValueError(f"task.masking must be one of {MASKING}; got {self.masking!r}")
        self.wpa_iterations = int(task.wpa.iterations)
        # Models that put an image [CLS] first (ViLT) leave it out of word-patch alignment, as ViLT does.
        self.skip_image_cls = bool(getattr(model, "image_cls_first", False))

    def _mask(self, rng: jax.Array, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return objectives.mask_text(rng, ids, mask, self.tokenizer, mask_prob=self.mask_prob,
                                    continuation=self.continuation)

    def _mined(self, rng: jax.Array, params: Any, batch: dict, same: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Hard in-batch negatives (UNITER's hard negative mining, sampled as ALBEF samples): each example's
        `mine.candidates` random in-batch candidates are scored by the model's own ITM head (no gradient, no
        dropout), and one is drawn with probability softmax(match logit / temperature). Returns (index, valid)."""
        k_cand, k_pick = jax.random.split(rng)
        b = same.shape[0]
        k = min(self.mine_candidates, max(b - 1, 1))
        allowed = ~jnp.eye(b, dtype=bool) & ~same
        # Gumbel top-k: k distinct candidates drawn uniformly among the allowed ones.
        g = jnp.where(allowed, jax.random.gumbel(k_cand, (b, b)), -jnp.inf)
        _, cand = jax.lax.top_k(g, k)  # [B, k]
        rows = objectives.model_inputs(batch, self.model_keys, (batch["text_ids"], batch["text_mask"]))
        stacked = {key: jnp.concatenate([batch[key][cand[:, c]] if key in SWAP_KEYS[self.swap] else value
                                         for c in range(k)]) for key, value in rows.items()}
        logits = self.model.apply({"params": jax.lax.stop_gradient(params)}, stacked, train=False)["itm_logits"]
        match = (logits[:, 1] - logits[:, 0]).reshape(k, b).T  # [B, k]: how well each candidate matches
        sim = jnp.full((b, b), -jnp.inf, jnp.float32).at[jnp.arange(b)[:, None], cand].set(
            match / self.mine_temperature)
        return objectives.itm_negatives(k_pick, sim, same_image=same, hard=True)

    def _mismatches(self, rng: jax.Array, batch: dict, params: Any) -> tuple[dict, jax.Array]:
        """({swapped input: value}, valid) of one mismatch per example (task.itm.swap's inputs replaced), its kind
        drawn by the configured weights."""
        k_kind, k_batch, k_mined = jax.random.split(rng, 3)
        swap_keys = SWAP_KEYS[self.swap]
        ids = batch[SAME_KEY.get(self.swap, "text_ids")]
        # Identical captions (or tag sequences) are not mismatches, nor the clips / images of identical captions:
        # forbid them as in-batch negatives.
        same = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
        neg_index, valid = objectives.itm_negatives(k_batch, jnp.zeros(same.shape, jnp.float32),
                                                    same_image=same, hard=False)
        active = [i for i, logit in enumerate(self.negative_logits) if logit > np.log(1e-12) + 1]
        if active == [0]:
            return {k: batch[k][neg_index] for k in swap_keys}, valid
        candidates = {k: [batch[k][neg_index]] for k in swap_keys}
        valids = [valid]
        if self.mined:
            mined_index, mined_valid = self._mined(k_mined, params, batch, same)
        else:  # never drawn (weight 0); a placeholder keeps the candidate stack's kind order
            mined_index, mined_valid = neg_index, valid
        for k in swap_keys:
            candidates[k].append(batch[k][mined_index])
        valids.append(mined_valid)
        for kind in self.negative_kinds[2:]:
            candidates["text_ids"].append(batch[f"{kind}_text_ids"])
            candidates["text_mask"].append(batch[f"{kind}_text_mask"])
            valids.append(jnp.ones_like(valid))
        kind = jax.random.categorical(k_kind, jnp.asarray(self.negative_logits), shape=(same.shape[0],))
        rows = jnp.arange(same.shape[0])
        return ({k: jnp.stack(v)[kind, rows] for k, v in candidates.items()}, jnp.stack(valids)[kind, rows])

    def _patch_targets(self, image: jax.Array, patch_index: jax.Array) -> jax.Array:
        """MAE's norm-pix targets of the kept patches: [B, N', p*p*C]."""
        patches = objectives.normalized_patch_targets(layers.patchify(image, self.model.patch_size))
        return jnp.take_along_axis(patches, patch_index[..., None], axis=1)

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Weighted sum of the configured objectives; returns (loss, metrics)."""
        k_neg, k_mlm, k_visual, k_drop = jax.random.split(rng, 4)
        w = self.weights
        b = batch["text_ids"].shape[0]
        text = (batch["text_ids"], batch["text_mask"])
        blocks, offsets = [], {}

        def add(name, rows):
            offsets[name] = b * len(blocks)
            blocks.append(rows)

        if w["itm"] or w["wpa"]:
            swapped, neg_valid = self._mismatches(k_neg, batch, params)
            add("itm_true", objectives.model_inputs(batch, self.model_keys, text))
            add("itm_false", {**objectives.model_inputs(batch, self.model_keys, text), **swapped})
        visual = {}
        if self.regions and (w["mrfr"] or w["mrc"]):
            region_masked = objectives.mask_regions(k_visual, batch["region_mask"], self.region_mask_prob)
            visual = {"region_masked": region_masked}
        elif w["mpp"]:
            grid = batch["image"].shape[1] // self.model.patch_size
            patch_mask = objectives.mask_patches(k_visual, grid * grid, b, self.patch_mask_prob)
            visual = {"patch_mask": patch_mask}
        if w["mlm"]:
            k_mlm, k_tags = jax.random.split(k_mlm)
            masked_ids, labels, label_mask = self._mask(k_mlm, *text)
            joint = self.masking == "joint" and visual
            mlm_rows = objectives.model_inputs(batch, self.model_keys, (masked_ids, batch["text_mask"]),
                                               **(visual if joint else {}))
            if self.mask_tags:
                mlm_rows["tags_text_ids"], tag_labels, tag_label_mask = self._mask(
                    k_tags, batch["tags_text_ids"], batch["tags_text_mask"])
            add("mlm", mlm_rows)
            if joint:
                offsets["visual"] = offsets["mlm"]
        if visual and "visual" not in offsets:
            add("visual", objectives.model_inputs(batch, self.model_keys, text, **visual))

        # A key only some blocks carry (patch_mask) is all zeros (nothing masked) in the others.
        like = {k: rows[k] for rows in blocks for k in rows}
        model_batch = {k: jnp.concatenate([rows.get(k, jnp.zeros_like(like[k])) for rows in blocks]) for k in like}
        out = self.model.apply({"params": params}, model_batch, train=True, rngs={"dropout": k_drop})
        needed = dict(w, mlm_tags=w["mlm"] if self.mask_tags else 0.0)
        for name, weight in needed.items():
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
            txt_mask = objectives.content_mask(jnp.concatenate([batch["text_mask"], swapped["text_mask"]]))
            # Invalid negatives (an identical caption) weigh 0: drop them from both signs of the sum.
            txt_mask = txt_mask * itm_weights[:, None].astype(txt_mask.dtype)
            metrics["wpa_loss"] = losses.word_patch_alignment_loss(txt, txt_mask, img, img_mask, itm_labels,
                                                                   iterations=self.wpa_iterations)
            total += w["wpa"] * metrics["wpa_loss"]
        if w["mlm"]:
            mlm_logits = part("mlm_logits", "mlm")
            if self.mask_tags:  # one masked token loss over the words and the tags (OSCAR)
                mlm_logits = jnp.concatenate([mlm_logits, part("tags_mlm_logits", "mlm")], axis=1)
                labels = jnp.concatenate([labels, tag_labels], axis=1)
                label_mask = jnp.concatenate([label_mask, tag_label_mask], axis=1)
            metrics["mlm_loss"], metrics["mlm_acc"] = losses.masked_lm_loss(mlm_logits, labels, label_mask)
            total += w["mlm"] * metrics["mlm_loss"]
        if w["mrfr"]:
            metrics["mrfr_loss"] = losses.masked_feature_regression_loss(
                part("mrfr_pred", "visual"), batch["region_feats"], visual["region_masked"])
            total += w["mrfr"] * metrics["mrfr_loss"]
        if w["mrc"]:
            metrics["mrc_loss"] = losses.masked_region_classification_loss(
                part("mrc_logits", "visual"), batch["region_targets"], visual["region_masked"])
            total += w["mrc"] * metrics["mrc_loss"]
        if w["mpp"]:
            patch_index = part("patch_index", "visual")
            kept_mask = jnp.take_along_axis(visual["patch_mask"], patch_index, axis=1)
            metrics["mpp_loss"] = losses.masked_feature_regression_loss(
                part("mpp_pred", "visual"), self._patch_targets(batch["image"], patch_index), kept_mask)
            total += w["mpp"] * metrics["mpp_loss"]
        return total, metrics
