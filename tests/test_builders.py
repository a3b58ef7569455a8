"""Tests of our TFDS builders for users' data (image-text, VQAv2-format VQA) and their CLI, on tiny local files."""

import hashlib
import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data import image_text as it
from mmjax.data import vqa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_image(path, seed: int, size: int = 16, fmt: str | None = None) -> np.ndarray:
    """Writes a random RGB image; returns its pixels."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _read(path: str, split: str) -> list[dict]:
    return list(tfds.as_numpy(tfds.builder_from_directory(path).as_dataset(split=split, shuffle_files=False)))


def _texts(values) -> list[str]:
    return [v.decode() for v in values]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    """A folder of 10 16x16 PNGs (two in a subfolder) + one 32x32 JPEG; returns (folder, {path: pixels})."""
    root = str(tmp_path_factory.mktemp("images"))
    pixels = {}
    for i in range(10):
        rel = f"sub/img{i}.png" if i >= 8 else f"img{i}.png"
        pixels[rel] = _write_image(os.path.join(root, rel), seed=i)
    pixels["photo.jpg"] = _write_image(os.path.join(root, "photo.jpg"), seed=99, size=32, fmt="JPEG")
    return root, pixels


# ----------------------------------------------------------------------------------------------- image-text

# (image, caption, split); img1 has 3 captions, img3 one per split; photo.jpg is a JPEG.
JSONL_ROWS = [
    ("img0.png", "a red thing", "train"), ("img1.png", "first of one", "train"),
    ("img2.png", "  padded caption  ", "test"), ("img1.png", "second of one", "train"),
    ("img3.png", "three train", "train"), ("img3.png", "three test", "test"), ("sub/img8.png", "eight", "train"),
    ("photo.jpg", "a photo", "train"), ("img1.png", "third of one", "train"),
]


def _regions(seed: int, num: int, dim: int = 6, classes: int | None = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y0, x0 = rng.uniform(0, 0.5, (2, num))
    arrays = {"features": rng.normal(size=(num, dim)).astype(np.float32),
              "boxes": np.stack([y0, x0, y0 + 0.5, x0 + 0.4], 1).astype(np.float32)}
    if classes:
        arrays["class_probs"] = rng.dirichlet(np.ones(classes), num).astype(np.float32)
    return arrays


@pytest.fixture(scope="module")
def jsonl_build(images, tmp_path_factory):
    """The JSONL rows above with regions (R = 1..3, D = 6, C = 4), built once."""
    root, _ = images
    tmp = tmp_path_factory.mktemp("jsonl")
    annotations = _write_jsonl(tmp / "my captions.jsonl", [dict(image=i, caption=c, split=s) for i, c, s in JSONL_ROWS])
    regions, arrays = str(tmp / "regions"), {}
    for n, image in enumerate(sorted({r[0] for r in JSONL_ROWS})):
        arrays[image] = _regions(n, num=n % 3 + 1)
        path = it.region_file(regions, image)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path, **arrays[image])
    path = it.build_image_text(annotations, root, str(tmp / "tfds"), regions=regions)
    return path, arrays


def test_jsonl_round_trip(jsonl_build, images):
    path, _ = jsonl_build
    _, pixels = images
    assert path.endswith(os.path.join("mmjax_image_text", "my_captions", "1.0.0"))
    assert sorted(os.listdir(path)) == sorted([
        "dataset_info.json", "features.json", "tokenizer.json", "vocab.txt",
        "mmjax_image_text-train.tfrecord-00000-of-00001", "mmjax_image_text-test.tfrecord-00000-of-00001"])
    all_paths = sorted({r[0] for r in JSONL_ROWS})
    for split in ("train", "test"):
        expected: dict[str, list[str]] = {}
        for image, caption, s in JSONL_ROWS:
            if s == split:
                expected.setdefault(image, []).append(caption.strip())
        examples = _read(path, split)
        got = {ex["image_path"].decode(): _texts(ex["captions"]) for ex in examples}
        assert got == expected
        ids = [int(ex["image_id"]) for ex in examples]
        assert ids == sorted(ids)  # written in image_id order
        for ex in examples:
            image = ex["image_path"].decode()
            assert ex["image_id"] == all_paths.index(image)
            if image.endswith(".png"):
                np.testing.assert_array_equal(ex["image"], pixels[image])
            else:
                assert ex["image"].shape == (32, 32, 3)


def test_regions_round_trip(jsonl_build):
    path, arrays = jsonl_build
    features = tfds.builder_from_directory(path).info.features
    assert features["region_features"].shape == (None, 6) and features["region_class_probs"].shape == (None, 4)
    for split in ("train", "test"):
        for ex in _read(path, split):
            want = arrays[ex["image_path"].decode()]
            np.testing.assert_array_equal(ex["region_features"], want["features"])
            np.testing.assert_array_equal(ex["region_boxes"], want["boxes"])
            np.testing.assert_array_equal(ex["region_class_probs"], want["class_probs"])


def test_csv_holdout_and_no_tokenizer(images, tmp_path):
    root, pixels = images
    paths = sorted(p for p in pixels if p.endswith(".png"))
    with open(tmp_path / "caps.csv", "w") as f:
        f.write("id,image,caption\n")
        for n, p in enumerate(paths):
            f.write(f'{n},{p},"caption, with comma {n}"\n{n},{p},second {n}\n')
    path = it.build_image_text(str(tmp_path / "caps.csv"), root, str(tmp_path / "tfds"), tokenizer_vocab_size=0)
    assert not os.path.exists(os.path.join(path, "tokenizer.json"))
    # 10 images, eval_fraction 0.05 -> round(0.5) = 0 -> at least 1: the image with the smallest sha256.
    held_out = min(paths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    validation = _read(path, "validation")
    assert [ex["image_path"].decode() for ex in validation] == [held_out]
    train = _read(path, "train")
    assert len(train) == 9 and held_out not in {ex["image_path"].decode() for ex in train}
    n = paths.index(held_out)
    assert _texts(validation[0]["captions"]) == [f"caption, with comma {n}", f"second {n}"]
    assert validation[0]["image_id"] == n


def test_array_record_shards(images, tmp_path):
    root, pixels = images
    paths = sorted(p for p in pixels if p.endswith(".png"))
    rows = [{"image": p, "caption": f"c {n}"} for n, p in enumerate(paths)]
    annotations = _write_jsonl(tmp_path / "caps.jsonl", rows)
    path = it.build_image_text(annotations, root, str(tmp_path / "tfds"), file_format="array_record", num_shards=3,
                               eval_fraction=0.3, tokenizer_vocab_size=0)  # every split needs >= 3 examples
    files = sorted(f for f in os.listdir(path) if "-train." in f)
    assert files == [f"mmjax_image_text-train.array_record-0000{i}-of-00003" for i in range(3)]
    builder = tfds.builder_from_directory(path)
    held_out = {ex["captions"][0] for ex in builder.as_data_source(split="validation")}
    train = builder.as_data_source(split="train")
    assert len(train) + len(held_out) == len(paths)
    assert sorted(_texts(train[i]["captions"][0] for i in range(len(train)))) == sorted(
        f"c {n}" for n in range(len(paths)) if f"c {n}".encode() not in held_out)
    with pytest.raises(ValueError, match="file_format must be one of tfrecord, array_record"):
        it.build_image_text(annotations, root, str(tmp_path / "other"), file_format="parquet")


def test_holdout_is_deterministic_and_sized():
    paths = [f"dir/{i}.jpg" for i in range(100)]
    held = it.holdout_images(paths, 0.05)
    assert len(held) == 5 and held == it.holdout_images(list(reversed(paths)), 0.05)
    assert it.holdout_images(paths[:2], 0.05) == {min(paths[:2], key=lambda p: hashlib.sha256(p.encode()).digest())}
    assert it.holdout_images(paths[:1], 0.5) == set() and it.holdout_images(paths, 0.0) == set()
    assert len(it.holdout_images(paths[:3], 0.9)) == 2  # never all of them


def test_build_is_deterministic_and_rebuilds(images, tmp_path):
    root, _ = images
    annotations = _write_jsonl(tmp_path / "d.jsonl", [dict(image=f"img{i}.png", caption=f"c {i}") for i in range(4)])
    out = str(tmp_path / "tfds")

    def files(path):
        return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}

    first = files(it.build_image_text(annotations, root, out))
    assert files(it.build_image_text(annotations, root, str(tmp_path / "other"))) == first
    # Same name again with changed input: replaced, not reused.
    _write_jsonl(tmp_path / "d.jsonl", [dict(image=f"img{i}.png", caption=f"new {i}") for i in range(4)])
    path = it.build_image_text(annotations, root, out)
    assert files(path) != first
    captions = [c for s in ("train", "validation") for ex in _read(path, s) for c in _texts(ex["captions"])]
    assert sorted(captions) == [f"new {i}" for i in range(4)]


# Bad input: (file name, content, expected message after "<file>, line N: ").
_TRUNCATED = {"png": "img0.png", "jpg": "photo.jpg"}


@pytest.fixture(scope="module")
def broken_images(images, tmp_path_factory) -> str:
    """The image folder's files, two of them truncated to half their bytes, and a GIF."""
    root, _ = images
    broken = str(tmp_path_factory.mktemp("broken"))
    for name in _TRUNCATED.values():
        data = open(os.path.join(root, name), "rb").read()
        with open(os.path.join(broken, name), "wb") as f:
            f.write(data[: len(data) // 2])
    _write_image(os.path.join(broken, "ok.png"), seed=5)
    _write_image(os.path.join(broken, "anim.gif"), seed=6, fmt="GIF")
    return broken


@pytest.mark.parametrize("name,lines,message", [
    ("missing.jsonl", ['{"image": "ok.png", "caption": "x"}', '{"image": "gone.png", "caption": "y"}'],
     r"missing\.jsonl, line 2: image file not found: .*gone\.png"),
    ("trunc_png.jsonl", ['{"image": "ok.png", "caption": "x"}', "", '{"image": "img0.png", "caption": "y"}'],
     r"trunc_png\.jsonl, line 3: cannot decode image .*img0\.png"),
    ("trunc_jpg.jsonl", ['{"image": "photo.jpg", "caption": "y"}'],
     r"trunc_jpg\.jsonl, line 1: cannot decode image .*photo\.jpg"),
    ("gif.jsonl", ['{"image": "anim.gif", "caption": "y"}'], r"gif\.jsonl, line 1: image .*anim\.gif is GIF"),
    ("empty.jsonl", ['{"image": "ok.png", "caption": "x"}', '{"image": "ok.png", "caption": "   "}'],
     r"empty\.jsonl, line 2: empty caption '   '"),
    ("json.jsonl", ['{"image": "ok.png", "caption": "x"}', '{"image": "ok.png", caption: "y"}'],
     r"json\.jsonl, line 2: invalid JSON .*caption: \"y\""),
    ("object.jsonl", ['["ok.png", "x"]'], r"object\.jsonl, line 1: expected a JSON object, got \['ok\.png'"),
    ("field.jsonl", ['{"image": "ok.png", "text": "x"}'], r"field\.jsonl, line 1: missing field 'caption'"),
    ("escape.jsonl", ['{"image": "../ok.png", "caption": "x"}'], r"escape\.jsonl, line 1: image must be a path.*\.\./"),
    ("split.jsonl", ['{"image": "ok.png", "caption": "x", "split": "train[:5]"}'],
     r"split\.jsonl, line 1: bad split name 'train\[:5\]'"),
    ("header.csv", ["image,text", "ok.png,x"], r"header\.csv, line 1: header \['image', 'text'\] lacks the column\(s\) "
                                               r"caption"),
    ("columns.csv", ["image,caption", "ok.png,x", "ok.png,y,extra"],
     r"columns\.csv, line 3: 3 columns, the header has 2"),
    ("tabs.tsv", ["image\tcaption", "gone.png\tx"], r"tabs\.tsv, line 2: image file not found"),
])
def test_bad_input_names_file_and_line(broken_images, tmp_path, name, lines, message):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        it.build_image_text(str(path), broken_images, str(tmp_path / "tfds"), tokenizer_vocab_size=0)
    assert not os.path.exists(tmp_path / "tfds")  # validated before anything is written


def test_skip_bad_counts_and_writes_skipped_json(broken_images, tmp_path, capsys):
    lines = [
        '{"image": "ok.png", "caption": "fine"}',
        '{"image": "gone.png", "caption": "x"}',
        '{"image": "img0.png", "caption": "truncated"}',
        '{"image": "ok.png", "caption": " "}',
        "{not json",
        '{"image": "gone.png", "caption": "again"}',
        '{"image": "ok.png", "caption": "also fine"}',
    ]
    path = _write_jsonl(tmp_path / "skip.jsonl", lines)
    out = it.build_image_text(path, broken_images, str(tmp_path / "tfds"), skip_bad=True, tokenizer_vocab_size=0)
    skipped = json.load(open(os.path.join(out, "skipped.json")))
    assert skipped["counts"] == {"bad_row": 1, "corrupt_image": 1, "empty_caption": 1, "missing_image": 2}
    assert skipped["lines"] == {"bad_row": [5], "corrupt_image": [3], "empty_caption": [4], "missing_image": [2, 6]}
    assert skipped["total"] == 5 and skipped["seen"] == 7
    assert "skipped 5 of 7" in capsys.readouterr().out
    assert list(tfds.builder_from_directory(out).info.splits) == ["train"]  # one image: nothing to hold out
    examples = _read(out, "train")
    assert [_texts(ex["captions"]) for ex in examples] == [["fine", "also fine"]]
    # Ids count every named path (anim.gif is not named): gone.png 0, img0.png 1, ok.png 2.
    assert examples[0]["image_id"] == 2


def test_empty_result_is_an_error_even_when_skipping(broken_images, tmp_path):
    path = _write_jsonl(tmp_path / "none.jsonl", ['{"image": "gone.png", "caption": "x"}'])
    with pytest.raises(ValueError, match=r"none\.jsonl: no valid rows; skipped 1 of 1"):
        it.build_image_text(path, broken_images, str(tmp_path / "tfds"), skip_bad=True)


def _bad_regions(case: str) -> dict[str, np.ndarray] | None:
    arrays = _regions(1, num=3)
    if case == "missing":
        return None
    if case == "no_regions":
        return {k: v[:0] for k, v in arrays.items()}
    if case == "rows":
        arrays["boxes"] = arrays["boxes"][:2]
    elif case == "range":
        arrays["boxes"][0, 2] = 1.5
    elif case == "order":
        arrays["boxes"][1] = [0.6, 0.1, 0.2, 0.5]
    elif case == "nan":
        arrays["features"][0, 0] = np.nan
    elif case == "dim":
        arrays["features"] = arrays["features"][:, :5]
    elif case == "no_probs":
        del arrays["class_probs"]
    elif case == "no_boxes":
        del arrays["boxes"]
    elif case == "object":
        arrays["features"] = np.array([None, 1], dtype=object)
    return arrays


@pytest.mark.parametrize("case,message", [
    ("missing", "regions file not found"), ("no_regions", r"no regions \(R = 0\)"),
    ("rows", "boxes has 2 rows, features has 3"), ("range", r"normalised to \[0, 1\]"),
    ("order", "ymin <= ymax"), ("nan", "features has non-finite values"),
    ("dim", r"\(D, C\) = \(5, 4\) differs from \(6, 4\)"), ("no_probs", r"\(D, C\) = \(6, None\) differs"),
    ("no_boxes", "missing array 'boxes'"), ("object", "cannot read it"),
])
def test_region_format_errors(images, tmp_path, case, message):
    root, _ = images
    annotations = _write_jsonl(tmp_path / "r.jsonl", [dict(image="img0.png", caption="a"),
                                                      dict(image="img1.png", caption="b")])
    regions = tmp_path / "regions"
    regions.mkdir()
    np.savez(regions / "img0.npz", **_regions(0, num=2))
    bad = _bad_regions(case)
    if bad is not None:
        np.savez(regions / "img1.npz", **bad)
    with pytest.raises(ValueError, match=r"r\.jsonl, line 2: ") as error:
        it.build_image_text(annotations, root, str(tmp_path / "tfds"), regions=str(regions), tokenizer_vocab_size=0)
    assert "img1.npz" in str(error.value) and re.search(message, str(error.value)), str(error.value)


# ----------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("raw,normalised", [
    ("Two", "2"), ("the dog.", "dog"), ("yes!", "yes"), ("Yes", "yes"), ("dont", "don't"), ("an apple", "apple"),
    ("2.5", "2.5"), ("1,000", "1000"), ("ten dogs", "10 dogs"), ("red/white", "red white"), ("a, b", "b"),
    ("  none\n", "0"), ("hot-dog", "hot dog"), ("it's", "it's"), ("whats up?", "what's up"),
])
def test_answer_normalisation_matches_official_eval(raw, normalised):
    assert vqa.normalize_answer(raw) == normalised


