"""Visual question answering: an answer classifier on a fusion model's pooled output, trained with binary
cross-entropy against the answers' soft scores (ViLT's / UNITER's recipe).

The model needs its answer head (`vqa_labels` = the size of the data's answer vocabulary; configs leave it None and
the run resolves it from the data) and the batches their soft scores (`data.answers`: `answers` [B, V], min(#
annotators / 3, 1) per in-vocabulary answer). Evaluation is declared in the config (the `vqa` evaluator: the
official VQA accuracy, mmjax/evaluation/vqa.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mmjax import losses, objectives


class VQATask:
    """Binary cross-entropy on the soft answer scores, summed over answers (ViLT: BCE-with-logits mean x V)."""

    def __init__(self, model: nn.Module, config: Any, meta: Any, tokenizer: Any, mesh: Mesh):
        del tokenizer, mesh
        self.model = model
        self.model_keys = tuple(meta.model_keys)
        if not meta.answer_vocab:
            raise ValueError("the vqa task needs VQA data: a source of kind 'vqa' (its answer vocabulary) and "
                             "data.answers=True")
        if not config.data.get("answers"):
            raise ValueError("the vqa task trains on the answers' soft scores: set data.answers=True")
        labels = getattr(model, "vqa_labels", None)
        if labels != len(meta.answer_vocab):
            raise ValueError(f"model.vqa_labels={labels} but the data has {len(meta.answer_vocab)} answers (leave "
                             f"it None: the run sets it from the data)")

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """BCE against `answers`; metrics: the soft score of the top answer (the training-time VQA score)."""
        rows = objectives.model_inputs(batch, self.model_keys, (batch["text_ids"], batch["text_mask"]))
        out = self.model.apply({"params": params}, rows, train=True, rngs={"dropout": rng})
        logits = out["vqa_logits"]
        loss = losses.vqa_bce_loss(logits, batch["answers"])
        top = jnp.argmax(logits, axis=-1)
        score = jnp.take_along_axis(batch["answers"], top[:, None], axis=1)[:, 0]
        return loss, {"vqa_score": jnp.mean(score)}
