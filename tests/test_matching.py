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


CONFIGS = [("vilt.py", "tiny"), ("vilt.py", "base"), ("uniter.py", "tiny"), ("uniter.py", "base"),
           ("vilbert.py", "tiny"), ("vilbert.py", "base"),
           *[("fusion.py", block) for block in ("concat", "sum", "multiplicative_gated", "additive_gated",
                                                "cross_attention", "co_attention", "bottleneck", "late",
                                                "shared_weights")]]


@pytest.mark.parametrize("filename,arg", CONFIGS, ids=[f"{f[:-3]}:{a}" for f, a in CONFIGS])
def test_every_matching_config_builds_abstractly(load_config, filename, arg):
    from mmjax.models import build_model  # pylint: disable=import-outside-toplevel

    config = load_config(filename, arg)
    meta = pipeline.dataset_meta(config.data)
    meta = meta.__class__(**{**meta.__dict__, "vocab_size": V})
    state_lib.resolve_model_config(config, meta)
    model = build_model(config.model)
    task = matching.MatchingTask(model, config, meta, FAKE_TOKENIZER, MESH)
    assert task.negative_kinds == ("in_batch", "other_color", "other_shape")
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
