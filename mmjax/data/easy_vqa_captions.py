"""`easy_vqa_captions`: the embedded default dataset, built offline from the `easy-vqa` package.

easy-vqa ships 4,000 train + 1,000 test 64x64 RGB images (one circle, rectangle or triangle drawn in one of 8
pure colours on a light random background), ~48k yes/no/colour/shape questions and 13 answers. This builder turns
them into an image-caption-classification dataset that needs no network:

    builder = EasyVqaCaptions(data_dir=...)
    builder.download_and_prepare()      # ~10-20 s on 2 cores; writes TFRecords + tokenizer.json

Per example: `image` (64x64x3 uint8), `image_id`, `color` / `shape` / `label` (24 "color shape" classes,
label = color * 3 + shape), `bbox` (normalised ymin, xmin, ymax, xmax), `size` (small/medium/large), `position`
(3x3 grid), `area` (pixels), `color_from_qa` / `shape_from_qa` (whether the Q/A stated the fact), `questions`,
`answers`, and `captions` (5 per image; caption 0 is the canonical, fullest one that evaluation retrieves with).

Facts: the Q/A state the colour for ~92% and the shape for ~95% of images. The colour is always measured from
the pixels (it agrees with every Q/A statement: 100% on train and test) and the Q/A win if they ever disagreed;
the shape comes from the Q/A when stated and otherwise from the pixel rule in `measure_image` (which agrees with
every stated shape as well). The build is deterministic, the same bytes every time: examples are written in
image_id order (no shuffling), images are the shipped PNG bytes, caption choices are seeded by (split, image_id),
and records use protobuf's deterministic encoding.

The builder also makes the default WordPiece tokenizer from the train captions + questions + zero-shot prompts
(every word one token, characters as fallback) and saves it next to the TFRecords:
`<data_dir>/easy_vqa_captions/1.0.0/tokenizer.json`. As a data source (`source_config`) the dataset offers its
classes and prompts, colour / shape hard negatives and regions made from the shape's box (mmjax/data/sources.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from unittest import mock
from typing import Iterator, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported (through tfds): quiet C++ logs

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import example_serializer

from mmjax.data.local_builder import OfflineMessages

# Order matters: class indices are derived from it (label = color_index * 3 + shape_index).
COLORS: tuple[str, ...] = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
# The exact RGB each colour is drawn in (measured: every image's most common non-background pixel value is one
# of these; note easy-vqa's "green" is pure (0, 255, 0)).
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Visible shape area in pixels of a 64x64 image; splits train ~ 33/33/33% (the 1/3 and 2/3 quantiles are 204 and
# 402 px). Hard-coded so that the size words never change with a rebuild.
SIZE_THRESHOLDS: tuple[float, float] = (200.0, 400.0)
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# How each grid cell reads after a noun ("a red circle in the top left").
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}

# Caption 0: the canonical, fullest caption (colour + shape + size + position); evaluation retrieves with it.
CANONICAL_CAPTION = "a {size} {color} {shape} {where}"
# Alternatives; 4 of them (distinct) are drawn per image, seeded by (split, image_id).
ALTERNATIVE_CAPTIONS: tuple[str, ...] = (
    "there is a {size} {color} {shape} {where}",
    "a {color} {shape}",
    "a {color} shape shaped like a {shape} {where}",
    "a {size} {shape} colored {color}",
    "the {shape} is {color} and {size}",
    "a {color} {shape} near the {position}",
    "{size} {color} {shape}",
    "a {shape} in {color} {where}",
    "one {color} {shape} on a light background",
    "the {color} shape is a {shape} {where}",
)
NUM_CAPTIONS = 5

# Zero-shot prompts. Every template contains the word "image" and no caption form does, so no rendered prompt can
# equal a training caption or share a template's fixed words (tests/test_data.py checks both). All their words
# occur in the questions, so the default tokenizer knows them as whole words.
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "an image that contains a {}.",
    "a {} is present in the image.",
    "the image does contain a {}.",
    "what is in the image? a {}.",
)

_SPLITS = {"train": 4000, "test": 1000}


def _easy_vqa_data_dir() -> str:
    """Directory of the data files shipped by the `easy-vqa` package."""
    import easy_vqa  # pylint: disable=import-outside-toplevel

    return os.path.join(os.path.dirname(easy_vqa.__file__), "data")


# ----------------------------------------------------------------------------------------------- pixels


@dataclasses.dataclass(frozen=True)
class ImageMeasurement:
    """What the pixels of one image say: colour, shape, geometry."""

    color: str
    shape: str
    area: float  # visible shape area in pixels (anti-aliased pixels count fractionally)
    bbox: tuple[float, float, float, float]  # normalised ymin, xmin, ymax, xmax of the shape's pixels
    centroid: tuple[float, float]  # (y, x) in pixels
    size: str
    position: str


def _rgb_codes(rgb: np.ndarray) -> np.ndarray:
    """[N, 3] uint8 -> [N] int32 0xRRGGBB."""
    rgb = rgb.astype(np.int32)
    return (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]


_PALETTE_CODES = _rgb_codes(np.array([COLOR_RGB[c] for c in COLORS], np.uint8))


def shape_alpha(image: np.ndarray) -> tuple[np.ndarray, str]:
    """Per-pixel shape coverage in [0, 1] and the named colour of the shape.

    The background is the most common border colour; the shape colour is the named RGB with the most exactly
    matching pixels. Anti-aliased edge pixels are blends of the two, so projecting each pixel onto the line from
    background to shape colour gives its coverage (alpha).
    """
    h, w, _ = image.shape
    flat = image.reshape(-1, 3).astype(np.float32)
    # Pack RGB into one int so that counting colours is a bincount / comparison, not a row-wise unique.
    codes = _rgb_codes(image.reshape(-1, 3))
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    border_codes, counts = np.unique(_rgb_codes(border), return_counts=True)
    bg_code = int(border_codes[counts.argmax()])
    background = np.array([bg_code >> 16, (bg_code >> 8) & 255, bg_code & 255], np.float32)
    palette = np.array([COLOR_RGB[c] for c in COLORS], np.float32)
    exact = (codes[:, None] == _PALETTE_CODES[None]).sum(0)
    color_index = int(exact.argmax())
    direction = palette[color_index] - background
    alpha = np.clip((flat - background) @ direction / (direction @ direction), 0.0, 1.0)
    return alpha.reshape(h, w), COLORS[color_index]


def shape_from_alpha(alpha: np.ndarray) -> str:
    """Classifies the shape from its row-width profile.

    Shapes are axis-aligned rectangles, upright triangles (base at the bottom) and circles, often clipped by the
    image border, so bounding-box fill ratios are unreliable. The width of each row is robust: constant for a
    rectangle, linear and growing downwards for a triangle, and concave (not linear) for a circle. Measured on all
    stated shapes: linear-fit RMSE / max width <= 0.053 for rectangles and triangles, >= 0.066 for circles;
    normalised slope |s| <= 0.08 for rectangles, >= 0.69 for triangles.
    """
    widths = alpha.sum(1)
    rows = np.nonzero(widths > 0.5)[0]
    widths = widths[rows[0]: rows[-1] + 1]
    if len(widths) > 4:  # the first and last rows are partly covered (anti-aliasing): leave them out
        widths = widths[1:-1]
    if len(widths) < 2:
        return "rectangle"
    y = np.arange(len(widths), dtype=np.float64)
    coef = np.polyfit(y, widths, 1)
    rmse = np.sqrt(np.mean((np.polyval(coef, y) - widths) ** 2)) / widths.max()
    slope = coef[0] * (len(widths) - 1) / widths.max()
    if rmse > 0.06:
        return "circle"
    return "triangle" if slope > 0.4 else "rectangle"


def size_of(area: float) -> str:
    """small / medium / large from the visible area in pixels (of a 64x64 image)."""
    return SIZES[int(np.searchsorted(SIZE_THRESHOLDS, area, side="right"))]


def position_of(cy: float, cx: float, height: int, width: int) -> str:
    """The 3x3 grid cell holding the centroid (cy, cx)."""
    row = min(int(cy * 3 / height), 2)
    col = min(int(cx * 3 / width), 2)
    return POSITIONS[row * 3 + col]


def measure_image(image: np.ndarray) -> ImageMeasurement:
    """Measures colour, shape, area, bbox, centroid, size and position of the single shape in `image`."""
    h, w, _ = image.shape
    alpha, color = shape_alpha(image)
    ys, xs = np.nonzero(alpha > 0.5)
    area = float(alpha.sum())
    yy, xx = np.mgrid[:h, :w]
    cy = float((alpha * (yy + 0.5)).sum() / area)
    cx = float((alpha * (xx + 0.5)).sum() / area)
    # Pixel edges, so the box contains every shape pixel: [ymin, ymax + 1) / h.
    bbox = (ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w)
    return ImageMeasurement(
        color=color, shape=shape_from_alpha(alpha), area=area, bbox=tuple(float(b) for b in bbox),
        centroid=(cy, cx), size=size_of(area), position=position_of(cy, cx, h, w))


# ----------------------------------------------------------------------------------------------- Q/A


def qa_facts(questions: Sequence[str], answers: Sequence[str]) -> tuple[str | None, str | None]:
    """(colour, shape) stated by one image's questions and answers; None where not stated.

    A fact is stated by an answer that names it ("what color is the shape?" -> "blue"), by the other words of such
    a question ("what is the blue shape?" -> "rectangle" states blue too), or by an affirmed presence question
    ("is there a red shape?" -> yes, "is there not a red shape?" -> no). Conflicting statements raise.
    """
    facts: dict[str, str] = {}

    def state(kind: str, value: str) -> None:
        if facts.setdefault(kind, value) != value:
            raise ValueError(f"conflicting {kind} in Q/A: {facts[kind]} vs {value}")

    for question, answer in zip(questions, answers):
        words = re.findall(r"[a-z]+", question.lower())
        negated = "not" in words or "no" in words
        affirmed = (answer == "yes" and not negated) or (answer == "no" and negated)
        if answer in COLORS or answer in SHAPES or affirmed:
            for word in words + [answer]:
                if word in COLORS:
                    state("color", word)
                elif word in SHAPES:
                    state("shape", word)
    return facts.get("color"), facts.get("shape")


# ----------------------------------------------------------------------------------------------- captions


def make_captions(color: str, shape: str, size: str, position: str, seed: int) -> list[str]:
    """NUM_CAPTIONS captions: the canonical one first, then distinct alternative forms drawn with `seed`."""
    fields = dict(color=color, shape=shape, size=size, position=position, where=POSITION_PHRASES[position])
    rng = np.random.default_rng(seed)  # PCG64: the same stream on every numpy version
    picks = rng.choice(len(ALTERNATIVE_CAPTIONS), size=NUM_CAPTIONS - 1, replace=False)
    forms = [CANONICAL_CAPTION] + [ALTERNATIVE_CAPTIONS[i] for i in sorted(picks)]
    return [f.format(**fields) for f in forms]


def render_prompts() -> list[list[str]]:
    """Zero-shot prompts [class][template] for the 24 CLASS_NAMES ("red circle", ...)."""
    return [[t.format(name) for t in ZERO_SHOT_TEMPLATES] for name in CLASS_NAMES]


def source_config(**overrides):
    """This dataset as a data source (mmjax.data.sources.source_config), with what it offers switched on.

    It builds itself offline on first use (`prepare`) and is held in memory (4,000 64x64 images). It offers
    zero-shot classes (`label`: the 24 "colour shape" names) with prompts the captions never use, hard-negative
    captions with the colour or the shape word swapped (`negatives`), and region inputs made from the pixels
    (`regions_from_boxes`: the shape's tight box, the whole image and a 2x2 grid) for region models. Keyword
    arguments override source fields, e.g. negatives=() where no task needs them.
    """
    from mmjax import configlib  # pylint: disable=import-outside-toplevel
    from mmjax.data import sources  # pylint: disable=import-outside-toplevel  (sources imports no dataset module)

    defaults = dict(name="easy_vqa_captions", prepare=True, train_split="train", eval_split="test", label_key="label",
                    prompts=ZERO_SHOT_TEMPLATES, negatives=("color", "shape"),
                    regions_from_boxes=dict(box_key="bbox", crop=8, grid=2), in_memory=True)
    return configlib.override(sources.source_config(**defaults), overrides, "the easy_vqa source")


# ----------------------------------------------------------------------------------------------- examples


@functools.lru_cache(maxsize=None)
def _answers_file_ok() -> bool:
    """Checks that the shipped answers are exactly our colours + shapes + yes/no (guards COLORS/SHAPES)."""
    with open(os.path.join(_easy_vqa_data_dir(), "answers.txt")) as f:
        answers = {line.strip() for line in f if line.strip()}
    expected = set(COLORS) | set(SHAPES) | {"yes", "no"}
    if answers != expected:
        raise ValueError(f"easy-vqa answers.txt changed: {sorted(answers ^ expected)}")
    return True


def load_split_examples(split: str) -> list[dict]:
    """All examples of `split` ('train' or 'test') as dicts of numpy/python values, in image_id order."""
    _answers_file_ok()
    root = os.path.join(_easy_vqa_data_dir(), split)
    with open(os.path.join(root, "questions.json")) as f:
        qa = json.load(f)
    by_image: dict[int, list[tuple[str, str]]] = {}
    for question, answer, image_id in qa:
        by_image.setdefault(int(image_id), []).append((question, answer))
    split_seed = {"train": 0, "test": 1}[split]
    examples = []
    for image_id in range(_SPLITS[split]):
        image_path = os.path.join(root, "images", f"{image_id}.png")
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"))
        pairs = by_image.get(image_id, [])
        questions = [q for q, _ in pairs]
        answers = [a for _, a in pairs]
        m = measure_image(image)
        qa_color, qa_shape = qa_facts(questions, answers)
        color = qa_color or m.color  # the Q/A win where stated
        shape = qa_shape or m.shape
        examples.append({
            "image": image,
            "image_path": image_path,
            "image_id": image_id,
            "color": COLORS.index(color),
            "shape": SHAPES.index(shape),
            "label": COLORS.index(color) * len(SHAPES) + SHAPES.index(shape),
            "color_from_qa": qa_color is not None,
            "shape_from_qa": qa_shape is not None,
            "pixel_color": m.color,
            "pixel_shape": m.shape,
            "bbox": tfds.features.BBox(*m.bbox),
            "area": np.float32(m.area),
            "size": SIZES.index(m.size),
            "position": POSITIONS.index(m.position),
            "questions": questions,
            "answers": answers,
            "captions": make_captions(color, shape, m.size, m.position, seed=split_seed * 100_000 + image_id),
        })
    return examples


def tokenizer_corpus(train_examples: Sequence[dict]) -> list[str]:
    """Texts the default tokenizer is trained on: train captions + questions + answers + zero-shot prompts."""
    texts: list[str] = []
    for ex in train_examples:
        texts.extend(ex["captions"])
        texts.extend(ex["questions"])
        texts.extend(ex["answers"])
    texts.extend(p for prompts in render_prompts() for p in prompts)
    return texts


_FEATURE_KEYS = ("image", "image_id", "color", "shape", "label", "color_from_qa", "shape_from_qa", "bbox", "area",
                 "size", "position", "questions", "answers", "captions")


class _DeterministicExampleSerializer(example_serializer.ExampleSerializer):
    """tfds' tf.train.Example serializer with protobuf's deterministic (sorted map keys) encoding."""

    def serialize_example(self, example):
        return self.get_tf_example(example).SerializeToString(deterministic=True)


class EasyVqaCaptions(OfflineMessages, tfds.core.GeneratorBasedBuilder):
    """easy-vqa images with measured attributes, Q/A and generated captions; builds offline."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    # tfds derives code_path through importlib resources, which needs the `importlib_resources` backport for an
    # editable install (ModuleNotFoundError otherwise); the answer is simply this file.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(64, 64, 3)),
                "image_id": np.int32,
                "color": tfds.features.ClassLabel(names=COLORS),
                "shape": tfds.features.ClassLabel(names=SHAPES),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "color_from_qa": np.bool_,
                "shape_from_qa": np.bool_,
                "bbox": tfds.features.BBoxFeature(),
                "area": np.float32,
                "size": tfds.features.ClassLabel(names=SIZES),
                "position": tfds.features.ClassLabel(names=POSITIONS),
                "questions": tfds.features.Sequence(tfds.features.Text()),
                "answers": tfds.features.Sequence(tfds.features.Text()),
                "captions": tfds.features.Sequence(tfds.features.Text()),
            }),
            supervised_keys=("image", "label"),
            # Write examples in image_id order: reproducible files, readable eval order, simple slicing.
            disable_shuffling=True,
            homepage="https://github.com/vzhou842/easy-VQA",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is on local disk, shipped by the easy-vqa package
        return {split: self._generate_examples(split) for split in _SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        for ex in self._examples(split):
            features = {k: ex[k] for k in _FEATURE_KEYS}
            # Store the shipped PNG bytes as they are (all 5,000 are 8-bit RGB): no re-encoding, same bytes
            # on every build.
            features["image"] = ex["image_path"]
            yield ex["image_id"], features

    def _examples(self, split: str) -> list[dict]:
        # Measured once per build: the train examples also feed the tokenizer corpus.
        cache = self.__dict__.setdefault("_examples_cache", {})
        if split not in cache:
            cache[split] = load_split_examples(split)
        return cache[split]

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        # tf.train.Example holds its features in a proto map, and protobuf serializes maps in hash order unless
        # asked for deterministic output: equal examples, different bytes. Swap in a deterministic serializer
        # for this build only (tfds' split builder looks the class up at call time).
        with mock.patch.object(example_serializer, "ExampleSerializer", _DeterministicExampleSerializer):
            super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        # self.data_dir is the temporary build dir here; tfds renames it into place only if we succeed, so the
        # tokenizer is never missing from a prepared dataset.
        from mmjax.data.tokenizer import train_wordpiece  # pylint: disable=import-outside-toplevel

        train_wordpiece(tokenizer_corpus(self._examples("train")), self.data_dir)
        self.__dict__.pop("_examples_cache", None)  # ~60 MB of decoded images: don't keep them around
