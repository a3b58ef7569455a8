"""Tests of the data layer: the embedded TFDS dataset, the tokenizer and the tf.data pipelines (CPU, offline)."""

import functools
import hashlib
import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mmjax.data import easy_vqa_captions as evc
from mmjax.data import pipeline, preprocess, sources
from mmjax.data.tokenizer import Tokenizer, train_wordpiece

# sha256 over (image_id, label, size, position, bbox, captions) of the test split; pins the exact build so that a
# change in the measured attributes or caption forms is noticed (bump the builder VERSION when it changes).
GOLDEN_TEST_SPLIT_SHA256 = "6dc61bcfe112f248dd30030579a02ac8bf13b2d947fa34d3527a2d3c66a66f4b"


@functools.lru_cache(maxsize=None)
def _read_split(data_dir: str, split: str) -> list[dict]:
    builder = evc.EasyVqaCaptions(data_dir=data_dir)
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def _digest(examples) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(repr((int(ex["image_id"]), int(ex["label"]), int(ex["size"]), int(ex["position"]),
                       [round(float(v), 6) for v in ex["bbox"]],
                       [c.decode() if isinstance(c, bytes) else c for c in ex["captions"]])).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tokenizer(embedded_data_dir) -> Tokenizer:
    return Tokenizer.from_path(os.path.join(embedded_data_dir, "easy_vqa_captions", "1.0.0", "tokenizer.json"))


# ----------------------------------------------------------------------------------------------- dataset


def test_split_sizes(embedded_data_dir):
    splits = evc.EasyVqaCaptions(data_dir=embedded_data_dir).info.splits
    assert splits["train"].num_examples == 4000
    assert splits["test"].num_examples == 1000


def test_features_and_label_consistency(embedded_data_dir):
    features = evc.EasyVqaCaptions(data_dir=embedded_data_dir).info.features
    assert evc.CLASS_NAMES[0] == "red circle" and evc.CLASS_NAMES[-1] == "yellow triangle"
    assert len(evc.CLASS_NAMES) == 24 and features["label"].names == list(evc.CLASS_NAMES)
    assert features["color"].names == list(evc.COLORS) and features["shape"].names == list(evc.SHAPES)
    examples = _read_split(embedded_data_dir, "test")
    assert [int(ex["image_id"]) for ex in examples] == list(range(1000))  # written in id order
    for ex in examples:
        assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
        assert ex["label"] == ex["color"] * 3 + ex["shape"]
        color, shape = evc.COLORS[ex["color"]], evc.SHAPES[ex["shape"]]
        size, position = evc.SIZES[ex["size"]], evc.POSITIONS[ex["position"]]
        captions = [c.decode() for c in ex["captions"]]
        assert len(captions) == evc.NUM_CAPTIONS and len(set(captions)) == evc.NUM_CAPTIONS
        assert captions[0] == f"a {size} {color} {shape} {evc.POSITION_PHRASES[position]}"
        assert all(color in c and shape in c for c in captions)
        assert len(ex["questions"]) == len(ex["answers"]) > 0


def test_sizes_split_train_roughly_into_thirds(embedded_data_dir):
    counts = np.bincount([ex["size"] for ex in _read_split(embedded_data_dir, "train")], minlength=3)
    assert np.all(np.abs(counts / 4000 - 1 / 3) < 0.05), counts


def test_pixel_colour_and_shape_agree_with_qa(embedded_data_dir):
    stated_colour = stated_shape = 0
    for split in ("train", "test"):
        for ex in _read_split(embedded_data_dir, split):
            measured = evc.measure_image(ex["image"])
            qa_color, qa_shape = evc.qa_facts([q.decode() for q in ex["questions"]],
                                              [a.decode() for a in ex["answers"]])
            assert ex["color_from_qa"] == (qa_color is not None)
            assert ex["shape_from_qa"] == (qa_shape is not None)
            if qa_color is not None:
                stated_colour += 1
                assert measured.color == qa_color, int(ex["image_id"])
            if qa_shape is not None:
                stated_shape += 1
                assert measured.shape == qa_shape, int(ex["image_id"])
            # Where the Q/A are silent, the stored attribute is the measured one.
            assert evc.COLORS[ex["color"]] == (qa_color or measured.color)
            assert evc.SHAPES[ex["shape"]] == (qa_shape or measured.shape)
    # The Q/A state colour for ~92% and shape for ~95% of the 5,000 images.
    assert 0.88 < stated_colour / 5000 < 0.96 and 0.91 < stated_shape / 5000 < 0.99


def test_bbox_contains_the_shape(embedded_data_dir):
    for ex in _read_split(embedded_data_dir, "test"):
        alpha, _ = evc.shape_alpha(ex["image"])
        ys, xs = np.nonzero(alpha > 0.5)
        ymin, xmin, ymax, xmax = np.round(np.asarray(ex["bbox"]) * 64).astype(int)
        assert 0 <= ymin < ymax <= 64 and 0 <= xmin < xmax <= 64
        # Contains every shape pixel, and is tight (a shape pixel on each edge).
        assert ys.min() == ymin and ys.max() == ymax - 1 and xs.min() == xmin and xs.max() == xmax - 1


def test_build_is_deterministic(embedded_data_dir):
    built = _read_split(embedded_data_dir, "test")
    regenerated = evc.load_split_examples("test")
    assert _digest(built) == _digest(regenerated) == GOLDEN_TEST_SPLIT_SHA256
    # Image bytes are the shipped PNGs, decoded identically.
    for ex, ref in zip(built[:50], regenerated[:50]):
        np.testing.assert_array_equal(ex["image"], ref["image"])
    # Same bytes every build: the records are the canonical (deterministic, sorted-map) proto encoding.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    files = tf.io.gfile.glob(os.path.join(embedded_data_dir, "easy_vqa_captions", "1.0.0", "*-test.tfrecord*"))
    for raw in tf.data.TFRecordDataset(files).take(100).as_numpy_iterator():
        assert tf.train.Example.FromString(raw).SerializeToString(deterministic=True) == raw


def test_zero_shot_prompts_never_among_training_captions(embedded_data_dir):
    captions = {c.decode() for ex in _read_split(embedded_data_dir, "train") for c in ex["captions"]}
    prompts = [p for row in evc.render_prompts() for p in row]
    assert len(prompts) == 24 * len(evc.ZERO_SHOT_TEMPLATES)
    assert not captions & set(prompts)
    for template in evc.ZERO_SHOT_TEMPLATES:
        # The template's fixed words, in order, with anything between: e.g. "an image that contains a.*\."
        fixed = [re.escape(part.strip()) for part in re.split(r"\{\w*\}", template) if part.strip()]
        pattern = re.compile(".*".join(fixed))
        assert not any(pattern.search(c) for c in captions), template


# ----------------------------------------------------------------------------------------------- tokenizer


def test_default_tokenizer_knows_every_word(embedded_data_dir, tokenizer):
    words = set()
    for ex in _read_split(embedded_data_dir, "test"):
        words.update(w for c in ex["captions"] for w in c.decode().split())
    words.update(w for row in evc.render_prompts() for p in row for w in re.findall(r"\w+", p))
    for word in sorted(words):
        assert tokenizer.tokenize(word) == [word], word


def test_tokenizer_layout_and_round_trip(tokenizer):
    texts = ["a large red circle in the top left", "what color is the shape?"]
    ids, mask = tokenizer.encode(texts, max_len=16)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (2, 16)
    n = mask.sum(1)
    for row, m, k in zip(ids, mask, n):
        assert row[0] == tokenizer.cls_id and row[k - 1] == tokenizer.sep_id
        assert np.all(row[k:] == tokenizer.pad_id) and np.all(m[:k] == 1) and np.all(m[k:] == 0)
    assert n[0] == 2 + 8
    assert tokenizer.decode(ids) == texts
    assert len({tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.unk_id}) == 5
    assert tokenizer.vocab_size > max(ids.max(), tokenizer.mask_id)


def test_tokenizer_truncation_keeps_sep_last(tokenizer):
    ids, mask = tokenizer.encode(["a large red circle in the top left"], max_len=5)
    assert mask.tolist() == [[1, 1, 1, 1, 1]]
    assert ids[0, 0] == tokenizer.cls_id and ids[0, -1] == tokenizer.sep_id
    assert tokenizer.decode(ids) == ["a large red"]
    with pytest.raises(TypeError):
        tokenizer.encode("a string, not a list", max_len=8)


def test_tokenizer_from_bert_vocab_txt(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "tri", "##angle", "."]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    tok = Tokenizer.from_path(str(path))
    assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (11, 0, 1, 2, 3, 4)
    ids, mask = tok.encode(["A Red TRIANGLE.", "a blue circle"], max_len=8)
    assert ids.tolist() == [[2, 5, 6, 8, 9, 10, 3, 0], [2, 5, 1, 7, 3, 0, 0, 0]]  # lowercased; "blue" unknown
    assert mask.sum(1).tolist() == [7, 5]
    assert tok.decode(ids)[0] == "a red triangle."
    assert Tokenizer.from_path(str(tmp_path)).vocab_size == 11  # a directory holding vocab.txt works too


def test_tokenizer_missing_path_raises():
    with pytest.raises(ValueError, match="tokenizer path does not exist: /no/such/tokenizer.json"):
        Tokenizer.from_path("/no/such/tokenizer.json")


def test_train_wordpiece_is_deterministic(tmp_path):
    texts = ["a red circle", "a blue square on the left", "is there a circle?"] * 5
    first = train_wordpiece(texts, tmp_path / "one", vocab_size=200)
    second = train_wordpiece(texts[::-1], tmp_path / "two", vocab_size=200)  # a function of the set of texts
    assert open(first).read() == open(second).read()
    assert os.path.exists(tmp_path / "one" / "vocab.txt")
    assert Tokenizer.from_path(first).decode(Tokenizer.from_path(first).encode(["a red circle"], 8)[0]) == [
        "a red circle"]


# ----------------------------------------------------------------------------------------------- pipeline


def test_train_batch_keys_shapes_dtypes(embedded_data_config, tokenizer):
    embedded_data_config.sources.easy_vqa.negatives = ()
    batch = next(pipeline.train_iterator(embedded_data_config, tokenizer, global_batch_size=32, seed=0,
                                         process_index=0, process_count=1))
    assert sorted(batch) == ["image", "image_id", "label", "source", "text_ids", "text_mask"]
    assert batch["image"].shape == (32, 64, 64, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0  # mean = std = 0.5
    assert batch["text_ids"].shape == batch["text_mask"].shape == (32, 24)
    assert batch["text_ids"].dtype == batch["text_mask"].dtype == np.int32
    assert batch["label"].dtype == batch["image_id"].dtype == np.int32 and batch["label"].shape == (32,)
    # The text is one of the example's captions, and names its class.
    for text, label in zip(tokenizer.decode(batch["text_ids"]), batch["label"]):
        assert evc.CLASS_NAMES[label].split()[0] in text and evc.CLASS_NAMES[label].split()[1] in text
    meta = pipeline.dataset_meta(embedded_data_config, tokenizer)
    shapes = pipeline.train_batch_shapes(embedded_data_config, meta, 32)
    assert {k: (v.shape, v.dtype) for k, v in shapes.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}


def test_dataset_meta_describes_the_embedded_source(embedded_data_config, tokenizer):
    embedded_data_config.regions.enabled = True
    meta = pipeline.dataset_meta(embedded_data_config, tokenizer)
    source = meta.source()
    assert meta.eval_source == "easy_vqa" and meta.vocab_size == tokenizer.vocab_size
    assert source.class_names == evc.CLASS_NAMES and source.prompts == evc.ZERO_SHOT_TEMPLATES
    assert meta.attributes == {"color": evc.COLORS, "shape": evc.SHAPES}
    assert (meta.num_regions, meta.region_feature_dim, meta.region_classes) == (6, 192, 25)
    assert source.splits == {"train": 4000, "test": 1000} and source.answer_vocab is None
    assert meta.model_keys == ("image", "text_ids", "text_mask", "region_feats", "region_boxes", "region_mask")


def test_in_memory_and_streamed_reads_agree(embedded_data_config, tokenizer):
    # The in-memory reader holds images as uint8 after the resize; at the stored size nothing is resized, so both
    # readers give the same eval batches exactly (hard negatives and regions included).
    embedded_data_config.regions.enabled = True
    kw = dict(global_batch_size=96, process_index=1, process_count=2)
    memory = list(pipeline.eval_batches(embedded_data_config, tokenizer, **kw))
    embedded_data_config.sources.easy_vqa.in_memory = False
    streamed = list(pipeline.eval_batches(embedded_data_config, tokenizer, **kw))
    assert len(memory) == len(streamed) == 11  # 500 examples per process, 48 per batch
    for a, b in zip(memory, streamed):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)


def test_image_resize(embedded_data_config, tokenizer):
    embedded_data_config.image_size = 32
    batch = next(pipeline.eval_batches(embedded_data_config, tokenizer, global_batch_size=8,
                                       process_index=0, process_count=1))
    assert batch["image"].shape == (8, 32, 32, 3)


def test_train_order_depends_on_seed_and_is_reproducible(embedded_data_config, tokenizer):
    def first(seed):
        it = pipeline.train_iterator(embedded_data_config, tokenizer, global_batch_size=64, seed=seed,
                                     process_index=0, process_count=1)
        return next(it)
    a, b, c = first(0), first(0), first(1)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image_id"], c["image_id"])


@pytest.mark.parametrize("augment", [False, True], ids=["resize", "crop_flip"])
def test_exact_resume(embedded_data_config, tokenizer, augment):
    # b = 200 over 4,000 examples: batch 19 ends the first epoch, 20-22 are in epoch 2; resumes land mid-chunk.
    if augment:  # per-example random crops and flips of the in-memory images, seeded by stream position
        embedded_data_config.sources.easy_vqa.image.update(dict(random_resized_crop=True, flip=True))
    kwargs = dict(global_batch_size=200, seed=3, process_index=0, process_count=1)
    from_zero = pipeline.train_iterator(embedded_data_config, tokenizer, **kwargs)
    reference = [next(from_zero) for _ in range(23)]
    for k in (5, 19, 21):
        resumed = pipeline.train_iterator(embedded_data_config, tokenizer, start_step=k, **kwargs)
        for want in reference[k:]:
            got = next(resumed)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"step {k} {key}")
    # Within an epoch no example repeats; the first epoch covers the split.
    ids = np.concatenate([r["image_id"] for r in reference])
    assert len(set(ids[:4000].tolist())) == 4000


