"""Fast attention (jax.nn.dot_product_attention) vs our einsum path; nn.scan over encoder layers vs the unrolled
loop (same params, stacked / unstacked), HF CLIP into a scanned model, init_from across layouts; the separate
logical names of activations (CPU, tiny sizes)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import pretrained, sharding
from mmjax.models import CLIP, ViLT, build_model, layers, scan_params

B, E, H = 2, 16, 2
# "auto" is implementation=None, today XLA's: one case checks it. "cudnn" needs a GPU (and bf16): not on CPU.
ATTENTION_CASES = [("xla", "padding"), ("xla", "causal"), ("xla", "cross"), ("auto", "cross")]


def _padding(lengths: tuple[int, ...], length: int) -> jax.Array:
    return jnp.asarray((np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32))


def _cases() -> dict[str, tuple[int, int, jax.Array]]:
    """name -> (Lq, Lk, additive bias) for self-attention with padding, causal (+ padding), cross with Lq != Lk."""
    pad = layers.padding_bias(_padding((5, 3), 5))
    return {"padding": (5, 5, pad), "causal": (5, 5, pad + layers.causal_bias(5)),
            "cross": (3, 7, layers.padding_bias(_padding((7, 4), 7)))}


def _random_like(shapes, seed: int = 0):
    """Random float32 arrays of the given abstract params: eager or jitted inits cost seconds of compile on CPU,
    and any params do for comparing two code paths."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


@functools.lru_cache(maxsize=None)
def _mha_setup(case: str):
    lq, lk, bias = _cases()[case]
    kx, kk = jax.random.split(jax.random.key(0))
    x, kv = jax.random.normal(kx, (B, lq, E)), jax.random.normal(kk, (B, lk, E))
    kv = None if case != "cross" else kv
    shapes = jax.eval_shape(layers.MultiHeadAttention(num_heads=H).init, jax.random.key(1), x, kv, bias)
    return x, kv, bias, _random_like(nn.unbox(shapes["params"]))


def _apply_and_grad(attention: str, case: str, dtype=jnp.float32):
    x, kv, bias, params = _mha_setup(case)
    model = layers.MultiHeadAttention(num_heads=H, attention=attention, dtype=dtype)

    def loss(p, x, kv):
        y = model.apply({"params": p}, x, kv, bias)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y  # sin: a gradient that depends on y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x, x if kv is None else kv)
    return y, grads


@pytest.mark.parametrize("attention,case", ATTENTION_CASES)
def test_dot_product_attention_matches_einsum(attention: str, case: str):
    """Outputs and gradients (params and inputs) of the fused path equal the einsum path in float32."""
    y_ref, g_ref = _apply_and_grad("einsum", case)
    y, g = _apply_and_grad(attention, case)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g, g_ref)


def test_dot_product_attention_bf16_close():
    """bf16 compute (float32 params, float32 logits/softmax inside) stays close to the float32 einsum path."""
    y_ref, _ = _apply_and_grad("einsum", "causal")
    y, grads = _apply_and_grad("xla", "causal", jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=5e-2, rtol=5e-2)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads[0]))  # param_dtype unchanged


def test_attention_errors():
    x = jnp.ones((B, 4, E))
    with pytest.raises(ValueError, match="no attention dropout"):
        layers.MultiHeadAttention(num_heads=H, attention="xla", attention_dropout_rate=0.1).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="Unknown attention"):
        layers.MultiHeadAttention(num_heads=H, attention="flash").init(jax.random.key(0), x)


# ------------------------------------------------------------------------------------------- CLIP and ViLT

CLIP_KW = dict(image=dict(image_size=16, patch_size=8, width=E, depth=2, heads=H, mlp_dim=32),
               text=dict(vocab_size=30, max_len=6, width=E, depth=2, heads=H, mlp_dim=32), embed_dim=8)
VILT_KW = dict(vocab_size=30, max_len=6, image_size=16, patch_size=8, width=E, depth=2, heads=H, mlp_dim=32)


def _batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((B, 6), np.int32)
    mask[1, 4:] = 0
    return {"image": jnp.asarray(rng.normal(size=(B, 16, 16, 3)), jnp.float32),
            "text_ids": jnp.asarray(rng.integers(1, 30, size=(B, 6)), jnp.int32), "text_mask": jnp.asarray(mask)}


@functools.lru_cache(maxsize=None)
def _unrolled_params(name: str):
    """Random float32 params of the unrolled model (compiling its real init takes ~10 s on CPU)."""
    model = CLIP(**CLIP_KW) if name == "clip" else ViLT(**VILT_KW)
    return _random_like(nn.unbox(jax.eval_shape(model.init, jax.random.key(0), _batch())["params"]))


def _model(name: str, **kw) -> nn.Module:
    return CLIP(**CLIP_KW, **kw) if name == "clip" else ViLT(**VILT_KW, **kw)


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> dict:
    """The unrolled einsum model's outputs with _unrolled_params (computed once: compiles dominate here)."""
    return jax.jit(_model(name).apply)({"params": _unrolled_params(name)}, _batch())


def _outputs(name: str, out: dict) -> dict:
    keys = ("image_embeds", "text_embeds") if name == "clip" else ("last_hidden_state", "mlm_logits", "itm_logits")
    return {k: np.asarray(out[k], np.float32) for k in keys}


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
@pytest.mark.parametrize("name", ["clip", "vilt"])
def test_scan_equals_unrolled(name: str, remat: bool):
    """scan_layers=True with the stacked params computes what the unrolled model does with the unstacked ones."""
    params = _unrolled_params(name)
    stacked = scan_params.stack_layers(params)
    ref = _reference(name)
    out = jax.jit(_model(name, scan_layers=True, remat=remat).apply)({"params": stacked}, _batch())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6),
                 _outputs(name, out), _outputs(name, ref))


