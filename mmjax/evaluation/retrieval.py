"""Image-text retrieval recall@K, as the benchmarks define it, and with identical captions counting as the same.

Benchmarks (COCO, Flickr30k: 5 captions per image, each caption belongs to one image): an image is found at k when
any of its captions is among its k most similar texts (i2t); a caption when its image is among its k most similar
images (t2i). `recall(similarity, image_of_text, ks)`. Rankings are by similarity, ties going to the lower index
(a stable sort), and are computed on device in chunks (`top_k`), so 5,000 x 25,000 needs chunk x 25,000 floats.

On caption data with many repeated sentences (the embedded dataset), an image's own caption is not the only right
answer: any caption identical to one of the image's is equally right. Pass `text_keys` (equal keys = identical
captions; `caption_keys`) and a text counts as relevant to every image that has a caption with its key.

R@k with k >= the number of candidates is 1.0 whatever the model does (every candidate is among the k best), so
it is not reported: a split of 3 images gives R@1 only (the first time, a warning names the sizes). `recall_chance`
gives the R@1 a random ranking reaches, to judge what is left.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

_warned: set = set()  # the (direction, candidates, dropped ks) already warned about: a run evaluates many times


def meaningful_ks(ks: Sequence[int], candidates: int, what: str) -> tuple[int, ...]:
    """The k of `ks` below `candidates` (R@k for larger k is always 1.0); warns once about those it drops."""
    kept = tuple(k for k in ks if k < candidates)
    dropped = tuple(k for k in ks if k >= candidates)
    if dropped and (what, candidates, dropped) not in _warned:
        _warned.add((what, candidates, dropped))
        logging.warning("%s: only %d candidate(s), so %s would always be 1.0; not reported (evaluate on a larger "
                        "split, e.g. build with --eval_count=N)", what, candidates,
                        ", ".join(f"R@{k}" for k in dropped))
    return kept


def caption_keys(text_ids: np.ndarray) -> np.ndarray:
    """Integer key per caption such that equal token sequences (identical captions) get equal keys."""
    _, keys = np.unique(np.asarray(text_ids), axis=0, return_inverse=True)
    return keys.reshape(-1)


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


def top_k(queries: np.ndarray, targets: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Indices [Q, k'] (k' = min(k, T)) of each query's most similar targets by dot product, best first, ties to
    the lower index; computed on device `chunk` queries at a time (memory chunk x T)."""
    queries, targets = np.asarray(queries, np.float32), np.asarray(targets, np.float32)
    k = min(k, len(targets))
    table = jnp.asarray(targets)
    fn = jax.jit(lambda q: jax.lax.top_k(q @ table.T, k)[1])
    out = []
    for start in range(0, len(queries), chunk):
        block = queries[start:start + chunk]
        padded = np.pad(block, ((0, chunk - len(block)), (0, 0)))  # one shape: one compilation
        out.append(np.asarray(fn(padded))[:len(block)])
    return np.concatenate(out) if out else np.zeros((0, k), np.int32)


def _owners(image_of_text: np.ndarray, text_keys: np.ndarray | None, num_images: int):
    """fn(images [..], texts [..]) -> whether each text is relevant to each image (same shape)."""
    image_of_text = np.asarray(image_of_text)
    if text_keys is None:
        return lambda images, texts: image_of_text[texts] == images
    text_keys = np.asarray(text_keys)
    owns = np.zeros((num_images, int(text_keys.max()) + 1), bool)  # image i has a caption with key k
    owns[image_of_text, text_keys] = True
    return lambda images, texts: owns[images, text_keys[texts]]


