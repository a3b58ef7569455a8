"""LXMERT: Hugging Face parity (LxmertModel, LxmertForQuestionAnswering: load, export, reload), output shapes,
logical partitioning, the shared cross-attention, padding invariance, stream isolation, region feature masking,
box layout and input errors (CPU, tiny sizes; one jitted apply per config, equal batch structures)."""
from __future__ import annotations

import functools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.convert import hf as hf_convert
from mmjax.convert import hf_lxmert
from mmjax.models import build_model
from mmjax.models.heads import HeadTransform
from mmjax.models.lxmert import LXMERT, to_lxmert_boxes

B, L, R, F, C, D, V = 2, 6, 5, 12, 5, 16, 50  # batch, text length, regions, feature dim, region classes, width, vocab
TINY = dict(vocab_size=V, max_len=8, region_feat_dim=F, num_region_classes=C, width=D, l_layers=1, r_layers=1,
            x_layers=2, heads=2, vqa_labels=3)
MODEL = LXMERT(**TINY)
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "length", "joint", None}  # documented in layers.py
ATOL = 1e-5
# The parity tests' transformers config: every layer kind twice or once, all sizes small.
HF_SMALL = dict(vocab_size=100, hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=2,
                r_layers=1, x_layers=2, visual_feat_dim=F, visual_pos_dim=4, max_position_embeddings=16,
                num_qa_labels=7)
HF_ATOL = 1e-4


def make_batch(seed: int = 0, length: int = L, vocab: int = V) -> dict:
    """Random text and regions, every key present (one batch structure: one compile per model).

    Example 1 has its last two text tokens padded; example 0 has its last two regions padded.
    """
    rng = np.random.default_rng(seed)
    text_mask = np.ones((B, length), np.int32)
    text_mask[1, -2:] = 0
    region_mask = np.ones((B, R), np.int32)
    region_mask[0, -2:] = 0
    ymin, xmin = rng.uniform(0, 0.5, (B, R)), rng.uniform(0, 0.5, (B, R))
    boxes = np.stack([ymin, xmin, ymin + rng.uniform(0.1, 0.5, (B, R)), xmin + rng.uniform(0.1, 0.5, (B, R))], -1)
    return {
        "text_ids": jnp.asarray(rng.integers(1, vocab, (B, length)), jnp.int32),
        "text_mask": jnp.asarray(text_mask),
        "text_type_ids": jnp.asarray(rng.integers(0, 2, (B, length)), jnp.int32),
        "region_feats": jnp.asarray(rng.normal(size=(B, R, F)), jnp.float32),
        "region_boxes": jnp.asarray(boxes, jnp.float32),
        "region_mask": jnp.asarray(region_mask),
        "region_feature_mask": jnp.zeros((B, R), jnp.int32),
    }


