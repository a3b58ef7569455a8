"""Audio through the input pipeline, the evaluators and the trainer: spoken_easy_vqa/tiny, users' audio at another
sample rate, and a TFDS catalogue audio dataset's format (spoken_digit, with tfds' random fake examples)."""

import json
import os

import numpy as np
import pytest
import soundfile as sf
import soxr
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from mmjax import train as trainer
from mmjax.data import audio_text, pipeline, sources
from mmjax.evaluation import retrieval


def _meta_and_batches(config, batch_size=8):
    tokenizer = pipeline.load_tokenizer(config.data)
    meta = pipeline.dataset_meta(config.data, tokenizer)
    train = next(pipeline.train_iterator(config.data, tokenizer, global_batch_size=batch_size, seed=0))
    evals = list(pipeline.eval_batches(config.data, tokenizer, global_batch_size=batch_size))
    return meta, train, evals


def test_spoken_caption_batches_carry_the_stored_clips(load_audio_config, spoken_data_dir):
    config = load_audio_config("audio_image.py")
    config.data.audio.max_seconds = 2.0  # shorter than most clips: they keep their first 2 s
    meta, train, evals = _meta_and_batches(config)
    assert meta.model_keys == ("image", "audio", "audio_length", "text_ids", "text_mask")
    assert meta.source("spoken").sample_rate == 16000
    for batch in (train, evals[0]):
        assert batch["audio"].shape == (8, 32000) and batch["audio"].dtype == np.float32
        assert batch["audio_length"].dtype == np.int32 and batch["audio"].max() <= 1.0
        beyond = np.arange(32000)[None] >= batch["audio_length"][:, None]
        assert not np.any(batch["audio"][beyond])  # zero-padded after each clip
        assert batch["image"].shape == (8, 64, 64, 3)
    ds = tfds.builder("spoken_easy_vqa/tiny", data_dir=spoken_data_dir).as_dataset(split="test", shuffle_files=False)
    for row, example in enumerate(tfds.as_numpy(ds.take(8))):
        n = min(len(example["audio"]), 32000)
        assert evals[0]["audio_length"][row] == n
        np.testing.assert_array_equal(evals[0]["audio"][row, :n], example["audio"][:n] / 32768.0)
    # 48 test clips in batches of 8; the text of each is its spoken caption.
    assert sum(int(b["mask"].sum()) for b in evals) == 48


def test_audio_text_kind_reads_no_images(load_audio_config):
    config = load_audio_config("audio_text.py")
    meta, train, evals = _meta_and_batches(config)
    assert meta.model_keys == ("audio", "audio_length", "text_ids", "text_mask")
    assert "image" not in train and "image" not in evals[0]
    assert train["label"].shape == (8,)


def test_in_memory_and_streamed_readers_agree(load_audio_config):
    batches = []
    for in_memory in (True, False):
        config = load_audio_config("audio_text.py")
        config.data.sources.spoken.in_memory = in_memory
        batches.append(_meta_and_batches(config, batch_size=16)[2])
    for a, b in zip(*batches):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _clip(seconds: float, rate: int, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_users_audio_at_another_rate_is_resampled_while_reading(tmp_path, caplog):
    """A dataset built at 8 kHz read at data.audio.sample_rate=16 kHz: soxr on the host, as the builders do."""
    (tmp_path / "clips").mkdir()
    rows = []
    for i, (seconds, freq) in enumerate([(0.5, 440.0), (0.8, 660.0), (0.3, 220.0)]):
        sf.write(tmp_path / "clips" / f"c{i}.wav", _clip(seconds, 8000, freq), 8000, subtype="PCM_16")
        rows.append({"audio": f"c{i}.wav", "caption": f"a tone number {i}", "split": "train"})
    (tmp_path / "ann.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    path = audio_text.build_audio_text(str(tmp_path / "ann.jsonl"), str(tmp_path / "clips"), str(tmp_path / "out"),
                                       sample_rate=8000)
    config = pipeline.default_data_config()
    config.sources.mine = sources.source_config(dir=path, kind="audio_text", eval_split="train")
    config.audio.update(dict(sample_rate=16000, max_seconds=1.0))
    tokenizer = pipeline.load_tokenizer(config)
    with caplog.at_level("WARNING"):
        batch = next(pipeline.eval_batches(config, tokenizer, global_batch_size=8))
    assert "at 8000 Hz; resampling it to data.audio.sample_rate=16000 Hz" in caplog.text
    stored = [x["audio"] for x in tfds.as_numpy(tfds.builder_from_directory(path).as_dataset(split="train"))]
    for row, samples in enumerate(stored):
        want = soxr.resample(samples.astype(np.float32) / 32768.0, 8000, 16000, quality="HQ")
        want = np.clip(np.round(want * 32768.0), -32768, 32767) / 32768.0
        assert batch["audio_length"][row] == len(want) == 2 * len(samples)
        np.testing.assert_array_equal(batch["audio"][row, :len(want)], want.astype(np.float32))


class _FakeSpokenDigit(tfds.builder_cls("spoken_digit"), skip_registration=True):
    """The catalogue's spoken_digit (its features, name and version) prepared from tfds' random fake examples."""

    name = "spoken_digit"

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(24)}

    def _generate_examples(self, n):  # pylint: disable=arguments-differ
        fake = mocking.RandomFakeGenerator(self.info.features, num_examples=n, max_value=2000)
        for i in range(n):
            yield i, fake[i]


