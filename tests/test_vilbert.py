"""ViLBERT: output shapes, logical partitioning, padding invariance, stream isolation, [IMG] token, region feature
masking, tied MLM decoder, input errors (CPU, tiny sizes; one jitted apply per config, equal batch structures)."""
from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.vilbert import ViLBERT, location_features
from mmjax.models.heads import HeadTransform

B, L, R, F, C, D, V = 2, 6, 4, 12, 5, 16, 50  # batch, text length, regions, feature dim, region classes, width, vocab
TINY = dict(vocab_size=V, max_len=8, region_feat_dim=F, num_region_classes=C, width=D, text_depth=1, image_depth=1,
            co_depth=2, heads=2)
MODEL = ViLBERT(**TINY)
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "length", "joint", None}  # documented in layers.py
ATOL = 1e-5


def make_batch(seed: int = 0) -> dict:
    """Random text and regions, every key present (one batch structure: one compile per model).

    Example 1 has its last two text tokens padded; example 0 has its last region padded.
    """
    rng = np.random.default_rng(seed)
    text_mask = np.ones((B, L), np.int32)
    text_mask[1, -2:] = 0
    region_mask = np.ones((B, R), np.int32)
    region_mask[0, -1] = 0
    ymin, xmin = rng.uniform(0, 0.5, (B, R)), rng.uniform(0, 0.5, (B, R))
    boxes = np.stack([ymin, xmin, ymin + rng.uniform(0.1, 0.5, (B, R)), xmin + rng.uniform(0.1, 0.5, (B, R))], -1)
    return {
        "text_ids": jnp.asarray(rng.integers(1, V, (B, L)), jnp.int32),
        "text_mask": jnp.asarray(text_mask),
        "text_type_ids": jnp.zeros((B, L), jnp.int32),
        "region_feats": jnp.asarray(rng.normal(size=(B, R, F)), jnp.float32),
        "region_boxes": jnp.asarray(boxes, jnp.float32),
        "region_mask": jnp.asarray(region_mask),
        "region_feature_mask": jnp.zeros((B, R), jnp.int32),
    }


@functools.lru_cache(maxsize=None)
def variables():
    """MODEL's variables, shared by every test (the co_depth=0 model uses a subset of its params).

    The tree (boxes, logical names, shapes) is MODEL.init's, traced by eval_shape; the values are random normals
    (LayerNorm scales around 1). Compiling init's random initializers costs more than the rest of this file on 2
    busy cores, and every property tested here holds for any parameter values (non-zero biases make it stricter).
    """
    shapes = jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), make_batch())
    rng = np.random.default_rng(0)

    def fill(path, x):
        is_scale = any(getattr(k, "key", None) == "scale" for k in path)
        return jnp.asarray(0.2 * rng.normal(size=x.shape) + float(is_scale), x.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def apply_fn(model: ViLBERT):
    """One jitted apply per config; returns (outputs, sown intermediates)."""
    return jax.jit(lambda v, b: model.apply(v, b, mutable=["intermediates"]))


def run(batch: dict, model: ViLBERT = MODEL) -> tuple[dict, dict]:
    """(outputs, intermediates) of `model` on `batch` with the shared variables."""
    out, state = apply_fn(model)(variables(), batch)
    return out, state["intermediates"]


def real_parts(out: dict, batch: dict) -> dict:
    """The outputs at real positions only (padded ones hold unspecified values), as numpy."""
    t = np.asarray(batch["text_mask"])[..., None] > 0
    r = np.asarray(batch["region_mask"])[..., None] > 0
    return {"text_tokens": np.where(t, out["text_tokens"], 0), "mlm_logits": np.where(t, out["mlm_logits"], 0),
            "image_tokens": np.where(r, out["image_tokens"], 0), "mrc_logits": np.where(r, out["mrc_logits"], 0),
            "pooled": np.asarray(out["pooled"]), "itm_logits": np.asarray(out["itm_logits"])}


def test_shapes_and_dtypes():
    out, inter = run(make_batch())
    chex.assert_shape(out["text_tokens"], (B, L, D))
    chex.assert_shape(out["image_tokens"], (B, R, D))  # the R regions, without the [IMG] token
    chex.assert_shape(out["image_mask"], (B, R))
    chex.assert_shape(out["pooled"], (B, D))
    chex.assert_shape(out["itm_logits"], (B, 2))
    chex.assert_shape(out["mlm_logits"], (B, L, V))
    chex.assert_shape(out["mrc_logits"], (B, R, C))
    chex.assert_shape(inter["embeddings"][0]["image"], (B, 1 + R, D))  # [IMG] + regions inside the model
    for key in ("itm_logits", "mlm_logits", "mrc_logits", "text_tokens", "pooled"):
        assert out[key].dtype == jnp.float32, key
    assert out["image_mask"].dtype == jnp.int32
    np.testing.assert_array_equal(out["image_mask"], make_batch()["region_mask"])
    chex.assert_tree_all_finite(out)
    assert location_features(jnp.array([0.1, 0.2, 0.5, 0.6])).tolist() == pytest.approx([0.1, 0.2, 0.5, 0.6, 0.16])

    # bfloat16 compute (traced only, no compile): float32 params and head logits, bfloat16 tokens.
    bf16 = ViLBERT(**TINY, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
        jax.eval_shape(bf16.init, jax.random.PRNGKey(0), make_batch())))
    out = jax.eval_shape(bf16.apply, variables(), make_batch())
    assert out["text_tokens"].dtype == out["image_tokens"].dtype == out["pooled"].dtype == jnp.bfloat16
    assert out["itm_logits"].dtype == out["mlm_logits"].dtype == out["mrc_logits"].dtype == jnp.float32