def test_train_shards_disjoint_and_complete(embedded_data_config, tokenizer):
    seen = []
    for index in range(2):
        it = pipeline.train_iterator(embedded_data_config, tokenizer, global_batch_size=400, seed=0,
                                     process_index=index, process_count=2)
        # 2,000 examples per process = 10 batches of 200: exactly one epoch of this process's shard.
        ids = np.concatenate([next(it)["image_id"] for _ in range(10)])
        assert len(set(ids.tolist())) == 2000
        seen.append(set(ids.tolist()))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(4000))


def test_eval_padding_and_shards(embedded_data_config, embedded_data_dir, tokenizer):
    # One process: 1,000 = 2 x 384 + 232, so the third batch has 152 padding rows.
    batches = list(pipeline.eval_batches(embedded_data_config, tokenizer, global_batch_size=384,
                                         process_index=0, process_count=1))
    assert len(batches) == 3 and all(b["image"].shape[0] == 384 for b in batches)
    assert batches[0]["mask"].dtype == np.float32 and sum(b["mask"].sum() for b in batches) == 1000
    ids = np.concatenate([b["image_id"][b["mask"] > 0] for b in batches])
    assert ids.tolist() == list(range(1000))
    # Caption 0 is the text.
    test = _read_split(embedded_data_dir, "test")
    assert tokenizer.decode(batches[0]["text_ids"][:3]) == [test[i]["captions"][0].decode() for i in range(3)]
    # Two processes: the same number of batches each, disjoint, together complete.
    per_process = [list(pipeline.eval_batches(embedded_data_config, tokenizer, global_batch_size=384,
                                              process_index=i, process_count=2)) for i in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == 3  # 500 per process, 192 per batch
    shard_ids = [np.concatenate([b["image_id"][b["mask"] > 0] for b in bs]).tolist() for bs in per_process]
    assert sum(b["mask"].sum() for bs in per_process for b in bs) == 1000
    assert not set(shard_ids[0]) & set(shard_ids[1]) and sorted(shard_ids[0] + shard_ids[1]) == list(range(1000))


def test_prompts_render_the_class_names():
    prompts = evc.render_prompts()
    assert len(prompts) == 24 and all(len(p) == len(evc.ZERO_SHOT_TEMPLATES) for p in prompts)
    assert prompts[5][0] == "an image that contains a green triangle."


def test_config_errors(embedded_data_config, tokenizer):
    with pytest.raises(ValueError, match="not divisible by process_count"):
        pipeline.train_iterator(embedded_data_config, tokenizer, global_batch_size=33, seed=0,
                                process_index=0, process_count=2)
    with pytest.raises(ValueError, match="data.sources is empty"):
        pipeline.load_tokenizer(pipeline.default_data_config())
    embedded_data_config.sources.easy_vqa.negatives = ("size", "captions")
    with pytest.raises(ValueError, match="'captions' is not a ClassLabel feature"):
        pipeline.dataset_meta(embedded_data_config)
    embedded_data_config.sources.easy_vqa.negatives = ("position",)  # "top left": two words
    with pytest.raises(ValueError, match="must be single words"):
        pipeline.dataset_meta(embedded_data_config)


def test_default_tokenizer_is_the_saved_one(embedded_data_config, tokenizer):
    assert pipeline.load_tokenizer(embedded_data_config).vocab_size == tokenizer.vocab_size
    embedded_data_config.tokenizer = "/no/such/vocab.txt"
    with pytest.raises(ValueError, match="tokenizer path does not exist"):
        pipeline.load_tokenizer(embedded_data_config)


def test_hard_negative_eval_captions_change_exactly_one_attribute(embedded_data_config, tokenizer):
    """Hard ITM negatives: caption 0 with only its colour (or only its shape) replaced by another one."""
    batch = next(pipeline.eval_batches(embedded_data_config, tokenizer, global_batch_size=64, process_index=0,
                                       process_count=1))
    true = tokenizer.decode(batch["text_ids"])
    for key, attrs in (("other_color", evc.COLORS), ("other_shape", evc.SHAPES)):
        neg = tokenizer.decode(batch[f"{key}_text_ids"])
        assert batch[f"{key}_text_mask"].shape == batch["text_mask"].shape
        for t, n, label, image_id in zip(true, neg, batch["label"], batch["image_id"]):
            t_words, n_words = t.split(), n.split()
            assert len(t_words) == len(n_words)
            diff = [(a, b) for a, b in zip(t_words, n_words) if a != b]
            assert len(diff) == 1, (t, n)
            old, new = diff[0]
            color, shape = evc.COLORS[label // 3], evc.SHAPES[label % 3]
            assert old == (color if key == "other_color" else shape)
            # The replacement is a function of the image: the (1 + id mod (k - 1))-th next word.
            k = len(attrs)
            assert new == attrs[(attrs.index(old) + 1 + int(image_id) % (k - 1)) % k]


def test_train_hard_negatives_follow_the_drawn_caption(embedded_data_config, tokenizer):
    """Train batches' hard negatives are the drawn caption with one word changed, and the stream is unchanged."""
    kwargs = dict(global_batch_size=32, seed=3, process_index=0, process_count=1)
    batch = next(pipeline.train_iterator(embedded_data_config, tokenizer, **kwargs))
    embedded_data_config.sources.easy_vqa.negatives = ()
    plain = next(pipeline.train_iterator(embedded_data_config, tokenizer, **kwargs))
    np.testing.assert_array_equal(plain["text_ids"], batch["text_ids"])
    np.testing.assert_array_equal(plain["image"], batch["image"])
    for key in ("other_color", "other_shape"):
        for t, n in zip(tokenizer.decode(batch["text_ids"]), tokenizer.decode(batch[f"{key}_text_ids"])):
            diff = [(a, b) for a, b in zip(t.split(), n.split()) if a != b]
            assert len(diff) == 1 and len(t.split()) == len(n.split()), (t, n)


def test_swap_attribute_keeps_case_punctuation_and_refuses_ambiguity():
    words = ("red", "green", "blue")
    out = sources.swap_attribute(tf.constant(["Red circle.", "a (blue) square", "green!"]), tf.constant([0, 2, 1]),
                                 tf.constant([0, 1, 0]), words, "test")
    assert [x.decode() for x in out.numpy()] == ["green circle.", "a (green) square", "blue!"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="exactly once"):
        sources.swap_attribute(tf.constant(["red and red"]), tf.constant([0]), tf.constant([0]), words, "test")
    with pytest.raises(tf.errors.InvalidArgumentError, match="exactly once"):
        sources.swap_attribute(tf.constant(["a circle"]), tf.constant([0]), tf.constant([0]), words, "test")


def test_regions_from_boxes_are_the_boxes_pixels_and_coverage_targets(embedded_data_config, embedded_data_dir,
                                                                      tokenizer):
    embedded_data_config.regions.enabled = True
    batch = next(pipeline.eval_batches(embedded_data_config, tokenizer, global_batch_size=8,
                                       process_index=0, process_count=1))
    meta = pipeline.dataset_meta(embedded_data_config)
    r, f = meta.num_regions, meta.region_feature_dim
    assert (r, f) == (6, 192)
    assert batch["region_feats"].shape == (8, r, f) and batch["region_feats"].dtype == np.float32
    assert batch["region_boxes"].shape == (8, r, 4) and batch["region_mask"].shape == (8, r)
    assert np.all(batch["region_mask"] == 1)
    examples = {ex["image_id"]: ex for ex in _read_split(embedded_data_dir, "test")}
    crop = embedded_data_config.sources.easy_vqa.regions_from_boxes.crop
    for k in range(8):
        ex = examples[int(batch["image_id"][k])]
        # Region 0 is the shape's measured box; region 1 the whole image; then the 2x2 grid.
        np.testing.assert_allclose(batch["region_boxes"][k, 0], ex["bbox"], atol=1e-6)
        np.testing.assert_allclose(batch["region_boxes"][k, 1], [0, 0, 1, 1])
        np.testing.assert_allclose(batch["region_boxes"][k, 5], [0.5, 0.5, 1, 1])
        # The whole-image region is the normalised image resampled to crop x crop (block means within 0.1).
        image = batch["image"][k]
        s = image.shape[0] // crop
        pooled = image.reshape(crop, s, crop, s, 3).mean(axis=(1, 3))
        assert np.abs(batch["region_feats"][k, 1].reshape(crop, crop, 3) - pooled).mean() < 0.1
        # Soft targets: distributions; the object's own box is its class, a quadrant holding none of it is
        # background, and the whole image splits by the box's area.
        t = batch["region_targets"][k]
        np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-6)
        assert t[0].argmax() == ex["label"] and t[0, ex["label"]] == pytest.approx(1.0)
        y0, x0, y1, x1 = ex["bbox"]
        assert t[1, ex["label"]] == pytest.approx((y1 - y0) * (x1 - x0), abs=1e-5)
        if y0 >= 0.5 or x0 >= 0.5:  # the box misses the top-left quadrant entirely
            assert t[2, meta.region_classes - 1] == pytest.approx(1.0)
    shapes = pipeline.batch_shapes(embedded_data_config, meta, 3)
    assert shapes["region_feats"].shape == (3, r, f) and shapes["region_mask"].shape == (3, r)


def test_continuation_table_marks_wordpiece_suffixes(tokenizer):
    table = tokenizer.continuation_table()
    assert table.shape == (tokenizer.vocab_size,) and table.dtype == bool
    vocab = tokenizer._tok.get_vocab()  # pylint: disable=protected-access
    assert all(table[i] == t.startswith("##") for t, i in vocab.items())


def test_padded_images_with_a_pixel_mask(embedded_data_config, tokenizer):
    # ViLT's fine-tuning inputs: shorter side 32, longer at most 48, padded to 48 x 48 with a pixel mask. The
    # embedded images are square: 32 x 32 on the canvas, zeros (after normalisation) elsewhere.
    embedded_data_config.update(dict(image_size=32, image_canvas=48, size_divisor=8))
    batch = next(pipeline.eval_batches(embedded_data_config, tokenizer, global_batch_size=4, process_index=0,
                                       process_count=1))
    assert batch["image"].shape == (4, 48, 48, 3) and batch["image_mask"].shape == (4, 48, 48)
    np.testing.assert_array_equal(batch["image_mask"][:, :32, :32], 1)
    assert batch["image_mask"].sum() == 4 * 32 * 32
    assert np.all(batch["image"][:, 32:] == 0) and np.all(batch["image"][:, :, 32:] == 0)
    meta = pipeline.dataset_meta(embedded_data_config)
    assert pipeline.batch_shapes(embedded_data_config, meta)["image_mask"].shape == (1, 48, 48)
    # A wide image: the longer side is capped by the canvas, both sides multiples of the divisor.
    fn = preprocess.resize_pad_fn(preprocess.default_image_config(), train=False, image_size=32, canvas=48,
                                  size_divisor=8)
    image, mask = fn(np.zeros((30, 90, 3), np.uint8), np.zeros(2, np.int64))
    assert image.shape == (48, 48, 3) and int(mask[:, 0].numpy().sum()) == 16 and int(mask[0].numpy().sum()) == 48
