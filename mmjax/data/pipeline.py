"""tf.data input pipelines: TFDS split -> per-process numpy batches.

Two paths behind one interface: the embedded dataset (`data.name`, held in memory, below) and real datasets
(`data.sources`: TFDS catalogue names or prepared directories, mixed by weight, streamed from their TFRecord
shards; see mmjax/data/streaming.py). Both give the same batch keys, the same (seed, step) order with exact resume,
the same per-process split and the same eval padding.

    data_config = default_data_config()
    tokenizer = load_tokenizer(data_config)
    it = train_iterator(data_config, tokenizer, global_batch_size=256, seed=0)
    batch = next(it)

Batch keys (numpy, per process; b = global_batch_size // process_count, L = data_config.max_len):

    image       float32 [b, H, W, 3]  normalised: (pixel / 255 - mean) / std, H = W = data_config.image_size
    text_ids    int32   [b, L]        [CLS] tokens [SEP] then pad_id (a random caption in train, caption 0 in eval)
    text_mask   int32   [b, L]        1 on real tokens incl. [CLS] / [SEP], 0 on padding
    label       int32   [b]           class index into CLASS_NAMES ("red circle" = 0, ...), label = color * 3 + shape
    image_id    int32   [b]           the example's id within its split (for de-duplication and tests)
    mask        float32 [b]           eval only: 1 for real examples, 0 for padding of the last batch

How it works. Each process reads only its own slice of the split (`tfds.even_splits`), decodes it once and keeps
the uint8 images in memory (the embedded dataset is 50 MB). Train order is a pure function of (seed, step): the
example stream is epoch after epoch of a stateless shuffle seeded by (seed, epoch), cut into batches; the caption
of each example is drawn with a stateless RNG seeded by (seed, step, process). So `start_step=k` jumps straight to
(epoch, offset) = divmod(k * b, n) and only skips indices, never images: it yields exactly the batches an iterator
started at 0 yields from its k-th on. Gather, resize and normalise run in tf.data; tokenization runs on the host
with the Rust tokenizer, one call per batch. Eval batches are padded to the full batch size and every process
runs the same number of batches, ceil(ceil(n / process_count) / b).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # must precede the TF import to quiet its C++ logging

import ml_collections
from ml_collections import config_dict
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mmjax.data import easy_vqa_captions, streaming
from mmjax.data.tokenizer import Tokenizer

# TF is only the input pipeline here: keep it off the accelerators (JAX owns them) and quiet.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices (someone used it first); nothing to hide then
    pass
tf.get_logger().setLevel("ERROR")

_BUILDERS = {"easy_vqa_captions": easy_vqa_captions.EasyVqaCaptions}


def default_data_config() -> ml_collections.ConfigDict:
    """The data config with its defaults (the embedded dataset, 64x64 images, 24 tokens)."""
    return ml_collections.ConfigDict(dict(
        name="easy_vqa_captions",
        data_dir=config_dict.placeholder(str),  # None = the TFDS default (~/tensorflow_datasets)
        image_size=64,          # images are resized (bilinear, antialiased) when this differs from the stored size
        mean=(0.5, 0.5, 0.5),   # in [0, 1] pixel units
        std=(0.5, 0.5, 0.5),
        max_len=24,             # text length incl. [CLS] and [SEP]
        tokenizer=config_dict.placeholder(str),  # path to tokenizer.json / vocab.txt; None = the one saved with the dataset
        shuffle_buffer=4000,    # unused while the split is held in memory (it is shuffled whole per epoch)
        prefetch=2,
        train_split="train",
        eval_split="test",
        # Region inputs for region-based models (UNITER, ViLBERT). The embedded dataset makes them from pixels
        # (crop, grid; see `region_inputs`); real sources carry precomputed features (max_regions, feature_dim,
        # num_classes; see mmjax/data/image_text.py for the format).
        regions=dict(enabled=False, crop=8, grid=2, max_regions=36, feature_dim=config_dict.placeholder(int),
                     num_classes=config_dict.placeholder(int)),
        # Real datasets (see mmjax/data/streaming.py): {key: streaming.source_config(...)}; empty = the embedded
        # dataset `name`. Several sources are mixed by their weights.
        sources=ml_collections.ConfigDict(),
        eval_source=config_dict.placeholder(str),  # the source evaluated on (default: the first)
        normalization=config_dict.placeholder(str),  # a preprocess.NORMALIZATION preset; overrides mean / std
        answers=False,          # VQA sources: also deliver the answer soft scores as `answers` [V]
    ))


def uses_sources(data_config: ml_collections.ConfigDict) -> bool:
    """Whether the config reads real sources (data.sources) rather than the embedded dataset."""
    return bool(data_config.get("sources"))


NUM_REGION_CLASSES = len(easy_vqa_captions.CLASS_NAMES) + 1  # the 24 object classes + background (last)


def num_regions(data_config: ml_collections.ConfigDict) -> int:
    """Regions per image: max_regions for real sources; embedded: the object box, the whole image and a grid."""
    if uses_sources(data_config):
        return int(data_config.regions.max_regions)
    return 2 + data_config.regions.grid ** 2


def region_feat_dim(data_config: ml_collections.ConfigDict) -> int:
    """Length of one region feature: regions.feature_dim for real sources; embedded: crop x crop x 3 pixels."""
    if uses_sources(data_config):
        if not data_config.regions.get("feature_dim"):
            raise ValueError("data.regions.feature_dim must be set for precomputed region features")
        return int(data_config.regions.feature_dim)
    return data_config.regions.crop ** 2 * 3


def num_region_classes(data_config: ml_collections.ConfigDict) -> int:
    """Classes of the regions' soft targets: regions.num_classes for real sources; embedded: 24 + background."""
    if uses_sources(data_config):
        if not data_config.regions.get("num_classes"):
            raise ValueError("data.regions.num_classes must be set (the width of the dataset's region_class_probs)")
        return int(data_config.regions.num_classes)
    return NUM_REGION_CLASSES


