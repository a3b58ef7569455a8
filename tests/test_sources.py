"""Data sources read through the pipeline: catalogue names, prepared directories, both shard formats, mixtures,
per-process shards, eval padding, exact resume, precomputed regions and clear errors. All data is written by the
tests (offline)."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data import pipeline, sources
from mmjax.data.tokenizer import train_wordpiece

NUM_TRAIN, NUM_TEST = 37, 11
REGION_DIM, REGION_CLASSES = 5, 3


def _image(i: int) -> np.ndarray:
    """A 12x12 image whose pixels encode its id (so a batch's images can be traced back)."""
    img = np.zeros((12, 12, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = i % 256, i // 256, 200
    return img


class MmjaxTestCaptions(tfds.core.GeneratorBasedBuilder):
    """A tiny image-caption dataset with variable-length precomputed regions (registered like a catalogue name)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(12, 12, 3)),
            "image_id": np.int64,
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "region_features": tfds.features.Tensor(shape=(None, REGION_DIM), dtype=np.float32),
            "region_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "region_class_probs": tfds.features.Tensor(shape=(None, REGION_CLASSES), dtype=np.float32),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, NUM_TRAIN), "test": self._generate_examples(1000, NUM_TEST)}

    def _generate_examples(self, start, n):
        for i in range(start, start + n):
            r = i % 4 + 1
            yield i, {"image": _image(i), "image_id": i,
                      "captions": [f"caption {i} first", f"caption {i} second"],
                      "region_features": (np.full((r, REGION_DIM), i) + np.arange(r)[:, None]).astype(np.float32),
                      "region_boxes": np.tile(np.array([[0.0, 0.0, 0.5, 0.5]], np.float32), (r, 1)),
                      "region_class_probs": np.tile(np.eye(REGION_CLASSES, dtype=np.float32)[i % 3], (r, 1))}


class MmjaxTestManual(tfds.core.GeneratorBasedBuilder):
    """A catalogue-style dataset whose source files the user places in manual_dir (like ImageNet's)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place captions.txt (one caption per line) in manual_dir."

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(12, 12, 3)), "image_id": np.int64, "captions": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples(dl_manager.manual_dir / "captions.txt")}

    def _generate_examples(self, path):
        for i, text in enumerate(path.read_text().splitlines()):
            yield i, {"image": _image(i), "image_id": i, "captions": text}


def _prepare(tmp_path_factory, file_format: str) -> str:
    """data_dir with mmjax_test_captions prepared in 4 shards per split, plus a tokenizer for its captions."""
    data_dir = str(tmp_path_factory.mktemp(f"tfds_{file_format}"))
    builder = MmjaxTestCaptions(data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
    texts = [f"caption {i} first second" for i in range(2000)]
    train_wordpiece(texts, os.path.join(data_dir, "tok"), vocab_size=200)
    return data_dir


@pytest.fixture(scope="module")
def captions_dir(tmp_path_factory):
    """The test dataset in TFRecord shards (sequential reads, shuffle buffer)."""
    return _prepare(tmp_path_factory, "tfrecord")


@pytest.fixture(scope="module")
def array_record_dir(tmp_path_factory):
    """The test dataset in ArrayRecord shards (random access, full permutations)."""
    return _prepare(tmp_path_factory, "array_record")


@pytest.fixture(params=["captions_dir", "array_record_dir"], ids=["tfrecord", "array_record"])
def any_dir(request):
    """Both shard formats, for the properties every source must have."""
    return request.getfixturevalue(request.param)


def _config(captions_dir, **source):
    c = pipeline.default_data_config()
    c.image_size, c.max_len = 8, 8
    c.tokenizer = os.path.join(captions_dir, "tok", "tokenizer.json")
    c.sources.cap = sources.source_config(name="mmjax_test_captions", data_dir=captions_dir, eval_split="test",
                                            shuffle_buffer=8, **source)
    return c


def _ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b["image_id"]]


def test_catalogue_source_files_are_sharded(captions_dir):
    builder = sources.open_source("cap", _config(captions_dir).sources.cap)
    files, _, takes = sources.read_plan(builder, "train", 0, 1)
    assert len(files) == 4 and sum(takes) == NUM_TRAIN


def test_train_batches_decode_the_stored_images(captions_dir):
    c = _config(captions_dir)
    tok = pipeline.load_tokenizer(c)
    batch = next(pipeline.train_iterator(c, tok, global_batch_size=6, seed=0, process_index=0, process_count=1))
    assert batch["image"].shape == (6, 8, 8, 3) and batch["text_ids"].shape == (6, 8)
    # Pixels encode the id: red = id / 255 normalised by mean = std = 0.5 (the resize keeps a constant image).
    red = (batch["image"][:, :, :, 0] * 0.5 + 0.5) * 255
    np.testing.assert_allclose(red, np.broadcast_to(batch["image_id"][:, None, None] % 256, red.shape), atol=0.01)
    for ids, image_id in zip(batch["text_ids"], batch["image_id"]):
        text = tok.decode(ids)[0]
        assert text in (f"caption {image_id} first", f"caption {image_id} second"), text


def test_one_epoch_per_process_is_disjoint_and_complete(any_dir):
    # 3 processes over 4 files: each reads its own even slice; together one epoch is every example exactly once.
    c = _config(any_dir)
    tok = pipeline.load_tokenizer(c)
    seen = []
    for p in range(3):
        n_local = len(range(NUM_TRAIN)[p::3])  # even_splits sizes: 13, 12, 12
        it = pipeline.train_iterator(c, tok, global_batch_size=3, seed=1, process_index=p, process_count=3)
        ids = _ids([next(it) for _ in range(n_local)])
        assert len(set(ids)) == n_local, f"process {p} repeats examples within its epoch"
        seen.append(set(ids))
    assert set.union(*seen) == set(range(NUM_TRAIN))
    assert sum(len(s) for s in seen) == NUM_TRAIN


def test_fewer_files_than_processes(any_dir):
    # The test split is one file per shard too, but 11 examples over 8 processes: files are split by range.
    c = _config(any_dir)
    tok = pipeline.load_tokenizer(c)
    per_process = [list(pipeline.eval_batches(c, tok, global_batch_size=8, process_index=p, process_count=8))
                   for p in range(8)]
    assert len({len(b) for b in per_process}) == 1
    real = [i for batches in per_process for b in batches for i, m in zip(b["image_id"], b["mask"]) if m > 0]
    assert sorted(real) == list(range(1000, 1000 + NUM_TEST))


def test_eval_padding_two_processes(any_dir):
    c = _config(any_dir)
    tok = pipeline.load_tokenizer(c)
    runs = [list(pipeline.eval_batches(c, tok, global_batch_size=8, process_index=p, process_count=2))
            for p in range(2)]
    # 11 examples, 6 + 5 per process, 4 per process per batch: both run 2 batches; padding is masked.
    assert [len(r) for r in runs] == [2, 2]
    masks = [np.concatenate([b["mask"] for b in r]) for r in runs]
    np.testing.assert_array_equal(masks[0], [1] * 6 + [0] * 2)
    np.testing.assert_array_equal(masks[1], [1] * 5 + [0] * 3)
    ids = [np.concatenate([b["image_id"] for b in r]) for r in runs]
    assert set(ids[0][:6]).isdisjoint(ids[1][:5])
    assert sorted(np.concatenate([ids[0][:6], ids[1][:5]])) == list(range(1000, 1000 + NUM_TEST))
    assert np.all(ids[0][6:] == -1) and np.all(runs[0][-1]["image"][-2:] == 0)
    # Eval uses caption 0 and no augmentation: the same batches every time.
    again = list(pipeline.eval_batches(c, tok, global_batch_size=8, process_index=0, process_count=2))
    for a, b in zip(runs[0], again):
        np.testing.assert_array_equal(a["text_ids"], b["text_ids"])


def _augmented(captions_dir):
    return _config(captions_dir, image=dict(random_resized_crop=True, flip=True,
                                            randaugment=dict(num_layers=2, magnitude=9.0)))


@pytest.mark.parametrize("process_index", [0, 1])
def test_exact_resume_with_augmentation(any_dir, process_index):
    # Batch k of a run restarted at step k equals batch k of the uninterrupted run: images (augmented), captions
    # and ids, across epoch boundaries (37 examples / 2 processes, 5 per process-batch: an epoch every ~4 steps).
    c = _augmented(any_dir)
    tok = pipeline.load_tokenizer(c)
    kw = dict(global_batch_size=10, seed=3, process_index=process_index, process_count=2)
    full = [b for _, b in zip(range(12), pipeline.train_iterator(c, tok, **kw))]
    for k in (1, 4, 9):
        resumed = [b for _, b in zip(range(12 - k), pipeline.train_iterator(c, tok, start_step=k, **kw))]
        for a, b in zip(full[k:], resumed):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} differs after resuming at step {k}")
    # The order depends on the seed, and augmentations actually change the images.
    other = next(pipeline.train_iterator(c, tok, **dict(kw, seed=4)))
    assert not np.array_equal(other["image_id"], full[0]["image_id"])
    plain = _config(any_dir)
    first = next(pipeline.train_iterator(plain, tok, **kw))
    np.testing.assert_array_equal(first["image_id"], full[0]["image_id"])
    assert not np.allclose(first["image"], full[0]["image"])


def test_epochs_are_reshuffled(any_dir):
    c = _config(any_dir)
    tok = pipeline.load_tokenizer(c)
    it = pipeline.train_iterator(c, tok, global_batch_size=1, seed=0, process_index=0, process_count=1)
    ids = _ids([next(it) for _ in range(2 * NUM_TRAIN)])
    assert sorted(ids[:NUM_TRAIN]) == sorted(ids[NUM_TRAIN:]) == list(range(NUM_TRAIN))
    assert ids[:NUM_TRAIN] != ids[NUM_TRAIN:]


def test_mixture_weights_counts_and_resume(captions_dir, embedded_data_dir):
    c = _config(captions_dir)
    c.image_size = 16
    c.sources.evq = sources.source_config(name="easy_vqa_captions", data_dir=embedded_data_dir,
                                            eval_split="test", shuffle_buffer=64, weight=3.0)
    c.tokenizer = None
    c.tokenizer = os.path.join(captions_dir, "tok", "tokenizer.json")
    tok = pipeline.load_tokenizer(c)
    kw = dict(global_batch_size=16, seed=0, process_index=0, process_count=1)
    batches = [b for _, b in zip(range(25), pipeline.train_iterator(c, tok, **kw))]
    source = np.concatenate([b["source"] for b in batches])
    share = np.mean(source == 1)
    assert abs(share - 0.75) < 0.05, share  # 400 draws: 3 sigma of a 0.75 share is 0.065
    # The counts used to resume agree with what the stream delivered.
    for position in (0, 17, 160, 400):
        counts = pipeline.mixture_counts([1.0, 3.0], position, seed=0, process_index=0)
        np.testing.assert_array_equal(counts, np.bincount(source[:position], minlength=2))
    resumed = [b for _, b in zip(range(5), pipeline.train_iterator(c, tok, start_step=20, **kw))]
    for a, b in zip(batches[20:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # Each source keeps its own epochs: the captions source's ids are all from its train split.
    ids = np.concatenate([b["image_id"] for b in batches])
    assert np.all(ids[source == 0] < NUM_TRAIN)


def test_mixture_counts_beyond_one_block():
    n = 3 * pipeline.BLOCK + 5
    counts = pipeline.mixture_counts([1.0, 1.0, 2.0], n, seed=5, process_index=1)
    assert counts.sum() == n
    np.testing.assert_allclose(counts / n, [0.25, 0.25, 0.5], atol=0.02)


def test_precomputed_regions_are_padded_and_masked(captions_dir):
    c = _config(captions_dir)
    c.regions.update(enabled=True, max_regions=3)
    tok = pipeline.load_tokenizer(c)
    batch = next(pipeline.eval_batches(c, tok, global_batch_size=NUM_TEST + 1, process_index=0, process_count=1))
    for i, image_id in enumerate(batch["image_id"][:NUM_TEST]):
        r = min(image_id % 4 + 1, 3)
        np.testing.assert_array_equal(batch["region_mask"][i], [1] * r + [0] * (3 - r))
        np.testing.assert_array_equal(batch["region_feats"][i, :r], image_id + np.arange(r)[:, None]
                                      + np.zeros((r, REGION_DIM)))
        assert np.all(batch["region_feats"][i, r:] == 0)
        np.testing.assert_array_equal(batch["region_targets"][i, :r, image_id % 3], 1.0)
    meta = pipeline.dataset_meta(c, tok)
    assert (meta.num_regions, meta.region_feature_dim, meta.region_classes) == (3, REGION_DIM, REGION_CLASSES)
    shapes = pipeline.batch_shapes(c, meta, 2)
    assert shapes["region_feats"].shape == (2, 3, REGION_DIM)


def test_errors_name_the_problem(captions_dir, tmp_path):
    c = _config(captions_dir)
    tok = pipeline.load_tokenizer(c)

    def first(config, **kw):
        kw = {"global_batch_size": 4, "process_index": 0, "process_count": 1, **kw}
        return next(pipeline.train_iterator(config, tok, seed=0, **kw))

    bad = _config(captions_dir)
    bad.sources.cap.name = "coco_captionz"
    with pytest.raises(ValueError, match="does not know dataset 'coco_captionz'.*coco_captions"):
        first(bad)
    bad = _config(captions_dir, train_split="validation")
    with pytest.raises(ValueError, match="no split 'validation'; it has test, train"):
        first(bad)
    bad = _config(captions_dir)
    bad.sources.cap.dir = str(tmp_path)
    with pytest.raises(ValueError, match="exactly one of"):
        first(bad)
    bad.sources.cap.name = None
    with pytest.raises(ValueError, match="no prepared TFDS dataset"):
        first(bad)
    bad = _config(captions_dir)
    bad.sources.cap.update(name="coco_captions", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not prepared.*tfds build coco_captions"):
        first(bad)
    bad = _config(captions_dir, text_key="caption")
    with pytest.raises(ValueError, match="text_key='caption' is not a feature"):
        first(bad)
    with pytest.raises(ValueError, match="too few for 64 processes"):
        next(pipeline.eval_batches(c, tok, global_batch_size=64, process_index=63, process_count=64))
    bad = _config(captions_dir, label_key="image_id")
    with pytest.raises(ValueError, match="label_key: 'image_id' is not a ClassLabel feature"):
        first(bad)
    bad = _config(captions_dir, regions_from_boxes=dict(box_key="captions"))
    bad.regions.enabled = True
    with pytest.raises(ValueError, match="box_key='captions' is not a BBoxFeature"):
        first(bad)


def test_prepared_directory_source_and_its_tokenizer(captions_dir):
    # `dir` opens a prepared dataset without its builder class; a parent directory with one dataset works too.
    builder_dir = os.path.join(captions_dir, "mmjax_test_captions", "1.0.0")
    c = _config(captions_dir)
    c.sources.cap.name = None
    c.sources.cap.dir = os.path.join(captions_dir, "mmjax_test_captions")
    tok = pipeline.load_tokenizer(c)  # data.tokenizer is set here
    batches = list(pipeline.eval_batches(c, tok, global_batch_size=4, process_index=0, process_count=1))
    assert sorted(_ids(batches))[-NUM_TEST:] == list(range(1000, 1000 + NUM_TEST))
    assert sources.source_tokenizer_path("cap", c.sources.cap) is None  # this directory carries no tokenizer.json
    c.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        pipeline.load_tokenizer(c)
    assert os.path.exists(os.path.join(builder_dir, "dataset_info.json"))


def test_catalogue_coco_captions_layout(tmp_path, monkeypatch):
    """coco_captions by its catalogue name and data_dir: its real feature spec, written offline by the catalogue
    builder itself with generated examples in place of the download (captions are a nested Sequence)."""
    from tensorflow_datasets.object_detection import coco_captions

    def split_generators(self, dl_manager):
        return {"train": self._generate_examples(0), "val": self._generate_examples(100)}

    def generate_examples(self, start):
        for i in range(start, start + 6):
            png = io.BytesIO()
            Image.fromarray(_image(i)).save(png, format="PNG")
            yield i, {"image": _image(i), "image/filename": f"{i}.jpg", "image/id": i,
                      "objects": [], "captions": [{"text": f" A\tPhoto  of {i}\n", "id": 10 * i}]}

    monkeypatch.setattr(coco_captions.CocoCaptions, "_split_generators", split_generators)
    monkeypatch.setattr(coco_captions.CocoCaptions, "_generate_examples", generate_examples)
    tfds.builder("coco_captions/2014", data_dir=str(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))

    c = pipeline.default_data_config()
    c.image_size, c.max_len = 8, 8
    c.sources.coco = sources.source_config(name="coco_captions/2014", data_dir=str(tmp_path), eval_split="val",
                                             text_key="captions/text", id_key="image/id",
                                             text=dict(clean=True, lowercase=True))
    tok_dir = tmp_path / "tok"
    c.tokenizer = train_wordpiece([f"a photo of {i}" for i in range(200)], tok_dir, vocab_size=100)
    tok = pipeline.load_tokenizer(c)
    batch = next(pipeline.eval_batches(c, tok, global_batch_size=6, process_index=0, process_count=1))
    assert sorted(batch["image_id"]) == list(range(100, 106))
    # Cleaned (whitespace collapsed) and lowercased, with the caption of the image it came with.
    assert tok.decode(batch["text_ids"]) == [f"a photo of {i}" for i in batch["image_id"]]


def _manual_source(captions_dir, tmp_path, text: str, **source):
    """A config reading mmjax_test_manual, whose manual_dir holds captions.txt with `text`."""
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "captions.txt").write_text(text)
    c = _config(captions_dir)
    c.sources.cap.update(name="mmjax_test_manual", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual),
                         eval_split="validation", **source)
    return c


def test_catalogue_source_prepared_from_manual_dir(captions_dir, tmp_path):
    c = _manual_source(captions_dir, tmp_path, "caption 0 first\ncaption 1 first\ncaption 2 first\n")
    tok = pipeline.load_tokenizer(c)
    with pytest.raises(ValueError, match="not prepared.*--manual_dir="):
        next(pipeline.eval_batches(c, tok, global_batch_size=3, process_index=0, process_count=1))
    c.sources.cap.prepare = True
    batch = next(pipeline.eval_batches(c, tok, global_batch_size=3, process_index=0, process_count=1))
    # A scalar caption feature reads as a one-caption list.
    assert sorted(tok.decode(batch["text_ids"])) == ["caption 0 first", "caption 1 first", "caption 2 first"]


def test_truncation_keeps_sep_and_whole_word_table(captions_dir):
    c = _config(captions_dir)
    c.max_len = 4  # "[CLS] caption 12 first [SEP]" does not fit: the text is cut, [SEP] stays last
    tok = pipeline.load_tokenizer(c)
    batch = next(pipeline.train_iterator(c, tok, global_batch_size=4, seed=0, process_index=0, process_count=1))
    np.testing.assert_array_equal(batch["text_ids"][:, 0], tok.cls_id)
    np.testing.assert_array_equal(batch["text_ids"][:, -1], tok.sep_id)
    assert np.all(batch["text_mask"] == 1)
    # A word the tokenizer splits keeps its "##" pieces, which whole-word masking groups back into one word.
    table = tok.continuation_table()
    ids, mask = tok.encode(["captionfirst"], 12)
    pieces = ids[0][1: mask[0].sum() - 1]
    assert len(pieces) > 1 and not table[pieces[0]] and table[pieces[1:]].all()


def test_empty_caption_in_a_catalogue_dataset_stops_the_pipeline(captions_dir, tmp_path):
    c = _manual_source(captions_dir, tmp_path, "caption 0 first\n  \t \ncaption 2 first\n", prepare=True)
    tok = pipeline.load_tokenizer(c)
    with pytest.raises(tf.errors.InvalidArgumentError, match="data.sources.cap: empty text at image_id"):
        list(pipeline.eval_batches(c, tok, global_batch_size=3, process_index=0, process_count=1))


class MmjaxTestRefexp(tfds.core.GeneratorBasedBuilder):
    """ref_coco's layout: referring expressions nested two sequences deep (objects -> refexp -> raw)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(12, 12, 3)), "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "id": np.int64, "refexp": tfds.features.Sequence({"raw": tfds.features.Text()})})}))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            objects = [{"id": k, "refexp": [{"raw": f"caption {k} of {i} first {j}"} for j in range(k + 1)]}
                       for k in range(i % 3 + 1)]
            yield i, {"image": _image(i), "image/id": i, "objects": objects}


def test_nested_referring_expressions_are_all_candidates(captions_dir, tmp_path):
    MmjaxTestRefexp(data_dir=str(tmp_path)).download_and_prepare()
    c = _config(captions_dir)
    c.sources.cap.update(name="mmjax_test_refexp", data_dir=str(tmp_path), train_split="validation",
                         text_key="objects/refexp/raw", id_key="image/id")
    c.max_len = 16
    tok = pipeline.load_tokenizer(c)
    it = pipeline.train_iterator(c, tok, global_batch_size=4, seed=0, process_index=0, process_count=1)
    drawn = {}
    for _ in range(60):  # each image ~60 times: every one of its (at most 6) texts is drawn
        batch = next(it)
        for image_id, text in zip(batch["image_id"], tok.decode(batch["text_ids"])):
            drawn.setdefault(int(image_id), set()).add(text)
    for i, texts in drawn.items():
        expected = {f"caption {k} of {i} first {j}" for k in range(i % 3 + 1) for j in range(k + 1)}
        assert texts == expected, (i, texts)
