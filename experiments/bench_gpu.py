"""GPU readiness: the trainer's jitted train step for CLIP ViT-B/16 and ViLT-B/32 in bfloat16 with fused attention,
examples/s and MFU on one accelerator.

On a GPU (or TPU) host, from the repo root:

    python experiments/bench_gpu.py                            # --clip_batch=256 --vilt_batch=64 --steps=20
    python experiments/bench_gpu.py --peak_tflops=790          # MFU against another peak than mmjax.perf's table

CPU smoke test (refused without --allow_cpu; numbers meaningless, small shapes so it takes about a minute):

    python experiments/bench_gpu.py --allow_cpu --shape=small --clip_batch=2 --vilt_batch=2 --steps=1 --warmup=1 \\
        --out=/tmp/bench_gpu.json

What is measured, per model (one after the other in one process):
  clip  configs/clip.py:base with model.image.patch_size=16 (ViT-B/16 image tower, 224x224 -> 196 patches; 12x512
        text tower, 77 tokens, vocab 49408), softmax contrastive loss, batch --clip_batch.
  vilt  configs/vilt.py:base (ViLT-B/32, 384x384 -> 144 patches, 40 tokens, vocab 30522), MLM + ITM with colour /
        shape hard negatives: one forward over 3 x batch rows (mmjax/tasks/matching.py), batch --vilt_batch.
  Both with model.dtype="bfloat16" (parameters and optimizer state stay float32) and model.attention="auto"
  (jax.nn.dot_product_attention, implementation chosen by jax: cuDNN's fused kernel where it applies). Fused
  kernels have no attention dropout, so every attention_dropout_rate in the model config is set to 0 (the configs
  have none: all model dropouts default to 0).
  The step is the trainer's, built as experiments/bench_step.py builds "ours": build_model -> get_task ->
  make_optimizer -> create_train_state -> mtrain.jit_train_step (state donated, 1-device mesh), on synthetic
  batches holding every train-batch key (bench_step.synthetic_batches). Median of --steps timed steps after
  --warmup untimed ones, each ended by block_until_ready.
  MFU = step FLOPs (mmjax.perf.step_flops of the compiled step: XLA's count, so hardware FLOPs) / (median step time
  x peak), peak = --peak_tflops if given, else mmjax.perf.PEAK_TFLOPS for the device kind (dense bf16 data-sheet
  figures, e.g. 989 TFLOP/s for H100/H200); no peak (CPU) -> MFU null.
  The compiled step's custom-call targets are recorded (custom_calls; fused_attention_calls: those naming fmha /
  flash, i.e. whether cuDNN's fused attention was actually used).
  --shape=small swaps in bench_step's small shapes (width 192, 4 layers, 64x64 images, 8x8 patches) for a quick
  CPU smoke test; on an accelerator use the default --shape=base.
Writes experiments/results/bench_gpu_<device kind, lower case, non-alphanumerics as _>.json (--out overrides) with
the device, jax version, flags, command and per model the raw step times, memory analysis and derived numbers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODELS = ("clip", "vilt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {MODELS}")
    p.add_argument("--clip_batch", type=int, default=256, help="CLIP ViT-B/16 global batch")
    p.add_argument("--vilt_batch", type=int, default=64, help="ViLT-B/32 batch (3x as many rows per forward)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--shape", default="base", choices=("base", "small"),
                   help="base: ViT-B/16 CLIP and ViLT-B/32; small: bench_step's small shapes (CPU smoke tests)")
    p.add_argument("--dtype", default="bfloat16", help="model.dtype (compute dtype)")
    p.add_argument("--attention", default="auto", help="model.attention: auto | xla | cudnn | einsum")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for MFU (default: mmjax.perf's table by device kind)")
    p.add_argument("--allow_cpu", action="store_true", help="run on CPU anyway (smoke test)")
    p.add_argument("--out", default=None, help="JSON path (default experiments/results/bench_gpu_<kind>.json)")
    args = p.parse_args(argv)
    bad = [m for m in args.models.split(",") if m and m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; known: {list(MODELS)}")
    return args


def sanitize(kind: str) -> str:
    """'NVIDIA H200' -> 'nvidia_h200' (for file names)."""
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "unknown"


def zero_attention_dropout(section, path: str = "model") -> list[str]:
    """Sets every attention_dropout* field under a config section to 0 (fused kernels have none); returns what
    was changed."""
    changed = []
    for key in list(section.keys()):
        value = section[key]
        if hasattr(value, "keys"):
            changed += zero_attention_dropout(value, f"{path}.{key}")
        elif key.startswith("attention_dropout") and value:
            section[key] = 0.0
            changed.append(f"{path}.{key}: {value} -> 0")
    return changed


def model_workload(bench_step, name: str, batch: int, args: argparse.Namespace) -> tuple:
    """(bench_step's workload for `name` at --shape and `batch`, set to --dtype and --attention (ViT-B/16 CLIP),
    the config changes made for fused attention)."""
    ns = argparse.Namespace(small_batch=batch, base_batch=batch, vilt_base_batch=batch)
    w = bench_step.workload(name, args.shape, ns)
    m = w.config.model
    if name == "clip" and args.shape == "base":
        m.image.patch_size = 16  # ViT-B/16
    m.dtype = args.dtype
    m.attention = args.attention
    return w, zero_attention_dropout(m)


def run_model(bench_step, name: str, batch: int, args: argparse.Namespace, peak: float | None) -> dict:
    """Builds and times the trainer's step for one model; returns its record."""
    w, changes = model_workload(bench_step, name, batch, args)
    meta = bench_step.dataset_meta(w)
    batches = bench_step.synthetic_batches(w, meta)
    print(f"[{name}] {args.shape}, batch {w.batch}, {w.describe()}, dtype {args.dtype}, attention {args.attention}",
          flush=True)
    ours = bench_step.bench_ours(w.config, meta, bench_step.stand_in_tokenizer(w), batches, args.steps, args.warmup)
    step_s, flops = ours["step_s"], ours["step_flops"]
    r = {"batch": w.batch, "shape": w.describe(), "config_changes": changes, **ours,
         "examples_per_s": w.batch / step_s, "step_ms": step_s * 1e3,
         "achieved_tflops": flops / step_s / 1e12 if flops else None,
         "peak_tflops": peak / 1e12 if peak else None,
         "mfu": flops / step_s / peak if flops and peak else None}
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak)"
    fused = {k: v for k, v in ours["custom_calls"].items() if "fmha" in k.lower() or "flash" in k.lower()}
    r["fused_attention_calls"] = fused
    print(f"[{name}] {ours['params']:,} params, compile {ours['compile_s']:.1f} s, {r['step_ms']:.1f} ms/step, "
          f"{r['examples_per_s']:.1f} ex/s, {(flops or 0) / 1e12:.3f} TFLOP/step, MFU {mfu}, "
          f"loss {ours['loss_last']:.3f}; fused attention custom calls: {fused or 'none'}", flush=True)
    return r


