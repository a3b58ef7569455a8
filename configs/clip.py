"""CLIP contrastive pretraining.

    python -m mmjax.train --config=configs/clip.py --workdir=/tmp/clip            # tiny: CPU-sized, embedded data
    python -m mmjax.train --config=configs/clip.py:base --dry_run                 # ViT-B/32 + 12x512 text tower
    python -m mmjax.train --config=configs/clip.py:variant=large,loss=sigmoid --dry_run   # SigLIP ViT-L/14

Arguments: variant (tiny | base | large) and loss (softmax = CLIP | sigmoid = SigLIP); the short forms
`configs/clip.py:base` and `configs/clip.py:tiny,sigmoid` work too.
"""

import ml_collections
from ml_collections import config_dict

from mmjax import configlib
from mmjax.data import pipeline
from mmjax.evaluation.evaluators import evaluator_config

common = configlib.sibling(__file__, "common")

VARIANTS = {
    # Sized to reach ~93-98% zero-shot on the embedded data (seed-dependent) in a few minutes on 2 CPU cores.
    "tiny": dict(
        image=dict(patch_size=8, width=64, depth=2, heads=2, mlp_dim=256),
        text=dict(width=64, depth=1, heads=2, mlp_dim=256, vocab_size=None),
        embed_dim=64, image_size=64, max_len=24,
        optimizer=dict(lr=2e-3, warmup_steps=100, weight_decay=0.05),
        train=dict(batch_size=128, steps=1500, checkpoint_every=250), eval_every=500, eval_batch=500),
    # CLIP ViT-B/32: 12x768 image tower, 12x512 text tower, 512-d joint space.
    "base": dict(
        image=dict(patch_size=32, width=768, depth=12, heads=12, mlp_dim=3072),
        text=dict(width=512, depth=12, heads=8, mlp_dim=2048, vocab_size=49408),
        embed_dim=512, image_size=224, max_len=77,
        optimizer=dict(lr=5e-4, warmup_steps=2000, weight_decay=0.2),
        train=dict(batch_size=32768, steps=100_000, checkpoint_every=2000), eval_every=5000, eval_batch=1000),
    # CLIP ViT-L/14: 24x1024 image tower, 12x768 text tower, 768-d joint space.
    "large": dict(
        image=dict(patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096),
        text=dict(width=768, depth=12, heads=12, mlp_dim=3072, vocab_size=49408),
        embed_dim=768, image_size=224, max_len=77,
        optimizer=dict(lr=5e-4, warmup_steps=2000, weight_decay=0.2),
        train=dict(batch_size=32768, steps=100_000, checkpoint_every=2000), eval_every=5000, eval_batch=1000),
}
LOSSES = ("softmax", "sigmoid")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config for `arg` = 'variant=V,loss=L' (or the short form 'V[,sigmoid]')."""
    args = configlib.parse_arg(arg, defaults=dict(variant="tiny", loss="softmax"),
                               choices=dict(variant=tuple(VARIANTS), loss=LOSSES))
    v = VARIANTS[args["variant"]]

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = ml_collections.ConfigDict(dict(name="contrastive", loss_impl="auto"))  # auto | dense | sharded
    c.model = ml_collections.ConfigDict(dict(
        name="clip",
        loss=args["loss"],
        embed_dim=v["embed_dim"],
        logit_scale_init=config_dict.placeholder(float),  # None: log(1 / 0.07) for softmax, log(10) for sigmoid
        dtype="float32",  # compute dtype; params stay float32. 'bfloat16' for accelerators.
        remat=False,
        remat_policy="nothing_saveable",  # a jax.checkpoint_policies name, with remat
        attention="einsum",  # "xla" | "cudnn" | "auto": jax.nn.dot_product_attention (no attention dropout)
        scan_layers=False,  # nn.scan over each tower's layers: compile time flat in depth (params encoder/layers)
        # image_size, max_len and vocab_size come from the data (None: resolved when the run starts).
        # ln_pre: CLIP's LayerNorm before the transformer (OpenAI's and HF's have it; export needs it).
        image=dict(image_size=config_dict.placeholder(int), pool="cls", norm="pre", ln_pre=True, **v["image"]),
        text=dict(max_len=config_dict.placeholder(int), causal=True, pool="eos", norm="pre", **v["text"]),
    ))
    if c.model.text.vocab_size is None:
        c.model.text.vocab_size = config_dict.placeholder(int)

    c.data = pipeline.embedded_data_config(negatives=())  # classes + prompts for zero-shot; no hard negatives
    c.data.image_size, c.data.max_len = v["image_size"], v["max_len"]
    c.evals = ml_collections.ConfigDict()
    c.evals.zero_shot = evaluator_config("zero_shot", every_steps=v["eval_every"], batch_size=v["eval_batch"])
    c.evals.retrieval = evaluator_config("retrieval", every_steps=v["eval_every"], batch_size=v["eval_batch"])
    c.optimizer = common.optimizer(**v["optimizer"])
    return common.add_tail(c, **v["train"])
