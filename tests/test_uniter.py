"""UNITER: output shapes, logical partitioning, padding invariance, region feature masking, box geometry, errors."""
from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.uniter import UNITER, box_geometry
from mmjax.models.heads import HeadTransform

B, L, R, F, C, D, V = 2, 6, 4, 12, 5, 16, 50  # batch, text length, regions, feature dim, classes, width, vocab
# Depth 2 and one shared init / jitted apply keep the file fast on 2 shared cores: XLA compile time dominates.
TINY = dict(vocab_size=V, max_len=8, region_feat_dim=F, num_region_classes=C, width=D, depth=2, heads=2)
MODEL = UNITER(**TINY)
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "length", "joint", None}  # documented in layers.py


def make_batch(seed: int = 0, **overrides) -> dict:
    """Random ids / features / boxes. Padding: text [1, 4:], regions [0, 3] and [1, 2:]."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    text_mask = np.ones((B, L), np.int32)
    text_mask[1, 4:] = 0
    region_mask = np.ones((B, R), np.int32)
    region_mask[0, 3] = 0
    region_mask[1, 2:] = 0
    corner = jax.random.uniform(k3, (B, R, 2), maxval=0.5)
    size = jax.random.uniform(k4, (B, R, 2), minval=0.1, maxval=0.5)
    batch = {
        "text_ids": jax.random.randint(k1, (B, L), 1, V),
        "text_mask": jnp.asarray(text_mask),
        "region_feats": jax.random.normal(k2, (B, R, F)),
        "region_boxes": jnp.concatenate([corner, corner + size], axis=-1),
        "region_mask": jnp.asarray(region_mask),
        "region_feature_mask": jnp.zeros((B, R), jnp.int32),  # always present: one jit cache entry
    }
    return {**batch, **overrides}


def random_variables(model: UNITER, seed: int = 0) -> dict:
    """Boxed variables of `model` filled from numpy (LN scales 1, others ~ N(0, 1/fan_in)).

    The structure and logical names come from `eval_shape(model.init)`; skipping the real initialisers saves the
    ~15 s it takes XLA to compile init's random-number code on the shared cores here.
    """
    rng = np.random.default_rng(seed)

    def fill(path, x: jax.ShapeDtypeStruct) -> jax.Array:
        if "['scale']" in jax.tree_util.keystr(path):  # (the boxed leaf's path ends in .value)
            return jnp.ones(x.shape, x.dtype)
        std = 1.0 / np.sqrt(x.shape[0]) if len(x.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(size=x.shape) * std, x.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, jax.random.PRNGKey(0), make_batch()))


@functools.lru_cache(maxsize=None)
def shared_variables():
    """One set of variables for MODEL (every head on)."""
    return random_variables(MODEL)


@functools.lru_cache(maxsize=None)
def jitted_apply(model: UNITER):
    """One jitted apply per model config, so equal-shaped calls across tests reuse the compilation."""
    return jax.jit(model.apply)


def apply(batch: dict) -> dict:
    """MODEL's outputs for `batch` with the shared variables."""
    return jitted_apply(MODEL)(shared_variables(), batch)


def test_shapes_and_dtypes():
    """Every output has its documented shape and dtype; head outputs are float32; MLM decoder is tied."""
    batch = make_batch()
    out = apply(batch)
    expected = {
        "text_tokens": (B, L, D), "image_tokens": (B, R, D), "image_mask": (B, R), "pooled": (B, D),
        "itm_logits": (B, 2), "mlm_logits": (B, L, V), "mrfr_pred": (B, R, F), "mrc_logits": (B, R, C),
    }
    assert set(out) == set(expected)
    for key, shape in expected.items():
        chex.assert_shape(out[key], shape)
    chex.assert_type(out["image_mask"], jnp.int32)
    np.testing.assert_array_equal(out["image_mask"], batch["region_mask"])
    chex.assert_type([out[k] for k in expected if k != "image_mask"], jnp.float32)
    chex.assert_tree_all_finite(out)

    # mlm_logits = transform(text_tokens) @ text_embeddings/word_embedding^T + bias (no decoder kernel of its own).
    params = nn.unbox(shared_variables()["params"])
    h = HeadTransform().apply({"params": params["mlm_transform"]}, out["text_tokens"])
    word = params["text_embeddings"]["word_embedding"]
    np.testing.assert_allclose(out["mlm_logits"], h @ word.T + params["mlm_bias"],
                               rtol=1e-5, atol=1e-5)


def test_params_logically_partitioned():
    """Every parameter is nn.Partitioned, one allowed logical name per dim, no name twice in one array."""
    params = shared_variables()["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 30
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), where
        assert len(leaf.names) == leaf.value.ndim, (where, leaf.names, leaf.value.shape)
        assert set(leaf.names) <= LOGICAL_NAMES, (where, leaf.names)
        named = [n for n in leaf.names if n is not None]
        assert len(named) == len(set(named)), (where, leaf.names)
    # The only vocab-sized tensors: the word table and the decoder bias (the decoder kernel is tied).
    vocab_sized = {jax.tree_util.keystr(p) for p, x in leaves if V in x.value.shape}
    assert vocab_sized == {"['text_embeddings']['word_embedding']", "['mlm_bias']"}
    # One type table, shared by text token types and the regions (row 1).
    assert params["text_embeddings"]["type_embedding"].value.shape == (2, D)
    assert "type_embedding" not in params
    assert "ln_final" not in params  # norm="post": the blocks end in a LayerNorm


