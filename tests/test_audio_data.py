"""Tests of the audio datasets: spoken_easy_vqa (espeak-ng, offline) and the users' audio_text builder + its CLI."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data import audio_text as at
from mmjax.data import build
from mmjax.data import easy_vqa_captions as evc
from mmjax.data import sources
from mmjax.data import spoken_captions as sc
from mmjax.data.audio import read_audio, to_int16

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def _read(path: str, split: str) -> list[dict]:
    return list(tfds.as_numpy(tfds.builder_from_directory(path).as_dataset(split=split, shuffle_files=False)))


def _texts(values) -> list[str]:
    return [v.decode() for v in values]


def _record_hashes(path: str) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(path)) if ".tfrecord-" in f or f == "tokenizer.json"}


# ----------------------------------------------------------------------------------------------- spoken_easy_vqa


@pytest.fixture(scope="module")
def spoken_tiny(tmp_path_factory) -> tfds.core.DatasetBuilder:
    """spoken_easy_vqa/tiny, built once (96 train images x 2 utterances, 48 test images; ~10 s)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    builder = tfds.builder("spoken_easy_vqa/tiny", data_dir=str(tmp_path_factory.mktemp("spoken")))
    builder.download_and_prepare()
    return builder


@needs_espeak
def test_spoken_tiny_sizes_audio_and_captions(spoken_tiny):
    info = spoken_tiny.info
    assert info.splits["train"].num_examples == 96 * 2 and info.splits["test"].num_examples == 48
    assert info.features["audio"].sample_rate == 16000 and info.features["audio"].dtype == np.int16
    assert info.features["label"].names == list(evc.CLASS_NAMES)
    assert os.path.exists(os.path.join(spoken_tiny.data_dir, "tokenizer.json"))
    for split, per_image in (("train", 2), ("test", 1)):
        # The builder's own cache of easy_vqa_captions' examples (loading them again would take seconds).
        images = {ex["image_id"]: ex for ex in sc._image_examples(split)[: 96 if split == "train" else 48]}
        examples = list(tfds.as_numpy(spoken_tiny.as_dataset(split=split, shuffle_files=False)))
        assert [int(ex["audio_id"]) for ex in examples] == list(range(len(examples)))
        assert [int(ex["image_id"]) for ex in examples] == [i for i in images for _ in range(per_image)]
        spoken: dict[int, list[str]] = {}
        for ex in examples:
            image = images[int(ex["image_id"])]
            (text,) = _texts(ex["captions"])
            spoken.setdefault(int(ex["image_id"]), []).append(text)
            assert text in image["captions"] and (split == "train" or text == image["captions"][0])
            for key in ("color", "shape", "label", "size", "position"):
                assert ex[key] == image[key], key
            np.testing.assert_array_equal(ex["image"], np.asarray(Image.open(image["image_path"]).convert("RGB")))
            audio = ex["audio"]
            assert audio.dtype == np.int16 and audio.ndim == 1 and 0.5 < len(audio) / 16000 < 6
            assert np.abs(audio.astype(np.int32)).max() > 3000  # speech, not silence
            assert ex["voice"].decode() in sc.voices(split)
            assert sc.SPEEDS[0] <= ex["speed"] <= sc.SPEEDS[1] and sc.PITCHES[0] <= ex["pitch"] <= sc.PITCHES[1]
        assert all(len(set(texts)) == len(texts) for texts in spoken.values())  # distinct within an image


@needs_espeak
def test_spoken_test_voices_are_held_out(spoken_tiny):
    used = {split: {ex["voice"].decode() for ex in tfds.as_numpy(spoken_tiny.as_dataset(split=split))}
            for split in ("train", "test")}
    assert used["train"] and used["test"] and not used["train"] & used["test"]
    assert not set(sc.voices("train")) & set(sc.voices("test"))
    assert len(used["train"]) > 20  # 192 utterances spread over the 72 train voices


