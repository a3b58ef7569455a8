"""Is the input pipeline the bottleneck? Examples/s of the pipeline alone vs what the train step consumes.

Run on an IDLE machine, from the repo root (writes experiments/results/bench_input.json):

    /work/venv/bin/python experiments/bench_input.py

Smoke test (seconds, numbers meaningless): add --images=64 --batches=3 --steps=2 --out=/tmp/bench_input.json

What is measured:
  own data  configs/own_data.py:clip (64x64 images, batch 128) and :vilt (48x48, batch 64) on a folder of --images
            synthetic 320x240 JPEGs (smooth gradients + noise + shapes, quality 90) with two captions each, built
            once with mmjax.data.image_text.build_image_text (the README's first command): the streamed reader
            (read TFRecords, decode JPEG, random resized crop, normalise, tokenize on the host).
  embedded  configs/clip.py, vilt.py and uniter.py (tiny) on the embedded dataset as they train: the in-memory
            reader, with hard-negative captions (vilt, uniter) and regions made from boxes (uniter).
For each:
  pipeline  pipeline.train_iterator exactly as the trainer calls it, one process; examples/s over --batches
            batches after 3 warm-up batches. Own data also with RandAugment (N=2, M=9), as ViLT fine-tuning uses it.
  step      the trainer's jitted train step (create_train_state + jit_train_step on a 1-device mesh) on one real
            batch from the pipeline, examples/s over --steps steps after compilation and 2 warm-up steps.
  loop      the trainer's loop: next(pipeline) -> make_global_batch -> step, both running at once as in training
            (tf.data prefetches on its threads while XLA computes), examples/s over --steps steps.
ratio = pipeline examples/s / step examples/s: above 1 the pipeline alone outpaces the step. In a real run both
share the same 2 cores, which `loop` shows: loop / step is the fraction of the step's speed that training gets.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DEFAULT_OUT = os.path.join(REPO, "experiments", "results", "bench_input.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="synthetic images in the dataset")
    p.add_argument("--batches", type=int, default=20, help="timed pipeline batches")
    p.add_argument("--steps", type=int, default=20, help="timed train steps")
    p.add_argument("--models", default="clip,vilt", help="own-data configs")
    p.add_argument("--embedded", default="clip,vilt,uniter", help="configs on the embedded data ('' = none)")
    p.add_argument("--data_dir", default=None, help="where the embedded dataset is (built there if missing)")
    p.add_argument("--out", default=DEFAULT_OUT)
    return p.parse_args(argv)


def make_folder(root: str, n: int) -> tuple[str, str]:
    """n synthetic JPEGs + captions.jsonl under root; returns (annotations, images)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    rgb = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 40), (250, 250, 250), (10, 10, 10)]
    yy, xx = np.mgrid[0:240, 0:320]
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
        for i in range(n):
            base = (rng.uniform(0, 255, 3)[None, None] * (xx / 320)[..., None]
                    + rng.uniform(0, 255, 3)[None, None] * (yy / 240)[..., None]) / 2
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            c = int(rng.integers(len(colours)))
            x, y = int(rng.integers(0, 220)), int(rng.integers(0, 140))
            ImageDraw.Draw(img).ellipse([x, y, x + 100, y + 100], fill=rgb[c])
            img.save(os.path.join(images, f"{i:05d}.jpg"), quality=90)
            for caption in (f"a {colours[c]} disc on a gradient", f"photo {i} with a {colours[c]} circle"):
                f.write(json.dumps({"image": f"{i:05d}.jpg", "caption": caption}) + "\n")
    return os.path.join(root, "captions.jsonl"), images


