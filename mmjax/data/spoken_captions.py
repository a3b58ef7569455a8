"""`spoken_easy_vqa`: spoken captions of the embedded easy-vqa images, synthesised offline with espeak-ng.

    builder = tfds.builder("spoken_easy_vqa", data_dir=...)      # or "spoken_easy_vqa/tiny"; import this module first
    builder.download_and_prepare()                                # needs `apt-get install espeak-ng` once

The images, captions and attributes are those of `easy_vqa_captions` (4,000 train / 1,000 test 64x64 images, 5
captions each, caption 0 canonical). One example is one utterance: in train, `utterances_per_image` (default 2)
utterances per image, each speaking a different caption drawn (seeded by split and image_id) from the image's 5;
in test, one utterance per image speaking caption 0, the canonical caption that image-text retrieval evaluates with.

Speech comes from Debian's `espeak-ng` (formant synthesis, 22,050 Hz WAV, amplitude 70 for headroom), resampled to
16 kHz with soxr and stored as int16 (raw bytes: see mmjax.data.audio_text.audio_feature). Each utterance gets a
voice = accent + voice variant, a speed (140-210 words per minute) and a pitch (25-75 of espeak's 0-99), drawn
with numpy's PCG64 seeded by (split, image_id, utterance). Speaker-independent protocol: the voice variants (the
"speakers": timbre, formants, pitch range) are split between train (TRAIN_VARIANTS, 9) and test (TEST_VARIANTS, 4),
so no test voice is ever heard in training; the 8 English accents (ACCENTS: pronunciation rules) are shared, like
dialects in a speaker-independent ASR split: 72 train voices, 32 test voices.

Per example: `audio` (int16 [samples] at 16 kHz), `audio_id` (index of the utterance in its split: image_id *
utterances + k in train), `image` (the shipped PNG bytes, 64x64x3), `image_id`, `captions` (the one spoken text,
so a source's default text_key reads it), `color` / `shape` / `label` / `size` / `position` (ClassLabels as in
easy_vqa_captions), `voice` ("en-gb-scotland+f2"), `speed` (wpm) and `pitch`.

The build is deterministic, the same bytes every time (espeak-ng's output depends only on its arguments and
version): examples are written in audio_id order with protobuf's deterministic encoding. Measured on 2 cores
(syntheses run in parallel threads): the default config builds in ~80 s into 622 MB (8,000 train utterances, 4.7 h;
1,000 test, 0.6 h; 2.1 s median, 0.85-4.1 s, p99 3.4 s, espeak's ~0.2 s of trailing silence included); `tiny`
(first 96 train / 48 test images) in ~7 s into 16 MB. Like easy_vqa_captions it writes the default WordPiece
tokenizer (the very same vocabulary) as `tokenizer.json` next to the records.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import subprocess
import time
from typing import Iterator, Sequence

from mmjax.data import easy_vqa_captions as evc  # first: it sets TF_CPP_MIN_LOG_LEVEL before TF loads
from mmjax.data import image_text
from mmjax.data.audio import read_audio, to_int16
from mmjax.data.audio_text import audio_feature, audio_value, ordered_chunks
from mmjax.data.local_builder import LocalBuilder

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

ESPEAK = "espeak-ng"
SAMPLE_RATE = 16000
# English accents of espeak-ng 1.51 (`espeak-ng --voices=en`, its own gmw voices; the mbrola ones need extra
# packages). Shared by the splits.
ACCENTS: tuple[str, ...] = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc",
                            "en-gb-x-gbclan", "en-gb-x-gbcwmd")
# Voice variants (espeak-ng-data/voices/!v): the speakers. Disjoint: test speakers are never heard in training.
TRAIN_VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m5", "m7", "m8", "f1", "f2", "f4")
TEST_VARIANTS: tuple[str, ...] = ("m4", "m6", "f3", "f5")
SPEEDS: tuple[int, int] = (140, 210)  # words per minute, inclusive
PITCHES: tuple[int, int] = (25, 75)   # espeak's 0-99 scale, inclusive
# espeak-ng's default amplitude (100) peaks at full scale and resampling overshoots it: ~1.6% of utterances clipped.
# At 70 the loudest of 600 utterances peaked at 0.78 of full scale.
AMPLITUDE = 70
_SPLIT_SEEDS = {"train": 0, "test": 1}
_MISSING = ("espeak-ng not found: install it with `apt-get install espeak-ng` (needed once, to build "
            "spoken_easy_vqa)")


def voices(split: str) -> tuple[str, ...]:
    """The espeak-ng voices ("accent+variant") utterances of `split` are spoken in."""
    variants = TRAIN_VARIANTS if split == "train" else TEST_VARIANTS
    return tuple(f"{accent}+{variant}" for accent in ACCENTS for variant in variants)


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One example: which image, which caption, spoken how."""

    audio_id: int
    image_id: int
    text: str
    voice: str
    speed: int
    pitch: int