@needs_espeak
def test_spoken_build_is_deterministic(tmp_path):
    config = dict(name="eight", max_images=8, utterances_per_image=3)
    first, second = (sc.SpokenEasyVqa(config=sc.SpokenEasyVqaConfig(**config), data_dir=str(tmp_path / d))
                     for d in ("a", "b"))
    first.download_and_prepare()
    second.download_and_prepare()
    hashes = _record_hashes(first.data_dir)
    assert len(hashes) == 3 and hashes == _record_hashes(second.data_dir)
    train = list(tfds.as_numpy(first.as_dataset(split="train", shuffle_files=False)))
    assert len(train) == 24 and len({ex["audio"].tobytes() for ex in train}) == 24


def test_spoken_plan_is_seeded_and_missing_espeak_is_one_line(monkeypatch):
    images = [dict(image_id=i, captions=[f"c{i}-{k}" for k in range(5)]) for i in range(3)]
    plan = sc.plan_utterances("train", images, 4)
    assert plan == sc.plan_utterances("train", images, 4) and [u.audio_id for u in plan] == list(range(12))
    assert sc.plan_utterances("train", images[1:2], 4)[0].voice == plan[4].voice  # seeded per (split, image, k)
    assert [u.text for u in sc.plan_utterances("test", images, 2)] == ["c0-0", "c1-0", "c2-0"]
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"^espeak-ng not found: install it with `apt-get install espeak-ng` "
                                                r"\(needed once, to build spoken_easy_vqa\)$"):
        sc.check_espeak()


@needs_espeak
def test_spoken_source_config(spoken_tiny):
    cfg = sc.source_config(name="spoken_easy_vqa/tiny", data_dir=os.fspath(spoken_tiny.data_dir_root))
    assert (cfg.name, cfg.kind, cfg.audio_key, cfg.eval_split, cfg.label_key) == (
        "spoken_easy_vqa/tiny", "audio_image_text", "audio", "test", "label")
    assert tuple(cfg.prompts) == evc.ZERO_SHOT_TEMPLATES and cfg.in_memory and cfg.prepare
    assert sources.open_source("spoken", cfg).info.full_name == "spoken_easy_vqa/tiny/1.0.0"  # features check out


# ----------------------------------------------------------------------------------------------- audio_text


def _tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave * (c + 1) / channels for c in range(channels)], 1) if channels > 1 else wave


def _write_wav_tag(path: str, tag: int) -> None:
    """A WAV file with a format tag libsndfile does not decode (0x0161: Windows Media Audio)."""
    fmt = struct.pack("<HHIIHH", tag, 1, 16000, 32000, 2, 16)
    data = b"\x00" * 3200
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE" + b"fmt "
                + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[str, str]:
    """(audio folder, image folder): good clips in three formats / rates, bad clips, three PNGs."""
    root = tmp_path_factory.mktemp("media")
    audio, images = root / "audio", root / "images"
    (audio / "sub").mkdir(parents=True)
    images.mkdir()
    sf.write(audio / "a.wav", _tone(0.5, 16000), 16000, subtype="PCM_16")
    sf.write(audio / "b.flac", _tone(0.3, 44100, 300), 44100)
    sf.write(audio / "sub" / "c.wav", _tone(0.4, 8000, 200), 8000, subtype="PCM_16")
    sf.write(audio / "d.ogg", _tone(0.6, 22050, 500), 22050)
    sf.write(audio / "stereo.wav", _tone(0.2, 16000, channels=2), 16000, subtype="PCM_16")
    sf.write(audio / "empty.wav", np.zeros(0, np.int16), 16000)
    sf.write(audio / "short.wav", _tone(0.01, 16000), 16000)  # 160 samples < 0.025 s = 400
    data = open(audio / "a.wav", "rb").read()
    (audio / "corrupt.wav").write_bytes(data[:30])  # cut off inside the header
    _write_wav_tag(str(audio / "wma.wav"), 0x0161)
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{i}.png")
    return str(audio), str(images)


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _expected(audio_dir: str, path: str) -> np.ndarray:
    return to_int16(read_audio(os.path.join(audio_dir, path), sample_rate=16000))


# (audio, caption, split, image, label): a.wav has 2 captions, d.ogg is in both splits.
ROWS = [
    ("a.wav", "a tone", "train", "img0.png", "low"), ("b.flac", "a lower tone", "train", "img1.png", "high"),
    ("a.wav", "  the same tone  ", "train", "img0.png", "low"), ("sub/c.wav", "eight k", "test", "img2.png", "low"),
    ("d.ogg", "ogg train", "train", "img1.png", "mid"), ("d.ogg", "ogg test", "test", "img1.png", "mid"),
]


