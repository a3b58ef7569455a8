"""Small own datasets: build warnings, --eval_count, every bad row listed in file order, the trainer's small-data
warnings, recall@K only where it means something, and the metrics table's order and number formats."""

import hashlib
import json
import math
import os
from unittest import mock

import ml_collections
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmjax.data import audio_text as at
from mmjax.data import build
from mmjax.data import image_text as it
from mmjax.data import pipeline, sources, vqa
from mmjax.evaluation import report, retrieval


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[str, list[str]]:
    """17 tiny PNGs (the user report's dataset size) and their relative paths."""
    root = str(tmp_path_factory.mktemp("photos"))
    paths = [f"p{i:02d}.png" for i in range(17)]
    for i, p in enumerate(paths):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(os.path.join(root, p))
    return root, paths


def _smallest_sha(paths, n):
    return set(sorted(paths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())[:n])


def _config(annotations, images, **kw) -> it.ImageTextConfig:
    return it.ImageTextConfig(name="t", annotations=str(annotations), images=images, **kw)


@pytest.fixture(scope="module")
def seventeen(photos, tmp_path_factory):
    """The 17 photos built with the defaults (5% holdout: 1 validation image, 16 train); (path, build stdout)."""
    root, paths = photos
    tmp = tmp_path_factory.mktemp("seventeen")
    annotations = _write_jsonl(tmp / "caps.jsonl", [dict(image=p, caption=f"photo {i}") for i, p in enumerate(paths)])
    with mock.patch("builtins.print") as printed:
        path = it.build_image_text(annotations, root, str(tmp / "tfds"), tokenizer_vocab_size=0)
    return path, "\n".join(" ".join(map(str, c.args)) for c in printed.call_args_list)


# ----------------------------------------------------------------------------------------------- build warnings


def test_build_of_17_images_warns_about_its_one_validation_image(seventeen):
    _, out = seventeen
    assert "images per split: train 16, validation 1" in out
    assert ("warning: validation split has 1 image: retrieval metrics on it mean little (R@k for k >= 1 is always "
            "1.0; R@1 by chance: 1); hold out more with --eval_count=N") in out


def test_eval_count_holds_out_exactly_n_images(photos, tmp_path):
    root, paths = photos
    annotations = _write_jsonl(tmp_path / "c.jsonl", [dict(image=p, caption=f"c {i}") for i, p in enumerate(paths)]
                               + [dict(image=paths[0], caption="second caption of p00")])
    plan = it.plan_image_text(_config(annotations, root, eval_count=10))
    held = {ex["image_path"] for ex in plan.examples["validation"]}
    assert held == _smallest_sha(paths, 10) and len(plan.examples["train"]) == 7
    assert plan.warnings == []  # 10 validation images: no warning
    assert it.plan_image_text(_config(annotations, root, eval_count=3)).warnings[0].startswith(
        "validation split has 3 images")
    assert "validation" not in it.plan_image_text(_config(annotations, root, eval_count=0)).examples
    with pytest.raises(ValueError, match=r"^eval_count=17 leaves no images to train on \(there are 17\); give at "
                                         r"most 16$"):
        it.plan_image_text(_config(annotations, root, eval_count=17))
    with pytest.raises(ValueError, match=r"^give --eval_count \(3\) or --eval_fraction \(0.2\), not both$"):
        it.plan_image_text(_config(annotations, root, eval_count=3, eval_fraction=0.2))
    split_rows = _write_jsonl(tmp_path / "s.jsonl", [dict(image=paths[0], caption="x", split="train")])
    with pytest.raises(ValueError, match="rows name their splits, so nothing is held out; drop --eval_count"):
        it.plan_image_text(_config(split_rows, root, eval_count=1))


def test_cli_passes_eval_count_and_refuses_it_with_eval_fraction(photos, tmp_path):
    root, paths = photos
    annotations = _write_jsonl(tmp_path / "cli.jsonl", [dict(image=p, caption=f"c {i}") for i, p in enumerate(paths)])
    values = dict(out=str(tmp_path / "tfds"), name=None, skip_bad=False, tokenizer_vocab_size=0,
                  file_format="tfrecord", num_shards=None, annotations=annotations, images=root, regions=None,
                  eval_fraction=0.05, eval_count=None)
    with pytest.raises(ValueError, match=r"give --eval_count \(4\) or --eval_fraction \(0.1\), not both"):
        build.run("image_text", dict(values, eval_count=4, eval_fraction=0.1))
    with mock.patch("builtins.print"):
        path = build.run("image_text", dict(values, eval_count=4))
    splits = {s: v.num_examples for s, v in sources.tfds.builder_from_directory(path).info.splits.items()}
    assert splits == {"train": 13, "validation": 4}