def test_answer_vocab_order_and_cap():
    answers = [["b", "a", "a"], ["c", "b", "b"], ["d", "", ""]]  # a 2, b 3, c 1, d 1, "" never
    assert vqa.build_answer_vocab(answers, 10) == ["b", "a", "c", "d"]
    assert vqa.build_answer_vocab(answers, 3) == ["b", "a", "c"]
    index = {"x": 0, "y": 1, "z": 2, "w": 3}
    ids, scores = vqa.soft_scores(["w"] + ["z"] * 2 + ["y"] * 3 + ["x"] * 4 + ["oov"], index)
    assert ids == [0, 1, 2, 3] and np.allclose(scores, [1.0, 1.0, 2 / 3, 1 / 3])


def _write_vqa(tmp, image_ids, questions, annotations=None, subtype=None) -> dict:
    """VQAv2 files for `questions` [(qid, image_id, text)] and `annotations` {qid: [10 answers]}."""
    os.makedirs(tmp, exist_ok=True)
    q = {"questions": [{"image_id": i, "question": t, "question_id": qid} for qid, i, t in questions]}
    if subtype:
        q["data_subtype"] = subtype
    files = {"questions": os.path.join(tmp, "questions.json"), "images": os.path.join(tmp, "images")}
    json.dump(q, open(files["questions"], "w"))
    for n, image_id in enumerate(image_ids):
        name = f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else f"{image_id}.png"
        _write_image(os.path.join(files["images"], name), seed=100 + n, fmt="JPEG" if subtype else None)
    if annotations is not None:
        files["annotations"] = os.path.join(tmp, "annotations.json")
        image_of = {qid: i for qid, i, _ in questions}
        json.dump({"annotations": [
            {"question_id": qid, "image_id": image_of[qid], "multiple_choice_answer": answers[0],
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
             "answer_type": "other", "question_type": "what"} for qid, answers in annotations.items()]},
            open(files["annotations"], "w"))
    if not subtype:
        files["image_pattern"] = "{image_id}.png"
    return files


