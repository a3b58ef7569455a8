"""Fine-tuning and downstream evaluation: init_from a run with another head, the VQA task and evaluator on the
embedded questions, zero-shot on a folder-per-class dataset, ITM re-ranking against exhaustive ranking, layer-wise
learning-rate decay."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from mmjax import optim, pretrained, sharding
from mmjax.data import image_folder, pipeline, sources
from mmjax.evaluation import evaluators
from mmjax.evaluation.evaluators import evaluator_config


def _tiny(c):
    """Shrinks a ViLT config to seconds per run on the 8 fake devices."""
    c.model.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    c.train.update(dict(batch_size=16, log_every=2))
    c.optimizer.warmup_steps = 1
    c.checkpoint.update(dict(every_steps=1000, async_save=False))
    return c


def _vqa_config(load_config, vqa_data_dir, steps=4):
    c = _tiny(load_config("vqa.py"))
    c.data.sources.easy_vqa.data_dir = vqa_data_dir
    c.train.steps = steps
    c.evals.vqa.update(dict(every_steps=steps, batch_size=256, data=dict(split="test[:256]")))
    return c


def test_vqa_fine_tunes_a_pretraining_run_and_writes_official_results(load_config, vqa_data_dir, tmp_path):
    from mmjax import evaluate, train  # pylint: disable=import-outside-toplevel

    pre = _tiny(load_config("vilt.py"))
    pre.train.steps = 2
    del pre.evals["itm"]
    pre.evals.mlm.update(dict(every_steps=2, batch_size=200))
    train.train_and_evaluate(pre, str(tmp_path / "pre"))

    c = _vqa_config(load_config, vqa_data_dir)
    c.init_from.path = str(tmp_path / "pre")
    metrics = train.train_and_evaluate(c, str(tmp_path / "vqa"))
    assert 0.0 <= metrics["vqa/accuracy"] <= 1.0 and metrics["vqa/num_questions"] == 256
    assert {"vqa/accuracy_yes_no", "vqa/accuracy_other"} <= set(metrics)
    # The official results format, one answer per question, from the answer vocabulary.
    results = json.loads((tmp_path / "vqa" / "vqa_results_step4.json").read_text())
    vocab = json.loads((tmp_path / "vqa" / "answer_vocab.json").read_text())
    assert len(results) == 256 and set(results[0]) == {"question_id", "answer"}
    assert {r["answer"] for r in results} <= set(vocab) and len(vocab) == 13
    # Every backbone parameter came from the pretraining run, bit for bit; the answer head is new.
    fine = pretrained.load_checkpoint(str(tmp_path / "vqa"), step=4)
    start = pretrained.load_checkpoint(str(tmp_path / "pre"))
    assert "vqa_head" in fine.params and "vqa_head" not in start.params
    ckpt = jax.tree.map(np.asarray, start.params)
    params, report = pretrained.graft(fine.params, ckpt)
    assert sorted({p.split("/")[0] for p in report.new}) == ["vqa_head"]
    assert {p.split("/")[0] for p in report.unused} == {"itm_head", "mlm_bias", "mlm_transform"}
    assert not report.skipped and len(report.loaded) > 20
    # Bit for bit: a fine-tune at learning rate zero saves exactly the parameters init_from handed it.
    c0 = _vqa_config(load_config, vqa_data_dir, steps=1)
    c0.init_from.path = str(tmp_path / "pre")
    c0.optimizer.lr = 0.0
    train.train_and_evaluate(c0, str(tmp_path / "vqa0"))
    initial = traverse_util.flatten_dict(pretrained.load_checkpoint(str(tmp_path / "vqa0")).params, sep="/")
    pre_flat = traverse_util.flatten_dict(start.params, sep="/")
    assert {p.split("/")[0] for p in set(initial) - set(pre_flat)} == {"vqa_head"}
    loaded = [p for p in initial if p in pre_flat]
    assert len(loaded) == len(report.loaded)
    for path in loaded:
        np.testing.assert_array_equal(np.asarray(initial[path]), np.asarray(pre_flat[path]), err_msg=path)
    # mmjax.evaluate on the fine-tuned run gives the trainer's final eval, and writes its report.
    again, samples, step = evaluate.evaluate(json_config(tmp_path / "vqa"), str(tmp_path / "vqa"))
    assert step == 4 and again["vqa/accuracy"] == pytest.approx(metrics["vqa/accuracy"], abs=1e-9)
    assert len(samples["vqa"]) == 12 and samples["vqa"][0].image.shape == (48, 48, 3)


def json_config(workdir):
    from mmjax import checkpoint  # pylint: disable=import-outside-toplevel

    return checkpoint.load_config(str(workdir))


def test_init_from_errors_name_the_culprit(load_config, vqa_data_dir, tmp_path):
    from mmjax import train  # pylint: disable=import-outside-toplevel

    c = _vqa_config(load_config, vqa_data_dir, steps=1)
    c.init_from.path = str(tmp_path / "nothing")
    os.makedirs(c.init_from.path)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train.train_and_evaluate(c, str(tmp_path / "a"))
    # A run whose VQA head answered other answers.
    run = tmp_path / "other"
    c.init_from.path = None
    train.train_and_evaluate(c, str(run))
    (run / "answer_vocab.json").write_text(json.dumps(list(reversed(json.loads(
        (run / "answer_vocab.json").read_text())))))
    c.init_from.path = str(run)
    with pytest.raises(ValueError, match="VQA head answers 13 answers.*differ first at index 0"):
        train.train_and_evaluate(c, str(tmp_path / "b"))
    # strict: the run has every parameter, so only a shape change breaks it.
    (run / "answer_vocab.json").unlink()
    c.init_from.strict = True
    c.model.width = 64
    with pytest.raises(ValueError, match="init_from.strict: .*skipped: model"):
        train.train_and_evaluate(c, str(tmp_path / "c"))


@pytest.mark.parametrize("model", ["vilt", "uniter", "vilbert", "fusion", "visualbert", "lxmert", "oscar"])
def test_vqa_configs_drop_every_pretraining_head(load_config, model):
    """Heads the model has but the pretraining config left at their default (on) must be off too, so that
    init_from reports them as unused instead of carrying (and weight-decaying) them through the fine-tune."""
    from mmjax import models

    c = load_config("vqa.py", model)
    cls = models.MODELS[c.model.name]
    heads = {f.name: c.model.get(f.name, f.default) for f in dataclasses.fields(cls) if f.name.endswith("_head")}
    assert len(heads) >= 2 and not any(heads.values()), heads


def test_graft_loads_matching_leaves_and_reports_the_rest():
    model = {"enc": {"w": np.zeros((2, 3)), "b": np.zeros(3)}, "head": {"w": np.zeros((3, 4))}}
    ckpt = {"enc": {"w": np.ones((2, 3)), "b": np.ones(5)}, "old_head": {"w": np.ones((3, 2))}}
    params, report = pretrained.graft(model, ckpt)
    assert report.loaded == ["enc/w"] and report.new == ["head/w"] and report.unused == ["old_head/w"]
    assert report.skipped == [("enc/b", (3,), (5,))]
    np.testing.assert_array_equal(params["enc"]["w"], 1.0)
    np.testing.assert_array_equal(params["enc"]["b"], 0.0)
    table = report.table()
    assert table.startswith("1 loaded, 1 new, 1 skipped, 1 unused") and "checkpoint (5,)" in table
    with pytest.raises(ValueError, match="strict"):
        pretrained.graft(model, ckpt, strict=True)


def test_layer_decay_and_head_multiplier():
    params = {"text_embeddings": {"word_embedding": np.zeros((4, 2))}, "encoder": {
        "layer_0": {"w": np.zeros((2, 2))}, "layer_1": {"w": np.zeros((2, 2))}}, "pooler": {"kernel": np.zeros((2, 2))},
        "vqa_head": {"out": {"kernel": np.zeros((2, 3))}}}
    config = optim.default_optimizer_config()
    config.update(dict(layer_decay=0.5, head_lr_mult=10.0, weight_decay=0.0, grad_clip=0.0, warmup_steps=0))
    mult = optim.lr_multipliers(params, config)
    assert mult["text_embeddings"]["word_embedding"] == 0.125  # layer 0 of 2: 0.5^3
    assert mult["encoder"]["layer_0"]["w"] == 0.25 and mult["encoder"]["layer_1"]["w"] == 0.5
    assert mult["pooler"]["kernel"] == 1.0 and mult["vqa_head"]["out"]["kernel"] == 10.0
    # The update of each parameter is the plain AdamW update times its multiplier.
    tx, _ = optim.make_optimizer(config, 10, params)
    plain_config = optim.default_optimizer_config()
    plain_config.update(dict(weight_decay=0.0, grad_clip=0.0, warmup_steps=0))
    plain, _ = optim.make_optimizer(plain_config, 10, params)
    grads = jax.tree.map(lambda x: np.ones_like(x), params)
    got, _ = tx.update(grads, tx.init(params), params)
    want, _ = plain.update(grads, plain.init(params), params)
    for g, w, m in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(mult)):
        np.testing.assert_allclose(g, m * np.asarray(w), rtol=1e-6)


def test_zero_shot_on_a_folder_per_class_dataset(load_config, tmp_path):
    # 3 classes of solid-colour squares; prompts name the colours the CLIP config's tokenizer knows.
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for name, rgb in colours.items():
        (tmp_path / "folders" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((20, 20, 3), rgb, np.uint8)).save(tmp_path / "folders" / name / f"{i}.png")
    path = image_folder.build_image_folder(str(tmp_path / "folders"), str(tmp_path / "tfds"))
    c = load_config("clip.py")
    c.data.eval_sources.colours = sources.source_config(dir=path, kind="image_label", label_key="label",
                                                        eval_split="test", prompts=("a {} shape.",),
                                                        prompt_set="photo")
    c.evals.colours = evaluator_config("zero_shot", batch_size=8, data=dict(source="colours"))
    meta = pipeline.dataset_meta(c.data)
    assert meta.source("colours").class_names == ("blue", "green", "red")  # sorted folder names
    assert meta.source("colours").prompts == ("a photo of a {}.", "a {} shape.")
    assert meta.train_sources == ("easy_vqa",)  # eval-only sources are never trained on
    batches = list(pipeline.eval_batches(c.data, pipeline.load_tokenizer(c.data), global_batch_size=8,
                                         source="colours", process_index=0, process_count=1))
    assert sum(b["mask"].sum() for b in batches) == 12
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # Through the real evaluator, with a "dual encoder" that embeds an image as its mean colour and a text as the
    # sum of its colour words' colours: every image is classified right, by prompts naming the folder classes.
    tokenizer = pipeline.load_tokenizer(c.data)
    model = ColourModel(vocab_size=tokenizer.vocab_size,
                        colour_ids=tuple(int(tokenizer.encode([n], 3)[0][0, 1]) for n in ("red", "green", "blue")))
    mesh = sharding.create_mesh(dict(data=-1, fsdp=1, tensor=1))
    built = evaluators.build_evaluators(c, model=model, meta=meta, tokenizer=tokenizer, mesh=mesh,
                                        only=["colours"])
    metrics = evaluators.run_evaluators(built, {"unused": np.zeros(())})
    assert metrics == {"colours/accuracy": 1.0, "colours/chance": 1 / 3, "colours/num_examples": 12.0}
    with pytest.raises(ValueError, match="needs at least 2 class folders"):
        image_folder.build_image_folder(str(tmp_path / "folders" / "red"), str(tmp_path / "x"))


class ColourModel(nn.Module):
    """A parameter-free stand-in dual encoder: images -> mean RGB, texts -> summed colours of red / green / blue."""

    vocab_size: int
    colour_ids: tuple[int, int, int]

    def encode_image(self, image):
        x = image.mean(axis=(1, 2))
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def encode_text(self, ids, mask):
        table = jnp.zeros((self.vocab_size, 3)).at[jnp.asarray(self.colour_ids)].set(jnp.eye(3))
        x = (table[ids] * mask[..., None]).sum(1) + 1e-6
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def __call__(self, batch, train=False):
        return {}


def test_itm_reranking_equals_exhaustive_ranking_when_k_covers_everything(load_config, tmp_path):
    from mmjax import train  # pylint: disable=import-outside-toplevel

    clip = load_config("clip.py")
    clip.model.image.update(dict(patch_size=16, width=32, depth=1, heads=2, mlp_dim=64))
    clip.model.text.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
    clip.train.update(dict(steps=2, batch_size=16, log_every=2))
    clip.evals = ml_collections.ConfigDict()
    clip.checkpoint.async_save = False
    train.train_and_evaluate(clip, str(tmp_path / "clip"))

    c = _tiny(load_config("vilt.py"))
    c.train.steps = 2
    c.evals = ml_collections.ConfigDict()
    exhaustive = dict(every_steps=2, batch_size=64, max_images=24, captions="all")
    c.evals.exhaustive = evaluator_config("itm_retrieval", **exhaustive)
    c.evals.reranked = evaluator_config("itm_retrieval", **exhaustive, first_stage=str(tmp_path / "clip"),
                                        k_test=24 * 5)
    metrics = train.train_and_evaluate(c, str(tmp_path / "vilt"))
    for key in ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@10"):
        assert metrics[f"reranked/{key}"] == metrics[f"exhaustive/{key}"], key
    assert metrics["exhaustive/num_images"] == 24 and metrics["exhaustive/num_texts"] == 24 * 5
    assert evaluators.KIND_DEFAULTS["itm_retrieval"]["k_test"] == 16


def test_vilt_trains_on_padded_images_of_its_fine_tuning_resolution(load_config, tmp_path):
    from mmjax import train  # pylint: disable=import-outside-toplevel

    c = _tiny(load_config("vilt.py"))
    c.data.update(dict(image_size=32, image_canvas=48, size_divisor=8))
    c.model.pos_interpolation = "hf"
    c.train.steps = 2
    del c.evals["itm"]
    c.evals.mlm.update(dict(every_steps=2, batch_size=200))
    metrics = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert 0.0 <= metrics["mlm/acc"] <= 1.0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["image_size"] == 32  # the position table's grid; the batches are 48 x 48 with a mask
