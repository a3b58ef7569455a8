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

    zero_shot   accuracy of classifying the images (or, with modality="audio", the clips) by their nearest
                class-prompt embedding (dual encoders)
    retrieval   image->text and text->image recall@K (dual encoders): each image's first caption or all of them,
                identical captions counting as the same or not; R@K only for K below the number of candidates
                (the rest would always be 1.0), with the chance level of R@1 each way
    pair_retrieval  recall@K both ways between any two modalities of a dual encoder (speech <-> image, speech <->
                text): items deduplicated (an image by its image_id, a text by its tokens, a clip is itself), an
                item relevant to every item it was paired with in the split
    itm_retrieval  the same recall for single-stream models, ranked by ITM score (exhaustive, or re-ranking a
                dual encoder's top k_test)
    itm         image-text matching accuracy on true pairs, random mismatches and each one-attribute mismatch
    mlm         masked-token accuracy, overall and on each attribute's words
    mrc         masked-region classification accuracy (region models), and on regions whose class is an object
    vqa         the official VQA accuracy (mmjax/evaluation/vqa.py) of the top answer, by answer type; predictions
                written in the official results format ([{"question_id", "answer"}]) into the run's directory
    captioning  BLEU-1..4 and CIDEr-D (COCO's protocol, mmjax/evaluation/captioning.py) of captions decoded
                greedily, by beam search or by sampling (mmjax/decoding.py) against every reference caption of
                each image; captions written in COCO's results format ([{"image_id", "caption"}])
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh
from ml_collections import config_dict

from mmjax import configlib, decoding, objectives, sharding
from mmjax.data import pipeline
from mmjax.evaluation import captioning, report, retrieval, vqa, zero_shot

SAMPLES = 12  # predictions an evaluator keeps for the report
# Each modality's model inputs, in the order its `encode_<modality>` method takes them.
MODALITY_INPUTS = {"image": ("image",), "audio": ("audio", "audio_length"), "text": ("text_ids", "text_mask")}
# What an ITM mismatch may replace: a modality's inputs, or OSCAR's object tags (a "polluted" tag sequence).
SWAP_INPUTS = {**MODALITY_INPUTS, "tags": ("tags_text_ids", "tags_text_mask")}

# Each kind's own fields and defaults (beside kind, every_steps, batch_size, data).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "zero_shot": dict(modality="image"),  # what is classified: "image" or "audio"
    # captions: "first" (each image's first caption) | "all" (every caption: COCO / Flickr30k's protocol);
    # same_text_matches: an identical caption counts as the image's own (the embedded data's repeated sentences).
    "retrieval": dict(ks=(1, 5, 10), captions="first", same_text_matches=True, chunk=1024),
    # modalities: the (query, target) pair; None: the model's `modalities`.
    "pair_retrieval": dict(ks=(1, 5, 10), modalities=config_dict.placeholder(tuple), chunk=1024),
    # Single-stream models ranked by their ITM score: exhaustively, or the first stage's top k_test re-ranked
    # (ALBEF / BLIP). first_stage: a dual-encoder training run's workdir (its latest checkpoint), or None.
    "itm_retrieval": dict(ks=(1, 5, 10), captions="first", same_text_matches=True, first_stage=None, k_test=16,
                          max_images=None),
    "itm": dict(swap="text"),  # the modality a random mismatch replaces (as the matching task's task.itm.swap)
    "mlm": dict(mask_prob=0.15, whole_word=False),
    "mrc": dict(mask_prob=0.15),
    "vqa": {},
    # Decoding (mmjax/decoding.DecodeConfig): method greedy | beam | sample; max_len None = data.max_len.
    # max_images: evaluate the first N images of the split (None: all). CIDEr-D's idf comes from the evaluated
    # images' references, so CIDEr on a subset is not comparable with CIDEr on the whole split.
    "captioning": dict(method="beam", beam_size=4, length_penalty=0.0, temperature=1.0, top_k=0, top_p=1.0,
                       max_len=config_dict.placeholder(int), max_images=config_dict.placeholder(int), seed=0),
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
                 tokenizer: Any, mesh: Mesh, out_dir: str | None = None):
        self.name, self.cfg, self.model, self.config, self.meta = name, cfg, model, config, meta
        self.tokenizer, self.mesh, self.out_dir = tokenizer, mesh, out_dir
        self.every_steps = int(cfg.every_steps)
        if self.every_steps < 1:
            raise ValueError(f"evals.{name}.every_steps must be >= 1; got {cfg.every_steps}")
        self.source = cfg.data.source or meta.eval_source
        self.source_meta = meta.source(self.source)
        self.samples: list = []  # report.Sample of the last run, for evaluators that keep some

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

    def _jit_predictions(self, key: str):
        """The model's forward under jit, returning only the argmax of output `key` over its last axis (class
        ids, replicated): hosts receive ids, not [B, L, V] logits, and the reduction runs where the logits are."""
        def forward(params, batch):
            return jnp.argmax(self.model.apply({"params": params}, batch)[key], axis=-1).astype(jnp.int32)

        return jax.jit(forward, out_shardings=sharding.replicated(self.mesh))

    def _put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        shard = sharding.batch_sharding(self.mesh)
        return {k: jax.device_put(np.asarray(v), shard) for k, v in batch.items()}

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """{metric: value} of the model with `params` (at train step `step`, for files an evaluator writes)."""
        raise NotImplementedError


def _per_example(choose: Any) -> Any:
    """jit of (key, row_ids, *arrays) -> `choose`(row key, *row) row by row, each row's key folded from its id: an
    example is masked alike in any batch, so the metric does not depend on how batches (and hosts) split the data."""
    def apply(key, row_ids, *arrays):
        keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)
        rows = jax.vmap(lambda k, *xs: choose(k, *(x[None] for x in xs)))(keys, *arrays)
        return jax.tree.map(lambda x: x[:, 0], rows)

    return jax.jit(apply)


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