@functools.lru_cache(maxsize=None)
def variables():
    """MODEL's variables, shared by every model test (the x_layers=0 model uses a subset of them).

    The tree (boxes, logical names, shapes) is MODEL.init's, traced by eval_shape; the values are random normals
    (LayerNorm scales around 1): compiling init's random initializers costs more than these tests on 2 busy cores,
    and every property tested here holds for any parameter values (non-zero biases make it stricter).
    """
    shapes = jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), make_batch())
    rng = np.random.default_rng(0)

    def fill(path, x):
        is_scale = any(getattr(k, "key", None) == "scale" for k in path)
        return jnp.asarray(0.2 * rng.normal(size=x.shape) + float(is_scale), x.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def apply_fn(model: LXMERT):
    """One jitted apply per config; returns (outputs, sown intermediates)."""
    return jax.jit(lambda v, b: model.apply(v, b, mutable=["intermediates"]))


def run(batch: dict, model: LXMERT = MODEL) -> tuple[dict, dict]:
    """(outputs, intermediates) of `model` on `batch` with the shared variables."""
    out, state = apply_fn(model)(variables(), batch)
    return out, state["intermediates"]


def real_parts(out: dict, batch: dict) -> dict:
    """The outputs at real positions only (padded ones hold unspecified values), as numpy."""
    t = np.asarray(batch["text_mask"])[..., None] > 0
    r = np.asarray(batch["region_mask"])[..., None] > 0
    parts = {k: np.where(t, out[k], 0) for k in ("text_tokens", "mlm_logits")}
    parts.update({k: np.where(r, out[k], 0) for k in ("image_tokens", "mrfr_pred", "mrc_logits")})
    parts.update({k: np.asarray(out[k]) for k in ("pooled", "itm_logits", "vqa_logits")})
    return parts


# ---------------------------------------------------------------------------------------------------------------
# The model.


def test_shapes_dtypes_and_hf_names():
    batch = make_batch()
    out, inter = run(batch)
    expected = {"text_tokens": (B, L, D), "image_tokens": (B, R, D), "image_mask": (B, R), "pooled": (B, D),
                "language_output": (B, L, D), "vision_output": (B, R, D), "pooled_output": (B, D),
                "mlm_logits": (B, L, V), "itm_logits": (B, 2), "mrfr_pred": (B, R, F), "mrc_logits": (B, R, C),
                "vqa_logits": (B, 3), "question_answering_score": (B, 3)}
    assert set(out) == set(expected)
    for key, shape in expected.items():
        chex.assert_shape(out[key], shape)
        assert out[key].dtype == (jnp.int32 if key == "image_mask" else jnp.float32), key
    np.testing.assert_array_equal(out["image_mask"], batch["region_mask"])
    for ours, theirs in (("text_tokens", "language_output"), ("image_tokens", "vision_output"),
                         ("pooled", "pooled_output"), ("vqa_logits", "question_answering_score")):
        np.testing.assert_array_equal(out[ours], out[theirs])
    chex.assert_shape(inter["embeddings"][0]["image"], (B, R, D))
    chex.assert_tree_all_finite(out)
    # Registered: build_model makes the same module from a config dict.
    assert build_model(dict(name="lxmert", **TINY)) == MODEL and LXMERT.image_cls_first is False

    # bfloat16 compute (traced only, no compile): float32 params and head logits, bfloat16 tokens.
    bf16 = LXMERT(**TINY, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
        jax.eval_shape(bf16.init, jax.random.PRNGKey(0), batch)))
    out = jax.eval_shape(bf16.apply, variables(), batch)
    assert out["text_tokens"].dtype == out["image_tokens"].dtype == out["pooled"].dtype == jnp.bfloat16
    assert all(out[k].dtype == jnp.float32 for k in ("itm_logits", "mlm_logits", "mrfr_pred", "mrc_logits",
                                                       "vqa_logits"))


def test_params_logically_partitioned_and_layout():
    """Every leaf is nn.Partitioned with allowed, distinct names; one shared cross-attention per cross layer; the
    MLM decoder is tied."""
    params = variables()["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 80
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), where
        assert len(leaf.names) == leaf.value.ndim, (where, leaf.names, leaf.value.shape)
        assert set(leaf.names) <= LOGICAL_NAMES, (where, leaf.names)
        named = [n for n in leaf.names if n is not None]
        assert len(named) == len(set(named)), (where, leaf.names)
    assert set(params) == {"text_embeddings", "region_feat_proj", "ln_region_feat", "region_box_proj",
                           "ln_region_box", "text_encoder", "image_encoder", "cross_0", "cross_1", "pooler",
                           "mlm_transform", "mlm_bias", "itm_head", "mrfr_transform", "mrfr_decoder",
                           "mrc_transform", "mrc_decoder", "vqa_head"}
    # One cross-attention (and its LayerNorm) per layer, used in both directions, then a Block per stream.
    assert set(params["cross_0"]) == {"cross_attn", "ln_cross", "text", "image"}
    assert set(params["cross_0"]["text"]) == {"attn", "ln_1", "mlp", "ln_2"}
    assert set(params["vqa_head"]) == {"dense", "ln", "out"}
    assert params["vqa_head"]["ln"]["scale"].value.shape == (2 * D,)
    vocab_sized = {jax.tree_util.keystr(p) for p, x in leaves if V in x.value.shape}
    assert vocab_sized == {"['text_embeddings']['word_embedding']", "['mlm_bias']"}

    out, _ = run(make_batch())
    raw = nn.unbox(params)
    h = HeadTransform(ln_epsilon=1e-12).apply({"params": raw["mlm_transform"]}, out["text_tokens"])
    np.testing.assert_allclose(out["mlm_logits"], h @ raw["text_embeddings"]["word_embedding"].T + raw["mlm_bias"],
                               rtol=1e-5, atol=1e-5)


