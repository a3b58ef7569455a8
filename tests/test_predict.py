"""`python -m mmjax.predict`: a shrunk CLIP run ranks a folder of the embedded test images exactly as its own
encoders do on the eval pipeline's images (same pixels, same order), ranks texts and scores every pair, writes
predictions.json and both contact sheets; a converted model directory gives the same scores; a shrunk ViLT run
scores pairs with its ITM head; input errors are one line with status 2."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmjax import generate, pretrained, predict
from mmjax.data import pipeline
from mmjax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CLI runs on one CPU device, as a user's would: the runs here trained on conftest's 8 (a restore across device
# counts is part of what it checks).
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=re.sub(
    r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).strip())
N_IMAGES = 6


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """The first N_IMAGES embedded test images (the last in a subfolder), classes.txt and a non-image file."""
    folder = str(tmp_path_factory.mktemp("images"))
    written = predict.export_images(folder, N_IMAGES)
    os.makedirs(os.path.join(folder, "sub"))
    shutil.move(written[-1], os.path.join(folder, "sub", os.path.basename(written[-1])))
    return folder


@pytest.fixture
def clip_run(tiny_run):
    """(workdir, config) of the session's 2-step CLIP run with one-layer towers."""
    return tiny_run("clip.py")


def eval_pipeline(config, n: int):
    """The first n test examples as the run's evaluation reads them (pixels, tokenizer), and the model and params."""
    tokenizer = pipeline.load_tokenizer(config.data)
    batch = next(pipeline.eval_batches(config.data, tokenizer, global_batch_size=8))
    assert list(batch["image_id"][:n]) == list(range(n))  # the exported files are test images 0..n-1
    return batch["image"][:n], tokenizer


def direct_dual_scores(workdir, pixels, tokenizer, texts, max_len):
    """[N, T] cosine similarities from the model's own encode_image / encode_text on unpadded arrays."""
    ckpt = pretrained.load_checkpoint(workdir)
    model = build_model(ckpt.model_config)
    img = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))(ckpt.params, pixels)
    ids, mask = tokenizer.encode(texts, max_len)
    txt = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method="encode_text"))(ckpt.params, ids, mask)
    return np.asarray(img) @ np.asarray(txt).T


def test_clip_ranks_images_and_texts_like_its_encoders(clip_run, images):
    workdir, config = clip_run
    assert predict.IMAGE_SUFFIXES == generate.IMAGE_SUFFIXES
    pixels, tokenizer = eval_pipeline(config, N_IMAGES)
    predictor = predict.load_predictor(workdir=workdir, batch_size=4)  # 6 images: two batches, the last padded
    assert predictor.kind == predict.DUAL_ENCODER and predictor.step == 2

    mode, paths, root, texts = predict.plan(images, None, "a red circle", None, None)
    assert mode == "rank_images" and len(paths) == N_IMAGES and paths[-1].startswith(os.path.join(images, "sub"))
    np.testing.assert_allclose(predictor.preprocess(paths), pixels, atol=1e-6)  # the eval pipeline's pixels
    result = predict.predict(predictor, mode, paths, texts, root)
    classes = os.path.join(images, "classes.txt")
    mode_t, paths1, root1, prompts = predict.plan(None, paths[0], None, None, classes)
    # The model's own encoders on the eval pipeline's pixels: column 0 the query, then the 24 class prompts.
    everything = direct_dual_scores(workdir, pixels, tokenizer, texts + prompts, config.data.max_len)
    direct = everything[:, :1]
    np.testing.assert_allclose(np.asarray(result["scores"]), direct, atol=1e-5)
    np.testing.assert_allclose(predictor.score_files(paths, texts, chunk=4), result["scores"], atol=1e-6)
    names = [os.path.relpath(p, root) for p in paths]
    assert [r["image"] for r in result["ranking"]] == [names[i] for i in np.argsort(-direct[:, 0], kind="stable")]
    ranked = [r["score"] for r in result["ranking"]]
    assert ranked == sorted(ranked, reverse=True)
    probs = np.asarray(result["probabilities"])[:, 0]
    assert probs.sum() == pytest.approx(1.0) and np.all(np.diff([r["probability"] for r in result["ranking"]]) <= 0)

    # One image, the 24 class prompts: texts ranked by the same cosine similarity.
    assert mode_t == "rank_texts" and len(prompts) == 24
    by_text = predict.predict(predictor, mode_t, paths1, prompts, root1)
    direct_t = everything[0, 1:]
    assert [r["text"] for r in by_text["ranking"]] == [prompts[j] for j in np.argsort(-direct_t, kind="stable")]
    assert sum(r["probability"] for r in by_text["ranking"]) == pytest.approx(1.0)

    # Every pair: each image's best text.
    matrix = predict.predict(predictor, "matrix", paths, prompts[:5], images)
    full = everything[:, 1:6]
    best = {r["image"]: r["text"] for r in matrix["ranking"]}
    assert best == {names[i]: prompts[int(np.argmax(full[i]))] for i in range(N_IMAGES)}
    table = predict.format_table(matrix, top=3)
    assert "| rank | score | probability | image | best text |" in table and "(3 more rows" in table


