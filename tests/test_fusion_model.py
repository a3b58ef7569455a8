"""FusionModel tests: every fusion block builds with shapes/finite values, logical axes, padding invariance, the
tied MLM decoder, token sources (fused vs the encoders' own), late/hybrid-fusion ITM, config handling (towers from
the config, the tower registry, remat_policy, configs/fusion.py's block argument) and errors.

CPU, tiny sizes, eager apply. Parameters come from `jax.eval_shape(model.init)` (the real init code, traced, with
its logical-axis boxes) filled with numpy normals: eager random init compiles one threefry program per shape,
which costs more here than the whole forward pass.
"""
import functools
import importlib.util
import pathlib

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import build_model, fusion, towers
from mmjax.models.fusion_model import FusionModel
from mmjax.models.heads import HeadTransform
from mmjax.models.text import TextTransformer

B, L, V, W = 2, 6, 40, 16
N_IMG = 1 + (16 // 8) ** 2  # cls + 2x2 patches
IMAGE = dict(image_size=16, patch_size=8, width=W, depth=1, heads=2)
TEXT = dict(vocab_size=V, max_len=L, width=W, depth=1, heads=2, causal=False)
TOWERS = {"image": dict(kind="vit", **IMAGE), "text": dict(kind="text", **TEXT)}
TRANSFORMER = dict(width=W, depth=1, num_heads=2)
CONFIGS = {
    "concat": TRANSFORMER,
    "cross_attention": dict(TRANSFORMER, query="text"),
    "co_attention": TRANSFORMER,
    "bottleneck": dict(TRANSFORMER, n_bottlenecks=2),
    "sum": dict(width=W),
    "multiplicative_gated": dict(width=W),
    "late": dict(width=W),
    "shared_weights": TRANSFORMER,
    "concat_mlp": dict(width=W, hidden=1),
    "hybrid": dict(width=W),
    "symmetric_cross_attention": TRANSFORMER,
}
# Whether text_tokens (the MLM input) can see the image, for the configs above (depth 1 throughout).
FUSED_TEXT = {"concat": True, "cross_attention": True, "co_attention": True, "bottleneck": False, "sum": False,
              "multiplicative_gated": False, "late": False, "shared_weights": False, "concat_mlp": False,
              "hybrid": False, "symmetric_cross_attention": True}
POOLING_ONLY = ("sum", "multiplicative_gated", "late", "concat_mlp", "hybrid")
DECISION = ("late", "hybrid")  # blocks whose combined decision is itm_logits (no itm_head)
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "length", "joint", None}


def _model(name, **kw):
    return FusionModel(towers=TOWERS, fusion=name, fusion_args=CONFIGS[name], **kw)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, size=(B, L)).astype(np.int32)
    mask = np.ones((B, L), np.int32)
    mask[0, 4:] = 0  # first example right-padded
    ids[0, 4:] = 0
    return {"image": jnp.asarray(rng.normal(size=(B, 16, 16, 3)), jnp.float32), "text_ids": jnp.asarray(ids),
            "text_mask": jnp.asarray(mask)}


def _random_params(abstract, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), nn.unbox(abstract))


@functools.lru_cache(maxsize=None)
def _setup(name):
    """(model, boxed abstract params, params, batch, out) per block, built once per session."""
    model = _model(name)
    batch = _batch()
    abstract = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
    params = _random_params(abstract)
    return model, abstract, params, batch, model.apply({"params": params}, batch)


# ------------------------------------------------------------------------------- every block: shapes and axes


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes_finite_and_logical_axes(name):
    model, abstract, _, _, out = _setup(name)
    assert set(out) == {"pooled", "itm_logits", "mlm_logits", "text_tokens", "image_tokens", "image_mask"}
    chex.assert_shape(out["pooled"], (B, W))
    chex.assert_shape(out["itm_logits"], (B, 2))
    chex.assert_shape(out["mlm_logits"], (B, L, V))
    chex.assert_shape(out["text_tokens"], (B, L, W))
    chex.assert_shape(out["image_tokens"], (B, N_IMG, W))
    chex.assert_shape(out["image_mask"], (B, N_IMG))
    np.testing.assert_array_equal(out["image_mask"], 1)
    assert out["itm_logits"].dtype == out["mlm_logits"].dtype == jnp.float32
    chex.assert_tree_all_finite(out)
    assert model.fused_text == FUSED_TEXT[name]

    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), type(leaf)
        assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
        assert set(leaf.names) <= LOGICAL_NAMES, leaf.names
        named = [n for n in leaf.names if n is not None]
        assert len(named) == len(set(named)), leaf.names
    assert {"image_encoder", "text_encoder", "mlm_transform", "mlm_bias"} <= set(abstract)
    assert ("itm_head" in abstract) == (name not in DECISION)  # late/hybrid: their own decision is the ITM head


