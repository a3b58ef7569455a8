"""`python -m mmjax.convert --workdir=RUN --hf_out=DIR` on the default configs/clip.py and configs/vilt.py runs:
transformers reloads the model, tokenizer and image processor, and computes what ours does (float32, 1e-4 abs)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmjax import checkpoint
from mmjax.convert import __main__ as convert_cli
from mmjax.convert import hf_processing
from mmjax.data.tokenizer import Tokenizer
from mmjax.models import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An out-of-vocabulary word ("quixotic": the embedded vocabulary lacks its letters), odd case and spacing, an empty
# text, and one far longer than max_len (truncated, [SEP] kept).
TEXTS = ["A red circle.", "the QUIXOTIC  blue\tsquare", "", "a green triangle on the left " * 12]


def _convert(workdir: str, hf_out: str) -> subprocess.CompletedProcess:
    """The convert CLI as a user runs it, on one CPU device: the runs here train on conftest's 8."""
    env = dict(os.environ, XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                                            os.environ.get("XLA_FLAGS", "")).strip())
    return subprocess.run([sys.executable, "-m", "mmjax.convert", f"--workdir={workdir}", f"--hf_out={hf_out}"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _export(workdir: str, tmp_path) -> tuple[str, str]:
    """Exports the run in `workdir` with the CLI into tmp_path/hf: (workdir, hf_dir)."""
    hf_dir = str(tmp_path / "hf")
    proc = _convert(workdir, hf_dir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"wrote {hf_dir}: config.json, model.safetensors, tokenizer.json"), proc.stdout
    assert lines[-1].startswith("load with: transformers."), proc.stdout
    assert not re.search(r"^I\d{4} ", proc.stderr, re.M), proc.stderr  # orbax's INFO lines are quiet
    for name in lines[0].split(": ", 1)[1].split(", "):
        assert os.path.isfile(os.path.join(hf_dir, name)), name
    return workdir, hf_dir


def _ours(workdir: str):
    """(our model, variables, run config, tokenizer) of the run's latest checkpoint."""
    config = checkpoint.load_config(workdir)
    params, _ = convert_cli.restore_params(workdir)
    return (build_model(config.model.to_dict()), {"params": params}, config,
            Tokenizer.from_path(os.path.join(workdir, "tokenizer.json")))


def _check_tokenizer(hf_dir: str, tokenizer: Tokenizer, max_len: int):
    """AutoTokenizer gives our Tokenizer.encode ids and mask; returns (ids, mask) of TEXTS."""
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok.model_max_length == max_len and tok.pad_token_id == tokenizer.pad_id
    ids, mask = tokenizer.encode(TEXTS, max_len)
    assert (ids == tokenizer.unk_id).any(), "no out-of-vocabulary word in TEXTS"
    assert mask[-1].all() and ids[-1, -1] == tokenizer.sep_id  # the long text was truncated, [SEP] kept
    for length in (max_len, 5):
        got = tok(TEXTS, padding="max_length", max_length=length, truncation=True)
        want_ids, want_mask = tokenizer.encode(TEXTS, length)
        np.testing.assert_array_equal(np.asarray(got["input_ids"]), want_ids)
        np.testing.assert_array_equal(np.asarray(got["attention_mask"]), want_mask)
    return ids, mask


def _pixels(hf_dir: str, config, n: int, processor_class: str) -> np.ndarray:
    """n random uint8 images at the run's size (so neither side resizes) through the exported image processor
    (AutoProcessor's), checked against our normalisation; returns our channels-last float32 batch."""
    size = config.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    processor = transformers.AutoProcessor.from_pretrained(hf_dir)
    assert type(processor).__name__ == processor_class
    pixel_values = processor(images=list(images), return_tensors="np")["pixel_values"]
    ours = (images / 255.0 - np.asarray(config.data.mean)) / np.asarray(config.data.std)
    np.testing.assert_allclose(pixel_values.transpose(0, 2, 3, 1), ours, atol=1e-6)
    return ours.astype(np.float32)


def _max_diffs(ours: dict, theirs: dict) -> dict[str, float]:
    """max |ours - theirs| per name, shapes checked; printed for the log."""
    for k in theirs:
        assert np.shape(ours[k]) == np.shape(theirs[k]), (k, np.shape(ours[k]), np.shape(theirs[k]))
    diffs = {k: float(np.abs(np.asarray(ours[k]) - theirs[k]).max()) for k in theirs}
    print("max |ours - transformers|:", diffs)
    return diffs


def test_default_clip_run_exports_with_its_tokenizer(tiny_run, tmp_path):
    workdir, hf_dir = _export(tiny_run("clip.py")[0], tmp_path)
    model, variables, config, tokenizer = _ours(workdir)
    assert config.model.image.ln_pre and config.model.text.pool == "eos"  # the defaults that used to block export
    ids, mask = _check_tokenizer(hf_dir, tokenizer, config.data.max_len)
    # 3 images against 4 texts: a transposed logits matrix cannot pass.
    image = _pixels(hf_dir, config, 3, "CLIPProcessor")

    hf_model = transformers.CLIPModel.from_pretrained(hf_dir).eval()
    assert hf_model.config.text_config.eos_token_id == tokenizer.sep_id
    out = jax.jit(model.apply)(variables, {"image": image, "text_ids": ids, "text_mask": mask})
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       pixel_values=torch.tensor(image.transpose(0, 3, 1, 2)))
    names = ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text")
    diffs = _max_diffs(out, {k: getattr(ref, k).numpy() for k in names})
    assert max(diffs.values()) <= ATOL, diffs


def test_default_vilt_run_exports_with_its_tokenizer(tiny_run, tmp_path, monkeypatch):
    workdir, hf_dir = _export(tiny_run("vilt.py")[0], tmp_path)
    model, variables, config, tokenizer = _ours(workdir)
    ids, mask = _check_tokenizer(hf_dir, tokenizer, config.data.max_len)
    image = _pixels(hf_dir, config, len(TEXTS), "ViltProcessor")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["ViltForMaskedLM"]

    # HF draws its patch order at random on every call; raster order (ours) is one valid draw.
    monkeypatch.setattr(torch, "multinomial", lambda weights, num_samples, *a, **k: torch.arange(int(num_samples)))
    inputs = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  pixel_values=torch.tensor(image.transpose(0, 3, 1, 2)))
    hf_model = transformers.ViltForMaskedLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        mlm, base = hf_model(**inputs), hf_model.vilt(**inputs)  # the head's logits; the trunk's ViltModel outputs
    out = jax.jit(model.apply)(variables, {"image": image, "text_ids": ids, "text_mask": mask})
    diffs = _max_diffs(out, {"mlm_logits": mlm.logits.numpy(), "pooler_output": base.pooler_output.numpy(),
                             "last_hidden_state": base.last_hidden_state.numpy()})
    assert max(diffs.values()) <= ATOL, diffs


