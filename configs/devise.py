"""DeViSE (Frome et al. 2013): an image tower trained to land on frozen text embeddings with a hinge rank loss.

    python -m mmjax.train --config=configs/devise.py --workdir=/tmp/devise

LiT's locked, mean-pooled all-MiniLM-L6-v2 text tower (configs/lit.py) plays DeViSE's fixed word-embedding model:
with `project_text=False` the text embeds are its l2-normalised pooled features (384-d), and the image projection
is DeViSE's linear map M from the visual features into that space. The loss is DeViSE's: per image, the sum over
the batch's other captions of max(0, 0.1 - t_i.v_i + t_j.v_i) (identical captions excluded). One deviation: the
image embeds are l2-normalised too, so scores are cosines, as zero-shot and retrieval rank them. Only the ViT and
M train; logit_scale is unused (it stays at its init). Zero-shot over the class names, and retrieval, as in LiT.
"""
import ml_collections

from mmjax import configlib

lit = configlib.sibling(__file__, "lit")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the DeViSE config (tiny ViT mapped linearly onto the frozen MiniLM sentence embeddings)."""
    configlib.parse_arg(arg, defaults={})
    c = lit.get_config()
    # embed_dim: the text tower's own space (384 for MiniLM), which the image projection maps into.
    c.model.update(dict(loss="hinge", margin=0.1, project_text=False, embed_dim=c.model.text.width))
    # ~1 s a step at batch 128 on 2 CPU cores: 600 steps are ~10 minutes, evaluated halfway and at the end.
    c.train.steps = 600
    c.checkpoint.every_steps = 200
    for evaluator in c.evals.values():
        evaluator.every_steps = 300
    return c
