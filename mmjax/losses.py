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


RANK_DIRECTIONS = ("i2t", "t2i", "both")
# The ranking losses a contrastive model may name (its `loss` field) -> hinge_rank_loss's keyword arguments.
RANKING_LOSSES: dict[str, dict] = {
    "hinge": dict(directions="i2t", hardest=False),  # DeViSE (Frome et al. 2013)
    "triplet": dict(directions="both", hardest=False),  # VSE sum of hinges
    "triplet_hardest": dict(directions="both", hardest=True),  # VSE++ (Faghri et al. 2018)
}


def hinge_rank_loss(
    image_embeds: Array,
    text_embeds: Array,
    margin: float = 0.1,
    *,
    hardest: bool = False,
    directions: str = "both",
    valid: Array | None = None,
) -> Array:
    """Ranking hinge, s = x y^T: mean over anchors i of sum_{j != i} (max_j if hardest) max(0, margin - s_ii + s_ij).

    directions: "i2t" (anchor image i, negative texts j: DeViSE), "t2i" (anchor text j, negative images i: s_ji
    read down column j), or "both" (the two terms added: VSE, VSE++ with hardest=True). valid [B, B] bool (True:
    image i and text j make a usable negative pair, e.g. False for identical captions); the diagonal is never a
    negative, and an anchor without a usable negative contributes 0 (so B = 1 gives 0).
    """
    if directions not in RANK_DIRECTIONS:
        raise ValueError(f"directions must be one of {RANK_DIRECTIONS}; got {directions!r}")
    s = _logits(image_embeds, text_embeds, 1.0)
    pos = jnp.diagonal(s)
    negative = ~jnp.eye(s.shape[0], dtype=bool)
    if valid is not None:
        negative = negative & jnp.asarray(valid, bool)
    reduce = jnp.max if hardest else jnp.sum
    margin = jnp.asarray(margin, jnp.float32)
    loss = jnp.zeros((), jnp.float32)
    # relu (gradient 0 at 0), not maximum (0.5 at a tie): a pair exactly at the margin is satisfied. Hinges are
    # >= 0, so masking to 0 leaves both the sum and the max over the usable negatives unchanged.
    if directions in ("i2t", "both"):
        loss += jnp.mean(reduce(jnp.where(negative, jax.nn.relu(margin - pos[:, None] + s), 0.0), axis=1))
    if directions in ("t2i", "both"):
        loss += jnp.mean(reduce(jnp.where(negative, jax.nn.relu(margin - pos[None, :] + s), 0.0), axis=0))
    return loss


def contrastive_metrics(image_embeds: Array, text_embeds: Array) -> dict[str, Array]:
    """Top-1 in-batch retrieval accuracy both ways (i2t_acc, t2i_acc), for logging next to either loss."""
    sim = _logits(image_embeds, text_embeds, 1.0)
    target = jnp.arange(sim.shape[0])
    return {
        "i2t_acc": jnp.mean((jnp.argmax(sim, axis=1) == target).astype(jnp.float32)),
        "t2i_acc": jnp.mean((jnp.argmax(sim, axis=0) == target).astype(jnp.float32)),
    }


# --------------------------------------------------------------------------------------------------------------
# Masked modelling, matching and VQA losses. The classification ones return (loss, accuracy): the accuracy needs
# the same masked reduction, and computing it here keeps the two consistent. Masked means are taken over the
# selected positions only and are 0 (not NaN) when nothing is selected, so a batch without targets is harmless.
# --------------------------------------------------------------------------------------------------------------