def test_padding_does_not_change_real_outputs():
    """New features / boxes for padded regions and new ids at padded text slots leave real outputs alone."""
    batch = make_batch()
    out = apply(batch)
    pad_r = ~np.asarray(batch["region_mask"], bool)[..., None]
    noise = jax.random.normal(jax.random.PRNGKey(9), (B, R, F)) * 5.0
    other = dict(batch, region_feats=jnp.where(pad_r, noise, batch["region_feats"]),
                 region_boxes=jnp.where(pad_r, jnp.array([0.0, 0.0, 1.0, 1.0]), batch["region_boxes"]),
                 text_ids=batch["text_ids"].at[1, 4:].set(7))
    out2 = apply(other)
    text_real, region_real = np.asarray(batch["text_mask"], bool), np.asarray(batch["region_mask"], bool)
    np.testing.assert_allclose(np.asarray(out2["text_tokens"])[text_real],
                               np.asarray(out["text_tokens"])[text_real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out2["image_tokens"])[region_real],
                               np.asarray(out["image_tokens"])[region_real], atol=1e-5)
    np.testing.assert_allclose(out2["pooled"], out["pooled"], atol=1e-5)
    np.testing.assert_allclose(out2["itm_logits"], out["itm_logits"], atol=1e-5)
    # Sanity: a real region's features do change things.
    changed = apply(dict(batch, region_feats=batch["region_feats"].at[1, 0].add(1.0)))
    assert np.abs(changed["pooled"][1] - out["pooled"][1]).max() > 1e-4


def test_region_feature_mask_is_zero_features():
    """region_feature_mask=1 gives exactly the outputs of zero features for that region (box kept)."""
    batch = make_batch()
    masked = [(0, 1), (1, 0)]
    rows, cols = zip(*masked)
    with_mask = apply(dict(batch, region_feature_mask=batch["region_feature_mask"].at[rows, cols].set(1)))
    zeroed = apply(dict(batch, region_feats=batch["region_feats"].at[rows, cols].set(0.0)))
    chex.assert_trees_all_close(with_mask, zeroed, atol=1e-6)
    plain = apply(batch)
    assert np.abs(np.asarray(with_mask["pooled"] - plain["pooled"])).max(axis=1).min() > 1e-4


def test_box_geometry_matters():
    """geometry = [ymin, xmin, ymax, xmax, h, w, h*w]; moving a real region's box changes pooled."""
    boxes = jnp.array([[0.1, 0.2, 0.5, 0.9]])
    np.testing.assert_allclose(box_geometry(boxes), [[0.1, 0.2, 0.5, 0.9, 0.4, 0.7, 0.28]], atol=1e-6)
    batch = make_batch()
    out = apply(batch)
    moved = apply(dict(batch, region_boxes=batch["region_boxes"].at[:, 0].set(jnp.array([0.0, 0.0, 0.9, 0.3]))))
    assert np.abs(np.asarray(moved["pooled"] - out["pooled"])).max(axis=1).min() > 1e-4


def test_errors_name_the_key():
    """Missing keys, wrong shapes and over-long text raise errors naming the key and shape."""
    init = functools.partial(jax.eval_shape, MODEL.init, jax.random.PRNGKey(0))
    batch = make_batch()
    with pytest.raises(KeyError, match="region_boxes"):
        init({k: v for k, v in batch.items() if k != "region_boxes"})
    with pytest.raises(ValueError, match=r"region_boxes.*\(2, 4, 3\)"):
        init(dict(batch, region_boxes=batch["region_boxes"][..., :3]))
    with pytest.raises(ValueError, match=r"region_feats.*\(2, 4, 11\)"):
        init(dict(batch, region_feats=batch["region_feats"][..., :11]))
    with pytest.raises(ValueError, match=r"region_mask.*\(2, 3\)"):
        init(dict(batch, region_mask=batch["region_mask"][:, :3]))
    with pytest.raises(ValueError, match="max_len"):
        init(dict(batch, text_ids=jnp.ones((B, 9), jnp.int32), text_mask=jnp.ones((B, 9), jnp.int32)))


def test_pre_norm_bf16_and_dropout_run():
    """norm="pre" adds a final LN and runs (bfloat16 compute, float32 heads, dropout in training mode)."""
    model = UNITER(**TINY, norm="pre", dtype=jnp.bfloat16, dropout_rate=0.1, attention_dropout_rate=0.1,
                   mlm_head=False, mrc_head=False)
    batch = make_batch()
    variables = random_variables(model)
    assert "ln_final" in variables["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))  # param_dtype
    out = jax.jit(functools.partial(model.apply, train=True))(variables, batch, rngs={"dropout": jax.random.PRNGKey(1)})
    assert set(out) == {"text_tokens", "image_tokens", "image_mask", "pooled", "itm_logits", "mrfr_pred"}
    assert out["text_tokens"].dtype == jnp.bfloat16 and out["itm_logits"].dtype == jnp.float32
    chex.assert_shape(out["mrfr_pred"], (B, R, F))
    chex.assert_tree_all_finite(out)
