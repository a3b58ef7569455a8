"""Streaming input over real datasets: TFDS sources, weighted mixtures, per-process shards, exact resume.

A source is a prepared TFDS dataset, named in `data.sources` (see `source_config`):

    c.data.sources.coco = source_config(name="coco_captions/2014", data_dir="~/tensorflow_datasets",
                                        text_key="captions/text", id_key="image/id")
    c.data.sources.mine = source_config(dir="my_data/tfds")          # `python -m mmjax.data.build ...` output
    c.data.sources.vqa = source_config(dir="vqa/tfds", kind="vqa", weight=0.5)

The datasets are read from their TFRecord or ArrayRecord shards, never downloaded. How one process's train
stream is made, per source (TFRecord):

  records   the file ranges of this process's slice of the split (`tfds.even_splits`: disjoint, together the whole
            split, sizes differing by at most one example; a file may be shared between processes, which is how
            fewer files than processes works).
  epoch e   those ranges in an order permuted by (seed, source, e), read interleaved, then a shuffle buffer seeded
            by the same triple. Epoch e's order is a function of (seed, e) only.
  resume    position n of the stream is epoch n // n_local, record n % n_local; a restart jumps to that epoch and
            skips the serialized records before it (at most one epoch of reading, no decoding).
  example   parse, decode and augment with a stateless seed from (seed, source, process, position).
ArrayRecord shards are read by random access instead: epoch e is a full permutation of the process's records
seeded by (seed, source, e), and a resume starts inside it without reading what came before.

Several sources mix by weight: position i of the process's stream comes from the source drawn by a stateless
categorical seeded by (seed, process, i // BLOCK), so how many examples each source has delivered before any
position can be counted, and a resumed mixture continues exactly. Batch k is positions [k b, (k + 1) b).

Evaluation reads one source's eval split in file order, and every process yields the same number of batches
(ceil(ceil(n / processes) / b)); the last ones are padded with zero examples whose `mask` is 0.

Per-example keys (before tokenization): image float32 [S, S, 3] normalised, caption string, image_id int32,
source int32 (index into `data.sources`), and with `data.regions.enabled`: region_feats [R, D], region_boxes [R, 4],
region_mask [R] (1 on real regions; R = data.regions.max_regions, longer lists are truncated) and region_targets
[R, C] when the dataset has class probabilities; with `data.answers`: answers float32 [V] (VQA soft scores).
"""

from __future__ import annotations

import difflib
import glob
import json
import math
import os

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from ml_collections import config_dict

from mmjax.data import preprocess

KINDS = ("image_text", "vqa")
VQA_TEXT = ("question", "question_answer")
BLOCK = 4096  # mixture choices are drawn this many positions at a time


def source_config(**overrides) -> ml_collections.ConfigDict:
    """One source of `data.sources` with its defaults; keyword arguments override fields."""
    c = ml_collections.ConfigDict(dict(
        kind="image_text",   # image_text: image + captions; vqa: image + question (+ answer soft scores)
        name=config_dict.placeholder(str),      # a TFDS catalogue name, e.g. "coco_captions/2014"
        dir=config_dict.placeholder(str),       # or a prepared dataset directory (mmjax.data.build prints it)
        data_dir=config_dict.placeholder(str),  # for `name`: where it is prepared (None = ~/tensorflow_datasets)
        manual_dir=config_dict.placeholder(str),  # for `name` with `prepare`: manually downloaded files
        prepare=False,       # build a catalogue dataset that is not prepared yet (may download: never default)
        weight=1.0,          # share of the mixture (weights are normalised over the sources)
        train_split="train",
        eval_split="validation",
        image_key="image",   # feature paths, "/" for nesting (coco_captions: text_key="captions/text")
        text_key="captions",
        id_key="image_id",   # None or missing: the position within the split
        shuffle_buffer=10_000,
        text=dict(clean=True, lowercase=False, vqa="question"),  # vqa: "question" | "question_answer"
        image=preprocess.default_image_config(),
    ))
    for key, value in overrides.items():
        if key not in c:
            raise ValueError(f"unknown source field {key!r}; known: {sorted(c)}")
        if isinstance(value, dict):
            c[key].update(value)
        else:
            c[key] = value
    return c


# ----------------------------------------------------------------------------------------------- opening sources


