"""The input pipeline: data sources -> per-process numpy batches, for training and evaluation. One path for every
dataset (the embedded one included); what a dataset offers is described to the tasks by `dataset_meta`.

    data_config = embedded_data_config()              # or default_data_config() + data_config.sources.NAME = ...
    tokenizer = load_tokenizer(data_config)
    meta = dataset_meta(data_config, tokenizer)       # classes, prompts, attributes, regions, answers, vocab size
    warnings = small_data_warnings(data_config, meta, 256, evals)  # (config.evals) splits too small to mean much
    it = train_iterator(data_config, tokenizer, global_batch_size=256, seed=0)
    batch = next(it)

Batch keys (numpy, per process; b = global_batch_size // process_count, L = data_config.max_len):

    image          float32 [b, S, S, 3]  normalised: (pixel / 255 - mean) / std, S = data_config.image_size
    audio          float32 [b, N]        audio sources: samples in [-1, 1) at data.audio.sample_rate, a clip's
                                         start zero-padded to N = max_seconds * sample_rate (the model's tower
                                         makes the log-mel features on device)
    audio_length   int32   [b]           audio sources: the clip's real samples (<= N); frames after it are padding
    image_mask     int32   [b, S, S]     with data.image_canvas (S = it): 1 on the image's pixels, 0 on padding
    text_ids       int32   [b, L]        [CLS] tokens [SEP] then pad_id (a random caption in train, caption 0 in eval)
    text_mask      int32   [b, L]        1 on real tokens incl. [CLS] / [SEP], 0 on padding
    image_id       int32   [b]           the example's id (for de-duplication and tests)
    source         int32   [b]           index into data.sources
    label          int32   [b]           with a source's label_key: the class index (meta.class_names)
    other_NAME_text_ids / _mask          with a source's negatives: the caption with attribute NAME's word swapped
    region_feats / region_boxes / region_mask / region_targets    with data.regions.enabled (meta: sizes)
    answers        float32 [b, V]        with data.answers: VQA soft scores over meta.answer_vocab
    question_id    int32   [b]           with data.answers: the question's id
    mask           float32 [b]           eval only: 1 for real examples, 0 for padding of the last batches

How it works (mmjax/data/sources.py reads each source). Each process reads only its own slice of every split.
Train: each source gives an infinite stream of examples, epoch after epoch, whose order is a function of (seed,
epoch); several sources mix by weight, position i of the process's stream coming from the source drawn by a
stateless categorical seeded by (seed, process, i // BLOCK). Batch k is positions [k b, (k + 1) b), so
`start_step=k` resumes exactly: each source starts at the count of examples it had delivered before. Captions are
tokenized on the host with the Rust tokenizer, one call per batch. Eval reads one source's split in order, and
every process runs the same number of batches, ceil(ceil(n / process_count) / b); padding rows have mask 0.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # must precede the TF import to quiet its C++ logging

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from ml_collections import config_dict

from mmjax.data import easy_vqa_captions, image_text, sources
from mmjax.data import vqa as _vqa  # noqa: F401  (registers the easy_vqa_questions builder with TFDS)
from mmjax.data.tokenizer import Tokenizer

# TF is only the input pipeline here: keep it off the accelerators (JAX owns them) and quiet.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (someone used it first); nothing to hide then
    pass
tf.get_logger().setLevel("ERROR")

BLOCK = 4096  # mixture choices are drawn this many positions at a time


def default_data_config() -> ml_collections.ConfigDict:
    """The data config with its defaults and no sources (add them to `sources`)."""
    return ml_collections.ConfigDict(dict(
        image_size=64,          # every source's images are preprocessed to image_size x image_size
        # ViLT's fine-tuning inputs instead: the shorter side image_size, the longer at most image_canvas, padded to
        # image_canvas x image_canvas, with `image_mask` (1 on the image's pixels); None: square images.
        image_canvas=config_dict.placeholder(int),
        size_divisor=32,        # with image_canvas: each side a multiple of it (ViLT: 32, its patch size)
        mean=(0.5, 0.5, 0.5),   # in [0, 1] pixel units
        std=(0.5, 0.5, 0.5),
        normalization=config_dict.placeholder(str),  # a preprocess.NORMALIZATION preset; overrides mean / std
        max_len=24,             # text length incl. [CLS] and [SEP]
        tokenizer=config_dict.placeholder(str),  # tokenizer.json / vocab.txt; None = the one saved with a source
        prefetch=2,
        # The stream is cut into this many input shards, each process reading a contiguous block of them; the
        # global batch is then the same for any number of processes dividing it (None: one shard per process).
        input_shards=config_dict.placeholder(int),
        # {key: sources.source_config(...)}; several sources are mixed by their weights.
        sources=ml_collections.ConfigDict(),
        # Sources only evaluators read (e.g. a zero-shot classification set), never trained on.
        eval_sources=ml_collections.ConfigDict(),
        eval_source=config_dict.placeholder(str),  # the source evaluated on by default (default: the first)
        # Region inputs for region-based models (UNITER, ViLBERT): precomputed features or regions_from_boxes,
        # padded to max_regions (precomputed) per example.
        # tags: OSCAR's object tags, the names of the classes the regions hold (tags_text_ids / tags_text_mask).
        regions=dict(enabled=False, max_regions=36, tags=False),
        answers=False,          # VQA sources: also deliver the answer soft scores as `answers` [V]
        # Audio sources: the rate every clip is read at (a dataset at another rate is resampled while reading) and
        # the clip length of a batch (longer clips keep their first max_seconds).
        audio=dict(sample_rate=16000, max_seconds=4.0),
    ))


def embedded_data_config(**source_overrides) -> ml_collections.ConfigDict:
    """The data config of the embedded dataset (easy_vqa_captions, built offline on first use) as its only
    source `easy_vqa`; keyword arguments override fields of that source (e.g. negatives=())."""
    c = default_data_config()
    c.sources.easy_vqa = easy_vqa_captions.source_config(**source_overrides)
    c.eval_source = "easy_vqa"
    return c


def _sources(data_config) -> list[tuple[str, ml_collections.ConfigDict]]:
    """(key, config) of every source, in config order; no sources is an error."""
    if not data_config.get("sources"):
        raise ValueError("data.sources is empty: add a source (mmjax.data.sources.source_config), or use "
                         "pipeline.embedded_data_config()")
    return [(k, data_config.sources[k]) for k in data_config.sources]


def _all_sources(data_config) -> list[tuple[str, ml_collections.ConfigDict]]:
    """The train sources, then the eval-only ones (data.eval_sources); a key may name only one of them."""
    extra = [(k, data_config.eval_sources[k]) for k in (data_config.get("eval_sources") or {})]
    clash = [k for k, _ in extra if k in data_config.sources]
    if clash:
        raise ValueError(f"data.eval_sources {clash} are also in data.sources: give them other names")
    return _sources(data_config) + extra


def source_config_of(data_config: ml_collections.ConfigDict, key: str) -> ml_collections.ConfigDict:
    """The config of source `key`, a train source or an eval-only one."""
    for name, cfg in _all_sources(data_config):
        if name == key:
            return cfg
    raise ValueError(f"no data source {key!r}; data.sources: {list(data_config.sources)}, data.eval_sources: "
                     f"{list(data_config.get('eval_sources') or {})}")


def eval_source(data_config: ml_collections.ConfigDict) -> str:
    """The source evaluated on by default: data.eval_source, or the first source."""
    key = data_config.get("eval_source") or _sources(data_config)[0][0]
    source_config_of(data_config, key)
    return key


def load_tokenizer(data_config: ml_collections.ConfigDict) -> Tokenizer:
    """`data_config.tokenizer` if set, else the tokenizer saved with the first source that has one."""
    if data_config.tokenizer:
        return Tokenizer.from_path(data_config.tokenizer)
    for key, cfg in _sources(data_config):
        path = sources.source_tokenizer_path(key, cfg)
        if path is not None:
            return Tokenizer.from_path(path)
    raise ValueError("no tokenizer: set data.tokenizer (a tokenizer.json / vocab.txt); datasets built by "
                     "`python -m mmjax.data.build` carry one")


# ----------------------------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What the data offers, handed to tasks and evaluators (they never import a dataset module).

    `sources` holds every source's SourceMeta (class names, prompts, attribute words, region sizes, answer
    vocabulary, texts per example, split sizes); the properties are the train batches' view, which every train
    source shares (a mixture whose sources disagree is refused when the pipeline starts).
    """

    sources: dict[str, sources.SourceMeta]
    eval_source: str
    vocab_size: int | None = None
    model_keys: tuple[str, ...] = ()  # the batch keys that are model inputs (image, text_ids, regions, ...)
    train_sources: tuple[str, ...] = ()  # the keys of the sources training mixes (default: all of them)

    def source(self, key: str | None = None) -> sources.SourceMeta:
        """One source's metadata (default: the eval source)."""
        key = key or self.eval_source
        if key not in self.sources:
            raise ValueError(f"no data source {key!r}; sources: {sorted(self.sources)}")
        return self.sources[key]

    def _shared(self, field: str):
        values = [getattr(m, field) for k, m in self.sources.items() if k in (self.train_sources or self.sources)]
        return values[0] if values and all(v == values[0] for v in values) else None

    @property
    def attributes(self) -> dict[str, tuple[str, ...]]:
        """Hard-negative attributes of the train batches (name -> words); {} unless every source offers them."""
        return self._shared("attributes") or {}

    @property
    def num_regions(self) -> int | None:
        return self._shared("num_regions")

    @property
    def region_feature_dim(self) -> int | None:
        return self._shared("region_feature_dim")

    @property
    def region_classes(self) -> int | None:
        return self._shared("region_classes")

    @property
    def answer_vocab(self) -> tuple[str, ...] | None:
        return self._shared("answer_vocab")


