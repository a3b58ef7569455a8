"""Speech <-> text contrastive pretraining (CLAP-style): spoken captions and their transcripts, with zero-shot
classification of the clips from text prompts of the classes (spoken_easy_vqa, built offline on first use with
espeak-ng; `apt-get install espeak-ng` once).

    python -m mmjax.train --config=configs/audio_text.py --workdir=/tmp/audio_text

A DualEncoder (mmjax/models/dual_encoder.py): the AST-style audio tower and a causal text transformer, InfoNCE
with a learnable temperature. Evaluated by speech->text / text->speech recall@K (identical transcripts are one
text) and zero-shot accuracy over the 24 "colour shape" classes, on test clips spoken by held-out voices.
"""

import ml_collections
from ml_collections import config_dict

from mmjax import configlib
from mmjax.data import pipeline, spoken_captions
from mmjax.evaluation.evaluators import evaluator_config

common = configlib.sibling(__file__, "common")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the speech-text config (`arg`: 'loss=softmax|sigmoid')."""
    args = configlib.parse_arg(arg, defaults=dict(loss="softmax"), choices=dict(loss=("softmax", "sigmoid")))
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = ml_collections.ConfigDict(dict(name="contrastive", loss_impl="auto"))  # auto | dense | sharded
    c.model = ml_collections.ConfigDict(dict(
        name="dual_encoder", modalities=("audio", "text"), loss=args["loss"], embed_dim=64,
        logit_scale_init=config_dict.placeholder(float), dtype="float32", remat=False,
        attention="einsum", scan_layers=False,
        towers=dict(audio=common.audio_tower(),
                    text=dict(kind="text", max_len=config_dict.placeholder(int),
                              vocab_size=config_dict.placeholder(int), width=64, depth=1, heads=2, mlp_dim=256,
                              causal=True, pool="eos", norm="pre"))))
    c.data = pipeline.default_data_config()
    c.data.sources.spoken = spoken_captions.source_config(kind="audio_text")  # the images are not read
    c.data.eval_source = "spoken"
    c.data.max_len = 24
    c.data.audio.max_seconds = 3.5
    c.evals = ml_collections.ConfigDict()
    c.evals.retrieval = evaluator_config("pair_retrieval", every_steps=500, batch_size=200)
    c.evals.zero_shot = evaluator_config("zero_shot", modality="audio", every_steps=500, batch_size=200)
    c.optimizer = common.optimizer(lr=2e-3, warmup_steps=100, weight_decay=0.05)
    return common.add_tail(c, batch_size=128, steps=1500, checkpoint_every=250)
