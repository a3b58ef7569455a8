"""The matching task's rows and masks (conditional vs joint masking), WPA wiring and its config errors.

A recording stand-in model shows exactly which rows the task feeds the model; the real models' steps are covered
in test_sharding.py (sharded == single device) and by the training runs in the README.
"""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ml_collections

from mmjax import sharding
from mmjax import state as state_lib
from mmjax.data import pipeline, sources
from mmjax.tasks import matching

B, L, R, F, V, C = 4, 8, 6, 192, 64, 25
P, N = 16, 16  # patch size and patches of a 64x64 image
FAKE_TOKENIZER = types.SimpleNamespace(pad_id=0, cls_id=1, sep_id=2, mask_id=3, unk_id=4, vocab_size=V,
                                       continuation_table=lambda: np.zeros(V, bool))
SEEN: list[dict] = []
MESH = sharding.create_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


class Recorder(nn.Module):
    """Records its batch and returns zero outputs of every kind the task may read."""

    image_cls_first = False
    patch_size = P

    @nn.compact
    def __call__(self, batch, *, train=False):
        SEEN.append(jax.tree.map(np.asarray, dict(batch)))
        n = batch["text_ids"].shape[0]
        w = self.param("w", nn.initializers.ones, ())
        return {"itm_logits": jnp.zeros((n, 2)) * w, "mlm_logits": jnp.zeros((n, L, V)) * w,
                "text_tokens": jnp.ones((n, L, 4)) * w, "image_tokens": jnp.ones((n, R, 4)) * w,
                "image_mask": jnp.ones((n, R), jnp.int32), "mrfr_pred": jnp.zeros((n, R, F)) * w,
                "mrc_logits": jnp.zeros((n, R, C)) * w, "mpp_pred": jnp.zeros((n, N, P * P * 3)) * w,
                "patch_index": jnp.broadcast_to(jnp.arange(N), (n, N))}


def _config(masking="conditional", **objectives):
    c = ml_collections.ConfigDict()
    c.task = matching.default_task_config(**objectives)
    c.task.masking = masking
    c.task.itm.negatives = dict(in_batch=1.0, other_color=1.0, other_shape=2.0)
    return c


def _meta(regions=True, attributes=True):
    """What the pipeline would say of region (or patch) data with colour / shape hard negatives."""
    words = {"color": ("red", "green"), "shape": ("circle", "square")} if attributes else {}
    source = sources.SourceMeta(key="fake", kind="image_text", splits={}, attributes=words,
                                **(dict(num_regions=R, region_feature_dim=F, region_classes=C) if regions else {}))
    keys = ("image", "text_ids", "text_mask") + (("region_feats", "region_boxes", "region_mask") if regions else ())
    return pipeline.DatasetMeta(sources={"fake": source}, eval_source="fake", vocab_size=V, model_keys=keys)


def _task(model, config, meta=None):
    return matching.MatchingTask(model, config, meta or _meta(), FAKE_TOKENIZER, MESH)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, L), np.int32)
    mask[:, 6:] = 0
    batch = {"image": rng.normal(size=(B, 64, 64, 3)).astype(np.float32), "text_mask": mask,
             "region_feats": rng.normal(size=(B, R, F)).astype(np.float32),
             "region_boxes": np.tile(np.array([0, 0, 1, 1], np.float32), (B, R, 1)),
             "region_mask": np.ones((B, R), np.int32),
             "region_targets": np.full((B, R, C), 1 / C, np.float32)}
    for k, prefix in enumerate(("", "other_color_", "other_shape_")):
        ids = np.arange(L)[None] + 10 * k + 5 + 10 * np.arange(B)[:, None] % 64
        batch[prefix + "text_ids"] = (np.minimum(ids, V - 1) * mask).astype(np.int32)
        batch[prefix + "text_mask"] = mask
    return batch


