"""Train on your own image-caption data: a model config with its data replaced by one prepared dataset.

    python -m mmjax.data.build image_text --annotations=my_data/captions.jsonl --images=my_data/images \
        --out=my_data/tfds
    python -m mmjax.train --config=configs/own_data.py:clip,my_data/tfds --workdir=/tmp/my_run
    python -m mmjax.evaluate --workdir=/tmp/my_run

The argument is MODEL[,DATASET_DIR]: MODEL is a config of configs/ (clip, vilt, fusion; tiny sizes), DATASET_DIR
the directory the build printed (or its parent). The tokenizer saved with the dataset sizes the text tower. The
dataset directory can also be set or changed later: --config.data.sources.main.dir=DIR. Evaluation is retrieval
(clip) or ITM / MLM accuracy (vilt, fusion) on the dataset's validation split; matching negatives are in-batch
captions (attribute-swapped captions exist only for the embedded dataset).
"""

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from mmjax.data import streaming

MODELS = ("clip", "vilt", "fusion")


def _model_config(model: str) -> ml_collections.ConfigDict:
    """configs/MODEL.py's tiny config (loaded by path: configs/ is not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{model}.py")
    spec = importlib.util.spec_from_file_location(f"mmjax_config_{model}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns MODEL's tiny config reading the prepared dataset at DATASET_DIR (`arg` = "MODEL[,DATASET_DIR]")."""
    model, _, directory = (arg or "clip").partition(",")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} for own data; known: {MODELS}")
    c = _model_config(model)
    c.data.sources.main = streaming.source_config(
        eval_split="validation",
        # A light augmentation that keeps the whole picture (captions often mention what is at the edges).
        image=dict(random_resized_crop=True, crop_scale=(0.5, 1.0)))
    if directory:
        c.data.sources.main.dir = directory
    c.data.tokenizer = config_dict.placeholder(str)  # None: the tokenizer saved with the dataset
    if model != "clip":
        # No attribute-swapped captions in users' data: every ITM mismatch is another image's caption.
        c.itm.negatives.update(in_batch=1.0, other_color=0.0, other_shape=0.0)
    c.train.steps = 1000
    c.train.eval_every = 500
    c.eval.batch_size = 64
    c.checkpoint.every_steps = 250
    return c
