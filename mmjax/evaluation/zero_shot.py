"""Zero-shot classification: classify images by their nearest class-prompt text embedding."""

from __future__ import annotations

import numpy as np


def class_embeddings(prompt_embeds: np.ndarray) -> np.ndarray:
    """Averages the unit embeddings of each class's prompt templates [C, T, E] and renormalises to [C, E]."""
    mean = np.asarray(prompt_embeds, np.float32).mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True).clip(1e-12)


def zero_shot_accuracy(image_embeds: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of argmax_c <image, class_c> against integer labels."""
    logits = np.asarray(image_embeds, np.float32) @ np.asarray(class_embeds, np.float32).T
    return float((logits.argmax(axis=1) == np.asarray(labels)).mean())


def top_k_accuracy(image_embeds: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of images whose label is among their k nearest classes (ties to the lower class index)."""
    logits = np.asarray(image_embeds, np.float32) @ np.asarray(class_embeds, np.float32).T
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(axis=1).mean())
