"""mmjax.sharded_losses (issue 16): the shard_map softmax / chunked sigmoid losses and their batch metrics equal the
dense losses.* on the same global batch (values and gradients) on meshes that split the batch over data, fsdp or
both, with tensor replicas and on one device; the contrastive task's loss_impl switch; the per-device memory
claim, from XLA's compiled memory analysis.

The suite runs with 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS before jax is imported).
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax import losses, sharded_losses, sharding
from mmjax.models import CLIP
from mmjax.tasks.contrastive import ContrastiveTask

assert jax.device_count() == 8, "tests/conftest.py must set 8 fake CPU devices before jax is imported"

# (data, fsdp, tensor): the batch over data only, over both batch axes, with tensor replicas, and on one device.
MESHES = [(8, 1, 1), (2, 4, 1), (4, 1, 2), (1, 1, 1)]
MESH_IDS = ["data8", "d2f4", "d4t2", "one"]
B, E = 16, 8  # B_local = 2 on 8 devices


def _mesh(data: int, fsdp: int, tensor: int) -> Mesh:
    n = data * fsdp * tensor
    return Mesh(np.asarray(jax.devices()[:n]).reshape(data, fsdp, tensor), sharding.MESH_AXES)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embeds():
    """Unit-norm pairs, partly aligned (so top-1 is often right and the loss is not all noise) with quirks: an
    identical (image, text) pair at rows 2 and 5 (exact ties both ways), a repeated text at rows 9 and 12."""
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(B, E)))
    y = _unit(x + 0.7 * rng.normal(size=(B, E)))
    x[5], y[5] = x[2], y[2]
    y[12] = y[9]
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


SCALE, BIAS = jnp.float32(100.0), jnp.float32(-10.0)


def _assert_close(got, want, what):
    """Equal to 1e-5 relative to the leaf's largest |value| (float32 sums in another order differ by ~1e-7)."""
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(w).max())),
                                   err_msg=f"{what}, leaf {i}")


@pytest.mark.parametrize("sizes", MESHES, ids=MESH_IDS)
def test_sharded_losses_equal_dense(sizes):
    mesh = _mesh(*sizes)
    x, y = _embeds()
    rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    xs, ys = jax.device_put(x, rows), jax.device_put(y, rows)

    want = jax.value_and_grad(losses.softmax_contrastive_loss, argnums=(0, 1, 2))(x, y, SCALE)
    got = jax.jit(jax.value_and_grad(
        lambda a, b, t: sharded_losses.softmax_contrastive_loss_sharded(a, b, t, mesh), argnums=(0, 1, 2)))(
            xs, ys, SCALE)
    assert got[0].dtype == jnp.float32 and got[0].shape == ()
    _assert_close(got, want, "softmax")

    want = jax.value_and_grad(losses.sigmoid_contrastive_loss, argnums=(0, 1, 2, 3))(x, y, SCALE, BIAS)
    got = jax.jit(jax.value_and_grad(
        lambda a, b, t, c: sharded_losses.sigmoid_contrastive_loss_chunked(a, b, t, c, mesh), argnums=(0, 1, 2, 3)))(
            xs, ys, SCALE, BIAS)
    _assert_close(got, want, "sigmoid")

    # Top-1 with exact ties (rows 2 and 5) resolved to the lower index, as the dense argmax does.
    want = jax.device_get(losses.contrastive_metrics(x, y))
    assert 0.0 < want["i2t_acc"] < 1.0 and 0.0 < want["t2i_acc"] < 1.0
    assert jax.device_get(jax.jit(lambda a, b: sharded_losses.contrastive_metrics_sharded(a, b, mesh))(xs, ys)) == want


def test_unsharded_inputs_and_bf16():
    """Inputs not yet split over the mesh are split by shard_map; bfloat16 embeddings are computed in float32."""
    mesh = _mesh(2, 4, 1)
    x, y = (z.astype(jnp.bfloat16) for z in _embeds())

    @jax.jit
    def both(x, y):
        return ((sharded_losses.softmax_contrastive_loss_sharded(x, y, SCALE, mesh),
                 sharded_losses.sigmoid_contrastive_loss_chunked(x, y, SCALE, BIAS, mesh)),
                (losses.softmax_contrastive_loss(x, y, SCALE), losses.sigmoid_contrastive_loss(x, y, SCALE, BIAS)))

    got, want = both(x, y)
    assert all(g.dtype == jnp.float32 for g in got)
    _assert_close(got, want, "bf16")


# ------------------------------------------------------------------------------------------ the task's switch

WIDTH, L = 16, 6
VIT_KW = dict(patch_size=4, width=WIDTH, depth=1, heads=2, mlp_dim=32)
TEXT_KW = dict(vocab_size=50, max_len=L, width=WIDTH, depth=1, heads=2, mlp_dim=32)
META = types.SimpleNamespace(model_keys=())


def _config(loss_impl=None):
    task = dict(name="contrastive") if loss_impl is None else dict(name="contrastive", loss_impl=loss_impl)
    return ml_collections.ConfigDict(dict(task=task))