def test_audio_eval_count_and_warning(tmp_path):
    clips = [f"c{i}.wav" for i in range(5)]
    for i, c in enumerate(clips):
        sf.write(tmp_path / c, 0.1 * np.sin(np.arange(800) * (i + 1) / 10), 8000, subtype="PCM_16")
    annotations = _write_jsonl(tmp_path / "a.jsonl", [dict(audio=c, caption=f"clip {i}") for i, c in enumerate(clips)])
    config = at.AudioTextConfig(name="a", annotations=annotations, audio=str(tmp_path), sample_rate=8000,
                                eval_count=2)
    plan = at.plan_audio_text(config)
    assert {ex["audio_path"] for ex in plan.examples["validation"]} == _smallest_sha(clips, 2)
    assert plan.warnings[0].startswith("validation split has 2 clips: retrieval metrics on it mean little")


# ----------------------------------------------------------------------------------------------- bad rows


def test_every_bad_row_is_listed_in_file_order(photos, tmp_path):
    root, _ = photos
    # Bad rows found at different stages (row fields first, image files later) and more than MAX_LISTED of them.
    lines = []
    for i in range(25):
        lines.append('{"image": "gone.png", "caption": "x"}' if i % 2 else '{"image": "p00.png", "caption": " "}')
    lines.insert(3, '{"image": "p01.png", "caption": "fine"}')
    lines.insert(7, "{not json")
    annotations = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as error:
        it.plan_image_text(_config(annotations, root))
    text = str(error.value).splitlines()
    assert text[0] == (f"26 bad rows in {annotations}: fix them, or pass --skip_bad (skip_bad=True) to build without "
                       f"them")
    listed = [int(line.split(", line ")[1].split(":")[0]) for line in text[1:21]]
    assert listed == [n for n in range(1, 23) if n != 4][:20]  # line 4 is the good one
    assert "line 8: invalid JSON" in text[7] and "line 2: image file not found" in text[2]
    assert text[21] == "  ... and 6 more" and len(text) == 22

    plan = it.plan_image_text(_config(annotations, root, skip_bad=True))  # the summary lists them the same way
    summary = plan.report.summary().splitlines()
    assert summary[0] == (f"skipped 26 of 27 ({annotations}): bad_row 1, empty_caption 13, missing_image 12")
    assert [line.strip() for line in summary[1:]] == [line.strip() for line in text[1:]]


def test_audio_bad_rows_in_file_order(tmp_path):
    sf.write(tmp_path / "ok.wav", np.zeros(800), 8000, subtype="PCM_16")
    annotations = _write_jsonl(tmp_path / "a.jsonl", [dict(audio="gone.wav", caption="x"),  # found last
                                                      dict(audio="ok.wav", caption=" "),  # found first
                                                      dict(audio="ok.wav", caption="fine")])
    with pytest.raises(ValueError, match=r"^2 bad rows in .*a\.jsonl: fix them") as error:
        at.plan_audio_text(at.AudioTextConfig(name="a", annotations=annotations, audio=str(tmp_path),
                                              sample_rate=8000))
    lines = str(error.value).splitlines()
    assert "line 1: audio file not found" in lines[1] and "line 2: empty caption" in lines[2]


def test_vqa_bad_questions_of_every_split_in_one_error(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "1.png")

    def split(name, questions):
        path = tmp_path / f"{name}_q.json"
        path.write_text(json.dumps({"questions": questions}))
        return dict(questions=str(path), images=str(images), image_pattern="{image_id}.png")

    # train: question 0's image is missing (found after question 1's bad fields); validation: one bad question.
    splits = {"train": split("train", [{"question_id": 1, "image_id": 9, "question": "a?"},
                                       {"question_id": 2, "image_id": 1},
                                       {"question_id": 3, "image_id": 1, "question": "c?"}]),
              "validation": split("val", [{"question_id": 4, "image_id": 1, "question": " "}])}
    with pytest.raises(ValueError) as error:
        vqa.plan_vqa(vqa.VqaConfig(name="v", splits=splits, answer_vocab=None))
    lines = str(error.value).splitlines()
    assert lines[0].startswith("3 bad questions in 2 files: fix them")
    assert "train_q.json: 2" in lines[1] and "question_id 1 (image_id 9): image file not found" in lines[2]
    assert "questions[1] needs an int question_id" in lines[3]
    assert "val_q.json: 1" in lines[4] and "questions[0] needs" in lines[5]


# ----------------------------------------------------------------------------------------------- trainer warnings


def _retrieval_evals(ks=(1, 5, 10)) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"retrieval": dict(kind="retrieval", ks=ks, data=dict(source=None, split=None))})