def region_inputs(image: tf.Tensor, bbox: tf.Tensor, label: tf.Tensor,
                  data_config: ml_collections.ConfigDict) -> dict[str, tf.Tensor]:
    """Region features, boxes and soft class targets for a batch of normalised images [b, H, W, 3].

    What the "detector" is, exactly: there is none. The regions are the shape's tight box (measured from its
    pixels when the dataset was built), the whole image, and the cells of a grid x grid tiling; a region's feature
    is the box's pixels bilinearly resampled to crop x crop x 3 (tf.image.crop_and_resize of the normalised
    image), flattened -- honest image content, no learned features. The soft class target of a region is what a
    detector's class distribution would approximate: the fraction of the box covered by the object's box goes to
    the object's class (label), the rest to background (class 24). Returns region_feats float32 [b, R, F],
    region_boxes float32 [b, R, 4] (ymin, xmin, ymax, xmax in [0, 1]), region_mask int32 [b, R] (all real) and
    region_targets float32 [b, R, 25].
    """
    crop, grid = data_config.regions.crop, data_config.regions.grid
    b = tf.shape(image)[0]
    cells = [[i / grid, j / grid, (i + 1) / grid, (j + 1) / grid] for i in range(grid) for j in range(grid)]
    fixed = tf.constant([[0.0, 0.0, 1.0, 1.0]] + cells, tf.float32)  # [R - 1, 4]
    boxes = tf.concat([tf.cast(bbox, tf.float32)[:, None, :],
                       tf.broadcast_to(fixed[None], [b, fixed.shape[0], 4])], axis=1)  # [b, R, 4]
    r = boxes.shape[1]
    flat = tf.reshape(boxes, [-1, 4])
    crops = tf.image.crop_and_resize(image, flat, tf.repeat(tf.range(b), r), [crop, crop])
    feats = tf.reshape(crops, [b, r, crop * crop * 3])

    obj = boxes[:, :1, :]
    inter_h = tf.nn.relu(tf.minimum(boxes[..., 2], obj[..., 2]) - tf.maximum(boxes[..., 0], obj[..., 0]))
    inter_w = tf.nn.relu(tf.minimum(boxes[..., 3], obj[..., 3]) - tf.maximum(boxes[..., 1], obj[..., 1]))
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    covered = tf.clip_by_value(inter_h * inter_w / tf.maximum(area, 1e-6), 0.0, 1.0)  # [b, R]
    onehot = tf.one_hot(label, NUM_REGION_CLASSES, dtype=tf.float32)[:, None, :]
    background = tf.one_hot(NUM_REGION_CLASSES - 1, NUM_REGION_CLASSES, dtype=tf.float32)[None, None, :]
    targets = covered[..., None] * onehot + (1.0 - covered[..., None]) * background
    return {"region_feats": feats, "region_boxes": boxes, "region_mask": tf.ones([b, r], tf.int32),
            "region_targets": targets}


