"""Benchmark caption decoding speed: greedy and beam search (beam 4) on the key/value cache, and greedy decoding
that recomputes the whole prefix at every step (no cache), for a captioning run (configs/caption.py).

Run on an IDLE machine (two busy processes on 2 cores slow each other ~9x), from the repo root, after training:

    python -m mmjax.train --config=configs/caption.py --workdir=/tmp/caption
    python experiments/bench_decode.py --workdir=/tmp/caption --batches=1,32,256 --repeats=5

Without --workdir the caption config's tiny model is randomly initialised (the speed per step is the same, but an
untrained model ends its captions at random lengths). Smoke test: --batches=2 --repeats=1 --out=/tmp/bench.json.

What is measured: one jitted call `decoding.generate(model, params, images, DecodeConfig(...))` per batch of test
images (the image encoder, the cache's creation and the whole while_loop), median wall time over --repeats calls
after one untimed call (the compilation). Reported per method and batch: ms per call, images/s, decoder_steps (the
longest caption's length: the loop stops once every caption has ended, and for beam search a little later, when no
live beam can still win, so for beams this is a lower bound), and tokens/s = the generated caption tokens (up to and
including [SEP], summed over the batch's best sequences) per second. For beam search, beam_tokens/s counts every
beam's token (batch x beams x decoder_steps, so a lower bound too). `no_cache` runs the same greedy decoding with a
full causal forward over the max_len prefix at each step (a lax.fori_loop, max_len - 1 steps); its tokens must equal
the cached greedy's. `beam4_reorder_memory` is beam search that also reorders the memory's cached keys with the
beams (before they were marked as shared); its tokens must equal beam4's.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DEFAULT_OUT = os.path.join(REPO, "experiments", "results", "bench_decode.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="a configs/caption.py run (default: random init)")
    p.add_argument("--batches", default="1,32,256", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per method and batch")
    p.add_argument("--beam_size", type=int, default=4)
    p.add_argument("--out", default=DEFAULT_OUT)
    return p.parse_args(argv)


def load(workdir: str | None):
    """(model, params, config, tokenizer) of the run, or of configs/caption.py at random init."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel

    from mmjax import checkpoint, pretrained  # pylint: disable=import-outside-toplevel
    from mmjax import state as state_lib  # pylint: disable=import-outside-toplevel
    from mmjax.data import pipeline  # pylint: disable=import-outside-toplevel
    from mmjax.models import build_model  # pylint: disable=import-outside-toplevel

    if workdir:
        config = checkpoint.load_config(workdir)
        ckpt = pretrained.load_checkpoint(workdir)
        model = build_model(ckpt.model_config)
        tokenizer = pipeline.load_tokenizer(config.data)
        return model, jax.device_put(ckpt.params), config, tokenizer
    import importlib.util  # pylint: disable=import-outside-toplevel

    spec = importlib.util.spec_from_file_location("caption_config", os.path.join(REPO, "configs", "caption.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    tokenizer = pipeline.load_tokenizer(config.data)
    meta = pipeline.dataset_meta(config.data, tokenizer)
    state_lib.resolve_model_config(config, meta)
    model = build_model(config.model)
    shapes = pipeline.batch_shapes(config.data, meta)
    params = state_lib.init_params(model, shapes, jax.random.key(0))
    return model, nn.unbox(params), config, tokenizer


def no_cache_greedy(model, params, image, max_len, bos_id, eos_id, pad_id):
    """Greedy decoding that recomputes the full causal forward over the prefix at every step."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    memory, memory_mask = model.apply({"params": params}, image, method="image_memory")
    b = image.shape[0]
    tokens = jnp.full((b, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)

    def body(t, state):
        tokens, done = state
        logits = model.apply({"params": params}, tokens, memory, memory_mask, method="decode_text")
        chosen = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), axis=-1)
        chosen = jnp.where(done, pad_id, chosen).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], t + 1, axis=1)
        return tokens, done | (chosen == eos_id)

    return jax.lax.fori_loop(0, max_len - 1, body, (tokens, jnp.zeros((b,), bool)))[0]


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from mmjax import decoding  # pylint: disable=import-outside-toplevel
    from mmjax.data import pipeline  # pylint: disable=import-outside-toplevel

    model, params, config, tok = load(args.workdir)
    max_len = int(config.data.max_len)
    special = dict(bos_id=tok.cls_id, eos_id=tok.sep_id, pad_id=tok.pad_id)
    batches = [int(b) for b in args.batches.split(",")]
    images = next(pipeline.eval_batches(config.data, tok, global_batch_size=max(batches), process_index=0,
                                        process_count=1))["image"]
    methods = {
        "greedy": jax.jit(functools.partial(decoding.generate, model, config=decoding.DecodeConfig(
            "greedy", max_len=max_len), **special)),
        f"beam{args.beam_size}": jax.jit(functools.partial(decoding.generate, model, config=decoding.DecodeConfig(
            "beam", max_len=max_len, beam_size=args.beam_size), **special)),
        "greedy_no_cache": jax.jit(functools.partial(no_cache_greedy, model, max_len=max_len, **special)),
        # Beam search that reorders the memory's cached keys with the beams too (what it did before they were
        # marked as shared: traced with decoding.is_memory_cache answering no).
        f"beam{args.beam_size}_reorder_memory": jax.jit(functools.partial(
            decoding.generate, model, config=decoding.DecodeConfig("beam", max_len=max_len,
                                                                   beam_size=args.beam_size), **special)),
    }
    rows = []
    for b in batches:
        x = jax.device_put(images[:b])
        reference = None
        for name, fn in methods.items():
            shared = (lambda path: False) if name.endswith("reorder_memory") else decoding.is_memory_cache
            with mock.patch.object(decoding, "is_memory_cache", shared):
                out = jax.block_until_ready(fn(params, x))  # compile (traces under the patch)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = jax.block_until_ready(fn(params, x))
                times.append(time.perf_counter() - start)
            tokens = np.asarray(out[0] if isinstance(out, tuple) else out)
            if name == "greedy":
                reference = tokens
            if name == "greedy_no_cache":
                assert np.array_equal(tokens, reference), "uncached greedy decoding differs from the cached one"
            if name.startswith("beam") and not name.endswith("reorder_memory"):
                beam_reference = tokens
            if name.endswith("reorder_memory"):
                assert np.array_equal(tokens, beam_reference), "reordering the memory cache changed beam search"
            lengths = np.asarray(decoding.caption_lengths(tokens, tok.sep_id))
            steps = int(lengths.max()) if name != "greedy_no_cache" else max_len - 1
            seconds = statistics.median(times)
            row = dict(method=name, batch=b, ms_per_call=1e3 * seconds, images_per_s=b / seconds,
                       decoder_steps=steps, tokens_per_s=float(lengths.sum()) / seconds,
                       mean_caption_tokens=float(lengths.mean()))
            if name.startswith("beam"):
                row["beam_tokens_per_s"] = b * args.beam_size * steps / seconds
            rows.append(row)
            print(json.dumps(row))
    result = dict(benchmark="bench_decode", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  command=" ".join([os.path.relpath(sys.argv[0], REPO)] + (argv or sys.argv[1:])),
                  machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count()),
                  versions=dict(jax=jax.__version__, python=platform.python_version()),
                  workdir=args.workdir, max_len=max_len, repeats=args.repeats, results=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
