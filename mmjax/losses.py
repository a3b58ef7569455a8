"""Pure jnp loss functions. Each returns a float32 scalar; metrics live in separate functions.

No sharding constraints here: under jit the caller's batch sharding implies the all-gather for the global
[B, B] logits, and the trainer adds constraints (row-sharded logits) around these calls.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _logits(image_embeds: Array, text_embeds: Array, logit_scale: Array) -> Array:
    """[B, B] image->text logits in float32 (row i = image i, column j = text j)."""
    x = image_embeds.astype(jnp.float32)
    y = text_embeds.astype(jnp.float32)
    return jnp.asarray(logit_scale, jnp.float32) * jnp.einsum("id,jd->ij", x, y)


def softmax_contrastive_loss(image_embeds: Array, text_embeds: Array, logit_scale: Array) -> Array:
    """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropy, targets on the diagonal.

    image_embeds, text_embeds: [B, E] (unit norm); logit_scale: scalar t (already exp'd).
    """
    logits = _logits(image_embeds, text_embeds, logit_scale)
    i2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    t2i = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return 0.5 * (i2t + t2i)


def sigmoid_contrastive_loss(
    image_embeds: Array, text_embeds: Array, logit_scale: Array, logit_bias: Array
) -> Array:
    """SigLIP: -sum_ij log sigmoid(z_ij (t x_i.y_j + b)) / B, z = +1 on the diagonal and -1 elsewhere."""
    logits = _logits(image_embeds, text_embeds, logit_scale) + jnp.asarray(logit_bias, jnp.float32)
    n = logits.shape[0]
    z = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n


def contrastive_metrics(image_embeds: Array, text_embeds: Array) -> dict[str, Array]:
    """Top-1 in-batch retrieval accuracy both ways (i2t_acc, t2i_acc), for logging next to either loss."""
    sim = _logits(image_embeds, text_embeds, 1.0)
    target = jnp.arange(sim.shape[0])
    return {
        "i2t_acc": jnp.mean((jnp.argmax(sim, axis=1) == target).astype(jnp.float32)),
        "t2i_acc": jnp.mean((jnp.argmax(sim, axis=0) == target).astype(jnp.float32)),
    }