# --------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", ["concat", "co_attention", "symmetric_cross_attention", "hybrid"])
def test_padded_text_ids_change_nothing_real(name):
    model, _, params, batch, out = _setup(name)
    ids = np.asarray(batch["text_ids"]).copy()
    ids[0, 4:] = [7, 33]  # garbage under mask 0
    out2 = model.apply({"params": params}, {**batch, "text_ids": jnp.asarray(ids)})
    np.testing.assert_allclose(out2["itm_logits"], out["itm_logits"], atol=1e-5)
    real = np.asarray(batch["text_mask"]) > 0
    np.testing.assert_allclose(np.asarray(out2["mlm_logits"])[real], np.asarray(out["mlm_logits"])[real], atol=1e-5)
    np.testing.assert_allclose(out2["image_tokens"], out["image_tokens"], atol=1e-5)
    assert not np.allclose(np.asarray(out2["mlm_logits"])[~real], np.asarray(out["mlm_logits"])[~real])


# ----------------------------------------------------------------------------------------- heads and tokens


def test_mlm_decoder_is_tied_to_the_word_embedding():
    model, abstract, params, batch, out = _setup("concat")
    vocab_sized = [path for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract))
                   if V in leaf.shape]
    assert len(vocab_sized) == 2, vocab_sized  # text_encoder/embeddings/word_embedding and mlm_bias: no decoder kernel
    h = HeadTransform(activation="gelu", ln_epsilon=1e-5).apply({"params": params["mlm_transform"]},
                                                                out["text_tokens"])
    table = params["text_encoder"]["embeddings"]["word_embedding"]
    expected = np.asarray(h) @ np.asarray(table).T + params["mlm_bias"]
    np.testing.assert_allclose(out["mlm_logits"], expected, atol=1e-5)


def test_token_sources():
    """Pooling-only blocks hand back the encoders' own text tokens; fused blocks depend on the image."""
    _, _, params, batch, out = _setup("sum")
    _, own = TextTransformer(**TEXT).apply({"params": params["text_encoder"]}, batch["text_ids"],
                                           batch["text_mask"])
    np.testing.assert_allclose(out["text_tokens"], own, atol=1e-6)
    model, _, params, batch, out = _setup("co_attention")
    out2 = model.apply({"params": params}, {**batch, "image": batch["image"] + 1.0})
    real = np.asarray(batch["text_mask"]) > 0
    assert not np.allclose(np.asarray(out2["mlm_logits"])[real], np.asarray(out["mlm_logits"])[real], atol=1e-4)


@pytest.mark.parametrize("name", DECISION)
def test_decision_blocks_itm_logits_are_the_combined_decision(name):
    model, _, params, batch, out = _setup(name)
    _, state = model.apply({"params": params}, batch, mutable=["intermediates"])
    extras = state["intermediates"]["fusion_extras"][0]
    np.testing.assert_allclose(out["itm_logits"], extras["logits"], atol=1e-6)
    if name == "hybrid":
        assert {"fused_logits", "modality_logits", "decision_weights"} <= set(extras)
        chex.assert_shape([extras["fused_logits"], extras["decision_weights"]], [(B, 2), (3,)])
    assert model.fusion_kwargs()["num_classes"] == 2
    with pytest.raises(ValueError, match=f"{name} block.*num_classes=2"):
        FusionModel(towers=TOWERS, fusion=name, fusion_args=dict(num_classes=3)).fusion_kwargs()
    FusionModel(towers=TOWERS, fusion=name, fusion_args=dict(num_classes=3), itm_head=False).fusion_kwargs()


def test_fused_text_table():
    def fused(name, **args):
        return FusionModel(towers=TOWERS, fusion=name, fusion_args=args).fused_text

    assert not fused("concat")  # ConcatFusion's default depth 0: a typed concatenation, nothing mixes
    assert fused("concat", depth=1)
    assert not fused("cross_attention", depth=1, query="image")  # text is the key/value side, only projected
    assert fused("bottleneck")  # default depth 2, fusion_layer 0
    assert not fused("bottleneck", depth=2, fusion_layer=1)
    assert not fused("additive_gated")
    assert not fused("shared_weights", depth=2)
    assert fused("symmetric_cross_attention") and not fused("symmetric_cross_attention", depth=0)
    assert not fused("concat_mlp") and not fused("hybrid")