def _batch():
    """B examples; examples 3 and 11 are identical (image and caption)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 50, size=(B, L)).astype(np.int32)
    mask = np.ones((B, L), np.int32)
    mask[2, 4:] = 0
    image = rng.normal(size=(B, 8, 8, 3)).astype(np.float32)
    ids[11], mask[11], image[11] = ids[3], mask[3], image[3]
    return {"image": image, "text_ids": ids, "text_mask": mask}


@pytest.fixture(scope="module")
def sigmoid_clip_params():
    """A tiny SigLIP's parameters (without logit_bias: the CLIP's), random from their shapes: tracing the init is
    instant where compiling it takes seconds. A large logit scale (50) and SigLIP's bias init."""
    model = CLIP(image=VIT_KW, text=TEXT_KW, embed_dim=8, loss="sigmoid")
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), {k: v[:2] for k, v in _batch().items()}))
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes["params"])
    return dict(params, logit_scale=np.float32(np.log(50.0)), logit_bias=np.float32(-10.0))


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_task_sharded_equals_dense(loss, sigmoid_clip_params):
    model = CLIP(image=VIT_KW, text=TEXT_KW, embed_dim=8, loss=loss)
    params = {k: v for k, v in sigmoid_clip_params.items() if loss == "sigmoid" or k != "logit_bias"}
    mesh = _mesh(2, 2, 2)
    batch = jax.device_put(_batch(), NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES)))
    results = {}
    for impl in ("dense", "sharded"):
        task = ContrastiveTask(model, _config(impl), META, None, mesh)
        assert task.loss_impl == impl
        # The sharded side through the two methods the gradient-accumulation code calls: `loss` must be their
        # composition.
        fn = task.loss if impl == "dense" else lambda p, b, r, t=task: t.loss_from_outputs(t.embed(p, b, r), b)
        (value, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch, jax.random.key(1))
        results[impl] = value, jax.device_get(metrics), grads
    (v_d, m_d, g_d), (v_s, m_s, g_s) = results["dense"], results["sharded"]
    _assert_close(v_s, v_d, f"{loss} loss")
    _assert_close(g_s, g_d, f"{loss} grads")
    assert m_s.keys() == m_d.keys() and {"batch_i2t_acc", "batch_t2i_acc", "logit_scale"} <= set(m_s)
    for k in m_d:
        np.testing.assert_allclose(m_s[k], m_d[k], rtol=1e-6, err_msg=k)


def test_task_loss_impl_choice_and_errors():
    softmax, hinge = CLIP(image=VIT_KW, text=TEXT_KW, embed_dim=8), types.SimpleNamespace(loss="hinge")
    split, one = _mesh(2, 4, 1), _mesh(1, 1, 8)
    # auto: sharded where the batch is split and the loss can be; dense otherwise (and without a config or mesh).
    assert ContrastiveTask(softmax, _config(), META, None, split).loss_impl == "sharded"
    assert ContrastiveTask(softmax, _config("auto"), META, None, one).loss_impl == "dense"
    assert ContrastiveTask(hinge, _config(), META, None, split).loss_impl == "dense"
    assert ContrastiveTask(softmax, None, META, None, None).loss_impl == "dense"
    assert ContrastiveTask(softmax, _config("dense"), META, None, split).loss_impl == "dense"
    with pytest.raises(ValueError, match=r"^task.loss_impl='sharded' supports model.loss in \('softmax', "
                                         r"'sigmoid'\); got 'hinge' \(use 'dense' or 'auto'\)$"):
        ContrastiveTask(hinge, _config("sharded"), META, None, split)
    with pytest.raises(ValueError, match=r"^task.loss_impl must be one of \('auto', 'dense', 'sharded'\); "
                                         r"got 'ring'$"):
        ContrastiveTask(softmax, _config("ring"), META, None, split)


# ------------------------------------------------------------------------------------------------ memory


def _temp_bytes(fn, args, argnums) -> tuple[int, int]:
    """Per-device temporary bytes XLA allocates for fn (forward) and for its value and gradients."""
    fwd = jax.jit(fn).lower(*args).compile().memory_analysis()
    vg = jax.jit(jax.value_and_grad(fn, argnums=argnums)).lower(*args).compile().memory_analysis()
    return fwd.temp_size_in_bytes, vg.temp_size_in_bytes


def test_per_device_memory_falls_with_devices():
    b, e = 2048, 64
    dense_logits = b * b * 4
    temps = {"softmax": [], "sigmoid": []}
    for n in (1, 2, 4, 8):
        mesh = _mesh(n, 1, 1)
        z = jax.ShapeDtypeStruct((b, e), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES)))
        s = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
        temps["softmax"].append(_temp_bytes(
            lambda x, y, t: sharded_losses.softmax_contrastive_loss_sharded(x, y, t, mesh), (z, z, s), (0, 1, 2)))
        temps["sigmoid"].append(_temp_bytes(
            lambda x, y, t, c: sharded_losses.sigmoid_contrastive_loss_chunked(x, y, t, c, mesh), (z, z, s, s),
            (0, 1, 2, 3)))
    print("per-device temp bytes (forward, value_and_grad) at 1/2/4/8 devices:", temps)
    for name, seen in temps.items():
        for k, what in enumerate(("forward", "value_and_grad")):
            per_n = [t[k] for t in seen]
            assert all(a > c for a, c in zip(per_n, per_n[1:])), f"{name} {what} temp bytes do not fall: {per_n}"
    # At 8 devices: softmax holds [B/8, B] blocks (a few of them for the backward), sigmoid [B/8, B/8] ones.
    assert temps["softmax"][-1][0] < dense_logits / 3 and temps["softmax"][-1][1] < 0.6 * dense_logits
    assert temps["sigmoid"][-1][0] < dense_logits / 16 and temps["sigmoid"][-1][1] < dense_logits / 8