# Train answers (normalised counts): no 9, dog 7, yes 6, don't 3, maybe 2, then "2", cat, zebra 1 each.
TRAIN_ANSWERS = {
    11: ["yes"] * 4 + ["no"] * 3 + ["maybe"] * 2 + ["Two"],
    12: ["the dog."] * 5 + ["dog"] * 2 + ["yes!"] * 2 + ["zebra"],
    13: ["dont"] * 3 + ["No"] * 6 + ["cat"],
}
VOCAB = ["no", "dog", "yes", "don't", "maybe", "2"]  # vocab_size=6: cat and zebra are out of vocabulary


@pytest.fixture(scope="module")
def vqa_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vqa")
    splits = {
        "train": _write_vqa(str(tmp / "train"), [1, 2], [(11, 1, "what?"), (12, 2, "who?"), (13, 1, "is it?")],
                            TRAIN_ANSWERS),
        "validation": _write_vqa(str(tmp / "val"), [5], [(21, 5, "really?")], {21: ["Yes"] * 9 + ["cat"]}),
        "test": _write_vqa(str(tmp / "test"), [7], [(31, 7, "why?")]),
    }
    return vqa.build_vqa(splits, str(tmp / "tfds"), name="hand", vocab_size=6)


def test_vqa_vocab_scores_and_features(vqa_build):
    path = vqa_build
    assert json.load(open(os.path.join(path, "answer_vocab.json"))) == VOCAB
    assert os.path.exists(os.path.join(path, "tokenizer.json"))
    train = {int(ex["question_id"]): ex for ex in _read(path, "train")}
    assert list(train) == [11, 12, 13]
    expected = {11: ([0, 2, 4, 5], [1, 1, 2 / 3, 1 / 3]), 12: ([1, 2], [1, 2 / 3]), 13: ([0, 3], [1, 1])}
    for qid, (ids, scores) in expected.items():
        assert list(train[qid]["answer_ids"]) == ids
        np.testing.assert_allclose(train[qid]["answer_scores"], scores, rtol=1e-6)
    assert _texts(train[12]["answers"]) == ["dog"] * 7 + ["yes"] * 2 + ["zebra"]
    assert train[13]["image_id"] == 1 and _texts([train[13]["question"]]) == ["is it?"]
    (val,) = _read(path, "validation")
    assert list(val["answer_ids"]) == [2] and np.allclose(val["answer_scores"], [1.0])
    (test,) = _read(path, "test")
    assert len(test["answers"]) == len(test["answer_ids"]) == len(test["answer_scores"]) == 0
    assert test["image"].shape == (16, 16, 3)


