"""Fusion block tests: shapes, logical axes, padding invariance, gates, cross-/co-attention maths, MBT isolation,
late fusion, weight sharing, NumPy references of concat_mlp / hybrid / symmetric_cross_attention, gradients,
registry errors (CPU, tiny sizes, eager apply: compiling each block costs more here)."""
import functools
import math

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
    "concat_mlp": dict(width=W, hidden=2, hidden_dim=24, pool="first"),
    "hybrid": dict(width=W, num_classes=3, hidden=1, activation="gelu"),
    "symmetric_cross_attention": dict(TRANSFORMER, norm="post"),
}
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "length", "joint", None}  # documented in layers.py
SEQ_LEN = {"cross_attention": L_TXT, "sum": None, "multiplicative_gated": None, "additive_gated": None, "late": None,
           "concat_mlp": None, "hybrid": None}
NEW_BLOCKS = ("concat_mlp", "hybrid", "symmetric_cross_attention")


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


def _inputs3(seed=0):
    """Three streams (audio and text W wide, image D_IMG wide: projected), each right-padded in some example."""
    rng = np.random.default_rng(seed)
    lengths = {"audio": 3, "image": L_IMG, "text": L_TXT}
    streams = {n: jnp.asarray(rng.normal(size=(B, lengths[n], D_IMG if n == "image" else W)), jnp.float32)
               for n in lengths}
    masks = {n: np.ones((B, lengths[n]), np.int32) for n in lengths}
    masks["audio"][0, 2:] = 0
    masks["image"][1, 3:] = 0
    masks["text"][0, 1:] = 0
    return streams, {n: jnp.asarray(m) for n, m in masks.items()}


def _with_garbage_in_padding(streams, masks, seed=5):
    """The same streams with every padded position replaced by large noise."""
    rng = np.random.default_rng(seed)
    return {n: jnp.where(masks[n][..., None] > 0, x, 100.0 * rng.normal(size=x.shape)).astype(jnp.float32)
            for n, x in streams.items()}


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
    for key in ("logits", "fused_logits", "modality_logits", "gates", "bottleneck"):
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


# ------------------------------------------------------------------------------------ NumPy references


_erf = np.vectorize(math.erf)
NP_ACTIVATIONS = {"relu": lambda x: np.maximum(x, 0.0), "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))}


def _np(tree):
    """Unboxed float64 NumPy copy of a parameter tree."""
    return jax.tree.map(lambda x: np.asarray(x, np.float64), nn.unbox(tree))


def _np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _np_pool(x, mask, how):
    if how == "first":
        return x[:, 0]
    m = np.asarray(mask, np.float64)[..., None]
    return (np.where(m > 0, x, 0.0)).sum(1) / np.maximum(m.sum(1), 1.0)


def _np_concat_mlp(p, xs, ms, names, pool, hidden, activation):
    """[pool(x_1); ...] -> hidden x (Dense -> activation) -> Dense `out`, as ConcatMLPFusion documents."""
    h = np.concatenate([_np_pool(xs[n], ms[n], pool) for n in names], axis=-1)
    for i in range(hidden):
        h = NP_ACTIVATIONS[activation](_np_dense(h, p[f"hidden_{i}"]))
    return _np_dense(h, p["out"])


def _np_mha(p, x, kv, kv_mask):
    """layers.MultiHeadAttention: per-head q/k/v projections, softmax(q k / sqrt(d) + padding bias) v, out."""
    q, k, v = (np.einsum("ble,ehd->blhd", y, p[name]["kernel"]) + p[name]["bias"]
               for y, name in ((x, "query"), (kv, "key"), (kv, "value")))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = logits + np.where(np.asarray(kv_mask)[:, None, None, :] > 0, 0.0, -1e9)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:2], -1) @ \
        p["out"]["kernel"].reshape(-1, x.shape[-1]) + p["out"]["bias"]