# ------------------------------------------------------------------------------------ config and errors


def test_width_dicts_dtypes_and_heads_off():
    """Traced only (eval_shape): fusion width != text width adds mlm_proj; dict/FrozenDict fields; bf16."""
    batch = _batch()
    model = FusionModel(towers=TOWERS, fusion="cross_attention",
                        fusion_args=dict(TRANSFORMER, width=24, query="text"), dtype=jnp.bfloat16, remat=True)
    out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), batch)
    chex.assert_shape([out["pooled"], out["text_tokens"], out["mlm_logits"]], [(B, 24), (B, L, 24), (B, L, V)])
    assert out["itm_logits"].dtype == out["mlm_logits"].dtype == jnp.float32
    assert out["pooled"].dtype == jnp.bfloat16
    assert "mlm_proj" in variables["params"]
    assert model.fusion_kwargs()["width"] == 24 and model.fusion_kwargs()["remat"]

    frozen = FusionModel(towers=flax.core.FrozenDict({m: flax.core.FrozenDict(t) for m, t in TOWERS.items()}),
                         fusion="concat", fusion_args=flax.core.FrozenDict(TRANSFORMER))
    assert hash(frozen) == hash(_model("concat")) and frozen.fusion_kwargs()["width"] == W
    plain = FusionModel(towers=TOWERS, fusion="sum", mlm_head=False, itm_head=False)
    assert plain.fusion_kwargs()["width"] == W  # defaults to the text width
    out = jax.eval_shape(plain.init_with_output, jax.random.key(0), batch)[0]
    assert set(out) == {"pooled", "text_tokens", "image_tokens", "image_mask"}


def test_errors():
    batch = _batch()
    model = _model("concat")
    for key in ("image", "text_ids", "text_mask"):
        with pytest.raises(KeyError, match=key):
            model.init(jax.random.key(0), {k: v for k, v in batch.items() if k != key})
    with pytest.raises(ValueError, match="known:"):
        FusionModel(towers=TOWERS, fusion="concatt").fusion_kwargs()
    with pytest.raises(ValueError, match="n_bottleneck"):
        FusionModel(towers=TOWERS, fusion="bottleneck", fusion_args=dict(n_bottleneck=2)).fusion_kwargs()
    # fusion= switched alone keeps the previous block's fields: the error says how to switch both.
    with pytest.raises(ValueError, match=r"for fusion block 'hybrid'.*configs/fusion.py:block=hybrid"):
        FusionModel(towers=TOWERS, fusion="hybrid", fusion_args=dict(CONFIGS["cross_attention"])).fusion_kwargs()


