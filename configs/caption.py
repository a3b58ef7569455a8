"""Image captioning with an encoder-decoder captioner: ViT image tokens -> a causal text decoder that cross-attends
to them, trained with teacher-forced next-token cross-entropy; evaluated by decoding captions for the held-out
images (beam search) and scoring them with COCO's BLEU-4 and CIDEr-D against each image's 5 reference captions.

    python -m mmjax.train --config=configs/caption.py --workdir=/tmp/caption
    python -m mmjax.generate --workdir=/tmp/caption --images=DIR          # captions for a folder of images
    python -m mmjax.train --config=configs/caption.py:base --dry_run     # ViT-B/16 + a 6-layer 512-wide decoder

Start the image encoder from a CLIP run: --config.init_from.path=/tmp/clip --config.init_from.source=image_encoder
--config.init_from.target=image_encoder (same ViT sizes).
"""

import ml_collections
from ml_collections import config_dict

from mmjax import configlib
from mmjax.data import pipeline
from mmjax.evaluation.evaluators import evaluator_config
from mmjax.tasks import captioning

common = configlib.sibling(__file__, "common")

VARIANTS = {
    # Sized to caption the embedded data well in a few minutes on 2 CPU cores.
    "tiny": dict(
        image=dict(patch_size=8, width=64, depth=2, heads=2, mlp_dim=256),
        text=dict(width=64, depth=2, heads=2, mlp_dim=256, vocab_size=None),
        image_size=64, max_len=24,
        optimizer=dict(lr=2e-3, warmup_steps=100, weight_decay=0.05),
        train=dict(batch_size=128, steps=2000, checkpoint_every=500), eval_every=1000, eval_batch=500),
    "base": dict(
        image=dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072),
        text=dict(width=512, depth=6, heads=8, mlp_dim=2048, vocab_size=30522),  # BERT's WordPiece vocabulary
        image_size=224, max_len=40,
        optimizer=dict(lr=5e-4, warmup_steps=2000, weight_decay=0.05),
        train=dict(batch_size=1024, steps=50_000, checkpoint_every=2000), eval_every=5000, eval_batch=500),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the captioner config for `arg` = 'variant=V' (or the short form 'V'): tiny | base."""
    args = configlib.parse_arg(arg, defaults=dict(variant="tiny"), choices=dict(variant=tuple(VARIANTS)))
    v = VARIANTS[args["variant"]]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = captioning.default_task_config(label_smoothing=0.0)
    c.model = ml_collections.ConfigDict(dict(
        name="captioner",
        dtype="float32",
        remat=False,
        attention="einsum",  # "xla" | "cudnn" | "auto": jax.nn.dot_product_attention (no attention dropout)
        scan_layers=False,  # nn.scan over the image tower's layers
        # image_size, max_len and vocab_size come from the data (None: resolved when the run starts).
        image=dict(image_size=config_dict.placeholder(int), pool="cls", norm="pre", **v["image"]),
        text=dict(max_len=config_dict.placeholder(int), norm="pre", tie_embeddings=True,
                  **{k: val for k, val in v["text"].items() if k != "vocab_size"}),
    ))
    # None: the tokenizer's vocabulary, resolved when the run starts.
    c.model.text.vocab_size = v["text"]["vocab_size"] or config_dict.placeholder(int)
    c.data = pipeline.embedded_data_config(negatives=())
    c.data.image_size, c.data.max_len = v["image_size"], v["max_len"]
    c.evals = ml_collections.ConfigDict()
    c.evals.captioning = evaluator_config("captioning", every_steps=v["eval_every"], batch_size=v["eval_batch"],
                                          method="beam", beam_size=4)
    c.optimizer = common.optimizer(**v["optimizer"])
    return common.add_tail(c, **v["train"])
