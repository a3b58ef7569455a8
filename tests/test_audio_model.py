"""The audio tower (AST-style, log-mel on device), SpecAugment and the dual encoder over audio: shapes, masks,
variable lengths."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import audio as frontend
from mmjax.models import audio as audio_model
from mmjax.models import build_model
from mmjax.models.audio import AudioEncoder

SR = 16000
TOWER = dict(sample_rate=SR, n_fft=400, hop_length=160, n_mels=64, patch_time=8, patch_freq=32, width=32, depth=2,
             heads=2, mlp_dim=64)


def _speechlike(n: int, seed: int = 0) -> np.ndarray:
    """A chirp with an amplitude envelope and a little noise: energy in every band, not stationary."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    wave = np.sin(2 * np.pi * (200 + 1500 * t) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * wave + 0.01 * rng.standard_normal(n)).astype(np.float32)


def _init(tower: AudioEncoder, samples: int, batch: int = 2):
    audio = jnp.zeros((batch, samples), jnp.float32)
    return tower.init({"params": jax.random.key(0)}, audio, jnp.full((batch,), samples))["params"]


@pytest.mark.parametrize("pool,cls_token", [("mean", False), ("cls", True), ("mean", True)])
def test_shapes_and_token_mask_under_variable_lengths(pool, cls_token):
    tower = AudioEncoder(**TOWER, pool=pool, cls_token=cls_token)
    samples = 16000  # 101 frames -> 13 time patches of 8 frames (the last one padded), 2 frequency patches
    params = _init(tower, samples)
    lengths = jnp.array([samples, 3000, 1, 0])
    audio = jnp.asarray(np.stack([_speechlike(samples, s) for s in range(4)]))
    pooled, tokens = jax.jit(lambda p, a, n: tower.apply({"params": p}, a, n))(params, audio, lengths)
    n = 13 * 2 + int(cls_token)
    chex.assert_shape(pooled, (4, 32))
    chex.assert_shape(tokens, (4, n, 32))
    chex.assert_tree_all_finite((pooled, tokens))
    mask = np.asarray(tower.token_mask(lengths, samples))
    chex.assert_shape(mask, (4, n))
    # Real frames: 1 + length // hop (centred frames); a patch is real when its first frame is.
    frames = np.maximum(np.asarray(lengths) // 160 + 1, 1)
    patches = -(-frames // 8)
    np.testing.assert_array_equal(mask.sum(axis=1), patches * 2 + int(cls_token))
    assert tower.grid(samples) == (13, 2)


def test_padding_does_not_change_the_clip():
    """The same clip zero-padded to 1 s or to 2 s gives the same tokens and pooled output (masked frames, the
    position table's first rows, per-clip normalisation over real frames only)."""
    tower = AudioEncoder(**TOWER)
    params = _init(tower, 32000)  # the table covers 2 s; a 1 s batch uses its first rows
    clip = _speechlike(11000, 3)
    short = np.pad(clip, (0, 16000 - len(clip)))[None]
    long = np.pad(clip, (0, 32000 - len(clip)))[None]
    length = jnp.array([len(clip)])
    p_short, t_short = tower.apply({"params": params}, jnp.asarray(short), length)
    p_long, t_long = tower.apply({"params": params}, jnp.asarray(long), length)
    np.testing.assert_allclose(p_short, p_long, rtol=1e-5, atol=1e-5)
    real = np.asarray(tower.token_mask(length, 16000))[0] > 0
    np.testing.assert_allclose(t_short[0][real], t_long[0][:len(real)][real], rtol=1e-4, atol=1e-4)


def test_longer_input_than_the_position_table_is_a_clear_error():
    tower = AudioEncoder(**TOWER)
    params = _init(tower, 8000)
    with pytest.raises(ValueError, match="position table covers 7 x 2 patches; this input needs 13 x 2"):
        tower.apply({"params": params}, jnp.zeros((1, 16000)), jnp.array([16000]))


def test_device_spectrogram_is_the_reference_log_mel_normalised():
    """The tower's on-device features are mmjax.data.audio.log_mel (numpy, float64) normalised per clip."""
    tower = AudioEncoder(**TOWER)
    clip = _speechlike(12000, 5)
    got = np.asarray(tower.spectrogram(jnp.asarray(clip[None]), jnp.array([len(clip)])))[0]
    ref = frontend.log_mel(clip.astype(np.float64), SR, n_fft=400, hop_length=160, n_mels=64)
    ref = (ref - ref.mean()) / np.sqrt(ref.var() + 1e-5)
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_spec_augment_masks_exactly_the_drawn_spans():
    rng = jax.random.key(7)
    num_real = jnp.array([100, 40, 5, 1])
    mask = np.asarray(audio_model.spec_augment_mask(rng, num_real, 120, 64, time_masks=2, time_mask_width=20,
                                                    freq_masks=3, freq_mask_width=8))
    k_time, k_freq = jax.random.split(rng)
    t_start, t_width = map(np.asarray, audio_model.mask_spans(k_time, num_real, 2, 20))
    f_start, f_width = map(np.asarray, audio_model.mask_spans(k_freq, jnp.full((4,), 64), 3, 8))
    for b in range(4):
        time = np.zeros(120, bool)
        for s, w in zip(t_start[b], t_width[b]):
            assert 0 <= w <= min(20, int(num_real[b])) and s + w <= num_real[b]  # inside the real frames
            time[s:s + w] = True
        freq = np.zeros(64, bool)
        for s, w in zip(f_start[b], f_width[b]):
            assert 0 <= w <= 8 and s + w <= 64
            freq[s:s + w] = True
        np.testing.assert_array_equal(mask[b], time[:, None] | freq[None, :])


def test_spec_augment_widths_cover_zero_to_the_maximum():
    start, width = audio_model.mask_spans(jax.random.key(0), jnp.full((4000,), 200), 1, 6)
    counts = np.bincount(np.asarray(width).ravel(), minlength=7)
    assert counts.shape == (7,) and counts.min() > 450  # U{0..6}: ~571 each
    assert int(np.max(np.asarray(start + width))) <= 200


def test_spec_augment_only_in_training():
    tower = AudioEncoder(**TOWER, time_masks=2, time_mask_width=30, freq_masks=2, freq_mask_width=16)
    params = _init(tower, 16000)
    audio, length = jnp.asarray(_speechlike(16000)[None]), jnp.array([16000])
    eval_a = tower.apply({"params": params}, audio, length)[0]
    eval_b = tower.apply({"params": params}, audio, length, rngs={"dropout": jax.random.key(1)})[0]
    train = tower.apply({"params": params}, audio, length, train=True, rngs={"dropout": jax.random.key(1)})[0]
    np.testing.assert_array_equal(eval_a, eval_b)
    assert np.abs(np.asarray(train) - np.asarray(eval_a)).max() > 1e-3


def test_dual_encoder_pairs_audio_with_images_and_texts():
    towers = dict(audio=dict(kind="audio", **TOWER),
                  image=dict(kind="vit", image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64),
                  text=dict(kind="text", vocab_size=50, max_len=8, width=32, depth=1, heads=2, mlp_dim=64))
    batch = {"audio": jnp.asarray(np.stack([_speechlike(8000, s) for s in range(3)])),
             "audio_length": jnp.array([8000, 4000, 100]), "image": jnp.ones((3, 16, 16, 3)),
             "text_ids": jnp.ones((3, 8), jnp.int32), "text_mask": jnp.ones((3, 8), jnp.int32)}
    for other in ("image", "text"):
        model = build_model(dict(name="dual_encoder", modalities=("audio", other), embed_dim=16,
                                 towers={"audio": towers["audio"], other: towers[other]}))
        params = model.init({"params": jax.random.key(0)}, batch)["params"]
        assert set(params) == {"audio_encoder", f"{other}_encoder", "audio_projection", f"{other}_projection",
                               "logit_scale"}
        out = model.apply({"params": params}, batch)
        chex.assert_shape([out["audio_embeds"], out[f"{other}_embeds"]], (3, 16))
        np.testing.assert_allclose(np.linalg.norm(out["audio_embeds"], axis=-1), 1.0, rtol=1e-5)
        direct = model.apply({"params": params}, batch["audio"], batch["audio_length"], method="encode_audio")
        np.testing.assert_allclose(direct, out["audio_embeds"], rtol=1e-6)
    with pytest.raises(KeyError, match="audio tower needs batch keys \\['audio_length'\\]"):
        model.apply({"params": params}, {k: v for k, v in batch.items() if k != "audio_length"})
    with pytest.raises(ValueError, match="modalities .* must be two distinct names"):
        build_model(dict(name="dual_encoder", modalities=("audio", "image"), towers={"audio": towers["audio"]})
                    ).init({"params": jax.random.key(0)}, batch)


def test_init_from_resizes_the_position_table_to_longer_clips():
    """A tower trained on 1 s clips (7 x 2 patches) starts a tower for 2 s clips (13 x 2): pretrained's table
    resizing interpolates along time (a constant stays constant, a ramp stays a ramp) and the model applies."""
    from mmjax import pretrained  # pylint: disable=import-outside-toplevel

    tower = AudioEncoder(**TOWER)
    short, long = (jax.tree.map(np.asarray, nn.unbox(_init(tower, n))) for n in (8000, 16000))
    ramp = np.broadcast_to(np.arange(7, dtype=np.float32)[:, None, None], (7, 2, 32))
    for table, check in ((np.full((7, 2, 32), 0.25, np.float32), lambda t: np.allclose(t, 0.25)),
                         (ramp, lambda t: np.all(np.diff(t[:, 0, 0]) > 0) and 0 <= t.min() and t.max() <= 6)):
        source = dict(short, pos_embedding=table)
        resized = pretrained.resize_position_tables(source, long)
        assert resized["pos_embedding"].shape == (13, 2, 32)
        assert check(np.asarray(resized["pos_embedding"]))
        assert np.shape(resized["patch_kernel"]) == np.shape(short["patch_kernel"])
    pooled, _ = tower.apply({"params": resized}, jnp.zeros((1, 16000)), jnp.array([16000]))
    assert np.all(np.isfinite(pooled))
