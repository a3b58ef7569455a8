"""The text decoder and decoding: causal masking, the key/value cache against recomputing the prefix, greedy and
beam search against brute force on a toy model, beam size 1 against greedy, sampling's filters against NumPy, the
caption loss against NumPy, and sharded decoding against one device."""

import functools
import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import decoding, losses, sharding
from mmjax.models import build_model
from mmjax.models.text_decoder import TextDecoder

VOCAB, BOS, EOS, PAD = 12, 1, 2, 0


def small_model(name: str, norm: str = "pre", vocab: int = VOCAB, max_len: int = 10):
    """A captioner or CoCa with widths that divide by 8 and 2 (for the sharded test), 32x32 images."""
    cfg = dict(name=name, image=dict(patch_size=8, width=48 if name == "captioner" else 64, depth=1, heads=2,
                                     image_size=32),
               text=dict(vocab_size=vocab, max_len=max_len, width=64, depth=2, heads=2, mlp_dim=128, norm=norm))
    if name == "coca":
        cfg.update(multimodal_depth=1, embed_dim=16)
    return build_model(cfg)


def init(model, batch: int = 3, length: int = 10, seed: int = 0):
    """Parameters, images and random caption ids for `model`."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(3, VOCAB, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    params = model.init(jax.random.key(seed), {"image": image, "text_ids": ids, "text_mask": mask})["params"]
    return params, image, ids, mask


@pytest.mark.parametrize("name,norm", [("captioner", "pre"), ("captioner", "post"), ("coca", "pre")])
def test_causal_mask_lets_no_position_see_a_later_one(name, norm):
    model = small_model(name, norm)
    params, image, ids, mask = init(model)
    apply = jax.jit(lambda i: model.apply({"params": params}, {"image": image, "text_ids": i, "text_mask": mask}))
    base = np.asarray(apply(ids)["lm_logits"])
    for j in range(ids.shape[1]):
        changed = ids.copy()
        changed[:, j] = (changed[:, j] + 1 - 3) % (VOCAB - 3) + 3
        out = np.asarray(apply(changed)["lm_logits"])
        np.testing.assert_array_equal(out[:, :j], base[:, :j], err_msg=f"position < {j} saw position {j}")
        assert np.abs(out[:, j] - base[:, j]).max() > 1e-4  # the position itself does see it


def test_text_decoder_gradient_is_causal():
    """d output[t] / d embedding[s] is exactly zero for every s > t (a structural check, independent of values)."""
    # No LM head: a tied head reads every row of the table at every position.
    model = TextDecoder(vocab_size=VOCAB, max_len=6, width=16, depth=2, heads=2, cross_attention=False,
                        lm_head=False)
    ids = jnp.arange(6)[None] % VOCAB
    params = nn.unbox(model.init(jax.random.key(0), ids)["params"])

    def logits_from_embeddings(table):
        p = dict(params, embeddings=dict(params["embeddings"], word_embedding=table))
        return model.apply({"params": p}, ids)["tokens"].sum(-1)[0]  # [L]

    jac = jax.jacrev(logits_from_embeddings)(params["embeddings"]["word_embedding"])  # [L, V, D]
    per_position = np.abs(np.asarray(jac)).sum(-1)[:, np.asarray(ids[0])]  # [t, s]
    assert np.all(np.triu(per_position, k=1) == 0)
    assert np.all(np.diag(per_position) > 0)


@pytest.mark.parametrize("name,norm", [("captioner", "pre"), ("captioner", "post"), ("coca", "pre")])
def test_cached_decoding_equals_recomputing_the_prefix(name, norm):
    model = small_model(name, norm)
    params, image, ids, mask = init(model)
    full = np.asarray(model.apply({"params": params}, {"image": image, "text_ids": ids, "text_mask": mask})[
        "lm_logits"])
    memory, memory_mask = model.apply({"params": params}, image, method="image_memory")
    decoder = model.clone(decode=True)
    _, variables = decoder.apply({"params": params}, ids, memory, memory_mask, method="decode_text",
                                 mutable=["cache"])
    cache, steps = variables["cache"], []
    # One token at a time, then the rest as one chunk: both read and extend the same cache.
    for t in range(6):
        logits, variables = decoder.apply({"params": params, "cache": cache}, ids[:, t:t + 1], memory, memory_mask,
                                          method="decode_text", mutable=["cache"])
        cache = variables["cache"]
        steps.append(np.asarray(logits))
    logits, _ = decoder.apply({"params": params, "cache": cache}, ids[:, 6:], memory, memory_mask,
                              method="decode_text", mutable=["cache"])
    steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- the algorithms, on a toy


def toy_model(seed: int = 0, length: int = 5, vocab: int = 5):
    """A Markov 'language model': logits = table[position, previous token]; its cache is the position and the
    previous token of each row. Returns (step_fn, initial cache of N rows, log-prob table)."""
    rng = np.random.default_rng(seed)
    table = rng.normal(scale=2.0, size=(length, vocab, vocab)).astype(np.float32)
    log_probs = jax.nn.log_softmax(jnp.asarray(table), axis=-1)

    def step_fn(tokens, cache):
        t = cache["t"]
        return jnp.asarray(table)[t, tokens[:, 0]], {"t": t + 1, "rows": cache["rows"]}

    def cache_for(rows):
        return {"t": jnp.zeros((), jnp.int32), "rows": jnp.arange(rows)}

    return step_fn, cache_for, np.asarray(log_probs)


def brute_force_best(log_probs, max_len, bos, eos, alpha):
    """The best (score, tokens) over every sequence: ended by EOS, or max_len - 1 tokens long."""
    vocab = log_probs.shape[-1]
    best = (-np.inf, None)
    for n in range(1, max_len):
        for seq in itertools.product(range(vocab), repeat=n):
            if any(s == eos for s in seq[:-1]) or (seq[-1] != eos and n < max_len - 1):
                continue
            prev, total = bos, 0.0
            for t, tok in enumerate(seq):
                total += float(log_probs[t, prev, tok])
                prev = tok
            score = total / ((5.0 + n) / 6.0) ** alpha
            if score > best[0] + 1e-6:
                best = (score, seq)
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_finds_the_best_sequence(seed, alpha):
    """With as many beams as there are prefixes, beam search is exact: it must return brute force's optimum."""
    step_fn, cache_for, log_probs = toy_model(seed, length=5, vocab=4)
    max_len, beams = 5, 4 ** 3
    tokens, score = decoding.beam_search(step_fn, cache_for(beams), batch=1, beam_size=beams, max_len=max_len,
                                         bos_id=0, eos_id=3, pad_id=0, alpha=alpha)
    best_score, best_seq = brute_force_best(log_probs, max_len, bos=0, eos=3, alpha=alpha)
    np.testing.assert_allclose(float(score[0]), best_score, rtol=1e-5)
    assert tuple(np.asarray(tokens[0, 1:1 + len(best_seq)])) == best_seq


