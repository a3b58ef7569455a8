"""VisualBERT: output shapes, logical partitioning, padding invariance, region feature masking, the VQA token,
errors; and mmjax.convert.hf_visual_bert against transformers (three architectures, both directions, to 1e-4)."""
from __future__ import annotations

import functools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.heads import HeadTransform
from mmjax.models.visualbert import VisualBERT

B, L, R, F, C, D, V = 2, 6, 4, 12, 5, 16, 50  # batch, text length, regions, feature dim, classes, width, vocab
A = 3  # VQA answers
# Depth 2 and one shared init / jitted apply keep the file fast on 2 shared cores: XLA compile time dominates.
TINY = dict(vocab_size=V, max_len=8, region_feat_dim=F, num_region_classes=C, width=D, depth=2, heads=2)
MODEL = VisualBERT(**TINY, vqa_labels=A, mrfr_head=True, mrc_head=True)  # every head on
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "length", "joint", None}  # documented in layers.py
ATOL = 1e-4


def make_batch(seed: int = 0, **overrides) -> dict:
    """Random ids / features / boxes. Padding: text [1, 4:], regions [0, 3] and [1, 2:]."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    text_mask = np.ones((B, L), np.int32)
    text_mask[1, 4:] = 0
    region_mask = np.ones((B, R), np.int32)
    region_mask[0, 3] = 0
    region_mask[1, 2:] = 0
    corner = jax.random.uniform(k3, (B, R, 2), maxval=0.5)
    batch = {
        "text_ids": jax.random.randint(k1, (B, L), 1, V),
        "text_mask": jnp.asarray(text_mask),
        "region_feats": jax.random.normal(k2, (B, R, F)),
        "region_boxes": jnp.concatenate([corner, corner + 0.3], axis=-1),
        "region_mask": jnp.asarray(region_mask),
        "region_feature_mask": jnp.zeros((B, R), jnp.int32),  # always present: one jit cache entry
    }
    return {**batch, **overrides}


def random_variables(model: VisualBERT, seed: int = 0) -> dict:
    """Boxed variables of `model` filled from numpy (LN scales 1, others ~ N(0, 1/fan_in)).

    The structure and logical names come from `eval_shape(model.init)`; skipping the real initialisers saves the
    seconds XLA takes to compile init's random-number code on the shared cores here.
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
def jitted_apply(model: VisualBERT):
    """One jitted apply per model config, so equal-shaped calls across tests reuse the compilation."""
    return jax.jit(model.apply)


def apply(batch: dict) -> dict:
    """MODEL's outputs for `batch` with the shared variables."""
    return jitted_apply(MODEL)(shared_variables(), batch)


def test_shapes_and_dtypes():
    """Every output has its documented shape and dtype; head outputs are float32; the MLM decoder is tied."""
    batch = make_batch()
    out = apply(batch)
    expected = {
        "text_tokens": (B, L, D), "image_tokens": (B, R, D), "image_mask": (B, R), "pooled": (B, D),
        "last_hidden_state": (B, L + R, D), "pooler_output": (B, D), "itm_logits": (B, 2), "mlm_logits": (B, L, V),
        "vqa_logits": (B, A), "mrfr_pred": (B, R, F), "mrc_logits": (B, R, C),
    }
    assert set(out) == set(expected)  # no `logits`: the VQA head is not the only head
    for key, shape in expected.items():
        chex.assert_shape(out[key], shape)
    chex.assert_type(out["image_mask"], jnp.int32)
    np.testing.assert_array_equal(out["image_mask"], batch["region_mask"])
    chex.assert_type([out[k] for k in expected if k != "image_mask"], jnp.float32)
    chex.assert_tree_all_finite(out)
    np.testing.assert_array_equal(out["last_hidden_state"],
                                  jnp.concatenate([out["text_tokens"], out["image_tokens"]], axis=1))
    np.testing.assert_array_equal(out["pooler_output"], out["pooled"])

    # mlm_logits = transform(text_tokens) @ text_embeddings/word_embedding^T + bias (no decoder kernel of its own).
    params = nn.unbox(shared_variables()["params"])
    h = HeadTransform().apply({"params": params["mlm_transform"]}, out["text_tokens"])
    word = params["text_embeddings"]["word_embedding"]
    np.testing.assert_allclose(out["mlm_logits"], h @ word.T + params["mlm_bias"], rtol=1e-5, atol=1e-5)


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
    # Regions have type / position tables of their own, shaped as the text ones; one LayerNorm over both.
    assert params["visual_type_embedding"].value.shape == params["text_embeddings"]["type_embedding"].value.shape
    assert params["visual_pos_embedding"].value.shape == (TINY["max_len"], D)
    assert "ln" not in params["text_embeddings"] and "ln_embed" in params


