"""layers.LayerNorm (hand-written backward pass) against flax's nn.LayerNorm with its two-pass variance (the
statistics ours computes; flax's default one-pass E[x^2] - E[x]^2 loses the variance of rows far from zero):
outputs and every gradient."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import layers


@pytest.mark.parametrize("x_dtype,dtype,tol", [
    (jnp.float32, jnp.float32, 1e-5),
    (jnp.float32, jnp.bfloat16, 1e-2),  # bf16 output, float32 input (a model's first LayerNorm under bf16)
    (jnp.bfloat16, jnp.bfloat16, 1e-2),
])
def test_matches_flax_layer_norm(x_dtype, dtype, tol):
    rng = np.random.default_rng(0)
    # Rows with a large offset and spread (cancellation in a one-pass variance) and one constant row (var = 0).
    x = rng.standard_normal((3, 5, 48)).astype(np.float32) * 4.0 + 30.0
    x[0, 0] = 7.0
    x = jnp.asarray(x, x_dtype)
    params = {"params": {"scale": jnp.asarray(rng.standard_normal(48), jnp.float32),
                         "bias": jnp.asarray(rng.standard_normal(48), jnp.float32)}}
    weights = jnp.asarray(rng.standard_normal((3, 5, 48)), jnp.float32)
    ours = layers.LayerNorm(epsilon=1e-6, dtype=dtype)
    ref = nn.LayerNorm(epsilon=1e-6, dtype=dtype, use_fast_variance=False)

    def loss(module):
        return lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32) * weights)

    y, y_ref = ours.apply(params, x), ref.apply(params, x)
    assert y.dtype == y_ref.dtype == dtype
    chex.assert_trees_all_close(y.astype(jnp.float32), y_ref.astype(jnp.float32), atol=tol * 10, rtol=tol)
    grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    grads_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    chex.assert_trees_all_equal_dtypes(grads, grads_ref)
    scale = jax.tree.map(lambda g: float(jnp.max(jnp.abs(g.astype(jnp.float32)))) + 1e-6, grads_ref)
    rel = jax.tree.map(lambda a, b, s: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) / s,
                       grads, grads_ref, scale)
    assert max(jax.tree.leaves(rel)) < tol, rel


def test_same_parameters_as_flax():
    x = jnp.ones((2, 4, 8))
    ours = layers.layer_norm(1e-6, jnp.float32, jnp.float32).init(jax.random.key(0), x)
    ref = nn.LayerNorm().init(jax.random.key(0), x)
    chex.assert_trees_all_equal_shapes(nn.meta.unbox(ours), ref)
