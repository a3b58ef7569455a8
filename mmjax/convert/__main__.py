"""Convert weights between Hugging Face directories and mmjax.

    python -m mmjax.convert --hf=HF_DIR --out=DIR        # HF -> mmjax: DIR/config.json + DIR/params (orbax)
    python -m mmjax.convert --workdir=RUN --hf_out=DIR   # a trained mmjax run (CLIP, ViLT, BERT, ViT) -> HF

DIR from the first form is what `init_from.path` accepts (an HF directory is accepted there directly too). The
second writes the run's tokenizer (tokenizer.json + tokenizer_config.json) and, for image models, its image
preprocessing (preprocessor_config.json) beside the weights, so transformers' AutoTokenizer / AutoProcessor work.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from absl import app, flags

from mmjax import cli


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


def restore_params(workdir: str) -> tuple[Any, int]:
    """(params as numpy arrays, step) of a workdir's latest checkpoint, whatever device count the run used."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = []
    if os.path.isdir(directory):
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                        item_handlers=ocp.PyTreeCheckpointHandler())
        steps = manager.all_steps()
    if not steps:
        raise ValueError(f"no checkpoint in {directory}: the run has not saved one yet (it saves every "
                         "checkpoint.every_steps steps and at its last)")
    step = max(steps)
    manager.close()
    from mmjax import checkpoint  # pylint: disable=import-outside-toplevel

    return checkpoint.restore_params(directory, step), step


def mmjax_to_hf(workdir: str, hf_dir: str) -> list[str]:
    """Exports the latest checkpoint of a training workdir (model, tokenizer, image preprocessing) to an HF
    directory; returns the file names written."""
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise ValueError(f"--workdir {workdir!r} is not a training run: no config.json there (give the --workdir "
                         "of `python -m mmjax.train`)")
    from mmjax import checkpoint  # pylint: disable=import-outside-toplevel
    from mmjax.convert import hf, hf_processing  # pylint: disable=import-outside-toplevel
    from mmjax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel

    config = checkpoint.load_config(workdir)
    params, _ = restore_params(workdir)
    token_file = os.path.join(workdir, "tokenizer.json")
    tokenizer = Tokenizer.from_path(token_file) if os.path.isfile(token_file) else None
    data = config.data.to_dict() if "data" in config else {}
    model = config.model.to_dict()
    files = hf.save(hf_dir, model, {"params": params}, tokenizer=tokenizer, max_len=data.get("max_len"))
    if data.get("image_size"):
        files += hf_processing.write_image_processing(hf_dir, model.get("name"), data,
                                                      with_tokenizer=tokenizer is not None)
    return files


def _load_hint(hf_dir: str, files: list[str]) -> str:
    """One line saying how transformers loads the export."""
    from mmjax.convert import hf, hf_processing  # pylint: disable=import-outside-toplevel

    architecture = (hf.read_config(hf_dir).get("architectures") or ["AutoModel"])[0]
    loads = [f"transformers.{architecture}.from_pretrained({hf_dir!r})"]
    if hf_processing.PROCESSOR_FILE in files:
        loads.append(f"transformers.AutoProcessor.from_pretrained({hf_dir!r})")
    elif hf_processing.TOKENIZER_FILE in files:
        loads.append(f"transformers.AutoTokenizer.from_pretrained({hf_dir!r})")
    return "load with: " + "; ".join(loads)


def main(argv: list[str]) -> None:
    """Runs one of the two conversions; bad flags and unusable directories are one-line errors (exit status 2)."""
    del argv
    from mmjax import cli_logging  # pylint: disable=import-outside-toplevel

    cli_logging.quiet_foreign_info()
    f = flags.FLAGS
    try:
        if f.hf and f.out:
            config = hf_to_mmjax(f.hf, f.out)
            print(f"wrote {config.get('name')} to {f.out}")
        elif f.workdir and f.hf_out:
            files = mmjax_to_hf(f.workdir, f.hf_out)
            print(f"wrote {f.hf_out}: {', '.join(files)}")
            print(_load_hint(f.hf_out, files))
        else:
            raise ValueError("give --hf and --out (HF -> mmjax), or --workdir and --hf_out (mmjax -> HF)")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
