"""Autoregressive decoding on a key/value cache: greedy, beam search and temperature / top-k / nucleus sampling.

The algorithms are model-agnostic. They drive a step function over a cache pytree:

    step_fn(tokens int [N, 1], cache) -> (logits float [N, V], cache)

whose cache leaves carry the N rows on their leading axis (scalars, like flax's cache_index, are shared). Each
returns token ids [B, max_len] that start with `bos_id`, hold `pad_id` after the first `eos_id` (the EOS itself is
kept) and scores [B] (the sum of log-probabilities, or for beam search the length-penalised one). Loops are
`jax.lax.while_loop`s that stop as soon as every row is done, so the whole decode jits into one program.

`generate(model, params, images, ...)` is the model side: a captioner's `image_memory` once, its cache created,
then `decode_text` one token at a time (mmjax/models/captioner.py, coca.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
StepFn = Callable[[Array, Any], tuple[Array, Any]]
NEG_INF = -1.0e7  # finite, so that sums of it stay ordered (a -inf - -inf would be NaN)

METHODS = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode: method (greedy | beam | sample), max_len (tokens, BOS included), beam_size and
    length_penalty (beam), temperature, top_k and top_p (sample)."""

    method: str = "greedy"
    max_len: int = 24
    beam_size: int = 4
    length_penalty: float = 0.0  # GNMT's alpha: score = log p / ((5 + length) / 6) ** alpha
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"decode method must be one of {METHODS}; got {self.method!r}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 (BOS and one token); got {self.max_len}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1; got {self.beam_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (greedy is method='greedy'); got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0; got {self.top_k}")


def _start(batch: int, max_len: int, bos_id: int, pad_id: int) -> Array:
    """int32 [batch, max_len]: BOS then padding."""
    return jnp.full((batch, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)


def _decode_loop(step_fn: StepFn, cache: Any, batch: int, max_len: int, bos_id: int, eos_id: int, pad_id: int,
                 pick: Callable[[Array, Array], Array]) -> tuple[Array, Array]:
    """One token per row per step, chosen by pick(log_probs [B, V], step) -> [B], until every row has ended."""
    def cond(state):
        t, _, done, _, _ = state
        return (t < max_len - 1) & ~jnp.all(done)

    def body(state):
        t, tokens, done, scores, cache = state
        logits, cache = step_fn(jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1), cache)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        chosen = pick(log_probs, t)
        scores = scores + jnp.where(done, 0.0, jnp.take_along_axis(log_probs, chosen[:, None], axis=1)[:, 0])
        chosen = jnp.where(done, pad_id, chosen)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None].astype(jnp.int32), t + 1, axis=1)
        return t + 1, tokens, done | (chosen == eos_id), scores, cache

    state = (jnp.zeros((), jnp.int32), _start(batch, max_len, bos_id, pad_id), jnp.zeros((batch,), bool),
             jnp.zeros((batch,), jnp.float32), cache)
    _, tokens, _, scores, _ = jax.lax.while_loop(cond, body, state)
    return tokens, scores


def greedy(step_fn: StepFn, cache: Any, *, batch: int, max_len: int, bos_id: int, eos_id: int,
           pad_id: int = 0) -> tuple[Array, Array]:
    """The most likely token at every step: (tokens [B, max_len], sum of log-probabilities [B])."""
    return _decode_loop(step_fn, cache, batch, max_len, bos_id, eos_id, pad_id,
                        lambda log_probs, t: jnp.argmax(log_probs, axis=-1))


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Logits [B, V] with everything outside the top_k tokens and outside the nucleus (the smallest set of most
    likely tokens whose probability reaches top_p) set to NEG_INF; the most likely token always stays."""
    logits = logits.astype(jnp.float32)
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        # A token stays if the tokens more likely than it hold less than top_p: the first to cross it is kept.
        keep = (cumulative - jax.nn.softmax(ordered, axis=-1)) < top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return logits


def sample(step_fn: StepFn, cache: Any, rng: Array, *, batch: int, max_len: int, bos_id: int, eos_id: int,
           pad_id: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> tuple[Array, Array]:
    """Ancestral sampling from softmax(logits / temperature), cut to top_k and the top_p nucleus:
    (tokens [B, max_len], sum of the model's log-probabilities of the drawn tokens [B])."""
    def pick(log_probs: Array, t: Array) -> Array:
        logits = filter_logits(log_probs / temperature, top_k, top_p)
        return jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1)

    return _decode_loop(step_fn, cache, batch, max_len, bos_id, eos_id, pad_id, pick)


