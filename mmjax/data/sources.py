"""Data sources: a prepared TFDS dataset, how it is read, what it offers, and what one example becomes.

A source is named in `data.sources` (see `source_config`):

    c.data.sources.coco = source_config(name="coco_captions/2014", data_dir="~/tensorflow_datasets",
                                        text_key="captions/text", id_key="image/id")
    c.data.sources.mine = source_config(dir="my_data/tfds")          # `python -m mmjax.data.build ...` output
    c.data.sources.vqa = source_config(dir="vqa/tfds", kind="vqa", weight=0.5)

Datasets are read from their TFRecord or ArrayRecord shards, never downloaded (a local builder such as the embedded
`easy_vqa_captions` is built on first use with `prepare=True`). Each process reads its own slice of a split
(`tfds.even_splits`: disjoint, together the whole split, sizes within one example). Three readers, one result:

  stream      TFRecord shards: per epoch the file ranges in an order permuted by (seed, source, epoch), read
              interleaved, then a shuffle buffer seeded the same way; a resume jumps to its epoch and skips the
              serialized records before it (at most one epoch of reading, no decoding).
  random      ArrayRecord shards: each epoch a full permutation seeded by (seed, source, epoch), read by random
              access; a resume reads nothing it skips.
  in_memory   (`in_memory=True`, for small datasets) the slice is decoded once and held in memory (images as
              uint8, already resized when the image preprocessing is deterministic); epochs are permutations as
              above and batches are gathers.

What a source offers beyond images and texts is declared per source, so any dataset can offer it:

  label_key           a ClassLabel feature: batches carry `label`, its names are the zero-shot classes
  prompts             zero-shot prompt templates ("a photo of a {}.")
  negatives           ClassLabel features whose value words, swapped in the caption, make one-attribute hard
                      negatives: `caption_other_NAME` (e.g. "a red circle" -> "a blue circle")
  regions_from_boxes  region inputs made from the pixels: a box feature's crop, the whole image and a grid; soft
                      class targets from label_key (the embedded dataset's regions; no detector needed)
  (precomputed regions are the features region_features / region_boxes / region_class_probs of a build)

Per-example keys, before tokenization: image float32 [S, S, 3] normalised, caption string, image_id int32, source
int32 (index into `data.sources`); with label_key: label; with negatives: caption_other_NAME strings; with
`data.regions.enabled`: region_feats [R, D], region_boxes [R, 4], region_mask [R] (1 = real) and region_targets
[R, C] where the source has classes; with `data.answers`: answers float32 [V] (VQA soft scores) and question_id.

How one example is made: parse (deserialize, decode, clean the texts) and the image's geometric preprocessing run
per example (with a stateless seed from (seed, source, process, position)); everything else runs on chunks of
CHUNK examples at once (`_Example.finish`: normalisation, hard negatives, regions from boxes), the same function
for every reader. The in-memory reader draws its caption choices per chunk, chunks aligned to stream positions,
so a resume replays them exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
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

from mmjax import configlib
from mmjax.data import preprocess

# What each kind of source yields, by modality; a new modality is a new kind here and a new parse branch.
KINDS: dict[str, tuple[str, ...]] = {
    "image_text": ("image", "text"), "vqa": ("image", "text", "answers"),
    "image_label": ("image", "text"),             # a labelled image's text: its class name
    "audio_text": ("audio", "text"),              # a clip and its transcript / caption (audio + image: below)
    "audio_image_text": ("audio", "image", "text"),  # spoken captions of images (SpokenCOCO, spoken_easy_vqa)
    "audio_label": ("audio", "text"),             # a labelled clip (speech_commands, spoken_digit): its class name
}
# Kinds whose texts are the text_key feature (the others make their text from a label or a question).
CAPTION_KINDS = ("image_text", "audio_text", "audio_image_text")
VQA_TEXT = ("question", "question_answer")
CHUNK = 64  # examples finished at once (vectorised), and the in-memory reader's unit of random draws


def source_config(**overrides) -> ml_collections.ConfigDict:
    """One source of `data.sources` with its defaults; keyword arguments override fields."""
    c = ml_collections.ConfigDict(dict(
        kind="image_text",   # a KINDS name: image_text, vqa (image + question + answers), image_label, audio_text,
                             # audio_image_text, audio_label
        name=config_dict.placeholder(str),      # a TFDS catalogue name, e.g. "coco_captions/2014"
        dir=config_dict.placeholder(str),       # or a prepared dataset directory (mmjax.data.build prints it)
        data_dir=config_dict.placeholder(str),  # for `name`: where it is prepared (None = ~/tensorflow_datasets)
        manual_dir=config_dict.placeholder(str),  # for `name` with `prepare`: manually downloaded files
        prepare=False,       # build a catalogue dataset that is not prepared yet (may download: never default)
        weight=1.0,          # share of the mixture (weights are normalised over the sources)
        train_split="train",
        eval_split="validation",
        image_key="image",   # feature paths, "/" for nesting (coco_captions: text_key="captions/text")
        audio_key="audio",   # audio kinds: an Audio feature (int16 or float samples) at its dataset's sample rate
        text_key="captions",
        id_key="image_id",   # None or missing: the position within the split
        label_key=config_dict.placeholder(str),  # a ClassLabel feature -> `label`; its names are the classes
        class_names=(),      # the classes' names in prompts, if not the ClassLabel's (e.g. ImageNet's synset ids)
        prompt_set=config_dict.placeholder(str),  # zero-shot templates by name (PROMPT_SETS) ...
        prompts=(),          # ... and / or listed: "{}" is the class name
        negatives=(),        # ClassLabel features whose words are swapped for hard-negative captions
        regions_from_boxes=dict(box_key=config_dict.placeholder(str), crop=8, grid=2),
        in_memory=False,     # decode the slice once and keep it in memory (small datasets)
        shuffle_buffer=10_000,
        text=dict(clean=True, lowercase=False, vqa="question"),  # vqa: "question" | "question_answer"
        image=preprocess.default_image_config(),
    ))
    return configlib.override(c, overrides, "a data source")


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
        raise ValueError(f"data.sources.{key}.kind must be one of {tuple(KINDS)}; got {cfg.kind!r}")
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
        raise ValueError(f"data.sources.{key}: {builder.name} is stored as {_file_format(builder)}; the reader "
                         f"reads TFRecord and ArrayRecord shards")
    features = builder.info.features
    # id_key may be absent (examples are then numbered by position); the inputs and the text must be there.
    needed = [f"{m}_key" for m in ("image", "audio") if m in KINDS[cfg.kind]]
    needed += ["text_key"] if cfg.kind in CAPTION_KINDS else []
    for what in needed:
        if _feature(features, cfg[what]) is None:
            raise ValueError(f"data.sources.{key}.{what}={cfg[what]!r} is not a feature of {builder.name}; "
                             f"features: {sorted(features.keys())}")
    if "audio" in KINDS[cfg.kind]:
        audio = _feature(features, cfg.audio_key)
        if not isinstance(audio, tfds.features.Audio) or len(audio.shape) != 1:
            raise ValueError(f"data.sources.{key}.audio_key={cfg.audio_key!r} is not a mono Audio feature of "
                             f"{builder.name} (got {type(audio).__name__} {getattr(audio, 'shape', '')})")
    if cfg.kind.endswith("_label") and not cfg.label_key:
        raise ValueError(f"data.sources.{key}: kind={cfg.kind!r} needs label_key (the ClassLabel feature)")
    if cfg.kind == "vqa":
        missing = [k for k in ("question", "answer_ids", "answer_scores") if k not in features]
        if missing:
            raise ValueError(f"data.sources.{key}: kind='vqa' needs features {missing} (a dataset built by "
                             f"`python -m mmjax.data.build vqa`)")
    for what in [("label_key", cfg.label_key)] + [("negatives", n) for n in cfg.negatives]:
        if what[1] is not None and not isinstance(_feature(features, what[1]), tfds.features.ClassLabel):
            raise ValueError(f"data.sources.{key}.{what[0]}: {what[1]!r} is not a ClassLabel feature of "
                             f"{builder.name}; features: {sorted(features.keys())}")
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


def _slice_records(builder, split: str, process_index: int, process_count: int) -> tuple[tf.data.Dataset, int]:
    """This process's slice of `split` as serialized records in file order, and its length."""
    if _file_format(builder) == "array_record":
        reader = _array_record_reader(builder, split, process_index, process_count)
        return _read_indices(reader, tf.data.Dataset.range(len(reader))), len(reader)
    files, skips, takes = read_plan(builder, split, process_index, process_count)
    ranges = tf.data.Dataset.from_tensor_slices((files, tf.constant(skips, tf.int64), tf.constant(takes, tf.int64)))
    return ranges.flat_map(lambda f, k, t: tf.data.TFRecordDataset(f).skip(k).take(t)), sum(takes)