def _rows(config, meta=None):
    SEEN.clear()
    task = _task(Recorder(), config, meta)
    params = {"w": jnp.ones(())}
    loss, metrics = task.loss(params, _batch(), jax.random.key(0))
    assert np.isfinite(float(loss))
    return SEEN[-1], metrics


def test_conditional_masking_masks_one_modality_per_row_block():
    seen, metrics = _rows(_config(mlm=1, itm=1, wpa=0.1, mrfr=1, mrc=1))
    batch = _batch()
    assert seen["text_ids"].shape[0] == 4 * B  # ITM true, ITM mismatch, MLM, region rows
    true, false, mlm, region = (slice(i * B, (i + 1) * B) for i in range(4))
    np.testing.assert_array_equal(seen["text_ids"][true], batch["text_ids"])
    assert np.all(np.any(seen["text_ids"][false] != batch["text_ids"], axis=1))  # every mismatch differs
    assert np.any(seen["text_ids"][mlm] != batch["text_ids"])  # text masked ...
    assert not seen["region_feature_mask"][mlm].any()  # ... while the regions stay whole
    np.testing.assert_array_equal(seen["text_ids"][region], batch["text_ids"])  # text whole ...
    assert seen["region_feature_mask"][region].any(axis=1).all()  # ... while every example masks a region
    assert not seen["region_feature_mask"][true].any() and not seen["region_feature_mask"][false].any()
    assert set(metrics) == {"itm_loss", "itm_acc", "wpa_loss", "mlm_loss", "mlm_acc", "mrfr_loss", "mrc_loss"}


def test_joint_masking_masks_both_in_the_same_rows():
    seen, metrics = _rows(_config("joint", mlm=1, itm=1, mrc=1))
    batch = _batch()
    assert seen["text_ids"].shape[0] == 3 * B
    mlm = slice(2 * B, 3 * B)
    assert np.any(seen["text_ids"][mlm] != batch["text_ids"])
    assert seen["region_feature_mask"][mlm].any(axis=1).all()
    assert "mrc_loss" in metrics and "mrfr_loss" not in metrics


def test_patch_models_get_no_region_keys():
    seen, metrics = _rows(_config(mlm=1, itm=1), _meta(regions=False))
    assert seen["text_ids"].shape[0] == 3 * B and "region_feature_mask" not in seen
    assert "region_feats" not in seen and "image" in seen


def test_masked_patch_prediction_rows():
    seen, metrics = _rows(_config(mlm=1, mpp=1), _meta(regions=False))
    batch = _batch()
    assert seen["text_ids"].shape[0] == 2 * B  # MLM rows, then patch rows (conditional: one modality masked)
    assert "patch_mask" not in seen or not seen["patch_mask"][:B].any()
    np.testing.assert_array_equal(seen["text_ids"][B:], batch["text_ids"])
    counts = seen["patch_mask"][B:].sum(axis=1)
    assert np.all(counts == round(0.15 * N))  # a fixed count per image
    # Zero predictions against MAE's per-patch standardised targets: the loss is their mean square, 1.
    assert float(metrics["mpp_loss"]) == pytest.approx(1.0, abs=1e-3)
    joint, _ = _rows(_config("joint", mlm=1, mpp=1), _meta(regions=False))
    assert joint["text_ids"].shape[0] == B and joint["patch_mask"].any(axis=1).all()


def test_negative_kinds_come_from_the_data():
    config = _config(itm=1)
    with pytest.raises(ValueError, match="other_color.*the data does not offer"):
        _task(Recorder(), config, _meta(attributes=False))
    config.task.itm.negatives = dict(in_batch=1.0)
    seen, _ = _rows(config, _meta(attributes=False))
    batch = _batch()
    # Without hard negatives every mismatch is another example's caption.
    others = {tuple(r) for r in batch["text_ids"]}
    assert all(tuple(r) in others for r in seen["text_ids"][B:2 * B])


