"""mmjax.convert.hf_vilt against transformers: HF ViLT (four architectures) -> ours -> HF, outputs equal to 1e-4."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from mmjax.convert import hf_vilt  # noqa: E402  (after the skips: the converter needs safetensors)

B, L, S, C = 2, 6, 32, 3  # batch, text length, image side, channels
SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             image_size=S, patch_size=8, max_position_embeddings=16)
ATOL = 1e-4


@pytest.fixture
def raster_patches(monkeypatch):
    """Makes HF's patch order deterministic: raster order, as ours.

    transformers' ViltEmbeddings draws the order of the kept patches with torch.multinomial over uniform weights on
    every call, even in eval mode and with max_image_length=-1 (which keeps every patch, but still permutes them).
    Text tokens, pooler and head logits do not depend on that order (attention is permutation-invariant over keys;
    tests/test_vilt.py relies on this and compares only those), but last_hidden_state's image rows do. Any order is
    a valid draw of uniform sampling without replacement; this one is arange.
    """
    real = torch.multinomial

    def first_k(weights, num_samples, replacement=False, **kwargs):
        if replacement:  # padding patches (a pixel mask); these tests have none
            return real(weights, num_samples, replacement, **kwargs)
        return torch.arange(int(num_samples))

    monkeypatch.setattr(torch, "multinomial", first_k)


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Random image (NHWC) / ids / token types; the last two tokens of the second example are padding."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, L), np.int64)
    mask[1, -2:] = 0
    return {"image": rng.normal(size=(B, S, S, C)).astype(np.float32),
            "text_ids": rng.integers(1, SMALL["vocab_size"], (B, L)), "text_mask": mask,
            "text_type_ids": rng.integers(0, 2, (B, L))}


def hf_outputs(model, architecture: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The named outputs of an HF ViLT model (float32 numpy)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(inputs["text_ids"]), attention_mask=torch.tensor(inputs["text_mask"]),
                    token_type_ids=torch.tensor(inputs["text_type_ids"]),
                    pixel_values=torch.tensor(inputs["image"].transpose(0, 3, 1, 2)))
    names = ("last_hidden_state", "pooler_output") if architecture == "ViltModel" else ("logits",)
    return {n: getattr(out, n).numpy() for n in names}


def our_outputs(model, variables, architecture: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our ViLT's outputs under HF's names (LOGITS_KEY says where each head's `logits` is)."""
    batch = {k: jnp.asarray(v, jnp.float32 if k == "image" else jnp.int32) for k, v in inputs.items()}
    out = jax.jit(model.apply)(variables, batch)
    if architecture == "ViltModel":
        return {n: np.asarray(out[n]) for n in ("last_hidden_state", "pooler_output")}
    # A converted single-head model also returns HF's own name, `logits`, for that head.
    np.testing.assert_array_equal(out["logits"], out[hf_vilt.LOGITS_KEY[architecture]])
    return {"logits": np.asarray(out["logits"])}


def max_diffs(ours: dict, theirs: dict) -> dict[str, float]:
    assert set(ours) == set(theirs)
    for n in theirs:
        assert ours[n].shape == theirs[n].shape, (n, ours[n].shape, theirs[n].shape)
    return {n: float(np.abs(ours[n] - theirs[n]).max()) for n in theirs}


