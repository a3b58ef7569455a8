"""Host-side audio decoding and the log-mel frontend (numpy; the same code runs on device with `xp=jax.numpy`).

    wave = read_audio("clip.flac", sample_rate=16000, downmix=True, min_samples=400)   # float32 mono [samples]
    feats = log_mel(wave, **frontend_config().to_dict())                               # [frames, 64]

    AudioError        ValueError whose one-line message names the file (every read_audio failure)
    read_audio        a path or raw bytes in any format soundfile reads -> float32 mono at `sample_rate` (soxr "HQ")
    to_int16          float waveform in [-1, 1] -> int16 PCM, clipped and rounded (the inverse of soundfile's scaling)
    mel_filterbank    [n_fft // 2 + 1, n_mels] Slaney-scale, Slaney-normalised triangles (= librosa.filters.mel(...).T)
    num_frames        how many STFT frames log_mel (and librosa) make from a clip
    frontend_config   the frontend's defaults as a ConfigDict (16 kHz, 25 ms Hann window, 10 ms hop, 64 mels)
    log_mel           waveform [..., samples] -> log mel power [..., frames, n_mels]

`log_mel` is written once against an array namespace `xp`. With numpy (the default) it computes in float64 and is
the reference, equal to librosa.feature.melspectrogram(window="hann", pad_mode="constant", htk=False,
norm="slaney") followed by log(max(S, log_floor)); host tools use it. On device the model's audio tower calls
`log_mel(..., xp=jax.numpy)` inside the jitted step: float32, static shapes, no host round trip.

This module imports only numpy (and soundfile / soxr / ml_collections when the functions that need them run), so
data tools can use it without loading TensorFlow or JAX.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
from typing import Any, Union

import numpy as np

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

# WAV format tags libsndfile decodes: PCM, MS ADPCM, IEEE float, A-law, mu-law, IMA ADPCM, GSM 6.10, G.721, MP3.
_LIBSNDFILE_WAV_TAGS = frozenset({0x0001, 0x0002, 0x0003, 0x0006, 0x0007, 0x0011, 0x0031, 0x0040, 0x0055})
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# libsndfile's public codes for "supported container, unsupported encoding" and "unimplemented format".
_UNSUPPORTED_CODES = frozenset({4, 18})
_UNSUPPORTED_WORDS = re.compile(r"unsupported|unimplemented|unknown (format|encoding)|not support", re.IGNORECASE)
# Beyond this many strided slices per frame, one gather is the smaller program (see _frame).
_MAX_FRAME_SLICES = 32


class AudioError(ValueError):
    """An audio file that cannot be used; the message is one line and names the file."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _wav_format(head: bytes) -> tuple[int, int] | None:
    """(format tag, bits per sample) from an intact RIFF/RF64 WAVE 'fmt ' chunk in `head`, else None."""
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk_id, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if chunk_id == b"fmt ":
            if size < 16 or pos + 8 + size > len(head):
                return None  # a cut-off fmt chunk is damage, not an exotic format
            tag, _, _, _, _, bits = struct.unpack_from("<HHIIHH", head, pos + 8)
            if tag == _WAVE_FORMAT_EXTENSIBLE and size >= 40:
                tag = struct.unpack_from("<H", head, pos + 8 + 24)[0]  # the SubFormat GUID starts with the tag
            return tag, bits
        pos += 8 + size + (size & 1)
    return None


