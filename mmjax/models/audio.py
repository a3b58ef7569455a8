"""Audio spectrogram transformer (AST-style) speech / audio encoder, with its log-mel frontend on device.

waveform [B, S] + lengths [B] -> log-mel [B, T, n_mels] (mmjax.data.audio.log_mel with xp=jax.numpy, inside the
jitted step) -> per-utterance normalisation over the real frames -> SpecAugment (training) -> non-overlapping
time x frequency patches -> + a 2-D position table -> (+ cls) -> Encoder with a padding mask -> LN -> pool.

Why the frontend runs on device: on an accelerator it is nearly free (0.1% of an AST-base training step), where
the host's CPUs are what feeds the devices; SpecAugment draws its masks from the step's key like every other
on-device augmentation; and a run's features are a function of its config, the same wherever it runs. On a
CPU-only machine host and "device" are the same cores: there the frontend is most of the tiny tower's step (75% on
2 cores), and computing it on the host with tf.signal would take longer still (experiments/bench_audio_frontend.py,
README "Speech").
"""
from __future__ import annotations

from typing import Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.data import audio as frontend
from mmjax.models import layers
from mmjax.models.layers import Array, Dtype, partitioned


def real_frames(audio_length: Array, *, n_fft: int, hop_length: int, center: bool = True) -> Array:
    """How many analysis frames of a clip of `audio_length` samples hold signal (int32 [B]); at least 1."""
    length = jnp.asarray(audio_length, jnp.int32)
    frames = length // hop_length + 1 if center else (length - n_fft) // hop_length + 1
    return jnp.maximum(frames, 1)


def mask_spans(rng: Array, extent: Array, count: int, max_width: int) -> tuple[Array, Array]:
    """SpecAugment's draw for one axis: (start, width) int32 [B, count], width ~ U{0..max_width} (capped at the
    extent) and start ~ U{0..extent - width}, so a span lies inside each row's `extent` [B] (its real frames)."""
    k_width, k_start = jax.random.split(rng)
    b = extent.shape[0]
    width = jnp.minimum(jax.random.randint(k_width, (b, count), 0, max_width + 1), extent[:, None])
    room = extent[:, None] - width
    start = jnp.minimum(jnp.floor(jax.random.uniform(k_start, (b, count)) * (room + 1)), room).astype(jnp.int32)
    return start, width


def spans_to_mask(start: Array, width: Array, size: int) -> Array:
    """bool [B, size]: True inside any span [start, start + width) of the row."""
    i = jnp.arange(size)[None, None, :]
    return jnp.any((i >= start[..., None]) & (i < (start + width)[..., None]), axis=1)


def spec_augment_mask(rng: Array, num_real: Array, frames: int, mels: int, *, time_masks: int,
                      time_mask_width: int, freq_masks: int, freq_mask_width: int) -> Array:
    """SpecAugment's masks (True = masked) bool [B, frames, mels]: `time_masks` spans of up to `time_mask_width`
    frames inside each clip's real frames, and `freq_masks` bands of up to `freq_mask_width` mel bins (Park et al.
    2019, without time warping)."""
    k_time, k_freq = jax.random.split(rng)
    b = num_real.shape[0]
    mask = jnp.zeros((b, frames, mels), bool)
    if time_masks and time_mask_width:
        mask |= spans_to_mask(*mask_spans(k_time, num_real, time_masks, time_mask_width), frames)[:, :, None]
    if freq_masks and freq_mask_width:
        mask |= spans_to_mask(*mask_spans(k_freq, jnp.full((b,), mels), freq_masks, freq_mask_width), mels)[:, None]
    return mask


