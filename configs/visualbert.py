"""VisualBERT: one BERT over words + projected region features (no box geometry: regions get one shared visual
position), pretrained with VisualBERT's two objectives, masked language modelling and sentence-image prediction
(ITM: does the caption describe the image).

    python -m mmjax.train --config=configs/visualbert.py --workdir=/tmp/visualbert     # tiny: CPU-sized, embedded data
    python -m mmjax.train --config=configs/visualbert.py:base --dry_run                # VisualBERT-base shapes

Regions on the embedded data are the same as UNITER's (configs/uniter.py); VisualBERT ignores their boxes. The
mismatches include UNITER's hard negatives (a swapped colour or shape word), so ITM must ground the words.
VisualBERT itself feeds 2048-d Faster R-CNN features to a BERT-base transformer, which is what `base` sizes the
transformer for; the region width comes from the data.
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
    # VisualBERT-base: BERT-base transformer and vocabulary.
    "base": dict(
        model=dict(width=768, depth=12, heads=12, mlp_dim=3072, vocab_size=30522), max_len=128,
        optimizer=dict(lr=5e-5, warmup_steps=10_000, weight_decay=0.01),
        train=dict(batch_size=512, steps=200_000, checkpoint_every=2000), eval_every=5000, eval_batch=1000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the VisualBERT config for `arg` = 'variant=V' (or just V: tiny | base)."""
    v = VARIANTS[configlib.parse_arg(arg, defaults=dict(variant="tiny"), choices=dict(variant=tuple(VARIANTS)))
                 ["variant"]]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = matching.default_task_config(mlm=1.0, itm=1.0)
    c.task.itm.negatives.update(in_batch=1.0, other_color=1.0, other_shape=2.0)
    c.model = ml_collections.ConfigDict(dict(
        name="visualbert", max_len=config_dict.placeholder(int), region_feat_dim=config_dict.placeholder(int),
        num_region_classes=config_dict.placeholder(int), dtype="float32", remat=False,
        attention="einsum", scan_layers=False, **v["model"]))
    if c.model.vocab_size is None:
        c.model.vocab_size = config_dict.placeholder(int)

    c.data = pipeline.embedded_data_config()
    c.data.max_len = v["max_len"]
    c.data.regions.enabled = True
    c.evals = ml_collections.ConfigDict()
    for kind in ("itm", "mlm"):
        c.evals[kind] = evaluator_config(kind, every_steps=v["eval_every"], batch_size=v["eval_batch"])
    c.optimizer = common.optimizer(**v["optimizer"])
    return common.add_tail(c, **v["train"])
