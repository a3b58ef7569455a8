"""Benchmark one CLIP train step on CPU: mmjax (JAX/Flax) vs a shape-matched PyTorch `transformers.CLIPModel`.

Run on an IDLE machine (two busy processes on 2 cores slow each other ~9x), from the repo root:

    /work/venv/bin/python experiments/bench_clip_step.py --configs=tiny,base --steps=20 --warmup=3 --base_batch=16 --threads=2

Smoke test (seconds, numbers meaningless):

    /work/venv/bin/python experiments/bench_clip_step.py --steps=2 --warmup=1 --tiny_batch=16 --base_batch=2 --out=/tmp/bench.json

What is measured, per config (configs/clip.py:tiny and :base):
  ours   the trainer's step exactly: build_model -> get_task -> make_optimizer -> create_train_state ->
         jax.jit(train_step, in/out shardings, donate_argnums=(0,)) on a 1-device mesh, under
         `jax.set_mesh(mesh), nn.logical_axis_rules(rules)`. Random synthetic batches (image float32 [B,S,S,3],
         text_ids/text_mask int32 [B,L] with varied lengths). Step FLOPs from XLA's cost analysis of the compiled step.
  torch  transformers.CLIPModel with the same widths / depths / heads / MLP / patch / image size / max_len / vocab /
         projection dim, exact-erf "gelu", float32, train mode; step = forward(return_loss=True) + backward +
         clip_grad_norm_ + AdamW(same lr, betas, eps, weight decay on the same kind of params) + zero_grad.
  peak   float32 matmul FLOP/s (jitted jnp.dot, N x N, 2 N^3 flops, median), measured in the same run; torch.mm too.
Times are medians over --steps timed steps after --warmup untimed ones (each step ends in block_until_ready /
is synchronous in torch). ratio = ours examples/s / torch examples/s (> 1: mmjax faster).

Threads: torch.set_num_threads(--threads). XLA:CPU sizes its intra-op pool from the CPUs this process may run on,
so when --threads is below the CPU count the process is pinned (sched_setaffinity) to --threads CPUs before jax
is imported; both frameworks then use the same cores. XLA_FLAGS is left as the environment sets it (default:
unset) and recorded in the JSON.

Known model differences (small next to the matmuls): HF's ViT patch conv has no bias (ours has one; configs/clip.py
now has HF's pre-LayerNorm too, ln_pre=True, since the results in experiments/results/bench_clip_step.json were
taken without it); HF's vision LayerNorm eps is set to ours (1e-6); text pooling is at the same (last
real, eos) token in both. Our step also computes grad/param norms and an in-batch accuracy for its metrics.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "experiments", "results", "bench_clip_step.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,base", help="comma-separated variants of configs/clip.py")
    p.add_argument("--steps", type=int, default=20, help="timed steps per framework and config")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--tiny_batch", type=int, default=None, help="batch for tiny (default: config.train.batch_size)")
    p.add_argument("--base_batch", type=int, default=16, help="batch for base/large (CPU-feasible)")
    p.add_argument("--tiny_vocab", type=int, default=128, help="text vocab for tiny (the config leaves it unset)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both frameworks")
    p.add_argument("--matmul_n", type=int, default=2048, help="N of the N x N float32 matmul peak")
    p.add_argument("--skip_torch", action="store_true", help="measure only mmjax")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    return p.parse_args(argv)


def pin_threads(threads: int) -> None:
    """Restrict this process to `threads` CPUs (before jax is imported) so XLA's pool matches torch's."""
    if not hasattr(os, "sched_getaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])


def cpu_model() -> str | None:
    """'model name' from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def load_config(variant: str):
    """configs/clip.py:get_config(variant), loaded by path as the trainer's config flag does."""
    spec = importlib.util.spec_from_file_location("clip_config", os.path.join(REPO, "configs", "clip.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def synthetic_batches(n: int, batch: int, image_size: int, max_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """n random numpy batches. Texts are right-padded, 2..max_len tokens, ending in the eos id (vocab - 1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(2, max_len + 1, size=batch)
        pos = np.arange(max_len)[None]
        mask = (pos < lengths[:, None]).astype(np.int32)
        ids = rng.integers(1, vocab - 1, size=(batch, max_len)).astype(np.int32)
        ids = np.where(pos == (lengths[:, None] - 1), vocab - 1, ids)  # eos at the last real token
        ids = np.where(mask > 0, ids, 0).astype(np.int32)  # pad id 0
        image = rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
        out.append({"image": image, "text_ids": ids, "text_mask": mask})
    return out


def timed(fn, steps: int, warmup: int) -> list[float]:
    """Runs fn() warmup + steps times; returns the timed steps' seconds (fn must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


# ----------------------------------------------------------------------------------------------------------------
# Machine peak

def matmul_peak(n: int, reps: int = 10) -> dict:
    """Median float32 N x N matmul GFLOP/s in jax (jitted jnp.dot) and torch (if importable)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    flops = 2.0 * n ** 3
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32))
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    t_jax = statistics.median(timed(lambda: jax.block_until_ready(dot(a, b)), reps, 2))
    out = {"n": n, "jax_gflops": flops / t_jax / 1e9}
    try:
        import torch
        ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
        t_torch = statistics.median(timed(lambda: torch.mm(ta, tb), reps, 2))
        out["torch_gflops"] = flops / t_torch / 1e9
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------------------------------------------
# mmjax

def bench_ours(config, batch_size: int, steps: int, warmup: int) -> dict:
    """The trainer's jitted, donated, sharded train step on synthetic batches."""
    import flax.linen as nn
    import jax

    from mmjax import optim, sharding
    from mmjax import state as state_lib
    from mmjax import perf
    from mmjax import train as mtrain
    from mmjax.data import pipeline
    from mmjax.models import build_model
    from mmjax.tasks import get_task

    mesh = sharding.create_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    rules = sharding.logical_rules(config.sharding.rules)
    # Synthetic batches: what the model reads, sized by the config alone (no dataset is opened).
    meta = pipeline.DatasetMeta(sources={}, eval_source="", vocab_size=config.model.text.vocab_size,
                                model_keys=("image", "text_ids", "text_mask"))
    state_lib.resolve_model_config(config, meta)
    model = build_model(config.model)
    task = get_task(config.task, model=model, config=config, meta=meta, tokenizer=None, mesh=mesh)
    shapes = pipeline.batch_shapes(config.data, meta)
    boxed = state_lib.abstract_params(model, shapes, config.seed)
    n_params = state_lib.count_params(boxed)
    tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps, nn.meta.unbox(boxed))
    state, shardings = state_lib.create_train_state(model, shapes, tx, mesh, rules, config.seed, boxed)

    step_fn = mtrain.jit_train_step(task, tx, schedule, mesh, shardings)
    rng = jax.random.key(config.seed + 1)
    np_batches = synthetic_batches(2, batch_size, config.data.image_size, config.data.max_len,
                                   config.model.text.vocab_size)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batches = [sharding.make_global_batch(b, mesh) for b in np_batches]
        t = time.perf_counter()
        compiled = step_fn.lower(state, batches[0], rng).compile()
        compile_s = time.perf_counter() - t
        flops = perf.step_flops(compiled)

        holder = {"state": state, "i": 0, "metrics": None}

        def one_step():
            i = holder["i"]
            holder["state"], holder["metrics"] = compiled(holder["state"], batches[i % len(batches)], rng)
            jax.block_until_ready((holder["state"], holder["metrics"]))
            holder["i"] = i + 1

        times = timed(one_step, steps, warmup)
        loss = float(jax.device_get(holder["metrics"]["loss"]))
    step_s = statistics.median(times)
    return {"params": n_params, "compile_s": compile_s, "step_s": step_s, "step_times_s": times,
            "step_flops": flops, "loss_last": loss}


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference

def torch_clip_config(config):
    """A transformers CLIPConfig with the same shapes as config.model."""
    from transformers import CLIPConfig

    m = config.model
    img, txt = m.image, m.text
    vocab = txt.vocab_size
    text_config = dict(
        vocab_size=vocab, hidden_size=txt.width, intermediate_size=txt.mlp_dim, num_hidden_layers=txt.depth,
        num_attention_heads=txt.heads, max_position_embeddings=config.data.max_len, hidden_act="gelu",
        layer_norm_eps=1e-5, attention_dropout=0.0, pad_token_id=0, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, projection_dim=m.embed_dim)
    vision_config = dict(
        hidden_size=img.width, intermediate_size=img.mlp_dim, num_hidden_layers=img.depth,
        num_attention_heads=img.heads, image_size=config.data.image_size, patch_size=img.patch_size, num_channels=3,
        hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0, projection_dim=m.embed_dim)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=m.embed_dim,
                      logit_scale_init_value=m.logit_scale_init or math.log(1 / 0.07))


def bench_torch(config, batch_size: int, steps: int, warmup: int, threads: int) -> dict:
    """transformers.CLIPModel train step: forward(return_loss) + backward + clip + AdamW + zero_grad."""
    import re

    import numpy as np
    import torch
    from transformers import CLIPModel

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = CLIPModel(torch_clip_config(config)).float().train()
    n_params = sum(p.numel() for p in model.parameters())

    # Same decay rule as mmjax.optim.decay_mask: >= 2-D params decay, except embedding tables / pos / cls / scale.
    no_decay = re.compile(r"(token_embedding|position_embedding|class_embedding|logit_scale)")
    decay, keep = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not no_decay.search(name) else keep).append(p)
    oc = config.optimizer
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay},
                             {"params": keep, "weight_decay": 0.0}],
                            lr=oc.lr, betas=(oc.b1, oc.b2), eps=oc.eps)
    params = list(model.parameters())

    batches = []
    for b in synthetic_batches(2, batch_size, config.data.image_size, config.data.max_len,
                               config.model.text.vocab_size):
        batches.append({
            "pixel_values": torch.from_numpy(np.ascontiguousarray(b["image"].transpose(0, 3, 1, 2))),
            "input_ids": torch.from_numpy(b["text_ids"].astype(np.int64)),
            "attention_mask": torch.from_numpy(b["text_mask"].astype(np.int64)),
        })

    holder = {"i": 0, "loss": None}

    def one_step():
        i = holder["i"]
        out = model(**batches[i % len(batches)], return_loss=True)
        out.loss.backward()
        if oc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, oc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = out.loss.detach()
        holder["i"] = i + 1

    times = timed(one_step, steps, warmup)
    return {"params": n_params, "step_s": statistics.median(times), "step_times_s": times,
            "loss_last": float(holder["loss"]), "attn_implementation": model.config._attn_implementation,
            "num_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    pin_threads(args.threads)
    os.chdir(REPO)
    sys.path.insert(0, REPO)

    import jax

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_before and load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f} before the run: the machine is not idle, "
              "timings will be unreliable", file=sys.stderr)

    peak = matmul_peak(args.matmul_n)
    print(f"matmul peak (float32 {args.matmul_n}^2): jax {peak['jax_gflops']:.1f} GFLOP/s"
          + (f", torch {peak['torch_gflops']:.1f} GFLOP/s" if "torch_gflops" in peak else ""), flush=True)

    results = {}
    for variant in [v for v in args.configs.split(",") if v]:
        config = load_config(variant)
        if config.model.text.get("vocab_size") is None:
            config.model.text.vocab_size = args.tiny_vocab
        if variant == "tiny":
            batch = args.tiny_batch or config.train.batch_size
        else:
            batch = args.base_batch
        config.train.batch_size = batch
        print(f"[{variant}] batch {batch}, image {config.data.image_size}, max_len {config.data.max_len}, "
              f"vocab {config.model.text.vocab_size}", flush=True)

        ours = bench_ours(config, batch, args.steps, args.warmup)
        r = {"batch": batch, "image_size": config.data.image_size, "max_len": config.data.max_len,
             "vocab_size": config.model.text.vocab_size, "ours": ours}
        r["ours_step_ms"] = ours["step_s"] * 1e3
        r["ours_examples_per_s"] = batch / ours["step_s"]
        r["step_flops"] = ours["step_flops"]
        r["achieved_gflops"] = ours["step_flops"] / ours["step_s"] / 1e9 if ours["step_flops"] else None
        r["matmul_peak_gflops"] = peak["jax_gflops"]
        r["fraction_of_peak"] = r["achieved_gflops"] / peak["jax_gflops"] if r["achieved_gflops"] else None
        print(f"[{variant}] ours: {ours['params']:,} params, compile {ours['compile_s']:.1f} s, "
              f"{r['ours_step_ms']:.1f} ms/step", flush=True)

        if not args.skip_torch:
            ref = bench_torch(config, batch, args.steps, args.warmup, args.threads)
            r["torch"] = ref
            r["torch_step_ms"] = ref["step_s"] * 1e3
            r["torch_examples_per_s"] = batch / ref["step_s"]
            r["ratio"] = r["ours_examples_per_s"] / r["torch_examples_per_s"]
            print(f"[{variant}] torch: {ref['params']:,} params, {r['torch_step_ms']:.1f} ms/step "
                  f"(attn {ref['attn_implementation']})", flush=True)
        results[variant] = r

    torch_version = None
    if not args.skip_torch:
        import torch
        torch_version = torch.__version__
    record = {
        "benchmark": "bench_clip_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable] + sys.argv),
        "args": vars(args),
        "machine": {
            "processor": platform.processor(), "cpu_model": cpu_model(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpus_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "torch": torch_version, "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        },
        "matmul_peak": peak,
        "configs": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)

    header = (f"{'config':<6} {'batch':>5} {'ours ms':>9} {'torch ms':>9} {'ours ex/s':>10} {'torch ex/s':>10} "
              f"{'ratio':>6} {'GFLOP/step':>10} {'GFLOP/s':>8} {'peak':>7} {'%peak':>6}")
    print()
    print(header)
    print("-" * len(header))
    nan = float("nan")
    for variant, r in results.items():
        print(f"{variant:<6} {r['batch']:>5} {r['ours_step_ms']:>9.1f} {r.get('torch_step_ms', nan):>9.1f} "
              f"{r['ours_examples_per_s']:>10.1f} {r.get('torch_examples_per_s', nan):>10.1f} "
              f"{r.get('ratio', nan):>6.2f} {(r['step_flops'] or nan) / 1e9:>10.1f} "
              f"{r['achieved_gflops'] or nan:>8.1f} {r['matmul_peak_gflops']:>7.1f} "
              f"{100 * (r['fraction_of_peak'] or nan):>5.1f}%")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
