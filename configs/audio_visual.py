"""Audio-visual fusion with bottleneck tokens (MBT, Nagrani et al. 2021): does this spoken caption describe this
image? An image tower and the audio tower feed a BottleneckFusion block (`fusion_layer`, `n_bottlenecks` are
its knobs) and an ITM head; mismatches pair an image with another example's clip (`task.itm.swap = "audio"`,
never a clip speaking an identical caption). Data: spoken_easy_vqa (built offline with espeak-ng on first use).

    python -m mmjax.train --config=configs/audio_visual.py --workdir=/tmp/audio_visual
    python -m mmjax.train --config=configs/audio_visual.py:n_bottlenecks=8 --workdir=/tmp/av_8
"""

import ml_collections
from ml_collections import config_dict

from mmjax import configlib
from mmjax.data import pipeline, spoken_captions
from mmjax.evaluation.evaluators import evaluator_config
from mmjax.tasks import matching

common = configlib.sibling(__file__, "common")
WIDTH = 64


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the audio-visual MBT config (`arg`: 'fusion_layer=L,n_bottlenecks=N'; defaults 0 and 4). With 2 fusion
    layers, fusion_layer must be 0: a stream reads the bottleneck its previous layer averaged, so fusion starting at
    the last layer would never reach the tokens the ITM head pools."""
    args = configlib.parse_arg(arg, defaults=dict(fusion_layer="0", n_bottlenecks="4"))
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = matching.default_task_config(itm=1.0)
    c.task.itm.swap = "audio"
    c.model = ml_collections.ConfigDict(dict(
        name="fusion",
        towers=dict(
            image=dict(kind="vit", image_size=config_dict.placeholder(int), patch_size=8, width=WIDTH, depth=2,
                       heads=2, mlp_dim=4 * WIDTH, pool="cls", norm="pre"),
            audio=common.audio_tower(width=WIDTH)),
        fusion="bottleneck",
        fusion_args=dict(width=WIDTH, depth=2, num_heads=2, mlp_dim=4 * WIDTH, norm="pre",
                         fusion_layer=int(args["fusion_layer"]), n_bottlenecks=int(args["n_bottlenecks"])),
        mlm_head=False,
        dtype="float32"))
    c.data = pipeline.default_data_config()
    c.data.sources.spoken = spoken_captions.source_config()
    c.data.eval_source = "spoken"
    c.data.image_size = 64
    c.evals = ml_collections.ConfigDict()
    c.evals.itm = evaluator_config("itm", swap="audio", every_steps=500, batch_size=200)
    c.optimizer = common.optimizer(lr=1e-3, warmup_steps=100, weight_decay=0.01)
    return common.add_tail(c, batch_size=64, steps=1500, checkpoint_every=250)