def _np_mlp(p, x):
    return _np_dense(NP_ACTIVATIONS["gelu"](_np_dense(x, p["fc1"])), p["fc2"])


def _np_symmetric(p, xs, ms, names, depth, norm, pool="mean"):
    """SymmetricCrossAttention as its docstring writes it (streams already projected to width)."""
    for i in range(depth):
        lp = p[f"layer_{i}"]
        h = {n: _layer_norm(xs[n], lp[f"ln_1_{n}"]) for n in names} if norm == "pre" else xs
        new = {}
        for m in names:
            attn = sum(_np_mha(lp[f"attn_{m}_from_{n}"], h[m], h[n], ms[n]) for n in names if n != m)
            if norm == "pre":
                x = xs[m] + attn
                new[m] = x + _np_mlp(lp[f"mlp_{m}"], _layer_norm(x, lp[f"ln_2_{m}"]))
            else:
                z = _layer_norm(xs[m] + attn, lp[f"ln_1_{m}"])
                new[m] = _layer_norm(z + _np_mlp(lp[f"mlp_{m}"], z), lp[f"ln_2_{m}"])
        xs = new
    if norm == "pre" and depth > 0:
        xs = {n: _layer_norm(xs[n], p[f"ln_final_{n}"]) for n in names}
    pooled = np.mean([_np_pool(xs[n], ms[n], pool) for n in names], axis=0)
    return xs, pooled


def _assert_real_close(got, want, mask, atol=1e-5):
    """Compares [B, L, D] tokens at the real (mask 1) positions only: padded outputs are unspecified."""
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=atol)


@pytest.mark.parametrize("pool,hidden,order,activation", [("mean", 0, None, "relu"),
                                                          ("mean", 2, ("text", "image"), "gelu"),
                                                          ("first", 1, None, "relu")])
def test_concat_mlp_matches_numpy(pool, hidden, order, activation):
    """Raw-width pooled vectors (image D_IMG, text W: no projection) concatenated in modality order, then the MLP."""
    model = fusion.ConcatMLPFusion(width=W, hidden=hidden, hidden_dim=24, pool=pool, modalities=order,
                                   activation=activation)
    streams, masks = _inputs()
    out, variables = model.init_with_output(jax.random.key(0), streams, masks)
    p = _np(variables["params"])
    assert set(p) == {"out"} | {f"hidden_{i}" for i in range(hidden)}
    assert p["out"]["kernel"].shape == ((24 if hidden else D_IMG + W), W)
    xs = {n: np.asarray(x, np.float64) for n, x in streams.items()}
    want = _np_concat_mlp(p, xs, masks, order or ("image", "text"), pool, hidden, activation)
    np.testing.assert_allclose(out["pooled"], want, atol=1e-5)
    out2 = model.apply(variables, _with_garbage_in_padding(streams, masks), masks)
    np.testing.assert_allclose(out2["pooled"], out["pooled"], atol=1e-5)


