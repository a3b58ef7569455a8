"""Built datasets through the streaming pipeline and the trainer: a captions + VQA mixture, VQA soft scores as a
batch key, and UNITER on precomputed region features. Everything is written offline by the tests."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data import image_text, pipeline, sources, vqa

REGION_DIM, REGION_CLASSES = 16, 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 PNGs with two captions each, and one region file (3-5 regions with class probabilities) per image."""
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        img = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        rows += [{"image": f"{i}.png", "caption": f"picture number {i}", "split": "train" if i < 9 else "val"},
                 {"image": f"{i}.png", "caption": f"another view {i}", "split": "train" if i < 9 else "val"}]
        r = 3 + i % 3
        boxes = np.sort(rng.uniform(0, 1, (r, 2, 2)), axis=1).transpose(0, 2, 1).reshape(r, 4)[:, [0, 2, 1, 3]]
        probs = rng.dirichlet(np.ones(REGION_CLASSES), r).astype(np.float32)
        (root / "regions").mkdir(exist_ok=True)
        np.savez(root / "regions" / f"{i}.npz", features=rng.normal(size=(r, REGION_DIM)).astype(np.float32),
                 boxes=boxes.astype(np.float32), class_probs=probs)
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def captions_dir(folder):
    return image_text.build_image_text(str(folder / "captions.jsonl"), str(folder / "images"),
                                       str(folder / "tfds"), regions=str(folder / "regions"),
                                       tokenizer_vocab_size=300)


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    """easy-vqa (the first questions of each split) written as VQAv2 files and built by the VQA builder."""
    root = tmp_path_factory.mktemp("vqa")
    splits = {"train": vqa.write_easy_vqa_as_vqav2(str(root / "files"), "train", limit=60),
              "validation": vqa.write_easy_vqa_as_vqav2(str(root / "files"), "test", limit=20)}
    return vqa.build_vqa(splits, str(root / "tfds"), name="easy_vqa", tokenizer_vocab_size=300)


def _data_config(captions_dir, vqa_dir, tokenizer):
    c = pipeline.default_data_config()
    c.image_size, c.max_len = 16, 16
    c.tokenizer = tokenizer
    c.sources.captions = sources.source_config(dir=captions_dir, eval_split="val", shuffle_buffer=4)
    c.sources.vqa = sources.source_config(dir=vqa_dir, kind="vqa", weight=1.0, shuffle_buffer=16,
                                            text=dict(vqa="question_answer"),
                                            image=dict(randaugment=dict(num_layers=2)))
    return c


def _combined_tokenizer(tmp_path, *dirs):
    """One WordPiece over both datasets' texts (each build trained its own on its texts)."""
    from mmjax.data.tokenizer import train_wordpiece

    texts = []
    for d in dirs:
        with open(os.path.join(d, "vocab.txt")) as f:
            texts += [w for w in f.read().split() if not w.startswith(("##", "["))]
    return train_wordpiece([" ".join(texts)] * 2, tmp_path / "tok", vocab_size=2000)


def test_captions_and_vqa_mixture_each_with_its_preprocessing(captions_dir, vqa_dir, tmp_path):
    c = _data_config(captions_dir, vqa_dir, _combined_tokenizer(tmp_path, captions_dir, vqa_dir))
    assert c.sources.vqa.image.randaugment.magnitude == 9.0  # a nested override keeps the other defaults
    tok = pipeline.load_tokenizer(c)
    batches = [b for _, b in zip(range(6), pipeline.train_iterator(c, tok, global_batch_size=16, seed=0,
                                                                   process_index=0, process_count=1))]
    source = np.concatenate([b["source"] for b in batches])
    assert 0.3 < np.mean(source == 1) < 0.7  # equal weights, 96 draws
    # The VQA rows' texts are "question answer" from the built dataset; the caption rows' are their captions.
    questions = {}
    ds = tfds.builder_from_directory(vqa_dir).as_dataset(split="train")
    vocab = sources.answer_vocab(tfds.builder_from_directory(vqa_dir))
    for ex in tfds.as_numpy(ds):
        best = vocab[ex["answer_ids"][np.argmax(ex["answer_scores"])]]
        questions.setdefault(int(ex["image_id"]), set()).add(f"{ex['question'].decode()} {best}".lower())
    captions = {int(ex["image_id"]): {t.decode() for t in ex["captions"]}
                for ex in tfds.as_numpy(tfds.builder_from_directory(captions_dir).as_dataset(split="train"))}
    for b in batches:
        texts = tok.decode(b["text_ids"])
        for text, s, image_id in zip(texts, b["source"], b["image_id"]):
            if s == 1:
                assert text.replace(" ?", "?") in {q.replace(" ?", "?") for q in questions[int(image_id)]}, text
            else:
                assert text in captions[int(image_id)], text
    assert all(b["image"].shape == (16, 16, 16, 3) for b in batches)


