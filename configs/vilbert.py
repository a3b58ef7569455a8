"""ViLBERT: two streams (words; image regions with an [IMG] token) that meet only in co-attentional transformer
layers, pretrained with masked multimodal modelling (MLM + masked region classification, both modalities masked
in the same rows) and alignment prediction (ITM from the product of the two pooled vectors).

    python -m mmjax.train --config=configs/vilbert.py --workdir=/tmp/vilbert      # tiny: CPU-sized, embedded data
    python -m mmjax.train --config=configs/vilbert.py:base --dry_run              # ViLBERT-base-like shapes

Regions on the embedded data are the same as UNITER's (configs/uniter.py, `pipeline.region_inputs`).
"""

import ml_collections
from ml_collections import config_dict

from mmjax import sharding
from mmjax.checkpoint import default_checkpoint_config
from mmjax.data import pipeline
from mmjax.optim import default_optimizer_config
from mmjax.tasks import matching

VARIANTS = {
    "tiny": dict(width=64, text_depth=1, image_depth=0, co_depth=2, heads=2, mlp_dim=256, max_len=16,
                 vocab_size=None),
    # ViLBERT-base: 12 BERT layers of which the last 6 are preceded by co-attention; one width for both streams
    # here (the paper's image stream is 1024 wide).
    "base": dict(width=768, text_depth=6, image_depth=0, co_depth=6, heads=12, mlp_dim=3072, max_len=36,
                 vocab_size=30522),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the ViLBERT config for `arg` = VARIANT (tiny | base)."""
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown vilbert variant {variant!r}; known: {sorted(VARIANTS)}")
    v = dict(VARIANTS[variant])
    max_len, vocab_size = v.pop("max_len"), v.pop("vocab_size")

    c = matching.default_task_config(mlm=1.0, itm=1.0, mrc=1.0)
    c.seed = 0
    c.masking = "joint"

    c.data = pipeline.default_data_config()
    c.data.max_len = max_len
    c.data.regions.enabled = True

    c.model = ml_collections.ConfigDict(dict(
        name="vilbert", max_len=max_len, region_feat_dim=pipeline.region_feat_dim(c.data),
        num_region_classes=pipeline.NUM_REGION_CLASSES, dtype="float32", remat=False, **v))
    c.model.vocab_size = config_dict.placeholder(int)
    if vocab_size is not None:
        c.model.vocab_size = vocab_size

    c.optimizer = default_optimizer_config()
    c.optimizer.lr = 1e-3 if variant == "tiny" else 1e-4
    c.optimizer.warmup_steps = 200 if variant == "tiny" else 10_000
    c.optimizer.weight_decay = 0.01

    c.train = ml_collections.ConfigDict(dict(
        batch_size=64 if variant == "tiny" else 512,
        steps=2000 if variant == "tiny" else 200_000,
        log_every=50, eval_every=1000 if variant == "tiny" else 5000))
    c.eval = ml_collections.ConfigDict(dict(batch_size=250 if variant == "tiny" else 1000))
    c.mesh = sharding.default_mesh_config()
    c.sharding = ml_collections.ConfigDict(dict(rules=[list(r) for r in sharding.DEFAULT_RULES]))
    c.checkpoint = default_checkpoint_config()
    c.checkpoint.every_steps = 500 if variant == "tiny" else 2000
    return c