def test_audio_text_jsonl_round_trip_with_images_and_labels(media, tmp_path):
    audio_dir, image_dir = media
    rows = [dict(audio=a, caption=c, split=s, image=i, label=lab) for a, c, s, i, lab in ROWS]
    path = at.build_audio_text(_write_jsonl(tmp_path / "spoken.jsonl", rows), audio_dir, str(tmp_path / "tfds"),
                               images=image_dir)
    assert path.endswith(os.path.join("mmjax_audio_text", "spoken", "1.0.0"))
    assert os.path.exists(os.path.join(path, "tokenizer.json"))
    info = tfds.builder_from_directory(path).info
    assert info.features["label"].names == ["high", "low", "mid"]
    assert info.features["audio"].sample_rate == 16000 and info.features["audio"].dtype == np.int16
    audio_paths = sorted({r[0] for r in ROWS})
    for split in ("train", "test"):
        expected: dict[str, list[str]] = {}
        for a, c, s, _, _ in ROWS:
            if s == split:
                expected.setdefault(a, []).append(c.strip())
        examples = _read(path, split)
        assert {ex["audio_path"].decode(): _texts(ex["captions"]) for ex in examples} == expected
        assert [int(ex["audio_id"]) for ex in examples] == sorted(audio_paths.index(a) for a in expected)
        for ex in examples:
            row = next(r for r in ROWS if r[0] == ex["audio_path"].decode())
            np.testing.assert_array_equal(ex["audio"], _expected(audio_dir, row[0]))
            assert ex["image_path"].decode() == row[3] and ex["image_id"] == int(row[3][3])
            np.testing.assert_array_equal(ex["image"], np.asarray(Image.open(os.path.join(image_dir, row[3]))))
            assert info.features["label"].int2str(ex["label"]) == row[4]
    (a,) = [ex for ex in _read(path, "train") if ex["audio_path"] == b"a.wav"]
    np.testing.assert_array_equal(a["audio"], sf.read(os.path.join(audio_dir, "a.wav"), dtype="int16")[0])
    (b,) = [ex for ex in _read(path, "train") if ex["audio_path"] == b"b.flac"]
    assert len(b["audio"]) == round(0.3 * 16000)  # 44.1 kHz resampled


def test_audio_text_csv_holdout_without_images(media, tmp_path):
    audio_dir, _ = media
    paths = ["a.wav", "b.flac", "sub/c.wav", "d.ogg"]
    with open(tmp_path / "clips.csv", "w") as f:
        f.write("id,audio,caption,image\n")  # the image column is ignored without images
        for n, p in enumerate(paths):
            f.write(f'{n},{p},"caption, with comma {n}",nope.png\n{n},{p},second {n},\n')
    path = at.build_audio_text(str(tmp_path / "clips.csv"), audio_dir, str(tmp_path / "tfds"),
                               tokenizer_vocab_size=0)
    assert not os.path.exists(os.path.join(path, "tokenizer.json"))
    assert "image" not in tfds.builder_from_directory(path).info.features
    held_out = min(paths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())  # round(0.05 * 4) = 0 -> 1
    (validation,) = _read(path, "validation")
    assert validation["audio_path"].decode() == held_out
    n = paths.index(held_out)
    assert _texts(validation["captions"]) == [f"caption, with comma {n}", f"second {n}"]
    assert validation["audio_id"] == sorted(paths).index(held_out)
    assert sorted(ex["audio_path"].decode() for ex in _read(path, "train")) == sorted(set(paths) - {held_out})


