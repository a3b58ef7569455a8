"""`mmjax_audio_text`: a TFDS builder that turns your own folder of audio clips + an annotation file into a dataset.

    path = build_audio_text("my_data/captions.jsonl", "my_data/audio", "my_data/tfds", images="my_data/images")
    ds = tfds.builder_from_directory(path).as_dataset(split="train")

or from the shell: `python -m mmjax.data.build audio_text --annotations=... --audio=... --out=... [--images=...]`.

Annotation file (UTF-8), one caption (transcript) per row; several rows may name the same clip (several captions
per clip: one example per distinct clip and split, its captions in file order):

* `.jsonl`: one JSON object per line, `{"audio": "a/x.wav", "caption": "a dog barks", "split": "train",
  "image": "x.jpg", "label": "dog"}`; only `audio` and `caption` are required; other keys are ignored.
* `.csv` / `.tsv`: a header row with `audio` and `caption` columns and optionally `split`, `image`, `label`; an
  empty `split` / `image` / `label` cell means the field is absent.

Rows, line numbers, split names and path rules are those of `mmjax.data.image_text` (audio paths are relative to
the `audio` folder, image paths to the `images` folder; `..` may not leave them). Audio may be in any format
soundfile (libsndfile) reads: WAV, FLAC, OGG/Vorbis, MP3, ... Every clip is decoded at build time with
`mmjax.data.audio.read_audio`: converted to mono float at `sample_rate` (soxr resampling when the file's rate
differs), and a corrupt, empty, unsupported, too short (< `min_seconds`) or multi-channel file (without `downmix`,
which averages the channels) fails the build, not a training run. Clips are stored as int16 PCM.

Images (`images=DIR`): every row then needs an `image`, checked like image_text's (fully decoded with PIL), and
stored as the file's bytes; a clip given different images in two rows is an error. Without `images` the `image`
field is ignored. Labels: if any row has a `label`, every row needs one; the label strings (sorted) become the
ClassLabel `label`; a clip given different labels in two rows is an error.

Splits: the `split` values; rows without one go to "train" if some other row has one. If no row has a split, a
deterministic `eval_fraction` (or exactly `eval_count`) is held out as "validation" exactly as image_text does (the
round(eval_fraction * n) smallest sha256 of the paths), counting images when there are images (so every clip of a
held-out image is held out with it: no image is both trained on and retrieved in evaluation) and clips otherwise;
an evaluation split of fewer than 10 images (clips) gets a warning.

Features of one example (= one clip in one split), written in audio_id order:

* `audio`: int16 [samples] at `sample_rate` (stored as raw little-endian bytes: 2 bytes a sample; tfds' default
  int64 varints would take ~5.5);
* `audio_id`: int64, the index of the clip's path in the sorted list of all distinct audio paths in the file
  (stable: it does not depend on the splits or on which rows were skipped);
* `audio_path`: the normalised relative path; `captions`: its captions in this split, in file order;
* with `images`: `image` (the file's bytes, decoded to uint8 [H, W, 3] when read), `image_id` (index in the sorted
  distinct image paths) and `image_path`; with labels: `label` (ClassLabel).

Bad rows are all listed in one ValueError, in file order (as image_text does), each naming the annotation file,
the line and the offending file or value; with `skip_bad=True` bad rows are counted per reason (bad_row,
empty_caption, missing_audio, bad_audio, missing_image, corrupt_image, unsupported_image, conflicting_image,
conflicting_label), listed the same way in the summary and written to `skipped.json`.

Prepared dataset directory `<out_dir>/mmjax_audio_text/<name>/1.0.0/`: `dataset_info.json`, `features.json`, the
record files, the WordPiece tokenizer trained on the train captions (`tokenizer.json` + `vocab.txt`) and, with
`skip_bad`, `skipped.json`. The build is deterministic (the same inputs give the same record bytes) and building
again under the same name replaces the dataset. Read it as a data source of kind "audio_text", or
"audio_image_text" with images (`sources.source_config(dir=..., kind=..., eval_split="validation")`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Callable, Iterable, Iterator, TypeVar

from mmjax.data import image_text as it  # first: it sets TF_CPP_MIN_LOG_LEVEL before TF loads
from mmjax.data.audio import AudioError, read_audio, to_int16
from mmjax.data.local_builder import LocalBuilder

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

_T = TypeVar("_T")
_R = TypeVar("_R")
_OPTIONAL = ("split", "image", "label")


# ----------------------------------------------------------------------------------------------- audio features


def audio_feature(sample_rate: int) -> tfds.features.Audio:
    """The `audio` feature: mono int16 samples at `sample_rate`, stored as raw bytes (decoded back to int16)."""
    # Encoding.NONE would write int64 varints: every negative sample takes 10 bytes (~5.5 bytes a sample).
    return tfds.features.Audio(shape=(None,), dtype=np.int16, sample_rate=sample_rate, encoding="bytes")


def audio_value(waveform: np.ndarray) -> np.ndarray:
    """What `_generate_examples` yields for an `audio_feature`: the int16 samples' little-endian bytes."""
    # tfds' Audio.encode_example passes an array through without applying the feature's encoding, so we hand it
    # the already-encoded value (a 0-d object array of bytes, as Tensor.encode_example would produce).
    samples = np.asarray(waveform)
    if samples.ndim != 1 or samples.dtype != np.int16:
        raise ValueError(f"audio must be a 1-D int16 waveform, got {samples.dtype} {samples.shape}")
    return np.asarray(samples.astype("<i2").tobytes(), dtype=object)