def _open_error(name: str, err: Exception, head: bytes) -> AudioError:
    """The AudioError for a file libsndfile refused to open: unsupported format, or unreadable / corrupt."""
    reason = _one_line(getattr(err, "error_string", None) or err)
    wav = _wav_format(head)
    if wav is not None:
        tag, bits = wav
        if (tag not in _LIBSNDFILE_WAV_TAGS or (tag == 0x0003 and bits not in (32, 64))
                or (tag == 0x0001 and not 1 <= bits <= 32)):
            return AudioError(f"{name}: unsupported audio format (WAV format tag 0x{tag:04X}, {bits}-bit; "
                              f"libsndfile: {reason})")
    if getattr(err, "code", None) in _UNSUPPORTED_CODES or _UNSUPPORTED_WORDS.search(reason):
        return AudioError(f"{name}: unsupported audio format (libsndfile: {reason})")
    return AudioError(f"{name}: not a readable audio file (corrupt or not audio; libsndfile: {reason})")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def read_audio(source: AudioSource, *, sample_rate: int, name: str | None = None, downmix: bool = False,
               min_samples: int = 1) -> np.ndarray:
    """Decodes anything soundfile reads (WAV, FLAC, OGG, ...) from a path or raw bytes -> float32 mono waveform in
    [-1, 1] at `sample_rate` (resampled with soxr, quality "HQ", when the file's rate differs)."""
    import soundfile as sf  # pylint: disable=import-outside-toplevel

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = "<bytes>" if name is None else name
        fileobj: Any = io.BytesIO(data)

        def read_head() -> bytes:
            return data[:1 << 16]
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = path if name is None else name
        try:  # libsndfile reports every OS failure as "System error."; Python's own open names the cause
            with open(path, "rb"):
                pass
        except OSError as e:
            raise AudioError(f"{name}: cannot open: {e.strerror or e}") from None
        fileobj = path

        def read_head() -> bytes:
            with open(path, "rb") as f:
                return f.read(1 << 16)
    else:
        raise TypeError(f"read_audio: source must be a path or bytes, not {type(source).__name__}")

    try:
        with sf.SoundFile(fileobj) as f:
            rate, channels = f.samplerate, f.channels
            if channels > 1 and not downmix:
                raise AudioError(f"{name} has {channels} channels; mono expected: pass downmix=True (--downmix) "
                                 "to average them")
            # float32: integer PCM is scaled to [-1, 1) by libsndfile; float files pass through unchanged.
            wave = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        raise _open_error(name, e, read_head()) from None
    except (RuntimeError, EOFError, OSError) as e:  # a decoder that fails part way through the data
        raise AudioError(f"{name}: not a readable audio file (decoding failed: {_one_line(e)})") from None

    if wave.shape[0] == 0:
        raise AudioError(f"{name} is empty (0 audio frames)")
    bad = ~np.isfinite(wave)
    if bad.any():
        first = int(np.argmax(bad.any(axis=1)))
        raise AudioError(f"{name}: {_plural(int(bad.sum()), 'non-finite sample')} (NaN or inf), first at "
                         f"{first / rate:.4f} s")
    wave = wave.mean(axis=1, dtype=np.float32) if channels > 1 else wave[:, 0]
    if rate != sample_rate:
        import soxr  # pylint: disable=import-outside-toplevel
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ")
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if wave.shape[0] < min_samples:
        raise AudioError(f"{name}: {wave.shape[0] / sample_rate:.4f} s ({_plural(wave.shape[0], 'sample')} at "
                         f"{sample_rate} Hz) is shorter than one analysis frame ({_plural(min_samples, 'sample')})")
    return wave