def main(argv: list[str] | None = None) -> None:
    """Refuses to run on CPU without --allow_cpu; otherwise benchmarks --models and writes the JSON."""
    args = parse_args(argv)
    os.chdir(REPO)
    sys.path.insert(0, REPO)
    sys.path.insert(0, HERE)

    # Under TCMalloc where installed, as `python -m mmjax.train` runs (a re-execution: nothing before it counts).
    importlib.import_module("mmjax.host_malloc").reexec_with_tcmalloc()
    import jax

    backend = jax.default_backend()
    if backend == "cpu" and not args.allow_cpu:
        print("bench_gpu.py: no accelerator (jax backend 'cpu'); run it on a GPU/TPU host, or pass --allow_cpu "
              "for a smoke test", file=sys.stderr)
        sys.exit(2)

    import bench_step

    from mmjax import perf

    device = jax.devices()[0]
    peak = perf.peak_flops(device, args.peak_tflops)
    print(f"device {device.device_kind} ({backend}, {jax.device_count()} device(s)); peak "
          + (f"{peak / 1e12:.4g} TFLOP/s" if peak else "unknown (MFU not reported)"), flush=True)

    batches = {"clip": args.clip_batch, "vilt": args.vilt_batch}
    results = {}
    for name in [m for m in args.models.split(",") if m]:
        try:
            results[name] = run_model(bench_step, name, batches[name], args, peak)
        except Exception as e:  # record and go on: one model's failure (e.g. out of memory) keeps the other's
            results[name] = {"error": bench_step.first_line(e), "batch": batches[name]}
            print(f"[{name}] FAILED: {bench_step.first_line(e)}", flush=True)
            import traceback
            traceback.print_exc(file=sys.stderr)

    out = args.out or os.path.join(REPO, "experiments", "results", f"bench_gpu_{sanitize(device.device_kind)}.json")
    record = {
        "benchmark": "bench_gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable] + sys.argv),
        "args": vars(args),
        "device": {"kind": device.device_kind, "platform": device.platform, "count": jax.device_count(),
                   "peak_tflops": peak / 1e12 if peak else None,
                   "peak_source": "--peak_tflops" if args.peak_tflops else ("mmjax.perf.PEAK_TFLOPS" if peak
                                                                            else None)},
        "machine": {"python": platform.python_version(), "jax": jax.__version__,
                    "jaxlib": getattr(sys.modules.get("jaxlib"), "__version__", None), "jax_backend": backend,
                    "host_cpu": bench_step.cpu_model(), "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                    **bench_step.allocator_info()},
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)

    print()
    print("| model | batch | ms/step | examples/s | TFLOP/step (XLA) | achieved TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | {r['batch']} | failed: {r['error']} | | | | |")
            continue
        flops = r["step_flops"]
        print(f"| {name} | {r['batch']} | {r['step_ms']:.1f} | {r['examples_per_s']:.1f} | "
              f"{flops / 1e12 if flops else float('nan'):.3f} | {r['achieved_tflops'] or float('nan'):.1f} | "
              + (f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-") + " |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
