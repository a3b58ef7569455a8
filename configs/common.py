"""What every config shares: the train loop's section, mesh and sharding rules, checkpoints, init_from, and the
optimizer's defaults. Configs load it with `configlib.sibling(__file__, "common")`."""

import ml_collections
from ml_collections import config_dict

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
    c.train = ml_collections.ConfigDict(dict(
        batch_size=batch_size, steps=steps, log_every=log_every,
        # Micro-batches per step: the global batch is computed in accum_steps pieces (exact for contrastive
        # losses: mmjax/accumulation.py), for batches larger than the devices hold.
        accum_steps=1,
        peak_tflops=config_dict.placeholder(float)))  # one device's peak, for MFU (None: known chips' peak)
    c.mesh = sharding.default_mesh_config()
    c.sharding = ml_collections.ConfigDict(dict(rules=[list(r) for r in sharding.DEFAULT_RULES]))
    c.checkpoint = default_checkpoint_config()
    c.checkpoint.every_steps = checkpoint_every
    c.init_from = pretrained.default_init_config()
    return c


def audio_tower(**fields) -> dict:
    """The tiny audio tower of the speech configs (25 ms windows every 10 ms, 64 mel bins, SpecAugment), with the
    given fields changed; `sample_rate` comes from data.audio. Its patches are 16 frames x all 64 bins (160 ms of
    the whole band): on the spoken captions that learned speech->image retrieval faster per step and per second
    than AST's 2-D patches (8 x 32 here: audio->image R@1 1.1% vs 3.7% after 1,500 steps; README "Speech")."""
    from ml_collections import config_dict  # pylint: disable=import-outside-toplevel

    tower = dict(kind="audio", sample_rate=config_dict.placeholder(int), n_fft=400, hop_length=160, n_mels=64,
                 patch_time=16, patch_freq=64, width=64, depth=2, heads=2, mlp_dim=256, pool="mean",
                 time_masks=2, time_mask_width=20, freq_masks=2, freq_mask_width=8)
    tower.update(fields)
    return tower
