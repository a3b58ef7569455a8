"""Gradient accumulation (mmjax/accumulation.py): k = 4 GradCache micro-batches give a tiny CLIP's large-batch
loss and gradients (softmax, sigmoid, VSE++'s hardest-negative triplet) on 1 device and on 8-device meshes;
plain accumulation averages micro-batch gradients (exactly the full-batch gradient for a per-example mean loss);
strided micro-batches stay on their devices; a batch that does not split fails in one line.

The suite runs with 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS before jax is imported).
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import accumulation, sharding
from mmjax.models import build_model
from mmjax.tasks.contrastive import ContrastiveTask

assert jax.device_count() == 8, "tests/conftest.py must set 8 fake CPU devices before jax is imported"

K = 4  # micro-batches
B = 32  # global batch: B / K = 8 rows per micro-batch, one per device on an 8-way data-parallel mesh
IMAGE, LENGTH, VOCAB = 16, 8, 64
TOL = 1e-5


def compiled(fn, *args, **jit_kwargs):
    """fn jitted and compiled for args at XLA's lowest CPU optimisation level: these tests are dominated by
    compile time, which that roughly halves (results agree to float rounding)."""
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(fn, **jit_kwargs).lower(*args).compile(options)


def tiny_clip_model_config(loss: str) -> ml_collections.ConfigDict:
    """configs/clip.py:tiny's model section shrunk further (dims divide by fsdp=4), data-dependent fields filled
    in; written out rather than loaded, as loading configs/clip.py imports the data pipeline (~7 s)."""
    c = ml_collections.ConfigDict(dict(
        name="clip", loss=loss, embed_dim=16, dtype="float32", remat=False,
        image=dict(image_size=IMAGE, pool="cls", norm="pre", ln_pre=True, patch_size=8, width=32, depth=1, heads=2,
                   mlp_dim=64),
        text=dict(max_len=LENGTH, causal=True, pool="eos", norm="pre", vocab_size=VOCAB, width=32, depth=1, heads=2,
                  mlp_dim=64)))
    if loss == "triplet_hardest":  # VSE++ with DeViSE's fixed text space: no text projection
        c.update(dict(margin=0.2, project_text=False, embed_dim=c.text.width))
    return c


def contrastive_task(model, mesh, loss_impl="auto"):
    """The ContrastiveTask for the model (loss_impl: 'dense' global losses, or 'auto' = shard_map'd losses on a
    mesh that splits the batch); it must offer GradCache's embed / loss_from_outputs."""
    config = ml_collections.ConfigDict(dict(task=dict(name="contrastive", loss_impl=loss_impl)))
    task = ContrastiveTask(model, config, types.SimpleNamespace(model_keys=()), None, mesh)
    assert callable(getattr(task, "embed", None)) and callable(getattr(task, "loss_from_outputs", None))
    return task


def random_batch(seed=0):
    """A random CLIP batch of B with right-padded captions and two duplicated captions (rows 3 and 17: not
    negatives of each other for the ranking losses, in different micro-batches)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, LENGTH + 1, size=B)
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
    ids = (rng.integers(5, VOCAB, size=(B, LENGTH)) * mask).astype(np.int32)
    ids[17], mask[17] = ids[3], mask[3]
    return {"image": rng.normal(size=(B, IMAGE, IMAGE, 3)).astype(np.float32), "text_ids": ids, "text_mask": mask}


_PARAMS: dict = {}


def init_params(model_config):
    """The model's initial parameters as numpy (the same values on every mesh), boxed with their logical axes."""
    key = model_config.loss
    if key not in _PARAMS:
        model = build_model(model_config)
        batch = {k: jnp.asarray(v[:2]) for k, v in random_batch().items()}
        init = compiled(lambda: model.init({"params": jax.random.key(0)}, batch)["params"])  # eager: ~10 s
        _PARAMS[key] = jax.device_get(init())
    return _PARAMS[key]