def batch_shapes(data_config: ml_collections.ConfigDict, batch_size: int = 1) -> dict:
    """jax.ShapeDtypeStructs of the model keys of a batch (image, text_ids, text_mask, and the region inputs
    region_feats / region_boxes / region_mask when regions are enabled), for abstract init."""
    import jax  # pylint: disable=import-outside-toplevel

    size, length = data_config.image_size, data_config.max_len
    shapes = {
        "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), np.float32),
        "text_ids": jax.ShapeDtypeStruct((batch_size, length), np.int32),
        "text_mask": jax.ShapeDtypeStruct((batch_size, length), np.int32),
    }
    if data_config.regions.enabled:
        r = num_regions(data_config)
        shapes["region_feats"] = jax.ShapeDtypeStruct((batch_size, r, region_feat_dim(data_config)), np.float32)
        shapes["region_boxes"] = jax.ShapeDtypeStruct((batch_size, r, 4), np.float32)
        shapes["region_mask"] = jax.ShapeDtypeStruct((batch_size, r), np.int32)
    return shapes


def load_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The dataset's TFDS builder, prepared: the embedded dataset is built on first use (offline, ~15 s)."""
    if data_config.name not in _BUILDERS:
        # A catalogue name would go to tfds.builder(name, data_dir=...), which may try the network (and hang for
        # minutes here); until real datasets are wired in, refuse clearly instead.
        raise ValueError(f"unknown dataset {data_config.name!r}; known: {', '.join(sorted(_BUILDERS))}")
    builder = _BUILDERS[data_config.name](data_dir=data_config.data_dir)
    if not builder.is_prepared():
        logging.info("building %s into %s", data_config.name, builder.data_dir)
        builder.download_and_prepare()
    return builder


def load_tokenizer(data_config: ml_collections.ConfigDict) -> Tokenizer:
    """`data_config.tokenizer` if set, else the default tokenizer saved with the dataset."""
    if data_config.tokenizer:
        return Tokenizer.from_path(data_config.tokenizer)
    if uses_sources(data_config):
        path = streaming.source_tokenizer_path(data_config)
        if path is None:
            raise ValueError("no tokenizer: set data.tokenizer (a tokenizer.json / vocab.txt); datasets built by "
                             "`python -m mmjax.data.build` carry one")
        return Tokenizer.from_path(path)
    return Tokenizer.from_path(easy_vqa_captions.tokenizer_path(load_builder(data_config).data_dir))


def class_prompts(tokenizer: Tokenizer, max_len: int) -> dict:
    """Zero-shot prompts for every (class, template) of the embedded dataset: text_ids / text_mask int32
    [24, T, L] + names."""
    prompts = easy_vqa_captions.render_prompts()
    n_cls, n_tpl = len(prompts), len(prompts[0])
    ids, mask = tokenizer.encode([p for row in prompts for p in row], max_len)
    return {
        "text_ids": ids.reshape(n_cls, n_tpl, max_len),
        "text_mask": mask.reshape(n_cls, n_tpl, max_len),
        "class_names": list(easy_vqa_captions.CLASS_NAMES),
        "templates": list(easy_vqa_captions.ZERO_SHOT_TEMPLATES),
    }


# ----------------------------------------------------------------------------------------------- in memory


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


