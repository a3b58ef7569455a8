"""Fusion block tests: shapes, logical axes, padding invariance, gates, cross-/co-attention maths, MBT isolation,
late fusion, weight sharing, registry errors (CPU, tiny sizes, eager apply: compiling each block costs more here)."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import fusion, layers

B, W, L_IMG, L_TXT, D_IMG = 2, 16, 5, 4, 12  # image tokens are D_IMG wide (projected), text tokens already W
TRANSFORMER = dict(width=W, num_heads=2, mlp_dim=32, depth=2)

# Norms, pools and options vary across blocks so that both code paths of each get exercised somewhere.
CONFIGS = {
    "concat": dict(TRANSFORMER, norm="post", pool="first"),
    "sum": dict(width=W),
    "multiplicative_gated": dict(width=W),
    "additive_gated": dict(width=W, per_feature=True),
    "cross_attention": dict(TRANSFORMER, query="text"),
    "co_attention": dict(TRANSFORMER, norm="post", self_attention=True),
    "bottleneck": dict(TRANSFORMER, fusion_layer=1, n_bottlenecks=2),
    "late": dict(width=W, num_classes=3, weighting="learned"),
    "shared_weights": dict(TRANSFORMER, combine="concat"),
}
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "length", "joint", None}  # documented in layers.py
SEQ_LEN = {"cross_attention": L_TXT, "sum": None, "multiplicative_gated": None, "additive_gated": None, "late": None}


def _inputs(seed=0, d_img=D_IMG):
    rng = np.random.default_rng(seed)
    streams = {"image": jnp.asarray(rng.normal(size=(B, L_IMG, d_img)), jnp.float32),
               "text": jnp.asarray(rng.normal(size=(B, L_TXT, W)), jnp.float32)}
    text_mask = np.ones((B, L_TXT), np.int32)
    text_mask[1, 2:] = 0  # second example right-padded
    image_mask = np.ones((B, L_IMG), np.int32)
    image_mask[0, 4:] = 0
    return streams, {"image": jnp.asarray(image_mask), "text": jnp.asarray(text_mask)}


@functools.lru_cache(maxsize=None)
def _setup(name):
    """(model, variables, streams, masks, out) per block, built once per session."""
    model = fusion.build_fusion(name, **CONFIGS[name])
    streams, masks = _inputs()
    out, variables = model.init_with_output(jax.random.key(0), streams, masks)
    return model, variables, streams, masks, out


def _swap_names(tree):
    """Renames every dict key image <-> text (recursively)."""
    if not isinstance(tree, dict):
        return tree
    return {k.replace("image", "\0").replace("text", "image").replace("\0", "text"): _swap_names(v)
            for k, v in tree.items()}


def _layer_norm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _n_params(params):
    return sum(x.size for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------------- every block: shapes and axes


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes_finite_and_logical_axes(name):
    _, variables, _, masks, out = _setup(name)
    assert {"sequence", "mask", "pooled", "streams"} <= set(out)
    chex.assert_shape(out["pooled"], (B, W))
    seq_len = SEQ_LEN.get(name, L_IMG + L_TXT)
    if seq_len is None:
        assert out["sequence"] is None and out["mask"] is None and out["streams"] is None
    else:
        chex.assert_shape(out["sequence"], (B, seq_len, W))
        chex.assert_shape(out["mask"], (B, seq_len))
        chex.assert_shape(out["streams"]["image"], (B, L_IMG, W))
        chex.assert_shape(out["streams"]["text"], (B, L_TXT, W))
    chex.assert_tree_all_finite({k: v for k, v in out.items() if v is not None})

    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxed, "every block here has parameters (the image stream needs a projection)"
    for leaf in boxed:
        assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
        assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
        assert set(leaf.names) <= LOGICAL_NAMES, leaf.names
        named = [n for n in leaf.names if n is not None]
        assert len(named) == len(set(named)), f"flax rejects a logical name twice in one array: {leaf.names}"


# --------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padding_never_changes_real_outputs(name):
    """Garbage appended to both streams under mask 0 (one apply covers both modalities)."""
    model, variables, streams, masks, out = _setup(name)
    extra = {"image": 3, "text": 2}
    rng = np.random.default_rng(1)
    streams2, masks2 = {}, {}
    for n, x in streams.items():
        garbage = jnp.asarray(100.0 * rng.normal(size=(B, extra[n], x.shape[-1])), jnp.float32)
        streams2[n] = jnp.concatenate([x, garbage], axis=1)
        masks2[n] = jnp.concatenate([masks[n], jnp.zeros((B, extra[n]), jnp.int32)], axis=1)
    # jit: every activation shape is new here, and one compile beats compiling each op eagerly.
    out2 = jax.jit(model.apply)(variables, streams2, masks2)

    np.testing.assert_allclose(out2["pooled"], out["pooled"], atol=1e-5)
    for key in ("logits", "modality_logits", "gates", "bottleneck"):
        if out.get(key) is not None:
            chex.assert_trees_all_close(out2[key], out[key], atol=1e-5)
    if out["streams"] is not None:
        for n, m in masks.items():
            if n not in out["streams"]:
                continue
            real = np.asarray(m)[..., None] > 0
            got = np.asarray(out2["streams"][n])[:, : m.shape[1]]
            np.testing.assert_allclose(np.where(real, got, 0), np.where(real, out["streams"][n], 0), atol=1e-5)
    if out["sequence"] is not None:
        # Real positions of the fused sequence, in order, are the same tokens.
        np.testing.assert_allclose(np.asarray(out2["sequence"])[np.asarray(out2["mask"]) > 0],
                                   np.asarray(out["sequence"])[np.asarray(out["mask"]) > 0], atol=1e-5)


# ------------------------------------------------------------------------------------------------ gates


@pytest.mark.parametrize("name,kw", [("multiplicative_gated", {}), ("additive_gated", {"per_feature": True}),
                                     ("additive_gated", {"per_feature": False})])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_gates_strictly_between_zero_and_one(name, kw, scale):
    model = fusion.build_fusion(name, width=W, **kw)
    streams, masks = _inputs()
    streams = {k: v * scale for k, v in streams.items()}
    out, _ = model.init_with_output(jax.random.key(0), streams, masks)
    for gate in out["gates"].values():
        gate = np.asarray(gate)
        assert gate.shape in ((B, W), (B, 1))
        assert np.all(gate > 0) and np.all(gate < 1), (gate.min(), gate.max())
    chex.assert_tree_all_finite(out["pooled"])


def test_additive_gated_matches_numpy():
    model = fusion.AdditiveGatedFusion(width=W)
    streams, masks = _inputs(d_img=W)  # no projections: x1, x2 are the masked means
    out, variables = model.init_with_output(jax.random.key(0), streams, masks)
    p = nn.unbox(variables["params"])["gate"]
    m = {k: np.asarray(v, np.float64)[..., None] for k, v in masks.items()}
    x1, x2 = ((np.asarray(streams[k]) * m[k]).sum(1) / m[k].sum(1) for k in ("image", "text"))
    lam = 1e-6 + (1 - 2e-6) / (1 + np.exp(-(np.concatenate([x1, x2], -1) @ p["kernel"] + p["bias"])))
    np.testing.assert_allclose(out["pooled"], lam[:, :1] * x1 + lam[:, 1:] * x2, atol=1e-5)
    np.testing.assert_allclose(out["gates"]["image"], lam[:, :1], atol=1e-6)


# ---------------------------------------------------------------------------------------- cross-attention


def test_cross_attention_with_one_key_is_its_value_projection():
    """Softmax over one (real) key is 1, so attention = out_proj(value_proj(kv)) for every query."""
    model = fusion.CrossModalAttention(width=W, num_heads=2, mlp_dim=32, depth=1, norm="post", query="text")
    streams, _ = _inputs(d_img=W)
    # One real image token followed by two padded ones holding garbage: still a single key.
    streams["image"] = streams["image"][:, :3].at[:, 1:].multiply(50.0)
    masks = {"image": jnp.array([[1, 0, 0]] * B), "text": jnp.ones((B, L_TXT), jnp.int32)}
    out, variables = model.init_with_output(jax.random.key(0), streams, masks)
    p = jax.tree.map(np.asarray, nn.unbox(variables["params"]))["layer_0"]

    kv = np.asarray(streams["image"][:, 0])  # [B, W]
    value = np.einsum("be,ehd->bhd", kv, p["cross_attn"]["value"]["kernel"]) + p["cross_attn"]["value"]["bias"]
    attn = np.einsum("bhd,hde->be", value, p["cross_attn"]["out"]["kernel"]) + p["cross_attn"]["out"]["bias"]
    attn = np.broadcast_to(attn[:, None], (B, L_TXT, W))

    # At the MultiHeadAttention level, with the layer's own parameters.
    mha = layers.MultiHeadAttention(num_heads=2)
    got = mha.apply({"params": p["cross_attn"]}, streams["text"], kv=streams["image"],
                    bias=layers.padding_bias(masks["image"]))
    np.testing.assert_allclose(got, attn, atol=1e-5)

    # And through the whole post-norm layer: z = LN(x + attn); y = LN(z + MLP(z)).
    z = _layer_norm(np.asarray(streams["text"]) + attn, p["ln_1"])
    h = np.asarray(jax.nn.gelu(z @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"], approximate=False))
    y = _layer_norm(z + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"], p["ln_2"])
    np.testing.assert_allclose(out["sequence"], y, atol=1e-5)
    np.testing.assert_allclose(out["streams"]["text"], y, atol=1e-5)


# -------------------------------------------------------------------------------------------- co-attention


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_co_attention_symmetric_under_swapping_streams(norm):
    model = fusion.CoAttention(width=W, num_heads=2, mlp_dim=32, depth=2, norm=norm, self_attention=True)
    streams, masks = _inputs(d_img=W)
    out, variables = model.init_with_output(jax.random.key(0), streams, masks)
    swapped = _swap_names(nn.unbox(variables["params"]))
    assert set(swapped) == set(nn.unbox(variables["params"]))  # per-stream parameter sets, same structure
    out2 = model.apply({"params": swapped}, {"image": streams["text"], "text": streams["image"]},
                       {"image": masks["text"], "text": masks["image"]})
    np.testing.assert_allclose(out2["streams"]["image"], out["streams"]["text"], atol=1e-6)
    np.testing.assert_allclose(out2["streams"]["text"], out["streams"]["image"], atol=1e-6)
    np.testing.assert_allclose(out2["pooled"], out["pooled"], atol=1e-6)


def test_co_attention_streams_interact():
    model = fusion.CoAttention(width=W, num_heads=2, mlp_dim=32, depth=1)
    streams, masks = _inputs()
    out, variables = model.init_with_output(jax.random.key(0), streams, masks)
    out2 = model.apply(variables, {**streams, "image": streams["image"] + 1.0}, masks)
    assert not np.allclose(out2["streams"]["text"], out["streams"]["text"], atol=1e-4)


# --------------------------------------------------------------------------------------------- bottleneck


@pytest.mark.parametrize("fusion_layer", [0, 1, 2])
def test_bottleneck_isolation_before_fusion_layer(fusion_layer):
    """Modality m's tokens read the bottleneck that the *previous* layer averaged, so with depth 2 only
    fusion_layer=0 lets image reach text; fusion_layer=1 mixes into the (returned) bottleneck only, as in MBT."""
    model = fusion.BottleneckFusion(width=W, num_heads=2, mlp_dim=32, depth=2, fusion_layer=fusion_layer,
                                    n_bottlenecks=2)
    streams, masks = _inputs()
    out, variables = model.init_with_output(jax.random.key(0), streams, masks)
    assert ("bottleneck" in variables["params"]) == (fusion_layer < 2)
    out2 = model.apply(variables, {**streams, "image": streams["image"] * -2.0 + 1.0}, masks)
    text_same = np.allclose(out2["streams"]["text"], out["streams"]["text"], atol=1e-6)
    assert text_same == (fusion_layer >= 1), "modalities interact only through bottlenecks from fusion_layer on"
    if fusion_layer < 2:
        assert not np.allclose(out2["bottleneck"], out["bottleneck"], atol=1e-4)
    else:
        assert out["bottleneck"] is None
    assert not np.allclose(out2["pooled"], out["pooled"], atol=1e-4)  # image part of the pooled mean changed


# ---------------------------------------------------------------------------------------------- late fusion


def test_late_fusion_mean_and_learned_weights():
    streams, masks = _inputs()
    mean_model = fusion.LateFusion(width=W, num_classes=3, weighting="mean")
    out, _ = mean_model.init_with_output(jax.random.key(0), streams, masks)
    per = np.stack([out["modality_logits"][n] for n in ("image", "text")])
    np.testing.assert_allclose(out["logits"], per.mean(0), atol=1e-6)
    chex.assert_shape(out["logits"], (B, 3))

    learned = fusion.LateFusion(width=W, num_classes=3, weighting="learned")
    out, variables = learned.init_with_output(jax.random.key(0), streams, masks)
    np.testing.assert_allclose(out["logits"], per.mean(0), atol=1e-6)  # zero init = the plain mean
    params = nn.unbox(variables["params"])
    params["modality_weights"] = jnp.array([1.5, -0.5])
    out = learned.apply({"params": params}, streams, masks)
    w = np.exp([1.5, -0.5]) / np.exp([1.5, -0.5]).sum()
    per = np.stack([out["modality_logits"][n] for n in ("image", "text")])
    np.testing.assert_allclose(out["logits"], np.einsum("m,mbc->bc", w, per), atol=1e-5)


# ------------------------------------------------------------------------------------------ shared weights


def test_shared_weights_has_one_encoder():
    rng = np.random.default_rng(0)
    counts = {}
    for m in (2, 3):
        names = ["audio", "image", "text"][:m]
        lengths = {"audio": L_TXT, "image": L_IMG, "text": L_TXT}
        streams = {n: jnp.asarray(rng.normal(size=(B, lengths[n], W)), jnp.float32) for n in names}
        model = fusion.SharedWeightsFusion(width=W, num_heads=2, mlp_dim=32, depth=2)
        out, variables = model.init_with_output(jax.random.key(0), streams, {})
        params = nn.unbox(variables["params"])
        assert set(params) == {"encoder", "ln_final"} | {f"type_embedding_{n}" for n in names}
        counts[m] = _n_params(params) - m * W  # less the per-modality type embeddings
        chex.assert_shape(out["sequence"], (B, sum(lengths[n] for n in names), W))
    assert counts[2] == counts[3]


# ------------------------------------------------------------------------------------- order, registry, errors


def test_concat_depth0_is_typed_concatenation_in_modality_order():
    model = fusion.ConcatFusion(width=W, depth=0, modalities=("text", "image"))
    streams, masks = _inputs(d_img=W)
    out, variables = model.init_with_output(jax.random.key(0), streams, masks)
    p = nn.unbox(variables["params"])
    expected = np.concatenate([streams["text"] + p["type_embedding_text"],
                               streams["image"] + p["type_embedding_image"]], axis=1)
    np.testing.assert_allclose(out["sequence"], expected, atol=1e-6)
    np.testing.assert_array_equal(out["mask"], np.concatenate([masks["text"], masks["image"]], axis=1))


def test_dropout_only_in_training():
    model, variables, streams, masks, _ = _setup("concat")
    model = model.clone(dropout_rate=0.5)  # same parameters, now with dropout
    eval1 = model.apply(variables, streams, masks)["pooled"]
    train = model.apply(variables, streams, masks, train=True, rngs={"dropout": jax.random.key(1)})["pooled"]
    assert not np.allclose(eval1, train)
    np.testing.assert_array_equal(eval1, model.apply(variables, streams, masks)["pooled"])


def test_registry_and_errors():
    assert set(fusion.FUSION_BLOCKS) == set(CONFIGS)
    with pytest.raises(ValueError, match="known:.*bottleneck"):
        fusion.build_fusion("bottlenek")
    with pytest.raises(ValueError, match="n_bottleneck"):
        fusion.build_fusion("bottleneck", n_bottleneck=4)
    streams, masks = _inputs()
    with pytest.raises(ValueError, match="exactly two"):
        fusion.build_fusion("additive_gated", width=W).init(
            jax.random.key(0), {**streams, "audio": streams["text"]}, masks)
    with pytest.raises(ValueError, match="missing"):
        fusion.build_fusion("sum", width=W, modalities=["audio", "text"]).init(jax.random.key(0), streams, masks)
    with pytest.raises(ValueError, match="query"):
        fusion.build_fusion("cross_attention", **TRANSFORMER, query="audio").init(jax.random.key(0), streams, masks)
