"""`mmjax_image_text`: a TFDS builder that turns your own folder of images + an annotation file into a dataset, offline.

    path = build_image_text("my_data/captions.jsonl", "my_data/images", "my_data/tfds")
    ds = tfds.builder_from_directory(path).as_dataset(split="train")

or from the shell: `python -m mmjax.data.build image_text --annotations=... --images=... --out=...`.

Annotation file (UTF-8), one caption per row; several rows may name the same image (COCO has 5 captions each):

* `.jsonl`: one JSON object per line, `{"image": "relative/path.jpg", "caption": "a dog", "split": "train"}`.
  `split` is optional; other keys are ignored; blank lines are skipped.
* `.csv` / `.tsv` (comma / tab separated, read with the csv module, so quoted fields may hold separators or
  newlines): a header row with `image` and `caption` columns and optionally `split`; other columns are ignored.

Row numbers in messages are 1-based physical line numbers (a CSV header is line 1; a quoted multi-line CSV record
is numbered by the line it starts on). Image paths are relative to the `images` folder (`..` may not leave it) and
are stored normalised (`a/./b.jpg` -> `a/b.jpg`); paths and captions are stripped of surrounding whitespace.
Images must be JPEG, PNG or BMP (what TFDS' `Image` feature decodes); every image is opened and fully decoded with
PIL at build time so that a broken file fails the build, not a training run. The file's bytes are stored as they
are (no re-encoding); grey / RGBA / palette images decode to RGB when read.

Splits: the `split` values ("train", "validation", "test", or any name of letters, digits and `_`). Rows without
one go to "train" if some other row has one. If no row has a split, a deterministic `eval_fraction` of the
images is held out as "validation": the round(eval_fraction * n) images (at least 1 when there are >= 2 images,
at most n - 1) whose sha256(image path) is smallest; all captions of a held-out image go with it. `eval_count=N`
holds out exactly N images instead, chosen the same way (not with a non-default eval_fraction; N < n). An
evaluation split of fewer than 10 images gets a warning after the build summary: recall@K on it means little.

Precomputed region features (optional `regions` folder): one `.npz` per image at
`<regions>/<image path without its extension>.npz` (`images/a/b.jpg` -> `<regions>/a/b.npz`), read with
`np.load(..., allow_pickle=False)`, holding

* `features`     float [R, D]: one feature vector per region (e.g. a detector's pooled RoI features);
* `boxes`        float [R, 4]: (ymin, xmin, ymax, xmax) normalised to [0, 1] by the image height / width, the
  TFDS BBox convention; min <= max;
* `class_probs`  float [R, C], optional: the detector's class distribution per region (non-negative), used as
  soft targets for masked region classification.

R >= 1 may vary per image; D (and C, and whether `class_probs` is present) must be the same for every image
(taken from the first image in image_id order). Values must be finite; arrays are stored as float32; other keys
are ignored. Bottom-up-attention (BUTD) style features give pixel boxes (x1, y1, x2, y2) plus the image's
height h and width w; convert them with

    boxes = np.clip(np.stack([y1 / h, x1 / w, y2 / h, x2 / w], axis=1), 0.0, 1.0).astype(np.float32)

Features of one example (= one image in one split), written in image_id order:

* `image`: the image file's bytes (decoded to uint8 [H, W, 3] when read);
* `image_id`: int64, the index of the image path in the sorted list of all distinct image paths in the
  annotation file (stable: it does not depend on the splits or on which rows were skipped);
* `image_path`: the normalised relative path;
* `captions`: this image's captions in this split, in file order;
* with `regions`: `region_features` float32 [R, D], `region_boxes` float32 [R, 4] and, when the files have them,
  `region_class_probs` float32 [R, C].

Bad rows: every row is checked before the build stops, and one ValueError lists the bad ones in file order (the
first 20, then "... and N more"; its first line counts them; a single bad row is one line), each naming the
annotation file, the line and the offending value: missing / corrupt / unsupported image, empty caption, invalid
row (bad JSON, not an object, missing or non-string field, wrong CSV column count, bad split name or image path),
missing or malformed regions file. A header without the required columns, an unreadable file or an empty result always raise. With
`skip_bad=True` bad rows are skipped instead, counted per reason, listed the same way in the summary at the end
(logged and printed) and written to `skipped.json`.

Prepared dataset directory `<out_dir>/mmjax_image_text/<name>/1.0.0/` (what `tfds.builder_from_directory` opens):
`dataset_info.json`, `features.json`, `mmjax_image_text-<split>.tfrecord-0000x-of-0000y` files, the default
WordPiece tokenizer trained on the train captions (`tokenizer.json` + `vocab.txt`; all captions if there is no
"train" split) and, with `skip_bad`, `skipped.json`. The build is deterministic: the same inputs give the same
record bytes (the tokenizer too unless the vocabulary is too large to take every word; see `train_wordpiece`).
Building again under the same name replaces the dataset.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import re
import threading
from typing import Callable, Iterable, Iterator, TypeVar
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported (through tfds): quiet C++ logs

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image
from tensorflow_datasets.core import example_serializer

from mmjax.data.local_builder import LocalBuilder

# What TFDS' Image feature decodes into one [H, W, C] frame (GIF and WebP decode to [frames, H, W, C]).
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_T = TypeVar("_T")
_R = TypeVar("_R")


# ----------------------------------------------------------------------------------------------- shared helpers


class BadInput(ValueError):
    """A problem with one row / entry; `reason` is the key it is counted under when `skip_bad` is on."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