class AudioEncoder(nn.Module):
    """AST-style encoder over a waveform: returns `(pooled [B, width], tokens [B, N, width])`.

    Tokens are the patches in (time, frequency) raster order, cls first with `cls_token`. `token_mask` gives their
    padding mask (a patch is real when its first frame holds signal). The position table is 2-D
    [time patches, frequency patches, width], sized by the longest input seen at init; shorter inputs use its first
    rows, and `mmjax.pretrained` resizes it when a checkpoint was trained on another length.

    Parameters: patch_kernel [patch_time, patch_freq, 1, width] (AST's patch conv, HWIO), patch_bias,
    pos_embedding [Tp, Fp, width], cls (cls_token or pool="cls"), encoder/layer_{i}, ln_post.
    """

    sample_rate: Optional[int] = 16000  # None: resolved from data.audio.sample_rate
    n_fft: int = 400
    win_length: Optional[int] = None  # default n_fft
    hop_length: int = 160
    n_mels: int = 64
    fmin: float = 0.0
    fmax: Optional[float] = None  # default sample_rate / 2
    log_floor: float = 1e-10
    patch_time: int = 16  # frames per patch
    patch_freq: int = 16  # mel bins per patch
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: Optional[int] = None  # default 4 * width
    pool: str = "mean"  # "mean" (over the real patch tokens) | "cls"
    cls_token: bool = False
    norm: str = "pre"
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    ln_epsilon: float = 1e-6
    # SpecAugment, in training only: mask counts and maximum widths (frames / mel bins); 0 turns a kind off.
    time_masks: int = 0
    time_mask_width: int = 0
    freq_masks: int = 0
    freq_mask_width: int = 0
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention: str = "einsum"  # layers.MultiHeadAttention.attention: "einsum" | "xla" | "cudnn" | "auto"
    scan_layers: bool = False  # nn.scan over the encoder's layers (params stacked under encoder/layers)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def frames(self, num_samples: int) -> int:
        """Analysis frames of a [*, num_samples] input."""
        return frontend.num_frames(num_samples, n_fft=self.n_fft, hop_length=self.hop_length)

    def grid(self, num_samples: int) -> tuple[int, int]:
        """(time patches, frequency patches) of a [*, num_samples] input (frames padded up to whole patches)."""
        return -(-self.frames(num_samples) // self.patch_time), self.n_mels // self.patch_freq

    def token_mask(self, audio_length: Array, num_samples: int) -> Array:
        """int32 [B, N] (1 = real) of the tokens `__call__` returns for inputs of `num_samples` samples."""
        tp, fp = self.grid(num_samples)
        real = real_frames(audio_length, n_fft=self.n_fft, hop_length=self.hop_length)
        patches = (jnp.arange(tp)[None, :] * self.patch_time < real[:, None]).astype(jnp.int32)
        mask = jnp.repeat(patches, fp, axis=1)
        if self.cls_token or self.pool == "cls":
            mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
        return mask

    def spectrogram(self, audio: Array, audio_length: Array) -> Array:
        """Normalised log-mel [B, T, n_mels] float32: zero mean and unit variance over each clip's real frames."""
        if self.sample_rate is None:
            raise ValueError("AudioEncoder.sample_rate is None: set it (or leave it to data.audio.sample_rate)")
        spec = frontend.log_mel(audio.astype(jnp.float32), int(self.sample_rate), n_fft=self.n_fft,
                                win_length=self.win_length, hop_length=self.hop_length, n_mels=self.n_mels,
                                fmin=self.fmin, fmax=self.fmax, log_floor=self.log_floor, xp=jnp)
        real = real_frames(audio_length, n_fft=self.n_fft, hop_length=self.hop_length)
        m = (jnp.arange(spec.shape[1])[None, :] < real[:, None])[..., None]
        count = real[:, None, None].astype(jnp.float32) * spec.shape[2]
        mean = jnp.sum(jnp.where(m, spec, 0.0), axis=(1, 2), keepdims=True) / count
        var = jnp.sum(jnp.where(m, (spec - mean) ** 2, 0.0), axis=(1, 2), keepdims=True) / count
        return jnp.where(m, (spec - mean) * jax.lax.rsqrt(var + 1e-5), 0.0)

    @nn.compact
    def __call__(self, audio: Array, audio_length: Array, *, train: bool = False) -> tuple[Array, Array]:
        """audio float [B, S] (zero-padded), audio_length int [B] (real samples) -> (pooled, tokens)."""
        if audio.ndim != 2 or audio_length.shape != audio.shape[:1]:
            raise ValueError(f"AudioEncoder expects audio [B, S] and audio_length [B]; got {audio.shape} and "
                             f"{audio_length.shape}")
        if self.pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls'; got {self.pool!r}")
        if self.n_mels % self.patch_freq:
            raise ValueError(f"n_mels={self.n_mels} is not divisible by patch_freq={self.patch_freq}")
        spec = self.spectrogram(audio, audio_length)
        b, t, f = spec.shape
        if train and (self.time_masks or self.freq_masks):
            num_real = real_frames(audio_length, n_fft=self.n_fft, hop_length=self.hop_length)
            masked = spec_augment_mask(self.make_rng("dropout"), num_real, t, f, time_masks=self.time_masks,
                                       time_mask_width=self.time_mask_width, freq_masks=self.freq_masks,
                                       freq_mask_width=self.freq_mask_width)
            spec = jnp.where(masked, 0.0, spec)  # 0 = the clip's mean after normalisation
        tp, fp = self.grid(audio.shape[1])
        spec = jnp.pad(spec, ((0, 0), (0, tp * self.patch_time - t), (0, 0)))
        patches = einops.rearrange(spec, "b (t p) (f q) -> b (t f) (p q)", p=self.patch_time, q=self.patch_freq)
        kernel = self.param("patch_kernel", partitioned(nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                                                        (None, None, None, "embed")),
                            (self.patch_time, self.patch_freq, 1, self.width), self.param_dtype)
        x = layers.matmul_last(patches.astype(self.dtype), kernel.reshape(-1, self.width).astype(self.dtype))
        x = x + self.param("patch_bias", partitioned(layers.zeros_init, ("embed",)), (self.width,),
                           self.param_dtype).astype(self.dtype)
        if self.has_variable("params", "pos_embedding"):  # a table made for longer clips serves shorter ones
            pos = nn.unbox(self.get_variable("params", "pos_embedding"))
        else:
            pos = self.param("pos_embedding", partitioned(layers.embed_init, ("length", None, "embed")),
                             (tp, fp, self.width), self.param_dtype)
        if pos.shape[0] < tp or pos.shape[1] != fp:
            raise ValueError(f"AudioEncoder's position table covers {pos.shape[0]} x {pos.shape[1]} patches; this "
                             f"input needs {tp} x {fp} (longer clips than at init: resize the table, as init_from "
                             f"does)")
        x = x + pos[:tp].astype(self.dtype).reshape(1, tp * fp, self.width)
        use_cls = self.cls_token or self.pool == "cls"
        if use_cls:
            cls = self.param("cls", partitioned(layers.embed_init, ("embed",)), (self.width,), self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], axis=1)
        mask = self.token_mask(audio_length, audio.shape[1])
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        x = layers.constrain(x)
        x = layers.tower_encoder(self)(x, layers.padding_bias(mask), not train)
        tokens = layers.constrain(layers.layer_norm(self.ln_epsilon, self.dtype, self.param_dtype, name="ln_post")(x))
        if self.pool == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = layers.masked_mean(tokens[:, 1:] if use_cls else tokens, mask[:, 1:] if use_cls else mask)
        return layers.constrain(pooled, layers.POOLED_AXES), tokens