def test_cli_writes_table_json_and_contact_sheets(clip_run, images):
    workdir, _ = clip_run
    proc = subprocess.run([sys.executable, "-m", "mmjax.predict", f"--workdir={workdir}", f"--images={images}",
                           "--text=a red circle", "--top=4", "--batch_size=4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    out = os.path.join(workdir, "predictions")
    written = [os.path.join(out, f) for f in ("predictions.json", "contact_sheet.html", "contact_sheet.png")]
    assert lines[-1] == "wrote " + " ".join(written)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| rank")]
    assert len(rows) == 4 and rows[0].startswith("| 1 |") and "(2 more rows in predictions.json)" in lines
    with open(written[0]) as f:
        result = json.load(f)
    assert result["mode"] == "rank_images" and result["model"]["step"] == 2
    assert len(result["ranking"]) == N_IMAGES and len(result["scores"]) == N_IMAGES
    scores = [r["score"] for r in result["ranking"]]
    assert scores == sorted(scores, reverse=True)
    assert rows[0].split(" | ")[3].rstrip(" |") == result["ranking"][0]["image"]
    with open(written[1], encoding="utf-8") as f:
        page = f.read()
    assert page.count('src="data:image/png;base64,') == 4 and "http" not in page and "src=\"/" not in page
    with open(written[2], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_converted_model_directory_gives_the_runs_scores(clip_run, images, tmp_path):
    workdir, _ = clip_run
    ckpt = pretrained.load_checkpoint(workdir)
    model_dir = str(tmp_path / "converted")
    pretrained.save_converted(model_dir, ckpt.model_config, ckpt.params)
    with pytest.raises(ValueError, match="--tokenizer"):
        predict.load_predictor(model_dir=model_dir)
    shutil.copy(os.path.join(workdir, "tokenizer.json"), model_dir)
    _, paths, root, texts = predict.plan(images, None, "a blue triangle", None, None)
    # The run normalises with 0.5 / 0.5; a directory without preprocessor_config.json needs it said.
    converted = predict.load_predictor(model_dir=model_dir, normalization="half")
    assert converted.max_len == 24 and converted.config.data.image_size == 64
    run = predict.load_predictor(workdir=workdir)
    a = predict.predict(converted, "rank_images", paths, texts, root)
    b = predict.predict(run, "rank_images", paths, texts, root)
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-6)


def test_vilt_scores_pairs_with_its_itm_head(tiny_run, images):
    workdir, c = tiny_run("vilt.py")
    pixels, tokenizer = eval_pipeline(c, N_IMAGES)
    predictor = predict.load_predictor(workdir=workdir, batch_size=8)  # 6 x 2 pairs: two batches, one padded
    assert predictor.kind == predict.MATCHING
    mode, paths, root, texts = predict.plan(images, None, None, ["a red circle", "a blue triangle"], None)
    assert mode == "matrix"
    result = predict.predict(predictor, mode, paths, texts, root)

    ckpt = pretrained.load_checkpoint(workdir)
    model = build_model(ckpt.model_config)
    ids, mask = tokenizer.encode(texts, c.data.max_len)
    image_of, text_of = np.repeat(np.arange(N_IMAGES), len(texts)), np.tile(np.arange(len(texts)), N_IMAGES)
    logits = jax.jit(lambda p, b: model.apply({"params": p}, b)["itm_logits"])(ckpt.params, {
        "image": pixels[image_of], "text_ids": ids[text_of], "text_mask": mask[text_of]})
    direct = np.asarray(jax.nn.softmax(logits, -1))[:, 1].reshape(N_IMAGES, len(texts))
    # Batches of 8 padded pairs against all 12 at once: XLA's float32 sums run in another order (seen: 2e-5).
    np.testing.assert_allclose(np.asarray(result["scores"]), direct, atol=1e-4)
    assert result["probabilities"] is None and result["model"]["score"].startswith("ITM match probability")
    best = [r["score"] for r in result["ranking"]]
    assert best == sorted(best, reverse=True) and best[0] == pytest.approx(direct.max(), abs=1e-5)


def test_models_that_cannot_score_pairs_are_refused(load_config):
    captioner = build_model(dict(load_config("caption.py").model.to_dict()))
    with pytest.raises(ValueError, match="captioner.*mmjax.generate"):
        predict.model_kind(captioner, "captioner")
    vqa = load_config("vqa.py")
    with pytest.raises(ValueError, match="no ITM head"):
        predict.model_kind(build_model(vqa.model), vqa.model.name)
    with pytest.raises(ValueError, match="region features"):
        predict.model_kind(build_model(load_config("uniter.py").model), "uniter")


def test_input_errors_are_one_line(tmp_path, images, clip_run):
    def run(*args):
        # predict.main as `python -m mmjax.predict` runs it, started with -c: the package then skips its eager
        # (quieted) TensorFlow import, and argument errors come back in about a second.
        code = ("import sys; from absl import app; from mmjax import cli, predict; predict.define_flags(); "
                "app.run(predict.main, argv=['mmjax.predict', *sys.argv[1:]], flags_parser=cli.parse_flags)")
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env=ENV)
        return proc.returncode, proc.stderr.strip().splitlines()

    workdir, _ = clip_run
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    code, err = run(f"--workdir={workdir}", f"--images={tmp_path / 'empty'}", "--text=a red circle")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: no images") and "empty" in err[0]
    code, err = run(f"--workdir={workdir}", f"--images={images}")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: give a query: --text=")

    # In-process (these load TensorFlow / orbax first): a run without a checkpoint, an unreadable image.
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), no_ckpt)
    with pytest.raises(ValueError, match="no checkpoint"):
        predict.load_predictor(workdir=str(no_ckpt))
    (no_ckpt / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="^--workdir .*no checkpoint yet"):
        predict.load_predictor(workdir=str(no_ckpt))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    predictor = predict.load_predictor(workdir=workdir)
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        predictor.preprocess([str(bad)])
