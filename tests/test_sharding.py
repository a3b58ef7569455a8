"""Sharded training (CLIP contrastive; ViLT, UNITER, ViLBERT and a fusion model with MLM + ITM (+ WPA, MRFR, MRC)) equals single-device training; parameters are really sharded; checkpoints round-trip.

The suite runs with 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS before jax is imported).
"""

import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax import checkpoint, optim, sharding
from mmjax import train as trainer
from mmjax.data import pipeline
from mmjax.models import build_model
from mmjax.tasks import get_task

assert jax.device_count() == 8, "tests/conftest.py must set 8 fake CPU devices before jax is imported"


def small_clip_config(load_config):
    """A CLIP small enough for tests whose dims divide by 8 (fsdp) and 2 (tensor)."""
    c = load_config("clip.py", "tiny")
    c.model.image.update(dict(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_dim=128))
    c.model.text.update(dict(max_len=8, width=64, depth=2, heads=2, mlp_dim=128, vocab_size=64))
    c.model.embed_dim = 32
    c.data.image_size, c.data.max_len = 32, 8
    c.train.batch_size = 16
    c.optimizer.warmup_steps = 0
    return c


def small_vilt_config(load_config):
    """A ViLT small enough for tests whose dims divide by 8 (fsdp) and 2 (tensor)."""
    c = load_config("vilt.py", "tiny")
    c.model.update(dict(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_dim=128, max_len=8,
                        vocab_size=64))
    c.data.image_size, c.data.max_len = 32, 8
    c.train.batch_size = 16
    c.optimizer.warmup_steps = 0
    return c


def small_region_config(load_config, name):
    """UNITER / ViLBERT / fusion, small, dims divisible by 8 and 2; region models use the embedded region layout."""
    c = load_config(f"{name}.py")
    if name == "fusion":
        c.model.image.update(dict(image_size=32, patch_size=8, width=64, depth=1, heads=2, mlp_dim=128))
        c.model.text.update(dict(max_len=8, width=64, depth=1, heads=2, mlp_dim=128, vocab_size=64))
        c.model.fusion_args.update(dict(depth=1, mlp_dim=128))
        c.data.image_size = 32
    else:
        depth = dict(depth=2) if name == "uniter" else dict(text_depth=1, co_depth=1)
        c.model.update(dict(width=64, heads=2, mlp_dim=128, max_len=8, vocab_size=64, **depth))
    c.data.max_len = 8
    c.train.batch_size = 16
    c.optimizer.warmup_steps = 0
    return c


# Special token ids as the matching task needs them (the real tokenizer is not needed for a random batch).
FAKE_TOKENIZER = types.SimpleNamespace(pad_id=0, cls_id=1, sep_id=2, mask_id=3, unk_id=4, vocab_size=64)


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, s, length = config.train.batch_size, config.data.image_size, config.data.max_len
    lengths = rng.integers(3, length + 1, size=b)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    batch = {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32), "text_mask": mask}
    for prefix in ("", "other_color_", "other_shape_"):
        batch[prefix + "text_ids"] = (rng.integers(5, 64, size=(b, length)) * mask).astype(np.int32)
        if prefix:
            batch[prefix + "text_mask"] = mask
    if config.data.regions.enabled:
        r, f = pipeline.num_regions(config.data), pipeline.region_feat_dim(config.data)
        batch["region_feats"] = rng.normal(size=(b, r, f)).astype(np.float32)
        corner = rng.uniform(0, 0.5, size=(b, r, 2))
        batch["region_boxes"] = np.concatenate([corner, corner + 0.5], axis=-1).astype(np.float32)
        batch["region_mask"] = np.ones((b, r), np.int32)
        batch["region_mask"][0, -2:] = 0
        batch["region_targets"] = rng.dirichlet(np.ones(pipeline.NUM_REGION_CLASSES), size=(b, r)).astype(np.float32)
    return batch