def answer_vocab(builder: tfds.core.DatasetBuilder) -> list[str]:
    """The VQA answer vocabulary saved with a dataset built by `mmjax.data.build vqa`."""
    path = os.path.join(os.fspath(builder.data_dir), "answer_vocab.json")
    if not os.path.exists(path):
        raise ValueError(f"{builder.name}: no answer_vocab.json in {builder.data_dir}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def source_tokenizer_path(key: str, cfg: ml_collections.ConfigDict) -> str | None:
    """The tokenizer saved with a source's dataset (`mmjax.data.build` and the embedded builder write one)."""
    _check_name_or_dir(key, cfg)
    path = _find_prepared(cfg.dir, key) if cfg.dir else os.fspath(open_source(key, cfg).data_dir)
    path = os.path.join(path, "tokenizer.json")
    return path if os.path.exists(path) else None


# ----------------------------------------------------------------------------------------------- what it offers


@dataclasses.dataclass(frozen=True)
class SourceMeta:
    """What one source offers the tasks and evaluators, read from its dataset and its config."""

    key: str
    kind: str
    splits: dict[str, int]                         # split -> number of examples
    class_names: tuple[str, ...] | None = None      # label_key's names (zero-shot classes)
    prompts: tuple[str, ...] = ()                   # zero-shot templates with "{}"
    attributes: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # negatives: name -> words
    num_regions: int | None = None                  # regions per example (with data.regions.enabled)
    region_feature_dim: int | None = None
    region_classes: int | None = None               # width of region_targets (None: no targets)
    answer_vocab: tuple[str, ...] | None = None     # VQA answers, index = position in `answers`
    texts_per_example: int | None = None            # captions per image when every example has the same number
    sample_rate: int | None = None                  # audio kinds: the dataset's sample rate (Hz)


# Named prompt-template sets for zero-shot classification (a source's `prompts` may name one, or list its own).
PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of a {}.",),
    # The 7-template ensemble CLIP's authors recommend for ImageNet (openai/CLIP's prompt engineering notebook).
    "clip_7": ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
               "a {} in a video game.", "art of the {}.", "a photo of the small {}."),
}


