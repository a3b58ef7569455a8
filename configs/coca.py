"""CoCa (contrastive captioner): one image encoder, a unimodal causal text decoder whose end token gives the
contrastive text embedding, and a multimodal decoder on top of it that cross-attends to the image tokens and
captions; contrastive (InfoNCE, learnable temperature) and captioning losses in one step (weights 1 and 2, as in
the paper). Evaluated as a dual encoder (zero-shot classification, retrieval) and as a captioner (BLEU-4, CIDEr).

    python -m mmjax.train --config=configs/coca.py --workdir=/tmp/coca
    python -m mmjax.generate --workdir=/tmp/coca --images=DIR

Start the image encoder from a CLIP run (configs/clip.py, same ViT sizes): --config.init_from.path=/tmp/clip
--config.init_from.source=image_encoder --config.init_from.target=image_encoder (everything but CoCa's
attention-pooling head loads; the head starts fresh).
"""

import ml_collections
from ml_collections import config_dict

from mmjax import configlib
from mmjax.data import pipeline
from mmjax.evaluation.evaluators import evaluator_config
from mmjax.tasks import captioning

common = configlib.sibling(__file__, "common")

VARIANTS = {
    # CLIP tiny's image tower (configs/clip.py) with a 1 + 1 layer decoder; a few minutes on 2 CPU cores.
    "tiny": dict(
        image=dict(patch_size=8, width=64, depth=2, heads=2, mlp_dim=256),
        text=dict(width=64, depth=1, heads=2, mlp_dim=256), multimodal_depth=1, embed_dim=64,
        image_size=64, max_len=24,
        optimizer=dict(lr=2e-3, warmup_steps=100, weight_decay=0.05),
        train=dict(batch_size=128, steps=2000, checkpoint_every=500), eval_every=1000, eval_batch=500),
    # CoCa-Base's shapes: ViT-B/16 (the paper's is 18 layers of 768), 6 + 6 decoder layers of 512.
    "base": dict(
        image=dict(patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072),
        text=dict(width=512, depth=6, heads=8, mlp_dim=2048, vocab_size=30522), multimodal_depth=6, embed_dim=512,
        image_size=224, max_len=64,
        optimizer=dict(lr=5e-4, warmup_steps=2000, weight_decay=0.1),
        train=dict(batch_size=4096, steps=100_000, checkpoint_every=2000), eval_every=5000, eval_batch=500),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the CoCa config for `arg` = 'variant=V' (or the short form 'V'): tiny | base."""
    args = configlib.parse_arg(arg, defaults=dict(variant="tiny"), choices=dict(variant=tuple(VARIANTS)))
    v = VARIANTS[args["variant"]]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = captioning.default_task_config(caption_weight=2.0, contrastive_weight=1.0)
    c.model = ml_collections.ConfigDict(dict(
        name="coca",
        embed_dim=v["embed_dim"],
        multimodal_depth=v["multimodal_depth"],
        dtype="float32",
        remat=False,
        attention="einsum",  # "xla" | "cudnn" | "auto": jax.nn.dot_product_attention (no attention dropout)
        scan_layers=False,  # nn.scan over the image tower's layers
        # MAP pooling (CoCa's one-query attentional pooler) over tokens that keep a cls token: CLIP's layout, so a
        # CLIP run's image encoder (its position table included) loads as it is.
        image=dict(image_size=config_dict.placeholder(int), pool="map", cls_token=True, norm="pre", **v["image"]),
        text=dict(max_len=config_dict.placeholder(int), norm="pre",
                  **{k: val for k, val in v["text"].items() if k != "vocab_size"}),
    ))
    # None: the tokenizer's vocabulary, resolved when the run starts.
    c.model.text.vocab_size = v["text"].get("vocab_size") or config_dict.placeholder(int)
    c.data = pipeline.embedded_data_config(negatives=())  # classes + prompts for zero-shot
    c.data.image_size, c.data.max_len = v["image_size"], v["max_len"]
    c.evals = ml_collections.ConfigDict()
    c.evals.zero_shot = evaluator_config("zero_shot", every_steps=v["eval_every"], batch_size=v["eval_batch"])
    c.evals.retrieval = evaluator_config("retrieval", every_steps=v["eval_every"], batch_size=v["eval_batch"])
    c.evals.captioning = evaluator_config("captioning", every_steps=v["eval_every"], batch_size=v["eval_batch"],
                                          method="beam", beam_size=4)
    c.optimizer = common.optimizer(**v["optimizer"])
    return common.add_tail(c, **v["train"])