def numpy_greedy(log_probs, max_len, bos, eos):
    """Greedy decoding of the toy model, in NumPy."""
    seq, prev, total = [bos], bos, 0.0
    for t in range(max_len - 1):
        tok = int(np.argmax(log_probs[t, prev]))
        total += float(log_probs[t, prev, tok])
        seq.append(tok)
        prev = tok
        if tok == eos:
            break
    return seq + [0] * (max_len - len(seq)), total


@pytest.mark.parametrize("seed", range(6))
def test_greedy_and_beam_size_one_equal_numpy_greedy(seed):
    step_fn, cache_for, log_probs = toy_model(seed, length=6, vocab=4)
    want, total = numpy_greedy(log_probs, 6, bos=0, eos=3)
    tokens, score = decoding.greedy(step_fn, cache_for(1), batch=1, max_len=6, bos_id=0, eos_id=3)
    assert list(np.asarray(tokens[0])) == want
    np.testing.assert_allclose(float(score[0]), total, rtol=1e-6)
    tokens, score = decoding.beam_search(step_fn, cache_for(1), batch=1, beam_size=1, max_len=6, bos_id=0,
                                         eos_id=3)
    assert list(np.asarray(tokens[0])) == want
    np.testing.assert_allclose(float(score[0]), total, rtol=1e-6)


