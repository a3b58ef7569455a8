"""Model tests: shapes, logical axes, masking, block maths vs NumPy, dtypes, remat, errors (CPU, tiny sizes)."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import losses
from mmjax.models import CLIP, TextTransformer, ViT, build_model
from mmjax.models import layers

B, IMG, PATCH, WIDTH, L, VOCAB, EMBED = 2, 8, 4, 16, 6, 50, 8
VIT_KW = dict(patch_size=PATCH, width=WIDTH, depth=2, heads=2, mlp_dim=32)
TEXT_KW = dict(vocab_size=VOCAB, max_len=L, width=WIDTH, depth=2, heads=2, mlp_dim=32)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, L), np.int32)
    mask[1, 4:] = 0  # second example right-padded
    return {
        "image": jnp.asarray(rng.normal(size=(B, IMG, IMG, 3)), jnp.float32),
        "text_ids": jnp.asarray(rng.integers(1, VOCAB, size=(B, L)), jnp.int32),
        "text_mask": jnp.asarray(mask),
    }


def _clip(**kw):
    return CLIP(image=VIT_KW, text=TEXT_KW, embed_dim=EMBED, **kw)


@pytest.fixture(scope="module")
def clip_setup():
    model = _clip()
    batch = _batch()
    variables = model.init(jax.random.key(0), batch)
    return model, batch, variables


def _is_boxed(x):
    return isinstance(x, nn.LogicallyPartitioned)


# ----------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
def test_vit_shapes(pool):
    model = ViT(**VIT_KW, pool=pool)
    x = jnp.ones((B, IMG, IMG, 3))
    (pooled, tokens), _ = model.init_with_output(jax.random.key(0), x)
    n = (IMG // PATCH) ** 2 + (pool == "cls")
    chex.assert_shape(pooled, (B, WIDTH))
    chex.assert_shape(tokens, (B, n, WIDTH))
    chex.assert_tree_all_finite((pooled, tokens))


def test_vit_patch_not_divisible():
    with pytest.raises(ValueError, match="not divisible"):
        ViT(**VIT_KW).init(jax.random.key(0), jnp.ones((1, IMG + 2, IMG, 3)))
    with pytest.raises(ValueError, match="not divisible"):
        ViT(**VIT_KW, image_size=IMG + 2).init(jax.random.key(0), jnp.ones((1, IMG + 2, IMG + 2, 3)))
    with pytest.raises(ValueError, match="built for"):
        ViT(**VIT_KW, image_size=IMG).init(jax.random.key(0), jnp.ones((1, 2 * IMG, 2 * IMG, 3)))


@pytest.mark.parametrize("causal", [True, False])
def test_text_shapes(causal):
    batch = _batch()
    model = TextTransformer(**TEXT_KW, causal=causal)
    (pooled, tokens), _ = model.init_with_output(jax.random.key(0), batch["text_ids"], batch["text_mask"])
    chex.assert_shape(pooled, (B, WIDTH))
    chex.assert_shape(tokens, (B, L, WIDTH))


def test_clip_outputs(clip_setup):
    model, batch, variables = clip_setup
    out = model.apply(variables, batch)
    assert set(out) == {"image_embeds", "text_embeds", "logit_scale", "logit_bias", "logits_per_image",
                        "logits_per_text"}
    chex.assert_shape([out["image_embeds"], out["text_embeds"]], (B, EMBED))
    chex.assert_shape([out["logit_scale"], out["logit_bias"]], ())
    chex.assert_type([out["image_embeds"], out["text_embeds"]], jnp.float32)
    np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embeds"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    assert float(out["logit_bias"]) == 0.0
    # The encode_* methods are the same computation.
    img = model.apply(variables, batch["image"], method=CLIP.encode_image)
    txt = model.apply(variables, batch["text_ids"], batch["text_mask"], method=CLIP.encode_text)
    np.testing.assert_allclose(img, out["image_embeds"], atol=1e-6)
    np.testing.assert_allclose(txt, out["text_embeds"], atol=1e-6)


def test_every_param_logically_partitioned(clip_setup):
    _, _, variables = clip_setup
    leaves = jax.tree_util.tree_leaves(variables["params"], is_leaf=_is_boxed)
    assert leaves
    for leaf in leaves:
        assert _is_boxed(leaf), type(leaf)
        assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
    # The partition specs resolve under rules that map every name used (a mesh-free sanity check).
    rules = [("embed", None), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None), ("length", None),
             ("joint", None)]
    nn.logical_to_mesh_sharding(nn.get_partition_spec(variables["params"]),
                                jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)), rules)


def test_logit_scale_clamped(clip_setup):
    model, batch, variables = clip_setup
    params = nn.unbox(variables["params"])
    params = {**params, "logit_scale": jnp.asarray(math.log(1000.0))}
    out = model.apply({"params": params}, batch)
    np.testing.assert_allclose(out["logit_scale"], 100.0, rtol=1e-5)


def test_sigmoid_clip_scale_and_bias():
    model = _clip(loss="sigmoid")
    batch = _batch()
    out, _ = model.init_with_output(jax.random.key(0), batch)
    np.testing.assert_allclose(out["logit_scale"], 10.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_bias"], -10.0)


@pytest.mark.parametrize("key", ["image", "text_ids", "text_mask"])
def test_missing_batch_key(clip_setup, key):
    model, batch, variables = clip_setup
    partial = {k: v for k, v in batch.items() if k != key}
    with pytest.raises((KeyError, ValueError), match=key):
        model.apply(variables, partial)


def test_build_model():
    cfg = ml_collections.ConfigDict(dict(name="clip", embed_dim=EMBED, image=VIT_KW, text=TEXT_KW, dtype="float32"))
    model = build_model(cfg)
    assert isinstance(model, CLIP)
    hash(model)  # usable as a static jit argument
    with pytest.raises(ValueError, match="known models"):
        build_model(ml_collections.ConfigDict(dict(name="nope")))
    with pytest.raises(ValueError, match="embed_dim"):
        build_model(ml_collections.ConfigDict(dict(name="clip", embed_dims=8, image={}, text={})))
    with pytest.raises(ValueError, match="patch_size"):
        build_model(ml_collections.ConfigDict(dict(name="clip", image=dict(patch_sise=4), text={})))


# ---------------------------------------------------------------------------------------------------- masking


def test_causal_text_ignores_future_tokens():
    model = TextTransformer(**TEXT_KW, causal=True)
    ids = _batch()["text_ids"]
    mask = jnp.ones_like(ids)
    variables = model.init(jax.random.key(0), ids, mask)
    t = 2
    ids2 = ids.at[:, t + 1:].set((ids[:, t + 1:] + 7) % VOCAB)
    _, tok1 = model.apply(variables, ids, mask)
    _, tok2 = model.apply(variables, ids2, mask)
    np.testing.assert_allclose(tok1[:, : t + 1], tok2[:, : t + 1], atol=1e-6)
    assert not np.allclose(tok1[:, t + 1:], tok2[:, t + 1:])


@pytest.mark.parametrize("causal,pool", [(True, "eos"), (False, "cls"), (False, "mean")])
def test_padding_does_not_change_pooled(causal, pool):
    batch = _batch()
    model = TextTransformer(**TEXT_KW, causal=causal, pool=pool)
    variables = model.init(jax.random.key(0), batch["text_ids"], batch["text_mask"])
    ids2 = jnp.where(batch["text_mask"] > 0, batch["text_ids"], (batch["text_ids"] + 11) % VOCAB)
    assert not np.array_equal(ids2, batch["text_ids"])
    p1, _ = model.apply(variables, batch["text_ids"], batch["text_mask"])
    p2, _ = model.apply(variables, ids2, batch["text_mask"])
    np.testing.assert_allclose(p1, p2, atol=1e-6)


def test_eos_pool_is_last_real_token():
    batch = _batch()
    model = TextTransformer(**TEXT_KW, causal=True)
    variables = model.init(jax.random.key(0), batch["text_ids"], batch["text_mask"])
    pooled, tokens = model.apply(variables, batch["text_ids"], batch["text_mask"])
    np.testing.assert_allclose(pooled[0], tokens[0, L - 1])
    np.testing.assert_allclose(pooled[1], tokens[1, 3])  # mask[1] = [1, 1, 1, 1, 0, 0]


def test_bidirectional_pools_cls():
    batch = _batch()
    model = TextTransformer(**TEXT_KW, causal=False, norm="post")
    ids, mask = batch["text_ids"], jnp.ones_like(batch["text_ids"])
    variables = model.init(jax.random.key(0), ids, mask)
    pooled, tokens = model.apply(variables, ids, mask)
    np.testing.assert_allclose(pooled, tokens[:, 0])
    # Bidirectional: the CLS output sees the last token.
    pooled2, _ = model.apply(variables, ids.at[:, -1].set((ids[:, -1] + 5) % VOCAB), mask)
    assert not np.allclose(pooled, pooled2)
    assert "ln" in variables["params"]["embeddings"] and "ln_final" not in variables["params"]


# -------------------------------------------------------------------------------------- block maths vs NumPy


def _np_ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _np_attn(x, p, bias):
    q = np.einsum("ble,ehd->blhd", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("ble,ehd->blhd", x, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("ble,ehd->blhd", x, p["value"]["kernel"]) + p["value"]["bias"]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]) + bias
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", w, v)
    return np.einsum("bqhd,hde->bqe", o, p["out"]["kernel"]) + p["out"]["bias"]


def _np_mlp(x, p):
    h = _np_gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _np_block(x, p, bias, norm, eps):
    if norm == "pre":
        x = x + _np_attn(_np_ln(x, p["ln_1"], eps), p["attn"], bias)
        return x + _np_mlp(_np_ln(x, p["ln_2"], eps), p["mlp"])
    z = _np_ln(x + _np_attn(x, p["attn"], bias), p["ln_1"], eps)
    return _np_ln(z + _np_mlp(z, p["mlp"]), p["ln_2"], eps)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_block_matches_numpy(norm):
    eps = 1e-6
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    block = layers.Block(num_heads=2, mlp_dim=16, norm=norm, ln_epsilon=eps)
    params = nn.unbox(block.init(jax.random.key(0), x)["params"])
    # Perturb every param (LN scale/bias and biases init to constants) so each term is exercised.
    leaves, tree = jax.tree_util.tree_flatten(params)
    params = jax.tree_util.tree_unflatten(
        tree, [p + 0.1 * rng.normal(size=p.shape).astype(np.float32) for p in leaves])
    bias = layers.padding_bias(jnp.asarray(mask))
    got = block.apply({"params": params}, jnp.asarray(x), bias)
    np_params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    want = _np_block(x.astype(np.float64), np_params, np.asarray(bias, np.float64), norm, eps)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_cross_attention_shapes():
    attn = layers.MultiHeadAttention(num_heads=2)
    x, ctx = jnp.ones((2, 3, 8)), jnp.ones((2, 7, 12))
    out, _ = attn.init_with_output(jax.random.key(0), x, kv=ctx)
    chex.assert_shape(out, (2, 3, 8))


def test_activations():
    x = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(layers.get_activation("gelu")(x), _np_gelu(np.asarray(x, np.float64)), atol=1e-6)
    np.testing.assert_allclose(layers.get_activation("quick_gelu")(x), x * jax.nn.sigmoid(1.702 * x))
    with pytest.raises(ValueError, match="known"):
        layers.get_activation("swishy")


# ------------------------------------------------------------------------------------------ dtypes and remat


def test_bf16_close_to_f32(clip_setup):
    _, batch, variables = clip_setup
    out32 = _clip().apply(variables, batch)
    out16 = _clip(dtype=jnp.bfloat16).apply(variables, batch)
    chex.assert_type([out16["image_embeds"], out16["text_embeds"]], jnp.float32)
    chex.assert_tree_all_finite(out16)
    for k in ("image_embeds", "text_embeds"):
        np.testing.assert_allclose(out16[k], out32[k], atol=5e-2)


def test_remat_same_loss_and_grads(clip_setup):
    _, batch, variables = clip_setup
    params = nn.unbox(variables["params"])

    def loss_fn(params, model):
        out = model.apply({"params": params}, batch)
        return losses.softmax_contrastive_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])

    grad_fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
    l0, g0 = grad_fn(params, _clip(remat=False))
    l1, g1 = grad_fn(params, _clip(remat=True))
    np.testing.assert_allclose(l0, l1, atol=1e-6)
    # Under jit XLA fuses the recomputed forward differently, moving single gradient entries by up to ~1e-7 of
    # the largest gradient (1.5e-5 absolute at |g| ~ 150); op-by-op they are bitwise equal but take 4x longer to
    # run. So the 1e-6 tolerance is taken relative to the gradient scale.
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g0))
    chex.assert_trees_all_close(g0, g1, atol=1e-6 * max(scale, 1.0), rtol=0)
    assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(params)


def _remat_policies(jaxpr) -> list:
    """The `policy` of every rematerialised (jax.checkpoint) call in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if "policy" in eqn.params:
            found.append(eqn.params["policy"])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _remat_policies(sub)
    return found


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_remat_policy_reaches_both_towers(policy):
    """CLIP's remat_policy is the policy of every rematerialised block of both towers (traced only)."""
    batch = _batch()
    model = _clip(remat=True, remat_policy=policy)
    variables = jax.eval_shape(model.init, jax.random.key(0), batch)
    found = _remat_policies(jax.make_jaxpr(model.apply)(variables, batch).jaxpr)
    assert len(found) == VIT_KW["depth"] + TEXT_KW["depth"]
    assert all(p == getattr(jax.checkpoint_policies, policy) for p in found), found
    assert not _remat_policies(jax.make_jaxpr(_clip(remat_policy=policy).apply)(variables, batch).jaxpr)
    with pytest.raises(ValueError, match="remat_policy"):
        _clip(remat=True, remat_policy="dots_savable").init(jax.random.key(0), batch)