def test_params_logically_partitioned():
    """Every leaf is nn.Partitioned with allowed, distinct names; the layer layout is as documented."""
    params = variables()["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 50
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), where
        assert len(leaf.names) == leaf.value.ndim, (where, leaf.names, leaf.value.shape)
        assert set(leaf.names) <= LOGICAL_NAMES, (where, leaf.names)
        named = [n for n in leaf.names if n is not None]
        assert len(named) == len(set(named)), (where, leaf.names)
    expected = {"text_encoder", "image_encoder", "co_0_text", "co_0_image", "self_0_text", "self_0_image",
                "co_1_text", "co_1_image", "self_1_text", "self_1_image", "text_pooler", "image_pooler",
                "itm_head", "mlm_transform", "mlm_bias", "mrc_transform", "mrc_decoder", "text_embeddings"}
    assert expected <= set(params)
    assert "co_2_text" not in params
    # Tied MLM decoder: the only vocab-sized tensors are the word table and the decoder bias.
    vocab_sized = {jax.tree_util.keystr(p) for p, x in leaves if V in x.value.shape}
    assert vocab_sized == {"['text_embeddings']['word_embedding']", "['mlm_bias']"}
    assert set(params["text_embeddings"]) == {"word_embedding", "pos_embedding", "type_embedding", "ln"}
    # image_depth=0: no image-only encoder parameters at all.
    shapes = jax.eval_shape(ViLBERT(**dict(TINY, image_depth=0)).init, jax.random.PRNGKey(0), make_batch())
    assert "image_encoder" not in shapes["params"]


def test_padding_invariance():
    """New padded text ids and padded regions' features/boxes leave every real-position output unchanged."""
    batch = make_batch()
    out, _ = run(batch)
    rng = np.random.default_rng(7)
    other = dict(batch,
                 text_ids=batch["text_ids"].at[1, -2:].set(jnp.array([3, 44])),
                 region_feats=batch["region_feats"].at[0, -1].set(jnp.asarray(100.0 * rng.normal(size=F))),
                 region_boxes=batch["region_boxes"].at[0, -1].set(jnp.array([0.9, 0.0, 0.1, 1.0])))
    out2, _ = run(other)
    chex.assert_trees_all_close(real_parts(out2, other), real_parts(out, batch), atol=ATOL)
    # Sanity: a real region's feature does change things.
    changed, _ = run(dict(batch, region_feats=batch["region_feats"].at[0, 0].add(1.0)))
    assert np.abs(changed["pooled"][0] - out["pooled"][0]).max() > 1e-4


def test_streams_meet_only_in_co_attention():
    """co_depth=0: text_tokens ignore the regions entirely; co_depth>0: they depend on them."""
    batch = make_batch()
    rng = np.random.default_rng(3)
    regions = dict(batch, region_feats=jnp.asarray(rng.normal(size=(B, R, F)), jnp.float32),
                   region_boxes=batch["region_boxes"][:, ::-1], region_mask=jnp.ones((B, R), jnp.int32))
    isolated = ViLBERT(**dict(TINY, co_depth=0))
    out, _ = run(batch, isolated)
    out2, _ = run(regions, isolated)
    np.testing.assert_array_equal(out2["text_tokens"], out["text_tokens"])
    np.testing.assert_array_equal(out2["mlm_logits"], out["mlm_logits"])
    assert np.abs(out2["pooled"] - out["pooled"]).max() > 1e-4  # the image pooler still sees them

    out, _ = run(batch)
    out2, _ = run(regions)
    assert np.abs(out2["text_tokens"] - out["text_tokens"]).max() > 1e-4


def test_img_token():
    """[IMG] = mean of the real regions' features with a whole-image box: a padded region's features (scaled
    by 1e3) change nothing at all, and identical regions give an [IMG] input equal to such a region's."""
    batch = make_batch()
    out, inter = run(batch)
    out2, inter2 = run(dict(batch, region_feats=batch["region_feats"].at[0, -1].multiply(1e3)))
    chex.assert_trees_all_close(out2, out, atol=ATOL)  # padded slots too: padded features are zeroed first
    chex.assert_trees_all_close(inter2, inter, atol=ATOL)

    # Example 0: all three real regions share feature f, so the [IMG] feature is f; region 0 gets the
    # whole-image box too, so its embedding must equal the [IMG] embedding.
    f = batch["region_feats"][0, 0]
    same = dict(batch, region_feats=batch["region_feats"].at[0, :3].set(f),
                region_boxes=batch["region_boxes"].at[0, 0].set(jnp.array([0.0, 0.0, 1.0, 1.0])))
    emb = run(same)[1]["embeddings"][0]["image"]
    np.testing.assert_allclose(emb[0, 0], emb[0, 1], atol=ATOL)
    assert np.abs(emb[0, 0] - emb[0, 2]).max() > 1e-3  # same feature, different box: different embedding