@pytest.mark.parametrize("weighting", ["learned", "mean"])
def test_hybrid_matches_numpy_with_three_modalities(weighting):
    model = fusion.HybridFusion(width=W, num_classes=3, hidden=1, weighting=weighting)
    streams, masks = _inputs3()
    out, variables = model.init_with_output(jax.random.key(0), streams, masks)
    names = ("audio", "image", "text")
    params = nn.unbox(variables["params"])
    if weighting == "learned":
        np.testing.assert_allclose(out["decision_weights"], 0.25, atol=1e-7)  # zero init = the plain mean
        params["decision_weights"] = jnp.array([0.5, -1.0, 0.2, 1.3])
        out = model.apply({"params": params}, streams, masks)
        w = np.exp([0.5, -1.0, 0.2, 1.3]) / np.exp([0.5, -1.0, 0.2, 1.3]).sum()
    else:
        assert "decision_weights" not in params
        w = np.full(4, 0.25)
    p = _np(params)
    xs = {n: np.asarray(x, np.float64) for n, x in streams.items()}
    fused = _np_concat_mlp(p, xs, masks, names, "mean", 1, "relu")
    vecs = {n: _np_pool(xs[n], masks[n], "mean") for n in names}
    vecs["image"] = _np_dense(vecs["image"], p["proj_image"])  # D_IMG -> W; the others are already W wide
    fused_logits = _np_dense(fused, p["fused_head"])
    logits = {n: _np_dense(vecs[n], p[f"head_{n}"]) for n in names}
    np.testing.assert_allclose(out["decision_weights"], w, atol=1e-6)
    np.testing.assert_allclose(out["fused_logits"], fused_logits, atol=1e-5)
    for n in names:
        np.testing.assert_allclose(out["modality_logits"][n], logits[n], atol=1e-5)
    want = w[0] * fused_logits + sum(w[k + 1] * logits[n] for k, n in enumerate(names))
    np.testing.assert_allclose(out["logits"], want, atol=1e-5)
    chex.assert_shape(out["logits"], (B, 3))
    want_pooled = w[0] * fused + sum(w[k + 1] * vecs[n] for k, n in enumerate(names))
    np.testing.assert_allclose(out["pooled"], want_pooled, atol=1e-5)
    out2 = model.apply({"params": params}, _with_garbage_in_padding(streams, masks), masks)
    chex.assert_trees_all_close({k: out2[k] for k in ("pooled", "logits", "modality_logits")},
                                {k: out[k] for k in ("pooled", "logits", "modality_logits")}, atol=1e-5)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_symmetric_cross_attention_matches_numpy_with_three_modalities(norm):
    model = fusion.SymmetricCrossAttention(width=W, num_heads=2, mlp_dim=32, depth=2, norm=norm)
    streams, masks = _inputs3()
    out, variables = model.init_with_output(jax.random.key(0), streams, masks)
    names = ("audio", "image", "text")
    p = _np(variables["params"])
    pairs = {f"attn_{m}_from_{n}" for m in names for n in names if n != m}
    assert pairs <= set(p["layer_0"]) and len(pairs) == 6  # one attention per ordered pair of modalities
    xs = {n: np.asarray(x, np.float64) for n, x in streams.items()}
    xs["image"] = _np_dense(xs["image"], p["proj_image"])
    want, pooled = _np_symmetric(p, xs, masks, names, 2, norm)
    for n in names:
        _assert_real_close(out["streams"][n], want[n], masks[n])
    np.testing.assert_allclose(out["pooled"], pooled, atol=1e-5)
    chex.assert_shape(out["sequence"], (B, 3 + L_IMG + L_TXT, W))
    _assert_real_close(out["sequence"], np.concatenate([want[n] for n in names], axis=1), out["mask"])
    np.testing.assert_array_equal(out["mask"], np.concatenate([masks[n] for n in names], axis=1))

    out2 = model.apply(variables, _with_garbage_in_padding(streams, masks), masks)
    for n in names:
        _assert_real_close(out2["streams"][n], out["streams"][n], masks[n])
    np.testing.assert_allclose(out2["pooled"], out["pooled"], atol=1e-5)