def ordered_chunks(fn: Callable[[_T], _R], items: Iterable[_T], *, workers: int | None = None,
                   chunk: int = 256) -> Iterator[_R]:
    """fn over items in threads, yielded in order; at most `chunk` results are held at once (waveforms are big)."""
    items = list(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        for start in range(0, len(items), chunk):
            yield from pool.map(fn, items[start: start + chunk])


# ----------------------------------------------------------------------------------------------- annotations


@dataclasses.dataclass(frozen=True)
class AudioRow:
    """One parsed annotation row."""

    line: int
    audio: str  # normalised path relative to the audio folder
    caption: str
    split: str | None
    image: str | None  # normalised path relative to the image folder (only read with images)
    label: str | None


def _optional_str(where: str, fields: dict, key: str) -> str | None:
    """A stripped optional string field (absent, null and "" are None); raises BadInput for a non-string."""
    value = fields.get(key)
    if value is not None and not isinstance(value, str):
        raise it.BadInput("bad_row", f"{where}: field {key!r} must be a string, got {value!r}")
    return (value or "").strip() or None


def _row_from_fields(source: str, line: int, fields: dict, with_images: bool) -> AudioRow:
    """Validates one row's fields; raises BadInput."""
    where = f"{source}, line {line}"
    for key in ("audio", "caption") + (("image",) if with_images else ()):
        if key not in fields or fields[key] is None or fields[key] == "":
            raise it.BadInput("bad_row", f"{where}: missing field {key!r} in {fields!r}")
        if not isinstance(fields[key], str):
            raise it.BadInput("bad_row", f"{where}: field {key!r} must be a string, got {fields[key]!r}")
    audio = it._norm_image_path(fields["audio"].strip()) if fields["audio"].strip() else None
    if audio is None:
        raise it.BadInput("bad_row", f"{where}: audio must be a path relative to the audio folder, got "
                                     f"{fields['audio']!r}")
    caption = fields["caption"].strip()
    if not caption:
        raise it.BadInput("empty_caption", f"{where}: empty caption {fields['caption']!r} for audio {audio!r}")
    split = _optional_str(where, fields, "split")
    if split is not None and (not it._SPLIT_NAME.match(split) or split.lower() == "all"):
        raise it.BadInput("bad_row", f"{where}: bad split name {split!r} (letters, digits and _; not 'all')")
    image = None
    if with_images:
        image = it._norm_image_path(fields["image"].strip()) if fields["image"].strip() else None
        if image is None:
            raise it.BadInput("bad_row", f"{where}: image must be a path relative to the image folder, got "
                                         f"{fields['image']!r}")
    label = _optional_str(where, fields, "label")
    return AudioRow(line=line, audio=audio, caption=caption, split=split, image=image, label=label)


def read_audio_rows(annotations: str, report: it.SkipReport, with_images: bool) -> list[AudioRow]:
    """The valid rows of a .jsonl / .csv / .tsv annotation file (bad ones raise or go to `report`)."""
    ext = os.path.splitext(annotations)[1].lower()
    if ext == ".jsonl":
        records = it._jsonl_fields(annotations)
    elif ext in (".csv", ".tsv"):
        required = ("audio", "caption") + (("image",) if with_images else ())
        records = it._csv_fields(annotations, "\t" if ext == ".tsv" else ",", required=required)
    else:
        raise ValueError(f"{annotations}: unknown annotation format {ext!r} (use .jsonl, .csv or .tsv)")
    rows = []
    try:
        for line, fields in records:
            report.seen += 1
            try:
                if isinstance(fields, it.BadInput):
                    raise fields
                rows.append(_row_from_fields(annotations, line, fields, with_images))
            except it.BadInput as e:
                report.bad(e.reason, line, str(e))
    except UnicodeDecodeError as e:
        raise ValueError(f"{annotations}: not UTF-8 text ({e})") from None
    return rows


def _consistent_rows(annotations: str, rows: list[AudioRow], report: it.SkipReport) -> list[AudioRow]:
    """Rows whose clip has one image and one label throughout (the first row decides); labels all or none."""
    labelled = any(r.label is not None for r in rows)
    first: dict[str, AudioRow] = {}
    kept = []
    for row in rows:
        where = f"{annotations}, line {row.line}"
        if labelled and row.label is None:
            report.bad("bad_row", row.line, f"{where}: missing field 'label' (other rows have labels)")
            continue
        seen = first.setdefault(row.audio, row)
        if row.image != seen.image:
            report.bad("conflicting_image", row.line, f"{where}: audio {row.audio!r} has image {row.image!r} "
                                                      f"here but {seen.image!r} on line {seen.line}")
        elif row.label != seen.label:
            report.bad("conflicting_label", row.line, f"{where}: audio {row.audio!r} has label {row.label!r} "
                                                      f"here but {seen.label!r} on line {seen.line}")
        else:
            kept.append(row)
    return kept


# ----------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Plan:
    """Everything validated before writing: examples per split, label names, clip lengths, what was skipped."""

    examples: dict[str, list[dict]]  # split -> [{audio_id, audio_path, captions[, image_*][, label]}], by audio_id
    labels: tuple[str, ...] | None
    num_samples: dict[str, int]  # audio path -> samples at the sample rate (for the summary)
    report: it.SkipReport
    warnings: list[str] = dataclasses.field(default_factory=list)  # printed after the build summary


def _check_audio(path: str, config: "AudioTextConfig") -> int:
    """Decodes one clip as the build will; returns its length in samples; raises BadInput."""
    if not os.path.isfile(path):
        raise it.BadInput("missing_audio", f"audio file not found: {path}")
    try:
        return len(_decode(path, config))
    except AudioError as e:
        raise it.BadInput("bad_audio", str(e)) from None


def _decode(path: str, config: "AudioTextConfig") -> np.ndarray:
    """One clip as stored: int16 mono at the config's sample rate; raises AudioError."""
    min_samples = max(1, round(config.min_seconds * config.sample_rate))
    return to_int16(read_audio(path, sample_rate=config.sample_rate, downmix=config.downmix,
                               min_samples=min_samples))


def plan_audio_text(config: "AudioTextConfig") -> Plan:
    """Reads and validates the annotations, audio and images of `config`; raises ValueError on bad input."""
    annotations = config.annotations
    if not os.path.isfile(annotations):
        raise ValueError(f"annotation file not found: {annotations}")
    for what, folder in (("audio", config.audio), ("image", config.images)):
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"{what} folder not found: {folder}")
    it.check_holdout(config.eval_fraction, config.eval_count)
    if config.sample_rate < 1 or config.min_seconds < 0:
        raise ValueError(f"need sample_rate >= 1 and min_seconds >= 0, got {config.sample_rate}, "
                         f"{config.min_seconds}")
    with_images = config.images is not None
    report = it.SkipReport(source=annotations, skip_bad=config.skip_bad)
    rows = read_audio_rows(annotations, report, with_images)
    # Ids come from every path a row names, before files are checked: skipping one never renumbers the rest.
    audio_ids = {p: i for i, p in enumerate(sorted({r.audio for r in rows}))}
    image_ids = {p: i for i, p in enumerate(sorted({r.image for r in rows if r.image is not None}))}
    rows = _consistent_rows(annotations, rows, report)

    paths = sorted({r.audio for r in rows})
    lengths = dict(zip(paths, it.parallel_map(lambda p: _check_audio(os.path.join(config.audio, p), config),
                                              paths)))
    image_problems = {}
    if with_images:
        images = sorted({r.image for r in rows})
        image_problems = dict(zip(images, it.parallel_map(lambda p: it.check_image(os.path.join(config.images, p)),
                                                          images)))
    kept = []
    for row in rows:
        problem = lengths[row.audio] if isinstance(lengths[row.audio], it.BadInput) else image_problems.get(row.image)
        if problem is None:
            kept.append(row)
        else:
            report.bad(problem.reason, row.line, f"{annotations}, line {row.line}: {problem}")
    report.check()  # every bad row at once, in file order (unless skipping them)
    if not kept:
        raise ValueError(f"{annotations}: no valid rows; {report.summary()}")

    held = all(r.split is None for r in kept)
    # Counted in images when there are images: retrieval between clips and images ranks the distinct images.
    key = (lambda r: r.image) if with_images else (lambda r: r.audio)
    unit = "image" if with_images else "clip"
    if held:
        held_out = it.holdout_images(sorted({key(r) for r in kept}), config.eval_fraction, config.eval_count,
                                     what=unit + "s")
        split_of = lambda r: "validation" if key(r) in held_out else "train"  # noqa: E731
    elif config.eval_count is not None:
        raise ValueError(f"{annotations}: rows name their splits, so nothing is held out; drop --eval_count or the "
                         f"split column")
    else:
        split_of = lambda r: r.split or "train"  # noqa: E731
    labels = tuple(sorted({r.label for r in kept})) if kept[0].label is not None else None
    by_split: dict[str, dict[str, dict]] = {}
    for row in kept:
        ex = by_split.setdefault(split_of(row), {}).setdefault(row.audio, {
            "audio_id": audio_ids[row.audio], "audio_path": row.audio, "captions": []})
        ex["captions"].append(row.caption)
        if with_images:
            ex.update(image_id=image_ids[row.image], image_path=row.image)
        if labels is not None:
            ex["label"] = row.label
    examples = {split: sorted(exs.values(), key=lambda e: e["audio_id"]) for split, exs in sorted(by_split.items())}
    num_samples = {p: n for p, n in lengths.items() if not isinstance(n, it.BadInput)}
    sizes: dict[str, set] = {}
    for row in kept:
        sizes.setdefault(split_of(row), set()).add(key(row))
    warnings = it.small_split_warnings({s: len(v) for s, v in sorted(sizes.items())}, unit, held)
    return Plan(examples=examples, labels=labels, num_samples=num_samples, report=report, warnings=warnings)


