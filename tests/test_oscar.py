"""OSCAR: tags made from the regions' classes, the model's outputs, padding, what tags change, one-line errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mmjax.data.sources import region_tags
from mmjax.models import build_model
from mmjax.models.oscar import OSCAR, box_position

B, L, T, R, F, V = 2, 6, 5, 4, 12, 50
MODEL = OSCAR(vocab_size=V, max_len=L + T, region_feat_dim=F, width=32, depth=2, heads=2, mlp_dim=64,
              vqa_labels=3)


def make_batch(seed: int = 0) -> dict:
    """Random words / tags / regions; example 1 pads two words, one tag slot and one region."""
    rng = np.random.default_rng(seed)
    text_mask = np.ones((B, L), np.int32)
    text_mask[1, -2:] = 0
    tags_mask = np.ones((B, T), np.int32)
    tags_mask[1, -1:] = 0
    region_mask = np.ones((B, R), np.int32)
    region_mask[1, -1] = 0
    corner = rng.uniform(0, 0.5, size=(B, R, 2))
    return {"text_ids": jnp.asarray(rng.integers(5, V, (B, L)) * text_mask, jnp.int32),
            "text_mask": jnp.asarray(text_mask),
            "tags_text_ids": jnp.asarray(rng.integers(5, V, (B, T)) * tags_mask, jnp.int32),
            "tags_text_mask": jnp.asarray(tags_mask),
            "region_feats": jnp.asarray(rng.normal(size=(B, R, F)), jnp.float32),
            "region_boxes": jnp.asarray(np.concatenate([corner, corner + 0.4], -1), jnp.float32),
            "region_mask": jnp.asarray(region_mask)}


VARIABLES = MODEL.init(jax.random.key(0), make_batch())
APPLY = jax.jit(MODEL.apply)


def test_tags_are_the_classes_some_real_region_holds():
    targets = np.zeros((3, 4, 4), np.float32)
    targets[..., 3] = 1.0  # background (the last class)
    targets[0, 0], targets[0, 1] = [0.9, 0, 0, 0.1], [0, 0.6, 0, 0.4]
    targets[1, 2] = [0.3, 0, 0, 0.7]  # below the 0.5 threshold: no tag
    targets[2, 0] = [0, 0, 0.8, 0.2]  # held by a padded region: no tag
    mask = np.ones((3, 4), np.int32)
    mask[2, 0] = 0
    got = region_tags(tf.constant(targets), tf.constant(mask), ("circle", "rectangle", "triangle")).numpy()
    assert [g.decode() for g in got] == ["circle rectangle", "", ""]


def test_outputs_shapes_and_dtypes():
    out = APPLY(VARIABLES, make_batch())
    chex.assert_shape(out["text_tokens"], (B, L, 32))
    chex.assert_shape(out["tags_tokens"], (B, T, 32))
    chex.assert_shape(out["image_tokens"], (B, R, 32))
    chex.assert_shape(out["mlm_logits"], (B, L, V))
    chex.assert_shape(out["tags_mlm_logits"], (B, T, V))
    chex.assert_shape(out["itm_logits"], (B, 2))
    chex.assert_shape(out["vqa_logits"], (B, 3))
    assert out["mlm_logits"].dtype == jnp.float32 and out["itm_logits"].dtype == jnp.float32
    # Row 0 of the tag outputs is the tags' dropped [CLS]: no prediction there.
    np.testing.assert_array_equal(out["tags_mlm_logits"][:, 0], 0)
    # The word table is the tied decoder: no decoder kernel of its own.
    assert "mlm_decoder" not in VARIABLES["params"] and "mlm_bias" in VARIABLES["params"]


def test_box_position_is_oscars_layout():
    got = box_position(jnp.array([[0.1, 0.2, 0.5, 0.9]]))
    np.testing.assert_allclose(got, [[0.2, 0.1, 0.9, 0.5, 0.7, 0.4]], atol=1e-7)


def test_padding_changes_no_real_output():
    batch = make_batch()
    out = APPLY(VARIABLES, batch)
    noisy = dict(batch)
    noisy["text_ids"] = batch["text_ids"].at[1, -2:].set(7)
    noisy["tags_text_ids"] = batch["tags_text_ids"].at[1, -1].set(9)
    noisy["region_feats"] = batch["region_feats"].at[1, -1].set(1e3)
    noisy["region_boxes"] = batch["region_boxes"].at[1, -1].set(0.7)
    out2 = APPLY(VARIABLES, noisy)
    np.testing.assert_allclose(out2["pooled"], out["pooled"], atol=1e-5)
    np.testing.assert_allclose(out2["text_tokens"][1, :-2], out["text_tokens"][1, :-2], atol=1e-5)
    np.testing.assert_allclose(out2["tags_tokens"][1, :-1], out["tags_tokens"][1, :-1], atol=1e-5)
    np.testing.assert_allclose(out2["image_tokens"][1, :-1], out["image_tokens"][1, :-1], atol=1e-5)


def test_tags_and_regions_reach_the_pooled_output():
    batch = make_batch()
    out = APPLY(VARIABLES, batch)
    other_tags = dict(batch, tags_text_ids=batch["tags_text_ids"].at[:, 1].set(11))
    assert np.abs(APPLY(VARIABLES, other_tags)["pooled"] - out["pooled"]).max() > 1e-4
    masked = dict(batch, region_feature_mask=jnp.zeros((B, R), jnp.int32).at[:, 0].set(1))
    zeroed = dict(batch, region_feats=batch["region_feats"].at[:, 0].set(0.0))
    np.testing.assert_allclose(APPLY(VARIABLES, masked)["pooled"], APPLY(VARIABLES, zeroed)["pooled"], atol=1e-6)


def test_errors_name_the_key():
    batch = make_batch()
    with pytest.raises(KeyError, match="tags_text_ids.*data.regions.tags"):
        MODEL.apply(VARIABLES, {k: v for k, v in batch.items() if not k.startswith("tags")})
    with pytest.raises(ValueError, match="exceed max_len"):
        build_model(dict(name="oscar", vocab_size=V, max_len=L, region_feat_dim=F, width=32, depth=1, heads=2,
                         mlp_dim=64)).init(jax.random.key(0), batch)
    with pytest.raises(ValueError, match="region_feats"):
        MODEL.apply(VARIABLES, dict(batch, region_feats=batch["region_feats"][..., :5]))