@pytest.mark.parametrize("n_modalities", [2, 4])
def test_symmetric_cross_attention_any_number_of_modalities(n_modalities):
    """Two and four streams (per-modality masks): parameters per ordered pair, each stream sees every other."""
    rng = np.random.default_rng(3)
    names = ("a", "b", "c", "d")[:n_modalities]
    streams = {n: jnp.asarray(rng.normal(size=(B, 2 + i, W)), jnp.float32) for i, n in enumerate(names)}
    masks = {n: jnp.asarray(np.arange(2 + i)[None] < np.array([[2 + i], [1 + i]])).astype(jnp.int32)
             for i, n in enumerate(names)}
    model = fusion.SymmetricCrossAttention(width=W, num_heads=2, mlp_dim=32, depth=1)
    out, variables = model.init_with_output(jax.random.key(0), streams, masks)
    p = _np(variables["params"])
    assert sum(k.startswith("attn_") for k in p["layer_0"]) == n_modalities * (n_modalities - 1)
    xs = {n: np.asarray(x, np.float64) for n, x in streams.items()}
    want, pooled = _np_symmetric(p, xs, masks, names, 1, "pre")
    for n in names:
        _assert_real_close(out["streams"][n], want[n], masks[n])
    np.testing.assert_allclose(out["pooled"], pooled, atol=1e-5)
    # Changing the last stream changes every other stream's real tokens (noise, not a constant shift: the pre-LN
    # of the keys/values removes a shift along every feature).
    moved = streams[names[-1]] + jnp.asarray(rng.normal(size=streams[names[-1]].shape), jnp.float32)
    out2 = model.apply(variables, {**streams, names[-1]: moved}, masks)
    for n in names[:-1]:
        assert not np.allclose(np.asarray(out2["streams"][n])[np.asarray(masks[n]) > 0],
                               np.asarray(out["streams"][n])[np.asarray(masks[n]) > 0], atol=1e-4)


@pytest.mark.parametrize("name", NEW_BLOCKS)
def test_gradient_reaches_every_modality_and_parameter(name):
    """d(loss)/d(stream) is non-zero on every modality's real tokens and exactly zero on its padded ones, and
    every parameter gets a gradient. symmetric_cross_attention: each stream's own tokens are left out of its
    loss, so the gradient there comes through the other streams' cross-attention."""
    kw = dict(width=W) if name != "symmetric_cross_attention" else dict(TRANSFORMER, depth=1)
    model = fusion.build_fusion(name, **kw)
    streams, masks = _inputs3()
    variables = model.init(jax.random.key(0), streams, masks)
    rng = np.random.default_rng(7)
    names = sorted(streams)
    skips = names if name == "symmetric_cross_attention" else [None]

    def loss(params, xs, skip=None):
        out = model.apply({"params": params}, xs, masks)
        total = jnp.sum(out["pooled"] * rng.normal(size=out["pooled"].shape)) if skip is None else 0.0
        if out.get("logits") is not None:
            total += jnp.sum(out["logits"] * rng.normal(size=out["logits"].shape))
        for n in (out["streams"] or {}):
            if n != skip:
                total += jnp.sum(jnp.where(masks[n][..., None] > 0, out["streams"][n], 0.0)
                                 * rng.normal(size=out["streams"][n].shape))
        return total

    @jax.jit  # one compile for every gradient below beats differentiating op by op
    def all_grads(params, xs):
        return jax.grad(loss)(params, xs), [jax.grad(loss, argnums=1)(params, xs, skip) for skip in skips]

    param_grads, input_grads = all_grads(variables["params"], streams)
    for path, g in jax.tree_util.tree_leaves_with_path(nn.unbox(param_grads)):
        assert np.abs(np.asarray(g)).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    for skip, g in zip(skips, input_grads):
        for n in names:
            real = np.asarray(masks[n]) > 0
            assert np.all(np.abs(np.asarray(g[n]))[real].max(-1) > 0), (skip, n)
            np.testing.assert_array_equal(np.asarray(g[n])[~real], 0.0)


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
    with pytest.raises(ValueError, match="at least two streams"):
        fusion.build_fusion("symmetric_cross_attention", **TRANSFORMER).init(
            jax.random.key(0), {"text": streams["text"]}, {"text": masks["text"]})
    with pytest.raises(ValueError, match="hidden must be >= 0"):
        fusion.build_fusion("concat_mlp", width=W, hidden=-1).init(jax.random.key(0), streams, masks)
    with pytest.raises(ValueError, match=r"weighting must be one of \('mean', 'learned'\)"):
        fusion.build_fusion("hybrid", width=W, weighting="max").init(jax.random.key(0), streams, masks)