def to_int16(waveform: np.ndarray) -> np.ndarray:
    """Float waveform in [-1, 1] -> int16 PCM: x * 32768 rounded to nearest (ties to even), clipped to int16."""
    x = np.asarray(waveform, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("to_int16: the waveform has non-finite samples (NaN or inf)")
    # 32768 (not 32767) makes this the exact inverse of soundfile's int16 -> float scaling.
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (Auditory Toolbox): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep,
                    hz / f_sp)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def _check_mel_args(sample_rate: int, n_mels: int, fmin: float, fmax: float) -> None:
    if n_mels < 1:
        raise ValueError(f"n_mels must be at least 1, got {n_mels}")
    if fmax > sample_rate / 2:
        raise ValueError(f"fmax={fmax} Hz is above the Nyquist frequency {sample_rate / 2} Hz "
                         f"(sample_rate={sample_rate})")
    if not 0 <= fmin < fmax:
        raise ValueError(f"need 0 <= fmin < fmax, got fmin={fmin}, fmax={fmax}")


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] float64, Slaney mel scale and Slaney (area) normalisation: equals librosa.filters.mel(
    sr=..., n_fft=..., n_mels=..., fmin=..., fmax=..., htk=False, norm="slaney").T"""
    fmax = sample_rate / 2 if fmax is None else float(fmax)
    _check_mel_args(sample_rate, n_mels, fmin, fmax)
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    ramps = mel_hz[:, None] - fft_hz[None, :]
    fdiff = np.diff(mel_hz)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    # Slaney normalisation: each triangle has unit area in Hz, so wide high-frequency bands are not louder.
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]
    return weights.T


def num_frames(num_samples: int, *, n_fft: int, hop_length: int, center: bool = True) -> int:
    """STFT frames from `num_samples` samples (as librosa): 1 + (padded - n_fft) // hop_length."""
    padded = num_samples + (2 * (n_fft // 2) if center else 0)
    if padded < n_fft:
        raise ValueError(f"waveform of {num_samples} samples is shorter than one frame (n_fft={n_fft}"
                         f"{', center=True pads ' + str(2 * (n_fft // 2)) if center else ', center=False'})")
    return 1 + (padded - n_fft) // hop_length


def frontend_config():
    """The log-mel frontend's defaults as an ml_collections.ConfigDict; its fields are log_mel's keyword arguments."""
    import ml_collections  # pylint: disable=import-outside-toplevel

    return ml_collections.ConfigDict(dict(
        sample_rate=16000, n_fft=400, win_length=400, hop_length=160, n_mels=64, fmin=0.0,
        fmax=ml_collections.config_dict.placeholder(float),  # None: sample_rate / 2
        center=True, power=2.0, log_floor=1e-10))


def _hann_window(n_fft: int, win_length: int) -> np.ndarray:
    """Periodic Hann of win_length (as scipy's get_window(fftbins=True)), zero-padded to n_fft, centred."""
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(win_length) / win_length)
    left = (n_fft - win_length) // 2
    return np.pad(window, (left, n_fft - win_length - left))


def _frame(x, n_fft: int, hop_length: int, frames: int, xp):
    """x [..., samples] -> [..., frames, n_fft], frame i starting at sample i * hop_length.

    Frames are cut as strided slices of g-sample blocks (g = gcd(n_fft, hop)): plain slices lower to cheap
    contiguous copies on accelerators, where a gather of every sample is slow. When g is small that would take too
    many slices, so it falls back to one gather with a static index array.
    """
    g = math.gcd(n_fft, hop_length)
    parts, stride = n_fft // g, hop_length // g
    used = (frames - 1) * hop_length + n_fft
    x = x[..., :used]
    if parts > _MAX_FRAME_SLICES:
        index = np.arange(frames)[:, None] * hop_length + np.arange(n_fft)[None, :]
        return x[..., index]
    blocks = xp.reshape(x, x.shape[:-1] + (used // g, g))
    span = (frames - 1) * stride + 1
    return xp.concatenate([blocks[..., k:k + span:stride, :] for k in range(parts)], axis=-1)


def log_mel(waveform, sample_rate: int, *, n_fft: int = 400, win_length: int | None = None, hop_length: int = 160,
            n_mels: int = 64, fmin: float = 0.0, fmax: float | None = None, center: bool = True, power: float = 2.0,
            log_floor: float = 1e-10, xp: Any = np):
    """waveform [..., samples] -> log(max(mel power, log_floor)) [..., frames, n_mels]; float64 with numpy (the
    reference, equal to librosa), float32 with xp=jax.numpy (jit-able: every shape is static)."""
    win_length = n_fft if win_length is None else win_length
    if not 1 <= win_length <= n_fft:
        raise ValueError(f"win_length={win_length} must be between 1 and n_fft={n_fft}")
    if hop_length < 1:
        raise ValueError(f"hop_length must be at least 1, got {hop_length}")
    mel = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)  # validates n_mels, fmin, fmax
    dtype = np.float64 if xp is np else xp.float32

    x = xp.asarray(waveform).astype(dtype)
    frames = num_frames(x.shape[-1], n_fft=n_fft, hop_length=hop_length, center=center)
    if center:
        x = xp.pad(x, [(0, 0)] * (x.ndim - 1) + [(n_fft // 2, n_fft // 2)])
    window = xp.asarray(_hann_window(n_fft, win_length), dtype=dtype)
    spec = xp.fft.rfft(_frame(x, n_fft, hop_length, frames, xp) * window, axis=-1)
    if power == 2.0:
        spec = xp.real(spec) ** 2 + xp.imag(spec) ** 2  # skips abs's square root, then squaring it back
    else:
        spec = xp.abs(spec) ** power
    # Accelerators' default float32 matmul (bf16 passes on TPU, TF32 on GPU) would cost ~1e-3 of the mel power.
    precision = {} if xp is np else {"precision": "highest"}
    mel_power = xp.matmul(spec, xp.asarray(mel, dtype=dtype), **precision)
    return xp.log(xp.maximum(mel_power, log_floor))
