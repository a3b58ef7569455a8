"""Where the time of one mmjax train step goes on CPU: XLA's per-op trace of bench_step.py's step, summarised.

Run on an IDLE machine, from the repo root:

    /work/venv/bin/python experiments/profile_step.py --family=clip --shape=small

Builds the step exactly as experiments/bench_step.py does (the trainer's jitted, donated step on synthetic batches),
times --steps steps, then traces --trace_steps more with jax.profiler (XLA_FLAGS gains
--xla_cpu_enable_xprof_traceme=true, which names every executed op) and reads the trace back:

- by phase (forward = under jvp, backward = under transpose(jvp), the rest = loss tail, gradient norms, optimizer)
  and kind (matmul ops = the dots XLA hands to its GEMM library, everything else), each op's summed run time per
  step, op count and, for matmuls, GFLOP/s from the dot shapes in the compiled HLO;
- how the step's wall time splits into no op running (runtime overhead between ops), one op and two at once;
- the heaviest ops with their HLO names and the model op they come from;
- the same matmul shapes run alone (a jitted dot_general on fresh inputs, median of 20) next to their in-step rate;
- minor page faults per step (getrusage).

Writes the summary as JSON (--out) and prints it. The trace itself stays in --trace_dir (TensorBoard's profile
plugin or Perfetto open it).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "profile_step.json")
_NOT_OPS = ("$", "Thunk", "Pjit", "Slinky", "end:", "Parse", "Handle", "Common", "Threadpool", "Wait",
            "Allocate", "Python", "PjRt", "Execute")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="clip", help="a bench_step.py family")
    p.add_argument("--shape", default="small", help="small | base")
    p.add_argument("--batch", type=int, default=None, help="batch (default: bench_step.py's for the shape)")
    p.add_argument("--steps", type=int, default=5, help="timed steps before tracing")
    p.add_argument("--trace_steps", type=int, default=3, help="steps traced")
    p.add_argument("--threads", type=int, default=2, help="CPUs the process is pinned to")
    p.add_argument("--top", type=int, default=15, help="heaviest ops listed")
    p.add_argument("--trace_dir", default="/tmp/mmjax_profile_step", help="where jax.profiler writes the trace")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON summary path")
    return p.parse_args(argv)


def hlo_ops(hlo: str) -> dict[str, dict]:
    """Instruction name -> {"op": the model op's name from metadata, "flops": dot FLOPs inside it (0 if none),
    "dot": the dot's shapes} for every instruction of the compiled module's text."""
    computations = {m.group(1): m.group(2) for m in re.finditer(r"^%?([\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo, re.S | re.M)}
    shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo))
    ops: dict[str, dict] = {}
    for m in re.finditer(r"%([\w.\-]+) = \S+ ([\w-]+)\(([^)]*)\)(.*?)$", hlo, re.M):
        name, kind, operands, rest = m.groups()
        meta = re.search(r'op_name="([^"]*)"', rest)
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = computations.get(called.group(1), "") if called else (m.group(0) if kind == "dot" else "")
        flops, dot = 0, None
        for d in re.finditer(r"= \w+\[([\d,]*)\]\S* dot\(([^)]*)\), .*?lhs_contracting_dims=\{([\d,]*)\}", body):
            out = [int(x) for x in d.group(1).split(",") if x]
            lhs = d.group(2).split(",")[0].strip().lstrip("%").split(" ")[-1].lstrip("%")
            lhs_shape = [int(x) for x in shapes.get(lhs, "").split(",") if x]
            contract = [int(x) for x in d.group(3).split(",") if x]
            if lhs_shape and all(c < len(lhs_shape) for c in contract):
                k = 1
                for c in contract:
                    k *= lhs_shape[c]
                n = 1
                for x in out:
                    n *= x
                flops += 2 * n * k
                dot = {"out": out, "lhs": lhs_shape, "contract": contract, "k": k}
        ops[name] = {"op": meta.group(1) if meta else "", "flops": flops, "dot": dot}
    return ops


def phase(op_name: str) -> str:
    """forward / backward / other, from the jvp / transpose(jvp) scopes JAX puts in op names."""
    if "transpose(jvp" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "other"


def read_trace(trace_dir: str) -> list[dict]:
    """The complete ('X') events of the newest trace under trace_dir."""
    files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and not e.get("name", "").startswith(_NOT_OPS)]


def concurrency(events: list[dict]) -> dict[int, float]:
    """Microseconds during which 0, 1, 2, ... ops ran at once, between the first op's start and the last's end."""
    points = sorted([(e["ts"], 1) for e in events] + [(e["ts"] + e["dur"], -1) for e in events])
    spans: dict[int, float] = collections.Counter()
    running, last = 0, points[0][0]
    for t, delta in points:
        spans[running] += t - last
        running, last = running + delta, t
    return dict(spans)


def summarise(events: list[dict], ops: dict[str, dict], steps: int, top: int) -> dict:
    """Per-step totals by phase x kind, the concurrency split and the heaviest ops."""
    groups: dict[str, dict] = collections.defaultdict(lambda: {"ms": 0.0, "ops": 0, "gflop": 0.0})
    heavy: dict[str, float] = collections.Counter()
    for e in events:
        info = ops.get(e["name"], {"op": "", "flops": 0})
        kind = "matmul" if info["flops"] else "other ops"
        g = groups[f"{phase(info['op'])} {kind}"]
        g["ms"] += e["dur"] / 1e3 / steps
        g["ops"] += 1 / steps
        g["gflop"] += info["flops"] / 1e9 / steps
        heavy[e["name"]] += e["dur"] / 1e3 / steps
    for g in groups.values():
        g["ops"] = round(g["ops"])
        g["gflop_per_s"] = g["gflop"] / (g["ms"] / 1e3) if g["gflop"] else None
    spans = concurrency(events)
    wall = sum(spans.values())
    return {
        "by_phase_and_kind": dict(sorted(groups.items())),
        "wall_ms_per_step": wall / 1e3 / steps,
        "ops_running_ms_per_step": {str(k): v / 1e3 / steps for k, v in sorted(spans.items())},
        "heaviest_ops": [{"name": n, "ms": ms, "op": ops.get(n, {}).get("op", ""),
                          "dot": ops.get(n, {}).get("dot"),
                          "gflop_per_s": (ops.get(n, {}).get("flops", 0) / 1e9 / (ms / 1e3)) or None}
                         for n, ms in heavy.most_common(top)],
    }


def isolated_dot_rates(heaviest: list[dict], reps: int = 20) -> list[dict]:
    """The heaviest ops' dot shapes run alone: GFLOP/s of a jitted dot_general on fresh random inputs."""
    import jax
    import numpy as np

    seen, out = set(), []
    rng = np.random.default_rng(0)
    for h in heaviest:
        dot = h.get("dot")
        if not dot or len(dot["lhs"]) != 2 or len(dot["out"]) != 2:
            continue
        key = (tuple(dot["lhs"]), tuple(dot["out"]), tuple(dot["contract"]))
        if key in seen:
            continue
        seen.add(key)
        lhs_shape, (m, n), c = dot["lhs"], dot["out"], dot["contract"][0]
        rhs_shape = (dot["k"], n)
        a = jax.numpy.asarray(rng.standard_normal(lhs_shape, dtype=np.float32))
        b = jax.numpy.asarray(rng.standard_normal(rhs_shape, dtype=np.float32))
        f = jax.jit(lambda a, b, c=c: jax.lax.dot_general(a, b, (((c,), (0,)), ((), ()))))
        for _ in range(3):
            f(a, b).block_until_ready()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f(a, b).block_until_ready()
            times.append(time.perf_counter() - t)
        out.append({"lhs": lhs_shape, "out": [m, n], "contract": [c], "in_step_gflop_per_s": h["gflop_per_s"],
                    "alone_gflop_per_s": 2 * m * n * dot["k"] / statistics.median(times) / 1e9})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    sys.path.insert(0, HERE)
    import importlib

    importlib.import_module("mmjax.host_malloc").reexec_with_tcmalloc()
    flags = os.environ.get("XLA_FLAGS", "")
    if "xprof_traceme" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_enable_xprof_traceme=true".strip()
    import bench_step

    bench_step.pin_threads(args.threads)
    os.chdir(REPO)
    from mmjax import host_malloc

    ns = argparse.Namespace(small_batch=args.batch, base_batch=args.batch or 16, vilt_base_batch=args.batch)
    w = bench_step.workload(args.family, args.shape, ns)
    meta = bench_step.dataset_meta(w)
    result = bench_step.bench_ours(w.config, meta, bench_step.stand_in_tokenizer(w),
                                   bench_step.synthetic_batches(w, meta), args.steps, 2,
                                   trace_dir=args.trace_dir, trace_steps=args.trace_steps)
    ops = hlo_ops(result.pop("hlo_text"))
    summary = summarise(read_trace(args.trace_dir), ops, args.trace_steps, args.top)
    summary["isolated_matmuls"] = isolated_dot_rates(summary["heaviest_ops"])
    record: dict[str, Any] = {
        "benchmark": "profile_step", "command": " ".join([sys.executable] + sys.argv), "family": args.family,
        "shape": args.shape, "batch": w.batch, "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "allocator": host_malloc.loaded_allocator(), "step_ms_median": result["step_s"] * 1e3,
        "step_gflop": (result["step_flops"] or 0) / 1e9, "page_faults_per_step": result["page_faults_per_step"],
        **summary,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)

    print(f"{args.family} {args.shape}, batch {w.batch}, allocator {record['allocator']}: "
          f"{record['step_ms_median']:.0f} ms/step untraced, {record['step_gflop']:.1f} GFLOP, "
          f"{record['page_faults_per_step']:.0f} page faults/step")
    print(f"traced wall {summary['wall_ms_per_step']:.0f} ms/step; ops running at once (ms): "
          + ", ".join(f"{k}: {v:.0f}" for k, v in summary["ops_running_ms_per_step"].items()))
    print(f"{'phase / kind':<20} {'ms/step':>8} {'ops':>6} {'GFLOP':>7} {'GFLOP/s':>8}")
    for name, g in summary["by_phase_and_kind"].items():
        rate = f"{g['gflop_per_s']:.0f}" if g["gflop_per_s"] else "-"
        print(f"{name:<20} {g['ms']:>8.1f} {g['ops']:>6} {g['gflop']:>7.1f} {rate:>8}")
    print("heaviest ops:")
    for h in summary["heaviest_ops"]:
        rate = f"{h['gflop_per_s']:.0f} GFLOP/s" if h["gflop_per_s"] else ""
        print(f"  {h['ms']:6.2f} ms  {h['name']:<28} {rate:>13}  {h['op'][-90:]}")
    print("matmul shapes alone vs in the step (GFLOP/s):")
    for m in summary["isolated_matmuls"]:
        print(f"  lhs {m['lhs']} contract {m['contract']} -> {m['out']}: alone {m['alone_gflop_per_s']:.0f}, "
              f"in step {m['in_step_gflop_per_s']:.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