def test_scan_params_stacked_and_named():
    """A scanned model's own init: encoder/layers with a leading depth axis named "layers" (unsharded by the
    default rules), the same tree as stacking the unrolled init, and stack(unstack(p)) == p."""
    boxed = jax.eval_shape(_model("clip", scan_layers=True).init, jax.random.key(0), _batch())["params"]
    kernel = boxed["image_encoder"]["encoder"]["layers"]["attn"]["query"]["kernel"]
    assert kernel.names == ("layers", "embed", "heads", "kv") and kernel.value.shape == (2, E, H, E // H)
    spec = nn.logical_to_mesh_axes(kernel.names, sharding.DEFAULT_RULES)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    stacked = scan_params.stack_layers(_unrolled_params("clip"))
    assert jax.tree.structure(stacked) == jax.tree.structure(nn.unbox(boxed))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.shape, b.shape), stacked, nn.unbox(boxed))
    assert scan_params.is_stacked(stacked) and not scan_params.is_stacked(_unrolled_params("clip"))
    back = scan_params.stack_layers(scan_params.unstack_layers(stacked))
    jax.tree.map(np.testing.assert_array_equal, back, stacked)
    jax.tree.map(np.testing.assert_array_equal, scan_params.unstack_layers(stacked), _unrolled_params("clip"))


def test_graft_across_layouts():
    """init_from loads an unrolled checkpoint into a scanned model and a stacked one into an unrolled model."""
    unrolled = jax.tree.map(np.asarray, _unrolled_params("clip"))
    fresh_scan = nn.unbox(jax.eval_shape(_model("clip", scan_layers=True).init, jax.random.key(0), _batch()))
    fresh_scan = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), fresh_scan["params"])
    params, report = pretrained.graft(fresh_scan, unrolled, strict=True)
    assert not report.problems() and any("/encoder/layers/" in p for p in report.loaded)
    jax.tree.map(np.testing.assert_array_equal, params, scan_params.stack_layers(unrolled))
    back, report = pretrained.graft(jax.tree.map(np.zeros_like, unrolled), params, strict=True)
    assert not report.problems()
    jax.tree.map(np.testing.assert_array_equal, back, unrolled)


def test_clip_bf16_xla_attention():
    """A bf16 CLIP with attention="xla" (both towers, with scan) runs and stays close to float32 einsum."""
    params, ref = _unrolled_params("clip"), _reference("clip")
    model = build_model(dict(name="clip", dtype="bfloat16", attention="xla", scan_layers=True, **CLIP_KW))
    assert model.attention == "xla"
    out = jax.jit(model.apply)({"params": scan_params.stack_layers(params)}, _batch())
    for k in ("image_embeds", "text_embeds"):
        assert np.isfinite(np.asarray(out[k])).all()
        np.testing.assert_allclose(out[k], ref[k], atol=5e-2)


def test_vilt_xla_attention_matches_einsum():
    params, ref = _unrolled_params("vilt"), _reference("vilt")
    out = jax.jit(_model("vilt", attention="xla").apply)({"params": params}, _batch())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 _outputs("vilt", out), _outputs("vilt", ref))


# ---------------------------------------------------------------------------------------------- HF import


def test_hf_clip_into_scanned_model(tmp_path):
    """An HF CLIP imported with scan_layers=True equals transformers' outputs, and exports the same tensors."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_convert_clip import assert_outputs_close, hf_outputs, images, text_batch, tiny_hf_clip

    from mmjax.convert import hf, hf_clip

    ref_model = tiny_hf_clip("quick_gelu", 99)
    ref_model.save_pretrained(tmp_path / "hf")
    model, variables, config = hf.load(tmp_path / "hf", scan_layers=True)
    assert config["scan_layers"] and model.scan_layers
    assert "layers" in variables["params"]["text_encoder"]["encoder"]
    ids, mask = text_batch(eos=99)
    image = images(32)
    out = jax.jit(model.apply)(variables, {"image": image, "text_ids": ids, "text_mask": mask})
    assert_outputs_close(out, hf_outputs(ref_model, image, ids, mask))
    _, unrolled, _ = hf.load(tmp_path / "hf")
    _, tensors = hf_clip.export(config, variables)
    _, ref_tensors = hf_clip.export({**config, "scan_layers": False}, unrolled)
    assert set(tensors) == set(ref_tensors)
    for k, x in ref_tensors.items():
        np.testing.assert_array_equal(tensors[k], x, err_msg=k)


# ------------------------------------------------------------------------------------------ logical names


def test_activation_names_are_separate():
    """Activations use activation_* names; the default rules shard them as before (batch on data+fsdp, cache heads
    on tensor, the rest unsharded) and a param-name rule cannot move them."""
    rules = sharding.DEFAULT_RULES
    assert nn.logical_to_mesh_axes(layers.ACT_AXES, rules) == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
    assert nn.logical_to_mesh_axes(layers.CACHE_AXES, rules) == jax.sharding.PartitionSpec(
        ("data", "fsdp"), "tensor", None, None)
    assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == jax.sharding.PartitionSpec("fsdp", "tensor")
    moved = (("embed", "tensor"), ("length", "fsdp"), *rules)
    assert nn.logical_to_mesh_axes(layers.ACT_AXES, moved) == nn.logical_to_mesh_axes(layers.ACT_AXES, rules)
    assert not {"batch", "length", "embed", "heads", "kv"} & set(layers.ACT_AXES + layers.CACHE_AXES
                                                                 + layers.POOLED_AXES)