def test_wpa_runs_on_the_itm_rows_and_is_zero_for_identical_streams():
    # Identical unit tokens on both sides: cost 0 everywhere, so the OT distance of every pair is 0.
    _, metrics = _rows(_config(wpa=1.0))
    assert float(metrics["wpa_loss"]) == pytest.approx(0.0, abs=1e-6)


def test_config_errors():
    config = _config(mlm=1)
    config.task.objectives.vqa = 1.0
    with pytest.raises(ValueError, match="not supported"):
        _task(Recorder(), config)
    with pytest.raises(ValueError, match="data.regions.enabled"):
        _task(Recorder(), _config(mlm=1, mrc=1), _meta(regions=False))
    with pytest.raises(ValueError, match="masking must be"):
        _task(Recorder(), _config("both", mlm=1))
    with pytest.raises(ValueError, match="unknown objectives"):
        matching.default_task_config(mlm=1, wra=1)


def test_missing_head_output_names_the_objective():
    class NoMrc(Recorder):
        @nn.compact
        def __call__(self, batch, *, train=False):
            out = super().__call__(batch, train=train)
            return {k: v for k, v in out.items() if k != "mrc_logits"}

    task = _task(NoMrc(), _config(mlm=1, mrc=1))
    with pytest.raises(ValueError, match="objective 'mrc' needs model outputs"):
        task.loss({"w": jnp.ones(())}, _batch(), jax.random.key(0))


class Scorer(Recorder):
    """A Recorder whose ITM head scores a pair by its caption's first word id: mining must find the highest."""

    @nn.compact
    def __call__(self, batch, *, train=False):
        out = super().__call__(batch, train=train)
        first = batch["text_ids"][:, 1].astype(jnp.float32)
        return {**out, "itm_logits": jnp.stack([jnp.zeros_like(first), first], axis=1)}


def test_mined_negatives_are_the_candidates_the_itm_head_scores_highest():
    config = _config(itm=1)
    config.task.itm.negatives = dict(mined=1.0)
    config.task.itm.mine = dict(candidates=B - 1, temperature=1e-3)  # every other caption; (near) argmax
    batch = _batch()
    batch["text_ids"][2] = batch["text_ids"][3]  # a duplicate caption: never a negative of its twin
    SEEN.clear()
    task = _task(Scorer(), config, _meta(attributes=False))
    loss, _ = task.loss({"w": jnp.ones(())}, batch, jax.random.key(0))
    assert np.isfinite(float(loss))
    mining, main = SEEN[0], SEEN[-1]
    assert mining["text_ids"].shape[0] == (B - 1) * B  # every candidate scored once, without gradient
    first = batch["text_ids"][:, 1]
    for i in range(B):
        allowed = [j for j in range(B) if j != i and not np.array_equal(batch["text_ids"][j], batch["text_ids"][i])]
        best = max(allowed, key=lambda j: first[j])
        np.testing.assert_array_equal(main["text_ids"][B + i], batch["text_ids"][best])
    # A weight of zero never mines (no extra forward).
    SEEN.clear()
    config.task.itm.negatives = dict(in_batch=1.0, mined=0.0)
    _task(Scorer(), config, _meta(attributes=False)).loss({"w": jnp.ones(())}, batch, jax.random.key(0))
    assert len(SEEN) == 1
    config.task.itm.mine = dict(candidates=0, temperature=1.0)
    config.task.itm.negatives = dict(mined=1.0)
    with pytest.raises(ValueError, match="candidates >= 1"):
        _task(Scorer(), config, _meta(attributes=False))


class TagRecorder(Recorder):
    """A Recorder that also returns OSCAR's tag MLM logits."""

    @nn.compact
    def __call__(self, batch, *, train=False):
        out = super().__call__(batch, train=train)
        n, t = batch["tags_text_ids"].shape
        return {**out, "tags_mlm_logits": jnp.zeros((n, t, V)) * self.variables["params"]["w"]}