def test_vqa_default_coco_pattern_and_given_vocab(tmp_path):
    files = _write_vqa(str(tmp_path), [9], [(1, 9, "q?")], {1: ["Two"] * 10}, subtype="val2014")
    assert os.path.exists(os.path.join(files["images"], "COCO_val2014_000000000009.jpg"))
    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps(["1", "2"]))
    config = vqa.VqaConfig(name="x", splits={"validation": files}, answer_vocab=str(vocab_file))
    plan = vqa.plan_vqa(config)
    assert plan.vocab == ["1", "2"] and plan.splits["validation"].examples[0]["answers"] == ["2"] * 10
    with pytest.raises(ValueError, match="answer_vocab"):
        vqa.plan_vqa(vqa.VqaConfig(name="x", splits={"validation": files}))


def test_vqa_errors_and_skip(tmp_path):
    questions = [(5, 1, "a?"), (6, 2, "b?"), (7, 1, "c?")]  # there is no image 2
    files = _write_vqa(str(tmp_path), [1], questions, {5: ["yes"] * 10, 6: ["no"] * 10, 7: ["no"] * 10})
    with pytest.raises(ValueError, match=r"question_id 6 \(image_id 2\): image file not found: .*2\.png"):
        vqa.build_vqa({"train": files}, str(tmp_path / "tfds"))
    assert not os.path.exists(tmp_path / "tfds")  # validated before anything is written
    no_q7 = _write_vqa(str(tmp_path / "b"), [1], questions, {5: ["yes"] * 10, 6: ["no"] * 10})
    with pytest.raises(ValueError, match=r"question_id 7 \(image_id 1\) has no annotation"):
        vqa.plan_split("train", no_q7, skip_bad=False)
    plan = vqa.plan_split("train", no_q7, skip_bad=True)
    assert [ex["question_id"] for ex in plan.examples] == [5]
    assert plan.report.to_json()["question_ids"] == {"missing_annotation": [7], "missing_image": [6]}
    assert plan.report.to_json()["counts"] == {"missing_annotation": 1, "missing_image": 1}
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"cannot read .*broken\.json"):
        vqa.plan_split("train", dict(files, questions=str(tmp_path / "broken.json")), False)
    (tmp_path / "nokey.json").write_text('{"questions": [{"image_id": 1, "question": "q?"}]}')
    with pytest.raises(ValueError, match=r"nokey\.json: questions\[0\] needs an int question_id"):
        vqa.plan_split("train", dict(files, questions=str(tmp_path / "nokey.json")), False)


