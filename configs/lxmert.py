"""LXMERT: a language encoder, an object-relationship encoder over region features (with boxes) and a
cross-modality encoder, pretrained with masked cross-modality LM, cross-modality matching and masked object
prediction (RoI-feature regression + detected-label classification), words and objects masked in the same rows
(LXMERT masks both in every example: task.masking = "joint").

    python -m mmjax.train --config=configs/lxmert.py --workdir=/tmp/lxmert        # tiny: CPU-sized, embedded data
    python -m mmjax.train --config=configs/lxmert.py:base --dry_run               # LXMERT's 9 / 5 / 5 layers

Regions on the embedded data are the same as UNITER's (configs/uniter.py); the region width and class count come
from the data. LXMERT's fifth pretraining task, image QA, is left out: the model's answer head (`vqa_labels`,
LXMERT's own layout) is for fine-tuning.
"""

import ml_collections
from ml_collections import config_dict

from mmjax import configlib
from mmjax.data import pipeline
from mmjax.evaluation.evaluators import evaluator_config
from mmjax.tasks import matching

common = configlib.sibling(__file__, "common")

VARIANTS = {
    "tiny": dict(
        model=dict(width=64, l_layers=2, r_layers=1, x_layers=2, heads=2, mlp_dim=256, vocab_size=None),
        max_len=16, optimizer=dict(lr=1e-3, warmup_steps=200, weight_decay=0.01),
        train=dict(batch_size=64, steps=2000, checkpoint_every=500), eval_every=1000, eval_batch=250),
    # LXMERT: 9 language, 5 object-relationship and 5 cross-modality layers at BERT-base width; 20 text tokens,
    # batch 256 and lr 1e-4 as the paper (its 20 epochs over 9.18M pairs are ~700k steps).
    "base": dict(
        model=dict(width=768, l_layers=9, r_layers=5, x_layers=5, heads=12, mlp_dim=3072, vocab_size=30522),
        max_len=20, optimizer=dict(lr=1e-4, warmup_steps=35_000, weight_decay=0.01),
        train=dict(batch_size=256, steps=700_000, checkpoint_every=5000), eval_every=10_000, eval_batch=1000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the LXMERT config for `arg` = 'variant=V' (or just V: tiny | base)."""
    v = VARIANTS[configlib.parse_arg(arg, defaults=dict(variant="tiny"), choices=dict(variant=tuple(VARIANTS)))
                 ["variant"]]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = matching.default_task_config(mlm=1.0, itm=1.0, mrfr=1.0, mrc=1.0)
    c.task.itm.negatives.update(in_batch=1.0, other_color=1.0, other_shape=2.0)
    c.task.masking = "joint"
    c.model = ml_collections.ConfigDict(dict(
        name="lxmert", max_len=config_dict.placeholder(int), region_feat_dim=config_dict.placeholder(int),
        num_region_classes=config_dict.placeholder(int), dtype="float32", remat=False,
        attention="einsum", **v["model"]))
    if c.model.vocab_size is None:
        c.model.vocab_size = config_dict.placeholder(int)

    c.data = pipeline.embedded_data_config()
    c.data.max_len = v["max_len"]
    c.data.regions.enabled = True
    c.evals = ml_collections.ConfigDict()
    for kind in ("itm", "mlm", "mrc"):
        c.evals[kind] = evaluator_config(kind, every_steps=v["eval_every"], batch_size=v["eval_batch"])
    c.optimizer = common.optimizer(**v["optimizer"])
    return common.add_tail(c, **v["train"])
