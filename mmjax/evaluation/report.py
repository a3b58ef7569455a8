"""The evaluation report `python -m mmjax.evaluate` writes beside eval.json: a short markdown page with the metrics
table, the run's training curves (from metrics.jsonl, as PNG) and a page of sample predictions per evaluator that
keeps some (the VQA evaluator: image, question, predicted and human answers; the captioning evaluator: image, decoded
caption, its references and its CIDEr-D).

    write(out_dir, metrics, workdir=RUN, samples={"vqa": [Sample, ...]}, mean=(0.5,) * 3, std=(0.5,) * 3)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import textwrap
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class Sample:
    """One prediction to show: the (normalised) image, the text it was asked about, the prediction, the truth."""

    image: np.ndarray   # [H, W, 3], normalised as the model saw it
    text: str
    predicted: str
    truth: str
    correct: float      # the prediction's score (e.g. its VQA accuracy)


# Metric names (after the evaluator's "name/") that count things: printed as integers, listed after the scores.
COUNT_NAMES = ("unanswerable", "step", "steps", "epoch", "examples", "count")
_NUMBER = re.compile(r"(\d+)")


def is_count(name: str) -> bool:
    """Whether metric `name` ("evaluator/metric" or "metric") counts things (num_images, unanswerable, ...)."""
    base = name.rpartition("/")[2]
    return base.startswith("num_") or base.endswith("_count") or base in COUNT_NAMES


def _natural(text: str) -> tuple:
    """Sort key with the numbers in a name compared as numbers: r@1 < r@1_chance < r@5 < r@10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower())
                 for part in _NUMBER.split(text) if part)


def ordered(metrics: dict[str, float]) -> list[tuple[str, float]]:
    """(name, value) grouped by evaluator in the order the dict has them (config order, for the trainer's and
    mmjax.evaluate's metrics), each group's scores in natural order (R@1, R@5, R@10), then its counts."""
    groups: dict[str, list[str]] = {}
    for key in metrics:
        groups.setdefault(key.rpartition("/")[0], []).append(key)
    out = []
    for keys in groups.values():
        keys.sort(key=lambda k: (is_count(k), _natural(k.rpartition("/")[2]), k))
        out += [(k, metrics[k]) for k in keys]
    return out


def format_value(name: str, value: float) -> str:
    """A metric as printed: counts as integers ("1000"), other values with 4 decimals ("0.8125"; 4 significant
    digits below 0.001, where 4 decimals would show 0.0000; 1 decimal from 10,000 up)."""
    value = float(value)
    if is_count(name) and value.is_integer():
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.4g}"
    return f"{value:.1f}" if abs(value) >= 1e4 else f"{value:.4f}"


def metrics_table(metrics: dict[str, float]) -> str:
    """A markdown table of the metrics, grouped by evaluator ("name/metric"), in `ordered` order."""
    lines = ["| evaluator | metric | value |", "|---|---|---:|"]
    for key, value in ordered(metrics):
        name, _, metric = key.rpartition("/")
        lines.append(f"| {name or '-'} | {metric} | {format_value(key, value)} |")
    return "\n".join(lines)


def plot_curves(metrics_jsonl: str, path: str) -> bool:
    """Training loss and every eval metric against the step, as one PNG; False when there is nothing to plot."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    with open(metrics_jsonl) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train:
        return False
    names = sorted({k for r in evals for k in r if "/" in k and not is_count(k)})
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="training loss", xlabel="step")
    for name in names:
        points = [(r["step"], r[name]) for r in evals if name in r]
        axes[1].plot(*zip(*points), marker="o", label=name)
    axes[1].set(title="evaluation", xlabel="step")
    if names:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_samples(samples: Sequence[Sample], path: str, mean: Sequence[float], std: Sequence[float]) -> None:
    """A grid of sample images with their text, prediction and truth, as one PNG."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    cols = 4
    rows = -(-len(samples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        pixels = np.clip(np.asarray(s.image) * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
        ax.imshow(pixels)
        # Captions and their references run long: wrapped, so neighbouring titles do not overlap.
        title = "\n".join(textwrap.fill(line, 48) for line in (s.text, f"predicted: {s.predicted}",
                                                                f"true: {s.truth}") if line)
        ax.set_title(title, fontsize=7,
                     color="green" if s.correct >= 0.999 else ("orange" if s.correct > 0 else "red"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out_dir: str, metrics: dict[str, float], *, workdir: str | None, step: int | None,
          samples: dict[str, Sequence[Sample]], mean: Sequence[float], std: Sequence[float]) -> str:
    """Writes eval_report.md (+ its PNGs) into out_dir; returns the markdown file's path."""
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# Evaluation{f' at step {step}' if step is not None else ''}", "",
             f"Run: `{workdir}`" if workdir else "Weights: config.init_from", "", metrics_table(metrics), ""]
    curves = workdir and os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    if curves and plot_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(out_dir, "eval_curves.png")):
        lines += ["## Training", "", "![training curves](eval_curves.png)", ""]
    for name, group in samples.items():
        if not group:
            continue
        png = f"eval_samples_{name}.png"
        plot_samples(group, os.path.join(out_dir, png), mean, std)
        lines += [f"## Sample predictions: {name}", "", f"![{name} samples]({png})", "",
                  "| text | predicted | true | score |", "|---|---|---|---|"]
        lines += [f"| {s.text} | {s.predicted} | {s.truth} | {s.correct:.2f} |" for s in group]
        lines.append("")
    path = os.path.join(out_dir, "eval_report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
