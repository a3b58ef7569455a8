"""Evaluators declared in the config: run by the trainer every `every_steps` steps (and at the last step) and by
`python -m mmjax.evaluate` on demand, with the same code.

    c.evals.zero_shot = evaluator_config("zero_shot", every_steps=500)
    c.evals.retrieval = evaluator_config("retrieval", every_steps=500, ks=(1, 5, 10))
    c.evals.itm = evaluator_config("itm", every_steps=1000, data=dict(source="coco", split="val"))

Every evaluator reads one source's split (`data.source`, default data.eval_source; `data.split`, default the
source's eval_split) in order through the input pipeline, padded batches masked out, and returns
{metric: value}; the trainer and mmjax.evaluate prefix each metric with the evaluator's name ("zero_shot/accuracy").
What an evaluator needs to know about the data (class names, prompts, attribute words, region classes) comes from
the pipeline's DatasetMeta.

    zero_shot   accuracy of classifying the images by their nearest class-prompt embedding (dual encoders)
    retrieval   image->text and text->image recall@K, identical captions counting as the same (dual encoders)
    itm         image-text matching accuracy on true pairs, random mismatches and each one-attribute mismatch
    mlm         masked-token accuracy, overall and on each attribute's words
    mrc         masked-region classification accuracy (region models), and on regions whose class is an object
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from ml_collections import config_dict

from mmjax import configlib, objectives, sharding
from mmjax.data import pipeline
from mmjax.evaluation import retrieval, zero_shot

# Each kind's own fields and defaults (beside kind, every_steps, batch_size, data).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "zero_shot": {},
    "retrieval": dict(ks=(1, 5, 10)),
    "itm": {},
    "mlm": dict(mask_prob=0.15, whole_word=False),
    "mrc": dict(mask_prob=0.15),
}


def evaluator_config(kind: str, **overrides: Any) -> ml_collections.ConfigDict:
    """One entry of `config.evals`: kind, every_steps, batch_size, data (source, split) and the kind's fields."""
    if kind not in KIND_DEFAULTS:
        raise ValueError(f"unknown evaluator kind {kind!r}; known: {sorted(KIND_DEFAULTS)}")
    c = ml_collections.ConfigDict(dict(
        kind=kind, every_steps=1000, batch_size=250,
        data=dict(source=config_dict.placeholder(str), split=config_dict.placeholder(str)),
        **KIND_DEFAULTS[kind]))
    return configlib.override(c, overrides, f"a {kind} evaluator")


class Evaluator:
    """Shared by every kind: the data it reads and the one-pass loop over it."""

    def __init__(self, name: str, cfg: ml_collections.ConfigDict, *, model: Any, config: Any, meta: Any,
                 tokenizer: Any, mesh: Mesh):
        self.name, self.cfg, self.model, self.config, self.meta = name, cfg, model, config, meta
        self.tokenizer, self.mesh = tokenizer, mesh
        self.every_steps = int(cfg.every_steps)
        if self.every_steps < 1:
            raise ValueError(f"evals.{name}.every_steps must be >= 1; got {cfg.every_steps}")
        self.source = cfg.data.source or meta.eval_source
        self.source_meta = meta.source(self.source)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """One ordered pass over the evaluated split, as global numpy batches (every process sees all rows)."""
        for local in pipeline.eval_batches(self.config.data, self.tokenizer, global_batch_size=self.cfg.batch_size,
                                           source=self.source, split=self.cfg.data.split):
            yield {k: sharding.global_numpy(v, self.mesh) for k, v in local.items()}

    def _jit_outputs(self, keys: tuple[str, ...]):
        """The model's forward under jit, returning only `keys`, replicated on every process."""
        def forward(params, batch):
            out = self.model.apply({"params": params}, batch)
            return {k: out[k] for k in keys if k in out}

        return jax.jit(forward, out_shardings=sharding.replicated(self.mesh))

    def _put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        shard = sharding.batch_sharding(self.mesh)
        return {k: jax.device_put(np.asarray(v), shard) for k, v in batch.items()}

    def run(self, params: Any) -> dict[str, float]:
        """{metric: value} of the model with `params`."""
        raise NotImplementedError