def plan_utterances(split: str, images: Sequence[dict], utterances_per_image: int) -> list[Utterance]:
    """The utterances of `split` for `images` (easy_vqa_captions examples), in audio_id order."""
    per_image = utterances_per_image if split == "train" else 1
    split_seed = _SPLIT_SEEDS[split]
    names = voices(split)
    out = []
    for ex in images:
        image_id = int(ex["image_id"])
        if split == "train":
            picks = np.random.default_rng([split_seed, image_id]).choice(
                len(ex["captions"]), size=per_image, replace=False)
        else:
            picks = [0]  # the canonical caption: what retrieval evaluates with
        for k, pick in enumerate(picks):
            rng = np.random.default_rng([split_seed, image_id, k])  # PCG64: the same stream on every numpy
            out.append(Utterance(
                audio_id=len(out), image_id=image_id, text=ex["captions"][int(pick)],
                voice=names[int(rng.integers(len(names)))], speed=int(rng.integers(SPEEDS[0], SPEEDS[1] + 1)),
                pitch=int(rng.integers(PITCHES[0], PITCHES[1] + 1))))
    return out


def check_espeak() -> str:
    """The espeak-ng executable's path; FileNotFoundError (one line, how to install it) if it is missing."""
    path = shutil.which(ESPEAK)
    if path is None:
        raise FileNotFoundError(_MISSING)
    return path


