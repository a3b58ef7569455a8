"""Loss tests against float64 NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_log_softmax(z, axis):
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def np_softmax_loss(x, y, t):
    logits = t * x @ y.T
    i2t = -np.mean(np.diag(_np_log_softmax(logits, 1)))
    t2i = -np.mean(np.diag(_np_log_softmax(logits, 0)))
    return 0.5 * (i2t + t2i)


def np_sigmoid_loss(x, y, t, b):
    logits = t * x @ y.T + b
    z = 2 * np.eye(len(x)) - 1
    # log sigmoid(u) = -log(1 + exp(-u)), computed stably.
    return np.sum(np.logaddexp(0.0, -z * logits)) / len(x)


CASES = [(1, 8, 1 / 0.07), (7, 16, 1 / 0.07), (16, 8, 100.0), (5, 4, 1000.0)]


@pytest.mark.parametrize("n,d,t", CASES)
def test_softmax_contrastive_loss(n, d, t):
    rng = np.random.default_rng(n)
    x, y = _unit(rng, n, d), _unit(rng, n, d)
    got = losses.softmax_contrastive_loss(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), t)
    assert got.shape == () and got.dtype == jnp.float32
    # Reference on the float32-rounded inputs, so only the loss arithmetic is compared.
    want = np_softmax_loss(x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64), t)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, t / 100))


@pytest.mark.parametrize("n,d,t", CASES)
def test_sigmoid_contrastive_loss(n, d, t):
    rng = np.random.default_rng(n)
    x, y = _unit(rng, n, d), _unit(rng, n, d)
    b = -10.0
    got = losses.sigmoid_contrastive_loss(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), t, b)
    assert got.shape == () and got.dtype == jnp.float32
    want = np_sigmoid_loss(x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64), t, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, t / 100))


def test_batch_of_one_softmax_is_zero():
    x = jnp.asarray([[1.0, 0.0]])
    assert float(losses.softmax_contrastive_loss(x, x, 10.0)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("t", [1 / 0.07, 1000.0])
def test_grads_finite(t):
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(_unit(rng, 6, 8), jnp.float32), jnp.asarray(_unit(rng, 6, 8), jnp.float32)
    g_soft = jax.grad(losses.softmax_contrastive_loss, argnums=(0, 1, 2))(x, y, jnp.float32(t))
    g_sig = jax.grad(losses.sigmoid_contrastive_loss, argnums=(0, 1, 2, 3))(x, y, jnp.float32(t), jnp.float32(-10))
    for g in (*g_soft, *g_sig):
        assert np.all(np.isfinite(g))


def test_bf16_embeds_computed_in_f32():
    rng = np.random.default_rng(0)
    x, y = _unit(rng, 4, 8), _unit(rng, 4, 8)
    got = losses.softmax_contrastive_loss(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16), 10.0)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_softmax_loss(x, y, 10.0), atol=5e-2)


def test_contrastive_metrics():
    x = jnp.eye(3)
    m = losses.contrastive_metrics(x, x)
    assert float(m["i2t_acc"]) == 1.0 and float(m["t2i_acc"]) == 1.0


# ---------------------------------------------------------------------------------------------------- ranking losses


def np_hinge_rank(x, y, margin, hardest, directions, valid=None):
    """Loop reference, per anchor and per negative: (loss, dL/ds [B, B], fraction of negative pairs violating).

    A hardest anchor's gradient is split evenly between tied maxima, as jax.grad of jnp.max splits it.
    """
    s = x @ y.T
    n = len(s)
    valid = np.ones((n, n), bool) if valid is None else valid
    loss, grad, active, pairs = 0.0, np.zeros_like(s), 0, 0
    for direction in (("i2t", "t2i") if directions == "both" else (directions,)):
        for a in range(n):  # anchor: image a (i2t) or text a (t2i)
            hinges = []
            for b in range(n):  # negative: text b (i2t) or image b (t2i)
                i, j = (a, b) if direction == "i2t" else (b, a)
                if b == a or not valid[i, j]:
                    continue
                hinges.append((max(0.0, margin - s[a, a] + s[i, j]), (i, j)))
            pairs += len(hinges)
            active += sum(h > 0 for h, _ in hinges)
            if not hinges:
                continue
            if hardest:
                top = max(h for h, _ in hinges)
                hinges = [(h, ij) for h, ij in hinges if h == top]
                weight = 1.0 / len(hinges)
                loss += top / n
            else:
                weight = 1.0
                loss += sum(h for h, _ in hinges) / n
            for h, (i, j) in hinges:
                if h > 0:
                    grad[i, j] += weight / n
                    grad[a, a] -= weight / n
    return loss, grad, active / max(pairs, 1)


def _ranking_case():
    """B=6 embeddings with ties: texts 1 and 4 are the same caption, images 2 and 5 the same image; positives are
    closer than most negatives, so only some pairs violate the margin."""
    rng = np.random.default_rng(7)
    x = _unit(rng, 6, 8)
    y = x + 0.7 * rng.normal(size=x.shape)
    y /= np.linalg.norm(y, axis=-1, keepdims=True)
    y[4] = y[1]
    x[5] = x[2]
    caption_ids = np.array([0, 1, 2, 3, 1, 5])
    same = caption_ids[:, None] == caption_ids[None, :]
    return x.astype(np.float32), y.astype(np.float32), same


@pytest.mark.parametrize("exclude_duplicates", [False, True])
@pytest.mark.parametrize("hardest", [False, True])
@pytest.mark.parametrize("directions", ["i2t", "t2i", "both"])
def test_hinge_rank_loss_matches_loop_reference(directions, hardest, exclude_duplicates):
    x, y, same = _ranking_case()
    valid = ~same if exclude_duplicates else None
    margin = 0.2
    fn = jax.jit(lambda a, b: losses.hinge_rank_loss(a, b, margin, hardest=hardest, directions=directions,
                                                     valid=valid))
    got, (gx, gy) = jax.value_and_grad(fn, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(y))
    want, ds, violating = np_hinge_rank(x.astype(np.float64), y.astype(np.float64), margin, hardest, directions,
                                        valid)
    assert 0.0 < violating < 1.0  # the hinge both clips and passes pairs in this case
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # s = x y^T, so dL/dx = dL/ds y and dL/dy = dL/ds^T x.
    np.testing.assert_allclose(gx, ds @ y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gy, ds.T @ x, rtol=1e-5, atol=1e-6)


def test_hinge_rank_loss_excluding_duplicates_changes_the_loss():
    x, y, same = _ranking_case()
    for kwargs in losses.RANKING_LOSSES.values():
        with_dups = losses.hinge_rank_loss(x, y, 0.2, **kwargs)
        without = losses.hinge_rank_loss(x, y, 0.2, valid=~same, **kwargs)
        # The duplicate caption scores as high as the positive: a negative at the full margin, now dropped.
        assert float(without) < float(with_dups)


@pytest.mark.parametrize("name", sorted(losses.RANKING_LOSSES))
def test_hinge_rank_loss_batch_of_one_is_zero(name):
    x = jnp.asarray([[0.6, 0.8]])
    loss, g = jax.value_and_grad(losses.hinge_rank_loss)(x, -x, 0.5, **losses.RANKING_LOSSES[name])
    assert float(loss) == 0.0 and np.all(np.asarray(g) == 0.0)


def test_hinge_rank_loss_pair_at_the_margin_costs_and_pushes_nothing():
    # Exact in float32: s = [[1, 0.75], [0, 0.5]], so image 0's hinge on text 1 is 0.25 - 1 + 0.75 = 0.
    x = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    y = jnp.asarray([[1.0, 0.0], [0.75, 0.5]])
    loss, (gx, gy) = jax.value_and_grad(losses.hinge_rank_loss, argnums=(0, 1))(x, y, 0.25, directions="i2t")
    assert float(loss) == 0.0 and np.all(np.asarray(gx) == 0.0) and np.all(np.asarray(gy) == 0.0)


def test_hinge_rank_loss_devise_formula_and_bad_direction():
    x, y, _ = _ranking_case()
    # DeViSE (Frome et al. 2013), per image i: sum_{j != i} max(0, margin - t_i.v_i + t_j.v_i).
    want = np.mean([sum(max(0.0, 0.1 - y[i] @ x[i] + y[j] @ x[i]) for j in range(6) if j != i) for i in range(6)])
    np.testing.assert_allclose(losses.hinge_rank_loss(x, y, 0.1, **losses.RANKING_LOSSES["hinge"]), want,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="directions must be one of"):
        losses.hinge_rank_loss(x, y, directions="image")


# ---------------------------------------------------------------------------------------- masked modelling / ITM / VQA


def _f32(x):
    """float32 array for the function, and its float32-rounded float64 copy for the reference."""
    x32 = np.asarray(x, np.float32)
    return jnp.asarray(x32), x32.astype(np.float64)


def np_masked_lm(logits, labels, mask):
    logp = _np_log_softmax(logits, -1)
    keep = mask > 0
    if not keep.any():
        return 0.0, 0.0
    nll = -np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    return nll[keep].mean(), (logits.argmax(-1) == labels)[keep].mean()


@pytest.mark.parametrize("masked", [True, False])
def test_masked_lm_loss(masked):
    rng = np.random.default_rng(0)
    logits, logits64 = _f32(rng.normal(size=(2, 5, 7)) * 3)
    labels = rng.integers(0, 7, size=(2, 5))
    mask = (rng.random((2, 5)) < 0.5).astype(np.int32) if masked else np.zeros((2, 5), np.int32)
    labels = np.where(mask > 0, labels, -100)  # ignored positions may hold anything
    loss, acc = jax.jit(losses.masked_lm_loss)(logits, labels, mask)
    assert loss.shape == () and loss.dtype == jnp.float32 and acc.dtype == jnp.float32
    want_loss, want_acc = np_masked_lm(logits64, labels, mask)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc, want_acc, atol=1e-6)
    g = jax.grad(lambda z: losses.masked_lm_loss(z, labels, mask)[0])(logits)
    assert np.all(np.isfinite(g)) and (masked or np.all(g == 0))


@pytest.mark.parametrize("weighted", [None, "some", "zero"])
def test_itm_loss(weighted):
    rng = np.random.default_rng(1)
    logits, logits64 = _f32(rng.normal(size=(6, 2)) * 2)
    labels = np.array([1, 1, 0, 0, 0, 0])
    w = {None: None, "some": np.array([1, 1, 1, 0, 1, 0.5]), "zero": np.zeros(6)}[weighted]
    loss, acc = losses.itm_loss(logits, labels, w)
    ww = np.ones(6) if w is None else w
    nll = -_np_log_softmax(logits64, -1)[np.arange(6), labels]
    correct = logits64.argmax(-1) == labels
    den = max(ww.sum(), 1.0)
    np.testing.assert_allclose(loss, (nll * ww).sum() / den, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(acc, (correct * ww).sum() / den, atol=1e-6)


@pytest.mark.parametrize("masked", [True, False])
def test_masked_feature_regression_loss(masked):
    rng = np.random.default_rng(2)
    pred, pred64 = _f32(rng.normal(size=(2, 4, 3)))
    target, target64 = _f32(rng.normal(size=(2, 4, 3)))
    mask = np.array([[1, 0, 1, 0], [0, 0, 0, 1]]) * masked
    got = losses.masked_feature_regression_loss(pred, target, mask)
    err = ((pred64 - target64) ** 2).mean(-1)
    want = err[mask > 0].mean() if masked else 0.0
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(jax.grad(losses.masked_feature_regression_loss)(pred, target, mask)))


@pytest.mark.parametrize("hard,masked", [(False, True), (True, True), (False, False)])
def test_masked_region_classification_loss(hard, masked):
    rng = np.random.default_rng(3)
    logits, logits64 = _f32(rng.normal(size=(2, 3, 5)) * 2)
    if hard:
        target = rng.integers(0, 5, size=(2, 3))
        t64 = np.eye(5)[target]
    else:
        target, t64 = _f32(rng.dirichlet(np.ones(5), size=(2, 3)))
        target = target.at[0, 0].set(jnp.asarray([0.0, 0.5, 0.5, 0.0, 0.0]))  # zero-mass classes: 0 log 0 = 0
        t64[0, 0] = [0.0, 0.5, 0.5, 0.0, 0.0]
    mask = np.array([[1, 1, 0], [0, 1, 0]]) * masked
    got = losses.masked_region_classification_loss(logits, target, mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(t64 > 0, t64 * (np.log(t64) - _np_log_softmax(logits64, -1)), 0.0).sum(-1)
    want = kl[mask > 0].mean() if masked else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda z: losses.masked_region_classification_loss(z, target, mask))(logits)
    assert np.all(np.isfinite(g))


def np_ipot(cost, mx, my, beta=0.5, iters=50):
    """Float64 IPOT in our layout (sigma over x, delta over y): UNITER's iterations, transposed."""
    joint = mx[:, :, None] & my[:, None, :]
    nx, ny = mx.sum(1, keepdims=True), my.sum(1, keepdims=True)
    a = np.exp(-cost / beta) * joint
    t = joint.astype(np.float64)
    sigma = mx / np.maximum(nx, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(iters):
            q = a * t
            delta = np.nan_to_num(my / (ny * np.einsum("bn,bnm->bm", sigma, q)), posinf=0.0)
            sigma = np.nan_to_num(mx / (nx * np.einsum("bnm,bm->bn", q, delta)), posinf=0.0)
            t = sigma[:, :, None] * q * delta[:, None, :]
    return t * joint


@pytest.mark.parametrize("include_negatives", [True, False])
def test_word_patch_alignment_loss(include_negatives):
    rng = np.random.default_rng(4)
    b, n, m, d = 3, 6, 5, 8
    txt, txt64 = _f32(rng.normal(size=(b, n, d)))
    img, img64 = _f32(rng.normal(size=(b, m, d)))
    mx = np.arange(n)[None] < np.array([[6], [3], [4]])
    my = np.arange(m)[None] < np.array([[5], [5], [2]])
    pos = np.array([1, 0, 1])
    got = losses.word_patch_alignment_loss(txt, mx, img, my, pos, include_negatives=include_negatives)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    cost = np.where(mx[:, :, None] & my[:, None, :], 1 - np.einsum("bnd,bmd->bnm", unit(txt64), unit(img64)), 0)
    dist = (cost * np_ipot(cost, mx, my)).sum((1, 2))
    want = np.where(pos, dist, -dist).sum() / b if include_negatives else dist[pos > 0].mean()
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_word_patch_alignment_edge_cases():
    txt = jnp.zeros((2, 4, 8)).at[0, 1].set(1.0)  # mostly zero vectors: normalisation must not NaN
    img = jnp.ones((2, 3, 8))
    mx = jnp.asarray([[1, 1, 1, 0], [0, 0, 0, 0]])  # row 1: no real words at all
    my = jnp.ones((2, 3))
    fn = lambda t, i: losses.word_patch_alignment_loss(t, mx, i, my, jnp.asarray([0, 0]),  # noqa: E731
                                                       include_negatives=False)
    assert float(jax.jit(fn)(txt, img)) == 0.0  # no positive pair
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda t, i: losses.word_patch_alignment_loss(t, mx, i, my, jnp.asarray([1, 1])), (0, 1)))
    loss, g = loss_and_grad(txt, img)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(x)) for x in g)


def test_vqa_bce_loss():
    rng = np.random.default_rng(5)
    logits, logits64 = _f32(rng.normal(size=(3, 10)) * 4)
    scores, scores64 = _f32(rng.choice([0.0, 0.3, 0.6, 0.9, 1.0], size=(3, 10)))
    got = losses.vqa_bce_loss(logits, scores)
    p = 1 / (1 + np.exp(-logits64))
    want = -(scores64 * np.log(p) + (1 - scores64) * np.log1p(-p)).sum() / 3
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Equals ViLT's mean-BCE x num_answers; finite for huge logits.
    np.testing.assert_allclose(got, -(scores64 * np.log(p) + (1 - scores64) * np.log1p(-p)).mean() * 10, rtol=1e-5)
    big = losses.vqa_bce_loss(jnp.asarray([[1e4, -1e4]]), jnp.asarray([[0.0, 1.0]]))
    np.testing.assert_allclose(big, 2e4, rtol=1e-6)