def test_audio_text_holds_out_whole_images_and_is_deterministic(media, tmp_path):
    audio_dir, image_dir = media
    clips = ["a.wav", "b.flac", "sub/c.wav", "d.ogg"]
    rows = [dict(audio=c, caption=f"c{k}", image=f"img{k % 2}.png") for k, c in enumerate(clips)]
    annotations = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    path = at.build_audio_text(annotations, audio_dir, str(tmp_path / "a"), images=image_dir, eval_fraction=0.5,
                               tokenizer_vocab_size=0)
    held = min(["img0.png", "img1.png"], key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    validation = _read(path, "validation")
    assert sorted(ex["audio_path"].decode() for ex in validation) == sorted(
        r["audio"] for r in rows if r["image"] == held)  # both clips of the held-out image
    assert all(ex["image_path"].decode() != held for ex in _read(path, "train"))
    again = at.build_audio_text(annotations, audio_dir, str(tmp_path / "b"), images=image_dir, eval_fraction=0.5,
                                tokenizer_vocab_size=0)
    assert _record_hashes(path) == _record_hashes(again)


def test_audio_text_downmix(media, tmp_path):
    audio_dir, _ = media
    annotations = _write_jsonl(tmp_path / "st.jsonl", [dict(audio="stereo.wav", caption="two channels")])
    path = at.build_audio_text(annotations, audio_dir, str(tmp_path / "tfds"), downmix=True, tokenizer_vocab_size=0)
    (ex,) = _read(path, "train")
    stereo, _ = sf.read(os.path.join(audio_dir, "stereo.wav"), dtype="float32")
    np.testing.assert_array_equal(ex["audio"], to_int16(stereo.mean(axis=1, dtype=np.float32)))


@pytest.mark.parametrize("clip,message", [
    ("corrupt.wav", r"corrupt\.wav: not a readable audio file"),
    ("empty.wav", r"empty\.wav is empty \(0 audio frames\)"),
    ("wma.wav", r"wma\.wav: unsupported audio format \(WAV format tag 0x0161"),
    ("short.wav", r"short\.wav: 0\.0100 s .* is shorter than"),
    ("stereo.wav", r"stereo\.wav has 2 channels; mono expected: pass downmix=True \(--downmix\)"),
    ("gone.wav", r"audio file not found: .*gone\.wav"),
])
def test_audio_text_bad_audio_names_file_line_and_clip(media, tmp_path, clip, message):
    audio_dir, _ = media
    annotations = _write_jsonl(tmp_path / "bad.jsonl", ['{"audio": "a.wav", "caption": "fine"}', "",
                                                        json.dumps({"audio": clip, "caption": "broken"})])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: .*" + message) as error:
        at.build_audio_text(annotations, audio_dir, str(tmp_path / "tfds"))
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "tfds")  # validated before anything is written


@pytest.mark.parametrize("lines,with_images,message", [
    (['{"audio": "a.wav", "caption": "  "}'], False, r"line 1: empty caption '  ' for audio 'a\.wav'"),
    (['{"audio": "a.wav", caption: 1}'], False, r"line 1: invalid JSON"),
    (['{"audio": "a.wav", "text": "x"}'], False, r"line 1: missing field 'caption'"),
    (['{"audio": 3, "caption": "x"}'], False, r"line 1: field 'audio' must be a string, got 3"),
    (['{"audio": "../a.wav", "caption": "x"}'], False, r"line 1: audio must be a path relative to the audio folder"),
    (['{"audio": "a.wav", "caption": "x", "split": "train[:5]"}'], False, r"line 1: bad split name 'train\[:5\]'"),
    (['{"audio": "a.wav", "caption": "x", "label": "a"}', '{"audio": "b.flac", "caption": "y"}'], False,
     r"line 2: missing field 'label' \(other rows have labels\)"),
    (['{"audio": "a.wav", "caption": "x", "label": "a"}', '{"audio": "a.wav", "caption": "y", "label": "b"}'], False,
     r"line 2: audio 'a\.wav' has label 'b' here but 'a' on line 1"),
    (['{"audio": "a.wav", "caption": "x", "image": "img0.png"}', '{"audio": "a.wav", "caption": "y", '
      '"image": "img1.png"}'], True, r"line 2: audio 'a\.wav' has image 'img1\.png' here but 'img0\.png' on line 1"),
    (['{"audio": "a.wav", "caption": "x"}'], True, r"line 1: missing field 'image'"),
    (['{"audio": "a.wav", "caption": "x", "image": "gone.png"}'], True, r"line 1: image file not found: .*gone\.png"),
])
def test_audio_text_bad_rows(media, tmp_path, lines, with_images, message):
    audio_dir, image_dir = media
    annotations = _write_jsonl(tmp_path / "rows.jsonl", lines)
    with pytest.raises(ValueError, match=r"rows\.jsonl, " + message):
        at.build_audio_text(annotations, audio_dir, str(tmp_path / "tfds"), images=image_dir if with_images else None)