def test_catalogue_audio_dataset_is_a_source(tmp_path):
    """spoken_digit's format (int64 samples at 8 kHz, a ClassLabel) read as kind audio_label: the text of a clip is
    its class name; its clips are resampled to the configured rate."""
    _FakeSpokenDigit(data_dir=str(tmp_path)).download_and_prepare()
    config = pipeline.default_data_config()
    config.sources.digits = sources.source_config(name="spoken_digit", data_dir=str(tmp_path), kind="audio_label",
                                                  label_key="label", eval_split="train", prompts=("a {}",))
    config.audio.update(dict(sample_rate=16000, max_seconds=0.5))
    config.tokenizer = None
    meta = pipeline.dataset_meta(config)
    assert meta.source("digits").class_names == tuple(str(i) for i in range(10))
    assert meta.source("digits").sample_rate == 8000
    stored = list(tfds.as_numpy(tfds.builder("spoken_digit", data_dir=str(tmp_path)).as_dataset(split="train")))
    ds, n, total = sources.eval_examples("digits", 0, config.sources.digits, config, meta.source("digits"),
                                          split="train", process_index=0, process_count=1)
    chunk = next(iter(tfds.as_numpy(ds)))
    assert n == total == 24
    for row, example in enumerate(stored[:8]):
        assert chunk["caption"][row].decode() == str(example["label"])
        assert chunk["label"][row] == example["label"]
        assert chunk["audio_length"][row] == min(2 * len(example["audio"]), 8000)


def test_audio_source_errors_are_clear(load_audio_config):
    config = load_audio_config("audio_image.py")
    config.data.sources.spoken.audio_key = "voice"
    with pytest.raises(ValueError, match="audio_key='voice' is not a mono Audio feature"):
        pipeline.dataset_meta(config.data)
    config = load_audio_config("audio_text.py")
    config.data.sources.spoken.kind = "audio_label"
    config.data.sources.spoken.label_key = None
    with pytest.raises(ValueError, match="kind='audio_label' needs label_key"):
        pipeline.dataset_meta(config.data)


def test_recall_by_relevance_equals_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=(12, 8))
    relevant = np.zeros((30, 12), bool)
    relevant[np.arange(30), rng.integers(0, 12, 30)] = True  # every clip speaks about one image ...
    relevant[3, 5] = relevant[4, 6] = True                      # ... a few about two
    sim = a @ b.T
    got = retrieval.recall_by_relevance(np.argsort(-sim, 1)[:, :5], np.argsort(-sim.T, 1)[:, :5], relevant, (1, 5),
                                        ("audio", "image"))
    for k in (1, 5):
        top_a = np.argsort(-sim, 1)[:, :k]
        top_b = np.argsort(-sim.T, 1)[:, :k]
        assert got[f"audio_to_image_r@{k}"] == pytest.approx(np.mean([relevant[i, top_a[i]].any() for i in range(30)]))
        want = np.mean([relevant[top_b[j], j].any() for j in range(12)])
        assert got[f"image_to_audio_r@{k}"] == pytest.approx(want)
    assert got["audio_to_image_r@1_chance"] == pytest.approx(relevant.sum(1).mean() / 12)
    assert got["image_to_audio_r@1_chance"] == pytest.approx(relevant.sum(0).mean() / 30)


def _short(config, steps=4):
    config.train.update(dict(batch_size=16, steps=steps, log_every=2))
    config.data.audio.max_seconds = 1.0
    config.optimizer.warmup_steps = 1
    for tower in config.model.towers.values():  # compile time is most of a 4-step run
        tower.depth = 1
    config.checkpoint.update(dict(every_steps=steps, async_save=False))
    for evaluator in config.evals.values():
        evaluator.update(dict(every_steps=steps, batch_size=16))
    return config


@pytest.mark.parametrize("name", ["audio_image", "audio_text", "audio_visual"])
def test_audio_configs_train_and_evaluate(load_audio_config, tmp_path, name):
    config = _short(load_audio_config(f"{name}.py"))
    final = trainer.train_and_evaluate(config, str(tmp_path / name))
    with open(tmp_path / name / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    if name == "audio_visual":
        assert 0.0 <= final["itm/acc"] <= 1.0 and "itm/acc_random" in final
        return
    other = "image" if name == "audio_image" else "text"
    for key in (f"audio_to_{other}_r@1", f"audio_to_{other}_r@10", f"{other}_to_audio_r@5"):
        assert 0.0 <= final[f"retrieval/{key}"] <= 1.0
    assert final["retrieval/num_audio"] == 48
    if name == "audio_image":  # 48 test clips, one per image: chance 1 / 48
        assert final["retrieval/num_image"] == 48
        assert final["retrieval/audio_to_image_r@1_chance"] == pytest.approx(1 / 48)
    else:  # identical canonical captions are one text
        assert final["retrieval/num_text"] < 48
        assert final["zero_shot/chance"] == pytest.approx(1 / 24) and final["zero_shot/num_examples"] == 48
    assert os.path.exists(tmp_path / name / "checkpoints" / "4")
