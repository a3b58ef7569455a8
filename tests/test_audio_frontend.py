"""mmjax.data.audio: read_audio's decoding and one-line errors, and log_mel against librosa on recorded speech.

Recordings: Debian's pocketsphinx-testdata (raw 16 kHz 16-bit mono speech) and alsa-utils (48 kHz mono spoken
words); tests that need them skip, naming the package, where they are absent. Everything else is written to tmp_path.
"""

import functools
import glob
import io
import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

from mmjax.data import audio

sf = pytest.importorskip("soundfile")

POCKETSPHINX_DIR = "/usr/share/pocketsphinx/test/data"
SPEECH_16K = ("goforward.raw", "numbers.raw", "something.raw")
ALSA_WAV = "/usr/share/sounds/alsa/Front_Center.wav"

# name -> (recording, sample rate, log_mel / librosa keyword arguments). Each set is there for a quirk.
PARAM_SETS = {
    # the frontend's defaults: 25 ms window, 10 ms hop (frames cut as strided slices, gcd(400, 160) = 80)
    "16k_default": ("speech", 16000, dict(n_fft=400, win_length=400, hop_length=160, n_mels=64)),
    # a 400-sample window zero-padded (centred) to a 512-point FFT
    "16k_nfft512_win400": ("speech", 16000, dict(n_fft=512, win_length=400, hop_length=160, n_mels=64)),
    # no centre padding: frames start at sample 0, and fewer of them
    "16k_center_false": ("speech", 16000, dict(n_fft=400, hop_length=160, n_mels=64, center=False)),
    # magnitude, not power
    "16k_power1": ("speech", 16000, dict(n_fft=400, hop_length=160, n_mels=64, power=1.0)),
    # band-limited 128 mels on the native 48 kHz file; gcd(2048, 480) = 32 -> 64 slices: the gather path
    "48k_fmin20_fmax8000_128mels": ("alsa48", 48000, dict(n_fft=2048, win_length=1200, hop_length=480, n_mels=128,
                                                          fmin=20.0, fmax=8000.0)),
    # the same file resampled to 22.05 kHz by read_audio
    "22k_fmin20_fmax8000_128mels": ("alsa22", 22050, dict(n_fft=1024, hop_length=256, n_mels=128, fmin=20.0,
                                                          fmax=8000.0)),
}
JAX_SETS = ("16k_default", "16k_nfft512_win400", "16k_power1", "48k_fmin20_fmax8000_128mels")


@functools.lru_cache(maxsize=None)
def _speech(name: str) -> np.ndarray:
    return np.fromfile(os.path.join(POCKETSPHINX_DIR, name), dtype="<i2").astype(np.float64) / 32768.0


def _recordings(kind: str) -> list[tuple[str, np.ndarray]]:
    """(file name, float64 waveform) for each recording of `kind`; skips naming the Debian package if absent."""
    if kind == "speech":
        if not all(os.path.exists(os.path.join(POCKETSPHINX_DIR, n)) for n in SPEECH_16K):
            pytest.skip(f"recorded speech missing from {POCKETSPHINX_DIR}: apt-get install pocketsphinx-testdata")
        return [(n, _speech(n)) for n in SPEECH_16K]
    if not os.path.exists(ALSA_WAV):
        pytest.skip(f"{ALSA_WAV} missing: apt-get install alsa-utils")
    rate = 48000 if kind == "alsa48" else 22050
    return [(os.path.basename(ALSA_WAV), audio.read_audio(ALSA_WAV, sample_rate=rate).astype(np.float64))]


def _librosa_log_mel(y: np.ndarray, sr: int, log_floor: float = 1e-10, **kw) -> np.ndarray:
    librosa = pytest.importorskip("librosa")
    # dtype=float64 reaches librosa.filters.mel (its default float32 basis would differ from ours by ~1e-7).
    S = librosa.feature.melspectrogram(y=y, sr=sr, window="hann", pad_mode="constant", htk=False, norm="slaney",
                                       dtype=np.float64, **kw)
    return np.log(np.maximum(S, log_floor)).T