@pytest.mark.parametrize("name", ["captioner", "coca"])
def test_beam_size_one_equals_greedy_on_a_model(name):
    # A small vocabulary, so that EOS is likely at some steps and rows end at different lengths.
    model = small_model(name, vocab=6, max_len=10)
    params, image, _, _ = init(model, batch=8)
    common = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)
    greedy = decoding.generate(model, params, image, decoding.DecodeConfig("greedy", max_len=10), **common)
    beam = decoding.generate(model, params, image, decoding.DecodeConfig("beam", max_len=10, beam_size=1), **common)
    lengths = np.asarray(decoding.caption_lengths(greedy[0], EOS))
    assert len(set(lengths.tolist())) > 1, "the check needs rows that end at different steps"
    np.testing.assert_array_equal(np.asarray(beam[0]), np.asarray(greedy[0]))
    np.testing.assert_allclose(np.asarray(beam[1]), np.asarray(greedy[1]), rtol=1e-5)
    # More beams never find a worse sequence by the model's own score (length_penalty 0: the sum of log p).
    wide = decoding.generate(model, params, image, decoding.DecodeConfig("beam", max_len=10, beam_size=4), **common)
    assert np.all(np.asarray(wide[1]) >= np.asarray(greedy[1]) - 1e-5)


def test_beam_search_need_not_reorder_the_memory_cache(monkeypatch):
    """The memory's cached keys are the same for every beam of an image, so leaving them in place (the default)
    decodes exactly as reordering them with the beams does."""
    model = small_model("captioner", vocab=6, max_len=10)
    params, image, _, _ = init(model, batch=4)
    config = decoding.DecodeConfig("beam", max_len=10, beam_size=3)
    common = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)
    kept = decoding.generate(model, params, image, config, **common)
    marked = []
    real = decoding.is_memory_cache

    def reorder_everything(path):
        marked.append(real(path))
        return False

    monkeypatch.setattr(decoding, "is_memory_cache", reorder_everything)
    moved = decoding.generate(model, params, image, config, **common)
    assert any(marked), "the captioner's cache has memory keys for is_memory_cache to find"
    np.testing.assert_array_equal(np.asarray(moved[0]), np.asarray(kept[0]))
    np.testing.assert_allclose(np.asarray(moved[1]), np.asarray(kept[1]), rtol=1e-6)


def test_decoded_tokens_are_padded_after_eos():
    step_fn, cache_for, _ = toy_model(3, length=8, vocab=4)
    for fn in (functools.partial(decoding.greedy, step_fn, cache_for(4)),
               functools.partial(decoding.sample, step_fn, cache_for(4), jax.random.key(0))):
        tokens = np.asarray(fn(batch=4, max_len=8, bos_id=0, eos_id=3, pad_id=0)[0])
        for row in tokens:
            ends = np.nonzero(row[1:] == 3)[0]
            if len(ends):
                assert np.all(row[2 + ends[0]:] == 0)


def test_filter_logits_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 11)).astype(np.float32)
    for top_k, top_p in [(3, 1.0), (0, 0.5), (4, 0.8), (0, 1e-6), (11, 0.999)]:
        got = np.asarray(decoding.filter_logits(jnp.asarray(logits), top_k, top_p)) > decoding.NEG_INF / 2
        want = np.ones_like(logits, bool)
        for i, row in enumerate(logits):
            order = np.argsort(-row)
            if top_k:
                want[i, order[top_k:]] = False
            # The nucleus is taken from what top_k left, renormalised (Hugging Face's warpers in that order).
            probs = np.exp(row[order] - row.max()) * want[i, order]
            probs /= probs.sum()
            before = np.cumsum(probs) - probs
            want[i, order[before >= top_p]] = False
        np.testing.assert_array_equal(got, want, err_msg=f"top_k={top_k} top_p={top_p}")


