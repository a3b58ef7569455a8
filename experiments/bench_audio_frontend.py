"""Where should the log-mel frontend run? Times, in one process on the same machine, for one batch:

  device_frontend   the jitted log-mel + per-clip normalisation alone (what the audio tower adds to a step)
  step              the audio tower's jitted training step (forward + backward) on waveforms, frontend included
  host_numpy        mmjax.data.audio.log_mel on the host with numpy (float64, the reference), the whole batch
  host_tf           the same features with tf.signal on the host (float32), as a tf.data map would compute them

    python experiments/bench_audio_frontend.py [--batch=128] [--seconds=4] [--steps=5] [--out=FILE]

Median of --steps runs after one warm-up; writes JSON (experiments/results/bench_audio_frontend.json by default).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import audio as frontend
from mmjax.models.audio import AudioEncoder

CONFIGS = {
    # configs/common.py's audio tower (16-frame x 64-bin patches, 64 wide, 2 layers)
    "tiny": dict(patch_time=16, patch_freq=64, width=64, depth=2, heads=2, mlp_dim=256),
    # AST-base shapes (16 x 16 patches, 768 wide, 12 layers; AST overlaps its patches, this does not)
    "base": dict(patch_time=16, patch_freq=16, width=768, depth=12, heads=12, mlp_dim=3072, n_mels=128),
}


def median_time(fn, steps: int) -> float:
    """Median wall seconds of fn() over `steps` runs after one warm-up."""
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def host_tf_log_mel(waveform: np.ndarray, sample_rate: int, n_fft: int, hop: int, n_mels: int):
    """log-mel with tf.signal (centre-padded Hann STFT, the same Slaney filterbank) on the host."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    mel = tf.constant(frontend.mel_filterbank(sample_rate, n_fft, n_mels).astype(np.float32))
    x = tf.pad(tf.constant(waveform), [[0, 0], [n_fft // 2, n_fft // 2]])
    spec = tf.signal.stft(x, n_fft, hop, n_fft, window_fn=tf.signal.hann_window, pad_end=False)
    power = tf.math.real(spec) ** 2 + tf.math.imag(spec) ** 2
    return tf.math.log(tf.maximum(tf.matmul(power, mel), 1e-10)).numpy()


def bench(name: str, batch: int, seconds: float, steps: int) -> dict:
    """The four timings for one tower config."""
    fields = dict(CONFIGS[name])
    n_mels = fields.pop("n_mels", 64)
    tower = AudioEncoder(sample_rate=16000, n_mels=n_mels, time_masks=2, time_mask_width=20, freq_masks=2,
                         freq_mask_width=8, **fields)
    samples = int(seconds * 16000)
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal((batch, samples))).astype(np.float32)
    audio, length = jnp.asarray(wave), jnp.full((batch,), samples, jnp.int32)
    params = tower.init({"params": jax.random.key(0)}, audio[:1], length[:1])["params"]

    def loss(p, a, n, r):
        pooled, _ = tower.apply({"params": p}, a, n, train=True, rngs={"dropout": r})
        return jnp.mean(pooled ** 2)

    grad = jax.jit(jax.grad(loss))
    spec = jax.jit(lambda a, n: tower.spectrogram(a, n))
    out = {
        "device_frontend_s": median_time(lambda: jax.block_until_ready(spec(audio, length)), steps),
        "step_s": median_time(lambda: jax.block_until_ready(grad(params, audio, length, jax.random.key(1))), steps),
        "host_numpy_s": median_time(lambda: frontend.log_mel(wave, 16000, n_mels=n_mels), max(1, steps // 2)),
        "host_tf_s": median_time(lambda: host_tf_log_mel(wave, 16000, 400, 160, n_mels), steps),
    }
    out["frontend_share_of_step"] = out["device_frontend_s"] / out["step_s"]
    return {"config": name, "batch": batch, "seconds": seconds, "grid": tower.grid(samples), **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", default="tiny,base")
    parser.add_argument("--base_batch", type=int, default=8)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "bench_audio_frontend.json"))
    args = parser.parse_args()
    results = []
    for name in args.configs.split(","):
        batch = args.batch if name == "tiny" else args.base_batch
        results.append(bench(name, batch, args.seconds, args.steps))
        print(json.dumps(results[-1]), flush=True)
    record = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "device": str(jax.devices()[0]), "jax": jax.__version__, "results": results}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