class _Sums:
    """Weighted sums of per-example hits, by metric name."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}

    def add(self, name: str, hits: np.ndarray, weight: np.ndarray) -> None:
        s = self.totals.setdefault(name, [0.0, 0.0])
        s[0] += float(np.sum(hits * weight))
        s[1] += float(np.sum(weight))

    def means(self) -> dict[str, float]:
        return {k: s[0] / max(s[1], 1.0) for k, s in self.totals.items()}


class _DualEncoderEvaluator(Evaluator):
    """Embeds the evaluated images and captions with a dual encoder's encode_image / encode_text."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for method in ("encode_image", "encode_text"):
            if not hasattr(self.model, method):
                raise ValueError(f"evals.{self.name} ({self.cfg.kind}) needs a dual encoder with {method}; "
                                 f"{type(self.model).__name__} has none")
        replicated = sharding.replicated(self.mesh)
        self._encode_image = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method="encode_image"),
                                     out_shardings=replicated)
        self._encode_text = jax.jit(lambda p, i, m: self.model.apply({"params": p}, i, m, method="encode_text"),
                                    out_shardings=replicated)

    def embeddings(self, params: Any) -> dict[str, np.ndarray]:
        """image / text embeddings, text_ids and (when the source has them) labels of the real examples."""
        out: dict[str, list] = {"image": [], "text": [], "text_ids": [], "label": []}
        for batch in self.batches():
            real = batch["mask"] > 0
            arrays = self._put({k: batch[k] for k in ("image", "text_ids", "text_mask")})
            out["image"].append(np.asarray(self._encode_image(params, arrays["image"]))[real])
            out["text"].append(np.asarray(self._encode_text(params, arrays["text_ids"], arrays["text_mask"]))[real])
            out["text_ids"].append(batch["text_ids"][real])
            if "label" in batch:
                out["label"].append(batch["label"][real])
        return {k: np.concatenate(v) for k, v in out.items() if v}

    def encode_texts(self, params: Any, texts: list[str]) -> np.ndarray:
        """Unit text embeddings [N, E] of `texts` (tokenized at data.max_len)."""
        ids, mask = self.tokenizer.encode(texts, self.config.data.max_len)
        return np.asarray(self._encode_text(params, ids, mask))


