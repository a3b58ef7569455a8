"""Per-device memory of pod-scale train steps, compiled for fake CPU devices and never run.

    python experiments/memory_table.py                      # 8, 64 and 256 devices; ~30-60 min on 2 cores
    python experiments/memory_table.py --devices=8 --models=clip:large

For clip:large (SigLIP-style ViT-L/14 + 12x768 text), vilt:base and coca:base, on 8, 64 and 256 fake CPU devices
(one subprocess per device count: XLA fixes the count at start-up) and several (data, fsdp, tensor) meshes, the
trainer's dry run builds the real train step with the run's shardings and XLA reports per-device bytes: parameters
+ optimizer state (from the shardings), arguments, outputs and temporaries (XLA's memory analysis). The global batch
is one example per device; layers run under nn.scan. Also: the time of the clip:large dry run (building the model
and compiling its step: a 24-layer image tower and a 12-layer text tower) with the layers unrolled and under
nn.scan, on 8 devices. Results: experiments/results/memory_table.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
MODELS = ("clip:large", "vilt:base", "coca:base")


def meshes(devices: int) -> list[dict]:
    """The meshes compared at a device count: pure data parallel, pure FSDP, FSDP x 4-way tensor parallel."""
    return [dict(data=devices, fsdp=1, tensor=1), dict(data=1, fsdp=devices, tensor=1),
            dict(data=1, fsdp=devices // 4, tensor=4)]


def load(spec: str):
    """configs/NAME.py:ARG -> its ConfigDict."""
    name, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(ROOT, "configs",
                                                                                       f"{name}.py"))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def compile_row(spec: str, mesh: dict, batch: int, scan: bool) -> dict:
    """One dry run: the step compiled on this process's devices with `mesh`; bytes per device and compile time."""
    from mmjax import train  # pylint: disable=import-outside-toplevel

    config = load(spec)
    config.mesh.update(mesh)
    config.train.batch_size = batch
    config.evals = {}
    if "scan_layers" in config.model:
        config.model.scan_layers = scan
    started = time.perf_counter()
    summary = train.train_and_evaluate(config, None, dry_run=True)
    return dict(model=spec, mesh=mesh, batch=batch, scan=scan, compile_s=round(time.perf_counter() - started, 1),
                params=summary["params"], step_tflops=(summary["train_step_flops"] or 0) / 1e12, **summary["memory"])


def worker(devices: int, models: list[str], compile_times: bool) -> None:
    """Runs every (model, mesh) row for this process's device count; prints one JSON line each."""
    import jax  # pylint: disable=import-outside-toplevel

    assert jax.device_count() == devices, (jax.device_count(), devices)
    for spec in models:
        for mesh in meshes(devices):
            print(json.dumps(compile_row(spec, mesh, devices, scan=True)), flush=True)
    if compile_times:
        for scan in (False, True):
            row = compile_row("clip:large", dict(data=1, fsdp=devices, tensor=1), devices, scan=scan)
            print(json.dumps(dict(row, kind="compile_time")), flush=True)


def markdown(rows: list[dict]) -> str:
    """The README table: one line per (model, devices, mesh)."""
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    lines = ["| model | devices | mesh (data x fsdp x tensor) | params + opt / device (MiB) | x 1/fsdp check | "
             "arguments | outputs | temporaries (MiB) |", "|---|---|---|---|---|---|---|---|"]
    by_model: dict[str, int] = {}
    for r in rows:
        if r.get("kind") == "compile_time":
            continue
        m = r["mesh"]
        if m["data"] > 1 and m["fsdp"] == 1:
            by_model[r["model"]] = r["state_bytes_per_device"]  # replicated: the whole state on every device
        full = by_model.get(r["model"])
        ratio = f"{r['state_bytes_per_device'] * m['fsdp'] * m['tensor'] / full:.3f}" if full else ""
        lines.append(f"| {r['model']} | {r['devices']} | {m['data']} x {m['fsdp']} x {m['tensor']} | "
                     f"{mib(r['state_bytes_per_device'])} | {ratio} | {mib(r['argument_size_in_bytes'])} | "
                     f"{mib(r['output_size_in_bytes'])} | {mib(r['temp_size_in_bytes'])} |")
    times = [r for r in rows if r.get("kind") == "compile_time"]
    if times:
        lines += ["", "| clip:large step, 8 devices, FSDP | dry run: build + compile (s) |", "|---|---|"]
        lines += [f"| {'nn.scan' if r['scan'] else 'unrolled'} layers | {r['compile_s']} |" for r in times]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Spawns one worker per device count and writes the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="8,64,256", help="comma-separated fake device counts")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(n) for n in args.devices.split(",")]
    models = args.models.split(",")
    if args.worker:
        worker(counts[0], models, compile_times=counts[0] == 8)
        return
    rows = []
    for n in counts:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", TF_CPP_MIN_LOG_LEVEL="3")
        print(f"compiling for {n} devices ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", f"--devices={n}", f"--models={args.models}"],
                              env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        found = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
        for row in found:
            row["devices"] = n
            print(f"  {row['model']} mesh {row['mesh']} scan={row['scan']}: state "
                  f"{row['state_bytes_per_device'] / 2**20:,.0f} MiB, temporaries "
                  f"{row['temp_size_in_bytes'] / 2**20:,.0f} MiB, compile {row['compile_s']} s", flush=True)
        rows += found
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "memory_table.json"), "w") as f:
        json.dump(dict(command="python experiments/memory_table.py " + " ".join(sys.argv[1:]),
                       date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                       versions={m: importlib.metadata.version(m) for m in ("jax", "jaxlib", "flax")}, rows=rows),
                  f, indent=1)
    table = markdown(rows)
    with open(os.path.join(RESULTS, "memory_table.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
