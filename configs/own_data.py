"""Train on your own image-caption data: a model config with its data replaced by one prepared dataset.

    python -m mmjax.data.build image_text --annotations=my_data/captions.jsonl --images=my_data/images \
        --out=my_data/tfds
    python -m mmjax.train --config=configs/own_data.py:clip,my_data/tfds --workdir=/tmp/my_run
    python -m mmjax.evaluate --workdir=/tmp/my_run

The argument is model=MODEL,dir=DATASET_DIR (or MODEL,DATASET_DIR): MODEL is a config of configs/ (clip, vilt,
fusion; tiny sizes), DATASET_DIR the directory the build printed (or its parent). The tokenizer saved with the
dataset sizes the text tower. The dataset directory can also be set or changed later:
--config.data.sources.main.dir=DIR. Evaluation is retrieval (clip) or ITM / MLM accuracy (vilt, fusion) on the
dataset's validation split; matching negatives are in-batch captions (a dataset offers attribute-swapped
captions only when its source declares `negatives`).
"""

import ml_collections

from mmjax import configlib
from mmjax.data import pipeline
from mmjax.data.sources import source_config
from mmjax.evaluation.evaluators import evaluator_config

MODELS = ("clip", "vilt", "fusion")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns MODEL's tiny config reading the prepared dataset at DATASET_DIR (`arg` = "MODEL[,DATASET_DIR]")."""
    args = configlib.parse_arg(arg, defaults=dict(model="clip", dir=None), choices=dict(model=MODELS),
                               positional=("model", "dir"))
    c = configlib.sibling(__file__, args["model"]).get_config()
    data = pipeline.default_data_config()
    data.image_size, data.max_len = c.data.image_size, c.data.max_len
    data.sources.main = source_config(
        eval_split="validation",
        # A light augmentation that keeps the whole picture (captions often mention what is at the edges).
        image=dict(random_resized_crop=True, crop_scale=(0.5, 1.0)))
    if args["dir"]:
        data.sources.main.dir = args["dir"]
    c.data = data
    c.evals = ml_collections.ConfigDict()
    kinds = ("retrieval",) if args["model"] == "clip" else ("itm", "mlm")
    for kind in kinds:
        c.evals[kind] = evaluator_config(kind, every_steps=500, batch_size=64)
    if args["model"] != "clip":
        # Users' data offers no attribute-swapped captions: every ITM mismatch is another image's caption.
        c.task.itm.negatives = dict(in_batch=1.0, mined=0.0)
    c.train.steps = 1000
    c.checkpoint.every_steps = 250
    return c