def test_padding_invariance():
    """New padded text ids and padded regions' features/boxes (even NaN) leave every real-position output alone."""
    batch = make_batch()
    out, _ = run(batch)
    other = dict(batch,
                 text_ids=batch["text_ids"].at[1, -2:].set(jnp.array([3, 44])),
                 region_feats=batch["region_feats"].at[0, -2:].set(jnp.nan),
                 region_boxes=batch["region_boxes"].at[0, -1].set(jnp.array([0.9, 0.0, 0.1, 1.0])))
    out2, _ = run(other)
    chex.assert_trees_all_close(real_parts(out2, other), real_parts(out, batch), atol=ATOL)
    changed, _ = run(dict(batch, region_feats=batch["region_feats"].at[0, 0].add(1.0)))
    assert np.abs(changed["pooled"][0] - out["pooled"][0]).max() > 1e-4  # a real region does count


def test_streams_meet_only_in_cross_modality_layers():
    """x_layers=0: text tokens (and pooled) ignore the regions entirely; x_layers>0: they depend on them."""
    batch = make_batch()
    rng = np.random.default_rng(3)
    regions = dict(batch, region_feats=jnp.asarray(rng.normal(size=(B, R, F)), jnp.float32),
                   region_boxes=batch["region_boxes"][:, ::-1], region_mask=jnp.ones((B, R), jnp.int32))
    isolated = LXMERT(**dict(TINY, x_layers=0))
    out, _ = run(batch, isolated)
    out2, _ = run(regions, isolated)
    for key in ("text_tokens", "mlm_logits", "pooled", "vqa_logits"):
        np.testing.assert_array_equal(out2[key], out[key], err_msg=key)

    out, _ = run(batch)
    out2, _ = run(regions)
    assert np.abs(out2["text_tokens"] - out["text_tokens"]).max() > 1e-4


def test_region_feature_mask_and_box_layout():
    """region_feature_mask=1 equals zero features for that region (box kept); to_lxmert_boxes swaps x and y."""
    batch = make_batch()
    masked = dict(batch, region_feature_mask=batch["region_feature_mask"].at[0, 1].set(1).at[1, 3].set(1))
    zeroed = dict(batch, region_feats=batch["region_feats"].at[0, 1].set(0.0).at[1, 3].set(0.0))
    out_m, inter_m = run(masked)
    out_z, inter_z = run(zeroed)
    chex.assert_trees_all_close((out_m, inter_m), (out_z, inter_z), atol=1e-6)
    out, _ = run(batch)
    assert np.abs(np.asarray(out_m["pooled"] - out["pooled"])).max(axis=1).min() > 1e-4

    # (ymin, xmin, ymax, xmax) -> (x1, y1, x2, y2), its own inverse; the HF parity tests feed each layout.
    boxes = jnp.array([0.1, 0.2, 0.5, 0.6], jnp.float32)
    np.testing.assert_array_equal(to_lxmert_boxes(boxes), np.array([0.2, 0.1, 0.6, 0.5], np.float32))
    np.testing.assert_array_equal(to_lxmert_boxes(to_lxmert_boxes(batch["region_boxes"])), batch["region_boxes"])


def test_remat_dropout_and_optional_keys_trace():
    """remat keeps the parameter tree; train=True with dropout and a batch without the optional keys both run
    (traced only: eval_shape, no compile); an unknown remat_policy raises naming it."""
    batch = make_batch()
    remat = LXMERT(**TINY, remat=True, dropout_rate=0.1, attention_dropout_rate=0.1)
    tree = jax.tree.map(lambda x: (x.shape, x.dtype), variables())
    assert jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(remat.init, jax.random.PRNGKey(0), batch)) == tree
    out = jax.eval_shape(lambda v, b: remat.apply(v, b, train=True, rngs={"dropout": jax.random.PRNGKey(1)}),
                         variables(), batch)
    chex.assert_shape(out["mrfr_pred"], (B, R, F))
    with pytest.raises(ValueError, match="remat_policy"):
        jax.eval_shape(LXMERT(**TINY, remat=True, remat_policy="nothing_savable").apply, variables(), batch)
    minimal = {k: x for k, x in batch.items() if k not in ("text_type_ids", "region_feature_mask")}
    chex.assert_shape(jax.eval_shape(MODEL.apply, variables(), minimal)["itm_logits"], (B, 2))


