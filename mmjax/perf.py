"""What a compiled step costs: FLOPs and per-device memory from XLA's analyses, and utilisation of the chip's peak.

MFU here is XLA's FLOP count of the compiled step (so rematerialised recomputation counts too: strictly, hardware
FLOPs utilisation) over the step time and the device's peak dense bf16 FLOP/s: from `train.peak_tflops` when set,
else from PEAK_TFLOPS by device kind, else not reported (CPUs have no fixed peak; the benchmarks measure theirs).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

# Peak dense bf16 TFLOP/s per device (per chip on TPU, per GPU), from the vendors' data sheets.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,  # Trillium (v6e)
    "TPU v6e": 918.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100": 312.0,
}

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "alias_size_in_bytes")


def step_flops(compiled: Any) -> float | None:
    """FLOPs of one compiled step on one device, from XLA's cost analysis (None where the backend does not say)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:  # cost analysis is best-effort metadata; never fail a run over it
        return None


def memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled program (arguments, outputs, temporaries, code, donated aliases), and
    `peak_estimate_in_bytes` = arguments + outputs + temporaries - aliases; {} where the backend does not say."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # best-effort metadata, as above
        return {}
    if analysis is None:
        return {}
    out = {f: int(getattr(analysis, f)) for f in MEMORY_FIELDS if hasattr(analysis, f)}
    if {"argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"} <= out.keys():
        out["peak_estimate_in_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                         + out["temp_size_in_bytes"] - out.get("alias_size_in_bytes", 0))
    return out


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; GiB at most."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def memory_line(mem: dict[str, int]) -> str:
    """'per-device memory: arguments 1.2 GiB, outputs ..., temporaries ..., peak ~...' (empty when unknown)."""
    if not mem:
        return ""
    parts = [f"arguments {human_bytes(mem['argument_size_in_bytes'])}",
             f"outputs {human_bytes(mem['output_size_in_bytes'])}",
             f"temporaries {human_bytes(mem['temp_size_in_bytes'])}"]
    if "alias_size_in_bytes" in mem:
        parts.append(f"donated {human_bytes(mem['alias_size_in_bytes'])}")
    if "peak_estimate_in_bytes" in mem:
        parts.append(f"peak ~{human_bytes(mem['peak_estimate_in_bytes'])}")
    return "per-device memory of the train step: " + ", ".join(parts)


def peak_flops(device: jax.Device | None = None, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override (TFLOP/s), else the known peak of its kind, else None."""
    if override_tflops:
        return float(override_tflops) * 1e12
    kind = (device or jax.devices()[0]).device_kind
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):  # most specific name first
        if kind.startswith(name):
            return PEAK_TFLOPS[name] * 1e12
    return None


def bytes_per_device(shapes: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of arrays (or ShapeDtypeStructs) laid out by `shardings` (the largest
    shard where shards differ)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        total += math.prod(sharding.shard_shape(tuple(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
    return int(total)
