"""ViLT: output shapes, logical partitioning, masking invariances, position interpolation, tied MLM decoder."""
from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from mmjax.models import build_model
from mmjax.models.layers import interpolate_pos_embedding, patchify
from mmjax.models.vilt import ViLT

B, L, S, P, D, V = 2, 6, 32, 8, 32, 50  # batch, text length, image side, patch, width, vocab
N = (S // P) ** 2
# Depth 1 and one shared init keep the file fast on 2 shared cores: XLA compile time dominates here.
TINY = dict(vocab_size=V, max_len=8, image_size=S, patch_size=P, width=D, depth=1, heads=2, mlp_dim=64)
MODEL = ViLT(**TINY, mpp_head=True)  # every head on: its params are a superset of any other TINY variant's


def make_batch(seed: int = 0, hw: tuple[int, int] = (S, S), length: int = L, **extra) -> dict:
    """Random image / ids; the last two tokens of the second example are padding."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    mask = np.ones((B, length), np.int32)
    mask[1, -2:] = 0
    return {"image": jax.random.normal(k1, (B, *hw, 3)), "text_ids": jax.random.randint(k2, (B, length), 1, V),
            "text_mask": jnp.asarray(mask), **extra}


def no_mask(n: int = N) -> jax.Array:
    """An all-zero patch_mask (keeps the batch structure, hence the jit cache, the same across tests)."""
    return jnp.zeros((B, n), jnp.int32)


@functools.lru_cache(maxsize=None)
def shared_variables():
    """One init of MODEL; TINY variants (other dtype / norm / cap / fewer heads) apply with these params."""
    return jax.jit(MODEL.init)(jax.random.PRNGKey(0), make_batch(patch_mask=no_mask()))


@functools.lru_cache(maxsize=None)
def jitted_apply(model: ViLT):
    """One jitted apply per model config, so equal-shaped calls across tests reuse the compilation."""
    return jax.jit(model.apply)


def test_shapes_all_heads_and_build_model():
    """Every output has its documented shape; build_model("vilt") works; a missing key is named."""
    model = build_model(ConfigDict(dict(name="vilt", mpp_head=True, **TINY)))
    assert model == MODEL
    out = jitted_apply(MODEL)(shared_variables(), make_batch(patch_mask=no_mask().at[:, 3].set(1)))
    chex.assert_shape(out["text_tokens"], (B, L, D))
    chex.assert_shape(out["image_tokens"], (B, N + 1, D))
    chex.assert_shape(out["pooled"], (B, D))
    chex.assert_shape(out["mlm_logits"], (B, L, V))
    chex.assert_shape(out["itm_logits"], (B, 2))
    chex.assert_shape(out["mpp_pred"], (B, N, P * P * 3))
    chex.assert_shape(out["image_mask"], (B, N + 1))
    chex.assert_shape(out["patch_index"], (B, N))
    chex.assert_tree_all_finite(out)
    # patchify is the layout of mpp_pred (MPP targets).
    chex.assert_shape(patchify(make_batch()["image"], P), (B, N, P * P * 3))

    batch = make_batch()
    del batch["text_mask"]
    with pytest.raises(KeyError, match="text_mask"):
        MODEL.init(jax.random.PRNGKey(0), batch)
    with pytest.raises(ValueError, match="heads_num"):
        build_model(ConfigDict(dict(name="vilt", heads_num=2)))


def test_params_logically_partitioned():
    """Every parameter is LogicallyPartitioned with one name per dim; the MLM decoder has no kernel of its own."""
    params = jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), make_batch())["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) > 20
    for path, leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, (jax.tree_util.keystr(path), leaf.names, leaf.value.shape)
    # The only vocab-sized tensors: the word table and the decoder bias (the decoder kernel is tied).
    vocab_sized = {jax.tree_util.keystr(p) for p, x in leaves if V in x.value.shape}
    assert vocab_sized == {"['text_embeddings']['word_embedding']", "['mlm_bias']"}
    assert params["text_embeddings"]["word_embedding"].names == ("vocab", "embed")
    assert set(params["text_embeddings"]) == {"word_embedding", "pos_embedding", "type_embedding", "ln"}


def test_text_padding_does_not_change_real_outputs():
    """Padded text tokens (mask 0), whatever their ids or count, leave real tokens, image tokens and pooled alone."""
    apply, variables = jitted_apply(MODEL), shared_variables()
    batch = make_batch(patch_mask=no_mask())
    out = apply(variables, batch)
    other = dict(batch, text_ids=batch["text_ids"].at[1, -2:].set(7))  # new ids at the padded slots
    trimmed = dict(batch, text_ids=batch["text_ids"][:, :4], text_mask=batch["text_mask"][:, :4])
    for o in (apply(variables, other), apply(variables, trimmed)):  # trimmed: example 1 with no padding at all
        np.testing.assert_allclose(o["text_tokens"][1, :4], out["text_tokens"][1, :4], atol=1e-5)
        np.testing.assert_allclose(o["image_tokens"][1], out["image_tokens"][1], atol=1e-5)
        np.testing.assert_allclose(o["pooled"][1], out["pooled"][1], atol=1e-5)
        np.testing.assert_allclose(o["mlm_logits"][1, :4], out["mlm_logits"][1, :4], atol=1e-4)
    # Sanity: a real token's id does change things.
    changed = apply(variables, dict(batch, text_ids=batch["text_ids"].at[1, 1].add(1)))
    assert np.abs(changed["pooled"][1] - out["pooled"][1]).max() > 1e-4


def test_position_interpolation():
    """Training grid: the identity, exactly; other grids: right shapes, cls row kept, constants stay constant."""
    table = jax.random.normal(jax.random.PRNGKey(1), (1 + 4 * 4, D))
    assert interpolate_pos_embedding(table, (4, 4), (4, 4)) is table
    # jax.image.resize itself is the identity at the same shape (no short-cut needed for exactness).
    grid = table[1:].reshape(4, 4, D)
    np.testing.assert_array_equal(jax.image.resize(grid, grid.shape, "bicubic"), grid)

    for new in ((4, 6), (3, 5), (8, 8)):
        out = interpolate_pos_embedding(table, (4, 4), new)
        chex.assert_shape(out, (1 + new[0] * new[1], D))
        np.testing.assert_array_equal(out[0], table[0])
    const = jnp.concatenate([table[:1], jnp.full((16, D), 0.37)])
    for new in ((4, 6), (3, 5), (8, 8), (2, 2)):
        np.testing.assert_allclose(interpolate_pos_embedding(const, (4, 4), new)[1:], 0.37, atol=1e-6)

    # In the model: a 32x48 image gives a 4x6 grid (24 patches) from the 4x4 table.
    out = jitted_apply(MODEL)(shared_variables(), make_batch(hw=(S, S + 16), patch_mask=no_mask(24)))
    chex.assert_shape(out["image_tokens"], (B, 24 + 1, D))
    chex.assert_shape(out["mpp_pred"], (B, 24, P * P * 3))


def test_patch_mask_changes_exactly_masked_inputs():
    """patch_mask swaps exactly the masked patches' encoder inputs, to something independent of the pixels."""
    masked = [1, 5, 6]
    batch = make_batch(patch_mask=no_mask())
    # The encoder input is sown by ViLT as intermediates/embeddings.
    embed = jax.jit(lambda v, b: MODEL.apply(v, b, mutable=["intermediates"])[1]["intermediates"]["embeddings"][0])
    plain = embed(shared_variables(), batch)
    with_mask = embed(shared_variables(), dict(batch, patch_mask=no_mask().at[:, masked].set(1)))
    changed = np.any(np.asarray(plain != with_mask), axis=(0, 2))
    expected = np.zeros(L + 1 + N, bool)
    expected[[L + 1 + i for i in masked]] = True
    np.testing.assert_array_equal(changed, expected)
    # Same [MASK] patch + same position for both images: the masked rows no longer depend on the image.
    rows = L + 1 + np.array(masked)
    np.testing.assert_allclose(with_mask[0, rows], with_mask[1, rows], atol=1e-6)

    with pytest.raises(ValueError, match="mpp_head"):
        ViLT(**TINY).init(jax.random.PRNGKey(0), batch)


def test_mlm_decoder_tied_to_word_embeddings():
    """mlm_logits = transform(text_tokens) @ text_embeddings/word_embedding^T + bias, and follow edits of the
    embedding table."""
    variables, batch = shared_variables(), make_batch(patch_mask=no_mask())
    out, state = jax.jit(lambda v, b: MODEL.apply(
        v, b, capture_intermediates=lambda m, _: m.name == "mlm_transform"))(variables, batch)
    h = state["intermediates"]["mlm_transform"]["__call__"][0]
    params = nn.unbox(variables["params"])
    word = params["text_embeddings"]["word_embedding"]
    np.testing.assert_allclose(out["mlm_logits"], h @ word.T + params["mlm_bias"], rtol=1e-5, atol=1e-5)
    # Editing only row 0 (never an input id here: ids are >= 1) changes only logit 0. (A random direction: adding
    # a constant would vanish against the zero-mean LayerNorm output h.)
    edited = {"params": dict(variables["params"])}
    text_embeddings = dict(variables["params"]["text_embeddings"])
    text_embeddings["word_embedding"] = text_embeddings["word_embedding"].replace_boxed(
        word.at[0].add(jax.random.normal(jax.random.PRNGKey(5), (D,))))
    edited["params"]["text_embeddings"] = text_embeddings
    out2 = jitted_apply(MODEL)(edited, batch)
    diff = np.abs(np.asarray(out2["mlm_logits"] - out["mlm_logits"])).max(axis=(0, 1))
    assert diff[0] > 1e-3 and diff[1:].max() == 0.0


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_norm_field(norm: str):
    """norm="post": each block ends in a LayerNorm and there is no final LN; "pre": the reverse."""
    model = ViLT(**TINY, norm=norm, mlm_head=False, itm_head=False)
    batch = make_batch()
    assert ("ln_final" in jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)["params"]) == (norm == "pre")
    _, state = jax.jit(lambda v, b: model.apply(
        v, b, capture_intermediates=lambda m, _: m.name == "layer_0"))(shared_variables(), batch)
    y = np.asarray(state["intermediates"]["encoder"]["layer_0"]["__call__"][0])
    normalised = np.allclose(y.mean(-1), 0.0, atol=1e-4) and np.allclose(y.std(-1), 1.0, atol=1e-3)
    assert normalised == (norm == "post")