def leaf_differences(got, want):
    """(worst leaf error relative to max(1, the leaf's largest |value|), the largest absolute difference)."""
    worst_rel, worst_abs = 0.0, 0.0
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = float(np.abs(a - b).max())
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(1.0, float(np.abs(a).max())))
    return worst_rel, worst_abs


_LARGE: dict = {}


def large_batch(loss):
    """((loss, metrics), grads) of the whole batch in one piece (value_and_grad of task.loss) on 1 device, as
    numpy: the reference for accumulation on every mesh (test_sharding.py shows meshes agree on it)."""
    if loss not in _LARGE:
        config = tiny_clip_model_config(loss)
        task = contrastive_task(build_model(config), None)
        args = (nn.meta.unbox(init_params(config)), jax.tree.map(jnp.asarray, random_batch()), jax.random.key(1))
        _LARGE[loss] = jax.device_get(compiled(jax.value_and_grad(task.loss, has_aux=True), *args)(*args))
    return _LARGE[loss]


def accumulated(loss, mesh_sizes, loss_impl="auto"):
    """((loss, metrics), grads) from K accumulated micro-batches, jitted on 1 device (mesh_sizes None) or on an
    8-device mesh (params sharded by their logical axes, the batch over data x fsdp), as numpy."""
    config = tiny_clip_model_config(loss)
    model = build_model(config)
    boxed = init_params(config)
    params = nn.meta.unbox(boxed)

    def fn(p, b, r):
        return accumulation.loss_and_grads(task, p, b, r, K)

    if mesh_sizes is None:
        task = contrastive_task(model, None)
        args = (params, jax.tree.map(jnp.asarray, random_batch()), jax.random.key(1))
        return jax.device_get(compiled(fn, *args)(*args))
    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(tensor=1, **mesh_sizes)))
    rules = sharding.logical_rules()
    task = contrastive_task(model, mesh, loss_impl)
    param_shardings = sharding.logical_shardings(boxed, mesh, rules)
    replicated = sharding.replicated(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        args = (jax.device_put(params, param_shardings), sharding.make_global_batch(random_batch(), mesh),
                jax.random.key(1))
        step = compiled(fn, *args, in_shardings=(param_shardings, sharding.batch_sharding(mesh), replicated),
                        out_shardings=((replicated, replicated), param_shardings))
        return jax.device_get(step(*args))


def check_equal(acc, large):
    """Loss, metrics and gradients agree to TOL (relative for leaves larger than 1); prints the differences."""
    (loss_a, metrics_a), grads_a = acc
    (loss_l, metrics_l), grads_l = large
    np.testing.assert_allclose(loss_a, loss_l, rtol=TOL, atol=TOL)
    assert metrics_a.keys() == metrics_l.keys()
    for key in metrics_l:  # GradCache's metrics are the large batch's own (in-batch accuracy over all B)
        np.testing.assert_allclose(metrics_a[key], metrics_l[key], rtol=TOL, atol=TOL, err_msg=key)
    rel, absolute = leaf_differences(grads_a, grads_l)
    assert rel <= TOL, f"accumulated gradients differ from the large batch's by {rel:.3g} (abs {absolute:.3g})"
    print(f"loss diff {abs(float(loss_a) - float(loss_l)):.3g}; grads max rel {rel:.3g} abs {absolute:.3g}")


# SigLIP's sigmoid loss runs on the data=2 x fsdp=4 mesh only (against the same single-device reference): each
# case costs ~5 s of compilation.
@pytest.mark.parametrize("loss", ["softmax", "triplet_hardest"])
def test_gradcache_equals_large_batch_single_device(loss):
    check_equal(accumulated(loss, None), large_batch(loss))


@pytest.mark.parametrize("loss,mesh,impl", [("softmax", dict(data=8, fsdp=1), "dense"),
                                           ("sigmoid", dict(data=2, fsdp=4), "auto")],
                         ids=["softmax-data8-dense", "sigmoid-data2fsdp4-sharded"])
def test_gradcache_equals_large_batch_on_mesh(loss, mesh, impl):
    check_equal(accumulated(loss, mesh, impl), large_batch(loss))


class LinearTask:
    """A task without embed: mean squared error of a linear model (a per-example mean), an MAE metric."""

    def loss(self, params, batch, rng):
        del rng
        err = batch["x"] @ params["w"] + params["b"] - batch["y"]
        return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}


