"""CLIP contrastive pretraining.

    python -m mmjax.train --config=configs/clip.py --workdir=/tmp/clip            # tiny: CPU-sized, embedded data
    python -m mmjax.train --config=configs/clip.py:base --dry_run                 # ViT-B/32 + 12x512 text tower
    python -m mmjax.train --config=configs/clip.py:large --dry_run                # ViT-L/14 + 12x768 text tower

Variants: tiny (default), base, large. Append `,sigmoid` for the SigLIP loss (e.g. `configs/clip.py:tiny,sigmoid`).
"""

import math

import ml_collections
from ml_collections import config_dict

from mmjax import sharding
from mmjax.checkpoint import default_checkpoint_config
from mmjax.data.pipeline import default_data_config
from mmjax.optim import default_optimizer_config

VARIANTS = {
    # Sized to reach >= 95% zero-shot on the embedded data in a few minutes on 2 CPU cores.
    "tiny": dict(
        image=dict(patch_size=8, width=64, depth=2, heads=2, mlp_dim=256),
        text=dict(width=64, depth=1, heads=2, mlp_dim=256),
        embed_dim=64, image_size=64, max_len=24, vocab_size=None),
    # CLIP ViT-B/32: 12x768 image tower, 12x512 text tower, 512-d joint space.
    "base": dict(
        image=dict(patch_size=32, width=768, depth=12, heads=12, mlp_dim=3072),
        text=dict(width=512, depth=12, heads=8, mlp_dim=2048),
        embed_dim=512, image_size=224, max_len=77, vocab_size=49408),
    # CLIP ViT-L/14: 24x1024 image tower, 12x768 text tower, 768-d joint space.
    "large": dict(
        image=dict(patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096),
        text=dict(width=768, depth=12, heads=12, mlp_dim=3072),
        embed_dim=768, image_size=224, max_len=77, vocab_size=49408),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config for `arg` = 'VARIANT[,sigmoid]'."""
    parts = (arg or "tiny").split(",")
    variant, loss = parts[0], ("sigmoid" if "sigmoid" in parts[1:] else "softmax")
    if variant not in VARIANTS:
        raise ValueError(f"unknown clip variant {variant!r}; known: {sorted(VARIANTS)}")
    v = VARIANTS[variant]

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "contrastive"

    c.model = ml_collections.ConfigDict(dict(
        name="clip",
        loss=loss,
        embed_dim=v["embed_dim"],
        logit_scale_init=math.log(10.0) if loss == "sigmoid" else math.log(1 / 0.07),
        logit_scale_max=math.log(100.0),
        logit_bias_init=-10.0,
        dtype="float32",  # compute dtype; params stay float32. 'bfloat16' for accelerators.
        remat=False,
        image=dict(image_size=v["image_size"], pool="cls", norm="pre", **v["image"]),
        text=dict(max_len=v["max_len"], causal=True, pool="eos", norm="pre", **v["text"]),
    ))
    c.model.text.vocab_size = config_dict.placeholder(int)
    if v["vocab_size"] is not None:
        c.model.text.vocab_size = v["vocab_size"]

    c.data = default_data_config()
    c.data.image_size = v["image_size"]
    c.data.max_len = v["max_len"]

    c.optimizer = default_optimizer_config()
    c.optimizer.lr = 2e-3 if variant == "tiny" else 5e-4
    c.optimizer.warmup_steps = 100 if variant == "tiny" else 2000
    c.optimizer.weight_decay = 0.05 if variant == "tiny" else 0.2

    c.train = ml_collections.ConfigDict(dict(
        batch_size=128 if variant == "tiny" else 32768,
        steps=1500 if variant == "tiny" else 100_000,
        log_every=50,
        eval_every=500 if variant == "tiny" else 5000,
    ))
    c.eval = ml_collections.ConfigDict(dict(batch_size=500 if variant == "tiny" else 1000,
                                            retrieval_ks=(1, 5, 10)))

    c.mesh = sharding.default_mesh_config()
    c.sharding = ml_collections.ConfigDict(dict(rules=[list(r) for r in sharding.DEFAULT_RULES]))
    c.checkpoint = default_checkpoint_config()
    c.checkpoint.every_steps = 250 if variant == "tiny" else 2000
    return c