def prompt_templates(prompt_set: str | None, prompts, where: str) -> tuple[str, ...]:
    """A source's zero-shot templates: the named PROMPT_SETS entry, then the listed ones (one "{}" each)."""
    if prompt_set and prompt_set not in PROMPT_SETS:
        raise ValueError(f"{where}.prompt_set: unknown set {prompt_set!r}; known: {sorted(PROMPT_SETS)}")
    templates = (PROMPT_SETS[prompt_set] if prompt_set else ()) + tuple(prompts)
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"{where}.prompts: {template!r} must hold exactly one {{}}")
    return templates


def describe(key: str, cfg: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict) -> SourceMeta:
    """The SourceMeta of source `key` (opens, and on first use prepares, its dataset)."""
    builder = open_source(key, cfg)
    features = builder.info.features
    meta = dict(key=key, kind=cfg.kind, splits={k: int(v.num_examples) for k, v in builder.info.splits.items()})
    if cfg.label_key:
        names = tuple(_feature(features, cfg.label_key).names)
        if cfg.class_names:
            if len(cfg.class_names) != len(names):
                raise ValueError(f"data.sources.{key}.class_names has {len(cfg.class_names)} names; "
                                 f"{cfg.label_key} has {len(names)} classes")
            names = tuple(cfg.class_names)
        meta["class_names"] = names
    meta["prompts"] = prompt_templates(cfg.get("prompt_set"), cfg.prompts, f"data.sources.{key}")
    if meta["prompts"] and not cfg.label_key:
        raise ValueError(f"data.sources.{key}.prompts need label_key (the classes the prompts name)")
    meta["attributes"] = {n: tuple(_feature(features, n).names) for n in cfg.negatives}
    for name, words in meta["attributes"].items():
        if any(len(w.split()) != 1 for w in words):
            raise ValueError(f"data.sources.{key}.negatives: the words of {name!r} must be single words; got {words}")
    if data_config.regions.enabled:
        meta.update(_region_meta(key, cfg, builder, data_config))
    if cfg.kind == "vqa":
        meta["answer_vocab"] = tuple(answer_vocab(builder))
    text = _feature(features, cfg.text_key) if cfg.kind in CAPTION_KINDS else None
    shape = getattr(text, "shape", None)
    if shape is not None and len(shape) == 1 and shape[0]:
        meta["texts_per_example"] = int(shape[0])
    elif cfg.kind not in CAPTION_KINDS or (shape is not None and len(shape) == 0):
        meta["texts_per_example"] = 1
    if "audio" in KINDS[cfg.kind]:
        meta["sample_rate"] = int(_feature(features, cfg.audio_key).sample_rate)
    return SourceMeta(**meta)


def _region_meta(key: str, cfg, builder, data_config) -> dict:
    """Region counts and widths: precomputed features, or crops of the pixels (regions_from_boxes)."""
    features = builder.info.features
    boxes = cfg.regions_from_boxes
    if boxes.box_key:
        if not isinstance(_feature(features, boxes.box_key), tfds.features.BBoxFeature):
            raise ValueError(f"data.sources.{key}.regions_from_boxes.box_key={boxes.box_key!r} is not a BBoxFeature "
                             f"of {builder.name}")
        if not cfg.label_key:
            raise ValueError(f"data.sources.{key}.regions_from_boxes needs label_key (the boxed object's class)")
        classes = len(_feature(features, cfg.label_key).names) + 1  # + background, last
        return dict(num_regions=2 + boxes.grid ** 2, region_feature_dim=boxes.crop ** 2 * 3, region_classes=classes)
    if "region_features" not in features:
        raise ValueError(f"data.regions.enabled: data.sources.{key} ({builder.name}) has no region_features and "
                         f"no regions_from_boxes; build it with `python -m mmjax.data.build image_text "
                         f"--regions=DIR`")
    classes = features["region_class_probs"].shape[-1] if "region_class_probs" in features else None
    return dict(num_regions=int(data_config.regions.max_regions),
                region_feature_dim=int(features["region_features"].shape[-1]), region_classes=classes)


# ----------------------------------------------------------------------------------------------- one example


