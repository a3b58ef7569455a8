"""VQA fine-tuning: a pretrained fusion model + an answer classifier on its pooled output, trained with binary
cross-entropy on the answers' soft scores and scored with the official VQA accuracy.

    python -m mmjax.train --config=configs/vilt.py --workdir=/tmp/vilt                          # pretrain
    python -m mmjax.train --config=configs/vqa.py --workdir=/tmp/vqa --config.init_from.path=/tmp/vilt
    python -m mmjax.train --config=configs/vqa.py:fusion --workdir=/tmp/vqa_fusion --config.init_from.path=...

Arguments: model (vilt = default | uniter | vilbert | fusion | visualbert | lxmert | oscar): the pretraining config
whose model is fine-tuned (its tiny variant; the answer head is sized by the data). Data: the embedded VQA
questions (`easy_vqa_questions`: the easy-vqa package's 38,575 train / 9,673 test questions on the embedded images,
13 answers), built offline on first use; they share the embedded dataset's tokenizer, so a model pretrained on it
reads them with its own words. Without init_from.path the same model trains from scratch. The head trains at
`optimizer.head_lr_mult` x the learning rate (ViLT: 10x).
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from mmjax import configlib, models
from mmjax.data import pipeline, vqa
from mmjax.evaluation.evaluators import evaluator_config

MODELS = ("vilt", "uniter", "vilbert", "fusion", "visualbert", "lxmert", "oscar")
HEADS_OFF = ("mlm_head", "itm_head", "mpp_head", "mrfr_head", "mrc_head")  # pretraining heads a VQA model drops


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the VQA fine-tuning config of `arg` = 'model=M' (or just M: one of MODELS)."""
    model = configlib.parse_arg(arg, defaults=dict(model="vilt"), choices=dict(model=MODELS))["model"]
    c = configlib.sibling(__file__, model).get_config()
    c.task = ml_collections.ConfigDict(dict(name="vqa"))
    fields = {f.name for f in dataclasses.fields(models.MODELS[c.model.name])}
    for head in HEADS_OFF:
        if head in fields:  # off even where the pretraining config left it at the model's default (on)
            c.model[head] = False
    c.model.vqa_labels = config_dict.placeholder(int)  # the data's answer count

    data = pipeline.default_data_config()
    data.image_size, data.max_len = c.data.image_size, c.data.max_len
    data.sources.easy_vqa = vqa.easy_vqa_source_config()
    data.regions = c.data.regions  # region models keep their regions (made from the images' boxes)
    data.answers = True
    c.data = data
    c.evals = ml_collections.ConfigDict()
    c.evals.vqa = evaluator_config("vqa", every_steps=1000, batch_size=500)
    c.optimizer.update(dict(lr=5e-4, warmup_steps=200, weight_decay=0.01, head_lr_mult=10.0))
    c.train.steps = 3000
    c.checkpoint.every_steps = 1000
    return c