@functools.lru_cache(maxsize=8)
def _load_shard(name: str, data_dir: str | None, split: str, process_index: int, process_count: int,
                image_size: int) -> dict[str, np.ndarray]:
    """This process's slice of `split`, decoded and resized once, as numpy arrays (cached per process).

    Returns image uint8 [n, S, S, 3], label / image_id int32 [n], captions bytes [n, C] ("" padded),
    num_captions int32 [n] and bbox float32 [n, 4] (the shape's normalised ymin, xmin, ymax, xmax).
    """
    config = ml_collections.ConfigDict(dict(name=name, data_dir=data_dir))
    builder = load_builder(config)
    shard = tfds.even_splits(split, n=process_count)[process_index]
    ds = builder.as_dataset(split=shard, shuffle_files=False)

    def select(ex):
        image = ex["image"]
        if image.shape[0] != image_size or image.shape[1] != image_size:
            image = tf.image.resize(image, (image_size, image_size), antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return {"image": image, "label": tf.cast(ex["label"], tf.int32),
                "image_id": tf.cast(ex["image_id"], tf.int32), "captions": ex["captions"],
                "bbox": tf.cast(ex["bbox"], tf.float32),
                "num_captions": tf.shape(ex["captions"])[0]}

    ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE).padded_batch(1024)
    parts = list(ds.as_numpy_iterator())
    if not parts:
        raise ValueError(f"split {split!r} shard {process_index}/{process_count} of {name} is empty")
    width = max(p["captions"].shape[1] for p in parts)
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label", "image_id", "num_captions", "bbox")}
    out["captions"] = np.concatenate(
        [np.pad(p["captions"], ((0, 0), (0, width - p["captions"].shape[1])), constant_values=b"")
         for p in parts])
    if out["num_captions"].min() < 1:
        raise ValueError(f"{name} {split}: every example needs at least one caption")
    return out


