"""Any image encoder + any text encoder + any fusion block + MLM / ITM heads, pretrained like ViLT (MLM + ITM).

    python -m mmjax.train --config=configs/fusion.py --workdir=/tmp/fusion              # cross_attention (default)
    python -m mmjax.train --config=configs/fusion.py:co_attention --workdir=/tmp/fusion_co
    python -m mmjax.train --config=configs/fusion.py:block=bottleneck --dry_run
    python -m mmjax.train --config=configs/fusion.py:block=hybrid --config.model.fusion_args.hidden=2 ...

The argument names the block (`mmjax.models.fusion.FUSION_BLOCKS`, every one has an entry in BLOCK_ARGS) and sets
both `model.fusion` and `model.fusion_args`, its fields; those fields can then be overridden from the command line
(`--config.model.fusion_args.FIELD=VALUE`). Blocks differ in their fields, so switch blocks with the argument, not
with `--config.model.fusion=NAME` alone: that keeps the default block's fields, which the new block may lack (the
error then says so). `model.towers` holds the encoders, one per modality ({"kind": a mmjax.models.towers.TOWERS
name, **that Module's fields}). Blocks that keep per-modality token streams (concat, cross_attention with text
queries, co_attention, symmetric_cross_attention, bottleneck, shared_weights) give the MLM head image-aware text
tokens; pooling-only blocks (sum, the gated ones, concat_mlp, late, hybrid) can only do text-only MLM from the text
tower (see mmjax/models/fusion_model.py). late and hybrid are ITM classifiers themselves (their combined decision is
itm_logits, num_classes 2).
"""

import ml_collections
from ml_collections import config_dict

from mmjax import configlib
from mmjax.data import pipeline
from mmjax.evaluation.evaluators import evaluator_config
from mmjax.tasks import matching

common = configlib.sibling(__file__, "common")

WIDTH = 64
TRANSFORMER = dict(width=WIDTH, depth=2, num_heads=2, mlp_dim=4 * WIDTH, norm="post")
# concat_mlp / hybrid early fusion: [pooled image; pooled text] -> Dense(hidden_dim) -> relu -> Dense(width).
CONCAT_MLP = dict(width=WIDTH, hidden=1, hidden_dim=WIDTH, activation="relu", dropout_rate=0.0, pool="mean")
BLOCK_ARGS = {
    "concat": TRANSFORMER,
    "sum": dict(width=WIDTH),
    "multiplicative_gated": dict(width=WIDTH),
    "additive_gated": dict(width=WIDTH),
    "cross_attention": dict(TRANSFORMER, query="text"),  # ALBEF-style: text queries attend to the image
    "co_attention": dict(TRANSFORMER, self_attention=True),  # ViLBERT's Co-TRM + TRM
    "bottleneck": dict(TRANSFORMER, fusion_layer=0, n_bottlenecks=4),
    "late": dict(width=WIDTH),
    "shared_weights": dict(TRANSFORMER),
    "concat_mlp": dict(CONCAT_MLP),
    "hybrid": dict(CONCAT_MLP, weighting="learned"),  # num_classes: FusionModel's 2 (ITM)
    "symmetric_cross_attention": dict(TRANSFORMER),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the fusion-model config for `arg` = 'block=BLOCK' (or just BLOCK; default cross_attention)."""
    block = configlib.parse_arg(arg, defaults=dict(block="cross_attention"),
                                choices=dict(block=tuple(BLOCK_ARGS)))["block"]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = matching.default_task_config(mlm=1.0, itm=1.0)
    c.task.itm.negatives.update(in_batch=1.0, other_color=1.0, other_shape=2.0)
    c.model = ml_collections.ConfigDict(dict(
        name="fusion",
        towers=dict(
            image=dict(kind="vit", image_size=config_dict.placeholder(int), patch_size=8, width=WIDTH, depth=2,
                       heads=2, mlp_dim=4 * WIDTH, pool="cls", norm="pre"),
            text=dict(kind="text", max_len=config_dict.placeholder(int), vocab_size=config_dict.placeholder(int),
                      width=WIDTH, depth=2, heads=2, mlp_dim=4 * WIDTH, causal=False, norm="post",
                      ln_epsilon=1e-12)),
        fusion=block,
        fusion_args=dict(BLOCK_ARGS[block]),
        dtype="float32"))

    c.data = pipeline.embedded_data_config()
    c.data.image_size, c.data.max_len = 48, 16
    c.evals = ml_collections.ConfigDict()
    for kind in ("itm", "mlm"):
        c.evals[kind] = evaluator_config(kind, every_steps=1000, batch_size=250)
    c.optimizer = common.optimizer(lr=1e-3, warmup_steps=200, weight_decay=0.01)
    return common.add_tail(c, batch_size=64, steps=2000, checkpoint_every=500)
