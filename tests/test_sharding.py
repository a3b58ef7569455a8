"""Sharded training equals single-device training (CLIP contrastive, and with DeViSE's / VSE++'s ranking losses;
ViLT, UNITER, ViLBERT, VisualBERT, LXMERT, OSCAR and a fusion model with MLM + ITM (+ WPA, MRFR, MRC); the
captioner and CoCa's contrastive + captioning): the same loss and gradients, and the same optimizer update for the
same gradients; a dropped all-gather is caught; parameters are really sharded; checkpoints round-trip.

The suite runs with 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS before jax is imported).
"""

import types
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from mmjax import checkpoint, losses, optim, sharding
from mmjax import state as state_lib
from mmjax import train as trainer
from mmjax.data import pipeline
from mmjax.models import build_model, layers
from mmjax.tasks import get_task
from mmjax.tasks.contrastive import ContrastiveTask

assert jax.device_count() == 8, "tests/conftest.py must set 8 fake CPU devices before jax is imported"


def small_clip_config(load_config):
    """A CLIP small enough for tests whose dims divide by 8 (fsdp) and 2 (tensor)."""
    c = load_config("clip.py", "tiny")
    c.model.image.update(dict(patch_size=8, width=64, depth=2, heads=2, mlp_dim=128))
    c.model.text.update(dict(width=64, depth=2, heads=2, mlp_dim=128, vocab_size=64))
    c.model.embed_dim = 32
    c.data.image_size, c.data.max_len = 32, 8
    c.train.batch_size = 16
    c.optimizer.warmup_steps = 0
    return c


def small_vilt_config(load_config):
    """A ViLT small enough for tests whose dims divide by 8 (fsdp) and 2 (tensor)."""
    c = load_config("vilt.py", "tiny")
    c.model.update(dict(patch_size=8, width=64, depth=2, heads=2, mlp_dim=128, vocab_size=64))
    c.data.image_size, c.data.max_len = 32, 8
    c.train.batch_size = 16
    c.optimizer.warmup_steps = 0
    return c


def small_region_config(load_config, name):
    """UNITER / ViLBERT / fusion, small, dims divisible by 8 and 2; region models use the embedded region layout."""
    c = load_config(f"{name}.py")
    if name == "fusion":
        c.model.towers.image.update(dict(patch_size=8, width=64, depth=1, heads=2, mlp_dim=128))
        c.model.towers.text.update(dict(width=64, depth=1, heads=2, mlp_dim=128, vocab_size=64))
        c.model.fusion_args.update(dict(depth=1, mlp_dim=128))
        c.data.image_size = 32
    else:
        depth = {"vilbert": dict(text_depth=1, co_depth=1), "lxmert": dict(l_layers=1, r_layers=1, x_layers=1)
                 }.get(name, dict(depth=2))
        c.model.update(dict(width=64, heads=2, mlp_dim=128, vocab_size=64, **depth))
    c.data.max_len = 8
    c.train.batch_size = 16
    c.optimizer.warmup_steps = 0
    return c


# Special token ids as the matching task needs them (the real tokenizer is not needed for a random batch).
FAKE_TOKENIZER = types.SimpleNamespace(pad_id=0, cls_id=1, sep_id=2, mask_id=3, unk_id=4, vocab_size=64)


