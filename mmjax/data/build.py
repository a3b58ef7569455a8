"""Builds TFDS datasets from your own files, offline; prints the prepared dataset directory.

    python -m mmjax.data.build image_text --annotations=my_data/captions.jsonl --images=my_data/images \\
        --out=my_data/tfds [--name=NAME] [--regions=DIR] [--eval_fraction=0.05 | --eval_count=N] [--skip_bad] \\
        [--tokenizer_vocab_size=8000]
    python -m mmjax.data.build vqa --train=QUESTIONS.json,ANNOTATIONS.json,IMAGE_DIR[,PATTERN] \\
        [--validation=...] [--test=QUESTIONS.json,,IMAGE_DIR,PATTERN] --out=DIR [--name=vqa] \\
        [--vocab_size=3129] [--answer_vocab=FILE] [--skip_bad] [--tokenizer_vocab_size=8000]
    python -m mmjax.data.build easy_vqa --out=DIR [--limit=N]
    python -m mmjax.data.build image_folder --images=CLASS_FOLDERS --out=DIR [--name=NAME]
    python -m mmjax.data.build audio_text --annotations=my_data/captions.jsonl --audio=my_data/audio \\
        --out=my_data/tfds [--images=DIR] [--name=NAME] [--sample_rate=16000] [--downmix] \\
        [--eval_fraction=0.05 | --eval_count=N] [--skip_bad] [--tokenizer_vocab_size=8000]

`image_text` is `mmjax.data.image_text.build_image_text` and `vqa` is `mmjax.data.vqa.build_vqa` (their module
docstrings document the file formats). A vqa split is "questions,annotations,image folder[,image pattern]"; leave
the annotations empty for a split without answers; the pattern defaults to VQAv2's
"COCO_{coco_split}_{image_id:012d}.jpg". `easy_vqa` writes the easy-vqa package's train and test splits as
VQAv2 files into `<out>/easy_vqa_files/` (first `limit` questions of each) and builds them as dataset "easy_vqa".
`image_folder` is `mmjax.data.image_folder.build_image_folder`: labelled images, one folder per class (zero-shot
classification data). `audio_text` is `mmjax.data.audio_text.build_audio_text`: audio clips (any format libsndfile
reads, resampled to --sample_rate, stored as int16) with captions / transcripts, optionally an image and a label
per clip; --downmix averages multi-channel clips (otherwise they are bad input). Without a split column, image_text
and audio_text hold out --eval_fraction of the images (clips) as validation, or exactly --eval_count of them, and
warn when that is fewer than 10.

Output: the prepared dataset directory (open it with `tfds.builder_from_directory`), the examples per split, the
skip summary and warnings (a tiny evaluation split). Bad input prints `error: <message>` on stderr and exits with
status 2; bad rows are all listed in that message (the first 20 per file, in file order).

Every command also takes `--file_format=tfrecord|array_record` (ArrayRecord files are read by random access:
a resumed run needs no re-reading and each epoch is a full permutation) and `--num_shards=N` (files per split;
by default TFDS sizes them, ~64 MB+; every split needs at least N examples; any number of files works with any
number of hosts).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from mmjax import cli, cli_logging
from mmjax.data import audio_text, image_folder, image_text, vqa

import tensorflow_datasets as tfds
from absl import app, flags

COMMANDS = ("image_text", "vqa", "easy_vqa", "image_folder", "audio_text")
VQA_SPLITS = ("train", "validation", "test")


def parse_vqa_split(spec: str) -> dict:
    """"QUESTIONS,ANNOTATIONS,IMAGE_DIR[,PATTERN]" -> a `build_vqa` split dict (empty ANNOTATIONS: none)."""
    parts = spec.split(",", 3)
    if len(parts) < 3 or not parts[0] or not parts[2]:
        raise ValueError(f"expected QUESTIONS.json,ANNOTATIONS.json,IMAGE_DIR[,PATTERN], got {spec!r}")
    files = {"questions": parts[0], "annotations": parts[1] or None, "images": parts[2]}
    if len(parts) == 4 and parts[3]:
        files["image_pattern"] = parts[3]
    return files


def run(command: str, values: dict) -> str:
    """Builds the dataset of `command` from flag `values`; returns the prepared directory."""
    if not values.get("out"):
        raise ValueError("--out is required")
    storage = dict(file_format=values["file_format"], num_shards=values.get("num_shards"))
    if command == "image_text":
        for key in ("annotations", "images"):
            if not values.get(key):
                raise ValueError(f"--{key} is required")
        return image_text.build_image_text(
            values["annotations"], values["images"], values["out"], name=values.get("name"),
            regions=values.get("regions"), eval_fraction=values["eval_fraction"],
            eval_count=values.get("eval_count"), skip_bad=values["skip_bad"],
            tokenizer_vocab_size=values["tokenizer_vocab_size"], **storage)
    if command == "vqa":
        splits = {s: parse_vqa_split(values[s]) for s in VQA_SPLITS if values.get(s)}
        if not splits:
            raise ValueError("give at least one of --train, --validation, --test")
        return vqa.build_vqa(splits, values["out"], name=values.get("name") or "vqa",
                             vocab_size=values["vocab_size"], answer_vocab=values.get("answer_vocab"),
                             skip_bad=values["skip_bad"], tokenizer_vocab_size=values["tokenizer_vocab_size"],
                             **storage)
    if command == "easy_vqa":
        files_dir = os.path.join(values["out"], "easy_vqa_files")
        splits = {s: vqa.write_easy_vqa_as_vqav2(files_dir, s, limit=values.get("limit")) for s in ("train", "test")}
        return vqa.build_vqa(splits, values["out"], name=values.get("name") or "easy_vqa",
                             vocab_size=values["vocab_size"], skip_bad=values["skip_bad"],
                             tokenizer_vocab_size=values["tokenizer_vocab_size"], **storage)
    if command == "image_folder":
        if not values.get("images"):
            raise ValueError("--images is required (the folder of class folders)")
        return image_folder.build_image_folder(values["images"], values["out"], name=values.get("name"), **storage)
    if command == "audio_text":
        for key in ("annotations", "audio"):
            if not values.get(key):
                raise ValueError(f"--{key} is required")
        return audio_text.build_audio_text(
            values["annotations"], values["audio"], values["out"], images=values.get("images"),
            name=values.get("name"), sample_rate=values["sample_rate"], downmix=values["downmix"],
            eval_fraction=values["eval_fraction"], eval_count=values.get("eval_count"), skip_bad=values["skip_bad"],
            tokenizer_vocab_size=values["tokenizer_vocab_size"], **storage)
    raise ValueError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")


def report(path: str) -> None:
    """Prints the prepared directory and its examples per split."""
    info = tfds.builder_from_directory(path).info
    print(f"prepared dataset: {path}")
    for split, split_info in info.splits.items():
        print(f"  {split}: {split_info.num_examples} examples")


def _define_flags() -> None:
    """The CLI's flags; only defined when run as a program (other mmjax modules define absl flags too)."""
    flags.DEFINE_string("out", None, "TFDS data dir to build into.")
    flags.DEFINE_string("name", None, "Dataset (config) name; image_text, audio_text: the annotation file's stem.")
    flags.DEFINE_bool("skip_bad", False, "Skip (and count) bad rows instead of failing.")
    flags.DEFINE_integer("tokenizer_vocab_size", 8000, "WordPiece vocabulary size; 0: no tokenizer.")
    flags.DEFINE_enum("file_format", "tfrecord", list(image_text.FILE_FORMATS),
                      "Shard format: tfrecord, or array_record (random access, exact resume without re-reading).")
    flags.DEFINE_integer("num_shards", None, "Files per split (default: TFDS sizes them), e.g. a multiple of hosts.")
    flags.DEFINE_string("annotations", None, "image_text, audio_text: .jsonl / .csv / .tsv annotation file.")
    flags.DEFINE_string("images", None, "image_text (audio_text: optional): folder the image paths are relative "
                                        "to; image_folder: the folder of class folders.")
    flags.DEFINE_string("audio", None, "audio_text: folder the audio paths are relative to.")
    flags.DEFINE_integer("sample_rate", 16000, "audio_text: sample rate (Hz) the clips are resampled to.")
    flags.DEFINE_bool("downmix", False, "audio_text: average multi-channel clips to mono (else they are errors).")
    flags.DEFINE_string("regions", None, "image_text: folder of per-image region .npz files.")
    flags.DEFINE_float("eval_fraction", 0.05, "image_text, audio_text: images (audio_text without images: clips) "
                                              "held out as validation when no split given.")
    flags.DEFINE_integer("eval_count", None, "image_text, audio_text: hold out exactly this many images (clips) as "
                                             "validation instead of --eval_fraction.")
    for split in VQA_SPLITS:
        flags.DEFINE_string(split, None, f"vqa: {split} split, QUESTIONS,ANNOTATIONS,IMAGE_DIR[,PATTERN].")
    flags.DEFINE_integer("vocab_size", vqa.DEFAULT_VOCAB_SIZE, "vqa: answer vocabulary size.")
    flags.DEFINE_string("answer_vocab", None, "vqa: existing answer vocabulary (JSON list) to use.")
    flags.DEFINE_integer("limit", None, "easy_vqa: first N questions per split.")


def main(argv: Sequence[str]) -> None:
    """Runs one command; exits 2 with `error: ...` on bad input."""
    if len(argv) != 2 or argv[1] not in COMMANDS:
        print(f"error: usage: python -m mmjax.data.build {{{'|'.join(COMMANDS)}}} --out=DIR ... "
              f"(got {' '.join(argv[1:]) or 'no command'})", file=sys.stderr)
        sys.exit(2)
    cli_logging.quiet_foreign_info()
    values = {name: flags.FLAGS[name].value for name in flags.FLAGS}
    try:
        path = run(argv[1], values)
    except (ValueError, OSError) as e:  # bad input or an unreadable / unwritable path: no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    report(path)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
