"""Tasks: what a pretraining / fine-tuning objective does with a batch (losses, masks, negatives) and how it is
evaluated. The trainer is the same for every task; it asks the task for `loss` and `evaluate`."""

from __future__ import annotations

from typing import Any

from mmjax.tasks.contrastive import ContrastiveTask
from mmjax.tasks.matching import MatchingTask

TASKS = {"contrastive": ContrastiveTask, "matching": MatchingTask}


def get_task(name: str, **kwargs: Any):
    """Builds the task registered under `name`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
