"""ViLBERT: two streams (words; image regions with an [IMG] token) that meet only in co-attentional transformer
layers, pretrained with masked multimodal modelling (MLM + masked region classification, both modalities masked
in the same rows) and alignment prediction (ITM from the product of the two pooled vectors).

    python -m mmjax.train --config=configs/vilbert.py --workdir=/tmp/vilbert      # tiny: CPU-sized, embedded data
    python -m mmjax.train --config=configs/vilbert.py:base --dry_run              # ViLBERT-base-like shapes

Regions on the embedded data are the same as UNITER's (configs/uniter.py).
"""

import ml_collections
from ml_collections import config_dict

from mmjax import configlib
from mmjax.data import pipeline
from mmjax.evaluation.evaluators import evaluator_config
from mmjax.tasks import matching

common = configlib.sibling(__file__, "common")

VARIANTS = {
    "tiny": dict(
        model=dict(width=64, text_depth=1, image_depth=0, co_depth=2, heads=2, mlp_dim=256, vocab_size=None),
        max_len=16, optimizer=dict(lr=1e-3, warmup_steps=200, weight_decay=0.01),
        train=dict(batch_size=64, steps=2000, checkpoint_every=500), eval_every=1000, eval_batch=250),
    # ViLBERT-base: 12 BERT layers of which the last 6 are preceded by co-attention; one width for both streams
    # here (the paper's image stream is 1024 wide).
    "base": dict(
        model=dict(width=768, text_depth=6, image_depth=0, co_depth=6, heads=12, mlp_dim=3072, vocab_size=30522),
        max_len=36, optimizer=dict(lr=1e-4, warmup_steps=10_000, weight_decay=0.01),
        train=dict(batch_size=512, steps=200_000, checkpoint_every=2000), eval_every=5000, eval_batch=1000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the ViLBERT config for `arg` = 'variant=V' (or just V: tiny | base)."""
    v = VARIANTS[configlib.parse_arg(arg, defaults=dict(variant="tiny"), choices=dict(variant=tuple(VARIANTS)))
                 ["variant"]]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = matching.default_task_config(mlm=1.0, itm=1.0, mrc=1.0)
    c.task.itm.negatives.update(in_batch=1.0, other_color=1.0, other_shape=2.0)
    c.task.masking = "joint"
    c.model = ml_collections.ConfigDict(dict(
        name="vilbert", max_len=config_dict.placeholder(int), region_feat_dim=config_dict.placeholder(int),
        num_region_classes=config_dict.placeholder(int), dtype="float32", remat=False,
        attention="einsum", **v["model"]))
    if c.model.vocab_size is None:
        c.model.vocab_size = config_dict.placeholder(int)

    c.data = pipeline.embedded_data_config()
    c.data.max_len = v["max_len"]
    c.data.regions.enabled = True
    c.evals = ml_collections.ConfigDict()
    for kind in ("itm", "mlm", "mrc"):
        c.evals[kind] = evaluator_config(kind, every_steps=v["eval_every"], batch_size=v["eval_batch"])
    c.optimizer = common.optimizer(**v["optimizer"])
    return common.add_tail(c, **v["train"])