def test_audio_text_csv_header(media, tmp_path):
    audio_dir, _ = media
    (tmp_path / "h.csv").write_text("image,caption\na.wav,x\n")
    with pytest.raises(ValueError, match=r"h\.csv, line 1: header \['image', 'caption'\] lacks the column\(s\) audio"):
        at.build_audio_text(str(tmp_path / "h.csv"), audio_dir, str(tmp_path / "tfds"))


def test_audio_text_skip_bad_counts_and_writes_skipped_json(media, tmp_path, capsys):
    audio_dir, _ = media
    lines = [
        '{"audio": "a.wav", "caption": "fine"}',
        '{"audio": "gone.wav", "caption": "x"}',
        '{"audio": "corrupt.wav", "caption": "x"}',
        '{"audio": "a.wav", "caption": " "}',
        "{not json",
        '{"audio": "stereo.wav", "caption": "x"}',
        '{"audio": "a.wav", "caption": "also fine"}',
    ]
    path = at.build_audio_text(_write_jsonl(tmp_path / "skip.jsonl", lines), audio_dir, str(tmp_path / "tfds"),
                               skip_bad=True, tokenizer_vocab_size=0)
    skipped = json.load(open(os.path.join(path, "skipped.json")))
    assert skipped["counts"] == {"bad_audio": 2, "bad_row": 1, "empty_caption": 1, "missing_audio": 1}
    assert skipped["lines"] == {"bad_audio": [3, 6], "bad_row": [5], "empty_caption": [4], "missing_audio": [2]}
    assert skipped["total"] == 5 and skipped["seen"] == 7
    assert "skipped 5 of 7" in capsys.readouterr().out
    (ex,) = _read(path, "train")
    assert _texts(ex["captions"]) == ["fine", "also fine"] and ex["audio_id"] == 0  # a.wav < corrupt < gone < ...


def _cli_values(**values) -> dict:
    """build.run's flag values for audio_text: the CLI's defaults updated with `values`."""
    defaults = dict(out=None, name=None, skip_bad=False, tokenizer_vocab_size=8000, file_format="tfrecord",
                    num_shards=None, annotations=None, images=None, audio=None, sample_rate=16000, downmix=False,
                    eval_fraction=0.05)
    return dict(defaults, **values)


def test_cli_audio_text(media, tmp_path):
    audio_dir, image_dir = media
    rows = [dict(audio="a.wav", caption="x", split="train", image="img0.png"),
            dict(audio="d.ogg", caption="y", split="validation", image="img1.png")]
    annotations = _write_jsonl(tmp_path / "cli.jsonl", rows)
    path = build.run("audio_text", _cli_values(annotations=annotations, audio=audio_dir, images=image_dir,
                                               out=str(tmp_path / "tfds"), sample_rate=8000, num_shards=1))
    assert path == os.path.join(str(tmp_path / "tfds"), "mmjax_audio_text", "cli", "1.0.0")
    (ex,) = _read(path, "validation")
    assert len(ex["audio"]) == round(0.6 * 8000) and ex["image"].shape == (8, 8, 3)
    assert tfds.builder_from_directory(path).info.features["audio"].sample_rate == 8000
    with pytest.raises(ValueError, match="--audio is required"):
        build.run("audio_text", _cli_values(annotations=annotations, out=str(tmp_path / "x")))

    bad = _write_jsonl(tmp_path / "bad.jsonl", [dict(audio="a.wav", caption="x"), dict(audio="stereo.wav",
                                                                                      caption="y")])
    result = subprocess.run([sys.executable, "-m", "mmjax.data.build", "audio_text", f"--annotations={bad}",
                             f"--audio={audio_dir}", f"--out={tmp_path / 'tfds'}"], capture_output=True, text=True,
                            cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: " in result.stderr and "bad.jsonl, line 2: " in result.stderr
    assert "stereo.wav has 2 channels" in result.stderr
