"""Retrieval and zero-shot metrics against brute-force definitions."""

import numpy as np
import pytest

from mmjax.evaluation import retrieval, zero_shot


def _brute_recall(sim, keys, k):
    hits = []
    for i in range(sim.shape[0]):
        top = np.argsort(-sim[i], kind="stable")[:k]
        hits.append(any(keys[j] == keys[i] for j in top))
    return float(np.mean(hits))


def test_caption_keys_group_identical_rows():
    ids = np.array([[1, 2, 0], [3, 4, 0], [1, 2, 0], [1, 2, 5]])
    keys = retrieval.caption_keys(ids)
    assert keys[0] == keys[2]
    assert len({keys[0], keys[1], keys[3]}) == 3


def test_retrieval_recall_matches_brute_force():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    keys = rng.integers(0, 20, size=50)
    got = retrieval.recall(img @ txt.T, np.arange(50), ks=(1, 5, 10), text_keys=keys)
    sim = img @ txt.T
    for k in (1, 5, 10):
        assert got[f"i2t_r@{k}"] == pytest.approx(_brute_recall(sim, keys, k))
        assert got[f"t2i_r@{k}"] == pytest.approx(_brute_recall(sim.T, keys, k))


def test_identical_captions_count_as_found():
    # Image 0's own caption ranks second, but the first-ranked caption is the same sentence: a hit at R@1.
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[0.0, 1.0], [0.9, 0.1]])
    keys = np.array([7, 7])
    assert retrieval.recall(img @ txt.T, np.arange(2), ks=(1,), text_keys=keys)["i2t_r@1"] == 1.0
    # With distinct captions the same ranking is a miss for both images.
    assert retrieval.recall(img @ txt.T, np.arange(2), ks=(1,), text_keys=np.array([1, 2]))["i2t_r@1"] == 0.0


def test_chance_recall():
    assert retrieval.chance_recall(np.arange(10), 1) == pytest.approx(0.1)
    assert retrieval.chance_recall(np.zeros(10, int), 1) == pytest.approx(1.0)
    assert retrieval.chance_recall(np.arange(10), 5) == pytest.approx(0.5)


def test_zero_shot_accuracy():
    prompts = np.zeros((3, 2, 3))
    prompts[0, :, 0] = 1.0
    prompts[1, :, 1] = 1.0
    prompts[2, 0, 2], prompts[2, 1, 2] = 1.0, 2.0
    classes = zero_shot.class_embeddings(prompts)
    np.testing.assert_allclose(np.linalg.norm(classes, axis=1), 1.0, rtol=1e-6)
    images = np.eye(3)[[0, 1, 2, 2]]
    assert zero_shot.zero_shot_accuracy(images, classes, np.array([0, 1, 2, 0])) == pytest.approx(0.75)


def _brute_benchmark_recall(sim, image_of_text, k):
    """i2t: any of the image's own texts in its top k; t2i: the text's image in its top k (stable order)."""
    i2t = [any(image_of_text[t] == i for t in np.argsort(-sim[i], kind="stable")[:k]) for i in range(sim.shape[0])]
    t2i = [image_of_text[t] in np.argsort(-sim[:, t], kind="stable")[:k] for t in range(sim.shape[1])]
    return float(np.mean(i2t)), float(np.mean(t2i))


def test_benchmark_recall_with_five_captions_per_image_and_ties():
    rng = np.random.default_rng(1)
    n_img = 40
    image_of_text = np.repeat(np.arange(n_img), 5)
    rng.shuffle(image_of_text)
    # Rounded similarities: many exact ties, which must go to the lower index in both directions.
    sim = np.round(rng.normal(size=(n_img, 5 * n_img)), 1)
    got = retrieval.recall(sim, image_of_text, ks=(1, 5, 10))
    for k in (1, 5, 10):
        i2t, t2i = _brute_benchmark_recall(sim, image_of_text, k)
        assert got[f"i2t_r@{k}"] == pytest.approx(i2t) and got[f"t2i_r@{k}"] == pytest.approx(t2i)
    # The same rankings from embeddings, on device in chunks smaller than the sets (tied scores included).
    img, txt = rng.integers(-2, 3, size=(n_img, 4)).astype(np.float32), rng.integers(-2, 3, size=(200, 4)).astype(
        np.float32)
    sim = img @ txt.T
    for chunk in (7, 64, 1000):
        i2t, t2i = retrieval.top_k(img, txt, 10, chunk), retrieval.top_k(txt, img, 10, chunk)
        np.testing.assert_array_equal(i2t, np.argsort(-sim, axis=1, kind="stable")[:, :10])
        np.testing.assert_array_equal(t2i, np.argsort(-sim.T, axis=1, kind="stable")[:, :10])
        assert retrieval.recall_from_rankings(i2t, t2i, image_of_text, (1, 5)) == retrieval.recall(
            sim, image_of_text, (1, 5))


def test_identical_captions_are_relevant_to_every_image_that_has_them():
    # Image 0 has captions {A, B}, image 1 {A}: text 2 (another A) is right for both images.
    image_of_text = np.array([0, 0, 1])
    keys = np.array([7, 8, 7])
    sim = np.array([[0.0, 0.1, 0.9],    # image 0 ranks text 2 (image 1's A) first: a hit only with keys
                    [0.9, 0.0, 0.1]])   # image 1 ranks text 0 (image 0's A) first
    assert retrieval.recall(sim, image_of_text, (1,))["i2t_r@1"] == 0.0
    assert retrieval.recall(sim, image_of_text, (1,), text_keys=keys)["i2t_r@1"] == 1.0
    # t2i: text 1 (B) ranks its own image 0 first: a hit either way; texts 0 and 2 (A) rank the other image first:
    # a hit only with keys, since both images have an A.
    assert retrieval.recall(sim, image_of_text, (1,))["t2i_r@1"] == pytest.approx(1 / 3)
    assert retrieval.recall(sim, image_of_text, (1,), text_keys=keys)["t2i_r@1"] == pytest.approx(1.0)