def synthesize(utterance: Utterance, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The utterance spoken by espeak-ng: int16 mono at `sample_rate`."""
    command = [check_espeak(), "-v", utterance.voice, "-s", str(utterance.speed), "-p", str(utterance.pitch),
               "-a", str(AMPLITUDE), "--stdout", utterance.text]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        stderr = " ".join(result.stderr.decode("utf-8", "replace").split())
        raise RuntimeError(f"espeak-ng failed (exit {result.returncode}) for {utterance}: {stderr}")
    name = f"espeak-ng {utterance.voice} utterance {utterance.audio_id} ({utterance.text!r})"
    return to_int16(read_audio(result.stdout, sample_rate=sample_rate, name=name))


@functools.lru_cache(maxsize=None)
def _image_examples(split: str) -> tuple[dict, ...]:
    """easy_vqa_captions' examples of `split` without the decoded pixels (cached: a second build is cheap)."""
    keep = ("image_id", "image_path", "captions", "questions", "answers", "color", "shape", "label", "size",
            "position")
    return tuple({k: ex[k] for k in keep} for ex in evc.load_split_examples(split))


# ----------------------------------------------------------------------------------------------- builder


@dataclasses.dataclass(eq=False)
class SpokenEasyVqaConfig(tfds.core.BuilderConfig):
    """Utterances per train image and how many images of each split (None: all; n: the first n; (train, test))."""

    utterances_per_image: int = 2
    max_images: int | tuple[int, int] | None = None

    def images(self, split: str) -> int | None:
        """How many of `split`'s images (the first ones) to speak; None: all."""
        if self.max_images is None or isinstance(self.max_images, int):
            return self.max_images
        return self.max_images[0 if split == "train" else 1]


class SpokenEasyVqa(LocalBuilder):
    """easy-vqa images with spoken captions from espeak-ng (held-out voices in test); builds offline."""

    BUILDER_CONFIGS = [
        SpokenEasyVqaConfig(name="default", description="All 4,000 train / 1,000 test images."),
        SpokenEasyVqaConfig(name="tiny", max_images=(96, 48), description="The first 96 train / 48 test images."),
    ]

    def _make_plan(self) -> dict[str, list[Utterance]]:
        config = self.builder_config
        if not 1 <= config.utterances_per_image <= evc.NUM_CAPTIONS:
            raise ValueError(f"utterances_per_image must be in [1, {evc.NUM_CAPTIONS}], got "
                             f"{config.utterances_per_image}")
        return {split: plan_utterances(split, _image_examples(split)[: config.images(split)],
                                       config.utterances_per_image) for split in _SPLIT_SEEDS}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "audio": audio_feature(SAMPLE_RATE),
                "audio_id": np.int32,
                "image": tfds.features.Image(shape=(64, 64, 3)),
                "image_id": np.int32,
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "color": tfds.features.ClassLabel(names=evc.COLORS),
                "shape": tfds.features.ClassLabel(names=evc.SHAPES),
                "label": tfds.features.ClassLabel(names=evc.CLASS_NAMES),
                "size": tfds.features.ClassLabel(names=evc.SIZES),
                "position": tfds.features.ClassLabel(names=evc.POSITIONS),
                "voice": tfds.features.Text(),
                "speed": np.int32,
                "pitch": np.int32,
            }),
            supervised_keys=("audio", "label"),
            # Write examples in audio_id order: reproducible files, readable eval order, simple slicing.
            disable_shuffling=True,
            homepage="https://github.com/espeak-ng/espeak-ng",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is on local disk: easy-vqa's files and espeak-ng
        return {split: self._generate_examples(split) for split in self.plan()}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        images = {ex["image_id"]: ex for ex in _image_examples(split)}
        utterances = self.plan()[split]
        lengths = self.__dict__.setdefault("_seconds", {}).setdefault(split, [])
        # espeak-ng runs as a subprocess, so threads synthesise in parallel (waiting on a process frees the GIL).
        for utt, wave in zip(utterances, ordered_chunks(synthesize, utterances)):
            image = images[utt.image_id]
            lengths.append(len(wave) / SAMPLE_RATE)
            yield utt.audio_id, {
                "audio": audio_value(wave), "audio_id": utt.audio_id,
                # The shipped PNG bytes as they are (no re-encoding): the same bytes on every build.
                "image": image["image_path"], "image_id": utt.image_id, "captions": [utt.text],
                **{k: image[k] for k in ("color", "shape", "label", "size", "position")},
                "voice": utt.voice, "speed": utt.speed, "pitch": utt.pitch,
            }

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        check_espeak()  # before any synthesis: one line on how to install it
        start = time.perf_counter()
        with image_text.deterministic_serialization():
            super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        # self.data_dir is the temporary build dir here; tfds renames it into place only if we succeed.
        from mmjax.data.tokenizer import train_wordpiece  # pylint: disable=import-outside-toplevel

        # All train images, whatever max_images: the very same tokenizer as easy_vqa_captions'.
        train_wordpiece(evc.tokenizer_corpus(_image_examples("train")), self.data_dir)
        parts = []
        for split, seconds in self.__dict__.pop("_seconds", {}).items():
            s = np.asarray(seconds)
            parts.append(f"{split} {len(s)} utterances, {s.sum() / 3600:.2f} h, seconds min {s.min():.2f} / "
                         f"median {np.median(s):.2f} / max {s.max():.2f}")
        summary = (f"{self.name}/{self.builder_config.name}: {'; '.join(parts)}; built in "
                   f"{time.perf_counter() - start:.1f} s")
        logging.info(summary)
        print(summary)


def source_config(**overrides):
    """This dataset as a data source (mmjax.data.sources.source_config) of kind "audio_image_text".

    It builds itself offline on first use (`prepare`; espeak-ng must be installed) and is held in memory. It
    offers the 24 "colour shape" classes (`label`) with easy_vqa_captions' zero-shot prompts. Keyword arguments
    override source fields, e.g. name="spoken_easy_vqa/tiny".
    """
    from mmjax import configlib  # pylint: disable=import-outside-toplevel
    from mmjax.data import sources  # pylint: disable=import-outside-toplevel  (sources imports no dataset module)

    defaults = dict(name="spoken_easy_vqa", prepare=True, kind="audio_image_text", train_split="train",
                    eval_split="test", label_key="label", prompts=evc.ZERO_SHOT_TEMPLATES, negatives=(),
                    in_memory=True, audio_key="audio")
    return configlib.override(sources.source_config(**defaults), overrides, "the spoken_easy_vqa source")
