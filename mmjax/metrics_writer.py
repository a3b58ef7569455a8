"""Run metrics: one JSON object per line in WORKDIR/metrics.jsonl and TensorBoard events in WORKDIR/tensorboard.

Each record is {"step": int, "kind": "train" | "eval", ...scalars}. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax


class MetricWriter:
    """Writes scalar metrics to metrics.jsonl and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.active = jax.process_index() == 0
        self._tb = None
        if self.active:
            import tensorflow as tf  # TensorBoard's event writer; TF is already a dependency of the data pipeline.
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops records past `step`: after a resume they would otherwise appear twice."""
        if not (self.active and os.path.exists(self.path)):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
        """Appends one record and the matching TensorBoard scalars (`kind/name`)."""
        if not self.active:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), "kind": kind}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        import tensorflow as tf
        with self._tb.as_default(step=int(step)):
            for name, value in scalars.items():
                tf.summary.scalar(f"{kind}/{name}", value)
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()