def saved_random_model(architecture: str, path, seed: int, **config):
    """An HF ViLT of the SMALL shapes with every parameter randomised, saved at `path`: (model, config, tensors).

    HF zero-initialises biases, cls and positions and sets LayerNorms to 1/0: randomising every parameter makes a
    swapped or dropped tensor show up. (parameters() yields the tied MLM decoder once: it stays tied.)
    """
    torch.manual_seed(seed)
    reference = getattr(transformers, architecture)(transformers.ViltConfig(**SMALL, **config)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.save_pretrained(path)
    with open(path / "config.json") as f:
        hf_config = json.load(f)
    return reference, hf_config, safetensors_numpy.load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("architecture", hf_vilt.ARCHITECTURES)
def test_load_and_export_match_transformers(architecture: str, tmp_path, raster_patches):
    """HF save_pretrained -> hf_vilt.load -> same outputs; export -> from_pretrained -> same tensors and outputs."""
    reference, hf_config, tensors = saved_random_model(architecture, tmp_path / "hf", seed=0, num_labels=7)

    model, variables, model_config = hf_vilt.load(hf_config, tensors)
    inputs = make_inputs()
    expected = hf_outputs(reference, architecture, inputs)
    diffs = max_diffs(our_outputs(model, variables, architecture, inputs), expected)
    print(f"\n{architecture} load: max |ours - HF| {diffs}")
    assert max(diffs.values()) <= ATOL, diffs

    # Back: the exported tensors are the checkpoint's, bit for bit, and transformers loads them without complaint.
    written = hf_vilt.save_hf(model_config, variables, tmp_path / "ours", architecture)
    assert written["architectures"] == [architecture]
    exported = safetensors_numpy.load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert sorted(exported) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    reloaded, info = getattr(transformers, architecture).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    diffs = max_diffs(hf_outputs(reloaded.eval(), architecture, inputs), expected)
    print(f"{architecture} export: max |reloaded HF - HF| {diffs}")
    assert max(diffs.values()) <= ATOL, diffs


def test_config_mapping_and_detection():
    """max_image_length semantics, activation names, architecture from tensor names, and the refusals."""
    base = dict(SMALL, num_hidden_layers=1, hidden_act="gelu_new", max_image_length=-1)
    cfg = hf_vilt.model_config_from_hf(base, "ViltModel")
    assert cfg["max_image_len"] is None and cfg["activation"] == "gelu_tanh" and cfg["max_len"] == 16
    assert not (cfg["mlm_head"] or cfg["itm_head"] or cfg["rank_head"]) and cfg["vqa_labels"] is None
    assert hf_vilt.model_config_from_hf(dict(base, max_image_length=5), "ViltModel")["max_image_len"] == 5
    qa = hf_vilt.model_config_from_hf(dict(base, id2label={"0": "a", "1": "b", "2": "c"}), "ViltForQuestionAnswering")
    assert qa["vqa_labels"] == 3
    assert hf_vilt.infer_architecture(qa) == "ViltForQuestionAnswering"

    # Without "architectures", the head tensors name the class; the base model has no "vilt." prefix.
    assert hf_vilt.detect_architecture({}, {"vilt.pooler.dense.weight": 0, "rank_output.weight": 0}) == (
        "ViltForImageAndTextRetrieval", "vilt.")
    assert hf_vilt.detect_architecture({}, {"pooler.dense.weight": 0}) == ("ViltModel", "")
    with pytest.raises(ValueError, match="ViltForImagesAndTextClassification"):
        hf_vilt.detect_architecture({"architectures": ["ViltForImagesAndTextClassification"]}, {})
    with pytest.raises(ValueError, match="several HF heads"):
        hf_vilt.infer_architecture(dict(qa, mlm_head=True))
    with pytest.raises(ValueError, match="pre-LN"):  # checked before any weight is read
        hf_vilt.export(dict(cfg, norm="post"), {}, "ViltModel")


def test_other_sizes_and_padded_images_match_transformers(tmp_path, raster_patches):
    """ViLT's fine-tuning inputs: images larger than the training size, of different shapes padded into one batch
    with a pixel mask. Positions are interpolated per image as transformers does (pos_interpolation="hf")."""
    reference, hf_config, tensors = saved_random_model("ViltModel", tmp_path / "hf", seed=1)
    model, variables, model_config = hf_vilt.load(hf_config, tensors)
    assert model_config["pos_interpolation"] == "hf"
    rng = np.random.default_rng(3)
    h, w = 48, 64  # 6 x 8 patches; the training grid is 4 x 4
    inputs = make_inputs()
    inputs["image"] = rng.normal(size=(B, h, w, C)).astype(np.float32)
    pixel_mask = np.ones((B, h, w), np.int64)
    pixel_mask[1, 40:, :] = 0  # the second image is 40 x 56: 5 x 7 patches, then padding
    pixel_mask[1, :, 56:] = 0
    inputs["image"][1][pixel_mask[1] == 0] = 0.0
    with torch.no_grad():
        out = reference(input_ids=torch.tensor(inputs["text_ids"]), attention_mask=torch.tensor(inputs["text_mask"]),
                        token_type_ids=torch.tensor(inputs["text_type_ids"]),
                        pixel_values=torch.tensor(inputs["image"].transpose(0, 3, 1, 2)),
                        pixel_mask=torch.tensor(pixel_mask))
    batch = {k: jnp.asarray(v, jnp.float32 if k == "image" else jnp.int32) for k, v in inputs.items()}
    batch["image_mask"] = jnp.asarray(pixel_mask, jnp.int32)
    ours = jax.jit(model.apply)(variables, batch)
    # Text tokens, the image [CLS] and the pooler (padded patch rows are unspecified in both).
    text = L + 1
    np.testing.assert_allclose(np.asarray(ours["last_hidden_state"])[:, :text],
                               out.last_hidden_state.numpy()[:, :text], atol=ATOL)
    np.testing.assert_allclose(np.asarray(ours["pooler_output"]), out.pooler_output.numpy(), atol=ATOL)
    # And the real patches of the padded image, in raster order in both.
    real = np.nonzero(pixel_mask[1, ::8, ::8].reshape(-1))[0]
    np.testing.assert_allclose(np.asarray(ours["last_hidden_state"])[1, text + real],
                               out.last_hidden_state.numpy()[1, text + np.arange(len(real))], atol=ATOL)
