"""Tasks: what a pretraining / fine-tuning objective does with a batch (masks, negatives, losses). The trainer is
the same for every task; it asks the task for `loss`. Evaluation is declared in the config (mmjax.evaluation)."""

from __future__ import annotations

from typing import Any

from mmjax.tasks.captioning import CaptioningTask
from mmjax.tasks.contrastive import ContrastiveTask
from mmjax.tasks.matching import MatchingTask
from mmjax.tasks.vqa import VQATask

TASKS = {"contrastive": ContrastiveTask, "matching": MatchingTask, "vqa": VQATask, "captioning": CaptioningTask}


def get_task(task_config: Any, **kwargs: Any):
    """Builds the task `task_config.name` (config.task) with the model, config, meta, tokenizer and mesh."""
    name = task_config.get("name") if hasattr(task_config, "get") else task_config
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