class ZeroShotEvaluator(_DualEncoderEvaluator):
    """Zero-shot classification over the source's classes with its prompt templates (averaged per class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.source_meta.class_names or not self.source_meta.prompts:
            raise ValueError(f"evals.{self.name} (zero_shot) needs classes and prompts: data.sources."
                             f"{self.source}.label_key and .prompts")

    def run(self, params: Any) -> dict[str, float]:
        """accuracy, chance (1 / classes) and num_examples."""
        emb = self.embeddings(params)
        names, templates = self.source_meta.class_names, self.source_meta.prompts
        prompts = [t.format(name) for name in names for t in templates]
        prompt_embeds = self.encode_texts(params, prompts).reshape(len(names), len(templates), -1)
        class_embeds = zero_shot.class_embeddings(prompt_embeds)
        return {"accuracy": zero_shot.zero_shot_accuracy(emb["image"], class_embeds, emb["label"]),
                "chance": 1.0 / len(names), "num_examples": float(len(emb["label"]))}


class RetrievalEvaluator(_DualEncoderEvaluator):
    """Image<->text recall@K, an image counting as found for any caption identical to its own."""

    def run(self, params: Any) -> dict[str, float]:
        """i2t_r@K, t2i_r@K, i2t_r@1_chance and num_examples."""
        emb = self.embeddings(params)
        keys = retrieval.caption_keys(emb["text_ids"])
        metrics = retrieval.retrieval_recall(emb["image"], emb["text"], keys, tuple(self.cfg.ks))
        metrics["i2t_r@1_chance"] = retrieval.chance_recall(keys, 1)
        metrics["num_examples"] = float(len(keys))
        return metrics


class ITMEvaluator(Evaluator):
    """Matching accuracy: true pairs, random mismatches (the next example's caption, where it differs) and one
    mismatch per attribute the source offers hard negatives for (the caption with that word swapped)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._forward = self._jit_outputs(("itm_logits",))

    def run(self, params: Any) -> dict[str, float]:
        """acc_true, acc_random, acc_other_NAME; acc (true and random balanced); acc_hard (true and the
        one-attribute mismatches balanced), when the source has attributes."""
        sums = _Sums()
        attributes = list(self.source_meta.attributes)
        for batch in self.batches():
            real = batch["mask"].astype(np.float32)
            ids, mask = batch["text_ids"], batch["text_mask"]
            rolled_ids, rolled_mask = np.roll(ids, 1, axis=0), np.roll(mask, 1, axis=0)
            differs = np.any(rolled_ids != ids, axis=1).astype(np.float32)
            variants = {"true": (ids, mask, 1, real), "random": (rolled_ids, rolled_mask, 0, real * differs)}
            for name in attributes:
                variants[f"other_{name}"] = (batch[f"other_{name}_text_ids"], batch[f"other_{name}_text_mask"], 0,
                                             real)
            for name, (t_ids, t_mask, target, weight) in variants.items():
                rows = objectives.model_inputs(batch, self.meta.model_keys, (t_ids, t_mask))
                logits = np.asarray(self._forward(params, self._put(rows))["itm_logits"])
                sums.add(f"acc_{name}", (np.argmax(logits, -1) == target).astype(np.float32), weight)
        metrics = sums.means()
        # Balanced accuracies: true pairs weigh as much as the mismatches they are contrasted with.
        metrics["acc"] = 0.5 * (metrics["acc_true"] + metrics["acc_random"])
        if attributes:
            metrics["acc_hard"] = 0.5 * metrics["acc_true"] + 0.5 * float(
                np.mean([metrics[f"acc_other_{n}"] for n in attributes]))
        return metrics


class MLMEvaluator(Evaluator):
    """Masked-token accuracy (BERT masking of the captions, seeded per batch), overall and on each attribute's
    words (e.g. colour and shape words), which only the image can tell."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._forward = self._jit_outputs(("mlm_logits",))
        continuation = self.tokenizer.continuation_table() if self.cfg.whole_word else None
        self._mask = jax.jit(lambda k, i, m: objectives.mask_text(k, i, m, self.tokenizer,
                                                                  mask_prob=float(self.cfg.mask_prob),
                                                                  continuation=continuation))
        # Attribute words as token ids ([CLS] word [SEP]: one token each; a word the tokenizer splits into pieces
        # is left out of the metric).
        self._word_ids = {}
        for name, words in self.source_meta.attributes.items():
            ids = self.tokenizer.encode(list(words), 4)[0]
            self._word_ids[name] = ids[ids[:, 2] == self.tokenizer.sep_id, 1]

    def run(self, params: Any) -> dict[str, float]:
        """acc, and acc_NAME_words per attribute."""
        sums = _Sums()
        for i, batch in enumerate(self.batches()):
            real = batch["mask"].astype(np.float32)
            masked_ids, labels, label_mask = (np.asarray(x) for x in self._mask(
                jax.random.key(i), batch["text_ids"], batch["text_mask"]))
            rows = objectives.model_inputs(batch, self.meta.model_keys, (masked_ids, batch["text_mask"]))
            pred = np.argmax(np.asarray(self._forward(params, self._put(rows))["mlm_logits"]), -1)
            chosen = (label_mask > 0) * real[:, None]
            hit = (pred == labels).astype(np.float32)
            sums.add("acc", hit, chosen)
            for name, word_ids in self._word_ids.items():
                sums.add(f"acc_{name}_words", hit, chosen * np.isin(labels, word_ids))
        return sums.means()


class MRCEvaluator(Evaluator):
    """Masked region classification accuracy (argmax against the regions' soft targets' argmax)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "region_mask" not in self.meta.model_keys or not self.source_meta.region_classes:
            raise ValueError(f"evals.{self.name} (mrc) needs region inputs with classes (data.regions.enabled "
                             f"and a source with region classes)")
        self._forward = self._jit_outputs(("mrc_logits",))
        self._mask = jax.jit(lambda k, m: objectives.mask_regions(k, m, float(self.cfg.mask_prob)))

    def run(self, params: Any) -> dict[str, float]:
        """acc over masked regions, and acc_object over masked regions whose majority class is not background."""
        sums = _Sums()
        background = self.source_meta.region_classes - 1
        for i, batch in enumerate(self.batches()):
            real = batch["mask"].astype(np.float32)
            masked = np.asarray(self._mask(jax.random.key(10_000 + i), batch["region_mask"]))
            rows = objectives.model_inputs(batch, self.meta.model_keys, (batch["text_ids"], batch["text_mask"]),
                                           region_masked=masked)
            logits = np.asarray(self._forward(params, self._put(rows))["mrc_logits"])
            target = np.argmax(batch["region_targets"], -1)
            hit = (np.argmax(logits, -1) == target).astype(np.float32)
            sums.add("acc", hit, masked * real[:, None])
            # Most boxes are mostly background; the masked regions whose majority class is an object are the ones
            # where classifying takes evidence (the text and the other regions).
            sums.add("acc_object", hit, masked * real[:, None] * (target != background))
        return sums.means()


EVALUATORS: dict[str, type[Evaluator]] = {"zero_shot": ZeroShotEvaluator, "retrieval": RetrievalEvaluator,
                                         "itm": ITMEvaluator, "mlm": MLMEvaluator, "mrc": MRCEvaluator}


def build_evaluators(config: Any, *, model: Any, meta: Any, tokenizer: Any, mesh: Mesh,
                     only: list[str] | None = None) -> dict[str, Evaluator]:
    """The evaluators of `config.evals` (or the ones named in `only`), in config order."""
    evals = config.get("evals") or {}
    names = list(evals) if only is None else only
    unknown = [n for n in names if n not in evals]
    if unknown:
        raise ValueError(f"no evaluator {unknown} in config.evals; it has {list(evals)}")
    built = {}
    for name in names:
        cfg = evals[name]
        if cfg.get("kind") not in EVALUATORS:
            raise ValueError(f"evals.{name}.kind={cfg.get('kind')!r}; known kinds: {sorted(EVALUATORS)}")
        # Rebuilt from the kind's defaults: a config.json from an older run may lack newer fields.
        full = evaluator_config(cfg.kind, **{k: v for k, v in cfg.to_dict().items() if k != "kind"})
        built[name] = EVALUATORS[cfg.kind](name, full, model=model, config=config, meta=meta, tokenizer=tokenizer,
                                           mesh=mesh)
    return built


def run_evaluators(evaluators: dict[str, Evaluator], params: Any) -> dict[str, float]:
    """Every evaluator's metrics, prefixed with its name ("itm/acc_true")."""
    metrics = {}
    for name, evaluator in evaluators.items():
        metrics.update({f"{name}/{k}": float(v) for k, v in evaluator.run(params).items()})
    return metrics