def test_polluted_tags_and_masked_tag_words():
    config = _config(mlm=1, itm=1)
    config.task.itm.swap = "tags"
    config.task.itm.negatives = dict(in_batch=1.0)
    meta = _meta(attributes=False)
    meta = meta.__class__(**{**meta.__dict__, "model_keys": meta.model_keys + ("tags_text_ids", "tags_text_mask")})
    batch = _batch()
    tags = np.zeros((B, L), np.int32)
    tags[:, 0], tags[:, 1], tags[:, 2] = 1, [20, 20, 30, 40], 2  # [CLS] tag [SEP]; examples 0 and 1 share a tag
    batch["tags_text_ids"], batch["tags_text_mask"] = tags, (tags > 0).astype(np.int32)
    SEEN.clear()
    task = _task(TagRecorder(), config, meta)
    for seed in range(5):
        _, metrics = task.loss({"w": jnp.ones(())}, batch, jax.random.key(seed))
        seen = SEEN[-1]
        false, mlm = slice(B, 2 * B), slice(2 * B, 3 * B)
        np.testing.assert_array_equal(seen["text_ids"][false], batch["text_ids"])  # the caption is kept ...
        polluted = seen["tags_text_ids"][false]
        assert np.all(np.any(polluted != tags, axis=1))  # ... and the tags are always another image's, different
        masked = seen["tags_text_ids"][mlm]
        assert np.all(masked[:, [0, 2]] == tags[:, [0, 2]])  # [CLS] / [SEP] never masked
    assert np.any(SEEN[-1]["tags_text_ids"][2 * B:3 * B] != tags) or any(
        np.any(s["tags_text_ids"][2 * B:3 * B] != tags) for s in SEEN)  # the tag words are masked too
    with pytest.raises(ValueError, match="task.itm.swap='tags'"):
        _task(TagRecorder(), config, _meta(attributes=False))


CONFIGS = [("vilt.py", "tiny"), ("vilt.py", "base"), ("uniter.py", "tiny"), ("uniter.py", "base"),
           ("vilbert.py", "tiny"), ("vilbert.py", "base"), ("visualbert.py", "tiny"), ("visualbert.py", "base"),
           ("lxmert.py", "tiny"), ("lxmert.py", "base"), ("oscar.py", "tiny"), ("oscar.py", "base"),
           *[("fusion.py", block) for block in ("concat", "sum", "multiplicative_gated", "additive_gated",
                                                "cross_attention", "co_attention", "bottleneck", "late",
                                                "shared_weights", "concat_mlp", "hybrid",
                                                "symmetric_cross_attention")]]


@pytest.mark.parametrize("filename,arg", CONFIGS, ids=[f"{f[:-3]}:{a}" for f, a in CONFIGS])
def test_every_matching_config_builds_abstractly(load_config, filename, arg):
    from mmjax.models import build_model  # pylint: disable=import-outside-toplevel

    config = load_config(filename, arg)
    meta = pipeline.dataset_meta(config.data)
    meta = meta.__class__(**{**meta.__dict__, "vocab_size": V})
    state_lib.resolve_model_config(config, meta)
    model = build_model(config.model)
    task = matching.MatchingTask(model, config, meta, FAKE_TOKENIZER, MESH)
    if config.task.itm.swap == "tags":  # OSCAR: polluted tags, no caption hard negatives
        assert task.negative_kinds == ("in_batch", "mined")
    else:
        assert task.negative_kinds == ("in_batch", "mined", "other_color", "other_shape")
    boxed = state_lib.abstract_params(model, pipeline.batch_shapes(config.data, meta), 0)
    assert state_lib.count_params(boxed) > 0
    out = jax.eval_shape(lambda p, b: model.apply({"params": p}, b), nn.meta.unbox(boxed),
                         pipeline.batch_shapes(config.data, meta, 2))
    assert out["itm_logits"].shape == (2, 2)
    assert out["mlm_logits"].shape[:2] == (2, config.data.max_len) and out["mlm_logits"].shape[2] >= V