def dataset_meta(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None) -> DatasetMeta:
    """Every source's metadata (building the embedded dataset on first use), and the tokenizer's vocabulary."""
    metas = {key: sources.describe(key, cfg, data_config) for key, cfg in _all_sources(data_config)}
    meta = DatasetMeta(sources=metas, eval_source=eval_source(data_config),
                       vocab_size=None if tokenizer is None else tokenizer.vocab_size,
                       train_sources=tuple(key for key, _ in _sources(data_config)))
    return dataclasses.replace(meta, model_keys=tuple(batch_shapes(data_config, meta)))


# ----------------------------------------------------------------------------------------------- small data

# What one example of each kind is, for messages.
_UNITS = {"image_text": "image", "image_label": "image", "vqa": "question", "audio_text": "clip",
          "audio_image_text": "clip", "audio_label": "clip"}
# Evaluator kinds that report recall@K (mmjax.evaluation.evaluators; their default ks, which that module can't
# lend us: it imports this one).
_RETRIEVAL_KINDS = ("retrieval", "itm_retrieval", "pair_retrieval")
_DEFAULT_KS = (1, 5, 10)


def _split_size(key: str, cfg: ml_collections.ConfigDict, meta: DatasetMeta, split: str) -> int | None:
    """Examples in `split` of source `key`, from the dataset's info (no reading); None if it can't tell."""
    sizes = meta.sources[key].splits
    if split in sizes:
        return sizes[split]
    try:  # a slice ("train[:90%]"): TFDS sizes it from the info too
        return int(sources.open_source(key, cfg).info.splits[split].num_examples)
    except (KeyError, ValueError, AssertionError):
        return None


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def small_data_warnings(data_config: ml_collections.ConfigDict, meta: DatasetMeta, batch_size: int,
                        evals: ml_collections.ConfigDict | dict | None = None) -> list[str]:
    """Warnings (one line each) when the train splits hold fewer examples than a batch, or an evaluated split is too
    small for its metrics; `evals` is config.evals (without it: the default eval source's split). Reads only the
    datasets' info (split sizes), no examples."""
    warnings = []
    train = [(key, data_config.sources[key]) for key in (meta.train_sources or meta.sources)
             if key in data_config.sources and float(data_config.sources[key].weight) > 0]
    sizes = [(key, _split_size(key, cfg, meta, cfg.train_split), _UNITS.get(cfg.kind, "example"))
             for key, cfg in train]
    total = sum(n for _, n, _ in sizes if n is not None)
    if sizes and all(n is not None for _, n, _ in sizes) and total < batch_size:
        units = {unit for _, _, unit in sizes}
        unit = units.pop() if len(units) == 1 else "example"
        if len(sizes) == 1:
            where = f"train split ({data_config.sources[sizes[0][0]].train_split} of data.sources.{sizes[0][0]}) has"
        else:
            where = "train splits (" + ", ".join(f"data.sources.{k} {n}" for k, n, _ in sizes) + ") have"
        if total == 0:
            warnings.append(f"the {where} no examples; check data.sources")
        else:
            # A batch of B drawn from N < B items holds each ~B / N times: a contrastive loss then has that many
            # equally good columns per row, so it cannot go below ln(B / N).
            repeats = batch_size / total
            warnings.append(f"the {where} {_plural(total, unit)} < batch {batch_size}: each batch repeats "
                            f"{unit}s ~{repeats:.3g}x; a contrastive loss cannot fall below ln {repeats:.3g} = "
                            f"{np.log(repeats):.2f}; lower --config.train.batch_size (to at most {total})")
    if evals is None:  # the default evaluation split, whatever evaluates it
        checks = [("evaluation", None, {}, meta.eval_source, None)]
    else:
        checks = [(f"evals.{name}", cfg.get("kind"), cfg, (cfg.get("data") or {}).get("source") or meta.eval_source,
                   (cfg.get("data") or {}).get("split")) for name, cfg in evals.items()]
    for what, kind, cfg, key, split in checks:
        if key not in meta.sources:
            continue  # building the evaluator reports the unknown source
        source_cfg = source_config_of(data_config, key)
        split = split or source_cfg.eval_split
        n = _split_size(key, source_cfg, meta, split)
        if n is None:
            continue
        unit = _UNITS.get(source_cfg.kind, "example")
        where = f"{what}: the {split} split of data.sources.{key} has {_plural(n, unit)}"
        fix = "hold out more (python -m mmjax.data.build ... --eval_count=N) or evaluate on a larger split"
        if n == 0:
            warnings.append(f"{what}: the {split} split of data.sources.{key} is empty; {fix}")
            continue
        if kind in _RETRIEVAL_KINDS:
            if kind == "itm_retrieval" and cfg.get("max_images"):
                n = min(n, int(cfg.get("max_images")))
            dropped = [k for k in tuple(cfg.get("ks") or _DEFAULT_KS) if k >= n]
            if dropped:
                shown = ", ".join(f"R@{k}" for k in dropped)
                warnings.append(f"{where}: {shown} over {_plural(n, 'candidate')} would always be 1.0 and are not "
                                f"reported (R@1 by chance: {1 / n:.2g}); {fix}")
                continue
        if n < image_text.MIN_EVAL_EXAMPLES:  # the build warns at the same size
            warnings.append(f"{where}: its metrics move in steps of {1 / n:.2g} and mean little"
                            + (f" (R@1 by chance: {1 / n:.2g})" if kind in _RETRIEVAL_KINDS else "") + f"; {fix}")
    return warnings


