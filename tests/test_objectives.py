"""Objective tests: masking statistics, ITM negatives, IPOT against a NumPy port of UNITER's iterations."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import objectives
from mmjax.models import layers

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIALS = (PAD, CLS, SEP, MASK, UNK)
VOCAB = 1000


def _text_batch(rng, b, length):
    """[CLS] tokens [SEP] pad..., random lengths, token ids include a sprinkle of [UNK] (special, never masked)."""
    ids = np.full((b, length), PAD, np.int32)
    mask = np.zeros((b, length), np.int32)
    lens = rng.integers(2, length + 1, size=b)
    for i, n in enumerate(lens):
        ids[i, :n] = rng.integers(5, VOCAB, size=n)
        ids[i, 0], ids[i, n - 1] = CLS, SEP
        mask[i, :n] = 1
    ids[(rng.random(ids.shape) < 0.02) & (mask > 0) & (ids >= 5)] = UNK
    return ids, mask


@functools.partial(jax.jit, static_argnames=("mask_prob", "vocab_size"))
def _mlm(key, ids, mask, word_ids=None, mask_prob=0.15, vocab_size=VOCAB):
    return objectives.mask_tokens(key, ids, mask, mask_id=MASK, vocab_size=vocab_size, special_ids=SPECIALS,
                                  mask_prob=mask_prob, word_ids=word_ids)


EDGE_IDS = np.array([[CLS, 7, SEP] + [PAD] * 61, [CLS, SEP] + [PAD] * 62, [PAD] * 64], np.int32)


def test_mask_tokens_statistics():
    rng = np.random.default_rng(0)
    ids, mask = _text_batch(rng, 512, 64)
    # Edge rows ride along in the same batch (one compile): one maskable token, only specials, only padding.
    ids[-3:], mask[-3:] = EDGE_IDS, EDGE_IDS != PAD
    masked, labels, label_mask = map(np.asarray, _mlm(jax.random.key(0), ids, mask))
    np.testing.assert_array_equal(label_mask[-3:, :4], [[0, 1, 0, 0], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(masked[-2:], ids[-2:])
    assert masked.dtype == ids.dtype and label_mask.dtype == np.int32
    chosen = label_mask > 0
    maskable = (mask > 0) & ~np.isin(ids, SPECIALS)
    np.testing.assert_array_equal(labels, ids)
    assert not np.any(chosen & ~maskable), "special or pad token chosen"
    frac = chosen.sum() / maskable.sum()
    assert abs(frac - 0.15) < 0.01, frac
    # Every row with a maskable token has a target.
    assert np.all(chosen.any(1) | ~maskable.any(1))
    np.testing.assert_array_equal(masked[~chosen], ids[~chosen])
    to_mask = (masked == MASK) & chosen
    kept = (masked == ids) & chosen
    rand = chosen & ~to_mask & ~kept
    n = chosen.sum()
    assert abs(to_mask.sum() / n - 0.8) < 0.03
    assert abs(rand.sum() / n - 0.1) < 0.02
    assert abs(kept.sum() / n - 0.1) < 0.02
    assert not np.any(np.isin(masked[rand], SPECIALS)) and np.all((masked >= 0) & (masked < VOCAB))
    # Deterministic for a key, different for another.
    again = _mlm(jax.random.key(0), ids, mask)
    np.testing.assert_array_equal(np.asarray(again[0]), masked)
    assert not np.array_equal(np.asarray(_mlm(jax.random.key(1), ids, mask)[2]), label_mask)


def test_random_replacement_never_special():
    # Force the "random" branch often: short vocab, so a bug mapping onto a special id would show.
    ids = np.full((256, 32), 9, np.int32)
    mask = np.ones_like(ids)
    masked, _, label_mask = map(np.asarray, _mlm(jax.random.key(3), ids, mask, mask_prob=0.5, vocab_size=12))
    vals = set(np.unique(masked[label_mask > 0]).tolist())
    assert vals <= {MASK, *range(5, 12)} and vals >= set(range(5, 12)) - {9} | {MASK}


def test_whole_word_masking():
    rng = np.random.default_rng(1)
    b, length = 256, 48
    ids = np.full((b, length), PAD, np.int32)
    mask = np.zeros((b, length), np.int32)
    word_ids = np.full((b, length), -1, np.int32)
    for i in range(b):
        pos, w = 1, 0
        budget = rng.integers(3, length)
        while pos < budget - 1:
            n = min(rng.integers(1, 4), budget - 1 - pos)
            word_ids[i, pos:pos + n] = w
            pos, w = pos + n, w + 1
        ids[i, 1:pos] = rng.integers(5, VOCAB, size=pos - 1)
        ids[i, 0], ids[i, pos] = CLS, SEP
        mask[i, :pos + 1] = 1
    _, _, label_mask = map(np.asarray, _mlm(jax.random.key(0), ids, mask, word_ids))
    chosen = label_mask > 0
    assert not np.any(chosen & (word_ids < 0))
    n_words = n_chosen = 0
    for i in range(b):
        for w in np.unique(word_ids[i][word_ids[i] >= 0]):
            piece = chosen[i][word_ids[i] == w]
            assert piece.all() or not piece.any(), "word partially masked"
            n_words += 1
            n_chosen += piece.all()
        assert chosen[i].any()
    assert abs(n_chosen / n_words - 0.15) < 0.015


def test_mask_patches_and_regions():
    m = np.asarray(jax.jit(objectives.mask_patches, static_argnums=(1, 2, 3))(jax.random.key(0), 196, 8, 0.75))
    assert m.shape == (8, 196) and m.dtype == bool
    np.testing.assert_array_equal(m.sum(1), 147)
    assert len({tuple(r) for r in m}) == 8

    region_mask = np.zeros((400, 36), np.int32)
    for i, n in enumerate(np.random.default_rng(0).integers(0, 37, size=400)):
        region_mask[i, :n] = 1
    r = np.asarray(objectives.mask_regions(jax.random.key(1), region_mask, 0.15))
    assert not np.any(r & (region_mask == 0))
    assert np.all(r.any(1) == region_mask.any(1))
    assert abs(r.sum() / region_mask.sum() - 0.15) < 0.015


def test_patchify_and_normalized_targets():
    img = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    p = np.asarray(layers.patchify(img, 2))
    assert p.shape == (2, 6, 12)
    np.testing.assert_array_equal(p[1, 4].reshape(2, 2, 3), img[1, 2:4, 2:4])
    t = np.asarray(objectives.normalized_patch_targets(p))
    np.testing.assert_allclose(t.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(t.std(-1), 1, atol=1e-3)


# ---------------------------------------------------------------------------------------------- ITM negatives
# All ITM tests share B and the number of keys, so the jitted sampler compiles once per `hard` (CPU time is scarce).
B, K = 12, 2000
KEYS = jax.random.split(jax.random.key(0), K)
NOTHING_FORBIDDEN = np.zeros((B, B), bool)


@functools.partial(jax.jit, static_argnums=(2,))
def _negs_jit(sim, same, hard):
    return jax.vmap(lambda k: objectives.itm_negatives(k, sim, same_image=same, hard=hard))(KEYS)


def _negs(sim, same, hard):
    """itm_negatives for K keys at once: ([K, B] indices, [K, B] valid) as numpy."""
    return tuple(np.asarray(x) for x in _negs_jit(sim, same, hard))


def _sim(seed=0):
    return np.random.default_rng(seed).normal(size=(B, B)).astype(np.float32) * 5


def test_itm_negatives_never_diagonal_or_forbidden():
    groups = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8])  # e.g. identical caption keys
    same = groups[:, None] == groups[None, :]
    for hard in (True, False):
        idx, valid = _negs(_sim(), same, hard)
        assert valid.all()
        assert not np.any(idx == np.arange(B)), "diagonal chosen"
        assert not np.any(same[np.arange(B), idx]), "forbidden pair chosen"


def test_itm_negatives_no_valid_candidate_falls_back():
    same = np.ones((B, B), bool)
    same[2, 3] = False  # only row 2 has a real negative
    idx, valid = _negs(_sim(), same, True)
    np.testing.assert_array_equal(valid[0], np.arange(B) == 2)
    assert not np.any(idx == np.arange(B)) and np.all(idx[:, 2] == 3)
    assert set(np.unique(idx[:, 0])) == set(range(1, B))  # uniformly random other index
    idx1, valid1 = objectives.itm_negatives(jax.random.key(0), jnp.zeros((1, 1)))
    assert int(idx1[0]) == 0 and not bool(valid1[0])


def test_itm_negatives_nonfinite_sim():
    sim = _sim(1)
    sim[0, :] = np.nan                 # no information at all: uniform over candidates
    sim[1, 2:] = -np.inf               # only j=0 has weight
    sim[2, 4] = np.inf                 # dominant
    sim[3, [0, 1]] = np.nan            # weight 0
    idx, valid = _negs(sim, NOTHING_FORBIDDEN, True)
    assert valid.all() and not np.any(idx == np.arange(B))
    assert set(np.unique(idx[:, 0])) == set(range(1, B))
    assert np.all(idx[:, 1] == 0) and np.all(idx[:, 2] == 4)
    assert not np.any(np.isin(idx[:, 3], [0, 1]))
    # Output is an int index (nothing NaN can come out) and the similarity gets no gradient.
    g = jax.grad(lambda s: jnp.sum(objectives.itm_negatives(jax.random.key(0), s)[0].astype(jnp.float32)))(sim)
    assert np.all(np.asarray(g) == 0)


def test_itm_hard_negatives_follow_softmax():
    sim = np.zeros((B, B), np.float32)
    sim[0, 1:5] = [3.0, 2.0, 1.0, 0.0]
    sim[0, 0] = 50.0  # the positive: must be ignored however similar
    idx, _ = _negs(sim, NOTHING_FORBIDDEN, True)
    z = np.exp(sim[0, 1:])
    freq = np.bincount(idx[:, 0], minlength=B)[1:] / K
    np.testing.assert_allclose(freq, z / z.sum(), atol=0.03)
    assert freq[0] > freq[1] > freq[2] > freq[3]
    uniform, _ = _negs(sim, NOTHING_FORBIDDEN, False)
    np.testing.assert_allclose(np.bincount(uniform[:, 0], minlength=B)[1:] / K, 1 / (B - 1), atol=0.03)


# ---------------------------------------------------------------------------------------------------- IPOT


def np_ipot_uniter(cost, mask_x, mask_y, beta=0.5, iteration=50, k=1):
    """Float64 line-by-line port of UNITER's model/ot.py `ipot` (layout [B, M_x, N_y] in, T [B, N_y, M_x])."""
    x_pad, y_pad = ~mask_x, ~mask_y
    joint_pad = x_pad[:, :, None] | y_pad[:, None, :]
    c = np.where(joint_pad, 0.0, cost)
    x_len, y_len = mask_x.sum(1).astype(np.float64), mask_y.sum(1).astype(np.float64)
    b, m, n = c.shape
    sigma = np.ones((b, m)) / x_len[:, None]
    t = np.ones((b, n, m))
    a = np.exp(-c.transpose(0, 2, 1) / beta)
    sigma[x_pad] = 0
    jp = joint_pad.transpose(0, 2, 1)
    t[jp] = 0
    a[jp] = 0
    x_len, y_len = x_len[:, None, None], y_len[:, None, None]
    x_mask = (x_pad * 1e4)[:, None, :]
    y_mask = (y_pad * 1e4)[:, None, :]
    for _ in range(iteration):
        q = a * t
        for _ in range(k):
            # UNITER reshapes sigma once, before this loop, so its code only runs with k=1; reshape per step.
            sigma = sigma.reshape(b, m, 1)
            delta = 1 / (y_len * (q @ sigma).reshape(b, 1, n) + y_mask)
            sigma = 1 / (x_len * (delta @ q) + x_mask)
        t = delta.reshape(b, n, 1) * q * sigma
    t[jp] = 0
    return t.transpose(0, 2, 1)  # -> [B, M_x, N_y], our layout