def test_easy_vqa_through_the_vqa_builder(tmp_path):
    splits = {s: vqa.write_easy_vqa_as_vqav2(str(tmp_path / "files"), s, limit=24) for s in ("train", "test")}
    questions = json.load(open(splits["train"]["questions"]))["questions"]
    assert [q["question_id"] for q in questions] == list(range(24))
    path = vqa.build_vqa(splits, str(tmp_path / "tfds"), name="easy_vqa", tokenizer_vocab_size=0)
    vocab = json.load(open(os.path.join(path, "answer_vocab.json")))
    assert set(vocab) <= set(vqa.normalize_answer(a) for a in __import__("easy_vqa").get_answers())
    for split in ("train", "test"):
        examples = _read(path, split)
        assert len(examples) == 24
        for ex in examples:
            answers = _texts(ex["answers"])
            assert len(answers) == 10 and len(set(answers)) == 1 and ex["image"].shape == (64, 64, 3)
            if split == "train" or answers[0] in vocab:  # the vocabulary comes from the train answers
                assert [vocab[i] for i in ex["answer_ids"]] == answers[:1] and list(ex["answer_scores"]) == [1.0]
            else:
                assert len(ex["answer_ids"]) == len(ex["answer_scores"]) == 0


# ----------------------------------------------------------------------------------------------- CLI


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "mmjax.data.build", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_cli_builds_and_reports_errors(images, tmp_path):
    root, _ = images
    good = _write_jsonl(tmp_path / "good.jsonl", [dict(image="img0.png", caption="x", split="train"),
                                                  dict(image="img1.png", caption="y", split="validation")])
    result = _cli("image_text", f"--annotations={good}", f"--images={root}", f"--out={tmp_path / 'tfds'}",
                  "--tokenizer_vocab_size=0")
    assert result.returncode == 0, result.stderr[-2000:]
    expected_dir = os.path.join(str(tmp_path / "tfds"), "mmjax_image_text", "good", "1.0.0")
    assert f"prepared dataset: {expected_dir}" in result.stdout
    assert "train: 1 examples" in result.stdout and "validation: 1 examples" in result.stdout
    assert os.path.exists(os.path.join(expected_dir, "dataset_info.json"))

    bad = _write_jsonl(tmp_path / "bad.jsonl", [dict(image="img0.png", caption="x"),
                                                dict(image="img1.png", caption="")])
    result = _cli("image_text", f"--annotations={bad}", f"--images={root}", f"--out={tmp_path / 'tfds'}")
    assert result.returncode == 2
    assert "error: " in result.stderr and "bad.jsonl, line 2: empty caption" in result.stderr
    assert "Traceback" not in result.stderr


def test_importing_the_cli_defines_no_flags():
    from absl import flags

    importlib.import_module("mmjax.data.build")
    assert "annotations" not in flags.FLAGS and "out" not in flags.FLAGS
