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