def test_special_visual_initialize():
    """The visual type / position tables start as copies of the text ones (HF's special_visual_initialize)."""
    batch = make_batch()
    small = dict(TINY, depth=0, mlm_head=False, itm_head=False)  # no blocks: only the embeddings' init compiles
    params = nn.unbox(jax.jit(VisualBERT(**small).init)(jax.random.PRNGKey(0), batch)["params"])
    np.testing.assert_array_equal(params["visual_pos_embedding"], params["text_embeddings"]["pos_embedding"])
    np.testing.assert_array_equal(params["visual_type_embedding"], params["text_embeddings"]["type_embedding"])
    # Off: tables of their own (checked on shapes only; eval_shape runs no initialiser).
    shapes = jax.eval_shape(VisualBERT(**small, special_visual_initialize=False).init, jax.random.PRNGKey(0), batch)
    assert nn.unbox(shapes["params"])["visual_pos_embedding"].shape == (TINY["max_len"], D)


def test_padding_does_not_change_real_outputs():
    """New features for padded regions, new ids at padded text slots and any boxes leave real outputs alone."""
    batch = make_batch()
    out = apply(batch)
    pad_r = ~np.asarray(batch["region_mask"], bool)[..., None]
    noise = jax.random.normal(jax.random.PRNGKey(9), (B, R, F)) * 5.0
    other = dict(batch, region_feats=jnp.where(pad_r, noise, batch["region_feats"]),
                 region_boxes=jnp.zeros((B, R, 4)),  # VisualBERT reads no box, real or padded
                 text_ids=batch["text_ids"].at[1, 4:].set(7))
    out2 = apply(other)
    text_real, region_real = np.asarray(batch["text_mask"], bool), np.asarray(batch["region_mask"], bool)
    np.testing.assert_allclose(np.asarray(out2["text_tokens"])[text_real],
                               np.asarray(out["text_tokens"])[text_real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out2["image_tokens"])[region_real],
                               np.asarray(out["image_tokens"])[region_real], atol=1e-5)
    for key in ("pooled", "itm_logits", "vqa_logits"):
        np.testing.assert_allclose(out2[key], out[key], atol=1e-5, err_msg=key)
    # Sanity: a real region's features do change things.
    changed = apply(dict(batch, region_feats=batch["region_feats"].at[1, 0].add(1.0)))
    assert np.abs(changed["pooled"][1] - out["pooled"][1]).max() > 1e-4


def test_region_feature_mask_is_zero_features():
    """region_feature_mask=1 gives exactly the outputs of zero features for that region."""
    batch = make_batch()
    rows, cols = (0, 1), (1, 0)
    with_mask = apply(dict(batch, region_feature_mask=batch["region_feature_mask"].at[rows, cols].set(1)))
    zeroed = apply(dict(batch, region_feats=batch["region_feats"].at[rows, cols].set(0.0)))
    chex.assert_trees_all_close(with_mask, zeroed, atol=1e-6)
    plain = apply(batch)
    assert np.abs(np.asarray(with_mask["pooled"] - plain["pooled"])).max(axis=1).min() > 1e-4


def test_vqa_head_reads_the_token_before_the_last_real_one():
    """vqa_logits = Dense(text token at sum(text_mask) - 2), as HF VisualBertForQuestionAnswering (not pooled)."""
    batch = make_batch()
    out = apply(batch)
    head = nn.unbox(shared_variables()["params"])["vqa_head"]
    token = np.asarray(out["text_tokens"])[np.arange(B), np.asarray(batch["text_mask"]).sum(1) - 2]  # 4 and 2
    np.testing.assert_allclose(out["vqa_logits"], token @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)


def test_errors_name_the_key():
    """Missing keys, wrong shapes and over-long text raise errors naming the key and shape."""
    init = functools.partial(jax.eval_shape, MODEL.init, jax.random.PRNGKey(0))
    batch = make_batch()
    with pytest.raises(KeyError, match="region_feats"):
        init({k: v for k, v in batch.items() if k != "region_feats"})
    init({k: v for k, v in batch.items() if k != "region_boxes"})  # optional: never read
    with pytest.raises(ValueError, match=r"region_boxes.*\(2, 4, 3\)"):
        init(dict(batch, region_boxes=batch["region_boxes"][..., :3]))
    with pytest.raises(ValueError, match=r"region_feats.*\(2, 4, 11\)"):
        init(dict(batch, region_feats=batch["region_feats"][..., :11]))
    with pytest.raises(ValueError, match=r"region_mask.*\(2, 3\)"):
        init(dict(batch, region_mask=batch["region_mask"][:, :3]))
    with pytest.raises(ValueError, match="max_len"):
        init(dict(batch, text_ids=jnp.ones((B, 9), jnp.int32), text_mask=jnp.ones((B, 9), jnp.int32)))
    with pytest.raises(ValueError, match="type_vocab_size"):
        jax.eval_shape(VisualBERT(**TINY, type_vocab_size=1).init, jax.random.PRNGKey(0), batch)