def random_batch(config, meta, seed=0):
    """A random batch with every key the config's task may read (sizes from the data's metadata)."""
    rng = np.random.default_rng(seed)
    b, s, length = config.train.batch_size, config.data.image_size, config.data.max_len
    lengths = rng.integers(3, length + 1, size=b)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    batch = {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32), "text_mask": mask}
    for prefix in ("", "other_color_", "other_shape_"):
        batch[prefix + "text_ids"] = (rng.integers(5, 64, size=(b, length)) * mask).astype(np.int32)
        if prefix:
            batch[prefix + "text_mask"] = mask
    if "audio" in meta.model_keys:
        n = pipeline.sources.audio_samples(config.data)
        batch["audio_length"] = rng.integers(n // 4, n + 1, size=b).astype(np.int32)
        batch["audio"] = (0.1 * rng.normal(size=(b, n)) * (np.arange(n)[None] < batch["audio_length"][:, None])
                          ).astype(np.float32)
    if config.data.regions.enabled:
        r, f = meta.num_regions, meta.region_feature_dim
        batch["region_feats"] = rng.normal(size=(b, r, f)).astype(np.float32)
        corner = rng.uniform(0, 0.5, size=(b, r, 2))
        batch["region_boxes"] = np.concatenate([corner, corner + 0.5], axis=-1).astype(np.float32)
        batch["region_mask"] = np.ones((b, r), np.int32)
        batch["region_mask"][0, -2:] = 0
        batch["region_targets"] = rng.dirichlet(np.ones(meta.region_classes), size=(b, r)).astype(np.float32)
    if "tags_text_ids" in meta.model_keys:  # OSCAR's object tags: [CLS] tag [SEP]
        tags = np.zeros((b, length), np.int32)
        tags[:, 0], tags[:, 1], tags[:, 2] = 1, rng.integers(5, 8, size=b), 2
        batch["tags_text_ids"], batch["tags_text_mask"] = tags, (tags > 0).astype(np.int32)
    return batch


class Run(NamedTuple):
    """A model, task and optimizer set up on a mesh, with its freshly initialised (sharded) state."""
    config: Any
    meta: Any
    mesh: Any
    rules: Any
    task: Any
    tx: Any
    schedule: Any
    state: dict
    shardings: dict


def setup(config, devices, task_cls=None) -> Run:
    """Model, task, optimizer and sharded initial state on a mesh over `devices` (task_cls overrides the task)."""
    mesh = sharding.create_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.sharding.rules)
    meta = pipeline.dataset_meta(config.data, FAKE_TOKENIZER)
    state_lib.resolve_model_config(config, meta)
    model = build_model(config.model)
    kwargs = dict(model=model, config=config, meta=meta, tokenizer=FAKE_TOKENIZER, mesh=mesh)
    task = task_cls(**kwargs) if task_cls else get_task(config.task, **kwargs)
    shapes = pipeline.batch_shapes(config.data, meta)
    boxed = state_lib.abstract_params(model, shapes, config.seed)
    tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps, nn.meta.unbox(boxed))
    state, shardings = state_lib.create_train_state(model, shapes, tx, mesh, rules, config.seed, boxed)
    return Run(config, meta, mesh, rules, task, tx, schedule, state, shardings)


def loss_and_grads(run: Run) -> tuple[float, Any]:
    """The task's loss and its gradients at the initial parameters, on the run's mesh (gradients as numpy)."""
    fn = jax.jit(jax.value_and_grad(run.task.loss, has_aux=True),
                 in_shardings=(run.shardings["params"], sharding.batch_sharding(run.mesh),
                               sharding.replicated(run.mesh)),
                 out_shardings=((sharding.replicated(run.mesh), sharding.replicated(run.mesh)),
                                run.shardings["params"]))
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        batch = sharding.make_global_batch(random_batch(run.config, run.meta), run.mesh)
        (loss, _), grads = fn(run.state["params"], batch, jax.random.key(1))
    return float(loss), jax.device_get(grads)


def optimizer_update(run: Run, grads: Any) -> Any:
    """The optimizer's first update for the given gradients, computed on the run's mesh (as numpy)."""
    fn = jax.jit(run.tx.update, in_shardings=(run.shardings["params"], run.shardings["opt_state"],
                                              run.shardings["params"]),
                 out_shardings=(run.shardings["params"], run.shardings["opt_state"]))
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        grads = jax.device_put(grads, run.shardings["params"])
        updates, _ = fn(grads, run.state["opt_state"], run.state["params"])
    return jax.device_get(updates)


def train_step(run: Run) -> tuple[Run, dict]:
    """One step of the trainer's own jitted step; returns the run with the new state, and the step's metrics."""
    step = trainer.jit_train_step(run.task, run.tx, run.schedule, run.mesh, run.shardings)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        batch = sharding.make_global_batch(random_batch(run.config, run.meta), run.mesh)
        state, metrics = step(run.state, batch, jax.random.key(1))
    return run._replace(state=state), jax.device_get(metrics)


