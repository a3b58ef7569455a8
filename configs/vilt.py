"""ViLT: single-stream transformer over image patches + words, pretrained with MLM + ITM.

    python -m mmjax.train --config=configs/vilt.py --workdir=/tmp/vilt          # tiny: CPU-sized, embedded data
    python -m mmjax.train --config=configs/vilt.py:base --dry_run               # ViLT-B/32 shapes

ITM mismatches mix in-batch captions with the example's own caption with its colour or shape changed
(`itm.negatives` weights), so that matching has to ground the words rather than spot the colour.
"""

import ml_collections
from ml_collections import config_dict

from mmjax import sharding
from mmjax.checkpoint import default_checkpoint_config
from mmjax.data.pipeline import default_data_config
from mmjax.optim import default_optimizer_config
from mmjax.tasks import matching

VARIANTS = {
    # CPU-sized (~12 min on 2 cores): 48x48 images in 8x8 patches (36 patches) are fine enough to see the shape
    # and cheap enough for 3,000 steps; see README "Fusion models".
    "tiny": dict(width=64, depth=3, heads=2, mlp_dim=256, patch_size=8, image_size=48, max_len=16,
                 vocab_size=None),
    # ViLT-B/32: ViT-B/32 weights + BERT-base vocabulary, 384x384 training resolution, 40 text tokens.
    "base": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=32, image_size=384, max_len=40,
                 vocab_size=30522),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the ViLT config for `arg` = VARIANT (tiny | base)."""
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown vilt variant {variant!r}; known: {sorted(VARIANTS)}")
    v = dict(VARIANTS[variant])
    image_size, max_len, vocab_size = v.pop("image_size"), v.pop("max_len"), v.pop("vocab_size")

    c = matching.default_task_config(mlm=1.0, itm=1.0)
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        name="vilt", image_size=image_size, max_len=max_len, dtype="float32", remat=False,
        mlm_head=True, itm_head=True, mpp_head=False, **v))
    c.model.vocab_size = config_dict.placeholder(int)
    if vocab_size is not None:
        c.model.vocab_size = vocab_size

    c.data = default_data_config()
    c.data.image_size, c.data.max_len = image_size, max_len

    c.optimizer = default_optimizer_config()
    c.optimizer.lr = 1e-3 if variant == "tiny" else 1e-4
    c.optimizer.warmup_steps = 200 if variant == "tiny" else 10_000
    c.optimizer.weight_decay = 0.01

    c.train = ml_collections.ConfigDict(dict(
        batch_size=64 if variant == "tiny" else 4096,
        steps=3000 if variant == "tiny" else 100_000,
        log_every=50, eval_every=1000 if variant == "tiny" else 5000))
    c.eval = ml_collections.ConfigDict(dict(batch_size=250 if variant == "tiny" else 1000))
    c.mesh = sharding.default_mesh_config()
    c.sharding = ml_collections.ConfigDict(dict(rules=[list(r) for r in sharding.DEFAULT_RULES]))
    c.checkpoint = default_checkpoint_config()
    c.checkpoint.every_steps = 500 if variant == "tiny" else 2000
    return c