def one_step(config, devices):
    """Init + one train step on a mesh over `devices`; returns (loss, params as numpy, state, shardings, mesh)."""
    mesh = sharding.create_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.sharding.rules)
    model = build_model(config.model)
    task = get_task(config.task, model=model, config=config, mesh=mesh, tokenizer=FAKE_TOKENIZER)
    boxed = trainer.abstract_params(model, task, config.seed)
    tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps, nn.meta.unbox(boxed))
    state, shardings = trainer.create_train_state(model, task, tx, mesh, rules, config.seed, boxed)
    step = trainer.jit_train_step(task, tx, schedule, mesh, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = sharding.make_global_batch(random_batch(config), mesh)
        state, metrics = step(state, batch, jax.random.key(1))
    return float(metrics["loss"]), jax.device_get(state["params"]), state, shardings, mesh


MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)]
MESH_IDS = ["data8", "fsdp8", "d2f2t2"]


@pytest.mark.parametrize("model", ["clip", "vilt"])
@pytest.mark.parametrize("mesh", MESHES, ids=MESH_IDS)
def test_sharded_step_equals_single_device(load_config, mesh, model):
    config = small_clip_config(load_config) if model == "clip" else small_vilt_config(load_config)
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    loss_1, params_1, *_ = one_step(config, jax.devices()[:1])
    config.mesh.update(mesh)
    loss_n, params_n, *_ = one_step(config, jax.devices())
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_1), jax.tree.leaves(params_n)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("model", ["uniter", "vilbert", "fusion"])
def test_sharded_step_equals_single_device_fusion_models(load_config, model):
    config = small_region_config(load_config, model)
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    loss_1, params_1, *_ = one_step(config, jax.devices()[:1])
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    loss_n, params_n, *_ = one_step(config, jax.devices())
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_1), jax.tree.leaves(params_n)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_fsdp_parameter_is_sharded(load_config):
    config = small_clip_config(load_config)
    config.mesh.update(dict(data=1, fsdp=8, tensor=1))
    _, _, state, _, _ = one_step(config, jax.devices())
    sharded = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"]):
        spec = leaf.sharding.spec
        for dim, axes in enumerate(spec):
            if axes == "fsdp" or (isinstance(axes, tuple) and "fsdp" in axes):
                local = leaf.addressable_shards[0].data.shape
                assert local[dim] == leaf.shape[dim] // 8, jax.tree_util.keystr(path)
                sharded += 1
    assert sharded > 0, "no parameter is sharded on fsdp"


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs 4 devices but 8"):
        sharding.create_mesh(dict(data=2, fsdp=2, tensor=1))
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.create_mesh(dict(data=-1, fsdp=-1, tensor=1))
    mesh = sharding.create_mesh(dict(data=-1, fsdp=2, tensor=1))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="not divisible by the data-parallel degree 8"):
        sharding.check_batch_size(12, mesh)


def test_checkpoint_round_trip(load_config, tmp_path):
    config = small_clip_config(load_config)
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    _, _, state, shardings, _ = one_step(config, jax.devices())
    config.checkpoint.async_save = False
    ckpt = checkpoint.Checkpointer(str(tmp_path), config.checkpoint)
    ckpt.save(1, state, force=True)
    ckpt.close()
    restored = checkpoint.Checkpointer(str(tmp_path), config.checkpoint).restore(
        checkpoint.abstract_with_shardings(state, shardings))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_optimizer_state_shardings_see_through_frozen_parameters(load_config):
    # multi_transform (optimizer.freeze) puts MaskedNode placeholders in the moments; they must still shard.
    config = small_clip_config(load_config)
    config.optimizer.freeze = "^text_encoder/"
    config.mesh.update(dict(data=1, fsdp=8, tensor=1))
    _, _, state, _, _ = one_step(config, jax.devices())
    params = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}
    checked = 0
    for path, moment in jax.tree_util.tree_leaves_with_path(state["opt_state"]):
        key = jax.tree_util.keystr(path)
        owner = [p for p in params if key.endswith(p) and params[p].shape == moment.shape]
        if owner:
            assert moment.sharding == params[max(owner, key=len)].sharding, key
            checked += 1
    assert checked > 0
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state["opt_state"]))
