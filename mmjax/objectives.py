"""What a pretraining task does to a batch before the model: masks, negatives and alignment plans.

Everything here is drawn on device from an explicit jax PRNG key, has static shapes and no Python loop over the
batch, so it runs inside the jitted train step (the task splits the step key per purpose and calls these).

    mask_tokens            BERT MLM masking (15%, 80/10/10), optional whole-word masking
    mask_text              mask_tokens with a tokenizer's special ids (and whole words from its vocabulary)
    mask_patches           masked patch modelling (exact count per image, MAE style)
    mask_regions           masked region modelling over the real regions
    itm_negatives          image-text matching negatives (hard, softmax(sim) sampled, or in-batch random)
    ipot / wasserstein_distance   inexact proximal point OT for word-patch / word-region alignment (UNITER, ViLT)
    model_inputs           one block of model rows: a batch's inputs with another text and visual masks

The loss functions that consume these live in `mmjax.losses`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ----------------------------------------------------------------------------------------------------------------
# Choosing a random subset of "units" (tokens, words, regions) per row.
# ----------------------------------------------------------------------------------------------------------------


def _choose(rng: Array, valid: Array, prob: float, *, at_least_one: bool = True) -> Array:
    """Per row, a uniformly random subset of the valid units of size ~prob * n_valid; bool [B, U].

    The count is floor(prob * n + v), v ~ U[0, 1) ("stochastic rounding"): its expectation is exactly prob * n, so
    the chosen fraction is unbiased over a batch, yet its variance is far below a per-unit Bernoulli draw (BERT's
    data script uses a fixed round(prob * n) per sequence for the same reason). With `at_least_one`, a row that
    has any valid unit gets at least one (a sequence with no prediction target wastes its forward pass); this
    biases the fraction up only for rows with prob * n < 1. Which units: the `count` smallest of i.i.d. uniform
    scores, i.e. a uniformly random subset of that size.
    """
    valid = valid.astype(bool)
    # One draw: U scores for the order plus one rounding variate per row (each PRNG call costs compile time).
    u = jax.random.uniform(rng, (*valid.shape[:-1], valid.shape[-1] + 1))
    n = jnp.sum(valid, axis=-1)
    count = jnp.floor(prob * n + u[..., -1]).astype(jnp.int32)
    if at_least_one and prob > 0:
        count = jnp.maximum(count, 1)
    count = jnp.minimum(count, n)
    # Invalid units get a score above every valid one, so they rank last and are never among the first `count`.
    score = jnp.where(valid, u[..., :-1], 2.0)
    rank = jnp.argsort(jnp.argsort(score, axis=-1), axis=-1)
    return (rank < count[..., None]) & valid


def _word_units(word_ids: Array) -> Array:
    """Index of each position's word within its row, in [0, L): pieces of one word must be contiguous (as a
    tokenizer emits them); a new word starts wherever the id changes. Positions with id -1 get a harmless index
    (the caller never masks them)."""
    prev = jnp.pad(word_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    start = (word_ids >= 0) & (word_ids != prev)
    return jnp.maximum(jnp.cumsum(start, axis=1) - 1, 0)


def word_ids_from_pieces(text_ids: Array, maskable: Array, continuation: Array) -> Array:
    """Word ids [B, L] for whole-word masking, from the pieces themselves: a word starts at every maskable piece
    that is not a continuation piece (`continuation` bool [V], e.g. `Tokenizer.continuation_table()`); -1 where
    not maskable. Works on device, so masks are drawn in the step without host-side word boundaries."""
    cont = jnp.take(jnp.asarray(continuation), text_ids, axis=0)
    prev_maskable = jnp.pad(maskable[:, :-1], ((0, 0), (1, 0)), constant_values=False)
    # A continuation after a special token (no word to continue) starts a word of its own.
    start = maskable & (~cont | ~prev_maskable)
    word = jnp.cumsum(start, axis=1) - 1
    return jnp.where(maskable, word, -1).astype(jnp.int32)


def _sample_non_special(rng: Array, shape: tuple[int, ...], vocab_size: int, excluded: Sequence[int]) -> Array:
    """Uniform token ids in [0, vocab_size) minus `excluded`, without rejection sampling.

    Draw r uniform in [0, vocab_size - k) and map it to the r-th allowed id: walking the excluded ids in
    ascending order, every excluded id <= r pushes r up by one.
    """
    excluded = sorted({int(s) for s in excluded if 0 <= int(s) < vocab_size})
    r = jax.random.randint(rng, shape, 0, vocab_size - len(excluded))
    for s in excluded:  # static, a handful of special ids
        r = r + (r >= s).astype(r.dtype)
    return r


# ----------------------------------------------------------------------------------------------------------------
# Masked language / patch / region modelling.
# ----------------------------------------------------------------------------------------------------------------


def mask_tokens(
    rng: Array,
    text_ids: Array,
    text_mask: Array,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    mask_prob: float = 0.15,
    word_ids: Array | None = None,
) -> tuple[Array, Array, Array]:
    """BERT MLM masking: returns (masked_ids, labels, label_mask), all [B, L] (ids int like text_ids, mask int32).

    Chosen: ~mask_prob of the real (text_mask > 0), non-special tokens of each row, at least one per row that has
    any (see `_choose`). Of the chosen, 80% -> mask_id, 10% -> a uniformly random non-special token, 10% kept.
    labels = the original ids everywhere; label_mask = 1 exactly on the chosen positions.
    Whole-word masking: pass `word_ids` [B, L] (same id for the contiguous pieces of one word, -1 for special /
    pad); then ~mask_prob of the *words* are chosen and every maskable piece of a chosen word is masked together.
    The 80/10/10 decision stays per piece, as in BERT's whole-word data script.
    """
    k_choose, k_action, k_random = jax.random.split(rng, 3)
    special = jnp.asarray(sorted({int(s) for s in special_ids}) or [-1], text_ids.dtype)
    maskable = (text_mask > 0) & ~jnp.isin(text_ids, special)
    if word_ids is None:
        chosen = _choose(k_choose, maskable, mask_prob)
    else:
        maskable = maskable & (word_ids >= 0)
        unit = _word_units(word_ids)
        # A word slot is choosable if any of its pieces is maskable (segment-max of `maskable` onto word slots).
        unit_valid = jax.vmap(lambda u, m: jnp.zeros(u.shape, jnp.int32).at[u].max(m.astype(jnp.int32)))(
            unit, maskable)
        chosen_unit = _choose(k_choose, unit_valid > 0, mask_prob)
        chosen = jnp.take_along_axis(chosen_unit, unit, axis=1) & maskable

    action = jax.random.uniform(k_action, text_ids.shape)
    random_ids = _sample_non_special(k_random, text_ids.shape, vocab_size, [*special_ids, mask_id])
    replaced = jnp.where(action < 0.8, jnp.asarray(mask_id, text_ids.dtype),
                         jnp.where(action < 0.9, random_ids.astype(text_ids.dtype), text_ids))
    masked_ids = jnp.where(chosen, replaced, text_ids)
    return masked_ids, text_ids, chosen.astype(jnp.int32)


def special_ids(tokenizer: Any) -> list[int]:
    """The ids MLM never masks or samples: pad, cls, sep, mask, unk."""
    return [tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.unk_id]


def mask_text(rng: Array, ids: Array, mask: Array, tokenizer: Any, *, mask_prob: float,
              continuation: np.ndarray | None = None) -> tuple[Array, Array, Array]:
    """`mask_tokens` with the tokenizer's special ids; whole words when `continuation` (the tokenizer's
    continuation_table) is given. Returns (masked_ids, labels, label_mask)."""
    word_ids = None
    if continuation is not None:
        maskable = (mask > 0) & ~jnp.isin(ids, jnp.asarray(special_ids(tokenizer), ids.dtype))
        word_ids = word_ids_from_pieces(ids, maskable, continuation)
    return mask_tokens(rng, ids, mask, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                       special_ids=special_ids(tokenizer), mask_prob=mask_prob, word_ids=word_ids)


def mask_patches(rng: Array, num_patches: int, batch: int, mask_prob: float) -> Array:
    """Masked patch modelling: bool [batch, num_patches], exactly round(mask_prob * num_patches) True per image.

    A fixed count (as MAE) keeps the number of visible / predicted patches static, so an encoder may gather them.
    """
    count = int(round(mask_prob * num_patches))
    score = jax.random.uniform(rng, (batch, num_patches))
    rank = jnp.argsort(jnp.argsort(score, axis=-1), axis=-1)
    return rank < count


def mask_regions(rng: Array, region_mask: Array, mask_prob: float = 0.15) -> Array:
    """Masked region modelling: bool [B, R], ~mask_prob of the real regions (region_mask > 0) of each example,
    at least one where any is real (same rule as `mask_tokens`); padding regions are never chosen."""
    return _choose(rng, region_mask > 0, mask_prob)


def normalized_patch_targets(patches: Array, eps: float = 1e-6) -> Array:
    """MAE's norm-pix targets: each patch standardised by its own mean and variance (float32)."""
    x = patches.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