class _RetrievalSet(Evaluator):
    """The evaluated images and their texts: each image's first caption, or every caption of the split."""

    def images_and_texts(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(images: the model inputs but text, image_id; texts: text_ids, text_mask, image_of_text, keys)."""
        rows: dict[str, list] = {}
        first_ids, first_mask = [], []
        for batch in self.batches():
            real = batch["mask"] > 0
            for key in [k for k in self.meta.model_keys if not k.startswith("text_")] + ["image_id"]:
                rows.setdefault(key, []).append(batch[key][real])
            first_ids.append(batch["text_ids"][real])
            first_mask.append(batch["text_mask"][real])
        images = {k: np.concatenate(v) for k, v in rows.items()}
        if self.cfg.captions == "first":
            ids, mask = np.concatenate(first_ids), np.concatenate(first_mask)
            image_of_text = np.arange(len(ids))
        elif self.cfg.captions == "all":
            from mmjax.data import sources  # pylint: disable=import-outside-toplevel

            texts, text_image_ids = sources.split_texts(
                self.source, pipeline.source_config_of(self.config.data, self.source), self.config.data,
                self.cfg.data.split)
            index = {int(i): n for n, i in enumerate(images["image_id"])}
            if len(index) != len(images["image_id"]):
                raise ValueError(f"evals.{self.name}: captions='all' needs unique image ids (data.sources."
                                 f"{self.source}.id_key)")
            image_of_text = np.array([index[int(i)] for i in text_image_ids])
            ids, mask = self.tokenizer.encode(texts, self.config.data.max_len)
        else:
            raise ValueError(f"evals.{self.name}.captions must be 'first' or 'all'; got {self.cfg.captions!r}")
        keys = retrieval.caption_keys(ids) if self.cfg.same_text_matches else None
        return images, {"text_ids": ids, "text_mask": mask, "image_of_text": image_of_text, "keys": keys}

    def recall(self, i2t: np.ndarray, t2i: np.ndarray, texts: dict) -> dict[str, float]:
        """R@k both ways from rankings (only k below the number of candidates), the chance level of R@1 each way,
        and the set's sizes."""
        metrics = retrieval.recall_from_rankings(i2t, t2i, texts["image_of_text"], tuple(self.cfg.ks),
                                                 texts["keys"])
        # On a small split R@1 is far from 0 by chance (1 / 3 on 3 images): reported beside it, to judge it by.
        metrics.update(retrieval.recall_chance(texts["image_of_text"], len(i2t), texts["keys"]))
        metrics.update(num_images=float(len(i2t)), num_texts=float(len(t2i)))
        return metrics


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
        self._encoders: dict[str, Any] = {}

    def image_embeddings(self, params: Any, modality: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of the evaluated images (or clips: modality="audio") and their labels (the real rows)."""
        embeds, labels = [], []
        for batch in self.batches():
            real = batch["mask"] > 0
            inputs = self._put({k: batch[k] for k in MODALITY_INPUTS[modality]})
            embeds.append(np.asarray(self._encoder(modality)(params, *inputs.values()))[real])
            labels.append(batch["label"][real])
        return np.concatenate(embeds), np.concatenate(labels)

    def _encoder(self, modality: str):
        """The jitted `encode_<modality>` (params, *inputs) -> replicated embeddings."""
        if modality == "image":
            return self._encode_image
        if modality == "text":
            return self._encode_text
        if modality not in self._encoders:
            method = f"encode_{modality}"
            if not hasattr(self.model, method):
                raise ValueError(f"evals.{self.name}: {type(self.model).__name__} has no {method}")
            self._encoders[modality] = jax.jit(
                lambda p, *x: self.model.apply({"params": p}, *x, method=method),
                out_shardings=sharding.replicated(self.mesh))
        return self._encoders[modality]

    def encode_texts(self, params: Any, texts: list[str]) -> np.ndarray:
        """Unit text embeddings [N, E] of `texts` (tokenized at data.max_len)."""
        ids, mask = self.tokenizer.encode(texts, self.config.data.max_len)
        return self.encode_in_batches(params, "text", ids, mask)

    def encode_in_batches(self, params: Any, what: str, *arrays: np.ndarray) -> np.ndarray:
        """Embeddings of host arrays of modality `what` (MODALITY_INPUTS order: "image": images; "text": ids,
        mask; "audio": samples, lengths), batch_size rows at a time on the mesh."""
        b, n = int(self.cfg.batch_size), len(arrays[0])
        fn = self._encoder(what)
        out = []
        for start in range(0, n, b):
            block = [np.pad(a[start:start + b], [(0, b - len(a[start:start + b]))] + [(0, 0)] * (a.ndim - 1))
                     for a in arrays]
            put = self._put({str(i): x for i, x in enumerate(block)})
            out.append(np.asarray(fn(params, *put.values()))[:min(b, n - start)])
        return np.concatenate(out)


class ZeroShotEvaluator(_DualEncoderEvaluator):
    """Zero-shot classification over the source's classes with its prompt templates (averaged per class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.source_meta.class_names or not self.source_meta.prompts:
            raise ValueError(f"evals.{self.name} (zero_shot) needs classes and prompts: data.sources."
                             f"{self.source}.label_key and .prompts")

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """accuracy (top-1), top5 (with more than 5 classes), chance (1 / classes) and num_examples."""
        if self.cfg.modality not in ("image", "audio"):
            raise ValueError(f"evals.{self.name}.modality must be 'image' or 'audio'; got {self.cfg.modality!r}")
        image_embeds, labels = self.image_embeddings(params, self.cfg.modality)
        names, templates = self.source_meta.class_names, self.source_meta.prompts
        prompts = [t.format(name) for name in names for t in templates]
        prompt_embeds = self.encode_texts(params, prompts).reshape(len(names), len(templates), -1)
        class_embeds = zero_shot.class_embeddings(prompt_embeds)
        metrics = {"accuracy": zero_shot.zero_shot_accuracy(image_embeds, class_embeds, labels),
                   "chance": 1.0 / len(names), "num_examples": float(len(labels))}
        if len(names) > 5:
            metrics["top5"] = zero_shot.top_k_accuracy(image_embeds, class_embeds, labels, 5)
        return metrics


class RetrievalEvaluator(_DualEncoderEvaluator, _RetrievalSet):
    """Image<->text recall@K of a dual encoder's embeddings (ranked on device in chunks)."""

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """i2t_r@K, t2i_r@K (K below the number of candidates), their R@1 chance levels, num_images, num_texts."""
        images, texts = self.images_and_texts()
        image_embeds = self.encode_in_batches(params, "image", images["image"])
        text_embeds = self.encode_in_batches(params, "text", texts["text_ids"], texts["text_mask"])
        k, chunk = max(self.cfg.ks), int(self.cfg.chunk)
        i2t = retrieval.top_k(image_embeds, text_embeds, k, chunk)
        t2i = retrieval.top_k(text_embeds, image_embeds, k, chunk)
        return self.recall(i2t, t2i, texts)


class PairRetrievalEvaluator(_DualEncoderEvaluator):
    """Recall@K both ways between two modalities of a dual encoder, e.g. speech -> image and image -> speech.

    Every real example of the split pairs its items; each distinct item is ranked once: an image is known by its
    image_id, a text by its tokens (identical captions are one text), a clip by its example (every clip distinct).
    An item is relevant to every item of the other modality it was paired with anywhere in the split (an image
    with two spoken captions has two right clips)."""

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """{a}_to_{b}_r@K, {b}_to_{a}_r@K (K below the number of candidates), their R@1 chance levels, num_{a},
        num_{b}."""
        pair = tuple(self.cfg.modalities or getattr(self.model, "modalities", ("image", "text")))
        if len(pair) != 2 or any(m not in MODALITY_INPUTS for m in pair):
            raise ValueError(f"evals.{self.name}.modalities must be two of {sorted(MODALITY_INPUTS)}; got {pair}")
        items = {m: {"keys": {}, "rows": collections.defaultdict(list)} for m in pair}
        pairs, position = [], 0
        for batch in self.batches():
            real = np.flatnonzero(batch["mask"] > 0)
            for r in real:
                index = []
                for m in pair:
                    key = self._item_key(m, batch, r, position)
                    seen = items[m]["keys"]
                    if key not in seen:
                        seen[key] = len(seen)
                        for name in MODALITY_INPUTS[m]:
                            items[m]["rows"][name].append(batch[name][r])
                    index.append(seen[key])
                pairs.append(index)
                position += 1
        a, b = pair
        relevant = np.zeros((len(items[a]["keys"]), len(items[b]["keys"])), bool)
        relevant[tuple(np.asarray(pairs).T)] = True
        embeds = {m: self.encode_in_batches(params, m, *[np.stack(items[m]["rows"][k]) for k in MODALITY_INPUTS[m]])
                  for m in pair}
        k, chunk = max(self.cfg.ks), int(self.cfg.chunk)
        a2b = retrieval.top_k(embeds[a], embeds[b], k, chunk)
        b2a = retrieval.top_k(embeds[b], embeds[a], k, chunk)
        metrics = retrieval.recall_by_relevance(a2b, b2a, relevant, tuple(self.cfg.ks), pair)
        metrics.update({f"num_{a}": float(relevant.shape[0]), f"num_{b}": float(relevant.shape[1])})
        return metrics

    @staticmethod
    def _item_key(modality: str, batch: dict, row: int, position: int):
        """What makes two items of `modality` the same item."""
        if modality == "image":
            return int(batch["image_id"][row])
        if modality == "text":
            return batch["text_ids"][row].tobytes()
        return position


class ITMRetrievalEvaluator(_RetrievalSet):
    """Image<->text recall@K of a single-stream model ranked by its ITM score (logit of "match" minus "no match"):
    every pair (exhaustive), or the k_test best of a first-stage dual encoder re-ranked, the rest after them in
    the first stage's order (ALBEF / BLIP's protocol)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._forward = self._jit_outputs(("itm_logits",))
        self.first_stage = _load_dual_encoder(self.cfg.first_stage) if self.cfg.first_stage else None

    def scores(self, params: Any, images: dict, texts: dict, pairs: np.ndarray) -> np.ndarray:
        """ITM scores [P] of (image, text) index pairs [P, 2], batch_size pairs at a time."""
        b = int(self.cfg.batch_size)
        out = []
        for start in range(0, len(pairs), b):
            block = pairs[start:start + b]
            n = len(block)
            block = np.pad(block, ((0, b - n), (0, 0)))  # one shape: one compilation
            batch = {k: v[block[:, 0]] for k, v in images.items() if k != "image_id"}
            text = (texts["text_ids"][block[:, 1]], texts["text_mask"][block[:, 1]])
            rows = objectives.model_inputs(batch, self.meta.model_keys, text)
            logits = np.asarray(self._forward(params, self._put(rows))["itm_logits"])
            out.append((logits[:, 1] - logits[:, 0])[:n])
        return np.concatenate(out)

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """i2t_r@K, t2i_r@K (K below the number of candidates), their R@1 chance levels, num_images, num_texts."""
        images, texts = self.images_and_texts()
        if self.cfg.max_images:
            keep = np.arange(min(int(self.cfg.max_images), len(images["image_id"])))
            images = {k: v[keep] for k, v in images.items()}
            chosen = np.isin(texts["image_of_text"], keep)
            texts = {k: (v[chosen] if v is not None else None) for k, v in texts.items()}
        n_img, n_txt = len(images["image_id"]), len(texts["text_ids"])
        k = max(self.cfg.ks)
        if self.first_stage is None:  # exhaustive: every pair
            pairs = np.stack(np.meshgrid(np.arange(n_img), np.arange(n_txt), indexing="ij"), -1).reshape(-1, 2)
            score = self.scores(params, images, texts, pairs).reshape(n_img, n_txt)
            i2t = np.argsort(-score, axis=1, kind="stable")[:, :k]
            t2i = np.argsort(-score.T, axis=1, kind="stable")[:, :k]
            return self.recall(i2t, t2i, texts)
        k_test = int(self.cfg.k_test)
        sim_rank_i2t, sim_rank_t2i = self.first_stage.rankings(images, texts, max(k, k_test))
        i2t = self._rerank(params, images, texts, sim_rank_i2t, k_test, k, image_queries=True)
        t2i = self._rerank(params, images, texts, sim_rank_t2i, k_test, k, image_queries=False)
        return self.recall(i2t, t2i, texts)

    def _rerank(self, params, images, texts, ranking, k_test, k, *, image_queries: bool) -> np.ndarray:
        """Each query's first k_test candidates sorted by ITM score, the rest in first-stage order; [Q, k]."""
        top = ranking[:, :k_test]
        queries = np.repeat(np.arange(len(top)), top.shape[1])
        pairs = np.stack([queries, top.reshape(-1)] if image_queries else [top.reshape(-1), queries], -1)
        score = self.scores(params, images, texts, pairs).reshape(top.shape)
        order = np.argsort(-score, axis=1, kind="stable")
        return np.concatenate([np.take_along_axis(top, order, axis=1), ranking[:, k_test:]], axis=1)[:, :k]


class _FirstStage:
    """A dual-encoder run used to rank candidates for re-ranking (its config.json, its latest checkpoint)."""

    def __init__(self, model: Any, params: Any, image_size: int):
        self.model, self.params, self.image_size = model, params, image_size
        self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
        self._text = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method="encode_text"))

    def rankings(self, images: dict, texts: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each image's k best texts and each text's k best images, by the dual encoder's similarity."""
        pixels = images["image"]
        if pixels.shape[1] != self.image_size:  # the first stage reads the same images at its own size
            pixels = np.asarray(jax.image.resize(pixels, (len(pixels), self.image_size, self.image_size, 3),
                                                 "bilinear", antialias=True))
        img = np.concatenate([np.asarray(self._image(self.params, pixels[i:i + 256]))
                              for i in range(0, len(pixels), 256)])
        txt = np.concatenate([np.asarray(self._text(self.params, texts["text_ids"][i:i + 256],
                                                    texts["text_mask"][i:i + 256]))
                              for i in range(0, len(texts["text_ids"]), 256)])
        return retrieval.top_k(img, txt, k), retrieval.top_k(txt, img, k)


def _load_dual_encoder(workdir: str) -> _FirstStage:
    """The first-stage ranker of itm_retrieval: a dual-encoder run's model and latest parameters."""
    from mmjax import pretrained  # pylint: disable=import-outside-toplevel
    from mmjax.models import build_model  # pylint: disable=import-outside-toplevel

    ckpt = pretrained.load_checkpoint(workdir)
    model = build_model(ckpt.model_config)
    if not hasattr(model, "encode_image"):
        raise ValueError(f"itm_retrieval.first_stage: {workdir} holds a {ckpt.model_config.get('name')} model, not "
                         f"a dual encoder")
    with open(os.path.join(workdir, "config.json")) as f:
        image_size = int(json.load(f)["data"]["image_size"])
    return _FirstStage(model, ckpt.params, image_size)


class ITMEvaluator(Evaluator):
    """Matching accuracy: true pairs, random mismatches (the next example's caption, where it differs) and one
    mismatch per attribute the source offers hard negatives for (the caption with that word swapped)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._predict = self._jit_predictions("itm_logits")

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """acc_true, acc_random, acc_other_NAME; acc (true and random balanced); acc_hard (true and the
        one-attribute mismatches balanced), when the source has attributes."""
        sums = _Sums()
        swap = self.cfg.swap
        if swap not in SWAP_INPUTS:
            raise ValueError(f"evals.{self.name}.swap must be one of {sorted(SWAP_INPUTS)}; got {swap!r}")
        attributes = list(self.source_meta.attributes) if swap == "text" else []
        for batch in self.batches():
            real = batch["mask"].astype(np.float32)
            ids, mask = batch["text_ids"], batch["text_mask"]
            said = batch["tags_text_ids"] if swap == "tags" else ids  # what must differ for a true mismatch
            differs = np.any(np.roll(said, 1, axis=0) != said, axis=1).astype(np.float32)
            # The random mismatch: the previous example's caption (clip, image, tags), where the captions (tags)
            # differ.
            rolled = {k: np.roll(batch[k], 1, axis=0) for k in SWAP_INPUTS[swap]}
            variants = {"true": ({}, 1, real), "random": (rolled, 0, real * differs)}
            for name in attributes:
                variants[f"other_{name}"] = ({"text_ids": batch[f"other_{name}_text_ids"],
                                              "text_mask": batch[f"other_{name}_text_mask"]}, 0, real)
            for name, (replaced, target, weight) in variants.items():
                rows = {**objectives.model_inputs(batch, self.meta.model_keys, (ids, mask)), **replaced}
                predicted = np.asarray(self._predict(params, self._put(rows)))
                sums.add(f"acc_{name}", (predicted == target).astype(np.float32), weight)
        metrics = sums.means()
        # Balanced accuracies: true pairs weigh as much as the mismatches they are contrasted with.
        metrics["acc"] = 0.5 * (metrics["acc_true"] + metrics["acc_random"])
        if attributes:
            metrics["acc_hard"] = 0.5 * metrics["acc_true"] + 0.5 * float(
                np.mean([metrics[f"acc_other_{n}"] for n in attributes]))
        return metrics


class MLMEvaluator(Evaluator):
    """Masked-token accuracy (BERT masking of the captions, seeded per example), overall and on each attribute's
    words (e.g. colour and shape words), which only the image can tell."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._predict = self._jit_predictions("mlm_logits")
        continuation = self.tokenizer.continuation_table() if self.cfg.whole_word else None
        self._mask = _per_example(lambda k, i, m: objectives.mask_text(k, i, m, self.tokenizer,
                                                                       mask_prob=float(self.cfg.mask_prob),
                                                                       continuation=continuation))
        # Attribute words as token ids ([CLS] word [SEP]: one token each; a word the tokenizer splits into pieces
        # is left out of the metric).
        self._word_ids = {}
        for name, words in self.source_meta.attributes.items():
            ids = self.tokenizer.encode(list(words), 4)[0]
            self._word_ids[name] = ids[ids[:, 2] == self.tokenizer.sep_id, 1]

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """acc, and acc_NAME_words per attribute."""
        sums = _Sums()
        for batch in self.batches():
            real = batch["mask"].astype(np.float32)
            masked_ids, labels, label_mask = (np.asarray(x) for x in self._mask(
                jax.random.key(0), batch["image_id"], batch["text_ids"], batch["text_mask"]))
            rows = objectives.model_inputs(batch, self.meta.model_keys, (masked_ids, batch["text_mask"]))
            pred = np.asarray(self._predict(params, self._put(rows)))
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
        self._predict = self._jit_predictions("mrc_logits")
        self._mask = _per_example(lambda k, m: objectives.mask_regions(k, m, float(self.cfg.mask_prob)))

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """acc over masked regions, and acc_object over masked regions whose majority class is not background."""
        sums = _Sums()
        background = self.source_meta.region_classes - 1
        for batch in self.batches():
            real = batch["mask"].astype(np.float32)
            masked = np.asarray(self._mask(jax.random.key(10_000), batch["image_id"], batch["region_mask"]))
            rows = objectives.model_inputs(batch, self.meta.model_keys, (batch["text_ids"], batch["text_mask"]),
                                           region_masked=masked)
            predicted = np.asarray(self._predict(params, self._put(rows)))
            target = np.argmax(batch["region_targets"], -1)
            hit = (predicted == target).astype(np.float32)
            sums.add("acc", hit, masked * real[:, None])
            # Most boxes are mostly background; the masked regions whose majority class is an object are the ones
            # where classifying takes evidence (the text and the other regions).
            sums.add("acc_object", hit, masked * real[:, None] * (target != background))
        return sums.means()


class VQAEvaluator(Evaluator):
    """VQA accuracy exactly as the official evaluator computes it, against the human answers of each question
    (read once from the dataset, by question_id, as the official code reads its annotation file)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.source_meta.answer_vocab or not self.config.data.get("answers"):
            raise ValueError(f"evals.{self.name} (vqa) needs VQA data: a source of kind 'vqa' and data.answers=True")
        self.vocab = list(self.source_meta.answer_vocab)
        self._predict = self._jit_predictions("vqa_logits")
        self._truth: dict[int, tuple[list[str], str]] | None = None

    def truth(self) -> dict[int, tuple[list[str], str]]:
        """question_id -> (the human answers as annotated, answer type) of the evaluated split."""
        if self._truth is None:
            from mmjax.data import sources  # pylint: disable=import-outside-toplevel

            cfg = pipeline.source_config_of(self.config.data, self.source)
            builder = sources.open_source(self.source, cfg)
            split = self.cfg.data.split or cfg.eval_split
            features = builder.info.features
            raw = "raw_answers" if "raw_answers" in features else "answers"  # older builds: normalised only
            keys = ["question_id", raw] + (["answer_type"] if "answer_type" in features else [])
            ds = builder.as_dataset(split=split, decoders={cfg.image_key: tfds.decode.SkipDecoding()})
            ds = ds.map(lambda ex: {k: ex[k] for k in keys})
            self._truth = {int(ex["question_id"]): ([a.decode() for a in ex[raw]],
                                                    ex["answer_type"].decode() if "answer_type" in ex else "")
                           for ex in tfds.as_numpy(ds)}
        return self._truth

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """accuracy (the official VQA accuracy), accuracy by answer type, num_questions, and unanswerable (questions
        none of whose answers is in the vocabulary: no head can score on them)."""
        predicted, question_ids, unanswerable, shown = [], [], 0.0, []
        for batch in self.batches():
            real = batch["mask"] > 0
            rows = objectives.model_inputs(batch, self.meta.model_keys, (batch["text_ids"], batch["text_mask"]))
            predicted += [self.vocab[i] for i in np.asarray(self._predict(params, self._put(rows)))[real]]
            question_ids += [int(q) for q in batch["question_id"][real]]
            unanswerable += float(np.sum(batch["answers"][real].sum(-1) == 0))
            if not shown:
                shown = [(batch["image"][i], batch["text_ids"][i]) for i in np.nonzero(real)[0][:SAMPLES]]
        truth = self.truth()
        missing = [q for q in question_ids if q not in truth]
        if missing:
            raise ValueError(f"evals.{self.name}: question_ids {missing[:5]} have no annotation")
        answers, types = zip(*(truth[q] for q in question_ids))
        scores = vqa.accuracy(predicted, [list(a) for a in answers])
        metrics = {"accuracy": float(scores.mean()), "num_questions": float(len(scores)),
                   "unanswerable": unanswerable}
        for kind in sorted(set(types) - {""}):
            metrics[f"accuracy_{kind.replace('/', '_').replace(' ', '_')}"] = float(
                scores[np.asarray(types) == kind].mean())
        self.samples = [report.Sample(image=image, text=self.tokenizer.decode(ids)[0], predicted=predicted[i],
                                      truth=collections.Counter(answers[i]).most_common(1)[0][0],
                                      correct=float(scores[i])) for i, (image, ids) in enumerate(shown)]
        if self.out_dir and jax.process_index() == 0:
            name = f"{self.name}_results" + (f"_step{step}" if step is not None else "") + ".json"
            with open(os.path.join(self.out_dir, name), "w", encoding="utf-8") as f:
                json.dump([{"question_id": q, "answer": a} for q, a in zip(question_ids, predicted)], f)
        return metrics


class CaptioningEvaluator(Evaluator):
    """Captions decoded for the split's images, scored against all of each image's reference captions with
    COCO's BLEU-1..4 and CIDEr-D; the first images' captions go to the report beside their references."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for method in ("image_memory", "decode_text"):
            if not hasattr(self.model, method):
                raise ValueError(f"evals.{self.name} (captioning) needs a captioner (a model with {method}); "
                                 f"{type(self.model).__name__} has none")
        cfg = self.cfg
        self.decode_config = decoding.DecodeConfig(
            method=cfg.method, max_len=int(cfg.max_len or self.config.data.max_len), beam_size=int(cfg.beam_size),
            length_penalty=float(cfg.length_penalty), temperature=float(cfg.temperature), top_k=int(cfg.top_k),
            top_p=float(cfg.top_p))
        tok = self.tokenizer
        self._generate = jax.jit(
            lambda params, image, rng: decoding.generate(self.model, params, image, self.decode_config,
                                                         bos_id=tok.cls_id, eos_id=tok.sep_id, pad_id=tok.pad_id,
                                                         rng=rng),
            out_shardings=sharding.replicated(self.mesh))
        self._references: dict[int, list[str]] | None = None

    def references(self) -> dict[int, list[str]]:
        """image_id -> every reference caption of that image in the evaluated split (read once)."""
        if self._references is None:
            from mmjax.data import sources  # pylint: disable=import-outside-toplevel

            texts, image_ids = sources.split_texts(self.source, pipeline.source_config_of(self.config.data,
                                                                                          self.source),
                                                   self.config.data, self.cfg.data.split)
            self._references = {}
            for text, image_id in zip(texts, image_ids):
                self._references.setdefault(int(image_id), []).append(text)
        return self._references

    def run(self, params: Any, step: int | None = None) -> dict[str, float]:
        """BLEU-1..BLEU-4, CIDEr, mean caption length (words) and num_images."""
        candidates: dict[int, str] = {}
        shown = []
        limit = self.cfg.max_images
        for i, batch in enumerate(self.batches()):
            real = batch["mask"] > 0
            tokens, _ = self._generate(params, self._put({"x": batch["image"]})["x"],
                                       jax.random.key(int(self.cfg.seed) * 100_003 + i))
            texts = self.tokenizer.decode(np.asarray(tokens))
            for row in np.nonzero(real)[0]:
                if limit is not None and len(candidates) >= limit:
                    break
                candidates[int(batch["image_id"][row])] = texts[row]
                if len(shown) < SAMPLES:
                    shown.append((batch["image"][row], int(batch["image_id"][row])))
            if limit is not None and len(candidates) >= limit:
                break
        references = self.references()
        missing = [i for i in candidates if i not in references]
        if missing:
            raise ValueError(f"evals.{self.name}: images {missing[:5]} have no reference captions")
        refs = {str(i): references[i] for i in candidates}
        cands = {str(i): c for i, c in candidates.items()}
        metrics = captioning.score(refs, cands)
        per_image = captioning.cider_per_image(refs, cands)
        metrics.update(length=float(np.mean([len(captioning.tokenize(c)) for c in cands.values()])),
                       num_images=float(len(cands)))
        self.samples = [report.Sample(image=image, text="", predicted=candidates[image_id],
                                      truth=" | ".join(references[image_id]), correct=per_image[str(image_id)])
                        for image, image_id in shown]
        if self.out_dir and jax.process_index() == 0:
            name = f"{self.name}_captions" + (f"_step{step}" if step is not None else "") + ".json"
            with open(os.path.join(self.out_dir, name), "w", encoding="utf-8") as f:
                json.dump([{"image_id": i, "caption": c} for i, c in candidates.items()], f)
        return metrics


EVALUATORS: dict[str, type[Evaluator]] = {"zero_shot": ZeroShotEvaluator, "retrieval": RetrievalEvaluator,
                                         "itm": ITMEvaluator, "mlm": MLMEvaluator, "mrc": MRCEvaluator,
                                         "vqa": VQAEvaluator, "itm_retrieval": ITMRetrievalEvaluator,
                                         "pair_retrieval": PairRetrievalEvaluator,
                                         "captioning": CaptioningEvaluator}


def build_evaluators(config: Any, *, model: Any, meta: Any, tokenizer: Any, mesh: Mesh,
                     only: list[str] | None = None, out_dir: str | None = None) -> dict[str, Evaluator]:
    """The evaluators of `config.evals` (or the ones named in `only`), in config order; those that write files
    (VQA predictions) write them into `out_dir`."""
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
                                           mesh=mesh, out_dir=out_dir)
    return built


def run_evaluators(evaluators: dict[str, Evaluator], params: Any, step: int | None = None) -> dict[str, float]:
    """Every evaluator's metrics, prefixed with its name ("itm/acc_true")."""
    metrics = {}
    for name, evaluator in evaluators.items():
        metrics.update({f"{name}/{k}": float(v) for k, v in evaluator.run(params, step).items()})
    return metrics