# Batch keys each modality gives a model, as ShapeDtypeStructs: fn(data_config, meta, batch_size) -> {key: shape}.
def _image_keys(cfg, meta, b):
    if cfg.get("image_canvas"):
        side = cfg.image_canvas
        return {"image": ((b, side, side, 3), np.float32), "image_mask": ((b, side, side), np.int32)}
    return {"image": ((b, cfg.image_size, cfg.image_size, 3), np.float32)}


def _text_keys(cfg, meta, b):
    return {"text_ids": ((b, cfg.max_len), np.int32), "text_mask": ((b, cfg.max_len), np.int32)}


def _region_keys(cfg, meta, b):
    r, f = meta.num_regions, meta.region_feature_dim
    return {"region_feats": ((b, r, f), np.float32), "region_boxes": ((b, r, 4), np.float32),
            "region_mask": ((b, r), np.int32)}


def _tag_keys(cfg, meta, b):
    return {"tags_text_ids": ((b, cfg.max_len), np.int32), "tags_text_mask": ((b, cfg.max_len), np.int32)}


def _audio_keys(cfg, meta, b):
    return {"audio": ((b, sources.audio_samples(cfg)), np.float32), "audio_length": ((b,), np.int32)}


MODALITY_KEYS: dict[str, Callable] = {"image": _image_keys, "audio": _audio_keys, "text": _text_keys,
                                      "regions": _region_keys, "tags": _tag_keys}