def test_bf16_dropout_and_remat_run():
    """bfloat16 compute with float32 heads, dropout in training mode and remat run; `logits` = the lone VQA head."""
    model = VisualBERT(**dict(TINY, depth=1), dtype=jnp.bfloat16, dropout_rate=0.1, attention_dropout_rate=0.1,
                       remat=True, mlm_head=False, itm_head=False, vqa_labels=A)
    batch = make_batch()
    variables = random_variables(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))  # param_dtype
    out = jax.jit(functools.partial(model.apply, train=True))(variables, batch, rngs={"dropout": jax.random.PRNGKey(1)})
    assert set(out) == {"text_tokens", "image_tokens", "image_mask", "pooled", "last_hidden_state", "pooler_output",
                        "vqa_logits", "logits"}
    assert out["text_tokens"].dtype == jnp.bfloat16 and out["logits"].dtype == jnp.float32
    chex.assert_tree_all_finite(out)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face parity (mmjax.convert.hf_visual_bert through mmjax.convert.hf's load / save).

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             visual_embedding_dim=F, max_position_embeddings=16)


def hf_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids / token types / features; text [1, -2:] and regions [0, -1], [1, 2:] are padding."""
    rng = np.random.default_rng(seed)
    text_mask = np.ones((B, L), np.int64)
    text_mask[1, -2:] = 0
    region_mask = np.ones((B, R), np.int64)
    region_mask[0, -1] = 0
    region_mask[1, 2:] = 0
    return {"text_ids": rng.integers(2, SMALL["vocab_size"], (B, L)), "text_mask": text_mask,
            "text_type_ids": rng.integers(0, 2, (B, L)),
            "region_feats": rng.normal(size=(B, R, F)).astype(np.float32), "region_mask": region_mask}


def hf_outputs(model, architecture: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An HF VisualBERT's named outputs under our names (float32 numpy): the base model's and the head's."""
    torch = pytest.importorskip("torch")
    kwargs = dict(input_ids=torch.tensor(inputs["text_ids"]), attention_mask=torch.tensor(inputs["text_mask"]),
                  token_type_ids=torch.tensor(inputs["text_type_ids"]),
                  visual_embeds=torch.tensor(inputs["region_feats"]),
                  visual_attention_mask=torch.tensor(inputs["region_mask"]))
    with torch.no_grad():
        base = model if architecture == "VisualBertModel" else model.visual_bert
        out = base(**kwargs)
        named = {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy()}
        if architecture == "VisualBertForQuestionAnswering":
            named["logits"] = model(**kwargs).logits.numpy()
        elif architecture == "VisualBertForPreTraining":
            heads_out = model(**kwargs)
            named["mlm_logits"] = heads_out.prediction_logits.numpy()[:, :L]  # ours: the text rows
            named["itm_logits"] = heads_out.seq_relationship_logits.numpy()[:, ::-1]  # ours: 1 = matching
    return named