def test_bf16_and_patch_cap():
    """bfloat16 compute runs (float32 params, float32 head logits); max_image_len keeps valid patches first."""
    model = ViLT(**TINY, mpp_head=True, dtype=jnp.bfloat16, max_image_len=10)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), make_batch())))
    image_mask = jnp.ones((B, N), jnp.int32).at[1, :8].set(0)  # example 1: 8 valid patches < 10
    apply, variables = jitted_apply(model), shared_variables()
    out = apply(variables, make_batch(image_mask=image_mask, patch_mask=no_mask()))
    assert out["text_tokens"].dtype == jnp.bfloat16 and out["mlm_logits"].dtype == jnp.float32
    chex.assert_tree_all_finite(out)
    chex.assert_shape(out["image_tokens"], (B, 11, D))
    chex.assert_shape(out["mpp_pred"], (B, 10, P * P * 3))
    idx = np.asarray(out["patch_index"])
    assert np.all(np.diff(idx, axis=1) > 0)  # sorted, distinct
    assert set(range(8, 16)) <= set(idx[1].tolist())  # all 8 valid patches of example 1 kept
    np.testing.assert_array_equal(out["image_mask"][1], [1] + [int(i >= 8) for i in idx[1]])
    # With a "patches" rng the kept patches are a random draw, still valid ones first.
    out_r = apply(variables, make_batch(image_mask=image_mask, patch_mask=no_mask()),
                  rngs={"patches": jax.random.PRNGKey(3)})
    assert set(range(8, 16)) <= set(np.asarray(out_r["patch_index"][1]).tolist())
    assert not np.array_equal(out_r["patch_index"][0], idx[0])  # example 0: 10 of 16, not the raster prefix
    # A per-pixel image mask gives the same patch mask as the per-patch one.
    pixel = jnp.repeat(jnp.repeat(image_mask.reshape(B, 4, 4), P, 1), P, 2)
    out_p = apply(variables, make_batch(image_mask=pixel, patch_mask=no_mask()))
    np.testing.assert_array_equal(out_p["image_mask"], out["image_mask"])
    np.testing.assert_array_equal(out_p["patch_index"], out["patch_index"])


