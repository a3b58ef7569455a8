"""UNITER: single-stream transformer over words + region features (with box geometry), pretrained with MLM, ITM,
word-region alignment (WPA/WRA, IPOT), masked region feature regression (MRFR) and masked region
classification (MRC-kl), one modality masked at a time (conditional masking).

    python -m mmjax.train --config=configs/uniter.py --workdir=/tmp/uniter        # tiny: CPU-sized, embedded data
    python -m mmjax.train --config=configs/uniter.py:base --dry_run               # UNITER-base shapes

Regions on the embedded data (its source's `regions_from_boxes`, mmjax/data/sources.py): the shape's tight box,
the whole image and a 2x2 grid; each region's feature is its box's pixels resampled to 8x8x3; MRC's soft targets
are the fraction of the box the object covers (object class) vs background. There is no detector: UNITER itself
uses 36-100 Faster R-CNN boxes with 2048-d features, which is what `base` sizes the transformer for. The region
width and class count come from the data.
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
        model=dict(width=64, depth=3, heads=2, mlp_dim=256, vocab_size=None), max_len=16,
        optimizer=dict(lr=1e-3, warmup_steps=200, weight_decay=0.01),
        train=dict(batch_size=64, steps=2000, checkpoint_every=500), eval_every=1000, eval_batch=250),
    # UNITER-base: BERT-base transformer and vocabulary.
    "base": dict(
        model=dict(width=768, depth=12, heads=12, mlp_dim=3072, vocab_size=30522), max_len=60,
        optimizer=dict(lr=5e-5, warmup_steps=10_000, weight_decay=0.01),
        train=dict(batch_size=3072, steps=200_000, checkpoint_every=2000), eval_every=5000, eval_batch=1000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the UNITER config for `arg` = 'variant=V' (or just V: tiny | base)."""
    v = VARIANTS[configlib.parse_arg(arg, defaults=dict(variant="tiny"), choices=dict(variant=tuple(VARIANTS)))
                 ["variant"]]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = matching.default_task_config(mlm=1.0, itm=1.0, wpa=0.1, mrfr=1.0, mrc=1.0)
    c.task.itm.negatives.update(in_batch=1.0, other_color=1.0, other_shape=2.0)
    c.task.masking = "conditional"
    c.model = ml_collections.ConfigDict(dict(
        name="uniter", max_len=config_dict.placeholder(int), region_feat_dim=config_dict.placeholder(int),
        num_region_classes=config_dict.placeholder(int), norm="post", dtype="float32", remat=False,
        attention="einsum", scan_layers=False, **v["model"]))
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