# ----------------------------------------------------------------------------------------------- builder


@dataclasses.dataclass(eq=False)
class AudioTextConfig(tfds.core.BuilderConfig):
    """Where one user dataset's files are and how to build it (the config name names the dataset)."""

    annotations: str = ""
    audio: str = ""
    images: str | None = None
    sample_rate: int = 16000
    downmix: bool = False
    min_seconds: float = 0.025
    eval_fraction: float = it.DEFAULT_EVAL_FRACTION
    eval_count: int | None = None  # hold out exactly this many images (without images: clips)
    skip_bad: bool = False
    tokenizer_vocab_size: int = 8000


class MmjaxAudioText(LocalBuilder):
    """Audio clips + captions (+ images, labels) from local files; pass config=AudioTextConfig(...)."""

    def _make_plan(self) -> Plan:
        if not isinstance(self.builder_config, AudioTextConfig):
            raise ValueError("MmjaxAudioText needs config=AudioTextConfig(name=..., annotations=..., audio=...)")
        return plan_audio_text(self.builder_config)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        sample_rate = config.sample_rate if isinstance(config, AudioTextConfig) else None
        features = {
            "audio": audio_feature(sample_rate),
            "audio_id": np.int64,
            "audio_path": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }
        if isinstance(config, AudioTextConfig):
            if config.images is not None:
                features.update(image=tfds.features.Image(), image_id=np.int64, image_path=tfds.features.Text())
            labels = self.plan().labels
            if labels is not None:
                features["label"] = tfds.features.ClassLabel(names=labels)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Audio clips and captions from local files (see mmjax/data/audio_text.py).",
            features=tfds.features.FeaturesDict(features),
            # Write examples in audio_id order: reproducible files.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is on local disk
        return {split: self._generate_examples(split) for split in self.plan().examples}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        examples = self.plan().examples[split]
        # Decoded again (in threads) rather than kept from the plan: a large dataset's waveforms don't fit in memory.
        waves = ordered_chunks(lambda ex: _decode(os.path.join(config.audio, ex["audio_path"]), config), examples)
        for ex, wave in zip(examples, waves):
            features = dict(ex, audio=audio_value(wave))
            if "image_path" in ex:
                features["image"] = os.path.join(config.images, ex["image_path"])  # stored as the file's bytes
            yield ex["audio_id"], features

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        plan = self.plan()
        with it.deterministic_serialization():
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
            it.write_json(os.path.join(self.data_dir, "skipped.json"), plan.report.to_json())
        counts = ", ".join(f"{s} {len(e)}" for s, e in plan.examples.items())
        hours = sum(plan.num_samples[ex["audio_path"]] for exs in plan.examples.values() for ex in exs)
        hours /= 3600 * config.sample_rate
        summary = (f"{self.name}/{config.name}: clips per split: {counts} ({hours:.2f} h at {config.sample_rate} "
                   f"Hz); {plan.report.summary()}")
        logging.info(summary)
        print(summary)
        it.print_warnings(plan.warnings)


