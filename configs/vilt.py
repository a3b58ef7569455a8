"""ViLT: single-stream transformer over image patches + words, pretrained with MLM + ITM.

    python -m mmjax.train --config=configs/vilt.py --workdir=/tmp/vilt          # tiny: CPU-sized, embedded data
    python -m mmjax.train --config=configs/vilt.py:base --dry_run               # ViLT-B/32 shapes

ITM mismatches mix in-batch captions with the example's own caption with its colour or shape changed
(`task.itm.negatives` weights), so that matching has to ground the words rather than spot the colour.
"""

import ml_collections
from ml_collections import config_dict

from mmjax import configlib
from mmjax.data import pipeline
from mmjax.evaluation.evaluators import evaluator_config
from mmjax.tasks import matching

common = configlib.sibling(__file__, "common")

VARIANTS = {
    # CPU-sized (~12 min on 2 cores): 48x48 images in 8x8 patches (36 patches) are fine enough to see the shape
    # and cheap enough for 3,000 steps; see README "Fusion models".
    "tiny": dict(
        model=dict(width=64, depth=3, heads=2, mlp_dim=256, patch_size=8, vocab_size=None),
        image_size=48, max_len=16, optimizer=dict(lr=1e-3, warmup_steps=200, weight_decay=0.01),
        train=dict(batch_size=64, steps=3000, checkpoint_every=500), eval_every=1000, eval_batch=250),
    # ViLT-B/32: ViT-B/32 weights + BERT-base vocabulary, 384x384 training resolution, 40 text tokens.
    "base": dict(
        model=dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=32, vocab_size=30522),
        image_size=384, max_len=40, optimizer=dict(lr=1e-4, warmup_steps=10_000, weight_decay=0.01),
        train=dict(batch_size=4096, steps=100_000, checkpoint_every=2000), eval_every=5000, eval_batch=1000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the ViLT config for `arg` = 'variant=V' (or just V: tiny | base)."""
    v = VARIANTS[configlib.parse_arg(arg, defaults=dict(variant="tiny"), choices=dict(variant=tuple(VARIANTS)))
                 ["variant"]]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = matching.default_task_config(mlm=1.0, itm=1.0)
    # Half of the mismatches change the shape: the attribute that needs grounding (colour is spotted early).
    c.task.itm.negatives.update(in_batch=1.0, other_color=1.0, other_shape=2.0)
    c.model = ml_collections.ConfigDict(dict(
        name="vilt", image_size=config_dict.placeholder(int), max_len=config_dict.placeholder(int),
        dtype="float32", remat=False, attention="einsum", scan_layers=False, mlm_head=True, itm_head=True,
        mpp_head=False, **v["model"]))
    if c.model.vocab_size is None:
        c.model.vocab_size = config_dict.placeholder(int)

    c.data = pipeline.embedded_data_config()  # with colour / shape hard negatives
    c.data.image_size, c.data.max_len = v["image_size"], v["max_len"]
    c.evals = ml_collections.ConfigDict()
    for kind in ("itm", "mlm"):
        c.evals[kind] = evaluator_config(kind, every_steps=v["eval_every"], batch_size=v["eval_batch"])
    c.optimizer = common.optimizer(**v["optimizer"])
    return common.add_tail(c, **v["train"])