def _ot_case(seed, b=3, n=7, m=9):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(b, n, 8)), rng.normal(size=(b, m, 8))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y /= np.linalg.norm(y, axis=-1, keepdims=True)
    cost = (1 - x @ y.transpose(0, 2, 1)).astype(np.float32)
    mask_x = np.arange(n)[None] < np.array([n, 4, 2])[:b, None]
    mask_y = np.arange(m)[None] < np.array([m, 5, 9])[:b, None]
    return cost, mask_x, mask_y


@pytest.mark.parametrize("k,iters", [(1, 50), (2, 10)])
def test_ipot_matches_numpy_uniter(k, iters):
    cost, mx, my = _ot_case(k)
    got = np.asarray(jax.jit(objectives.ipot, static_argnames=("iterations", "k"))(
        cost, mx, my, iterations=iters, k=k))
    want = np_ipot_uniter(cost.astype(np.float64), mx, my, 0.5, iters, k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ipot_marginals_and_masking():
    cost, mx, my = _ot_case(0)
    t = np.asarray(objectives.ipot(cost, mx, my, iterations=200))
    joint = mx[:, :, None] & my[:, None, :]
    assert np.all(t[~joint] == 0) and np.all(t >= 0)
    nx, ny = mx.sum(1, keepdims=True), my.sum(1, keepdims=True)
    np.testing.assert_allclose(t.sum(2), mx / nx, atol=1e-5)   # exact after the last update
    np.testing.assert_allclose(t.sum(1), my / ny, atol=1e-3)   # converged
    np.testing.assert_allclose(t.sum((1, 2)), 1.0, atol=1e-5)
    # The plan concentrates on cheap pairs: its cost is below that of the independent (uniform) coupling.
    uniform = joint / (nx * ny)[:, :, None]
    d = np.asarray(objectives.wasserstein_distance(cost, t))
    assert np.all(d < (cost * uniform).sum((1, 2)))


def test_ipot_empty_rows_are_zero():
    cost, mx, my = _ot_case(1)
    mx[1] = False
    my[2] = False
    t = np.asarray(objectives.ipot(cost, mx, my))
    assert np.all(np.isfinite(t)) and np.all(t[1] == 0) and np.all(t[2] == 0)
    # Huge costs underflow exp(-C/beta) to 0: still finite.
    t = np.asarray(objectives.ipot(cost * 1e4, mx, my))
    assert np.all(np.isfinite(t))


def test_content_mask():
    m = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(objectives.content_mask(m), [[0, 1, 1, 0, 0], [0] * 5, [0] * 5])


def test_word_ids_from_pieces():
    # vocab: 0 pad, 1 cls, 2 sep, 3 "red", 4 "circ", 5 "##le", 6 "##s"
    continuation = np.array([False, False, False, False, False, True, True])
    ids = jnp.array([[1, 3, 4, 5, 6, 2, 0], [1, 5, 3, 2, 0, 0, 0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]])
    maskable = (mask > 0) & (ids > 2)
    word_ids = objectives.word_ids_from_pieces(ids, maskable, continuation)
    np.testing.assert_array_equal(word_ids, [[-1, 0, 1, 1, 1, -1, -1], [-1, 0, 1, -1, -1, -1, -1]])
    # Whole-word masking with these ids masks "circ ##le ##s" together or not at all.
    for seed in range(20):
        _, _, chosen = objectives.mask_tokens(jax.random.key(seed), ids, mask, mask_id=7, vocab_size=8,
                                              special_ids=[0, 1, 2], mask_prob=0.5, word_ids=word_ids)
        row = np.asarray(chosen[0])
        assert row[2] == row[3] == row[4]