def test_text_embeddings():
    """layers.TextEmbeddings: word + position + type -> LN; a mask zeroes padded ids; type_rows reads the table."""
    emb = layers.TextEmbeddings(vocab_size=VOCAB, max_len=L, width=WIDTH, type_vocab_size=2, ln_epsilon=1e-12)
    ids = _batch()["text_ids"]
    type_ids = jnp.ones_like(ids)
    variables = emb.init(jax.random.key(0), ids)
    p = nn.unbox(variables["params"])
    assert set(p) == {"word_embedding", "pos_embedding", "type_embedding", "ln"}
    x, table = emb.apply(variables, ids, type_ids)
    raw = np.asarray(p["word_embedding"])[np.asarray(ids)] + np.asarray(p["pos_embedding"])[None] \
        + np.asarray(p["type_embedding"])[1]
    np.testing.assert_allclose(x, _np_ln(raw, p["ln"], 1e-12), atol=1e-5)
    np.testing.assert_array_equal(table, p["word_embedding"])
    np.testing.assert_array_equal(emb.apply(variables, 1, method=layers.TextEmbeddings.type_rows),
                                  p["type_embedding"][1])
    # With a mask, ids under padding (here out of range) read row 0.
    mask = jnp.ones_like(ids).at[:, -2:].set(0)
    garbage = ids.at[:, -2:].set(10 * VOCAB)
    masked, _ = emb.apply(variables, garbage, type_ids, mask)
    chex.assert_tree_all_finite(masked)
    np.testing.assert_array_equal(masked, emb.apply(variables, ids.at[:, -2:].set(0), type_ids.at[:, -2:].set(0))[0])
    plain = layers.TextEmbeddings(vocab_size=VOCAB, max_len=L, width=WIDTH, use_ln=False)
    assert set(plain.init(jax.random.key(0), ids)["params"]) == {"word_embedding", "pos_embedding"}
    with pytest.raises(ValueError, match="max_len"):
        emb.init(jax.random.key(0), jnp.ones((B, L + 1), jnp.int32))


def test_gelu_exact_custom_gradient_matches_autodiff():
    """Our exact GELU's hand-written VJP (see layers.gelu_exact) equals autodiff of jax.nn.gelu(approximate=False)."""
    from mmjax.models import layers

    x = jnp.linspace(-6.0, 6.0, 1001)
    np.testing.assert_allclose(layers.gelu_exact(x), jax.nn.gelu(x, approximate=False), atol=1e-7)
    ours = jax.grad(lambda v: jnp.sum(jnp.sin(layers.gelu_exact(v))))(x)
    ref = jax.grad(lambda v: jnp.sum(jnp.sin(jax.nn.gelu(v, approximate=False))))(x)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