def build_audio_text(annotations: str, audio_dir: str, out_dir: str, *, images: str | None = None,
                     name: str | None = None, sample_rate: int = 16000, downmix: bool = False,
                     eval_fraction: float = it.DEFAULT_EVAL_FRACTION, eval_count: int | None = None,
                     skip_bad: bool = False, tokenizer_vocab_size: int = 8000, file_format: str = "tfrecord",
                     num_shards: int | None = None, min_seconds: float = 0.025) -> str:
    """Builds (or rebuilds) the `mmjax_audio_text/<name>` dataset under `out_dir`; returns the prepared directory.

    `name` defaults to the annotation file's stem; see the module docstring for the formats and the checks.
    """
    if tokenizer_vocab_size < 0:
        raise ValueError(f"tokenizer_vocab_size must be >= 0, got {tokenizer_vocab_size}")
    it.check_holdout(float(eval_fraction), eval_count)  # before tfds logs the config it is handed
    config = AudioTextConfig(
        name=it.sanitize_name(name or os.path.splitext(os.path.basename(annotations))[0]),
        description=f"captions: {os.path.abspath(annotations)}, audio: {os.path.abspath(audio_dir)}"
                    + (f", images: {os.path.abspath(images)}" if images else ""),
        annotations=os.path.abspath(annotations), audio=os.path.abspath(audio_dir),
        images=None if images is None else os.path.abspath(images), sample_rate=int(sample_rate),
        downmix=bool(downmix), min_seconds=float(min_seconds), eval_fraction=float(eval_fraction),
        eval_count=eval_count, skip_bad=skip_bad, tokenizer_vocab_size=int(tokenizer_vocab_size))
    builder = MmjaxAudioText(config=config, data_dir=out_dir, file_format=it.check_file_format(file_format))
    builder.plan()  # validate everything before tfds creates any directory
    return it.prepare(builder, num_shards=num_shards)