def _find_prepared(path: str, key: str) -> str:
    """The prepared dataset directory at `path` or the single one below it."""
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise ValueError(f"data.sources.{key}.dir: no such directory: {path}")
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        return path
    found = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "**", "dataset_info.json"),
                                                        recursive=True))
    if len(found) != 1:
        what = "no prepared TFDS dataset (dataset_info.json)" if not found else f"{len(found)} datasets: {found}"
        raise ValueError(f"data.sources.{key}.dir: {path} holds {what}; give the dataset's directory")
    return found[0]


def _check_name_or_dir(key: str, cfg: ml_collections.ConfigDict) -> None:
    """A source names a catalogue dataset or a prepared directory, not both, not neither."""
    if bool(cfg.name) == bool(cfg.dir):
        raise ValueError(f"data.sources.{key}: set exactly one of `name` (a TFDS catalogue name) or `dir` "
                         f"(a prepared dataset directory)")


def open_source(key: str, cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of source `key`; unknown names, unprepared data and bad kinds are clear errors."""
    if cfg.kind not in KINDS:
        raise ValueError(f"data.sources.{key}.kind must be one of {KINDS}; got {cfg.kind!r}")
    _check_name_or_dir(key, cfg)
    if cfg.dir:
        builder = tfds.builder_from_directory(_find_prepared(cfg.dir, key))
    else:
        try:
            builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            base = cfg.name.split("/")[0].split(":")[0]
            close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=5)
            raise ValueError(f"data.sources.{key}.name: TFDS does not know dataset {cfg.name!r}"
                             + (f"; close names: {', '.join(close)}" if close else "")) from None
        if not builder.is_prepared():
            if not cfg.prepare:
                raise ValueError(
                    f"data.sources.{key}: {cfg.name} is not prepared in {builder.data_dir_root}. Prepare it once "
                    f"with `tfds build {cfg.name} --data_dir={builder.data_dir_root}"
                    f"{' --manual_dir=' + cfg.manual_dir if cfg.manual_dir else ''}` (datasets that download "
                    f"need the network), or set data.sources.{key}.prepare=True")
            logging.info("preparing %s in %s", cfg.name, builder.data_dir)
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=cfg.manual_dir, try_download_gcs=False))
    if _file_format(builder) not in ("tfrecord", "array_record"):
        raise ValueError(f"data.sources.{key}: {builder.name} is stored as {_file_format(builder)}; the streaming "
                         f"reader reads TFRecord and ArrayRecord shards")
    features = builder.info.features
    # id_key may be absent (examples are then numbered by position); the image and the text must be there.
    for what in ("image_key",) if cfg.kind == "vqa" else ("image_key", "text_key"):
        if _feature(features, cfg[what]) is None:
            raise ValueError(f"data.sources.{key}.{what}={cfg[what]!r} is not a feature of {builder.name}; "
                             f"features: {sorted(features.keys())}")
    if cfg.kind == "vqa":
        missing = [k for k in ("question", "answer_ids", "answer_scores") if k not in features]
        if missing:
            raise ValueError(f"data.sources.{key}: kind='vqa' needs features {missing} (a dataset built by "
                             f"`python -m mmjax.data.build vqa`)")
    return builder


def _feature(features, path: str):
    """The (nested) feature at a "/" path, or None. A key that itself holds "/" ("image/id") is taken whole."""
    if path in features.keys():
        return features[path]
    node = features
    for part in path.split("/"):
        try:
            node = node[part]
        except (KeyError, TypeError):
            inner = getattr(node, "feature", None)  # Sequence({...}) nests its dict one level down
            if inner is None:
                return None
            try:
                node = inner[part]
            except (KeyError, TypeError):
                return None
    return node


def _get(example: dict, path: str):
    """The (nested) value of a deserialized example at a "/" path (or at the whole key, if it holds "/")."""
    if path in example:
        return example[path]
    node = example
    for part in path.split("/"):
        node = node[part]
    return node


def check_split(builder: tfds.core.DatasetBuilder, split: str, key: str) -> None:
    """A split that the dataset does not have is an error naming the ones it has."""
    base = split.split("[")[0]
    if base not in builder.info.splits:
        raise ValueError(f"data.sources.{key}: {builder.name} has no split {split!r}; it has "
                         f"{', '.join(sorted(builder.info.splits.keys()))}")


def _file_format(builder: tfds.core.DatasetBuilder) -> str:
    """"tfrecord" or "array_record" (or another TFDS format name, which the reader refuses)."""
    file_format = getattr(builder.info, "file_format", None)
    return str(getattr(file_format, "value", file_format) or "tfrecord").lower()


def _instructions(builder: tfds.core.DatasetBuilder, split: str, process_index: int, process_count: int) -> list:
    """TFDS file instructions (file, skip, take) of this process's even slice of `split`."""
    sub = tfds.even_splits(split, n=process_count)[process_index]
    instructions = [i for i in builder.info.splits[sub].file_instructions if i.take > 0]
    if not instructions:
        total = builder.info.splits[split].num_examples
        raise ValueError(f"{builder.name} split {split!r} has {total} examples: too few for {process_count} "
                         f"processes (process {process_index} would read none)")
    return instructions


def read_plan(builder: tfds.core.DatasetBuilder, split: str, process_index: int,
              process_count: int) -> tuple[list[str], list[int], list[int]]:
    """(files, skips, takes): this process's even slice of `split` as ranges of records in the shard files."""
    plan = [(os.fspath(i.filename), int(i.skip), int(i.take))
            for i in _instructions(builder, split, process_index, process_count)]
    files, skips, takes = zip(*plan)
    return list(files), list(skips), list(takes)


def _array_record_reader(builder, split: str, process_index: int, process_count: int):
    """Random access to this process's slice of an ArrayRecord split (record i -> serialized example)."""
    from array_record.python import array_record_data_source  # pylint: disable=import-outside-toplevel

    return array_record_data_source.ArrayRecordDataSource(
        _instructions(builder, split, process_index, process_count))


def _read_indices(reader, indices: tf.data.Dataset, chunk: int = 64) -> tf.data.Dataset:
    """The serialized records at a stream of int64 indices, read `chunk` at a time, in order."""
    def read(idx):
        records = tf.py_function(lambda i: tf.constant(reader.__getitems__(i.numpy().tolist()), tf.string),
                                 [idx], tf.string)
        return tf.ensure_shape(records, [None])

    return indices.batch(chunk).map(read).unbatch()


def answer_vocab(builder: tfds.core.DatasetBuilder) -> list[str]:
    """The VQA answer vocabulary saved with a dataset built by `mmjax.data.build vqa`."""
    path = os.path.join(os.fspath(builder.data_dir), "answer_vocab.json")
    if not os.path.exists(path):
        raise ValueError(f"{builder.name}: no answer_vocab.json in {builder.data_dir}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------- one example


def _seed(*parts) -> tf.Tensor:
    """A stateless-op seed [2] from integer parts (python ints or int64 tensors)."""
    a = tf.constant(0, tf.int64)
    for p in parts:  # a small polynomial hash keeps the parts apart; stateless ops mix the bits themselves
        a = a * 1_000_003 + tf.cast(p, tf.int64)
    return tf.stack([a // 2**31, a % 2**31])


def _example_fn(key: str, index: int, builder, cfg, data_config, *, train: bool, seed: int, process_index: int):
    """fn(position, record) -> the common per-example dict for source `key` (see the module docstring)."""
    features = builder.info.features
    image_feature = _feature(features, cfg.image_key)
    decoders = None
    if isinstance(image_feature, tfds.features.Image) and "/" not in cfg.image_key:
        decoders = {cfg.image_key: tfds.decode.SkipDecoding()}  # we decode ourselves, after the resume skip
    if data_config.get("normalization"):
        mean, std = preprocess.mean_std(data_config.normalization)
    else:
        mean, std = tuple(data_config.mean), tuple(data_config.std)
    image_fn = preprocess.image_preprocess_fn(cfg.image, train=train, image_size=data_config.image_size,
                                              mean=mean, std=std)
    has_id = bool(cfg.id_key) and _feature(features, cfg.id_key) is not None
    regions = bool(data_config.regions.enabled)
    vocab = None
    if cfg.kind == "vqa" and (cfg.text.vqa == "question_answer" or data_config.get("answers")):
        vocab = answer_vocab(builder)
    if cfg.kind == "vqa" and cfg.text.vqa not in VQA_TEXT:
        raise ValueError(f"data.sources.{key}.text.vqa must be one of {VQA_TEXT}; got {cfg.text.vqa!r}")
    if data_config.get("answers") and cfg.kind != "vqa":
        raise ValueError(f"data.answers needs VQA sources; data.sources.{key} is kind {cfg.kind!r}")
    if regions:
        _check_regions(key, builder, data_config)

    def fn(position, record):
        ex = features.deserialize_example(record, decoders=decoders)
        s = _seed(seed, index, process_index, position)
        k_image, k_text = tf.unstack(tf.random.experimental.stateless_split(s, 2))
        out = {"image": image_fn(_get(ex, cfg.image_key), k_image),
               "image_id": tf.cast(_get(ex, cfg.id_key), tf.int32) if has_id else tf.cast(position, tf.int32),
               "source": tf.constant(index, tf.int32)}
        if cfg.kind == "vqa":
            text = ex["question"]
            if cfg.text.vqa == "question_answer":
                top = tf.gather(ex["answer_ids"], tf.argmax(ex["answer_scores"]))
                answer = tf.cond(tf.size(ex["answer_ids"]) > 0,
                                 lambda: tf.gather(tf.constant(vocab), top), lambda: tf.constant(""))
                text = tf.strings.join([text, answer], separator=" ")
            if data_config.get("answers"):
                out["answers"] = tf.scatter_nd(tf.cast(ex["answer_ids"], tf.int32)[:, None],
                                               tf.cast(ex["answer_scores"], tf.float32), [len(vocab)])
        else:
            texts = _get(ex, cfg.text_key)
            if isinstance(texts, tf.RaggedTensor):  # nested sequences (ref_coco: objects/refexp/raw): all of them
                texts = texts.flat_values
            texts = tf.reshape(texts, [-1])
            n = tf.shape(texts)[0]
            tf.debugging.assert_positive(n, message=f"data.sources.{key}: an example without captions")
            pick = (tf.random.stateless_uniform([], k_text, 0, 2**30, tf.int32) % n) if train else 0
            text = texts[pick]
        if cfg.text.clean:
            text = preprocess.clean_text(text, lowercase=bool(cfg.text.lowercase))
        elif cfg.text.lowercase:
            text = tf.strings.lower(text)
        # An empty text would train as a silent [CLS] [SEP]: stop, naming the source and the example.
        empty = tf.debugging.Assert(tf.strings.length(text) > 0,
                                    [f"data.sources.{key}: empty text at image_id", out["image_id"]])
        with tf.control_dependencies([empty]):
            out["caption"] = tf.identity(text)
        if regions:
            out.update(_region_inputs(ex, data_config))
        return out

    return fn


def _check_regions(key: str, builder, data_config) -> None:
    """The dataset has region features of the configured width (and class count, when it has classes)."""
    features = builder.info.features
    if "region_features" not in features:
        raise ValueError(f"data.regions.enabled: data.sources.{key} ({builder.name}) has no region_features; "
                         f"build it with `python -m mmjax.data.build image_text --regions=DIR`")
    dim = features["region_features"].shape[-1]
    if data_config.regions.get("feature_dim") != dim:
        raise ValueError(f"data.sources.{key} has {dim}-d region features; set data.regions.feature_dim={dim} "
                         f"(and the model's region_feat_dim)")
    if "region_class_probs" in features:
        classes = features["region_class_probs"].shape[-1]
        if data_config.regions.get("num_classes") != classes:
            raise ValueError(f"data.sources.{key} has {classes} region classes; set "
                             f"data.regions.num_classes={classes} (and the model's num_region_classes)")


def _pad_rows(x: tf.Tensor, rows: int) -> tf.Tensor:
    """First `rows` rows of x [n, ...], zero-padded when n < rows."""
    x = x[:rows]
    pad = rows - tf.shape(x)[0]
    return tf.pad(x, tf.concat([[[0, pad]], tf.zeros([tf.rank(x) - 1, 2], tf.int32)], axis=0))


def _region_inputs(ex: dict, data_config) -> dict[str, tf.Tensor]:
    """Precomputed regions padded / truncated to data.regions.max_regions."""
    r = int(data_config.regions.max_regions)
    feats = tf.cast(ex["region_features"], tf.float32)
    n = tf.minimum(tf.shape(feats)[0], r)
    out = {"region_feats": tf.ensure_shape(_pad_rows(feats, r), [r, feats.shape[-1]]),
           "region_boxes": tf.ensure_shape(_pad_rows(tf.cast(ex["region_boxes"], tf.float32), r), [r, 4]),
           "region_mask": tf.cast(tf.range(r) < n, tf.int32)}
    if "region_class_probs" in ex:
        probs = tf.cast(ex["region_class_probs"], tf.float32)
        out["region_targets"] = tf.ensure_shape(_pad_rows(probs, r), [r, probs.shape[-1]])
    return out


# ----------------------------------------------------------------------------------------------- streams


def _records(files, skips, takes, *, seed: int, index: int, epoch, shuffle_buffer: int) -> tf.data.Dataset:
    """One epoch of this process's serialized records: file ranges permuted, interleaved, buffer-shuffled."""
    s = _seed(seed, index, epoch)
    order = tf.random.experimental.stateless_shuffle(tf.range(len(files)), seed=s)
    ranges = tf.data.Dataset.from_tensor_slices(
        (tf.gather(tf.constant(files), order), tf.gather(tf.constant(skips, tf.int64), order),
         tf.gather(tf.constant(takes, tf.int64), order)))
    ds = ranges.interleave(lambda f, k, t: tf.data.TFRecordDataset(f).skip(k).take(t),
                           cycle_length=min(len(files), 8), block_length=1,
                           num_parallel_calls=min(len(files), 8), deterministic=True)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=s[0] * 2**31 + s[1], reshuffle_each_iteration=False)
    return ds


def _source_stream(key: str, index: int, builder, cfg, data_config, *, seed: int, consumed: int,
                   process_index: int, process_count: int) -> tf.data.Dataset:
    """Source `key`'s infinite train examples for this process, from its stream position `consumed` on."""
    check_split(builder, cfg.train_split, key)
    if _file_format(builder) == "array_record":
        # Random access: epoch e is a full permutation seeded by (seed, source, e), and a resume starts inside
        # it without reading anything before.
        reader = _array_record_reader(builder, cfg.train_split, process_index, process_count)
        n_local = len(reader)
        start_epoch, offset = divmod(consumed, n_local)

        def permutation(epoch):
            return tf.random.experimental.stateless_shuffle(tf.range(n_local, dtype=tf.int64),
                                                            seed=_seed(seed, index, epoch))

        first = tf.data.Dataset.from_tensor_slices(permutation(start_epoch)[offset:])
        rest = tf.data.Dataset.range(start_epoch + 1, np.iinfo(np.int64).max).flat_map(
            lambda e: tf.data.Dataset.from_tensor_slices(permutation(e)))
        ds = _read_indices(reader, first.concatenate(rest))
    else:
        files, skips, takes = read_plan(builder, cfg.train_split, process_index, process_count)
        n_local = sum(takes)
        start_epoch, offset = divmod(consumed, n_local)
        epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
        ds = epochs.flat_map(lambda e: _records(files, skips, takes, seed=seed, index=index, epoch=e,
                                                shuffle_buffer=int(cfg.shuffle_buffer)))
        ds = ds.skip(offset)
    ds = ds.enumerate(start=consumed)
    fn = _example_fn(key, index, builder, cfg, data_config, train=True, seed=seed, process_index=process_index)
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _mixture_logits(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"data.sources weights must be >= 0 with a positive sum; got {list(w)}")
    return np.log(np.maximum(w / w.sum(), 1e-30)).astype(np.float32)


def _choice_block(logits: tf.Tensor, seed: int, process_index: int, block) -> tf.Tensor:
    """The sources of stream positions [block * BLOCK, (block + 1) * BLOCK): int64 [BLOCK]."""
    return tf.random.stateless_categorical(logits[None], BLOCK, seed=_seed(seed, 7919, process_index, block))[0]


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


def _sources(data_config) -> list[tuple[str, ml_collections.ConfigDict]]:
    """(key, config) of every source, in config order."""
    return [(k, data_config.sources[k]) for k in data_config.sources]


def train_dataset(data_config: ml_collections.ConfigDict, *, batch_size: int, seed: int, start_step: int,
                  process_index: int, process_count: int) -> tf.data.Dataset:
    """This process's infinite train batches (caption strings untokenized); batch k is a function of (seed, k)."""
    sources = _sources(data_config)
    start = start_step * batch_size  # this process's stream position
    weights = [float(cfg.weight) for _, cfg in sources]
    if len(sources) == 1:
        consumed = [start]
    else:
        consumed = mixture_counts(weights, start, seed=seed, process_index=process_index).tolist()
    streams = [_source_stream(key, i, open_source(key, cfg), cfg, data_config, seed=seed, consumed=int(consumed[i]),
                              process_index=process_index, process_count=process_count)
               for i, (key, cfg) in enumerate(sources)]
    _check_same_structure(streams, sources)
    if len(streams) == 1:
        ds = streams[0]
    else:
        logits = tf.constant(_mixture_logits(weights))
        first_block, skip = divmod(start, BLOCK)
        choices = tf.data.Dataset.range(first_block, np.iinfo(np.int64).max).flat_map(
            lambda b: tf.data.Dataset.from_tensor_slices(_choice_block(logits, seed, process_index, b)))
        ds = tf.data.Dataset.choose_from_datasets(streams, choices.skip(skip))
    return ds.batch(batch_size, drop_remainder=True).prefetch(data_config.prefetch)


def _check_same_structure(streams: list[tf.data.Dataset], sources) -> None:
    """Mixed sources must give the same keys, shapes and dtypes (a mismatch names both sources)."""
    first = streams[0].element_spec
    for ds, (key, _) in zip(streams[1:], sources[1:]):
        spec = ds.element_spec
        if spec.keys() != first.keys() or any(spec[k] != first[k] for k in spec):
            diff = sorted(k for k in set(spec) | set(first) if spec.get(k) != first.get(k))
            raise ValueError(f"data.sources.{key} gives different example keys/shapes than "
                             f"data.sources.{sources[0][0]} on {diff}")


def eval_source(data_config: ml_collections.ConfigDict) -> str:
    """The source evaluated on: data.eval_source, or the first source."""
    key = data_config.get("eval_source") or next(iter(data_config.sources))
    if key not in data_config.sources:
        raise ValueError(f"data.eval_source={key!r} is not one of data.sources: {list(data_config.sources)}")
    return key


def eval_dataset(data_config: ml_collections.ConfigDict, *, batch_size: int, split: str | None,
                 process_index: int, process_count: int) -> tf.data.Dataset:
    """One ordered pass over the eval source's split, padded so every process yields the same number of batches."""
    key = eval_source(data_config)
    cfg = data_config.sources[key]
    index = list(data_config.sources).index(key)
    builder = open_source(key, cfg)
    split = split or cfg.eval_split
    check_split(builder, split, key)
    total = builder.info.splits[split].num_examples
    num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
    if _file_format(builder) == "array_record":
        reader = _array_record_reader(builder, split, process_index, process_count)
        n_local = len(reader)
        records = _read_indices(reader, tf.data.Dataset.range(n_local))
    else:
        files, skips, takes = read_plan(builder, split, process_index, process_count)
        n_local = sum(takes)
        ranges = tf.data.Dataset.from_tensor_slices((files, tf.constant(skips, tf.int64),
                                                     tf.constant(takes, tf.int64)))
        records = ranges.flat_map(lambda f, k, t: tf.data.TFRecordDataset(f).skip(k).take(t))
    fn = _example_fn(key, index, builder, cfg, data_config, train=False, seed=0, process_index=process_index)
    ds = records.enumerate().map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda ex: dict(ex, mask=tf.constant(1.0)))
    pad = num_batches * batch_size - n_local
    if pad:
        dummy = {k: tf.zeros(s.shape, s.dtype) if s.dtype != tf.string else tf.constant("")
                 for k, s in ds.element_spec.items()}
        dummy["image_id"] = tf.constant(-1, tf.int32)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(dummy).repeat(pad))
    return ds.batch(batch_size).prefetch(data_config.prefetch)


def source_tokenizer_path(data_config: ml_collections.ConfigDict) -> str | None:
    """The tokenizer saved with the first source that has one (mmjax.data.build writes tokenizer.json)."""
    for key, cfg in _sources(data_config):
        _check_name_or_dir(key, cfg)
        if cfg.dir:
            path = os.path.join(_find_prepared(cfg.dir, key), "tokenizer.json")
            if os.path.exists(path):
                return path
    return None