def _masked_mean(values: Array, mask: Array) -> Array:
    """sum(values * mask) / max(sum(mask), 1) in float32; 0 when the mask is empty."""
    mask = mask.astype(jnp.float32)
    # where(), not values * mask: a masked-out inf/NaN (e.g. garbage logits at padding) must not leak in.
    total = jnp.sum(jnp.where(mask > 0, values.astype(jnp.float32) * mask, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1.0)


def _cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Per-position CE and correctness (float32), for integer labels in [0, V)."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return nll, correct


def masked_lm_loss(logits: Array, labels: Array, label_mask: Array) -> tuple[Array, Array]:
    """MLM: (mean CE, accuracy) over the positions with label_mask > 0; (0, 0) when there are none.

    logits [B, L, V]; labels [B, L] int (any value where unmasked, e.g. -100 or the original id).
    """
    keep = label_mask > 0
    # Unmasked labels may be out of range (-100): replace them so the gather stays in bounds.
    nll, correct = _cross_entropy(logits, jnp.where(keep, labels, 0))
    return _masked_mean(nll, keep), _masked_mean(correct, keep)


def itm_loss(logits: Array, labels: Array, weights: Array | None = None) -> tuple[Array, Array]:
    """Image-text matching: (weighted mean 2-way CE, weighted accuracy); logits [N, 2], labels [N] in {0, 1}.

    weights [N] (optional, e.g. `itm_weights` from `objectives.build_itm_batch`) drops pairs whose negative
    was not a true negative; all-zero weights give (0, 0).
    """
    w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights
    nll, correct = _cross_entropy(logits, labels)
    return _masked_mean(nll, w), _masked_mean(correct, w)


def masked_feature_regression_loss(pred: Array, target: Array, mask: Array) -> Array:
    """MSE over the masked positions: mean over D of (pred - target)^2, then mean over mask > 0 (0 if none).

    UNITER's MRFR (region features) and masked patch modelling (targets from
    `objectives.normalized_patch_targets`, MAE's norm-pix loss). pred, target [B, N, D]; mask [B, N].
    """
    err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    return _masked_mean(err, mask > 0)


def masked_region_classification_loss(logits: Array, target: Array, mask: Array) -> Array:
    """UNITER MRC-kl: mean over masked regions of KL(target || softmax(logits)), summed over classes; 0 if none.

    logits [B, R, C]; target [B, R, C] soft labels (e.g. the detector's class distribution) or [B, R] int hard
    labels, taken as one-hot (the KL is then the cross-entropy); mask [B, R].
    """
    logits = logits.astype(jnp.float32)
    if target.ndim == logits.ndim - 1:
        target = jax.nn.one_hot(target, logits.shape[-1], dtype=jnp.float32)
    t = target.astype(jnp.float32)
    # xlogy: 0 * log 0 = 0 for the classes a soft label gives no mass.
    kl = jnp.sum(jax.scipy.special.xlogy(t, t) - t * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    return _masked_mean(kl, mask > 0)


def word_patch_alignment_loss(
    text_tokens: Array,
    text_mask: Array,
    image_tokens: Array,
    image_mask: Array,
    is_positive: Array,
    *,
    beta: float = 0.5,
    iterations: int = 50,
    k: int = 1,
    include_negatives: bool = True,
) -> Array:
    """ViLT/UNITER word-patch (word-region) alignment: OT distance between text and image tokens.

    d_b = <C_b, T_b>, C = 1 - cos(text_n, image_m) and T = `objectives.ipot(C)` (a constant) over the real tokens
    of text_mask [B, N] / image_mask [B, M] (drop [CLS]/[SEP] first, e.g. `objectives.content_mask`).
    include_negatives=True is ViLT's and UNITER's loss: (sum_pos d - sum_neg d) / B, pulling matched pairs
    together and pushing mismatched ones apart. include_negatives=False: mean of d over the positive pairs only
    (0 if none). is_positive [B] (the ITM labels).
    """
    from mmjax import objectives  # pylint: disable=import-outside-toplevel  (objectives is the OT's home)

    mx, my = text_mask > 0, image_mask > 0
    cost = objectives.cosine_cost(text_tokens, image_tokens)
    cost = jnp.where(mx[:, :, None] & my[:, None, :], cost, 0.0)
    plan = objectives.ipot(cost, mx, my, beta=beta, iterations=iterations, k=k)
    dist = objectives.wasserstein_distance(cost, plan)
    pos = is_positive > 0
    if include_negatives:
        return jnp.sum(jnp.where(pos, dist, -dist)) / dist.shape[0]
    return _masked_mean(dist, pos)


def vqa_bce_loss(logits: Array, soft_scores: Array) -> Array:
    """VQA: binary cross-entropy against soft answer scores [B, A], summed over answers, mean over the batch.

    Equals ViLT's / UNITER's `bce_with_logits(logits, targets) * A` (mean over B*A elements times A): the sum
    keeps the gradient per answer independent of the answer-vocabulary size.
    """
    x = logits.astype(jnp.float32)
    t = soft_scores.astype(jnp.float32)
    # softplus(x) - x t == -(t log sigmoid(x) + (1 - t) log sigmoid(-x)), stable for large |x|.
    bce = jax.nn.softplus(x) - x * t
    return jnp.sum(bce) / x.shape[0]


def caption_loss(logits: Array, targets: Array, weights: Array, label_smoothing: float = 0.0) -> tuple[Array, Array]:
    """Captioning (teacher-forced next-token prediction): (mean CE over the tokens with weights > 0, their top-1
    accuracy); (0, 0) when there are none.

    logits [B, T, V] (position t predicts targets[:, t]); targets [B, T] int; weights [B, T] (1 on real target
    tokens, the end token included). label_smoothing eps: the target distribution is (1 - eps) one-hot + eps / V
    (optax.smooth_labels), so the loss is (1 - eps) CE + eps * mean over the vocabulary of -log p.
    """
    logits = logits.astype(jnp.float32)
    keep = weights > 0
    nll, correct = _cross_entropy(logits, jnp.where(keep, targets, 0))
    if label_smoothing:
        uniform = -jnp.mean(jax.nn.log_softmax(logits, axis=-1), axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    return _masked_mean(nll, keep), _masked_mean(correct, keep)
