"""Caption a folder of images with a trained captioner (configs/caption.py, configs/coca.py).

    python -m mmjax.generate --workdir=/tmp/caption --images=DIR                      # beam search, beam 4
    python -m mmjax.generate --workdir=/tmp/caption --images=DIR --method=greedy
    python -m mmjax.generate --workdir=/tmp/coca --images=DIR --method=sample --temperature=0.7 --top_p=0.9

Reads the run's config.json, tokenizer.json and latest checkpoint (or --step), preprocesses every .png / .jpg /
.jpeg / .gif / .bmp / .webp of DIR (recursively, sorted) as the run's evaluation did, decodes on the key/value cache
(mmjax/decoding.py) and writes one JSON line per image, {"image": path relative to DIR, "caption", "score"}, to
--out (default WORKDIR/captions.jsonl), printing each caption as it goes.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from mmjax import checkpoint, cli, cli_logging, decoding, pretrained
from mmjax.data import pipeline, preprocess
from mmjax.data.tokenizer import Tokenizer
from mmjax.models import build_model

IMAGE_SUFFIXES = cli.IMAGE_SUFFIXES


def define_flags() -> None:
    """This program's flags (defined when it runs, so importing it defines nothing)."""
    flags.DEFINE_string("workdir", None, "A captioning training run (config.json, tokenizer.json, checkpoints).")
    flags.DEFINE_string("images", None, "A folder of images to caption.")
    flags.DEFINE_string("out", None, "Where to write the captions (JSON lines; default WORKDIR/captions.jsonl).")
    flags.DEFINE_integer("step", None, "The checkpoint step to use (default: the latest).")
    flags.DEFINE_enum("method", "beam", list(decoding.METHODS), "Decoding method.")
    flags.DEFINE_integer("beam_size", 4, "Beams (method=beam).")
    flags.DEFINE_float("length_penalty", 0.0, "GNMT length-penalty alpha (method=beam).")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature (method=sample).")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
    flags.DEFINE_integer("max_len", None, "Caption length in tokens, start token included (default: the run's).")
    flags.DEFINE_integer("batch_size", 64, "Images decoded at once.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


def load_images(paths: list[str], config) -> np.ndarray:
    """The images as the run's evaluation saw them: float32 [N, S, S, 3], resized and normalised."""
    source = pipeline.source_config_of(config.data, pipeline.eval_source(config.data))
    mean, std = preprocess.mean_std(config.data.get("normalization") or (tuple(config.data.mean),
                                                                        tuple(config.data.std)))
    fn = preprocess.image_preprocess_fn(source.image, train=False, image_size=int(config.data.image_size),
                                        mean=mean, std=std)
    out = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        try:
            out.append(np.asarray(fn(data, np.zeros(2, np.int32))))
        except Exception as e:  # TF's decode errors are verbose; one line naming the file is what helps
            raise ValueError(f"cannot read image {path}: {type(e).__name__}") from None
    return np.stack(out)


def caption_folder(workdir: str, images: str, decode_config: decoding.DecodeConfig, *, step: int | None = None,
                   batch_size: int = 64, seed: int = 0) -> list[dict]:
    """[{"image", "caption", "score"}] for every image under `images`, decoded by the run in `workdir`."""
    config = checkpoint.load_config(workdir)
    tokenizer_path = os.path.join(workdir, "tokenizer.json")
    tokenizer = Tokenizer.from_path(tokenizer_path) if os.path.exists(tokenizer_path) else pipeline.load_tokenizer(
        config.data)
    ckpt = pretrained.load_checkpoint(workdir, step)
    model = build_model(ckpt.model_config)
    for method in ("image_memory", "decode_text"):
        if not hasattr(model, method):
            raise ValueError(f"{workdir} holds a {ckpt.model_config.get('name')} model, not a captioner (no {method})")
    paths = cli.list_images(images)
    pixels = load_images(paths, config)
    generate = jax.jit(lambda params, image, rng: decoding.generate(
        model, params, image, decode_config, bos_id=tokenizer.cls_id, eos_id=tokenizer.sep_id,
        pad_id=tokenizer.pad_id, rng=rng))
    params = jax.device_put(ckpt.params)
    results, start = [], time.perf_counter()
    for i in range(0, len(paths), batch_size):
        block = pixels[i:i + batch_size]
        n = len(block)
        block = np.pad(block, ((0, batch_size - n), (0, 0), (0, 0), (0, 0)))  # one shape: one compilation
        tokens, scores = generate(params, block, jax.random.key(seed * 100_003 + i))
        texts = tokenizer.decode(np.asarray(tokens)[:n])
        for path, text, score in zip(paths[i:i + n], texts, np.asarray(scores)[:n]):
            results.append({"image": os.path.relpath(path, images), "caption": text, "score": float(score)})
        logging.info("captioned %d/%d images (%.1f s)", len(results), len(paths), time.perf_counter() - start)
    return results


def main(argv: list[str]) -> None:
    """CLI entry point; input errors end in one line."""
    del argv
    cli_logging.quiet_foreign_info()
    f = flags.FLAGS
    try:
        if not f.workdir or not f.images:
            raise ValueError("give --workdir (a captioning run) and --images (a folder)")
        max_len = f.max_len or int(checkpoint.load_config(f.workdir).data.max_len)
        decode_config = decoding.DecodeConfig(method=f.method, max_len=max_len, beam_size=f.beam_size,
                                              length_penalty=f.length_penalty, temperature=f.temperature,
                                              top_k=f.top_k, top_p=f.top_p)
        results = caption_folder(f.workdir, f.images, decode_config, step=f.step, batch_size=f.batch_size,
                                 seed=f.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = f.out or os.path.join(f.workdir, "captions.jsonl")
    with open(out, "w", encoding="utf-8") as fh:
        for r in results:
            fh.write(json.dumps(r) + "\n")
            print(f"{r['image']}\t{r['caption']}")
    print(f"wrote {len(results)} captions to {out}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
