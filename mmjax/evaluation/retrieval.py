"""Image-text retrieval recall@K where identical captions count as the same caption.

On caption data with many repeated sentences, an image's own caption is not the only correct answer: any caption
string identical to it is equally right. Correctness is therefore judged by a caption key (equal keys = identical
captions), not by index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def caption_keys(text_ids: np.ndarray) -> np.ndarray:
    """Integer key per caption such that equal token sequences (identical captions) get equal keys."""
    _, keys = np.unique(np.asarray(text_ids), axis=0, return_inverse=True)
    return keys.reshape(-1)


def _recall_at(similarity: np.ndarray, query_keys: np.ndarray, target_keys: np.ndarray,
               ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose top-k targets contain one with the query's key."""
    k_max = min(max(ks), similarity.shape[1])
    # argpartition then sort only the top k_max: O(N) per row instead of a full sort.
    top = np.argpartition(-similarity, k_max - 1, axis=1)[:, :k_max]
    order = np.take_along_axis(similarity, top, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, axis=1)
    hits = target_keys[top] == query_keys[:, None]
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def retrieval_recall(image_embeds: np.ndarray, text_embeds: np.ndarray, keys: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K for image->text and text->image; pair i is (image i, caption i) and `keys` groups identical captions."""
    image_embeds = np.asarray(image_embeds, np.float32)
    text_embeds = np.asarray(text_embeds, np.float32)
    keys = np.asarray(keys)
    if not (len(image_embeds) == len(text_embeds) == len(keys)):
        raise ValueError("image_embeds, text_embeds and keys must have the same length")
    sim = image_embeds @ text_embeds.T
    i2t = _recall_at(sim, keys, keys, ks)
    t2i = _recall_at(sim.T, keys, keys, ks)
    out = {f"i2t_r@{k}": v for k, v in i2t.items()}
    out.update({f"t2i_r@{k}": v for k, v in t2i.items()})
    return out


def chance_recall(keys: np.ndarray, k: int = 1) -> float:
    """Expected i2t R@k of a random ranking (for judging how far above chance a result is)."""
    keys = np.asarray(keys)
    n = len(keys)
    counts = np.bincount(keys)[keys]
    # P(at least one of k random draws without replacement hits one of `counts` correct items out of n).
    miss = np.ones(n)
    for j in range(k):
        miss *= np.clip((n - counts - j) / (n - j), 0.0, 1.0)
    return float((1.0 - miss).mean())