def length_penalty(length: Array, alpha: float) -> Array:
    """GNMT's ((5 + length) / 6) ** alpha (1 for alpha = 0): beam scores are log p divided by it."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def gather_beams(tree: Any, rows: Array, shared: Callable[[Any], bool] | None = None) -> Any:
    """Every leaf with a leading row axis reordered to `rows` (int [N]); scalars (cache indices) and the leaves
    whose key path `shared(path)` marks as equal across an example's beams (e.g. the memory's cached keys) are
    left as they are."""
    def gather(path, x):
        if x.ndim == 0 or (shared is not None and shared(path)):
            return x
        return jnp.take(x, rows, axis=0)

    return jax.tree_util.tree_map_with_path(gather, tree)


def is_memory_cache(path: Any) -> bool:
    """Whether a cache leaf holds the memory's keys or values (layers.MultiHeadAttention's cross_key /
    cross_value): the same for every beam of an example, so beam search need not reorder it."""
    return any(getattr(k, "key", None) in ("cross_key", "cross_value") for k in path)


def beam_search(step_fn: StepFn, cache: Any, *, batch: int, beam_size: int, max_len: int, bos_id: int,
                eos_id: int, pad_id: int = 0, alpha: float = 0.0,
                shared: Callable[[Any], bool] | None = None) -> tuple[Array, Array]:
    """Beam search over B x K rows (the cache's rows are example-major: row b * K + k is beam k of example b).

    Each step ranks the 2K best extensions of the K live beams. A candidate ending in EOS is finished only if it
    ranks among the K best (so beam_size 1 is greedy decoding), scored log p / length_penalty(length), length
    counting the tokens after BOS with the EOS. The other candidates refill the K live beams, and the cache rows
    follow their beams. An example is done when no live beam can still beat its K-th finished one (log p only
    falls, and the penalty grows at most to that of max_len). Beams that reach max_len unfinished compete with
    the finished ones. Returns the best sequence of each example, int [B, max_len], and its score [B]. Cache
    leaves that `shared(key_path)` marks as equal across an example's beams are not reordered (`gather_beams`).
    """
    k, steps = beam_size, max_len - 1
    rows = jnp.arange(batch)[:, None] * k  # first row of each example

    def cond(state):
        t, _, live_logp, _, finished_scores, _ = state
        best_possible = live_logp[:, 0] / length_penalty(jnp.asarray(steps), alpha)
        done = jnp.all(finished_scores[:, -1] >= best_possible)  # finished_scores sorted, K-th last
        return (t < steps) & ~done

    def body(state):
        t, live, live_logp, finished, finished_scores, cache = state
        logits, cache = step_fn(jax.lax.dynamic_slice_in_dim(live.reshape(batch * k, max_len), t, 1, axis=1),
                                cache)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        vocab = log_probs.shape[-1]
        candidates = (live_logp[:, :, None] + log_probs.reshape(batch, k, vocab)).reshape(batch, k * vocab)
        top_logp, top_index = jax.lax.top_k(candidates, 2 * k)  # [B, 2K], best first
        beam, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        sequences = jnp.take_along_axis(live, beam[:, :, None], axis=1)  # [B, 2K, L]
        sequences = jax.lax.dynamic_update_slice_in_dim(sequences, token[:, :, None], t + 1, axis=2)
        is_eos = token == eos_id

        # Finished: EOS candidates among the K best, merged with the earlier finished, the K best kept.
        new_scores = jnp.where(is_eos & (jnp.arange(2 * k) < k)[None],
                               top_logp / length_penalty(t + 1, alpha), NEG_INF)
        merged_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
        merged = jnp.concatenate([finished, sequences], axis=1)
        finished_scores, keep = jax.lax.top_k(merged_scores, k)
        finished = jnp.take_along_axis(merged, keep[:, :, None], axis=1)

        # Live: the K best candidates that did not end; their cache rows follow them.
        live_logp, keep = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logp), k)
        live = jnp.take_along_axis(sequences, keep[:, :, None], axis=1)
        cache = gather_beams(cache, (rows + jnp.take_along_axis(beam, keep, axis=1)).reshape(-1), shared)
        return t + 1, live, live_logp, finished, finished_scores, cache

    live = jnp.broadcast_to(_start(1, max_len, bos_id, pad_id), (batch, k, max_len))
    # One live beam at first: K copies of the same prefix would fill the beam with duplicates.
    live_logp = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)[None].repeat(batch, axis=0)
    state = (jnp.zeros((), jnp.int32), live, live_logp, live, jnp.full((batch, k), 2 * NEG_INF), cache)
    t, live, live_logp, finished, finished_scores, _ = jax.lax.while_loop(cond, body, state)
    # Live beams compete as they are (at max_len, or provably no better than the finished ones).
    live_scores = jnp.where(live_logp > NEG_INF / 2, live_logp / length_penalty(t, alpha), 2 * NEG_INF)
    scores = jnp.concatenate([finished_scores, live_scores], axis=1)
    best = jnp.argmax(scores, axis=1)
    sequences = jnp.concatenate([finished, live], axis=1)
    return (jnp.take_along_axis(sequences, best[:, None, None], axis=1)[:, 0],
            jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0])


# ------------------------------------------------------------------------------------------------ the model side


def generate(model: Any, params: Any, image: Array, config: DecodeConfig, *, bos_id: int, eos_id: int,
             pad_id: int = 0, rng: Array | None = None) -> tuple[Array, Array]:
    """Captions for images [B, H, W, 3] from a captioner (its `image_memory` and `decode_text` methods):
    (tokens int [B, max_len] starting with bos_id, scores [B]). Jit it with the model and config static."""
    decoder = model.clone(decode=True)
    memory, memory_mask = model.apply({"params": params}, image, method="image_memory")
    batch = image.shape[0]
    rows = config.beam_size if config.method == "beam" else 1
    if rows > 1:  # example-major beams: row b * K + k
        memory, memory_mask = (jnp.repeat(x, rows, axis=0) for x in (memory, memory_mask))
    # The first call sizes the self-attention caches from a full-length input and stores the memory's keys.
    full = jnp.full((batch * rows, config.max_len), pad_id, jnp.int32)
    _, variables = decoder.apply({"params": params}, full, memory, memory_mask, method="decode_text",
                                 mutable=["cache"])

    def step_fn(tokens: Array, cache: Any) -> tuple[Array, Any]:
        logits, variables = decoder.apply({"params": params, "cache": cache}, tokens, memory, memory_mask,
                                          method="decode_text", mutable=["cache"])
        return logits[:, -1], variables["cache"]

    common = dict(max_len=config.max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    if config.method == "greedy":
        return greedy(step_fn, variables["cache"], batch=batch, **common)
    if config.method == "beam":
        return beam_search(step_fn, variables["cache"], batch=batch, beam_size=config.beam_size,
                           alpha=config.length_penalty, shared=is_memory_cache, **common)
    if rng is None:
        raise ValueError("sampling needs an rng")
    return sample(step_fn, variables["cache"], rng, batch=batch, temperature=config.temperature, top_k=config.top_k,
                  top_p=config.top_p, **common)


def caption_lengths(tokens: Array, eos_id: int) -> Array:
    """Tokens after BOS up to and including the first EOS (all of them when there is none): int [B]."""
    body = tokens[:, 1:]
    has_eos = jnp.any(body == eos_id, axis=1)
    return jnp.where(has_eos, jnp.argmax(body == eos_id, axis=1) + 1, body.shape[1])