@pytest.mark.parametrize("filename", ["uniter.py", "vilt.py"])
def test_dry_run_traces_the_whole_matching_step(load_config, filename):
    from mmjax import train as trainer  # pylint: disable=import-outside-toplevel

    config = load_config(filename)
    config.model.vocab_size = 128  # fixed vocabulary: the dry run loads no tokenizer
    config.train.batch_size = 8
    summary = trainer.train_and_evaluate(config, None, dry_run=True)
    assert summary["params"] > 1e5 and summary["train_step_flops"] > 0


def _random_batch(config, meta, b=8, seed=0):
    """A random batch of a config's model inputs (+ the hard-negative captions its task may read)."""
    rng = np.random.default_rng(seed)
    shapes = pipeline.train_batch_shapes(config.data, meta, b)
    batch = {}
    for key, s in shapes.items():
        if key.endswith("text_mask"):
            batch[key] = np.ones(s.shape, np.int32)
        elif key.endswith("text_ids"):
            ids = rng.integers(5, V, s.shape)
            ids[:, 0], ids[:, -1] = 1, 2
            batch[key] = ids.astype(np.int32)
        elif s.dtype == np.int32:
            batch[key] = np.zeros(s.shape, np.int32)
        else:
            batch[key] = rng.normal(size=s.shape).astype(np.float32)
    return batch


@pytest.mark.parametrize("filename", ["vilt.py", "fusion.py"])
def test_mpp_wpa_and_mined_negatives_switch_on_from_the_config(load_config, filename):
    """What --config.task.objectives.mpp=1 --config.task.objectives.wpa=0.1 --config.task.itm.negatives.mined=1
    does: the MPP head comes on by itself, and one step trains every objective."""
    from mmjax.models import build_model  # pylint: disable=import-outside-toplevel

    config = load_config(filename)
    config.lock()  # as the command line's overrides see it: they may only set fields that exist
    config.task.objectives.mpp, config.task.objectives.wpa = 1, 0.1
    config.task.itm.negatives.mined = 1
    config.unlock()
    config.task.wpa.iterations = 5  # IPOT's proximal steps: a few are enough to trace and differentiate it
    config.data.image_size = 32
    if filename == "fusion.py":
        config.model.towers.image.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
        config.model.towers.text.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    else:
        config.model.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    meta = pipeline.dataset_meta(config.data)
    meta = meta.__class__(**{**meta.__dict__, "vocab_size": V})
    done = state_lib.resolve_model_config(config, meta)
    assert "model.mpp_head = True (task.objectives.mpp)" in done
    model = build_model(config.model)
    task = matching.MatchingTask(model, config, meta, FAKE_TOKENIZER, MESH)
    assert task.mined
    batch = jax.tree.map(jnp.asarray, _random_batch(config, meta))
    params = model.init(jax.random.key(0), {k: batch[k] for k in meta.model_keys})["params"]
    (loss, metrics), grads = jax.jit(jax.value_and_grad(task.loss, has_aux=True))(
        nn.meta.unbox(params), batch, jax.random.key(1))
    assert {"mpp_loss", "wpa_loss", "itm_loss", "mlm_loss"} <= set(metrics) and np.isfinite(float(loss))
    mpp_params = [k for k in jax.tree_util.tree_leaves_with_path(grads) if "mpp_decoder" in jax.tree_util.keystr(k[0])]
    assert mpp_params and all(float(jnp.abs(g).sum()) > 0 for _, g in mpp_params)
    image_tower = "image_encoder" if filename == "fusion.py" else None
    if image_tower:  # the ViT tower owns the [MASK] patch, and MPP trains it
        assert float(jnp.abs(grads[image_tower]["mask_patch"]).sum()) > 0
