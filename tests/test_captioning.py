"""Captioning end to end on the embedded dataset: configs/caption.py and configs/coca.py train, report BLEU and
CIDEr (and CoCa its zero-shot and retrieval), `mmjax.evaluate` reproduces the final eval with sample captions in its
report, `mmjax.generate` captions a folder of images; CoCa's loss is its two losses weighted; CoCa starts from a
CLIP run's image encoder; wrong models fail in one line."""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from mmjax import losses, optim, sharding
from mmjax import state as state_lib
from mmjax import train as trainer
from mmjax.data import pipeline
from mmjax.evaluation.evaluators import build_evaluators
from mmjax.models import build_model
from mmjax.tasks import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def shrink(c, steps: int):
    """A config shrunk to seconds per run: short training, evaluation on the first 100 test images."""
    c.train.update(dict(batch_size=32, steps=steps, log_every=steps // 4))
    c.optimizer.warmup_steps = 10
    c.checkpoint.update(dict(every_steps=steps, async_save=False))
    for evaluator in c.evals.values():
        evaluator.update(dict(every_steps=steps, batch_size=200))
    c.evals.captioning.max_images = 100
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_caption_config_learns_evaluates_and_captions_a_folder(load_config, embedded_data_dir, tmp_path):
    c = shrink(load_config("caption.py"), steps=120)
    workdir = str(tmp_path / "run")
    final = trainer.train_and_evaluate(c, workdir)
    records = read_metrics(workdir)
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["caption_loss"] < train[0]["caption_loss"] - 1.0
    assert train[-1]["token_accuracy"] > train[0]["token_accuracy"]
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"):
        assert 0.0 <= final[f"captioning/{key}"] <= (10.0 if key == "CIDEr" else 1.0), key
    assert final["captioning/num_images"] == 100
    # 120 steps already write captions that share words with the references.
    assert final["captioning/BLEU-1"] > 0.3 and final["captioning/length"] > 2
    with open(os.path.join(workdir, "captioning_captions_step120.json")) as f:
        written = json.load(f)
    assert len(written) == 100 and all(set(r) == {"image_id", "caption"} for r in written)

    # mmjax.evaluate: the same numbers, and a report with sample captions next to their references.
    proc = subprocess.run([sys.executable, "-m", "mmjax.evaluate", f"--workdir={workdir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, value in final.items():
        assert printed[key] == pytest.approx(value, abs=1e-9), key
    with open(os.path.join(workdir, "eval_report.md")) as f:
        report = f.read()
    assert "Sample predictions: captioning" in report and os.path.exists(
        os.path.join(workdir, "eval_samples_captioning.png"))

    # mmjax.generate on a folder of images (two of them in a subfolder, one not an image).
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    source = os.path.join(os.path.dirname(__import__("easy_vqa").__file__), "data", "test", "images")
    for i, dest in enumerate(["a.png", "sub/b.png", "sub/c.png"]):
        shutil.copy(os.path.join(source, f"{i}.png"), images / dest)
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "captions.jsonl"
    for method in ("beam", "greedy"):
        proc = subprocess.run([sys.executable, "-m", "mmjax.generate", f"--workdir={workdir}", f"--images={images}",
                               f"--out={out}", f"--method={method}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=ENV)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["image"] for r in rows] == ["a.png", "sub/b.png", "sub/c.png"]
        assert all(r["caption"] and r["score"] < 0 for r in rows)
        if method == "beam":  # the evaluator decoded test images 0-2 the same way, from the same weights
            assert [r["caption"] for r in rows] == [w["caption"] for w in written[:3]]
    bad = subprocess.run([sys.executable, "-m", "mmjax.generate", f"--workdir={workdir}",
                          f"--images={tmp_path / 'missing'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=ENV)
    last = bad.stderr.strip().splitlines()[-1]  # (TF's start-up lines may come first: issue of quiet logs)
    assert bad.returncode == 2 and last.startswith("error: --images=") and "not a directory" in last


def test_coca_config_trains_both_losses_and_reports_all_evaluators(load_config, tmp_path):
    c = shrink(load_config("coca.py"), steps=40)
    final = trainer.train_and_evaluate(c, str(tmp_path / "coca"))
    train = [r for r in read_metrics(str(tmp_path / "coca")) if r["kind"] == "train"]
    assert train[-1]["caption_loss"] < train[0]["caption_loss"]
    assert train[-1]["contrastive_loss"] < train[0]["contrastive_loss"]
    for key in ("zero_shot/accuracy", "retrieval/i2t_r@1", "retrieval/t2i_r@5", "captioning/BLEU-4",
                "captioning/CIDEr"):
        assert key in final, key
    assert final["zero_shot/accuracy"] > 2 * final["zero_shot/chance"]


def _setup(config):
    tokenizer = pipeline.load_tokenizer(config.data)
    meta = pipeline.dataset_meta(config.data, tokenizer)
    state_lib.resolve_model_config(config, meta)
    model = build_model(config.model)
    mesh = sharding.create_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    return model, meta, tokenizer, mesh


def test_coca_loss_is_the_weighted_sum_of_its_losses(load_config):
    c = load_config("coca.py")
    c.data.image_size = 32
    model, meta, tokenizer, mesh = _setup(c)
    task = get_task(c.task, model=model, config=c, meta=meta, tokenizer=tokenizer, mesh=mesh)
    batch = next(pipeline.train_iterator(c.data, tokenizer, global_batch_size=8, seed=0, process_count=1,
                                         process_index=0))
    params = nn.unbox(model.init(jax.random.key(0), {k: batch[k] for k in ("image", "text_ids", "text_mask")}))[
        "params"]
    loss, metrics = task.loss(params, batch, jax.random.key(1))
    out = model.apply({"params": params}, batch)
    caption, _ = losses.caption_loss(out["lm_logits"][:, :-1], batch["text_ids"][:, 1:], batch["text_mask"][:, 1:])
    contrastive = losses.softmax_contrastive_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
    np.testing.assert_allclose(float(loss), 2.0 * float(caption) + float(contrastive), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["caption_loss"]), float(caption), rtol=1e-5)
    # The captioning targets skip the start token and stop at [SEP]: the first target is the first word.
    assert int(batch["text_ids"][0, 0]) == tokenizer.cls_id


def test_coca_starts_from_a_clip_runs_image_encoder(load_config, tmp_path):
    clip = load_config("clip.py", "tiny")
    clip.train.update(dict(batch_size=32, steps=2, log_every=1))
    clip.evals = {}
    clip.checkpoint.update(dict(every_steps=2, async_save=False))
    trainer.train_and_evaluate(clip, str(tmp_path / "clip"))
    c = load_config("coca.py")
    c.init_from.update(dict(path=str(tmp_path / "clip"), source="image_encoder", target="image_encoder"))
    model, meta, tokenizer, mesh = _setup(c)
    shapes = pipeline.batch_shapes(c.data, meta)
    boxed = state_lib.abstract_params(model, shapes, c.seed)
    tx, _ = optim.make_optimizer(c.optimizer, c.train.steps, nn.meta.unbox(boxed))
    rules = sharding.logical_rules(c.sharding.rules)
    state, shardings = state_lib.create_train_state(model, shapes, tx, mesh, rules, c.seed, boxed)
    state, how = state_lib.restore_or_init(state, shardings, None, c.init_from, meta.answer_vocab, tokenizer)
    from mmjax import pretrained  # pylint: disable=import-outside-toplevel

    source = pretrained.load_checkpoint(str(tmp_path / "clip")).params["image_encoder"]
    loaded = jax.device_get(state["params"]["image_encoder"])
    for name in ("patch_kernel", "pos_embedding", "cls"):
        np.testing.assert_array_equal(loaded[name], source[name])
    np.testing.assert_array_equal(loaded["encoder"]["layer_1"]["mlp"]["fc2"]["kernel"],
                                  source["encoder"]["layer_1"]["mlp"]["fc2"]["kernel"])
    assert "map_head" in loaded and "map_head" not in source  # CoCa's pooling head starts fresh


def test_captioning_needs_a_captioner(load_config):
    c = load_config("clip.py", "tiny")
    model, meta, tokenizer, mesh = _setup(c)
    with pytest.raises(ValueError, match="captioner"):
        get_task(dict(name="captioning"), model=model, config=c, meta=meta, tokenizer=tokenizer, mesh=mesh)
    from mmjax.evaluation.evaluators import evaluator_config  # pylint: disable=import-outside-toplevel

    c.evals = dict(captioning=evaluator_config("captioning"))
    with pytest.raises(ValueError, match="captioner"):
        build_evaluators(c, model=model, meta=meta, tokenizer=tokenizer, mesh=mesh)