# ----------------------------------------------------------------------------------------------------------------
# Image-text matching negatives.
# ----------------------------------------------------------------------------------------------------------------


def itm_negatives(
    rng: Array, sim: Array, *, same_image: Array | None = None, hard: bool = True
) -> tuple[Array, Array]:
    """For each image (row of sim [B, B], image i vs text j) a negative caption: (neg_text_index [B], valid [B]).

    Candidates are j != i with same_image[i, j] False (same_image: [B, B] bool, pairs that are not true negatives,
    e.g. identical caption keys or the same image id). hard=True samples j with probability softmax(sim[i]) over the
    candidates (ALBEF; pass temperature-scaled similarities, gradients are stopped); hard=False samples them
    uniformly. Never NaN: NaN similarities count as -inf (weight 0) and +inf is clipped to the largest float. A row
    whose candidates all have weight 0 falls back to a uniform candidate (valid stays True). A row with no
    candidate at all falls back to a random j != i (i itself when B == 1) and reports valid=False, so the caller
    can drop that pair from the loss rather than train on a false "mismatch".
    """
    b = sim.shape[0]
    not_self = ~jnp.eye(b, dtype=bool)
    candidate = not_self if same_image is None else not_self & ~same_image.astype(bool)

    if hard:
        s = jax.lax.stop_gradient(sim).astype(jnp.float32)
        big = jnp.finfo(jnp.float32).max
        logits = jnp.where(jnp.isnan(s), -jnp.inf, jnp.minimum(s, big))
    else:
        logits = jnp.zeros((b, b), jnp.float32)
    weighted = candidate & (logits > -jnp.inf)
    # Gumbel-max: argmax(logits + g) is an exact sample of softmax(logits); masking with -inf keeps it NaN-free.
    # Each row uses exactly one of the three scores below, so they may share one Gumbel draw.
    g = jax.random.gumbel(rng, (b, b), jnp.float32)
    score_hard = jnp.where(weighted, logits + g, -jnp.inf)
    score_uniform = jnp.where(candidate, g, -jnp.inf)
    score_other = jnp.where(not_self, g, -jnp.inf)

    has_weighted = jnp.any(weighted, axis=1, keepdims=True)
    valid = jnp.any(candidate, axis=1)
    score = jnp.where(has_weighted, score_hard, jnp.where(valid[:, None], score_uniform, score_other))
    return jnp.argmax(score, axis=1).astype(jnp.int32), valid