def test_input_errors_name_the_key():
    batch = make_batch()
    apply = functools.partial(jax.eval_shape, MODEL.apply, variables())
    with pytest.raises(KeyError, match="region_boxes"):
        apply({k: x for k, x in batch.items() if k != "region_boxes"})
    with pytest.raises(ValueError, match=r"'region_boxes'.*\(2, 5, 4\).*\(2, 5, 5\)"):
        apply(dict(batch, region_boxes=jnp.zeros((B, R, 5))))
    with pytest.raises(ValueError, match="'text_ids'.*max_len"):
        apply(dict(batch, text_ids=jnp.ones((B, 9), jnp.int32), text_mask=jnp.ones((B, 9), jnp.int32),
                   text_type_ids=jnp.zeros((B, 9), jnp.int32)))
    with pytest.raises(ValueError, match="'region_feats'"):
        apply(dict(batch, region_feats=jnp.zeros((B, R, F + 1))))
    with pytest.raises(ValueError, match="'region_mask'"):
        apply(dict(batch, region_mask=jnp.ones((B, R + 1), jnp.int32)))
    with pytest.raises(ValueError, match="'text_type_ids'"):
        apply(dict(batch, text_type_ids=jnp.zeros((B, L + 1), jnp.int32)))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face parity.


def hf_inputs(batch: dict) -> dict:
    """Our batch as transformers' keyword arguments: the same boxes in LXMERT's (x1, y1, x2, y2) layout."""
    torch = pytest.importorskip("torch")
    boxes = np.asarray(batch["region_boxes"])[..., [1, 0, 3, 2]]
    return {"input_ids": torch.tensor(np.asarray(batch["text_ids"]), dtype=torch.long),
            "attention_mask": torch.tensor(np.asarray(batch["text_mask"]), dtype=torch.long),
            "token_type_ids": torch.tensor(np.asarray(batch["text_type_ids"]), dtype=torch.long),
            "visual_feats": torch.tensor(np.asarray(batch["region_feats"])),
            "visual_pos": torch.tensor(boxes),
            "visual_attention_mask": torch.tensor(np.asarray(batch["region_mask"]), dtype=torch.long)}


BASE_NAMES = ("language_output", "vision_output", "pooled_output")


def hf_outputs(model, architecture: str, batch: dict) -> dict[str, np.ndarray]:
    """The named outputs of an HF LXMERT model on `batch` (float32 numpy): LxmertModel's three, and for
    LxmertForQuestionAnswering also question_answering_score (the base outputs from its `lxmert` part)."""
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        base = model(**hf_inputs(batch)) if architecture == "LxmertModel" else model.lxmert(**hf_inputs(batch))
        out = {n: getattr(base, n).numpy() for n in BASE_NAMES}
        if architecture == "LxmertForQuestionAnswering":
            out["question_answering_score"] = model(**hf_inputs(batch)).question_answering_score.numpy()
    return out


def real_diffs(ours: dict, theirs: dict, batch: dict) -> dict[str, float]:
    """max |ours - theirs| per output, over real text tokens / real regions only."""
    masks = {"language_output": np.asarray(batch["text_mask"]) > 0,
             "vision_output": np.asarray(batch["region_mask"]) > 0}
    diffs = {}
    for name, expected in theirs.items():
        got = np.asarray(ours[name])
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        diff = np.abs(got - expected)
        diffs[name] = float(diff[masks[name]].max() if name in masks else diff.max())
    return diffs