def test_parity_with_hugging_face():
    """Same weights, same inputs (training grid, text padding): text tokens, pooled and MLM logits match HF ViLT."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mmjax.convert.hf_vilt import hf_vilt_params  # here: the converter needs safetensors, the rest does not

    config = transformers.ViltConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=TINY["depth"], num_attention_heads=TINY["heads"],
        intermediate_size=TINY["mlp_dim"], image_size=S, patch_size=P, max_position_embeddings=TINY["max_len"])
    torch.manual_seed(0)
    hf = transformers.ViltForMaskedLM(config).eval()
    with torch.no_grad():  # HF zero-initialises cls / positions; randomise them so the test sees them
        hf.vilt.embeddings.cls_token.normal_()
        hf.vilt.embeddings.position_embeddings.normal_()
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    model = ViLT(**TINY, itm_head=False)
    params = hf_vilt_params(state, TINY["depth"], TINY["heads"])
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), make_batch())["params"]
    chex.assert_trees_all_equal_shapes(jax.tree_util.tree_map(jnp.asarray, params), nn.unbox(boxed))

    batch = make_batch()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(np.asarray(batch["text_ids"]), dtype=torch.long),
                 attention_mask=torch.tensor(np.asarray(batch["text_mask"])),
                 pixel_values=torch.tensor(np.asarray(batch["image"]).transpose(0, 3, 1, 2)),
                 output_hidden_states=True)
        pooled = hf.vilt.pooler(hf.vilt.layernorm(ref.hidden_states[-1])).numpy()
    out = jax.jit(model.apply)({"params": params}, batch)
    last = hf.vilt.layernorm(ref.hidden_states[-1]).detach().numpy()
    real = np.asarray(batch["text_mask"], bool)
    np.testing.assert_allclose(np.asarray(out["text_tokens"])[real], last[:, :L][real], atol=1e-4)
    np.testing.assert_allclose(out["image_tokens"][:, 0], last[:, L], atol=1e-4)  # image cls (HF shuffles patches)
    np.testing.assert_allclose(out["pooled"], pooled, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["mlm_logits"])[real], ref.logits.numpy()[real], atol=1e-4)


def test_hf_position_interpolation_per_image():
    """pos_interpolation="hf": identity at the training grid; each image resized to its own valid grid (aligned
    corners keep the table's corner rows); zeros on padding."""
    from mmjax.models.vilt import hf_positions  # pylint: disable=import-outside-toplevel

    table = jax.random.normal(jax.random.PRNGKey(2), (16, D))
    full = jnp.ones((2, 16), jnp.int32)
    np.testing.assert_allclose(hf_positions(table, (4, 4), (4, 4), full), jnp.broadcast_to(table, (2, 16, D)),
                               atol=1e-6)
    mask = jnp.zeros((2, 6, 8), jnp.int32).at[0].set(1).at[1, :3, :5].set(1).reshape(2, 48)
    out = hf_positions(table, (4, 4), (6, 8), mask).reshape(2, 6, 8, D)
    grid = table.reshape(4, 4, D)
    for b, (h, w) in enumerate([(6, 8), (3, 5)]):
        for (i, j), (y, x) in {(0, 0): (0, 0), (h - 1, w - 1): (3, 3), (0, w - 1): (0, 3)}.items():
            np.testing.assert_allclose(out[b, i, j], grid[y, x], atol=1e-5)  # corners land on corners
    assert np.all(np.asarray(out[1, 3:]) == 0) and np.all(np.asarray(out[1, :, 5:]) == 0)
