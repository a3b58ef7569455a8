"""Speech <-> image contrastive pretraining: spoken captions and their images (as SpokenCOCO / Flickr8k-audio
models are trained), on the embedded images' captions spoken by espeak-ng (spoken_easy_vqa, built offline on
first use; `apt-get install espeak-ng` once).

    python -m mmjax.train --config=configs/audio_image.py --workdir=/tmp/audio_image

A DualEncoder (mmjax/models/dual_encoder.py): the AST-style audio tower (log-mel on device, SpecAugment) and a
ViT, InfoNCE with a learnable temperature. Evaluated by speech->image and image->speech recall@K on the test
split, spoken by voices that training never hears.
"""

import ml_collections
from ml_collections import config_dict

from mmjax import configlib
from mmjax.data import pipeline, spoken_captions
from mmjax.evaluation.evaluators import evaluator_config

common = configlib.sibling(__file__, "common")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the speech-image config (`arg`: 'loss=softmax|sigmoid')."""
    args = configlib.parse_arg(arg, defaults=dict(loss="softmax"), choices=dict(loss=("softmax", "sigmoid")))
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = ml_collections.ConfigDict(dict(name="contrastive", loss_impl="auto"))  # auto | dense | sharded
    c.model = ml_collections.ConfigDict(dict(
        name="dual_encoder", modalities=("audio", "image"), loss=args["loss"], embed_dim=64,
        logit_scale_init=config_dict.placeholder(float), dtype="float32", remat=False,
        attention="einsum", scan_layers=False,
        towers=dict(audio=common.audio_tower(),
                    image=dict(kind="vit", image_size=config_dict.placeholder(int), patch_size=8, width=64,
                               depth=2, heads=2, mlp_dim=256, pool="cls", norm="pre"))))
    c.data = pipeline.default_data_config()
    c.data.sources.spoken = spoken_captions.source_config()
    c.data.eval_source = "spoken"
    c.data.image_size = 64
    c.data.audio.max_seconds = 3.5
    c.evals = ml_collections.ConfigDict()
    c.evals.retrieval = evaluator_config("pair_retrieval", every_steps=500, batch_size=200)
    c.optimizer = common.optimizer(lr=2e-3, warmup_steps=100, weight_decay=0.05)
    return common.add_tail(c, batch_size=128, steps=2500, checkpoint_every=250)