def load_config(name: str, arg: str | None = None):
    """configs/NAME.py's config for `arg`."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def pipeline_rate(config, tokenizer, batches: int) -> float:
    """Examples/s of pipeline.train_iterator (3 warm-up batches, then `batches` timed)."""
    from mmjax.data import pipeline

    it = pipeline.train_iterator(config.data, tokenizer, global_batch_size=config.train.batch_size, seed=0,
                                 process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * config.train.batch_size / (time.perf_counter() - t)


def step_rate(config, tokenizer, steps: int) -> tuple[float, float]:
    """Examples/s of the trainer's jitted step on one real batch, and of the loop that also pulls the batches."""
    import flax.linen as nn
    import jax

    from mmjax import optim, sharding, train
    from mmjax import state as state_lib
    from mmjax.data import pipeline
    from mmjax.models import build_model
    from mmjax.tasks import get_task

    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.logical_rules(config.sharding.rules)
    meta = pipeline.dataset_meta(config.data, tokenizer)
    state_lib.resolve_model_config(config, meta)
    model = build_model(config.model)
    task = get_task(config.task, model=model, config=config, meta=meta, tokenizer=tokenizer, mesh=mesh)
    shapes = pipeline.batch_shapes(config.data, meta)
    boxed = state_lib.abstract_params(model, shapes, config.seed)
    tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps, nn.meta.unbox(boxed))
    state, shardings = state_lib.create_train_state(model, shapes, tx, mesh, rules, config.seed, boxed)
    step_fn = train.jit_train_step(task, tx, schedule, mesh, shardings)
    batches = pipeline.train_iterator(config.data, tokenizer, global_batch_size=config.train.batch_size,
                                      seed=0, process_index=0, process_count=1)
    local = next(batches)
    rng = jax.random.key(1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = sharding.make_global_batch(local, mesh)
        compiled = step_fn.lower(state, batch, rng).compile()
        for _ in range(2):
            state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(metrics)
        t = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(metrics)
        step = steps * config.train.batch_size / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, sharding.make_global_batch(next(batches), mesh), rng)
        jax.block_until_ready(metrics)
        loop = steps * config.train.batch_size / (time.perf_counter() - t)
    return step, loop


def measure(config, tokenizer, args, randaugment: bool) -> dict:
    """Pipeline, step and loop examples/s of one config (and the pipeline with RandAugment, for own data)."""
    plain = pipeline_rate(config, tokenizer, args.batches)
    result = {"batch_size": config.train.batch_size, "image_size": config.data.image_size,
              "pipeline_examples_per_s": round(plain, 1)}
    if randaugment:
        config.data.sources.main.image.randaugment.num_layers = 2
        randaug = pipeline_rate(config, tokenizer, args.batches)
        config.data.sources.main.image.randaugment.num_layers = 0
        result["pipeline_randaugment_examples_per_s"] = round(randaug, 1)
    step, loop = step_rate(config, tokenizer, args.steps)
    result.update(train_step_examples_per_s=round(step, 1), train_loop_examples_per_s=round(loop, 1),
                  ratio_pipeline_over_step=round(plain / step, 2), ratio_loop_over_step=round(loop / step, 2))
    if randaugment:
        result["ratio_randaugment_over_step"] = round(result["pipeline_randaugment_examples_per_s"] / step, 2)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    from mmjax.data import image_text, pipeline

    work = tempfile.mkdtemp(prefix="bench_input_")
    t = time.perf_counter()
    annotations, images = make_folder(work, args.images)
    dataset = image_text.build_image_text(annotations, images, os.path.join(work, "tfds"))
    build_s = time.perf_counter() - t
    print(f"built {args.images} images into {dataset} in {build_s:.1f} s", flush=True)

    results = {}
    for model in [m for m in args.models.split(",") if m]:
        config = load_config("own_data", f"{model},{dataset}")
        results[model] = measure(config, pipeline.load_tokenizer(config.data), args, randaugment=True)
        print(model, json.dumps(results[model]), flush=True)
    embedded = {}
    for name in [m for m in args.embedded.split(",") if m]:
        config = load_config(name)
        if args.data_dir:
            config.data.sources.easy_vqa.data_dir = args.data_dir
        embedded[name] = measure(config, pipeline.load_tokenizer(config.data), args, randaugment=False)
        print("embedded", name, json.dumps(embedded[name]), flush=True)

    record = {
        "command": "python experiments/bench_input.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "dataset": {"images": args.images, "size": "320x240 JPEG q90", "captions_per_image": 2,
                    "build_seconds": round(build_s, 1)},
        "results": results,
        "embedded": embedded,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