def linear_problem():
    """LinearTask's parameters and a batch of B."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    batch = {"x": jnp.asarray(rng.normal(size=(B, 5)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(B, 3)), jnp.float32)}
    return params, batch


def test_one_step_is_value_and_grad():
    task, (params, batch), key = LinearTask(), linear_problem(), jax.random.key(0)
    want = jax.value_and_grad(task.loss, has_aux=True)(params, batch, key)
    got = accumulation.loss_and_grads(task, params, batch, key, 1)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_plain_accumulation_is_mean_of_microbatch_gradients():
    task, (params, batch), key = LinearTask(), linear_problem(), jax.random.key(0)
    (loss, metrics), grads = jax.jit(lambda p, b: accumulation.loss_and_grads(task, p, b, key, K))(params, batch)

    grad_fn = jax.value_and_grad(task.loss, has_aux=True)
    per_micro = [grad_fn(params, {k: v[i::K] for k, v in batch.items()}, key) for i in range(K)]  # strided rows
    mean = jax.tree.map(lambda *xs: sum(xs) / K, *per_micro)
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(((loss, metrics), grads))):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    # A per-example mean over equal micro-batches: the full batch's loss and gradient.
    (loss_full, _), grads_full = grad_fn(params, batch, key)
    np.testing.assert_allclose(loss, loss_full, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_full), jax.tree.leaves(grads)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


class PairTask:
    """A task with embed / loss_from_outputs: per-example embeddings, a parameter-only scalar (like logit_scale),
    a [b, b] pairwise output (like logits_per_image), and an InfoNCE-style loss over the whole batch."""

    def __init__(self, read: str = "z", dropout: bool = False):
        self.read = read  # the output loss_from_outputs takes the similarities from
        self.dropout = dropout

    def embed(self, params, batch, rng):
        z = jnp.tanh(batch["x"] @ params["w"])
        if self.dropout:
            z = z * 2.0 * jax.random.bernoulli(rng, 0.5, z.shape)
        return {"z": z, "scale": jnp.exp(params["s"]), "pairwise": z @ z.T}

    def loss_from_outputs(self, out, batch):
        sim = out["pairwise"] if self.read == "pairwise" else out["z"] @ out["z"].T
        logits = out["scale"] * sim - 1e9 * jnp.eye(sim.shape[0])
        loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.sum(logits * batch["t"], axis=1))
        return loss, {"scale": out["scale"]}

    def loss(self, params, batch, rng):
        return self.loss_from_outputs(self.embed(params, batch, rng), batch)


def test_gradcache_shared_outputs_dropout_and_pairwise_outputs():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32), "s": jnp.asarray(0.5, jnp.float32)}
    batch = {"x": jnp.asarray(rng.normal(size=(B, 5)), jnp.float32),
             "t": jnp.asarray(np.roll(np.eye(B), 1, axis=1), jnp.float32)}  # targets: the next row, any micro-batch
    task, key = PairTask(), jax.random.key(0)
    (loss, metrics), grads = jax.jit(lambda p: accumulation.loss_and_grads(task, p, batch, key, K))(params)
    (loss_l, metrics_l), grads_l = jax.jit(jax.value_and_grad(task.loss, has_aux=True))(params, batch, key)
    assert abs(float(grads_l["s"])) > 1e-3
    np.testing.assert_allclose(loss, loss_l, rtol=1e-6)
    np.testing.assert_allclose(metrics["scale"], metrics_l["scale"], rtol=1e-6)
    np.testing.assert_allclose(grads["s"], grads_l["s"], rtol=1e-5)  # not k times too large
    np.testing.assert_allclose(grads["w"], grads_l["w"], rtol=1e-5, atol=1e-6)

    # With dropout: micro-batch i draws fold_in(rng, i), the same mask in both passes, so GradCache is the exact
    # gradient of the loss over those K forwards.
    task = PairTask(dropout=True)

    def direct(p):
        outs = [task.embed(p, {k: v[i::K] for k, v in batch.items()}, jax.random.fold_in(key, i)) for i in range(K)]
        z = jnp.stack([o["z"] for o in outs]).swapaxes(0, 1).reshape(B, -1)  # back in the batch's row order
        return task.loss_from_outputs({"z": z, "scale": outs[0]["scale"]}, batch)

    (loss, _), grads = jax.jit(lambda p: accumulation.loss_and_grads(task, p, batch, key, K))(params)
    (loss_d, _), grads_d = jax.jit(jax.value_and_grad(direct, has_aux=True))(params)
    np.testing.assert_allclose(loss, loss_d, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_d), jax.tree.leaves(grads)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="'pairwise' depends on which examples share a micro-batch"):
        jax.eval_shape(lambda p: accumulation.loss_and_grads(PairTask(read="pairwise"), p, batch, key, K), params)


def test_strided_microbatches_stay_on_their_devices():
    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
    rows = np.arange(B * 3, dtype=np.int32).reshape(B, 3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules()):
        batch = sharding.make_global_batch({"rows": rows}, mesh)
        micro = jax.jit(lambda b: accumulation.split_microbatches(b, K))(batch)["rows"]
        back = jax.jit(accumulation.merge_microbatches)({"rows": micro})["rows"]
    np.testing.assert_array_equal(np.asarray(micro), np.stack([rows[i::K] for i in range(K)]))
    np.testing.assert_array_equal(np.asarray(back), rows)
    # Every device holds B_local / K rows of every micro-batch, all of them rows it held already: no data moved.
    assert micro.sharding.shard_shape(micro.shape) == (K, B // K // 8, 3)
    held = {s.device: set(np.asarray(s.data)[:, 0] // 3) for s in batch["rows"].addressable_shards}
    for shard in micro.addressable_shards:
        assert set(np.asarray(shard.data)[..., 0].ravel() // 3) <= held[shard.device]
    assert back.sharding.is_equivalent_to(batch["rows"].sharding, 2)


def test_bad_accum_steps_is_one_line():
    mesh = sharding.create_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, tensor=1)))
    with pytest.raises(ValueError, match=r"^train.batch_size=30 with train.accum_steps=4: .* degree 1 ") as e:
        accumulation.check_accumulation(30, 4, None)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"train.batch_size=32 with train.accum_steps=8: .* degree 8 .*multiple "
                                         r"of 64$"):
        accumulation.check_accumulation(32, 8, mesh)
    with pytest.raises(ValueError, match="train.accum_steps must be a positive integer; got 0"):
        accumulation.check_accumulation(32, 0, mesh)
    accumulation.check_accumulation(64, 8, mesh)
    accumulation.check_accumulation(32, 4, mesh)
    # The step checks too, against the mesh in context (here under jit: the batch's size is static).
    task = LinearTask()
    params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros((3,))}
    batch = {"x": jnp.zeros((30, 5)), "y": jnp.zeros((30, 3))}
    with pytest.raises(ValueError, match="train.batch_size=30 with train.accum_steps=4"):
        jax.jit(lambda p, b: accumulation.loss_and_grads(task, p, b, jax.random.key(0), 4))(params, batch)
    batch = {"x": jnp.zeros((32, 5)), "y": jnp.zeros((32, 3))}
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="train.accum_steps=8: .* degree 8"):
        jax.jit(lambda p, b: accumulation.loss_and_grads(task, p, b, jax.random.key(0), 8))(params, batch)