def recall_from_rankings(i2t: np.ndarray, t2i: np.ndarray, image_of_text: np.ndarray, ks: Sequence[int],
                         text_keys: np.ndarray | None = None) -> dict[str, float]:
    """R@k both ways from each image's ranked texts i2t [I, >= max k] and each text's ranked images t2i [T, ...];
    i2t R@k only for k < T and t2i R@k only for k < I (larger k always give 1.0)."""
    relevant = _owners(image_of_text, text_keys, len(i2t))
    images = np.arange(len(i2t))[:, None]
    hits_i2t = relevant(np.broadcast_to(images, i2t.shape), i2t)
    hits_t2i = relevant(t2i, np.broadcast_to(np.arange(len(t2i))[:, None], t2i.shape))
    i2t_ks = meaningful_ks(ks, len(t2i), "image->text retrieval")
    t2i_ks = meaningful_ks(ks, len(i2t), "text->image retrieval")
    out = {f"i2t_r@{k}": float(hits_i2t[:, :k].any(axis=1).mean()) for k in i2t_ks}
    out.update({f"t2i_r@{k}": float(hits_t2i[:, :k].any(axis=1).mean()) for k in t2i_ks})
    return out


def recall_chance(image_of_text: np.ndarray, num_images: int, text_keys: np.ndarray | None = None
                  ) -> dict[str, float]:
    """{"i2t_r@1_chance", "t2i_r@1_chance"}: the R@1 of a random ranking (relevance as in `recall`). Both equal
    the fraction of (image, text) pairs that are relevant; both are given, as pair retrieval gives both."""
    image_of_text = np.asarray(image_of_text, np.int64)
    if text_keys is None:  # each text is relevant to its own image only
        chance = 1.0 / num_images
    else:
        text_keys = np.asarray(text_keys, np.int64)
        num_keys = int(text_keys.max()) + 1
        # Images relevant to each text: those with a caption of its key, counted from the distinct (image, key)
        # pairs rather than a dense [images, keys] matrix (COCO: 5,000 x 25,000).
        pair_keys = np.unique(image_of_text * num_keys + text_keys) % num_keys
        chance = float(np.bincount(pair_keys, minlength=num_keys)[text_keys].mean()) / num_images
    return {"i2t_r@1_chance": chance, "t2i_r@1_chance": chance}


def recall(similarity: np.ndarray, image_of_text: np.ndarray, ks: Sequence[int] = (1, 5, 10),
           text_keys: np.ndarray | None = None) -> dict[str, float]:
    """{"i2t_r@k", "t2i_r@k"} of a similarity matrix [num_images, num_texts], text t belonging to image
    image_of_text[t] (and, with text_keys, to every image with a caption of its key); ties to the lower index."""
    similarity = np.asarray(similarity)
    image_of_text = np.asarray(image_of_text)
    if image_of_text.shape != (similarity.shape[1],):
        raise ValueError(f"image_of_text has shape {image_of_text.shape}; the similarity has "
                         f"{similarity.shape[1]} texts")
    k = max(ks)
    i2t = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    t2i = np.argsort(-similarity.T, axis=1, kind="stable")[:, :k]
    return recall_from_rankings(i2t, t2i, image_of_text, ks, text_keys)


def recall_by_relevance(a2b: np.ndarray, b2a: np.ndarray, relevant: np.ndarray, ks: Sequence[int],
                        names: tuple[str, str] = ("a", "b")) -> dict[str, float]:
    """R@k both ways between two sets of items of any modalities, from rankings a2b [A, >= max k] and b2a
    [B, ...] and relevant [A, B] (bool: item b is a right answer for item a, and so a for b): "{a}_to_{b}_r@k" is
    the fraction of a items with a relevant b among their k best (for k < B: larger k always give 1.0), and the
    chance level of R@1 each way."""
    relevant = np.asarray(relevant, bool)
    a, b = names
    hits_a2b = relevant[np.arange(len(a2b))[:, None], a2b]
    hits_b2a = relevant.T[np.arange(len(b2a))[:, None], b2a]
    a2b_ks = meaningful_ks(ks, relevant.shape[1], f"{a}->{b} retrieval")
    b2a_ks = meaningful_ks(ks, relevant.shape[0], f"{b}->{a} retrieval")
    out = {f"{a}_to_{b}_r@{k}": float(hits_a2b[:, :k].any(axis=1).mean()) for k in a2b_ks}
    out.update({f"{b}_to_{a}_r@{k}": float(hits_b2a[:, :k].any(axis=1).mean()) for k in b2a_ks})
    out[f"{a}_to_{b}_r@1_chance"] = float(relevant.mean(axis=1).mean())
    out[f"{b}_to_{a}_r@1_chance"] = float(relevant.mean(axis=0).mean())
    return out