def _fusion_config_module():
    spec = importlib.util.spec_from_file_location(
        "mmjax_test_configs_fusion", pathlib.Path(__file__).resolve().parent.parent / "configs" / "fusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_block_is_selectable_from_the_fusion_config():
    """configs/fusion.py:block=NAME sets model.fusion and fields that NAME's block accepts, for every block."""
    module = _fusion_config_module()
    assert set(module.BLOCK_ARGS) == set(fusion.FUSION_BLOCKS)
    for name in fusion.FUSION_BLOCKS:
        c = module.get_config(f"block={name}")
        assert c.model.fusion == name
        model = FusionModel(towers=TOWERS, fusion=name, fusion_args=c.model.fusion_args.to_dict())
        assert model.fusion_kwargs()["width"] == module.WIDTH
    assert module.get_config("hybrid").model.fusion_args.hidden == 1  # the bare block name works too


def test_build_model_validates_towers():
    """build_model checks each tower's kind and fields (nearest valid names in the error) and converts dtypes."""
    def config(**towers_):
        return dict(name="fusion", towers=towers_, fusion="concat", fusion_args=TRANSFORMER)

    model = build_model(config(image=dict(TOWERS["image"], dtype="bfloat16"), text=TOWERS["text"]))
    assert isinstance(model, FusionModel) and model.towers["image"]["dtype"] == jnp.bfloat16
    assert hash(model) == hash(build_model(config(image=dict(TOWERS["image"], dtype="bfloat16"), text=TOWERS["text"])))
    with pytest.raises(ValueError, match=r"model.towers.text.vocab_sise.*vocab_size"):
        build_model(config(image=TOWERS["image"], text=dict(TOWERS["text"], vocab_sise=3)))
    with pytest.raises(ValueError, match=r"model.towers.image.*patch_sise.*patch_size"):
        build_model(config(image=dict(TOWERS["image"], patch_sise=8), text=TOWERS["text"]))
    with pytest.raises(ValueError, match=r"unknown tower kind 'vitt'.*\['vit'\].*known kinds"):
        build_model(config(image=dict(TOWERS["image"], kind="vitt"), text=TOWERS["text"]))
    with pytest.raises(ValueError, match="unknown tower kind None"):
        build_model(config(image=IMAGE, text=TOWERS["text"]))
    with pytest.raises(ValueError, match=r"Unknown field model.image"):  # the old shape names its fields
        build_model(dict(name="fusion", image=IMAGE, text=TEXT))


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


def test_remat_policy_reaches_towers_and_block():
    """remat_policy applies to both towers' blocks and the fusion block's layers; a sub-config's own wins."""
    batch = _batch()
    model = _model("cross_attention", remat=True, remat_policy="dots_saveable")
    variables = jax.eval_shape(model.init, jax.random.key(0), batch)
    found = _remat_policies(jax.make_jaxpr(model.apply)(variables, batch).jaxpr)
    assert len(found) == 3  # one Block per tower, one CrossAttentionLayer in the block
    assert all(p == jax.checkpoint_policies.dots_saveable for p in found), found
    assert model.fusion_kwargs()["remat_policy"] == "dots_saveable"
    own = dict(TOWERS, text=dict(TOWERS["text"], remat=True, remat_policy="everything_saveable"))
    model = FusionModel(towers=own, fusion="cross_attention", fusion_args=CONFIGS["cross_attention"])
    found = _remat_policies(jax.make_jaxpr(model.apply)(variables, batch).jaxpr)
    assert found == [jax.checkpoint_policies.everything_saveable]  # only the text tower asked for remat


class _ToyAudio(nn.Module):
    """A stand-in audio tower: one Dense over frame features."""

    width: int = W
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, frames, *, train=False):
        del train
        return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(frames)


@pytest.mark.parametrize("name", ["concat", "symmetric_cross_attention", "hybrid"])
def test_registry_entry_adds_a_modality(monkeypatch, name):
    """A new tower kind is one registry entry: FusionModel then fuses three modalities (traced only)."""
    def encode(tower, batch, train):
        tokens = tower(batch["audio"], train=train)
        return tokens, jnp.ones(tokens.shape[:2], jnp.int32)

    monkeypatch.setitem(towers.TOWERS, "toy_audio", towers.TowerKind(module=_ToyAudio, inputs=("audio",),
                                                                      encode=encode))
    model = build_model(dict(name="fusion", towers=dict(TOWERS, audio=dict(kind="toy_audio")), fusion=name,
                             fusion_args=CONFIGS[name]))
    batch = dict(_batch(), audio=jnp.zeros((B, 5, 3)))
    out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), batch)
    chex.assert_shape([out["audio_tokens"], out["audio_mask"]], [(B, 5, W), (B, 5)])
    chex.assert_shape([out["text_tokens"], out["image_tokens"], out["mlm_logits"]],
                      [(B, L, W), (B, N_IMG, W), (B, L, V)])
    assert {"audio_encoder", "image_encoder", "text_encoder"} <= set(variables["params"])
    assert model.required_keys == ("image", "text_ids", "text_mask", "audio")
    chex.assert_shape(out["itm_logits"], (B, 2))
    if name == "symmetric_cross_attention":  # one attention per ordered pair of the three modalities
        assert sum(k.startswith("attn_") for k in variables["params"]["fusion"]["layer_0"]) == 6
    with pytest.raises(KeyError, match="audio"):
        model.init(jax.random.key(0), _batch())


def test_mlm_needs_a_text_tower():
    image_only = FusionModel(towers={"image": TOWERS["image"]}, fusion="sum", fusion_args=dict(width=W))
    with pytest.raises(ValueError, match="mlm_head needs a 'text' tower"):
        image_only.init(jax.random.key(0), _batch())
    no_mlm = image_only.clone(mlm_head=False)
    out = jax.eval_shape(no_mlm.init_with_output, jax.random.key(0), _batch())[0]
    assert set(out) == {"pooled", "image_tokens", "image_mask", "itm_logits"}