# ----------------------------------------------------------------------------------------------------------------
# Optimal transport for word-region / word-patch alignment.
# ----------------------------------------------------------------------------------------------------------------


def ipot(
    cost: Array, mask_x: Array, mask_y: Array, beta: float = 0.5, iterations: int = 50, k: int = 1
) -> Array:
    """Inexact proximal point OT (Xie et al. 2019) as in UNITER/ViLT: transport plan T [B, N, M], float32.

    cost [B, N, M] between the N tokens x and M tokens y; marginals uniform over the real tokens (1/n_x, 1/n_y),
    entries touching padding are exactly 0, a row with no real x or y gives T = 0. The plan is a constant of the
    loss (gradients stopped, UNITER's `torch.no_grad`); gradients reach the features through
    `wasserstein_distance(cost, T)`. Same iterations as UNITER's `ipot` (which is written in the transposed
    layout): sigma over x, delta over y, the x-marginal exact after the last update.
    """
    cost = jax.lax.stop_gradient(cost).astype(jnp.float32)
    mx = mask_x.astype(bool)
    my = mask_y.astype(bool)
    joint = (mx[:, :, None] & my[:, None, :]).astype(jnp.float32)
    n_x = jnp.sum(mx, axis=1, keepdims=True).astype(jnp.float32)
    n_y = jnp.sum(my, axis=1, keepdims=True).astype(jnp.float32)
    fx, fy = mx.astype(jnp.float32), my.astype(jnp.float32)

    def inv(num_mask: Array, n: Array, s: Array) -> Array:
        # mask / (n * s); UNITER adds 1e4 on padding instead, same plan. A zero sum (no real partner, or
        # underflowed exp(-C/beta)) gives 0 instead of inf, so T never holds inf * 0 = NaN.
        d = n * s
        return jnp.where(d > 0, num_mask / jnp.where(d > 0, d, 1.0), 0.0)

    a = jnp.exp(-cost / beta) * joint  # proximal kernel, masked
    sigma0 = fx / jnp.maximum(n_x, 1.0)

    def body(_, carry):
        t, sigma = carry
        q = a * t
        delta = jnp.zeros_like(fy)
        for _ in range(k):  # k is a small static number of Sinkhorn steps per proximal step
            delta = inv(fy, n_y, jnp.einsum("bn,bnm->bm", sigma, q))
            sigma = inv(fx, n_x, jnp.einsum("bnm,bm->bn", q, delta))
        return sigma[:, :, None] * q * delta[:, None, :], sigma

    t, _ = jax.lax.fori_loop(0, iterations, body, (joint, sigma0))
    return t * joint