def test_region_feature_mask_is_zeroing_after_which_img_is_averaged():
    """region_feature_mask=1 equals feeding zeros as that region's features, everywhere: the [IMG] mean is
    taken after masking (masked regions count as zero features), so masked features never leak through it."""
    batch = make_batch()
    masked = dict(batch, region_feature_mask=batch["region_feature_mask"].at[0, 1].set(1).at[1, 3].set(1))
    zeroed = dict(batch, region_feats=batch["region_feats"].at[0, 1].set(0.0).at[1, 3].set(0.0))
    out_m, inter_m = run(masked)
    out_z, inter_z = run(zeroed)
    chex.assert_trees_all_close(out_m, out_z, atol=1e-6)
    chex.assert_trees_all_close(inter_m, inter_z, atol=1e-6)

    out, inter = run(batch)
    emb, emb_m = inter["embeddings"][0]["image"], inter_m["embeddings"][0]["image"]
    changed = np.abs(np.asarray(emb_m - emb)).max(-1) > 1e-4  # [B, 1 + R]
    expected = np.zeros((B, 1 + R), bool)
    expected[:, 0] = True  # [IMG] (the mean) in both examples
    expected[0, 2] = expected[1, 4] = True  # the masked regions (offset 1 by [IMG])
    np.testing.assert_array_equal(changed, expected)
    # Masked content is gone: changing the masked region's feature changes nothing.
    other = dict(masked, region_feats=masked["region_feats"].at[0, 1].multiply(-3.0))
    chex.assert_trees_all_close(run(other)[0], out_m, atol=1e-6)


def test_mlm_decoder_tied_to_word_embeddings():
    """mlm_logits = HeadTransform(text_tokens) @ text_embeddings/word_embedding^T + mlm_bias."""
    out, _ = run(make_batch())
    params = nn.unbox(variables()["params"])
    h = HeadTransform(ln_epsilon=1e-12).apply({"params": params["mlm_transform"]}, out["text_tokens"])
    word = params["text_embeddings"]["word_embedding"]
    np.testing.assert_allclose(out["mlm_logits"], h @ word.T + params["mlm_bias"],
                               rtol=1e-5, atol=1e-5)


def test_remat_dropout_and_optional_keys_trace():
    """remat keeps the parameter tree; train=True with dropout and a batch without the optional keys both run;
    remat_policy reaches every rematerialised layer (traced only: eval_shape, no compile)."""
    batch = make_batch()
    remat = ViLBERT(**TINY, remat=True, dropout_rate=0.1, attention_dropout_rate=0.1)
    tree = jax.tree.map(lambda x: (x.shape, x.dtype), variables())
    assert jax.tree.map(lambda x: (x.shape, x.dtype),
                        jax.eval_shape(remat.init, jax.random.PRNGKey(0), batch)) == tree
    out = jax.eval_shape(lambda v, b: remat.apply(v, b, train=True, rngs={"dropout": jax.random.PRNGKey(1)}),
                         variables(), batch)
    chex.assert_shape(out["mrc_logits"], (B, R, C))
    dots = ViLBERT(**TINY, remat=True, remat_policy="dots_saveable")
    chex.assert_shape(jax.eval_shape(dots.apply, variables(), batch)["mrc_logits"], (B, R, C))
    with pytest.raises(ValueError, match="remat_policy"):
        jax.eval_shape(ViLBERT(**TINY, remat=True, remat_policy="nothing_savable").apply, variables(), batch)
    minimal = {k: x for k, x in batch.items() if k not in ("text_type_ids", "region_feature_mask")}
    chex.assert_shape(jax.eval_shape(MODEL.apply, variables(), minimal)["itm_logits"], (B, 2))


def test_input_errors():
    batch = make_batch()
    v = variables()
    with pytest.raises(KeyError, match="region_boxes"):
        MODEL.apply(v, {k: x for k, x in batch.items() if k != "region_boxes"})
    with pytest.raises(ValueError, match=r"region_boxes.*\(2, 4, 4\).*\(2, 4, 5\)"):
        MODEL.apply(v, dict(batch, region_boxes=jnp.zeros((B, R, 5))))
    with pytest.raises(ValueError, match="max_len"):
        MODEL.apply(v, dict(batch, text_ids=jnp.ones((B, 9), jnp.int32), text_mask=jnp.ones((B, 9), jnp.int32),
                            text_type_ids=jnp.zeros((B, 9), jnp.int32)))
    with pytest.raises(ValueError, match="region_feats"):
        MODEL.apply(v, dict(batch, region_feats=jnp.zeros((B, R, F + 1))))
    with pytest.raises(ValueError, match="region_mask"):
        MODEL.apply(v, dict(batch, region_mask=jnp.ones((B, R + 1), jnp.int32)))
