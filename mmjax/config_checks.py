"""Checks of a run's config before anything is built or written: the types and ranges of the numeric fields the
trainer, optimizer, checkpoints, data and evaluators use. Every problem is reported at once, in one line, naming
the field, its value and what is accepted.

    config_checks.check(config)        # raises ValueError("config: train.batch_size=0 (must be an integer >= 1); ...")
"""
from __future__ import annotations

import math
from typing import Any, Callable

# (dotted field, accepted, description). A field the config does not have is skipped (configs differ in sections).
Rule = tuple[str, Callable[[Any], bool], str]


def _int(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo), f"an integer >= {lo}"


def _number(lo: float, *, strict: bool = False) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > lo if strict else v >= lo))
    return ok, f"a finite number {'>' if strict else '>='} {lo:g}"


RULES: list[Rule] = [
    ("seed", *_int(0)),
    ("train.batch_size", *_int(1)),
    ("train.steps", *_int(1)),
    ("train.log_every", *_int(1)),
    ("train.accum_steps", *_int(1)),
    ("optimizer.lr", *_number(0.0)),  # 0 is allowed: a run that only evaluates, or checks what init_from loaded
    ("optimizer.warmup_steps", *_int(0)),
    ("optimizer.end_lr_factor", *_number(0.0)),
    ("optimizer.weight_decay", *_number(0.0)),
    ("optimizer.grad_clip", *_number(0.0)),
    ("optimizer.b1", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
    ("optimizer.b2", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
    ("optimizer.eps", *_number(0.0)),
    ("checkpoint.every_steps", *_int(1)),
    ("checkpoint.keep", *_int(1)),
    ("data.image_size", *_int(1)),
    ("data.max_len", *_int(2)),
]
EVAL_RULES: list[Rule] = [("every_steps", *_int(1)), ("batch_size", *_int(1))]


def _get(config: Any, dotted: str) -> tuple[bool, Any]:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return False, None
        node = node[part]
    return True, node


def problems(config: Any) -> list[str]:
    """Every field outside its accepted values, as "field=value (must be ...)"."""
    found = []
    for field, ok, accepted in RULES:
        present, value = _get(config, field)
        if present and not ok(value):
            found.append(f"{field}={value!r} (must be {accepted})")
    for name in (config.get("evals") or {}):
        for field, ok, accepted in EVAL_RULES:
            present, value = _get(config.evals[name], field)
            if present and not ok(value):
                found.append(f"evals.{name}.{field}={value!r} (must be {accepted})")
    return found


def check(config: Any) -> None:
    """Raises one ValueError listing every problem of `config` (nothing when it is fine)."""
    found = problems(config)
    if found:
        raise ValueError("config: " + "; ".join(found))