def saved_random_model(architecture: str, path, seed: int):
    """An HF LXMERT of the HF_SMALL shapes, every state-dict tensor perturbed (LayerNorms and biases too), saved
    with safe_serialization at `path`: (model, HF config dict, tensors)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    torch.manual_seed(seed)
    reference = getattr(transformers, architecture)(transformers.LxmertConfig(**HF_SMALL)).eval()
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            tensor.add_(0.1 * torch.randn_like(tensor))
    reference.save_pretrained(path, safe_serialization=True)
    with open(path / "config.json") as f:
        hf_config = json.load(f)
    return reference, hf_config, safetensors_numpy.load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("architecture", hf_lxmert.ARCHITECTURES)
def test_load_and_export_match_transformers(architecture: str, tmp_path):
    """save_pretrained -> mmjax.convert.hf.load(dir) -> same outputs at real positions; mmjax.convert.hf.save ->
    the same tensors bit for bit -> from_pretrained -> the same outputs."""
    transformers = pytest.importorskip("transformers")
    reference, hf_config, tensors = saved_random_model(architecture, tmp_path / "hf", seed=0)
    model, variables_, model_config = hf_convert.load(tmp_path / "hf")  # the registry: model_type "lxmert"
    assert model_config["vqa_labels"] == (7 if architecture == "LxmertForQuestionAnswering" else None)
    batch = make_batch(seed=1, length=L, vocab=HF_SMALL["vocab_size"])
    expected = hf_outputs(reference, architecture, batch)
    ours = jax.jit(model.apply)(variables_, batch)
    diffs = real_diffs(ours, expected, batch)
    print(f"\n{architecture} load: max |ours - HF| {diffs}")
    assert max(diffs.values()) <= HF_ATOL, diffs

    hf_convert.save(tmp_path / "ours", model_config, variables_)
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["architectures"] == [architecture]
    exported = hf_convert.read_weights(tmp_path / "ours")
    assert sorted(exported) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    reloaded, info = getattr(transformers, architecture).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    again = hf_outputs(reloaded.eval(), architecture, batch)
    for name, value in expected.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_config_mapping_and_refusals():
    """HF config -> ours (heads off, eps 1e-12, layer counts), architecture detection, and the ValueErrors."""
    cfg = hf_lxmert.model_config_from_hf(dict(HF_SMALL, hidden_act="gelu_new"), "LxmertModel")
    assert (cfg["l_layers"], cfg["r_layers"], cfg["x_layers"], cfg["region_feat_dim"], cfg["max_len"]) == (
        2, 1, 2, F, 16)
    assert cfg["activation"] == "gelu_tanh" and cfg["ln_epsilon"] == 1e-12 and cfg["vqa_labels"] is None
    assert not any(cfg[k] for k in ("mlm_head", "itm_head", "mrfr_head", "mrc_head"))
    qa = hf_lxmert.model_config_from_hf(HF_SMALL, "LxmertForQuestionAnswering")
    assert qa["vqa_labels"] == 7
    assert hf_lxmert.detect_architecture({}, {"lxmert.pooler.dense.weight": 0, hf_lxmert.ANSWER_OUT: 0}) == (
        "LxmertForQuestionAnswering", "lxmert.")
    assert hf_lxmert.detect_architecture({}, {"pooler.dense.weight": 0}) == ("LxmertModel", "")
    with pytest.raises(ValueError, match="LxmertForPreTraining"):
        hf_lxmert.detect_architecture({"architectures": ["LxmertForPreTraining"]}, {})
    with pytest.raises(ValueError, match="LxmertForPreTraining"):
        hf_lxmert.detect_architecture({}, {"lxmert.pooler.dense.weight": 0, "cls.predictions.bias": 0})
    with pytest.raises(ValueError, match="visual_pos_dim"):
        hf_lxmert.model_config_from_hf(dict(HF_SMALL, visual_pos_dim=6), "LxmertModel")
    with pytest.raises(ValueError, match="ln_epsilon"):
        hf_lxmert.export(dict(cfg, ln_epsilon=1e-6), {})
    with pytest.raises(ValueError, match="vqa_labels"):
        hf_lxmert.export(cfg, {}, "LxmertForQuestionAnswering")
    with pytest.raises(ValueError, match="LxmertForPreTraining"):
        hf_lxmert.export(cfg, {}, "LxmertForPreTraining")
    assert hf_convert.converter("lxmert") is hf_lxmert
