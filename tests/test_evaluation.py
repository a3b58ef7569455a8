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
    got = retrieval.retrieval_recall(img, txt, keys, ks=(1, 5, 10))
    sim = img @ txt.T
    for k in (1, 5, 10):
        assert got[f"i2t_r@{k}"] == pytest.approx(_brute_recall(sim, keys, k))
        assert got[f"t2i_r@{k}"] == pytest.approx(_brute_recall(sim.T, keys, k))


def test_identical_captions_count_as_found():
    # Image 0's own caption ranks second, but the first-ranked caption is the same sentence: a hit at R@1.
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[0.0, 1.0], [0.9, 0.1]])
    keys = np.array([7, 7])
    assert retrieval.retrieval_recall(img, txt, keys, ks=(1,))["i2t_r@1"] == 1.0
    # With distinct captions the same ranking is a miss for both images.
    assert retrieval.retrieval_recall(img, txt, np.array([1, 2]), ks=(1,))["i2t_r@1"] == 0.0


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