MAX_LISTED = 20  # bad rows an error or a summary lists; the rest are counted ("... and 3 more")
_NOUNS = {"line": "row", "question_id": "question"}  # what one bad entry is, by SkipReport.item


@dataclasses.dataclass
class SkipReport:
    """Collects every bad row of one file; `check()` then raises them all at once, in file order, unless `skip_bad`
    (then they are skipped and `summary()` lists them the same way)."""

    source: str  # the file the row numbers / ids refer to
    skip_bad: bool
    item: str = "line"  # what the recorded values are: "line" numbers or "question_id"s
    seen: int = 0  # rows looked at, for "skipped 3 of 120"
    entries: list[tuple[tuple, str, int | str, str]] = dataclasses.field(default_factory=list)  # order, reason, ...

    def bad(self, reason: str, where: int | str, message: str, order: tuple | None = None) -> None:
        """Records a bad row: `where` (its line / question_id) under `reason`; `order` sorts it into file order
        (default: `where`, a line number)."""
        if order is None:  # a line number; anything else goes last, in the order it was found
            order = (where,) if isinstance(where, int) else (float("inf"), len(self.entries))
        self.entries.append((order, reason, where, message))

    def _in_file_order(self) -> list[tuple[tuple, str, int | str, str]]:
        # Checks run in stages (row fields, then files), so entries arrive out of file order; the sort is stable.
        return sorted(self.entries, key=lambda e: e[0])

    @property
    def skipped(self) -> dict[str, list]:
        """reason -> the `where`s of its bad rows, in file order."""
        out: dict[str, list] = {}
        for _, reason, where, _ in self._in_file_order():
            out.setdefault(reason, []).append(where)
        return out

    @property
    def total(self) -> int:
        """How many rows are bad."""
        return len(self.entries)

    @property
    def noun(self) -> str:
        """What one entry is ("row", "question"), for messages."""
        return _NOUNS.get(self.item, self.item)

    def listing(self, limit: int = MAX_LISTED) -> list[str]:
        """The bad rows' messages in file order: the first `limit`, then "... and N more"."""
        messages = [e[3] for e in self._in_file_order()]
        return messages[:limit] + ([f"... and {len(messages) - limit} more"] if len(messages) > limit else [])

    def check(self) -> None:
        """Raises BadRows listing every bad row, unless there are none or `skip_bad` is on."""
        if self.entries and not self.skip_bad:
            raise BadRows([self])

    def summary(self) -> str:
        """"skipped N of M (source): counts per reason", then the skipped rows' messages in file order."""
        if not self.total:
            return f"skipped 0 of {self.seen} ({self.source})"
        counts = ", ".join(f"{reason} {len(where)}" for reason, where in sorted(self.skipped.items()))
        return "\n    ".join([f"skipped {self.total} of {self.seen} ({self.source}): {counts}"] + self.listing())

    def to_json(self) -> dict:
        """{"source", "seen", "total", "counts": {reason: n}, "<item>s": {reason: [...]}} for skipped.json."""
        skipped = self.skipped
        reasons = sorted(skipped)
        return {"source": self.source, "seen": self.seen, "total": self.total,
                "counts": {r: len(skipped[r]) for r in reasons},
                f"{self.item}s": {r: skipped[r] for r in reasons}}