def test_small_data_warnings_for_17_images_at_batch_128(seventeen):
    path, _ = seventeen
    data = pipeline.default_data_config()
    data.sources.main = sources.source_config(dir=path)
    meta = pipeline.dataset_meta(data)
    train, evaluation = pipeline.small_data_warnings(data, meta, 128, _retrieval_evals())
    assert train == ("the train split (train of data.sources.main) has 16 images < batch 128: each batch repeats "
                     "images ~8x; a contrastive loss cannot fall below ln 8 = 2.08; lower "
                     "--config.train.batch_size (to at most 16)")
    assert evaluation.startswith("evals.retrieval: the validation split of data.sources.main has 1 image: R@1, R@5, "
                                 "R@10 over 1 candidate would always be 1.0 and are not reported")
    assert "--eval_count=N" in evaluation
    # Without config.evals: the default evaluation split, judged by its size alone.
    (generic,) = pipeline.small_data_warnings(data, meta, 16)
    assert generic.startswith("evaluation: the validation split of data.sources.main has 1 image: its metrics move "
                              "in steps of 1")
    # 16 images at batch 16, evaluated on 16: nothing to warn about.
    data.sources.main.eval_split = "train"
    assert pipeline.small_data_warnings(data, meta, 16, _retrieval_evals()) == []
    # 16 candidates: R@10 is kept, R@20 is not.
    (dropped,) = pipeline.small_data_warnings(data, meta, 16, _retrieval_evals(ks=(1, 10, 20)))
    assert "has 16 images: R@20 over 16 candidates would always be 1.0" in dropped


# ----------------------------------------------------------------------------------------------- retrieval


def test_recall_at_k_not_below_the_candidates_is_dropped_and_warned_once():
    sim = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.0, 0.3, 0.7]])
    retrieval._warned.clear()
    with mock.patch.object(retrieval.logging, "warning") as warning:
        got = retrieval.recall(sim, np.arange(3), ks=(1, 5, 10))
        assert retrieval.recall(sim, np.arange(3), ks=(1, 5, 10)) == got  # the same sizes: no second warning
    assert got == {"i2t_r@1": 1.0, "t2i_r@1": 1.0}
    assert warning.call_count == 2  # once per direction
    assert "only %d candidate(s)" in warning.call_args.args[0] and 3 in warning.call_args.args
    one = retrieval.recall(np.ones((1, 1)), np.arange(1), ks=(1, 5))
    assert one == {}  # one image, one text: nothing to report
    pair = retrieval.recall_by_relevance(np.array([[0, 1]]), np.array([[0], [0]]), np.array([[True, False]]), (1, 5),
                                         ("audio", "image"))
    assert set(pair) == {"audio_to_image_r@1", "audio_to_image_r@1_chance", "image_to_audio_r@1_chance"}


def test_recall_chance():
    assert retrieval.recall_chance(np.arange(3), 3) == pytest.approx({"i2t_r@1_chance": 1 / 3,
                                                                      "t2i_r@1_chance": 1 / 3})
    # Three images, captions A, A, B: an A is right for two images.
    assert retrieval.recall_chance(np.arange(3), 3, np.array([0, 0, 1])) == pytest.approx(
        {"i2t_r@1_chance": (2 + 2 + 1) / 9, "t2i_r@1_chance": (2 + 2 + 1) / 9})
    assert retrieval.recall_chance(np.array([0, 0, 1]), 2) == pytest.approx({"i2t_r@1_chance": 0.5,
                                                                             "t2i_r@1_chance": 0.5})


# ----------------------------------------------------------------------------------------------- metrics table


def test_metrics_are_ordered_naturally_and_counts_print_as_integers():
    metrics = {"retrieval/i2t_r@10": 0.9, "retrieval/num_images": 1000.0, "retrieval/i2t_r@5": 0.7,
               "retrieval/i2t_r@1": 0.3, "retrieval/i2t_r@1_chance": 0.001, "itm/acc": 0.75,
               "vqa/unanswerable": 3.0, "vqa/accuracy": 0.5}
    assert [k for k, _ in report.ordered(metrics)] == [
        "retrieval/i2t_r@1", "retrieval/i2t_r@1_chance", "retrieval/i2t_r@5", "retrieval/i2t_r@10",
        "retrieval/num_images", "itm/acc", "vqa/accuracy", "vqa/unanswerable"]
    assert report.format_value("retrieval/num_images", 1000.0) == "1000"
    assert report.format_value("vqa/unanswerable", 3.0) == "3"
    assert report.format_value("itm/acc", 1.0) == "1.0000"  # an integral score is still a score
    assert report.format_value("lr", 3e-5) == "3e-05" and report.format_value("x", math.nan) == "nan"
    table = report.metrics_table(metrics).splitlines()
    assert table[2:6] == ["| retrieval | i2t_r@1 | 0.3000 |", "| retrieval | i2t_r@1_chance | 0.0010 |",
                          "| retrieval | i2t_r@5 | 0.7000 |", "| retrieval | i2t_r@10 | 0.9000 |"]
    assert table[6] == "| retrieval | num_images | 1000 |"