def _normalise(image: tf.Tensor, data_config: ml_collections.ConfigDict) -> tf.Tensor:
    """uint8 -> float32 (x / 255 - mean) / std."""
    mean = tf.constant(data_config.mean, tf.float32)
    std = tf.constant(data_config.std, tf.float32)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def _to_numpy_batches(ds: tf.data.Dataset, tokenizer: Tokenizer, max_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Pulls tf.data batches and tokenizes their caption strings on the host.

    `caption` becomes text_ids / text_mask; any other `caption_NAME` becomes NAME_text_ids / NAME_text_mask.
    """
    for batch in ds.as_numpy_iterator():
        for key in [k for k in batch if k == "caption" or k.startswith("caption_")]:
            captions = batch.pop(key)
            prefix = "" if key == "caption" else key[len("caption_"):] + "_"
            ids, mask = tokenizer.encode([c.decode("utf-8") for c in captions], max_len)
            batch[prefix + "text_ids"], batch[prefix + "text_mask"] = ids, mask
        yield batch


# ----------------------------------------------------------------------------------------------- iterators


def _hard_negative_table(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For every caption of the shard, the caption with its colour / its shape changed (bytes [n, C])."""
    n, c = data["captions"].shape
    table = {"caption_other_color": np.full((n, c), b"", dtype=object),
             "caption_other_shape": np.full((n, c), b"", dtype=object)}
    for j in range(c):
        real = data["num_captions"] > j
        captions = [x.decode("utf-8") for x in data["captions"][real, j]]
        other_color, other_shape = easy_vqa_captions.hard_negative_captions(
            captions, data["label"][real], data["image_id"][real])
        table["caption_other_color"][real, j] = [x.encode("utf-8") for x in other_color]
        table["caption_other_shape"][real, j] = [x.encode("utf-8") for x in other_shape]
    return {k: v.astype(bytes) for k, v in table.items()}


def train_iterator(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, global_batch_size: int,
                   seed: int, start_step: int = 0, process_index: int | None = None,
                   process_count: int | None = None, hard_negatives: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Infinite shuffled train batches for this process; batch k is a pure function of (seed, k).

    With `hard_negatives`, batches also carry the drawn caption with one attribute changed (other_color_text_ids /
    other_shape_text_ids and masks; see eval_batches), for image-text matching negatives.
    """
    process_index, process_count, b = _process_layout(global_batch_size, process_index, process_count)
    if uses_sources(data_config):
        if hard_negatives:
            raise ValueError("hard (one-attribute) negative captions exist only for the embedded dataset; "
                             "with data.sources use in-batch negatives")
        ds = streaming.train_dataset(data_config, batch_size=b, seed=seed, start_step=start_step,
                                     process_index=process_index, process_count=process_count)
        return _to_numpy_batches(ds, tokenizer, data_config.max_len)
    data = _load_shard(data_config.name, data_config.data_dir, data_config.train_split, process_index,
                       process_count, data_config.image_size)
    n = len(data["label"])
    images, captions = tf.constant(data["image"]), tf.constant(data["captions"])
    num_captions, labels = tf.constant(data["num_captions"]), tf.constant(data["label"])
    image_ids, bboxes = tf.constant(data["image_id"]), tf.constant(data["bbox"])

    # The stream: epoch after epoch of a permutation seeded by (seed, epoch); batch k covers stream positions
    # [k * b, (k + 1) * b), so a resume starts at epoch and offset divmod(k * b, n) and skips only int indices.
    start_epoch, offset = divmod(start_step * b, n)

    def epoch_indices(epoch):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int32), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(perm)

    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_indices)
    ds = ds.skip(offset).batch(b, drop_remainder=True).enumerate(start=start_step)
    extra = {k: tf.constant(v) for k, v in _hard_negative_table(data).items()} if hard_negatives else {}

    def make_batch(step, idx):
        # Caption choice seeded by (seed, step, process): deterministic, and distinct across processes.
        draw = tf.random.stateless_uniform(
            [b], seed=tf.stack([tf.constant(seed, tf.int64), step * process_count + process_index]),
            minval=0, maxval=2**30, dtype=tf.int32)
        choice = draw % tf.gather(num_captions, idx)
        batch = {
            "image": _normalise(tf.gather(images, idx), data_config),
            "caption": tf.gather(tf.gather(captions, idx), choice, batch_dims=1),
            "label": tf.gather(labels, idx),
            "image_id": tf.gather(image_ids, idx),
        }
        batch.update({k: tf.gather(tf.gather(v, idx), choice, batch_dims=1) for k, v in extra.items()})
        if data_config.regions.enabled:
            batch.update(region_inputs(batch["image"], tf.gather(bboxes, idx), batch["label"], data_config))
        return batch

    ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(data_config.prefetch)
    return _to_numpy_batches(ds, tokenizer, data_config.max_len)


def eval_batches(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, global_batch_size: int,
                 split: str | None = None, process_index: int | None = None, process_count: int | None = None,
                 hard_negatives: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over `split` (default data_config.eval_split) with caption 0; last batch padded (mask).

    With `hard_negatives`, batches also carry caption 0 with exactly one attribute changed (see
    easy_vqa_captions.hard_negative_captions): other_color_text_ids / _mask (same shape, another colour) and
    other_shape_text_ids / _mask (same colour, another shape), for image-text matching that tests grounding.
    """
    process_index, process_count, b = _process_layout(global_batch_size, process_index, process_count)
    if uses_sources(data_config):
        if hard_negatives:
            raise ValueError("hard (one-attribute) negative captions exist only for the embedded dataset")
        ds = streaming.eval_dataset(data_config, batch_size=b, split=split, process_index=process_index,
                                    process_count=process_count)
        return _to_numpy_batches(ds, tokenizer, data_config.max_len)
    split = split or data_config.eval_split
    data = _load_shard(data_config.name, data_config.data_dir, split, process_index, process_count,
                       data_config.image_size)
    n = len(data["label"])
    total = load_builder(data_config).info.splits[split].num_examples
    # The same number of batches on every process (even_splits gives shards of ceil or floor size).
    num_batches = math.ceil(math.ceil(total / process_count) / b)
    pad = num_batches * b - n
    idx = np.concatenate([np.arange(n), np.zeros(pad, np.int64)]).astype(np.int32)
    real = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    images = tf.constant(data["image"])

    extra = {}
    if hard_negatives:
        other_color, other_shape = easy_vqa_captions.hard_negative_captions(
            [c.decode("utf-8") for c in data["captions"][:, 0]], data["label"], data["image_id"])
        extra = {"caption_other_color": np.asarray(other_color, dtype=object).astype(bytes),
                 "caption_other_shape": np.asarray(other_shape, dtype=object).astype(bytes)}

    def make_batch(i, m):
        batch = {
            "image": _normalise(tf.gather(images, i), data_config),
            "caption": tf.gather(data["captions"][:, 0], i),
            "label": tf.gather(data["label"], i),
            "image_id": tf.gather(data["image_id"], i),
            "mask": m,
        }
        batch.update({k: tf.gather(v, i) for k, v in extra.items()})
        if data_config.regions.enabled:
            batch.update(region_inputs(batch["image"], tf.gather(data["bbox"], i), batch["label"], data_config))
        return batch

    ds = tf.data.Dataset.from_tensor_slices((idx, real)).batch(b)
    ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(data_config.prefetch)
    return _to_numpy_batches(ds, tokenizer, data_config.max_len)
