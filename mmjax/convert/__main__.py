"""Convert weights between Hugging Face directories and mmjax.

    python -m mmjax.convert --hf=HF_DIR --out=DIR        # HF -> mmjax: DIR/config.json + DIR/params (orbax)
    python -m mmjax.convert --workdir=RUN --hf_out=DIR   # a trained mmjax run (CLIP, ViLT, BERT, ViT) -> HF

DIR from the first form is what `init_from.path` accepts (an HF directory is accepted there directly too).
"""
from __future__ import annotations

import sys

from absl import app, flags


def _define_flags() -> None:
    """CLI flags, defined only when run as a program (mmjax.train defines --workdir too)."""
    flags.DEFINE_string("hf", None, "Hugging Face model directory to convert into mmjax.")
    flags.DEFINE_string("out", None, "Output directory of the mmjax conversion (config.json + params/).")
    flags.DEFINE_string("workdir", None, "mmjax training workdir whose latest checkpoint to export.")
    flags.DEFINE_string("hf_out", None, "Output Hugging Face directory of the export.")


def hf_to_mmjax(hf_dir: str, out_dir: str) -> dict:
    """Converts an HF model directory and writes it as an mmjax params directory; returns our model config."""
    from mmjax import pretrained  # pylint: disable=import-outside-toplevel

    params, model_config = pretrained.load_params(hf_dir)
    pretrained.save_converted(out_dir, model_config, params)
    return model_config


def mmjax_to_hf(workdir: str, hf_dir: str) -> None:
    """Exports the latest checkpoint of a training workdir (its config.json model section) to an HF directory."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    from mmjax import checkpoint  # pylint: disable=import-outside-toplevel
    from mmjax.convert import hf  # pylint: disable=import-outside-toplevel

    config = checkpoint.load_config(workdir)
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
    step = ckpt.latest_step()
    if step is None:
        raise ValueError(f"no checkpoint in {workdir}")
    # Restore without a target structure: plain numpy on the host, whatever mesh the run used.
    state = ckpt.manager.restore(step, args=ocp.args.StandardRestore())
    hf.save(hf_dir, config.model.to_dict(), {"params": jax.tree.map(np.asarray, state["params"])})


def main(argv: list[str]) -> None:
    """Runs one of the two conversions; bad flag combinations are one-line errors."""
    del argv
    f = flags.FLAGS
    try:
        if f.hf and f.out:
            config = hf_to_mmjax(f.hf, f.out)
            print(f"wrote {config.get('name')} to {f.out}")
        elif f.workdir and f.hf_out:
            mmjax_to_hf(f.workdir, f.hf_out)
            print(f"wrote {f.hf_out}")
        else:
            raise ValueError("give --hf and --out (HF -> mmjax), or --workdir and --hf_out (mmjax -> HF)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