def gradient_mismatches(grads_n: Any, grads_1: Any, tol: float = 1e-5, zero: float = 1e-6) -> list[str]:
    """Leaves whose sharded gradient differs from the single-device one by more than `tol` of the leaf's scale.

    The scale is the leaf's largest single-device |gradient|, so the tolerance is relative to what that parameter
    actually receives: a reduction in another order moves an element by ~1e-6 of it, a missing all-gather or psum
    by far more. Leaves below `zero` x the largest gradient of the model are analytically zero (attention's key
    bias: softmax ignores a shift shared by all keys) and hold only rounding noise; for them both sides must stay
    below that bound. (Comparing parameters after an Adam step instead is ill-conditioned: Adam's first update is
    lr * g / (|g| + eps), which turns such noise, or a 1e-7 change of any component near eps, into up to lr.)
    """
    leaves_1 = jax.tree_util.tree_leaves_with_path(grads_1)
    top = max(float(np.abs(np.asarray(a)).max()) for _, a in leaves_1)
    bad = []
    for (path, a), b in zip(leaves_1, jax.tree.leaves(grads_n)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale, err = float(np.abs(a).max()), float(np.abs(a - b).max())
        if scale < zero * top:
            if float(np.abs(b).max()) >= zero * top:
                bad.append(f"{jax.tree_util.keystr(path)}: zero on one device, {np.abs(b).max():.3g} sharded")
        elif err > tol * scale:
            bad.append(f"{jax.tree_util.keystr(path)}: max |diff| {err:.3g} > {tol:g} x scale {scale:.3g}")
    return bad


def check_sharded_equals_single(config, mesh_sizes, task_cls=None):
    """Loss and gradients on a mesh of 8 equal those on 1 device; the Adam update of the same gradients too."""
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    single = setup(config, jax.devices()[:1], task_cls)
    loss_1, grads_1 = loss_and_grads(single)
    config.mesh.update(mesh_sizes)
    sharded = setup(config, jax.devices(), task_cls)
    loss_n, grads_n = loss_and_grads(sharded)
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5, atol=1e-6)
    bad = gradient_mismatches(grads_n, grads_1)
    assert not bad, "sharded gradients differ from single-device ones:\n" + "\n".join(bad[:10])
    # The optimizer applied identically: the same gradients in give the same update out, on either mesh.
    update_1, update_n = optimizer_update(single, grads_1), optimizer_update(sharded, grads_1)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(update_1), jax.tree.leaves(update_n)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-9, err_msg=jax.tree_util.keystr(path))


MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)]
MESH_IDS = ["data8", "fsdp8", "d2f2t2"]


@pytest.mark.parametrize("model", ["clip", "vilt"])
@pytest.mark.parametrize("mesh", MESHES, ids=MESH_IDS)
def test_sharded_step_equals_single_device(load_config, mesh, model):
    config = small_clip_config(load_config) if model == "clip" else small_vilt_config(load_config)
    check_sharded_equals_single(config, mesh)


@pytest.mark.parametrize("model", ["uniter", "vilbert", "fusion", "visualbert", "lxmert", "oscar"])
def test_sharded_step_equals_single_device_fusion_models(load_config, model):
    check_sharded_equals_single(small_region_config(load_config, model), dict(data=2, fsdp=2, tensor=2))


def test_sharded_step_equals_single_device_ranking_loss(load_config):
    """VSE++'s hardest-negative triplet loss without a text projection (DeViSE's text side: the text tower's pooled
    features are the targets); the hinge and triplet sums share its code path but the max."""
    config = small_clip_config(load_config)
    config.model.update(dict(loss="triplet_hardest", margin=0.2, project_text=False,
                             embed_dim=config.model.text.width))
    check_sharded_equals_single(config, dict(data=2, fsdp=2, tensor=2))


def small_caption_config(load_config, name):
    """The captioner or CoCa, small, dims divisible by 8 and 2 (the image tower at 64 wide like the text)."""
    c = load_config(f"{name}.py")
    c.model.image.update(dict(patch_size=8, width=64, depth=1, heads=2, mlp_dim=128))
    c.model.text.update(dict(width=64, depth=1, heads=2, mlp_dim=128, vocab_size=64))
    if name == "coca":
        c.model.embed_dim = 32
    c.data.image_size, c.data.max_len = 32, 8
    c.train.batch_size = 16
    c.optimizer.warmup_steps = 0
    return c


@pytest.mark.parametrize("model", ["caption", "coca"])
def test_sharded_step_equals_single_device_captioners(load_config, model):
    check_sharded_equals_single(small_caption_config(load_config, model), dict(data=2, fsdp=2, tensor=2))