def _max_rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / np.abs(want)))


@pytest.mark.parametrize("set_name", list(PARAM_SETS))
def test_log_mel_matches_librosa(set_name):
    """The numpy log_mel equals librosa's melspectrogram + log to rtol 1e-4 on every recording, same shape."""
    kind, sr, kw = PARAM_SETS[set_name]
    for file_name, y in _recordings(kind):
        want = _librosa_log_mel(y, sr, **kw)
        got = audio.log_mel(y, sr, **kw)
        assert got.dtype == np.float64
        assert got.shape == want.shape == (
            audio.num_frames(len(y), n_fft=kw["n_fft"], hop_length=kw["hop_length"], center=kw.get("center", True)),
            kw["n_mels"]), file_name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=0, err_msg=f"{set_name} on {file_name}")


@pytest.mark.parametrize("sr,n_fft,n_mels,fmin,fmax", [
    (16000, 400, 64, 0.0, None), (16000, 512, 80, 0.0, 8000.0), (48000, 2048, 128, 20.0, 8000.0),
    (22050, 1024, 128, 20.0, 8000.0), (8000, 256, 40, 100.0, 3800.0), (44100, 2048, 1, 300.0, 5000.0)])
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax):
    """mel_filterbank == librosa.filters.mel(htk=False, norm="slaney").T to rtol 1e-6, float64 [bins, mels]."""
    librosa = pytest.importorskip("librosa")
    got = audio.mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
    want = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=False, norm="slaney",
                               dtype=np.float64).T
    assert got.shape == (n_fft // 2 + 1, n_mels) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("n_fft,hop", [(400, 160), (512, 128), (2048, 480), (401, 7)])
def test_num_frames_matches_librosa(n_fft, hop, center):
    """num_frames equals the frame count of librosa.stft for lengths around the frame boundaries."""
    librosa = pytest.importorskip("librosa")
    for n in sorted({1, hop - 1, hop, n_fft - 1, n_fft, n_fft + 1, n_fft + hop - 1, n_fft + hop, 3 * n_fft + 5}):
        if not center and n < n_fft:
            with pytest.raises(ValueError, match="shorter than one frame"):
                audio.num_frames(n, n_fft=n_fft, hop_length=hop, center=center)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # librosa warns that n_fft exceeds a short clip, pads anyway
            frames = librosa.stft(np.zeros(n), n_fft=n_fft, hop_length=hop, center=center,
                                  pad_mode="constant").shape[-1]
        assert audio.num_frames(n, n_fft=n_fft, hop_length=hop, center=center) == frames, n


@pytest.mark.parametrize("set_name", JAX_SETS)
def test_log_mel_jax_jit_matches_numpy(set_name):
    """log_mel(xp=jax.numpy) under jax.jit on a [2, samples] batch: float32, two identical rows, equal to the numpy
    reference within atol 1e-3 (log units: 0.1 % of the mel power) wherever the power is not at the noise floor.

    Tolerance: float32's FFT rounding error in each bin's amplitude is ~1e-7 of the frame's largest amplitude (eps
    6e-8, growing ~ log n), so a band's relative power error grows as it gets quieter than its frame's loudest band:
    at worst ~2e-4 at 60 dB below, ~2e-3 at 80 dB below (measured ~10x less). Bands more than 80 dB below their
    frame's loudest band, and those within 10 dB of log_floor, are left out (~0.1 % of these recordings' values above
    the floor: rounding noise, not signal). On the rest the CPU error measured < 3e-4; atol 1e-3 leaves room for
    other backends' FFTs and summation orders.
    """
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    kind, sr, kw = PARAM_SETS[set_name]
    fn = jax.jit(functools.partial(audio.log_mel, sample_rate=sr, xp=jnp, **kw))
    for file_name, y in _recordings(kind)[:2]:
        y32 = y.astype(np.float32)
        want = audio.log_mel(y32, sr, **kw)
        got = np.asarray(fn(jnp.asarray(np.stack([y32, y32]))))
        assert got.dtype == np.float32 and got.shape == (2,) + want.shape
        np.testing.assert_array_equal(got[0], got[1])
        power = np.exp(want) ** (2.0 / kw.get("power", 2.0))  # compare in dB of power whatever `power` is
        keep = (power > 1e-8 * power.max(axis=-1, keepdims=True)) & (want > np.log(1e-10 * 10))
        at_floor = want <= np.log(1e-10 * 10)  # digital silence: both sides clamp to the floor
        assert (keep | at_floor).mean() > 0.99, f"{set_name} on {file_name}: the mask keeps only {keep.mean():.1%}"
        np.testing.assert_allclose(got[0][keep], want[keep], rtol=0, atol=1e-3, err_msg=f"{set_name} on {file_name}")


def test_frame_paths_agree():
    """Both framings (strided slices of gcd blocks, and the index gather) cut the frames librosa.util.frame cuts."""
    librosa = pytest.importorskip("librosa")
    x = np.random.default_rng(0).standard_normal((3, 5000))
    for n_fft, hop in [(400, 160), (512, 512), (64, 96), (2048, 480), (401, 7)]:
        frames = audio.num_frames(x.shape[-1], n_fft=n_fft, hop_length=hop, center=False)
        want = np.swapaxes(librosa.util.frame(x, frame_length=n_fft, hop_length=hop), -1, -2)
        np.testing.assert_array_equal(audio._frame(x, n_fft, hop, frames, np), want)  # pylint: disable=protected-access


def test_frontend_config_defaults_feed_log_mel():
    """frontend_config() holds the documented defaults, its fields are log_mel's arguments, fmax takes a float."""
    cfg = audio.frontend_config()
    assert cfg.to_dict() == dict(sample_rate=16000, n_fft=400, win_length=400, hop_length=160, n_mels=64, fmin=0.0,
                                 fmax=None, center=True, power=2.0, log_floor=1e-10)
    y = np.random.default_rng(1).uniform(-0.5, 0.5, 3200)
    np.testing.assert_array_equal(audio.log_mel(y, **cfg.to_dict()), audio.log_mel(y, 16000))
    cfg.fmax = 8000.0
    assert audio.log_mel(y, **cfg.to_dict()).shape == (21, 64)
    with pytest.raises(TypeError):
        cfg.fmax = "8000"


@pytest.mark.parametrize("kwargs,match", [
    (dict(waveform=np.zeros(399), center=False), "399 samples is shorter than one frame"),
    (dict(waveform=np.zeros(1000), win_length=401), "win_length=401"),
    (dict(waveform=np.zeros(1000), fmax=8001.0), "fmax=8001.0 Hz is above the Nyquist"),
    (dict(waveform=np.zeros(1000), n_mels=0), "n_mels must be at least 1"),
    (dict(waveform=np.zeros(1000), fmin=9000.0), "fmin < fmax"),
])
def test_log_mel_errors(kwargs, match):
    """Impossible frontend settings raise a one-line ValueError saying which."""
    with pytest.raises(ValueError, match=match) as e:
        audio.log_mel(sample_rate=16000, **kwargs)
    assert "\n" not in str(e.value)


def test_log_mel_floor():
    """Silence is log(log_floor), not -inf."""
    out = audio.log_mel(np.zeros(1600), 16000, log_floor=1e-5)
    np.testing.assert_array_equal(out, np.full((11, 64), np.log(1e-5)))


# -- read_audio ----------------------------------------------------------------------------------------------------


def _tone(rate: int, seconds: float, hz: float = 440.0, amp: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    wave = amp * np.sin(2 * np.pi * hz * t)
    return wave if channels == 1 else np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1)


@pytest.mark.parametrize("fmt,subtype,exact", [("WAV", "PCM_16", True), ("FLAC", "PCM_16", True),
                                               ("WAV", "PCM_24", False), ("WAV", "FLOAT", False),
                                               ("OGG", "VORBIS", None)])
def test_read_audio_round_trip(tmp_path, fmt, subtype, exact):
    """A file written by soundfile reads back as float32 mono at its rate, from its path and from its bytes."""
    wave = _tone(16000, 0.5)
    path = tmp_path / f"tone.{fmt.lower()}"
    if subtype == "PCM_16":
        sf.write(path, audio.to_int16(wave), 16000, format=fmt, subtype=subtype)
    else:
        sf.write(path, wave, 16000, format=fmt, subtype=subtype)
    got = audio.read_audio(path, sample_rate=16000)
    assert got.dtype == np.float32 and got.shape == wave.shape
    if exact:  # int16 PCM: soundfile's scaling is to_int16's exact inverse
        np.testing.assert_array_equal(got, audio.to_int16(wave) / np.float32(32768))
    elif exact is False:
        np.testing.assert_allclose(got, wave, atol=1e-6)
    else:  # lossy Vorbis: the tone survives
        assert np.sqrt(np.mean((got - wave) ** 2)) < 0.01
    np.testing.assert_array_equal(audio.read_audio(path.read_bytes(), sample_rate=16000), got)


def test_read_audio_resamples(tmp_path):
    """22.05 kHz -> 16 kHz with soxr: the length scales by 16000 / 22050 and a 440 Hz tone stays at 440 Hz."""
    path = tmp_path / "tone22k.wav"
    sf.write(path, _tone(22050, 1.0, hz=440.0), 22050, subtype="FLOAT")
    got = audio.read_audio(path, sample_rate=16000)
    assert got.dtype == np.float32 and abs(len(got) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(got[:16000] * np.hanning(16000)))  # 1 s -> 1 Hz bins
    assert np.argmax(spectrum) == 440
    np.testing.assert_allclose(np.max(np.abs(got[2000:-2000])), 0.5, rtol=1e-3)  # amplitude kept away from the edges


def test_read_audio_stereo(tmp_path):
    """Two channels are refused naming the file and --downmix; with downmix=True they are averaged."""
    stereo = _tone(16000, 0.25, channels=2).astype(np.float32)
    path = tmp_path / "x.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    with pytest.raises(audio.AudioError) as e:
        audio.read_audio(path, sample_rate=16000, name="x.wav")
    assert str(e.value) == "x.wav has 2 channels; mono expected: pass downmix=True (--downmix) to average them"
    np.testing.assert_allclose(audio.read_audio(path, sample_rate=16000, downmix=True), stereo.mean(axis=1),
                               atol=1e-7)


def _riff_wave(format_tag: int, *, bits: int = 16, data: bytes = b"\x00" * 320, sample_rate: int = 16000) -> bytes:
    """A RIFF/WAVE file: a 16-byte 'fmt ' chunk with `format_tag`, then a 'data' chunk."""
    align = bits // 8
    fmt = struct.pack("<HHIIHH", format_tag, 1, sample_rate, sample_rate * align, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _float_wav_with_nan() -> bytes:
    wave = np.zeros(1600, np.float32)
    wave[800] = np.nan
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


# case -> (file contents (None: no file), read_audio keyword arguments, what the message must say)
BAD_INPUTS = {
    "missing": (None, {}, "cannot open: No such file or directory"),
    "random_bytes": (np.random.default_rng(0).bytes(4000), {}, "not a readable audio file"),
    "text_named_wav": (b"this is a text file, not audio\n" * 10, {}, "not a readable audio file"),
    "truncated_header": (_riff_wave(1)[:30], {}, "not a readable audio file"),
    "zero_bytes": (b"", {}, "not a readable audio file"),
    "unknown_format_tag": (_riff_wave(0x1234), {}, "unsupported audio format (WAV format tag 0x1234, 16-bit"),
    "float16_wav": (_riff_wave(3, bits=16), {}, "unsupported audio format (WAV format tag 0x0003, 16-bit"),
    "empty": (_riff_wave(1, data=b""), {}, "is empty (0 audio frames)"),
    "nan_samples": (_float_wav_with_nan(), {}, "1 non-finite sample (NaN or inf), first at 0.0500 s"),
    "too_short": (_riff_wave(1, data=b"\x00\x00" * 80), dict(min_samples=400),
                  ": 0.0050 s (80 samples at 16000 Hz) is shorter than one analysis frame (400 samples)"),
}


@pytest.mark.parametrize("case,as_bytes", [(case, as_bytes) for case in BAD_INPUTS for as_bytes in (False, True)
                                           if BAD_INPUTS[case][0] is not None or not as_bytes])
def test_read_audio_bad_input(tmp_path, case, as_bytes):
    """Every bad input is an AudioError with a one-line message that names the file (path, or the name given)."""
    contents, kwargs, says = BAD_INPUTS[case]
    path = tmp_path / "x.wav"
    if contents is not None:
        path.write_bytes(contents)
    if as_bytes:
        source, name = contents, "upload:x.wav"
    else:
        source, name = path, str(path)
    with pytest.raises(audio.AudioError) as e:
        audio.read_audio(source, sample_rate=16000, name=name if as_bytes else None, **kwargs)
    message = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "\n" not in message and name in message and says in message, message
    if case == "unknown_format_tag":
        assert "libsndfile:" in message  # soundfile's reason, briefly


def test_read_audio_names_bytes_by_default():
    """Bytes without a name are called <bytes>."""
    with pytest.raises(audio.AudioError, match=r"^<bytes>: not a readable audio file"):
        audio.read_audio(b"not audio at all", sample_rate=16000)


def test_read_audio_too_short_exact_message(tmp_path):
    """The too-short message, word for word (after resampling: 240 samples at 48 kHz -> 80 at 16 kHz)."""
    path = tmp_path / "x.wav"
    sf.write(path, np.zeros(240, np.int16), 48000)
    with pytest.raises(audio.AudioError) as e:
        audio.read_audio(path, sample_rate=16000, name="x.wav", min_samples=400)
    assert str(e.value) == ("x.wav: 0.0050 s (80 samples at 16000 Hz) is shorter than one analysis frame "
                            "(400 samples)")


def test_read_audio_alsa_recordings():
    """Every alsa-utils recording decodes (48 kHz mono int16) and resamples to 16 kHz at the right length."""
    files = sorted(glob.glob("/usr/share/sounds/alsa/*.wav"))
    if not files:
        pytest.skip("/usr/share/sounds/alsa/*.wav missing: apt-get install alsa-utils")
    for path in files:
        native = audio.read_audio(path, sample_rate=48000)
        resampled = audio.read_audio(path, sample_rate=16000, min_samples=400)
        assert native.dtype == resampled.dtype == np.float32 and np.abs(native).max() <= 1.0
        assert abs(len(resampled) - len(native) / 3) <= 1, path


# -- to_int16 ------------------------------------------------------------------------------------------------------


def test_to_int16_clips_and_rounds():
    """x * 32768 rounded to nearest (ties to even), clipped to [-32768, 32767]; non-finite input is refused."""
    x = np.array([0.0, 1.0, -1.0, 2.0, -3.0, 0.5, -0.5, 1 / 32768, 0.4 / 32768, 0.6 / 32768, -0.6 / 32768,
                  0.5 / 32768, 1.5 / 32768, 32766.5 / 32768])
    want = [0, 32767, -32768, 32767, -32768, 16384, -16384, 1, 0, 1, -1, 0, 2, 32766]
    got = audio.to_int16(x)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(audio.to_int16(x.astype(np.float32)), want)
    with pytest.raises(ValueError, match="non-finite"):
        audio.to_int16(np.array([0.0, np.nan]))


def test_module_is_light():
    """Importing mmjax.data.audio loads neither jax nor tensorflow (host tools and data workers import it)."""
    code = ("import sys, mmjax.data.audio; bad = [m for m in ('jax', 'tensorflow', 'librosa') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