def our_outputs(model, variables, architecture: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our VisualBERT's outputs under the names `hf_outputs` uses."""
    batch = {k: jnp.asarray(v, jnp.float32 if k == "region_feats" else jnp.int32) for k, v in inputs.items()}
    out = jax.jit(model.apply)(variables, batch)
    names = {"VisualBertModel": (), "VisualBertForQuestionAnswering": ("logits",),
             "VisualBertForPreTraining": ("mlm_logits", "itm_logits")}[architecture]
    return {n: np.asarray(out[n]) for n in ("last_hidden_state", "pooler_output") + names}


def max_diffs(ours: dict, theirs: dict) -> dict[str, float]:
    """max |ours - theirs| per output; every position, padded ones too (HF computes them the same way)."""
    assert set(ours) == set(theirs)
    for n in theirs:
        assert ours[n].shape == theirs[n].shape, (n, ours[n].shape, theirs[n].shape)
    return {n: float(np.abs(ours[n] - theirs[n]).max()) for n in theirs}


def saved_random_model(architecture: str, path, seed: int):
    """An HF VisualBERT of the SMALL shapes with every parameter perturbed, saved at `path` (safetensors).

    HF zero-initialises biases and sets LayerNorms to 1/0 and the visual tables to copies of the text ones:
    noise on every parameter makes a swapped or dropped tensor show up. (parameters() yields the tied MLM decoder
    once: it stays tied.)
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    reference = getattr(transformers, architecture)(transformers.VisualBertConfig(**SMALL, num_labels=A)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(path)  # transformers 5 writes model.safetensors only
    return reference


@pytest.mark.parametrize("architecture", ["VisualBertModel", "VisualBertForQuestionAnswering",
                                          "VisualBertForPreTraining"])
def test_hf_load_and_save_match_transformers(architecture: str, tmp_path):
    """save_pretrained -> hf.load -> same outputs; hf.save -> same tensors -> from_pretrained -> same outputs."""
    transformers = pytest.importorskip("transformers")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from mmjax.convert import hf  # pylint: disable=import-outside-toplevel

    reference = saved_random_model(architecture, tmp_path / "hf", seed=0)
    model, variables, model_config = hf.load(tmp_path / "hf")  # dispatches on model_type "visual_bert"
    assert model_config["name"] == "visualbert"
    inputs = hf_inputs()
    expected = hf_outputs(reference, architecture, inputs)
    diffs = max_diffs(our_outputs(model, variables, architecture, inputs), expected)
    print(f"\n{architecture} load: max |ours - HF| {diffs}")
    assert max(diffs.values()) <= ATOL, diffs

    # Back (dispatches on our config name "visualbert"): the checkpoint's tensors bit for bit, loaded cleanly.
    hf.save(tmp_path / "ours", model_config, variables)
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["architectures"] == [architecture]
    tensors = safetensors_numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    exported = safetensors_numpy.load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert sorted(exported) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    reloaded, info = getattr(transformers, architecture).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    diffs = max_diffs(hf_outputs(reloaded.eval(), architecture, inputs), expected)
    print(f"{architecture} export: max |reloaded HF - HF| {diffs}")
    assert max(diffs.values()) == 0.0, diffs


def test_config_mapping_and_refusals():
    """Architecture detection, head fields per architecture, and one-line refusals of what we do not express."""
    pytest.importorskip("safetensors")
    from mmjax.convert import hf, hf_visual_bert as conv  # pylint: disable=import-outside-toplevel

    assert hf.converter("visual_bert") is hf.converter("visualbert") is conv
    base = dict(SMALL, hidden_act="gelu_new")
    cfg = conv.model_config_from_hf(base, "VisualBertModel")
    assert cfg["activation"] == "gelu_tanh" and cfg["max_len"] == 16 and cfg["region_feat_dim"] == F
    assert not (cfg["mlm_head"] or cfg["itm_head"]) and cfg["vqa_labels"] is None
    assert conv.infer_architecture(cfg) == "VisualBertModel"
    qa = conv.model_config_from_hf(dict(base, id2label={"0": "a", "1": "b"}), "VisualBertForQuestionAnswering")
    assert qa["vqa_labels"] == 2 and conv.infer_architecture(qa) == "VisualBertForQuestionAnswering"
    pre = conv.model_config_from_hf(base, "VisualBertForPreTraining")
    assert pre["mlm_head"] and pre["itm_head"] and conv.infer_architecture(pre) == "VisualBertForPreTraining"
    with pytest.raises(ValueError, match="several HF heads"):
        conv.infer_architecture(dict(pre, vqa_labels=2))

    # Without "architectures" the tensor names decide; the base model has no "visual_bert." prefix.
    assert conv.detect_architecture({}, {"visual_bert.pooler.dense.weight": 0, "cls.seq_relationship.weight": 0}) == (
        "VisualBertForPreTraining", "visual_bert.")
    assert conv.detect_architecture({}, {"pooler.dense.weight": 0}) == ("VisualBertModel", "")
    with pytest.raises(ValueError, match="names no architecture"):
        conv.detect_architecture({}, {"visual_bert.pooler.dense.weight": 0, "cls.weight": 0})
    with pytest.raises(ValueError, match="VisualBertForVisualReasoning"):
        conv.detect_architecture({"architectures": ["VisualBertForVisualReasoning"]}, {})
    with pytest.raises(ValueError, match="bypass_transformer"):
        conv.model_config_from_hf(dict(base, bypass_transformer=True), "VisualBertModel")
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        conv.model_config_from_hf(dict(base, tie_word_embeddings=False), "VisualBertForPreTraining")
    word = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="cls.predictions.decoder.weight differs"):
        conv.load({"architectures": ["VisualBertForPreTraining"]},
                  {"visual_bert.embeddings.word_embeddings.weight": word, "cls.predictions.bias": np.zeros(3),
                   "cls.predictions.decoder.weight": word + 1})
    with pytest.raises(ValueError, match="VisualBertForPreTraining needs"):  # checked before any weight is read
        conv.export(cfg, {}, "VisualBertForPreTraining")
