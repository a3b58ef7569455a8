"""Optimizer: schedule, weight-decay mask, frozen parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import optim


def _params():
    return {
        "img": {"block": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}, "pos_embedding": jnp.ones((3, 4))},
        "txt": {"token_embedding": jnp.ones((10, 4)), "ln": {"scale": jnp.ones((4,))},
                "dense": {"kernel": jnp.ones((4, 4))}},
        "logit_scale": jnp.ones(()),
    }


def test_decay_mask():
    mask = optim.decay_mask(_params())
    assert mask["img"]["block"]["kernel"] and mask["txt"]["dense"]["kernel"]
    assert not mask["img"]["block"]["bias"]
    assert not mask["img"]["pos_embedding"]
    assert not mask["txt"]["token_embedding"]
    assert not mask["txt"]["ln"]["scale"]
    assert not mask["logit_scale"]


def test_schedule_warmup_then_cosine_to_end():
    cfg = optim.default_optimizer_config()
    cfg.lr, cfg.warmup_steps, cfg.end_lr_factor = 1.0, 10, 0.1
    sched = optim.learning_rate_schedule(cfg, 100)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(100)) == pytest.approx(0.1)


def test_weight_decay_only_where_masked():
    cfg = optim.default_optimizer_config()
    cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.grad_clip = 0.1, 0, 0.5, 0.0
    params = _params()
    tx, _ = optim.make_optimizer(cfg, 10, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # Zero gradients: only decayed parameters move (by -lr * wd * p).
    np.testing.assert_allclose(updates["img"]["block"]["kernel"], -0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["img"]["block"]["bias"], 0.0)
    np.testing.assert_allclose(updates["txt"]["token_embedding"], 0.0)


def test_frozen_parameters_never_change():
    cfg = optim.default_optimizer_config()
    cfg.lr, cfg.warmup_steps, cfg.freeze = 0.1, 0, r"^txt/"
    params = _params()
    tx, _ = optim.make_optimizer(cfg, 10, params)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    new = params
    for _ in range(3):
        updates, state = tx.update(grads, state, new)
        new = optax.apply_updates(new, updates)
    for a, b in zip(jax.tree.leaves(params["txt"]), jax.tree.leaves(new["txt"])):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(params["img"]["block"]["kernel"], new["img"]["block"]["kernel"])


def test_freeze_regex_matching_nothing_is_an_error():
    cfg = optim.default_optimizer_config()
    cfg.freeze = r"^nothing/"
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.make_optimizer(cfg, 10, _params())