@pytest.mark.parametrize("resize,shape", [("exact", (2, 3, 32, 32)), ("shorter", (2, 3, 32, 32)),
                                          ("canvas", (2, 3, 32, 48))])
def test_image_processor_follows_the_run_preprocessing(tmp_path, resize: str, shape: tuple):
    """Each resize mode of the eval source gives an image processor transformers loads (no torchvision) with the
    run's size and normalisation; image_canvas keeps the aspect ratio and adds pixel_mask."""
    data = dict(image_size=32, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6], eval_source="b",
                sources={"a": {}, "b": {"image": {"resize": "shorter" if resize == "shorter" else "exact"}}})
    if resize == "canvas":
        data.update(image_canvas=64, size_divisor=16)
    files = hf_processing.write_image_processing(tmp_path, "clip", data, with_tokenizer=False)
    assert files == [hf_processing.IMAGE_PROCESSOR_FILE]
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert list(processor.image_mean) == data["mean"] and list(processor.image_std) == data["std"]
    images = list(np.random.default_rng(0).integers(0, 256, (2, 60, 100, 3), dtype=np.uint8))
    out = processor(images, return_tensors="np")
    assert out["pixel_values"].shape == shape and ("pixel_mask" in out) == (resize == "canvas")
    assert hf_processing.write_image_processing(tmp_path, "bert", data, with_tokenizer=True) == []


def test_convert_of_a_wrong_workdir_is_one_line(tmp_path):
    """No config.json: `error: ...` in one line on stderr, exit status 2, nothing written; a workdir without a
    checkpoint is a one-line ValueError too (in-process: a second CLI start would double the cost)."""
    proc = _convert(str(tmp_path / "nowhere"), str(tmp_path / "hf"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "no config.json" in lines[0] and not (tmp_path / "hf").exists()

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {"name": "clip"}}))
    with pytest.raises(ValueError, match="no checkpoint in") as error:
        convert_cli.mmjax_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert "\n" not in str(error.value) and not (tmp_path / "hf").exists()