def _per_device_contrastive(task, params, batch, rng, local_loss):
    """The contrastive loss computed per device under shard_map by `local_loss(zimg, ztxt, scale)`."""
    out = task.model.apply({"params": params}, {k: batch[k] for k in task.batch_keys}, train=True,
                           rngs={"dropout": rng})
    rows = PartitionSpec(sharding.BATCH_AXES)
    loss = jax.shard_map(local_loss, mesh=task.mesh, in_specs=(rows, rows, PartitionSpec()),
                         out_specs=PartitionSpec())(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    return loss, {}


class LocalOnlyContrastiveTask(ContrastiveTask):
    """A data-parallel bug, on purpose: each device contrasts only its own rows (the all-gather of the embeddings
    dropped), then the per-device losses are averaged. Equal to the real loss on one device only."""

    def loss(self, params, batch, rng):
        def local(zimg, ztxt, scale):
            return jax.lax.pmean(losses.softmax_contrastive_loss(zimg, ztxt, scale), sharding.BATCH_AXES)

        return _per_device_contrastive(self, params, batch, rng, local)


class GatherWithoutGradContrastiveTask(ContrastiveTask):
    """Another one (open_clip's gather_with_grad=False): the other devices' embeddings are gathered without their
    gradient. The loss value is exactly the global one; only the gradients are wrong."""

    def loss(self, params, batch, rng):
        def local(zimg, ztxt, scale):
            n, axes = zimg.shape[0], sharding.BATCH_AXES
            offset = jax.lax.axis_index(axes) * n

            def gather(z):  # every device's rows, with a gradient for the local ones only
                full = jax.lax.all_gather(jax.lax.stop_gradient(z), axes, tiled=True)
                return jax.lax.dynamic_update_slice_in_dim(full, z, offset, axis=0)

            labels = offset + jnp.arange(n)
            i2t = optax.softmax_cross_entropy_with_integer_labels(scale * zimg @ gather(ztxt).T, labels)
            t2i = optax.softmax_cross_entropy_with_integer_labels(scale * ztxt @ gather(zimg).T, labels)
            return jax.lax.pmean(0.5 * (jnp.mean(i2t) + jnp.mean(t2i)), axes)

        return _per_device_contrastive(self, params, batch, rng, local)


@pytest.mark.parametrize("task_cls, caught_by", [(LocalOnlyContrastiveTask, "Not equal to tolerance"),
                                                 (GatherWithoutGradContrastiveTask, "sharded gradients differ")])
def test_equality_check_catches_distributed_loss_bugs(load_config, task_cls, caught_by):
    # The comparison above must be able to fail: both classic data-parallel contrastive bugs are caught, the first
    # by the loss, the second (whose loss value is right) by the gradients.
    with pytest.raises(AssertionError, match=caught_by):
        check_sharded_equals_single(small_clip_config(load_config), dict(data=8, fsdp=1, tensor=1),
                                    task_cls=task_cls)


def test_fsdp_parameter_is_sharded(load_config):
    config = small_clip_config(load_config)
    config.mesh.update(dict(data=1, fsdp=8, tensor=1))
    state = train_step(setup(config, jax.devices()))[0].state
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
    run, _ = train_step(setup(config, jax.devices()))
    state, shardings = run.state, run.shardings
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
    state = train_step(setup(config, jax.devices()))[0].state
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


def small_audio_config(load_audio_config, name):
    """An audio config (spoken_easy_vqa/tiny) small enough for tests, dims divisible by 8 (fsdp) and 2 (tensor)."""
    c = load_audio_config(f"{name}.py")
    towers = c.model.towers
    towers.audio.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    for other in ("image", "text"):
        if other in towers:
            towers[other].update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    if "image" in towers:
        towers.image.patch_size = 16
    if "text" in towers:
        towers.text.vocab_size = 64
    if c.model.name == "fusion":
        c.model.fusion_args.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
    else:
        c.model.embed_dim = 16
    c.data.image_size, c.data.max_len, c.data.audio.max_seconds = 32, 8, 0.5
    c.train.batch_size = 16
    c.optimizer.warmup_steps = 0
    return c


@pytest.mark.parametrize("name", ["audio_image", "audio_text", "audio_visual"])
def test_sharded_step_equals_single_device_audio(load_audio_config, name):
    """SpecAugment's masks and the on-device log-mel included: the same loss and gradients on a 2x2x2 mesh."""
    check_sharded_equals_single(small_audio_config(load_audio_config, name), dict(data=2, fsdp=2, tensor=2))


def test_every_parameter_is_split_on_fsdp_where_a_dimension_allows():
    """Rules first; a dimension the mesh does not divide (a 30,521-row table over tensor=2) stays whole; a leaf the
    rules leave whole on fsdp is split on its largest free dimension fsdp divides, never a scan's layers axis."""
    class Tables(nn.Module):
        @nn.compact
        def __call__(self, x):
            param = lambda name, axes, shape: self.param(  # noqa: E731
                name, layers.partitioned(nn.initializers.zeros, axes), shape)
            param("words", ("vocab", "embed"), (30521, 64))
            param("bias", ("vocab",), (30521,))
            param("hidden", ("mlp",), (256,))
            param("qkv_bias", ("heads", "kv"), (12, 64))
            param("stacked_bias", ("layers", "kv"), (12, 6))
            return x

    boxed = jax.eval_shape(Tables().init, jax.random.key(0), jnp.zeros(1))["params"]
    config = sharding.default_mesh_config()
    config.update(dict(data=1, fsdp=4, tensor=2))
    specs = jax.tree.map(lambda s: tuple(s.spec), sharding.logical_shardings(
        boxed, sharding.create_mesh(config), sharding.DEFAULT_RULES))
    assert specs == {"words": (None, "fsdp"), "bias": (None,), "hidden": ("tensor",),
                     "qkv_bias": ("tensor", "fsdp"), "stacked_bias": (None, None)}