def _seed(*parts) -> tf.Tensor:
    """A stateless-op seed [2] from integer parts (python ints or int64 tensors)."""
    a = tf.constant(0, tf.int64)
    for p in parts:  # a small polynomial hash keeps the parts apart; stateless ops mix the bits themselves
        a = a * 1_000_003 + tf.cast(p, tf.int64)
    return tf.stack([a // 2**31, a % 2**31])


class _Example:
    """How source `key` turns records into examples: parse (per record), pick (per example or per chunk) and
    finish (per chunk). `meta` is the source's SourceMeta."""

    def __init__(self, key: str, index: int, builder, cfg, data_config, meta: SourceMeta, *, train: bool,
                 seed: int, process_index: int):
        self.key, self.index, self.cfg, self.meta = key, index, cfg, meta
        self.train, self.seed, self.process_index = train, seed, process_index
        self.features = builder.info.features
        self.has_image, self.has_audio = "image" in KINDS[cfg.kind], "audio" in KINDS[cfg.kind]
        image_feature = _feature(self.features, cfg.image_key) if self.has_image else None
        self.decoders = None
        if isinstance(image_feature, tfds.features.Image) and "/" not in cfg.image_key:
            self.decoders = {cfg.image_key: tfds.decode.SkipDecoding()}  # decoded after the resume skip
        self.image_size = int(data_config.image_size)
        if data_config.get("normalization"):
            self.mean, self.std = preprocess.mean_std(data_config.normalization)
        else:
            self.mean, self.std = preprocess.mean_std((tuple(data_config.mean), tuple(data_config.std)))
        self.canvas = data_config.get("image_canvas")
        if self.canvas:  # ViLT's fine-tuning inputs: aspect kept, padded, with a pixel mask
            pad = preprocess.resize_pad_fn(cfg.image, train=train, image_size=self.image_size, canvas=self.canvas,
                                           size_divisor=int(data_config.get("size_divisor") or 32))
            self.image_fn = lambda image, seed: dict(zip(("image", "image_mask"), pad(image, seed)))
        else:
            plain = preprocess.image_preprocess_fn(cfg.image, train=train, image_size=self.image_size)
            self.image_fn = lambda image, seed: {"image": plain(image, seed)}
        self.deterministic_image = preprocess.is_deterministic(cfg.image, train=train) or not self.has_image
        if self.has_audio:
            self.sample_rate, self.max_samples = int(data_config.audio.sample_rate), audio_samples(data_config)
            if meta.sample_rate != self.sample_rate:
                logging.warning("data.sources.%s is at %d Hz; resampling it to data.audio.sample_rate=%d Hz while "
                                "reading (slow: rebuild the dataset at %d Hz for long runs)", key,
                                meta.sample_rate, self.sample_rate, self.sample_rate)
        self.has_id = bool(cfg.id_key) and _feature(self.features, cfg.id_key) is not None
        self.regions = bool(data_config.regions.enabled)
        self.from_boxes = self.regions and bool(cfg.regions_from_boxes.box_key)
        self.max_regions = int(data_config.regions.max_regions)
        self.tags = self.regions and bool(data_config.regions.get("tags"))
        if self.tags and not self.from_boxes:
            # Precomputed regions carry class probabilities but not the class names a tag needs.
            raise ValueError(f"data.regions.tags: data.sources.{key} has precomputed regions without class names; "
                             "tags are made for regions_from_boxes sources (their label_key names the classes)")
        self.answers = bool(data_config.get("answers"))
        if cfg.kind == "vqa" and cfg.text.vqa not in VQA_TEXT:
            raise ValueError(f"data.sources.{key}.text.vqa must be one of {VQA_TEXT}; got {cfg.text.vqa!r}")
        if self.answers and cfg.kind != "vqa":
            raise ValueError(f"data.answers needs VQA sources; data.sources.{key} is kind {cfg.kind!r}")

    # -- parse: one serialized record -> raw fields (the image decoded, not yet preprocessed)

    def parse(self, record: tf.Tensor, with_image: bool = True) -> dict[str, tf.Tensor]:
        """Deserializes one record: image uint8 [H, W, 3] (unless not `with_image`), texts string [T], image_id (-1
        if none) and the fields the source offers (label, attributes, box, precomputed regions, answers)."""
        cfg = self.cfg
        ex = self.features.deserialize_example(record, decoders=self.decoders)
        raw = {"image_id": tf.cast(_get(ex, cfg.id_key), tf.int32) if self.has_id else tf.constant(-1, tf.int32)}
        if self.has_audio:
            raw.update(self.audio(_get(ex, cfg.audio_key)))
        if with_image and self.has_image:
            image = _get(ex, cfg.image_key)
            raw["image"] = preprocess.decode_image(image) if image.dtype == tf.string else image
        if cfg.kind == "vqa":
            text = ex["question"]
            if cfg.text.vqa == "question_answer":
                top = tf.gather(ex["answer_ids"], tf.argmax(ex["answer_scores"]))
                answer = tf.cond(tf.size(ex["answer_ids"]) > 0,
                                 lambda: tf.gather(tf.constant(self.meta.answer_vocab), top), lambda: tf.constant(""))
                text = tf.strings.join([text, answer], separator=" ")
            raw["texts"] = tf.reshape(text, [1])
            if self.answers:  # VQA training / evaluation: the question's id (the evaluator's key to its answers)
                raw["question_id"] = tf.cast(ex["question_id"], tf.int32)
                raw["answers"] = tf.scatter_nd(tf.cast(ex["answer_ids"], tf.int32)[:, None],
                                               tf.cast(ex["answer_scores"], tf.float32), [len(self.meta.answer_vocab)])
        elif cfg.kind.endswith("_label"):
            raw["texts"] = tf.reshape(tf.gather(tf.constant(self.meta.class_names), _get(ex, cfg.label_key)), [1])
        else:
            texts = _get(ex, cfg.text_key)
            if isinstance(texts, tf.RaggedTensor):  # nested sequences (ref_coco: objects/refexp/raw): all of them
                texts = texts.flat_values
            raw["texts"] = tf.reshape(texts, [-1])
        if cfg.text.clean:  # every text of the example: the in-memory reader cleans them once, here
            raw["texts"] = preprocess.clean_text(raw["texts"], lowercase=bool(cfg.text.lowercase))
        elif cfg.text.lowercase:
            raw["texts"] = tf.strings.lower(raw["texts"], encoding="utf-8")
        if cfg.label_key:
            raw["label"] = tf.cast(_get(ex, cfg.label_key), tf.int32)
        for name in cfg.negatives:
            raw[f"attribute_{name}"] = tf.cast(_get(ex, name), tf.int32)
        if self.from_boxes:
            raw["box"] = tf.cast(_get(ex, cfg.regions_from_boxes.box_key), tf.float32)
        elif self.regions:
            raw.update(_precomputed_regions(ex, self.max_regions))
        return raw

    def audio(self, samples: tf.Tensor) -> dict[str, tf.Tensor]:
        """A clip -> int16 samples [max_samples] (its start, zero-padded) at data.audio.sample_rate and its real
        length. Resampled here (soxr, on the host) only when the dataset's rate differs."""
        if samples.dtype.is_floating:
            samples = tf.cast(tf.round(tf.clip_by_value(samples, -1.0, 32767 / 32768) * 32768), tf.int16)
        samples = tf.cast(tf.clip_by_value(samples, -32768, 32767), tf.int16)  # catalogues store int64 samples
        if self.meta.sample_rate != self.sample_rate:
            rates = (self.meta.sample_rate, self.sample_rate)
            samples = tf.numpy_function(lambda x: _resample_int16(x, *rates), [samples], tf.int16, stateful=False)
        samples = tf.reshape(samples, [-1])[:self.max_samples]
        length = tf.shape(samples)[0]
        padded = tf.ensure_shape(tf.pad(samples, [[0, self.max_samples - length]]), [self.max_samples])
        return {"audio": padded, "audio_length": length}

    # -- per example: geometric image preprocessing and the text choice (streamed readers)

    def prepare(self, position: tf.Tensor, raw: dict) -> dict[str, tf.Tensor]:
        """Image preprocessing (seeded by the stream position) and the text choice of one parsed example."""
        out = dict(raw)
        k_image, k_text = tf.unstack(tf.random.experimental.stateless_split(
            _seed(self.seed, self.index, self.process_index, position), 2))
        if self.has_image:
            out.update(self.image_fn(raw["image"], k_image))
        texts = out.pop("texts")
        n = tf.shape(texts)[0]
        tf.debugging.assert_positive(n, message=f"data.sources.{self.key}: an example without texts")
        pick = (tf.random.stateless_uniform([], k_text, 0, 2**30, tf.int32) % n) if self.train else 0
        out["caption"] = texts[pick]
        out["image_id"] = tf.where(raw["image_id"] >= 0, raw["image_id"], tf.cast(position, tf.int32))
        return out

    # -- per chunk: what every reader shares

    def finish(self, chunk: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Normalisation, hard negatives and regions from boxes, on a chunk [c, ...] of examples."""
        cfg = self.cfg
        out = dict(chunk)
        if self.has_audio:
            out["audio"] = tf.cast(chunk["audio"], tf.float32) / 32768.0
        if self.has_image:
            out["image"] = preprocess.normalize(chunk["image"], self.mean, self.std)
        if "image_mask" in chunk:  # padding is zero after normalisation, as transformers' ViLT processor pads
            out["image"] = out["image"] * tf.cast(chunk["image_mask"], tf.float32)[..., None]
        text = chunk["caption"]
        # An empty text would train as a silent [CLS] [SEP]: stop, naming the source and the example.
        empty = tf.debugging.Assert(tf.reduce_all(tf.strings.length(text) > 0),
                                    [f"data.sources.{self.key}: empty text at image_id",
                                     tf.boolean_mask(chunk["image_id"], tf.strings.length(text) == 0)])
        with tf.control_dependencies([empty]):
            out["caption"] = tf.identity(text)
        for name, words in self.meta.attributes.items():
            value = out.pop(f"attribute_{name}")
            out[f"caption_other_{name}"] = swap_attribute(out["caption"], value, chunk["image_id"], words,
                                                          f"data.sources.{self.key}")
        if self.from_boxes:
            out.update(regions_from_boxes(out["image"], out.pop("box"), chunk["label"],
                                          crop=cfg.regions_from_boxes.crop, grid=cfg.regions_from_boxes.grid,
                                          num_classes=self.meta.region_classes))
        if self.tags:
            out["caption_tags"] = region_tags(out["region_targets"], out["region_mask"], self.meta.class_names)
        out["source"] = tf.fill(tf.shape(chunk["image_id"]), self.index)
        return out


def audio_samples(data_config: ml_collections.ConfigDict) -> int:
    """Samples per clip in a batch: data.audio.max_seconds at data.audio.sample_rate."""
    return int(round(float(data_config.audio.max_seconds) * int(data_config.audio.sample_rate)))


def _resample_int16(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """int16 samples at rate_in -> int16 at rate_out (soxr, as the builders resample)."""
    import soxr  # pylint: disable=import-outside-toplevel

    wave = soxr.resample(samples.astype(np.float32) / 32768.0, rate_in, rate_out, quality="HQ")
    return np.clip(np.round(wave * 32768.0), -32768, 32767).astype(np.int16)


def _pad_rows(x: tf.Tensor, rows: int) -> tf.Tensor:
    """First `rows` rows of x [n, ...], zero-padded when n < rows."""
    x = x[:rows]
    pad = rows - tf.shape(x)[0]
    return tf.pad(x, tf.concat([[[0, pad]], tf.zeros([tf.rank(x) - 1, 2], tf.int32)], axis=0))


def _precomputed_regions(ex: dict, max_regions: int) -> dict[str, tf.Tensor]:
    """Precomputed regions padded / truncated to max_regions, with their mask."""
    r = max_regions
    feats = tf.cast(ex["region_features"], tf.float32)
    n = tf.minimum(tf.shape(feats)[0], r)
    out = {"region_feats": tf.ensure_shape(_pad_rows(feats, r), [r, feats.shape[-1]]),
           "region_boxes": tf.ensure_shape(_pad_rows(tf.cast(ex["region_boxes"], tf.float32), r), [r, 4]),
           "region_mask": tf.cast(tf.range(r) < n, tf.int32)}
    if "region_class_probs" in ex:
        probs = tf.cast(ex["region_class_probs"], tf.float32)
        out["region_targets"] = tf.ensure_shape(_pad_rows(probs, r), [r, probs.shape[-1]])
    return out


def swap_attribute(captions: tf.Tensor, values: tf.Tensor, image_ids: tf.Tensor, words: tuple[str, ...],
                   where: str) -> tf.Tensor:
    """Each caption [c] with the word of its attribute value replaced by another value's word; [c] strings.

    The replacement is words[(v + 1 + image_id % (k - 1)) % k] for value v of k: a deterministic function of the
    image, never the value itself. Each caption must name its value exactly once, as a whole word (case-insensitive;
    punctuation around it is kept). These are the mismatches only grounding rejects.
    """
    k = len(words)
    table = tf.constant(words)
    new_values = (values + 1 + image_ids % (k - 1)) % k
    tokens = tf.strings.split(captions)  # ragged [c, w]; captions are cleaned, so one space apart
    flat = tokens.flat_values
    rows = tokens.value_rowids()
    core = tf.strings.lower(tf.strings.regex_replace(flat, r"^\W+|\W+$", ""), encoding="utf-8")
    hit = tf.equal(core, tf.gather(tf.gather(table, values), rows))
    count = tf.math.unsorted_segment_sum(tf.cast(hit, tf.int32), rows, tf.shape(captions)[0])
    check = tf.debugging.Assert(tf.reduce_all(count == 1),
                                [f"{where}: a caption must name its attribute word exactly once to build a hard "
                                 f"negative; captions:", tf.boolean_mask(captions, count != 1)])
    prefix = tf.strings.regex_replace(flat, r"^(\W*).*$", r"\1")
    suffix = tf.strings.regex_replace(flat, r"^.*?(\W*)$", r"\1")
    replaced = tf.strings.join([prefix, tf.gather(tf.gather(table, new_values), rows), suffix])
    with tf.control_dependencies([check]):
        flat = tf.where(hit, replaced, flat)
    return tf.strings.reduce_join(tokens.with_flat_values(flat), axis=-1, separator=" ")


def regions_from_boxes(image: tf.Tensor, box: tf.Tensor, label: tf.Tensor, *, crop: int, grid: int,
                       num_classes: int) -> dict[str, tf.Tensor]:
    """Region inputs made from the pixels, for a chunk of normalised images [c, H, W, 3].

    What the "detector" is, exactly: there is none. The regions are the given box (e.g. the object's tight box,
    measured from its pixels when the dataset was built), the whole image, and the cells of a grid x grid tiling;
    a region's feature is the box's pixels bilinearly resampled to crop x crop x 3 (tf.image.crop_and_resize of
    the normalised image), flattened: honest image content, no learned features. The soft class target of a region
    is what a detector's class distribution would approximate: the fraction of the region covered by the box goes
    to the box's class (label), the rest to background (the last class). Returns region_feats float32
    [c, R, crop*crop*3], region_boxes [c, R, 4] (ymin, xmin, ymax, xmax in [0, 1]), region_mask int32 [c, R] (all
    real) and region_targets [c, R, num_classes], R = 2 + grid^2.
    """
    c = tf.shape(image)[0]
    cells = [[i / grid, j / grid, (i + 1) / grid, (j + 1) / grid] for i in range(grid) for j in range(grid)]
    fixed = tf.constant([[0.0, 0.0, 1.0, 1.0]] + cells, tf.float32)  # [R - 1, 4]
    boxes = tf.concat([tf.cast(box, tf.float32)[:, None, :],
                       tf.broadcast_to(fixed[None], [c, fixed.shape[0], 4])], axis=1)  # [c, R, 4]
    r = boxes.shape[1]
    flat = tf.reshape(boxes, [-1, 4])
    crops = tf.image.crop_and_resize(image, flat, tf.repeat(tf.range(c), r), [crop, crop])
    feats = tf.reshape(crops, [c, r, crop * crop * 3])

    obj = boxes[:, :1, :]
    inter_h = tf.nn.relu(tf.minimum(boxes[..., 2], obj[..., 2]) - tf.maximum(boxes[..., 0], obj[..., 0]))
    inter_w = tf.nn.relu(tf.minimum(boxes[..., 3], obj[..., 3]) - tf.maximum(boxes[..., 1], obj[..., 1]))
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    covered = tf.clip_by_value(inter_h * inter_w / tf.maximum(area, 1e-6), 0.0, 1.0)  # [c, R]
    onehot = tf.one_hot(label, num_classes, dtype=tf.float32)[:, None, :]
    background = tf.one_hot(num_classes - 1, num_classes, dtype=tf.float32)[None, None, :]
    targets = covered[..., None] * onehot + (1.0 - covered[..., None]) * background
    return {"region_feats": feats, "region_boxes": boxes, "region_mask": tf.ones([c, r], tf.int32),
            "region_targets": targets}


def region_tags(targets: tf.Tensor, region_mask: tf.Tensor, class_names: tuple[str, ...],
                threshold: float = 0.5) -> tf.Tensor:
    """OSCAR's object tags of a chunk: the names of the classes (background, the last, excluded) that some real
    region holds with probability > threshold, in class order, joined by spaces -> string [c] ("" if none)."""
    probs = targets[..., :len(class_names)] * tf.cast(region_mask, tf.float32)[..., None]
    present = tf.reduce_max(probs, axis=1) > threshold  # [c, classes]
    names = tf.where(present, tf.constant(class_names)[None, :], "")
    joined = tf.strings.reduce_join(names, axis=1, separator=" ")
    return tf.strings.strip(tf.strings.regex_replace(joined, " +", " "))


# ----------------------------------------------------------------------------------------------- readers


def _finished(ex: _Example, examples: tf.data.Dataset) -> tf.data.Dataset:
    """Prepared examples -> chunks of CHUNK finished examples (order and count unchanged)."""
    return examples.batch(CHUNK).map(ex.finish, num_parallel_calls=tf.data.AUTOTUNE)


def _shuffled_records(files, skips, takes, *, seed: int, index: int, epoch, shuffle_buffer: int) -> tf.data.Dataset:
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


def _epoch_indices(n: int, *, seed: int, index: int, start: int) -> tf.data.Dataset:
    """Stream positions start, start + 1, ... as indices into n examples: epoch e is a permutation seeded by
    (seed, source, e)."""
    start_epoch, offset = divmod(start, n)

    def permutation(epoch):
        return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=_seed(seed, index, epoch))

    first = tf.data.Dataset.from_tensor_slices(permutation(start_epoch)[offset:])
    rest = tf.data.Dataset.range(start_epoch + 1, np.iinfo(np.int64).max).flat_map(
        lambda e: tf.data.Dataset.from_tensor_slices(permutation(e)))
    return first.concatenate(rest)


def _streamed(ex: _Example, records: tf.data.Dataset, first_position: int) -> tf.data.Dataset:
    """Serialized records at consecutive stream positions -> finished examples."""
    ds = records.enumerate(start=first_position)
    ds = ds.map(lambda p, r: ex.prepare(p, ex.parse(r)), num_parallel_calls=tf.data.AUTOTUNE)
    return _finished(ex, ds)


@functools.lru_cache(maxsize=8)
def _memory(key: str, cfg_json: str, data_json: str, split: str, process_index: int, process_count: int,
            train: bool) -> dict[str, np.ndarray]:
    """This process's slice of `split`, parsed once and held as numpy arrays (cached per process).

    Images are uint8: resized (and rounded) already when the split's image preprocessing is deterministic, else as
    stored (then every image must have the same size). Texts are a padded [n, T] matrix with their counts.
    """
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    data_config = ml_collections.ConfigDict(json.loads(data_json))
    builder = open_source(key, cfg)
    check_split(builder, split, key)
    ex = _Example(key, 0, builder, cfg, data_config, describe(key, cfg, data_config), train=train, seed=0,
                  process_index=process_index)
    records, _ = _slice_records(builder, split, process_index, process_count)

    def parse(record):
        raw = ex.parse(record)
        if ex.deterministic_image and ex.has_image:
            raw.update(ex.image_fn(raw["image"], tf.zeros([2], tf.int64)))
            raw["image"] = tf.cast(tf.clip_by_value(tf.round(raw["image"]), 0, 255), tf.uint8)
        raw["num_texts"] = tf.shape(raw["texts"])[0]
        return raw

    parts = list(records.map(parse, num_parallel_calls=tf.data.AUTOTUNE).padded_batch(1024).as_numpy_iterator())
    if not parts:
        raise ValueError(f"data.sources.{key}: split {split!r} slice {process_index}/{process_count} is empty")
    shapes = {p["image"].shape[1:] for p in parts} if ex.has_image else set()
    if len(shapes) > 1 or (not ex.deterministic_image and any(0 in s for s in shapes)):
        raise ValueError(f"data.sources.{key}.in_memory: images of different sizes {sorted(shapes)} can only be "
                         f"held in memory after a deterministic resize (no random_resized_crop / flip / "
                         f"RandAugment), or set in_memory=False")
    width = max(p["texts"].shape[1] for p in parts)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "texts"}
    out["texts"] = np.concatenate([np.pad(p["texts"], ((0, 0), (0, width - p["texts"].shape[1])),
                                          constant_values=b"") for p in parts])
    if out["num_texts"].min() < 1:
        raise ValueError(f"data.sources.{key}: every example needs at least one text")
    return out


def _memory_chunks(ex: _Example, data: dict[str, np.ndarray], chunks: tf.data.Dataset) -> tf.data.Dataset:
    """Chunks (first stream position, indices [<= CHUNK], how many to drop from the front) into the in-memory
    slice -> chunks of finished examples, with the text choice drawn per chunk from (seed, source, process, first
    position): a chunk is drawn whole, then its front dropped, so a resume inside it replays its draws."""
    tensors = {k: tf.constant(v) for k, v in data.items()}

    def gather(first, idx, drop):
        idx = tf.cast(idx, tf.int32)
        out = {k: tf.gather(v, idx) for k, v in tensors.items() if k not in ("texts", "num_texts")}
        counts = tf.gather(tensors["num_texts"], idx)
        if ex.train:
            draw = tf.random.stateless_uniform(tf.shape(idx), _seed(ex.seed, ex.index, ex.process_index, first, 1),
                                               0, 2**30, tf.int32)
            pick = draw % counts
        else:
            pick = tf.zeros_like(idx)
        out["caption"] = tf.gather(tf.gather(tensors["texts"], idx), pick, batch_dims=1)
        out["image_id"] = tf.where(out["image_id"] >= 0, out["image_id"], idx)
        out["position"] = first + tf.range(tf.size(idx, out_type=tf.int64))
        return {k: v[drop:] for k, v in out.items()}

    if ex.deterministic_image:
        def gather_and_finish(first, idx, drop):
            chunk = gather(first, idx, drop)
            del chunk["position"]
            if ex.has_image:
                chunk["image"] = tf.cast(chunk["image"], tf.float32)
            return ex.finish(chunk)

        return chunks.map(gather_and_finish, num_parallel_calls=tf.data.AUTOTUNE)

    def augment(example):  # random crops / flips / RandAugment stay per example, seeded by the position
        k_image = tf.random.experimental.stateless_split(
            _seed(ex.seed, ex.index, ex.process_index, example.pop("position")), 2)[0]
        return dict(example, **ex.image_fn(example["image"], k_image))

    examples = chunks.map(gather, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return _finished(ex, examples.map(augment, num_parallel_calls=tf.data.AUTOTUNE))


def _epoch_chunks(n: int, *, seed: int, index: int, start: int) -> tf.data.Dataset:
    """Chunks (first stream position, indices, drop) of the stream of indices into n examples from position
    `start`: epoch e is a permutation seeded by (seed, source, e) cut into chunks of CHUNK (the last one of an
    epoch shorter); the chunk holding `start` comes whole, with drop = how many of its positions precede it."""
    start_epoch, offset = divmod(start, n)
    first_chunk, drop = divmod(offset, CHUNK)
    per_epoch = -(-n // CHUNK)

    def epoch_chunks(epoch):
        perm = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=_seed(seed, index, epoch))
        first = tf.where(epoch == start_epoch, first_chunk, 0)
        return tf.data.Dataset.range(tf.cast(first, tf.int64), per_epoch).map(
            lambda c: (epoch * n + c * CHUNK, perm[c * CHUNK:(c + 1) * CHUNK],
                       tf.where((epoch == start_epoch) & (c == first_chunk), drop, 0)))

    return tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_chunks)


def train_examples(key: str, index: int, cfg: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
                   meta: SourceMeta, *, seed: int, consumed: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
    """Source `key`'s infinite finished train examples for this process from its stream position `consumed`, in
    chunks (dicts of [c, ...]; `unbatch()` gives single examples)."""
    builder = open_source(key, cfg)
    check_split(builder, cfg.train_split, key)
    ex = _Example(key, index, builder, cfg, data_config, meta, train=True, seed=seed, process_index=process_index)
    if cfg.in_memory:
        data = _memory(key, cfg.to_json(), data_config.to_json(), cfg.train_split, process_index, process_count,
                       True)
        chunks = _epoch_chunks(len(data["num_texts"]), seed=seed, index=index, start=consumed)
        return _memory_chunks(ex, data, chunks)
    if _file_format(builder) == "array_record":
        reader = _array_record_reader(builder, cfg.train_split, process_index, process_count)
        indices = _epoch_indices(len(reader), seed=seed, index=index, start=consumed)
        return _streamed(ex, _read_indices(reader, indices), consumed)
    files, skips, takes = read_plan(builder, cfg.train_split, process_index, process_count)
    start_epoch, offset = divmod(consumed, sum(takes))
    epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
    records = epochs.flat_map(lambda e: _shuffled_records(files, skips, takes, seed=seed, index=index, epoch=e,
                                                          shuffle_buffer=int(cfg.shuffle_buffer)))
    return _streamed(ex, records.skip(offset), consumed)


def eval_examples(key: str, index: int, cfg: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
                  meta: SourceMeta, *, split: str, process_index: int,
                  process_count: int) -> tuple[tf.data.Dataset, int, int]:
    """Source `key`'s finished examples of `split` for this process in file order (text 0 of each), in chunks;
    the number of them, and the number in the whole split (all processes)."""
    builder = open_source(key, cfg)
    check_split(builder, split, key)
    total = int(builder.info.splits[split].num_examples)
    ex = _Example(key, index, builder, cfg, data_config, meta, train=False, seed=0, process_index=process_index)
    if cfg.in_memory:
        data = _memory(key, cfg.to_json(), data_config.to_json(), split, process_index, process_count, False)
        n = len(data["num_texts"])
        chunks = tf.data.Dataset.range(0, n, CHUNK).map(
            lambda p: (p, tf.range(p, tf.minimum(p + CHUNK, n)), tf.constant(0, tf.int64)))
        return _memory_chunks(ex, data, chunks), n, total
    records, n = _slice_records(builder, split, process_index, process_count)
    return _streamed(ex, records, 0), n, total


def num_batches(total: int, process_count: int, batch_size: int) -> int:
    """Eval batches every process runs: ceil(ceil(total / processes) / batch)."""
    return math.ceil(math.ceil(total / process_count) / batch_size)


def split_texts(key: str, cfg: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
                split: str | None = None) -> tuple[list[str], np.ndarray]:
    """Every text of every example of `split` (default: the eval split), in file order, cleaned as the pipeline
    cleans them, and the image_id (or position) of the example each belongs to: ([T] strings, int [T]). Images are
    not decoded; every process reads the whole split (for retrieval over several captions per image)."""
    builder = open_source(key, cfg)
    split = split or cfg.eval_split
    check_split(builder, split, key)
    ex = _Example(key, 0, builder, cfg, data_config, describe(key, cfg, data_config), train=False, seed=0,
                  process_index=0)
    records, _ = _slice_records(builder, split, 0, 1)

    def parse(position, record):
        raw = ex.parse(record, with_image=False)
        image_id = tf.where(raw["image_id"] >= 0, raw["image_id"], tf.cast(position, tf.int32))
        return raw["texts"], image_id

    texts, image_ids = [], []
    for example_texts, image_id in records.enumerate().map(parse).as_numpy_iterator():
        texts += [t.decode("utf-8") for t in example_texts]
        image_ids += [int(image_id)] * len(example_texts)
    return texts, np.asarray(image_ids, np.int32)
