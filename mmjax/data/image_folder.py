"""`mmjax_image_folder`: a TFDS builder for labelled images in one folder per class, offline (zero-shot data).

    my_pets/cat/001.jpg, my_pets/dog/7.png, ...                   every image in "test"
    my_pets/train/cat/001.jpg, my_pets/test/dog/7.png, ...        splits from the top folders

    path = build_image_folder("my_pets", "my_pets_tfds")
    # or: python -m mmjax.data.build image_folder --images=my_pets --out=my_pets_tfds

Folders whose names are splits (train, validation, test) hold the splits; otherwise the whole tree is the "test"
split (zero-shot data is for evaluation). Each class is a folder (its name, with "_" read as a space, is the class
name; nesting below it is allowed); classes are sorted by folder name and must be the same in every split. Images
are checked (fully decoded with PIL) before anything is written; a bad one stops the build naming the file.

Features: `image` (the file's bytes), `image_id` (position in the split, files sorted), `label` (ClassLabel over
the class names), `image_path` (relative to the class folder's split). Read it as a source of kind "image_label"
(`sources.source_config(dir=..., kind="image_label", label_key="label", prompts=...)`): its examples' text is their
class name, and the zero-shot evaluator classifies its images.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

from mmjax.data import image_text as it  # first: it sets TF_CPP_MIN_LOG_LEVEL before TF loads
from mmjax.data.local_builder import LocalBuilder

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

SPLIT_FOLDERS = ("train", "validation", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """Where the class folders are (the config name names the dataset)."""

    images: str = ""


@dataclasses.dataclass
class Plan:
    """The checked examples of every split, and the class folders."""

    classes: list[str]
    examples: dict[str, list[dict]]


def _class_images(folder: str) -> dict[str, list[str]]:
    """class folder -> its image files (relative to `folder`, sorted)."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    out = {}
    for name in classes:
        files = []
        for root, _, names in os.walk(os.path.join(folder, name)):
            files += [os.path.relpath(os.path.join(root, n), folder) for n in names
                      if n.lower().endswith(IMAGE_SUFFIXES)]
        out[name] = sorted(files)
    return out


def plan_image_folder(images: str) -> Plan:
    """Reads and checks the folder tree; raises ValueError naming the problem."""
    if not os.path.isdir(images):
        raise ValueError(f"no such directory: {images}")
    top = sorted(d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d)))
    split_dirs = [d for d in top if d in SPLIT_FOLDERS]
    if split_dirs and len(split_dirs) != len(top):
        raise ValueError(f"{images}: mixes split folders {split_dirs} with other folders "
                         f"{sorted(set(top) - set(split_dirs))}")
    layout = {s: os.path.join(images, s) for s in split_dirs} if split_dirs else {"test": images}
    per_split = {s: _class_images(d) for s, d in layout.items()}
    classes = sorted(next(iter(per_split.values())))
    if len(classes) < 2:
        raise ValueError(f"{images}: needs at least 2 class folders, found {classes}")
    examples = {}
    for split, by_class in per_split.items():
        if sorted(by_class) != classes:
            raise ValueError(f"{layout[split]}: classes {sorted(by_class)} differ from {classes}")
        files = [(os.path.join(layout[split], f), f, classes.index(c)) for c in classes for f in by_class[c]]
        empty = [c for c in classes if not by_class[c]]
        if empty:
            raise ValueError(f"{layout[split]}: class folders without images: {empty}")
        problems = it.parallel_map(lambda x: it.check_image(x[0]), files)
        for (path, _, _), problem in zip(files, problems):
            if problem is not None:
                raise ValueError(f"{path}: {problem}")
        examples[split] = [dict(path=path, image_path=rel, label=label, image_id=i)
                           for i, (path, rel, label) in enumerate(files)]
    return Plan(classes=classes, examples=examples)


class MmjaxImageFolder(LocalBuilder):
    """Labelled images, one folder per class; pass config=ImageFolderConfig(name=..., images=...)."""

    def _make_plan(self) -> Plan:
        if not isinstance(self.builder_config, ImageFolderConfig):
            raise ValueError("MmjaxImageFolder needs config=ImageFolderConfig(name=..., images=...)")
        return plan_image_folder(self.builder_config.images)

    def _info(self) -> tfds.core.DatasetInfo:
        names = [c.replace("_", " ") for c in self.plan().classes] if isinstance(
            self.builder_config, ImageFolderConfig) else None
        return tfds.core.DatasetInfo(
            builder=self,
            description="Labelled images, one folder per class (see mmjax/data/image_folder.py).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "image_id": np.int64,
                "label": tfds.features.ClassLabel(names=names) if names else tfds.features.ClassLabel(num_classes=2),
                "image_path": tfds.features.Text(),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is on local disk
        return {split: self._generate_examples(split) for split in self.plan().examples}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        for ex in self.plan().examples[split]:
            yield ex["image_id"], {"image": ex["path"], "image_id": ex["image_id"], "label": ex["label"],
                                   "image_path": ex["image_path"]}

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        with it.deterministic_serialization():
            super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        plan = self.plan()
        counts = ", ".join(f"{s} {len(e)}" for s, e in plan.examples.items())
        summary = f"{self.name}/{self.builder_config.name}: {len(plan.classes)} classes; images per split: {counts}"
        logging.info(summary)
        print(summary)


def build_image_folder(images: str, out_dir: str, *, name: str | None = None, file_format: str = "tfrecord",
                       num_shards: int | None = None) -> str:
    """Builds (or rebuilds) `mmjax_image_folder/<name>` under `out_dir` from class folders; returns its directory."""
    images = os.path.abspath(images)
    config = ImageFolderConfig(name=it.sanitize_name(name or os.path.basename(images.rstrip("/"))),
                               description=f"class folders: {images}", images=images)
    builder = MmjaxImageFolder(config=config, data_dir=out_dir, file_format=it.check_file_format(file_format))
    builder.plan()  # validate everything before tfds creates any directory
    return it.prepare(builder, num_shards=num_shards)