def modalities(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The modalities a model reads from this data's batches: those of the train sources' kinds (+ regions)."""
    kinds = {m for _, cfg in _sources(data_config) for m in sources.KINDS.get(cfg.kind, ())}
    found = tuple(m for m in ("image", "audio", "text") if m in kinds) or ("image", "text")
    regions = ("regions",) if data_config.regions.enabled else ()
    return found + regions + (("tags",) if regions and data_config.regions.get("tags") else ())


def batch_shapes(data_config: ml_collections.ConfigDict, meta: DatasetMeta, batch_size: int = 1) -> dict:
    """jax.ShapeDtypeStructs of the model inputs of a batch, modality by modality (for abstract init)."""
    import jax  # pylint: disable=import-outside-toplevel

    shapes = {}
    for modality in modalities(data_config):
        for key, (shape, dtype) in MODALITY_KEYS[modality](data_config, meta, batch_size).items():
            shapes[key] = jax.ShapeDtypeStruct(shape, dtype)
    return shapes


def train_batch_shapes(data_config: ml_collections.ConfigDict, meta: DatasetMeta, batch_size: int) -> dict:
    """jax.ShapeDtypeStructs of every key of a training batch as the pipeline delivers it (for a dry run)."""
    import jax  # pylint: disable=import-outside-toplevel

    shapes = batch_shapes(data_config, meta, batch_size)
    ids = jax.ShapeDtypeStruct((batch_size,), np.int32)
    shapes.update(image_id=ids, source=ids)
    if all(meta.sources[k].class_names for k in meta.train_sources):
        shapes["label"] = ids
    for name in meta.attributes:
        shapes[f"other_{name}_text_ids"] = shapes[f"other_{name}_text_mask"] = shapes["text_ids"]
    if data_config.regions.enabled and meta.region_classes:
        shapes["region_targets"] = jax.ShapeDtypeStruct((batch_size, meta.num_regions, meta.region_classes),
                                                        np.float32)
    if data_config.answers and meta.answer_vocab:
        shapes["answers"] = jax.ShapeDtypeStruct((batch_size, len(meta.answer_vocab)), np.float32)
        shapes["question_id"] = ids
    return shapes


# ----------------------------------------------------------------------------------------------- iterators


def _process_layout(global_batch_size: int, process_index: int | None,
                    process_count: int | None) -> tuple[int, int, int]:
    """(process_index, process_count, per-process batch size), defaults from JAX."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count "
                         f"{process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    return process_index, process_count, global_batch_size // process_count


def _to_numpy_batches(ds: tf.data.Dataset, tokenizer: Tokenizer, max_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Pulls tf.data batches and tokenizes their caption strings on the host.

    `caption` becomes text_ids / text_mask; any other `caption_NAME` becomes NAME_text_ids / NAME_text_mask (so
    `caption_tags`, the regions' object tags, becomes tags_text_ids / tags_text_mask).
    """
    for batch in ds.as_numpy_iterator():
        for key in [k for k in batch if k == "caption" or k.startswith("caption_")]:
            captions = batch.pop(key)
            prefix = "" if key == "caption" else key[len("caption_"):] + "_"
            ids, mask = tokenizer.encode([c.decode("utf-8") for c in captions], max_len)
            batch[prefix + "text_ids"], batch[prefix + "text_mask"] = ids, mask
        yield batch


def _mixture_logits(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"data.sources weights must be >= 0 with a positive sum; got {list(w)}")
    return np.log(np.maximum(w / w.sum(), 1e-30)).astype(np.float32)


def _choice_block(logits: tf.Tensor, seed: int, process_index: int, block) -> tf.Tensor:
    """The sources of stream positions [block * BLOCK, (block + 1) * BLOCK): int64 [BLOCK]."""
    return tf.random.stateless_categorical(logits[None], BLOCK,
                                           seed=sources._seed(seed, 7919, process_index, block))[0]


def mixture_counts(weights: list[float], position: int, *, seed: int, process_index: int) -> np.ndarray:
    """How many of the first `position` examples of a process's mixture stream each source delivered."""
    logits = tf.constant(_mixture_logits(weights))
    k = len(weights)
    full, rest = divmod(position, BLOCK)

    @tf.function(autograph=False)
    def count(lo, hi):
        def body(b, total):
            draws = _choice_block(logits, seed, process_index, b)
            return b + 1, total + tf.math.bincount(draws, minlength=k, maxlength=k, dtype=tf.int64)

        return tf.while_loop(lambda b, _: b < hi, body, (lo, tf.zeros([k], tf.int64)))[1]

    counts = np.zeros(k, np.int64)
    if full > 10_000:
        logging.info("counting the mixture's first %d draws to resume it exactly", position)
    for lo in range(0, full, 1024):
        counts += count(tf.constant(lo, tf.int64), tf.constant(min(lo + 1024, full), tf.int64)).numpy()
    if rest:
        last = _choice_block(logits, seed, process_index, tf.constant(full, tf.int64)).numpy()[:rest]
        counts += np.bincount(last, minlength=k)
    return counts


def _check_same_structure(streams: list[tf.data.Dataset], keys: list[str]) -> None:
    """Mixed sources must give the same keys, shapes and dtypes (a mismatch names both sources)."""
    first = streams[0].element_spec
    for ds, key in zip(streams[1:], keys[1:]):
        spec = ds.element_spec
        if spec.keys() != first.keys() or any(spec[k] != first[k] for k in spec):
            diff = sorted(k for k in set(spec) | set(first) if spec.get(k) != first.get(k))
            raise ValueError(f"data.sources.{key} gives different example keys/shapes than "
                             f"data.sources.{keys[0]} on {diff}")


def train_iterator(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, global_batch_size: int,
                   seed: int, start_step: int = 0, process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Infinite train batches for this process; batch k is a pure function of (seed, k), so `start_step` resumes
    exactly. With data.input_shards = S, the process reads shards [p S/P, (p + 1) S/P) and concatenates their rows,
    so the global batch does not depend on the process count P (a 2-host run sees the 1-host run's batches)."""
    process_index, process_count, _ = _process_layout(global_batch_size, process_index, process_count)
    shards = data_config.get("input_shards") or process_count
    if shards % process_count or global_batch_size % shards:
        raise ValueError(f"data.input_shards={shards} must be a multiple of the process count {process_count} and "
                         f"divide the batch size {global_batch_size}")
    per_process = shards // process_count
    iterators = [_shard_batches(data_config, tokenizer, global_batch_size=global_batch_size, seed=seed,
                                start_step=start_step, shard=process_index * per_process + j, shards=shards)
                 for j in range(per_process)]
    if len(iterators) == 1:
        return iterators[0]
    return ({k: np.concatenate([part[k] for part in parts]) for k in parts[0]} for parts in zip(*iterators))


def _shard_batches(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, global_batch_size: int,
                   seed: int, start_step: int, shard: int, shards: int) -> Iterator[dict[str, np.ndarray]]:
    """The batches of input shard `shard` of `shards` (global_batch_size / shards rows each)."""
    process_index, process_count, b = _process_layout(global_batch_size, shard, shards)
    meta = dataset_meta(data_config)
    pairs = _sources(data_config)
    start = start_step * b  # this process's stream position
    weights = [float(cfg.weight) for _, cfg in pairs]
    consumed = ([start] if len(pairs) == 1
                else mixture_counts(weights, start, seed=seed, process_index=process_index).tolist())
    streams = [sources.train_examples(key, i, cfg, data_config, meta.sources[key], seed=seed,
                                      consumed=int(consumed[i]), process_index=process_index,
                                      process_count=process_count)
               for i, (key, cfg) in enumerate(pairs)]
    _check_same_structure(streams, [key for key, _ in pairs])
    if len(streams) == 1:  # the source's chunks cut into batches, without unbatching them
        ds = streams[0].rebatch(b, drop_remainder=True)
    else:
        logits = tf.constant(_mixture_logits(weights))
        first_block, skip = divmod(start, BLOCK)
        choices = tf.data.Dataset.range(first_block, np.iinfo(np.int64).max).flat_map(
            lambda blk: tf.data.Dataset.from_tensor_slices(_choice_block(logits, seed, process_index, blk)))
        ds = tf.data.Dataset.choose_from_datasets([s.unbatch() for s in streams], choices.skip(skip))
        ds = ds.batch(b, drop_remainder=True)
    ds = ds.prefetch(data_config.prefetch)
    return _to_numpy_batches(ds, tokenizer, data_config.max_len)


def eval_batches(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, global_batch_size: int,
                 source: str | None = None, split: str | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over `split` (default: the source's eval_split) of `source` (default: data.eval_source)
    with caption 0; the last batches are padded (mask 0) so every process runs the same number of batches."""
    process_index, process_count, b = _process_layout(global_batch_size, process_index, process_count)
    key = source or eval_source(data_config)
    cfg = source_config_of(data_config, key)
    index = [k for k, _ in _all_sources(data_config)].index(key)
    meta = sources.describe(key, cfg, data_config)
    split = split or cfg.eval_split
    ds, n_local, total = sources.eval_examples(key, index, cfg, data_config, meta, split=split,
                                               process_index=process_index, process_count=process_count)
    ds = ds.map(lambda chunk: dict(chunk, mask=tf.ones(tf.shape(chunk["image_id"]), tf.float32)))
    pad = sources.num_batches(total, process_count, b) * b - n_local
    if pad > 0:  # one chunk of padding rows: zeros, empty texts, image_id -1, mask 0
        dummy = {k: tf.zeros([pad, *s.shape[1:]], s.dtype) if s.dtype != tf.string else tf.fill([pad], "")
                 for k, s in ds.element_spec.items()}
        dummy["image_id"] = tf.fill([pad], -1)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(dummy))
    ds = ds.rebatch(b).prefetch(data_config.prefetch)
    return _to_numpy_batches(ds, tokenizer, data_config.max_len)
