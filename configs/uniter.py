"""UNITER: single-stream transformer over words + region features (with box geometry), pretrained with MLM, ITM,
word-region alignment (WPA/WRA, IPOT), masked region feature regression (MRFR) and masked region
classification (MRC-kl), one modality masked at a time (conditional masking).

    python -m mmjax.train --config=configs/uniter.py --workdir=/tmp/uniter        # tiny: CPU-sized, embedded data
    python -m mmjax.train --config=configs/uniter.py:base --dry_run               # UNITER-base shapes

Regions on the embedded data (see `pipeline.region_inputs`): the shape's tight box, the whole image and a 2x2
grid; each region's feature is its box's pixels resampled to 8x8x3; MRC's soft targets are the fraction of the
box the object covers (object class) vs background. There is no detector: UNITER itself uses 36-100 Faster
R-CNN boxes with 2048-d features, which is what `base` sizes the transformer for.
"""

import ml_collections
from ml_collections import config_dict

from mmjax import sharding
from mmjax.checkpoint import default_checkpoint_config
from mmjax.data import pipeline
from mmjax.optim import default_optimizer_config
from mmjax.tasks import matching

VARIANTS = {
    "tiny": dict(width=64, depth=3, heads=2, mlp_dim=256, max_len=16, vocab_size=None),
    # UNITER-base: BERT-base transformer and vocabulary.
    "base": dict(width=768, depth=12, heads=12, mlp_dim=3072, max_len=60, vocab_size=30522),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the UNITER config for `arg` = VARIANT (tiny | base)."""
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown uniter variant {variant!r}; known: {sorted(VARIANTS)}")
    v = dict(VARIANTS[variant])
    max_len, vocab_size = v.pop("max_len"), v.pop("vocab_size")

    c = matching.default_task_config(mlm=1.0, itm=1.0, wpa=0.1, mrfr=1.0, mrc=1.0)
    c.seed = 0
    c.masking = "conditional"

    c.data = pipeline.default_data_config()
    c.data.max_len = max_len
    c.data.regions.enabled = True

    c.model = ml_collections.ConfigDict(dict(
        name="uniter", max_len=max_len, region_feat_dim=pipeline.region_feat_dim(c.data),
        num_region_classes=pipeline.NUM_REGION_CLASSES, norm="post", dtype="float32", remat=False, **v))
    c.model.vocab_size = config_dict.placeholder(int)
    if vocab_size is not None:
        c.model.vocab_size = vocab_size

    c.optimizer = default_optimizer_config()
    c.optimizer.lr = 1e-3 if variant == "tiny" else 5e-5
    c.optimizer.warmup_steps = 200 if variant == "tiny" else 10_000
    c.optimizer.weight_decay = 0.01

    c.train = ml_collections.ConfigDict(dict(
        batch_size=64 if variant == "tiny" else 3072,
        steps=2000 if variant == "tiny" else 200_000,
        log_every=50, eval_every=1000 if variant == "tiny" else 5000))
    c.eval = ml_collections.ConfigDict(dict(batch_size=250 if variant == "tiny" else 1000))
    c.mesh = sharding.default_mesh_config()
    c.sharding = ml_collections.ConfigDict(dict(rules=[list(r) for r in sharding.DEFAULT_RULES]))
    c.checkpoint = default_checkpoint_config()
    c.checkpoint.every_steps = 500 if variant == "tiny" else 2000
    return c