def test_vqa_answers_as_soft_score_vectors(vqa_dir, tmp_path):
    c = pipeline.default_data_config()
    c.image_size, c.max_len, c.answers = 16, 16, True
    c.sources.vqa = sources.source_config(dir=vqa_dir, kind="vqa")
    tok = pipeline.load_tokenizer(c)  # the tokenizer saved with the VQA build
    batches = list(pipeline.eval_batches(c, tok, global_batch_size=8, process_index=0, process_count=1))
    vocab = sources.answer_vocab(tfds.builder_from_directory(vqa_dir))
    expected = {}
    for ex in tfds.as_numpy(tfds.builder_from_directory(vqa_dir).as_dataset(split="validation")):
        dense = np.zeros(len(vocab), np.float32)
        dense[ex["answer_ids"]] = ex["answer_scores"]
        expected.setdefault(int(ex["image_id"]), []).append(dense)
    real = 0
    for b in batches:
        assert b["answers"].shape == (8, len(vocab))
        for answers, image_id, m in zip(b["answers"], b["image_id"], b["mask"]):
            if m:
                real += 1
                assert any(np.array_equal(answers, e) for e in expected[int(image_id)])
                assert set(np.unique(answers)) <= {0.0, 1.0}  # easy-vqa: 10 identical answers -> score 1
            else:
                assert not answers.any()
    assert real == 20


def test_uniter_trains_on_precomputed_regions(captions_dir, load_config, tmp_path):
    from mmjax import train

    c = load_config("uniter.py")
    data = pipeline.default_data_config()
    data.sources.main = sources.source_config(dir=captions_dir, eval_split="val", shuffle_buffer=4)
    data.regions.update(enabled=True, max_regions=4)
    data.image_size, data.max_len = 16, c.data.max_len
    c.data = data
    c.task.itm.negatives = dict(in_batch=1.0)  # no attribute-swapped captions in this data
    c.train.update(steps=4, batch_size=8, log_every=2)
    for evaluator in c.evals.values():
        evaluator.update(every_steps=4, batch_size=8)  # the 8 fake devices split every batch
    c.checkpoint.every_steps = 4
    metrics = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert {"itm/acc", "mlm/acc", "mrc/acc"} <= set(metrics)
    assert "itm/acc_other_shape" not in metrics  # no attribute-swapped captions for this data
    # The region width and class count came from the data.
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["model"]["region_feat_dim"], saved["model"]["num_region_classes"]) == (REGION_DIM, REGION_CLASSES)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert all(np.isfinite(r[k]) for r in train_records for k in ("mrfr_loss", "mrc_loss", "mlm_loss", "itm_loss"))


def test_trainer_resumes_a_mixture_exactly(captions_dir, vqa_dir, load_config, tmp_path, monkeypatch):
    """Killed after the checkpoint at step 4 and rerun, a CLIP run on an augmented captions + VQA mixture logs
    the same losses as the uninterrupted run: the trainer restarts the input at the restored step."""
    from mmjax import train

    c = load_config("clip.py")
    data = _data_config(captions_dir, vqa_dir, _combined_tokenizer(tmp_path, captions_dir, vqa_dir))
    data.image_size, data.max_len = c.data.image_size, c.data.max_len
    c.data = data
    c.train.update(steps=8, batch_size=16, log_every=1)
    del c.evals["zero_shot"]  # no classes in this data
    c.evals.retrieval.update(every_steps=8, batch_size=8)
    c.checkpoint.update(every_steps=4, async_save=False)

    straight = train.train_and_evaluate(c, str(tmp_path / "straight"))
    real_iterator = train.pipeline.train_iterator

    def dying_iterator(*args, **kwargs):
        for i, batch in enumerate(real_iterator(*args, **kwargs)):
            if i == 4 + train.DEVICE_PREFETCH:  # the trainer pulls batches that far ahead of its step
                raise KeyboardInterrupt("killed")
            yield batch

    monkeypatch.setattr(train.pipeline, "train_iterator", dying_iterator)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(c, str(tmp_path / "resumed"))
    monkeypatch.setattr(train.pipeline, "train_iterator", real_iterator)
    resumed = train.train_and_evaluate(c, str(tmp_path / "resumed"))

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}

    a, b = losses("straight"), losses("resumed")
    assert sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in range(5, 9)], [a[s] for s in range(5, 9)], rtol=1e-5)
    np.testing.assert_allclose(resumed["retrieval/i2t_r@1"], straight["retrieval/i2t_r@1"], atol=1e-6)
