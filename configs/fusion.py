"""Any image encoder + any text encoder + any fusion block + MLM / ITM heads, pretrained like ViLT (MLM + ITM).

    python -m mmjax.train --config=configs/fusion.py --workdir=/tmp/fusion              # cross_attention (default)
    python -m mmjax.train --config=configs/fusion.py:co_attention --workdir=/tmp/fusion_co
    python -m mmjax.train --config=configs/fusion.py:bottleneck --dry_run

The argument names the block (`mmjax.models.fusion.FUSION_BLOCKS`); `model.fusion_args` holds its fields.
Blocks that keep per-modality token streams (concat, cross_attention with text queries, co_attention, bottleneck,
shared_weights) give the MLM head image-aware text tokens; pooling-only blocks (sum, the gated ones, late) can
only do text-only MLM from the text tower (see mmjax/models/fusion_model.py).
"""

import ml_collections
from ml_collections import config_dict

from mmjax import sharding
from mmjax.checkpoint import default_checkpoint_config
from mmjax.data import pipeline
from mmjax.optim import default_optimizer_config
from mmjax.tasks import matching

WIDTH = 64
TRANSFORMER = dict(width=WIDTH, depth=2, num_heads=2, mlp_dim=4 * WIDTH, norm="post")
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
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the fusion-model config for `arg` = BLOCK (a fusion block name; default cross_attention)."""
    block = arg or "cross_attention"
    if block not in BLOCK_ARGS:
        raise ValueError(f"unknown fusion block {block!r}; known: {sorted(BLOCK_ARGS)}")
    image_size, max_len = 48, 16

    c = matching.default_task_config(mlm=1.0, itm=1.0)
    c.seed = 0

    c.data = pipeline.default_data_config()
    c.data.image_size, c.data.max_len = image_size, max_len

    c.model = ml_collections.ConfigDict(dict(
        name="fusion",
        image=dict(image_size=image_size, patch_size=8, width=WIDTH, depth=2, heads=2, mlp_dim=4 * WIDTH,
                   pool="cls", norm="pre"),
        text=dict(max_len=max_len, width=WIDTH, depth=2, heads=2, mlp_dim=4 * WIDTH, causal=False, norm="post",
                  ln_epsilon=1e-12),
        fusion=block,
        fusion_args=dict(BLOCK_ARGS[block]),
        dtype="float32"))
    c.model.text.vocab_size = config_dict.placeholder(int)

    c.optimizer = default_optimizer_config()
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 200
    c.optimizer.weight_decay = 0.01

    c.train = ml_collections.ConfigDict(dict(batch_size=64, steps=2000, log_every=50, eval_every=1000))
    c.eval = ml_collections.ConfigDict(dict(batch_size=250))
    c.mesh = sharding.default_mesh_config()
    c.sharding = ml_collections.ConfigDict(dict(rules=[list(r) for r in sharding.DEFAULT_RULES]))
    c.checkpoint = default_checkpoint_config()
    c.checkpoint.every_steps = 500
    return c
