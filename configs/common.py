"""What every config shares: the train loop's section, mesh and sharding rules, checkpoints, init_from, and the
optimizer's defaults. Configs load it with `configlib.sibling(__file__, "common")`."""

import ml_collections

from mmjax import pretrained, sharding
from mmjax.checkpoint import default_checkpoint_config
from mmjax.optim import default_optimizer_config


def optimizer(**fields) -> ml_collections.ConfigDict:
    """AdamW with warmup + cosine (mmjax/optim.py) with the given fields changed."""
    c = default_optimizer_config()
    c.update(fields)
    return c


def add_tail(c: ml_collections.ConfigDict, *, batch_size: int, steps: int, checkpoint_every: int,
             log_every: int = 50) -> ml_collections.ConfigDict:
    """Adds train, mesh, sharding, checkpoint and init_from to config `c` and returns it."""
    c.train = ml_collections.ConfigDict(dict(batch_size=batch_size, steps=steps, log_every=log_every))
    c.mesh = sharding.default_mesh_config()
    c.sharding = ml_collections.ConfigDict(dict(rules=[list(r) for r in sharding.DEFAULT_RULES]))
    c.checkpoint = default_checkpoint_config()
    c.checkpoint.every_steps = checkpoint_every
    c.init_from = pretrained.default_init_config()
    return c
