"""OSCAR: one transformer over words, object tags and region features, pretrained with the masked token loss (over
words and tags) and the contrastive loss on polluted tags (OSCAR's two objectives).

    python -m mmjax.train --config=configs/oscar.py --workdir=/tmp/oscar        # tiny: CPU-sized, embedded data
    python -m mmjax.train --config=configs/oscar.py:base --dry_run              # OSCAR-base shapes

Tags (`data.regions.tags`): the names of the object classes the regions hold (a region's soft class target above
0.5). On the embedded data the regions are made from the shape's box (see configs/uniter.py), so the tag is the
shape's name, the word the caption's shape word must agree with: OSCAR's anchor points. The contrastive loss is the
matching task with `task.itm.swap = "tags"`: a mismatch keeps the caption and the regions and takes another
example's tags (never identical ones), and the ITM head learns to tell polluted tags from the image's own.
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
    # OSCAR-base: BERT-base transformer and vocabulary, 2048-d Faster R-CNN features + 6-d box positions.
    "base": dict(
        model=dict(width=768, depth=12, heads=12, mlp_dim=3072, vocab_size=30522), max_len=35,
        optimizer=dict(lr=5e-5, warmup_steps=10_000, weight_decay=0.01),
        train=dict(batch_size=768, steps=1_000_000, checkpoint_every=2000), eval_every=5000, eval_batch=1000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the OSCAR config for `arg` = 'variant=V' (or just V: tiny | base)."""
    v = VARIANTS[configlib.parse_arg(arg, defaults=dict(variant="tiny"), choices=dict(variant=tuple(VARIANTS)))
                 ["variant"]]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = matching.default_task_config(mlm=1.0, itm=1.0)
    c.task.itm.swap = "tags"  # the contrastive loss on polluted tags
    c.model = ml_collections.ConfigDict(dict(
        name="oscar", max_len=2 * v["max_len"], region_feat_dim=config_dict.placeholder(int), norm="post",
        dtype="float32", remat=False, attention="einsum", scan_layers=False, **v["model"]))
    if c.model.vocab_size is None:
        c.model.vocab_size = config_dict.placeholder(int)

    c.data = pipeline.embedded_data_config()
    c.data.max_len = v["max_len"]
    c.data.regions.enabled = True
    c.data.regions.tags = True
    c.evals = ml_collections.ConfigDict()
    c.evals.itm = evaluator_config("itm", every_steps=v["eval_every"], batch_size=v["eval_batch"], swap="tags")
    # Caption matching (a mismatched caption with the image's own tags): not what OSCAR's head is trained for,
    # reported to show what polluted-tag training transfers.
    c.evals.itm_caption = evaluator_config("itm", every_steps=v["eval_every"], batch_size=v["eval_batch"])
    c.evals.mlm = evaluator_config("mlm", every_steps=v["eval_every"], batch_size=v["eval_batch"])
    c.optimizer = common.optimizer(**v["optimizer"])
    return common.add_tail(c, **v["train"])
