"""XLA:CPU's optional code paths on our train step: examples/s and the loss under each XLA_FLAGS setting.

Run on an IDLE machine, from the repo root (about 1 minute per setting and family):

    /work/venv/bin/python experiments/bench_xla_flags.py --families=clip,vilt --rounds=2

jaxlib 0.10 routes dots (and optionally elementwise ops and reductions) to one of several libraries: YNNPACK (its
default for dots here: the compiled step's matmuls are `ynn_fusion`s), XNNPACK, oneDNN, or XLA's own Eigen
kernels, selected by `--xla_cpu_experimental_{ynn,xnn,onednn}_fusion_type` and friends. Each setting in SETTINGS runs
experiments/bench_step.py (mmjax only, the small shape) in a fresh process with XLA_FLAGS set (flags are read once,
at start-up), --rounds times in alternation so that slow drifts of the machine hit every setting alike; the table
gives the median examples/s, the ratio to the default measured in the same sweep, and the loss after the same
steps on the same batches (numerics: a different kernel sums in another order, a changed loss beyond ~1e-5 relative
means different maths). Writes results/bench_xla_flags.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "bench_xla_flags.json")

SETTINGS = {
    "default": "",
    "no YNNPACK (Eigen dots)": "--xla_cpu_experimental_ynn_fusion_type=",
    "XNNPACK dots": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot",
    "XNNPACK dot+eltwise+reduce": ("--xla_cpu_experimental_ynn_fusion_type= "
                                   "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
    "XNNPACK graph fusion (greedy)": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "oneDNN dots (fusion)": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_fusion_type=dot",
    "oneDNN (use_onednn)": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true",
    "YNNPACK dot+eltwise": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise",
    "concurrency scheduler off": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "512-bit vectors": "--xla_cpu_prefer_vector_width=512",
    "fast math": "--xla_cpu_enable_fast_math=true",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default="clip,vilt", help="bench_step.py families (small shape)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated keys of SETTINGS")
    p.add_argument("--rounds", type=int, default=2, help="runs per setting, alternating over settings")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    return p.parse_args(argv)


def run_once(flags: str, family: str, steps: int, warmup: int) -> dict:
    """bench_step.py for one family (small, mmjax only) under XLA_FLAGS=flags: its ours record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        env = dict(os.environ, XLA_FLAGS=flags)
        cmd = [sys.executable, os.path.join(HERE, "bench_step.py"), f"--families={family}", "--shapes=small",
               "--skip_torch", f"--steps={steps}", f"--warmup={warmup}", "--matmul_n=256", f"--out={out}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return {"error": tail[:300]}
        with open(out) as f:
            row = json.load(f)["results"][family]["small"]
    return {"examples_per_s": row["ours_examples_per_s"], "loss": row["ours"]["loss_last"],
            "step_flops": row["ours"]["step_flops"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = [n for n in args.settings.split(",") if n]
    families = [f for f in args.families.split(",") if f]
    runs: dict = {f: {n: [] for n in names} for f in families}
    for r in range(args.rounds):
        for family in families:
            for name in names:
                res = run_once(SETTINGS[name], family, args.steps, args.warmup)
                runs[family][name].append(res)
                shown = f"{res['examples_per_s']:.1f} ex/s, loss {res['loss']:.6f}" if "error" not in res else \
                    f"error: {res['error']}"
                print(f"round {r + 1} {family} {name}: {shown}", flush=True)

    table = {}
    for family in families:
        ok = [x for x in runs[family]["default"] if "error" not in x] if "default" in runs[family] else []
        base = statistics.median(x["examples_per_s"] for x in ok) if ok else None
        base_loss = ok[0]["loss"] if ok else None
        for name in names:
            good = [x for x in runs[family][name] if "error" not in x]
            row = {"flags": SETTINGS[name], "runs": runs[family][name]}
            if good:
                eps = statistics.median(x["examples_per_s"] for x in good)
                row.update(examples_per_s=eps, vs_default=eps / base if base else None, loss=good[0]["loss"],
                           loss_rel_diff=abs(good[0]["loss"] - base_loss) / abs(base_loss) if base_loss else None)
            table.setdefault(family, {})[name] = row

    lines = ["| family | setting | XLA_FLAGS | ex/s (median) | vs default | loss | loss rel. diff |",
             "|---|---|---|---|---|---|---|"]
    for family, rows in table.items():
        for name, row in rows.items():
            if "examples_per_s" not in row:
                lines.append(f"| {family} | {name} | `{row['flags']}` | error | | | |")
                continue
            lines.append(f"| {family} | {name} | `{row['flags'] or '(none)'}` | {row['examples_per_s']:.1f} | "
                         f"{row['vs_default']:.2f}x | {row['loss']:.6f} | {row['loss_rel_diff']:.1e} |")
    markdown = "\n".join(lines)
    record = {"benchmark": "bench_xla_flags",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([sys.executable] + sys.argv), "args": vars(args), "results": table,
              "markdown": markdown}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print()
    print(markdown)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