def wasserstein_distance(cost: Array, plan: Array) -> Array:
    """<cost, T> per example: [B] float32 (UNITER's trace(C T^T)); differentiable in cost, T is a constant."""
    return jnp.sum(cost.astype(jnp.float32) * jax.lax.stop_gradient(plan).astype(jnp.float32), axis=(1, 2))


def cosine_cost(x: Array, y: Array, eps: float = 1e-5) -> Array:
    """1 - cos(x_n, y_m): [B, N, M] float32 from x [B, N, D], y [B, M, D]; norms floored at eps (F.normalize)."""
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    # max(|x|^2, eps^2) inside the sqrt, not max(|x|, eps): the gradient of a norm at a zero vector is NaN.
    x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
    y = y * jax.lax.rsqrt(jnp.maximum(jnp.sum(y * y, axis=-1, keepdims=True), eps * eps))
    return 1.0 - jnp.einsum("bnd,bmd->bnm", x, y)


def content_mask(text_mask: Array) -> Array:
    """text_mask without [CLS] (first position) and [SEP] (last real token): the words that WPA aligns (ViLT).

    Assumes the tokenizer layout [CLS] tokens [SEP] pad... (`mmjax.data.tokenizer`).
    """
    m = text_mask > 0
    length = jnp.sum(m, axis=1, keepdims=True)
    pos = jnp.arange(m.shape[1])[None, :]
    return (m & (pos > 0) & (pos < length - 1)).astype(jnp.int32)


def model_inputs(batch: dict, model_keys: Sequence[str], text: tuple[Array, Array], *,
                 region_masked: Array | None = None, patch_mask: Array | None = None) -> dict:
    """One block of model rows: the batch's non-text model inputs (`model_keys`) with the given text, and the
    visual masks of masked region / patch modelling (region models always get a region_feature_mask)."""
    rows = {k: batch[k] for k in model_keys if k not in ("text_ids", "text_mask")}
    rows["text_ids"], rows["text_mask"] = text
    if "region_mask" in rows:
        zeros = jnp.zeros(jnp.shape(batch["region_mask"]), jnp.int32)
        rows["region_feature_mask"] = zeros if region_masked is None else jnp.asarray(region_masked).astype(jnp.int32)
    if patch_mask is not None:
        rows["patch_mask"] = jnp.asarray(patch_mask).astype(jnp.int32)
    return rows