class BadRows(ValueError):
    """Every bad row of one or more files (a VQA build's splits), listed in file order in one error: one line for a
    single bad row, else a first line counting them and one line each."""

    def __init__(self, reports: list[SkipReport]):
        self.reports = [r for r in reports if r.entries]
        total = sum(r.total for r in self.reports)
        noun = self.reports[0].noun if self.reports else "row"
        if total == 1:
            (message,) = self.reports[0].listing()
            super().__init__(f"{message} (1 bad {noun}: fix it, or pass --skip_bad (skip_bad=True) to build "
                             f"without it)")
            return
        where = self.reports[0].source if len(self.reports) == 1 else f"{len(self.reports)} files"
        lines = [f"{total} bad {noun}s in {where}: fix them, or pass --skip_bad (skip_bad=True) to build without them"]
        for report in self.reports:
            if len(self.reports) > 1:
                lines.append(f"  {report.source}: {report.total}")
            lines += [f"  {message}" for message in report.listing()]
        super().__init__("\n".join(lines))


def check_image(path: str) -> None:
    """Raises BadInput (missing_image / corrupt_image / unsupported_image) unless `path` is a decodable image."""
    if not os.path.isfile(path):
        raise BadInput("missing_image", f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode every pixel: a truncated file only fails here, not at open()
            fmt, mode = im.format, im.mode
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise BadInput("corrupt_image", f"cannot decode image {path}: {type(e).__name__}: {e}") from None
    if fmt not in IMAGE_FORMATS or mode == "CMYK":
        raise BadInput("unsupported_image", f"image {path} is {fmt} ({mode}); use RGB/grey "
                       f"{', '.join(IMAGE_FORMATS)} (convert it to PNG or JPEG)")


def parallel_map(fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R | BadInput]:
    """fn over items in threads (PIL and numpy release the GIL while decoding); a BadInput is returned, not raised."""

    def safe(item):
        try:
            return fn(item)
        except BadInput as e:
            return e

    with concurrent.futures.ThreadPoolExecutor() as pool:
        return list(pool.map(safe, items))


class _DeterministicExampleSerializer(example_serializer.ExampleSerializer):
    """tfds' tf.train.Example serializer with protobuf's deterministic (sorted map keys) encoding."""

    def serialize_example(self, example):
        return self.get_tf_example(example).SerializeToString(deterministic=True)


@contextlib.contextmanager
def deterministic_serialization() -> Iterator[None]:
    """Within: tfds writes equal examples as equal bytes (protobuf maps otherwise serialize in hash order)."""
    # tfds' split builder looks the serializer class up at call time, so patching the module attribute works.
    with mock.patch.object(example_serializer, "ExampleSerializer", _DeterministicExampleSerializer):
        yield


def sanitize_name(text: str) -> str:
    """A TFDS-safe config name: lowercase letters, digits and `_` ("My Data-2" -> "my_data_2")."""
    name = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
    if not name:
        raise ValueError(f"cannot make a dataset name from {text!r}; pass name=...")
    return name if name[0].isalpha() else "d_" + name


def print_warnings(warnings: list[str]) -> None:
    """Prints (and logs) each build warning after the summary, where a user reading the output sees it."""
    for warning in warnings:
        logging.info("warning: %s", warning)  # info, as the summary: a warning would print it twice on a terminal
        print(f"warning: {warning}")


def write_json(path: str | os.PathLike, value) -> None:
    """Writes `value` as indented, key-sorted JSON (stable bytes)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------- annotations


@dataclasses.dataclass(frozen=True)
class Row:
    """One parsed annotation row."""

    line: int
    image: str  # normalised path relative to the images folder
    caption: str
    split: str | None


def _norm_image_path(value: str) -> str | None:
    """Normalised relative posix path, or None if it is absolute or leaves the folder."""
    path = os.path.normpath(value).replace(os.sep, "/")
    if os.path.isabs(path) or path == ".." or path.startswith("../") or path == ".":
        return None
    return path


def _row_from_fields(source: str, line: int, fields: dict) -> Row:
    """Validates one row's fields; raises BadInput."""
    where = f"{source}, line {line}"
    for key in ("image", "caption"):
        if key not in fields or fields[key] is None:
            raise BadInput("bad_row", f"{where}: missing field {key!r} in {fields!r}")
        if not isinstance(fields[key], str):
            raise BadInput("bad_row", f"{where}: field {key!r} must be a string, got {fields[key]!r}")
    image = _norm_image_path(fields["image"].strip()) if fields["image"].strip() else None
    if image is None:
        raise BadInput("bad_row", f"{where}: image must be a path relative to the image folder, got "
                                  f"{fields['image']!r}")
    caption = fields["caption"].strip()
    if not caption:
        raise BadInput("empty_caption", f"{where}: empty caption {fields['caption']!r} for image {image!r}")
    split = fields.get("split")
    if split is not None and not isinstance(split, str):
        raise BadInput("bad_row", f"{where}: field 'split' must be a string, got {split!r}")
    split = (split or "").strip() or None
    if split is not None and (not _SPLIT_NAME.match(split) or split.lower() == "all"):
        raise BadInput("bad_row", f"{where}: bad split name {split!r} (letters, digits and _; not 'all')")
    return Row(line=line, image=image, caption=caption, split=split)


def _jsonl_fields(path: str) -> Iterator[tuple[int, dict | BadInput]]:
    """(line number, fields or the BadInput of an unparsable line) per non-blank line."""
    with open(path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield line, BadInput("bad_row", f"{path}, line {line}: invalid JSON ({e}): {text.strip()[:200]!r}")
                continue
            if not isinstance(value, dict):
                yield line, BadInput("bad_row", f"{path}, line {line}: expected a JSON object, got {value!r}")
            else:
                yield line, value


def _csv_fields(path: str, delimiter: str, required: tuple[str, ...] = ("image", "caption")
                ) -> Iterator[tuple[int, dict | BadInput]]:
    """(line number, fields or the BadInput of a malformed record) per non-blank record after the header."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file (expected a header row with {' and '.join(required)} columns)")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}, line 1: header {header!r} lacks the column(s) {', '.join(missing)}")
        start = reader.line_num + 1
        for record in reader:
            line, start = start, reader.line_num + 1
            if not any(field.strip() for field in record):
                continue
            if len(record) != len(header):
                yield line, BadInput("bad_row", f"{path}, line {line}: {len(record)} columns, the header has "
                                                f"{len(header)}: {record!r}")
            else:
                yield line, dict(zip(header, record))


def read_rows(annotations: str, report: SkipReport) -> list[Row]:
    """The valid rows of a .jsonl / .csv / .tsv annotation file (bad ones raise or go to `report`)."""
    ext = os.path.splitext(annotations)[1].lower()
    if ext == ".jsonl":
        records = _jsonl_fields(annotations)
    elif ext in (".csv", ".tsv"):
        records = _csv_fields(annotations, "\t" if ext == ".tsv" else ",")
    else:
        raise ValueError(f"{annotations}: unknown annotation format {ext!r} (use .jsonl, .csv or .tsv)")
    rows = []
    try:
        for line, fields in records:
            report.seen += 1
            try:
                if isinstance(fields, BadInput):
                    raise fields
                rows.append(_row_from_fields(annotations, line, fields))
            except BadInput as e:
                report.bad(e.reason, line, str(e))
    except UnicodeDecodeError as e:
        raise ValueError(f"{annotations}: not UTF-8 text ({e})") from None
    return rows


# ----------------------------------------------------------------------------------------------- regions


def region_file(regions: str, image_path: str) -> str:
    """`<regions>/<image path without extension>.npz`."""
    return os.path.join(regions, os.path.splitext(image_path)[0] + ".npz")


_NPZ_LOCK = threading.Lock()


def read_regions(path: str) -> dict[str, np.ndarray]:
    """The validated float32 arrays of one regions .npz (features, boxes[, class_probs]); raises BadInput."""
    if not os.path.isfile(path):
        raise BadInput("missing_regions", f"regions file not found: {path}")

    def bad(problem: str):
        return BadInput("bad_regions", f"regions file {path}: {problem}")

    try:
        # np.load parses each array's header with ast.literal_eval, and CPython before 3.11.8 / 3.12.1 corrupts
        # its AST recursion counter when two threads do that at once (gh-106905: "AST constructor recursion depth
        # mismatch"); parallel_map reads region files in threads, so their loads take turns.
        with _NPZ_LOCK, np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise bad("not an .npz archive")
            arrays = {k: npz[k] for k in ("features", "boxes", "class_probs") if k in npz.files}
    except BadInput:
        raise
    except Exception as e:  # zipfile / format / object-array errors
        raise bad(f"cannot read it ({type(e).__name__}: {e})") from None
    for key in ("features", "boxes"):
        if key not in arrays:
            raise bad(f"missing array {key!r}")
    for key, array in arrays.items():
        if array.ndim != 2 or array.dtype.kind != "f":
            raise bad(f"{key} must be a 2-D float array, got {array.dtype} {array.shape}")
        if not np.all(np.isfinite(array)):
            raise bad(f"{key} has non-finite values")
    num = arrays["features"].shape[0]
    if num < 1:
        raise bad("no regions (R = 0)")
    if arrays["boxes"].shape[1] != 4:
        raise bad(f"boxes must be [R, 4], got {arrays['boxes'].shape}")
    for key, array in arrays.items():
        if array.shape[0] != num:
            raise bad(f"{key} has {array.shape[0]} rows, features has {num}")
    boxes = arrays["boxes"]
    if boxes.min() < 0 or boxes.max() > 1:
        raise bad(f"boxes must be normalised to [0, 1] (ymin, xmin, ymax, xmax), got range "
                  f"[{boxes.min()}, {boxes.max()}]")
    if np.any(boxes[:, 0] > boxes[:, 2]) or np.any(boxes[:, 1] > boxes[:, 3]):
        raise bad("boxes must have ymin <= ymax and xmin <= xmax (order: ymin, xmin, ymax, xmax)")
    if "class_probs" in arrays and arrays["class_probs"].min() < 0:
        raise bad("class_probs has negative values")
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def _region_dims(path: str) -> tuple[int, int | None]:
    """(D, C or None) of a valid regions file."""
    arrays = read_regions(path)
    probs = arrays.get("class_probs")
    return arrays["features"].shape[1], None if probs is None else probs.shape[1]


# ----------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Plan:
    """Everything validated before writing: examples per split, region dims, what was skipped."""

    examples: dict[str, list[dict]]  # split -> [{image_id, image_path, captions}] in image_id order
    region_dim: int | None
    class_dim: int | None
    report: SkipReport
    warnings: list[str] = dataclasses.field(default_factory=list)  # printed after the build summary


DEFAULT_EVAL_FRACTION = 0.05
MIN_EVAL_EXAMPLES = 10  # an evaluation split smaller than this gets a warning: its metrics mean little


def check_holdout(eval_fraction: float, eval_count: int | None) -> None:
    """Raises a one-line ValueError for a bad eval_fraction / eval_count or both given."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_count is None:
        return
    if isinstance(eval_count, bool) or not isinstance(eval_count, int) or eval_count < 0:
        raise ValueError(f"eval_count must be an integer >= 0, got {eval_count!r}")
    if eval_fraction != DEFAULT_EVAL_FRACTION:
        raise ValueError(f"give --eval_count ({eval_count}) or --eval_fraction ({eval_fraction}), not both")


def holdout_images(images: list[str], eval_fraction: float, eval_count: int | None = None,
                   what: str = "images") -> set[str]:
    """The images held out as "validation": the `eval_count` (default round(eval_fraction * n), 1..n-1) whose
    sha256 is smallest; an eval_count that leaves nothing to train on is a ValueError."""
    n = len(images)
    if eval_count is not None:
        if eval_count and eval_count >= n:
            raise ValueError(f"eval_count={eval_count} leaves no {what} to train on (there are {n}); give at most "
                             f"{n - 1}")
        count = eval_count
    elif n < 2 or eval_fraction <= 0:
        return set()
    else:
        count = min(n - 1, max(1, round(eval_fraction * n)))
    ranked = sorted(images, key=lambda p: (hashlib.sha256(p.encode("utf-8")).hexdigest(), p))
    return set(ranked[:count])


def small_split_warnings(sizes: dict[str, int], unit: str, held_out: bool) -> list[str]:
    """Warnings for the evaluation splits (all but "train") of fewer than MIN_EVAL_EXAMPLES `unit`s."""
    warnings = []
    for split, n in sizes.items():
        if split == "train" or n >= MIN_EVAL_EXAMPLES:
            continue
        fix = ("hold out more with --eval_count=N" if held_out
               else f"give more rows the split {split!r} (or drop the split column and use --eval_count=N)")
        warnings.append(f"{split} split has {n} {unit}{'s' if n != 1 else ''}: retrieval metrics on it mean little "
                        f"(R@k for k >= {n} is always 1.0; R@1 by chance: {1 / n:.2g}); {fix}")
    return warnings


def plan_image_text(config: "ImageTextConfig") -> Plan:
    """Reads and validates the annotations, images and regions of `config`; raises ValueError on bad input."""
    annotations, images, regions = config.annotations, config.images, config.regions
    if not os.path.isfile(annotations):
        raise ValueError(f"annotation file not found: {annotations}")
    if not os.path.isdir(images):
        raise ValueError(f"image folder not found: {images}")
    if regions is not None and not os.path.isdir(regions):
        raise ValueError(f"regions folder not found: {regions}")
    check_holdout(config.eval_fraction, config.eval_count)
    report = SkipReport(source=annotations, skip_bad=config.skip_bad)
    rows = read_rows(annotations, report)
    # Ids come from every path a row names, before images are checked: skipping a file never renumbers the rest.
    paths = sorted({r.image for r in rows})
    image_ids = {p: i for i, p in enumerate(paths)}

    problems = dict(zip(paths, parallel_map(lambda p: check_image(os.path.join(images, p)), paths)))
    region_dim = class_dim = None
    if regions is not None:
        good = [p for p in paths if problems[p] is None]
        first = None
        for path, dims in zip(good, parallel_map(lambda p: _region_dims(region_file(regions, p)), good)):
            if isinstance(dims, BadInput):
                problems[path] = dims
            elif first is None:
                first, (region_dim, class_dim) = path, dims
            elif dims != (region_dim, class_dim):
                problems[path] = BadInput("bad_regions", (
                    f"regions file {region_file(regions, path)}: (D, C) = {dims} differs from "
                    f"{(region_dim, class_dim)} of {region_file(regions, first)} (C = None: no class_probs)"))

    kept = []
    for row in rows:
        problem = problems[row.image]
        if problem is None:
            kept.append(row)
        else:
            report.bad(problem.reason, row.line, f"{annotations}, line {row.line}: {problem}")
    report.check()  # every bad row at once, in file order (unless skipping them)
    if not kept:
        raise ValueError(f"{annotations}: no valid rows; {report.summary()}")

    held = all(r.split is None for r in kept)
    if held:
        held_out = holdout_images(sorted({r.image for r in kept}), config.eval_fraction, config.eval_count)
        split_of = lambda r: "validation" if r.image in held_out else "train"  # noqa: E731
    elif config.eval_count is not None:
        raise ValueError(f"{annotations}: rows name their splits, so nothing is held out; drop --eval_count or the "
                         f"split column")
    else:
        split_of = lambda r: r.split or "train"  # noqa: E731
    captions: dict[str, dict[str, list[str]]] = {}
    for row in kept:
        captions.setdefault(split_of(row), {}).setdefault(row.image, []).append(row.caption)
    examples = {
        split: [{"image_id": image_ids[p], "image_path": p, "captions": by_image[p]}
                for p in sorted(by_image, key=image_ids.__getitem__)]
        for split, by_image in sorted(captions.items())}
    warnings = small_split_warnings({s: len(e) for s, e in examples.items()}, "image", held)
    return Plan(examples=examples, region_dim=region_dim, class_dim=class_dim, report=report, warnings=warnings)


# ----------------------------------------------------------------------------------------------- builder


@dataclasses.dataclass(eq=False)
class ImageTextConfig(tfds.core.BuilderConfig):
    """Where one user dataset's files are and how to build it (the config name names the dataset)."""

    annotations: str = ""
    images: str = ""
    regions: str | None = None
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    eval_count: int | None = None  # hold out exactly this many images (instead of eval_fraction)
    skip_bad: bool = False
    tokenizer_vocab_size: int = 8000


class MmjaxImageText(LocalBuilder):
    """Images + captions (+ precomputed region features) from local files; pass config=ImageTextConfig(...)."""

    def _make_plan(self) -> Plan:
        if not isinstance(self.builder_config, ImageTextConfig):
            raise ValueError("MmjaxImageText needs config=ImageTextConfig(name=..., annotations=..., images=...)")
        return plan_image_text(self.builder_config)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(),
            "image_id": np.int64,
            "image_path": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }
        config = self.builder_config
        if isinstance(config, ImageTextConfig) and config.regions is not None:
            plan = self.plan()
            features["region_features"] = tfds.features.Tensor(shape=(None, plan.region_dim), dtype=np.float32)
            features["region_boxes"] = tfds.features.Tensor(shape=(None, 4), dtype=np.float32)
            if plan.class_dim is not None:
                features["region_class_probs"] = tfds.features.Tensor(shape=(None, plan.class_dim),
                                                                      dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Images and captions from local files (see mmjax/data/image_text.py).",
            features=tfds.features.FeaturesDict(features),
            # Write examples in image_id order: reproducible files.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is on local disk
        return {split: self._generate_examples(split) for split in self.plan().examples}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        for ex in self.plan().examples[split]:
            features = dict(ex, image=os.path.join(config.images, ex["image_path"]))  # stored as the file's bytes
            if config.regions is not None:
                arrays = read_regions(region_file(config.regions, ex["image_path"]))
                features["region_features"] = arrays["features"]
                features["region_boxes"] = arrays["boxes"]
                if "class_probs" in arrays:
                    features["region_class_probs"] = arrays["class_probs"]
            yield ex["image_id"], features

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        plan = self.plan()
        with deterministic_serialization():
            super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        # self.data_dir is the temporary build dir here; tfds renames it into place only if we succeed.
        config = self.builder_config
        if config.tokenizer_vocab_size:
            from mmjax.data.tokenizer import train_wordpiece  # pylint: disable=import-outside-toplevel

            texts_split = "train" if "train" in plan.examples else None
            texts = [c for split, exs in plan.examples.items() if texts_split in (None, split)
                     for ex in exs for c in ex["captions"]]
            train_wordpiece(texts, self.data_dir, vocab_size=config.tokenizer_vocab_size)
        if config.skip_bad:
            write_json(os.path.join(self.data_dir, "skipped.json"), plan.report.to_json())
        counts = ", ".join(f"{s} {len(e)}" for s, e in plan.examples.items())
        summary = f"{self.name}/{config.name}: images per split: {counts}; {plan.report.summary()}"
        logging.info(summary)
        print(summary)
        print_warnings(plan.warnings)


def build_image_text(annotations: str, images: str, out_dir: str, *, name: str | None = None,
                     regions: str | None = None, eval_fraction: float = DEFAULT_EVAL_FRACTION,
                     eval_count: int | None = None, skip_bad: bool = False, tokenizer_vocab_size: int = 8000,
                     file_format: str = "tfrecord", num_shards: int | None = None) -> str:
    """Builds (or rebuilds) the `mmjax_image_text/<name>` dataset under `out_dir`; returns the prepared directory.

    `name` defaults to the annotation file's stem; see the module docstring for the file formats and the holdout
    (`eval_fraction`, or exactly `eval_count` images; not both). `file_format`
    is "tfrecord" or "array_record" (random access: exact resume without re-reading); `num_shards` fixes the
    number of files per split (default: TFDS sizes them); every split needs at least that many examples.
    """
    if tokenizer_vocab_size < 0:
        raise ValueError(f"tokenizer_vocab_size must be >= 0, got {tokenizer_vocab_size}")
    check_holdout(float(eval_fraction), eval_count)  # before tfds logs the config it is handed
    config = ImageTextConfig(
        name=sanitize_name(name or os.path.splitext(os.path.basename(annotations))[0]),
        description=f"captions: {os.path.abspath(annotations)}, images: {os.path.abspath(images)}"
                    + (f", regions: {os.path.abspath(regions)}" if regions else ""),
        annotations=os.path.abspath(annotations), images=os.path.abspath(images),
        regions=None if regions is None else os.path.abspath(regions), eval_fraction=float(eval_fraction),
        eval_count=eval_count, skip_bad=skip_bad, tokenizer_vocab_size=int(tokenizer_vocab_size))
    builder = MmjaxImageText(config=config, data_dir=out_dir, file_format=check_file_format(file_format))
    builder.plan()  # validate everything before tfds creates any directory
    return prepare(builder, num_shards=num_shards)


FILE_FORMATS = ("tfrecord", "array_record")


def check_file_format(file_format: str) -> str:
    """`file_format` if the streaming reader reads it, else a ValueError naming the ones it reads."""
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {', '.join(FILE_FORMATS)}; got {file_format!r}")
    return file_format


def prepare(builder: tfds.core.DatasetBuilder, num_shards: int | None = None) -> str:
    """Builds `builder` from scratch (replacing an earlier build) and returns its prepared directory."""
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    # The default mode would silently reuse an earlier build of the same name; a user rebuilding after fixing
    # their files wants the new data.
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode,
                                                                              num_shards=num_shards))
    # tfds makes <out_dir>/downloads/extracted even when nothing is downloaded; drop them if they stayed empty.
    downloads = os.path.join(os.fspath(builder.data_dir_root), "downloads")
    for folder in (os.path.join(downloads, "extracted"), downloads):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    return os.fspath(builder.data_dir)
