"""mmjax.convert.hf_clip: HF CLIPModel -> our CLIP -> HF again, with transformers' outputs matched in float32."""
from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from mmjax.convert import hf, hf_clip
from mmjax.models import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, BOS, PAD = 100, 98, 0  # tiny vocabulary; EOS is 99 (highest id, as OpenAI's) unless a test says otherwise
ATOL = 1e-4
OUTPUTS = ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text")


def text_batch(eos: int, length: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Four right-padded texts, each ending in `eos`: no padding; pads sharing the eos id (as OpenAI's tokenizer
    in HF pads); pads of id 0; and eos-id pads that the mask calls real (HF pools at the first eos, not the last
    real token). Word ids are < BOS and include 2, so pooling at the first 2 would be caught."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, BOS, size=(4, length))
    ids[:, 0] = BOS
    ids[1, 1] = 2
    mask = np.ones((4, length), np.int32)
    ids[0, -1] = eos
    ids[1, 5:] = eos
    mask[1, 6:] = 0
    ids[2, 8], ids[2, 9:] = eos, PAD
    mask[2, 9:] = 0
    ids[3, 4:] = eos
    return ids.astype(np.int32), mask


def images(size: int, n: int = 3) -> np.ndarray:
    """n random channels-last images (3 images against 4 texts: a transposed logits matrix cannot pass)."""
    return np.random.default_rng(1).normal(size=(n, size, size, 3)).astype(np.float32)


def hf_outputs(model, image: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """transformers CLIPModel outputs on our batch layout (pixel_values are channels-first)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    pixel_values=torch.tensor(image.transpose(0, 3, 1, 2)))
    return {k: getattr(out, k).numpy() for k in OUTPUTS}


def assert_outputs_close(ours: dict, ref: dict[str, np.ndarray], atol: float = ATOL) -> dict[str, float]:
    """Every HF output within atol; returns the max |diff| per output."""
    diffs = {k: float(np.abs(np.asarray(ours[k]) - ref[k]).max()) for k in OUTPUTS}
    print("max |diff| vs transformers:", diffs)
    for k in OUTPUTS:
        assert np.asarray(ours[k]).shape == ref[k].shape, k
    assert max(diffs.values()) <= atol, diffs
    return diffs


def tiny_hf_clip(act: str, eos: int):
    """A randomly initialised small transformers CLIPModel whose every weight (LNs, scale too) is non-trivial."""
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, hidden_act=act, eos_token_id=eos,
                         bos_token_id=BOS, pad_token_id=PAD),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=act, layer_norm_eps=1e-6),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # HF inits LNs to 1/0: perturb everything so a swapped scale/bias cannot pass
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("act,eos", [("quick_gelu", 99), ("gelu", 99), ("quick_gelu", 2)],
                         ids=["quick_gelu", "gelu", "legacy_eos2_argmax"])
def test_hf_clip_round_trip(tmp_path, act: str, eos: int):
    """HF -> load: outputs match transformers; export: the same tensors, and transformers reloads the same model."""
    ref_model = tiny_hf_clip(act, eos)
    ref_model.save_pretrained(tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tensors = load_file(tmp_path / "hf" / "model.safetensors")

    model, variables, model_config = hf_clip.load(hf_config, tensors)
    assert model_config["image"]["activation"] == model_config["text"]["activation"] == act
    assert model_config["image"]["ln_epsilon"] == 1e-6 and model_config["text"]["ln_epsilon"] == 1e-5
    assert model_config["text"]["pool"] == ("argmax_id" if eos == 2 else "eos_id")
    # The public entry point (issue 5) dispatches here on model_type "clip".
    model_d, variables_d, config_d = hf.load(tmp_path / "hf")
    assert model_d == model and config_d == model_config
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables_d, variables)

    ids, mask = text_batch(eos=99)  # the legacy config still ends texts in the highest id (OpenAI's layout)
    image = images(32)
    ref = hf_outputs(ref_model, image, ids, mask)
    out = jax.jit(model.apply)(variables, {"image": image, "text_ids": ids, "text_mask": mask})
    assert_outputs_close(out, ref)

    # Export: the very tensors transformers saved, and a directory transformers loads to the same outputs.
    hf_config2, tensors2 = hf_clip.export(model_config, variables)
    assert set(tensors2) == set(tensors)
    for k, x in tensors.items():
        assert tensors2[k].shape == x.shape and tensors2[k].dtype == x.dtype, k
        np.testing.assert_array_equal(tensors2[k], x, err_msg=k)
    assert hf_config2["text_config"]["eos_token_id"] == eos
    hf_clip.save_hf(model_config, variables, tmp_path / "back")
    back = transformers.CLIPModel.from_pretrained(tmp_path / "back").eval()
    assert back.config.text_config.hidden_act == back.config.vision_config.hidden_act == act
    assert_outputs_close(hf_outputs(back, image, ids, mask), ref, atol=1e-6)


def test_fresh_mmjax_clip_exports_to_transformers(tmp_path, load_config):
    """A freshly initialised configs/clip.py tiny CLIP (ln_pre on, our default patch bias and last-token pooling)
    saved with save_hf: transformers' CLIPModel gives our outputs."""
    eos = V - 1
    full = load_config("clip.py", "tiny")
    config = full.model
    # The sizes the trainer resolves from the data (state.resolve_model_config).
    config.text.update(dict(vocab_size=V, max_len=full.data.max_len))
    config.image.image_size = full.data.image_size
    config.image.ln_pre = True  # HF's vision tower always has pre_layrnorm
    model = build_model(config)
    ids, mask = text_batch(eos=eos)
    ids[3, 5:], mask[3, 5:] = PAD, 0  # our default pool="eos" takes the last real token: texts end in their eos
    image = images(config.image.image_size)
    batch = {"image": image, "text_ids": ids, "text_mask": mask}
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"])
    # Fresh LNs are 1/0 and the patch bias 0: perturb every weight so the bias fold and the LN mapping are tested.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    variables = {"params": params}
    assert float(np.abs(params["image_encoder"]["patch_bias"]).max()) > 0.01

    out = jax.jit(model.apply)(variables, batch)
    hf_clip.save_hf(config, variables, tmp_path, eos_token_id=eos)
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    assert hf_model.config.text_config.eos_token_id == eos
    assert hf_model.config.vision_config.hidden_act == "gelu"  # our default: exact GELU, HF's "gelu"
    assert math.isclose(hf_model.logit_scale.item(), float(params["logit_scale"]), rel_tol=1e-6)
    assert_outputs_close(out, hf_outputs(hf_model, image, ids, mask))


def test_export_refuses_what_hf_clip_cannot_express(load_config):
    """Structures HF's CLIPModel lacks raise ValueError naming them (before any weight is read)."""
    full = load_config("clip.py", "tiny")
    base = full.model.to_dict()
    base["text"].update(vocab_size=V, max_len=full.data.max_len)
    base["image"]["image_size"] = full.data.image_size

    def variant(**changes) -> dict:
        cfg = json.loads(json.dumps(base))
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            node = cfg
            for p in parents:
                node = node[p]
            node[leaf] = value
        return cfg

    with pytest.raises(ValueError, match="ln_pre"):
        hf_clip.export(variant(image__ln_pre=False), {}, eos_token_id=V - 1)  # HF always has pre_layrnorm
    # Every problem in one message, the missing eos id included.
    with pytest.raises(ValueError, match="loss='sigmoid'.*ln_pre=False.*without eos_token_id"):
        hf_clip.export(variant(loss="sigmoid", image__ln_pre=False), {})
    ok = dict(image__ln_pre=True)  # configs/clip.py's default, explicit: each case below has one problem only
    with pytest.raises(ValueError, match="loss"):
        hf_clip.export(variant(loss="sigmoid", **ok), {}, eos_token_id=V - 1)
    with pytest.raises(ValueError, match="pool"):
        hf_clip.export(variant(image__pool="gap", **ok), {}, eos_token_id=V - 1)
    with pytest.raises(ValueError, match="eos_token_id"):
        hf_clip.export(variant(**ok), {})  # pool="eos" needs the id that ends the texts
    with pytest.raises(ValueError, match="argmax"):
        hf_clip.export(variant(**ok), {}, eos_token_id=2)  # HF would switch to argmax pooling