def test_sampling_with_top_k_one_is_greedy_and_draws_follow_the_model():
    step_fn, cache_for, log_probs = toy_model(4, length=6, vocab=4)
    greedy = decoding.greedy(step_fn, cache_for(2), batch=2, max_len=6, bos_id=0, eos_id=3)[0]
    top1 = decoding.sample(step_fn, cache_for(2), jax.random.key(1), batch=2, max_len=6, bos_id=0, eos_id=3,
                           top_k=1)[0]
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
    # First-token frequencies over many rows match the model's distribution after BOS (4000 draws: +-0.03).
    tokens = decoding.sample(step_fn, cache_for(4000), jax.random.key(2), batch=4000, max_len=2, bos_id=0,
                             eos_id=3)[0]
    freq = np.bincount(np.asarray(tokens[:, 1]), minlength=4) / 4000
    np.testing.assert_allclose(freq, np.exp(log_probs[0, 0]), atol=0.03)


def test_decode_config_rejects_bad_values():
    for bad in [dict(method="nucleus"), dict(max_len=1), dict(beam_size=0), dict(temperature=0.0),
                dict(top_p=0.0), dict(top_k=-1)]:
        with pytest.raises(ValueError):
            decoding.DecodeConfig(**bad)


# ----------------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_caption_loss_matches_numpy(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(3, 5))
    weights = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
    loss, acc = losses.caption_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), smoothing)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    onehot = np.eye(7)[targets]
    target_dist = (1 - smoothing) * onehot + smoothing / 7
    per_token = -(target_dist * logp).sum(-1)
    chex.assert_trees_all_close(float(loss), float((per_token * weights).sum() / weights.sum()), rtol=1e-6)
    hits = (logits.argmax(-1) == targets).astype(np.float32)
    chex.assert_trees_all_close(float(acc), float((hits * weights).sum() / weights.sum()), rtol=1e-6)
    empty = losses.caption_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros_like(weights))
    assert float(empty[0]) == 0.0 and float(empty[1]) == 0.0


# ---------------------------------------------------------------------------------------------- sharded decoding


@pytest.mark.parametrize("method", ["greedy", "beam"])
@pytest.mark.parametrize("name", ["captioner", "coca"])
def test_sharded_decode_equals_single_device(name, method):
    """Decoding 8 images with parameters sharded by the logical rules on a 2x2x2 (data, fsdp, tensor) mesh gives
    the single device's tokens, and its scores to 1e-5."""
    assert jax.device_count() == 8
    model = small_model(name, vocab=VOCAB, max_len=10)
    params, image, ids, mask = init(model, batch=8)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), {"image": image, "text_ids": ids,
                                                                 "text_mask": mask}))["params"]
    config = decoding.DecodeConfig(method, max_len=10, beam_size=3)
    fn = functools.partial(decoding.generate, model, config=config, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    results = []
    for devices, sizes in [(jax.devices()[:1], dict(data=1, fsdp=1, tensor=1)),
                           (jax.devices(), dict(data=2, fsdp=2, tensor=2))]:
        mesh = sharding.create_mesh(sizes, devices)
        rules = sharding.DEFAULT_RULES
        param_shardings = sharding.logical_shardings(boxed, mesh, rules)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            placed = jax.device_put(params, param_shardings)
            images = jax.device_put(image, sharding.batch_sharding(mesh))
            if len(devices) > 1:  # really sharded: an fsdp / tensor parameter lives in pieces
                assert any(len(leaf.sharding.device_set) > 1 and not leaf.sharding.is_fully_replicated
                           for leaf in jax.tree.leaves(placed))
            out = jax.jit(fn, out_shardings=sharding.replicated(mesh))(placed, images)
        results.append(jax.device_get(out))
    (tokens_1, scores_1), (tokens_n, scores_n) = results
    np.testing.assert_array_equal(tokens_n, tokens_1)
    np.testing.assert_allclose(scores_n, scores_1, rtol=1e-5, atol=1e-5)
