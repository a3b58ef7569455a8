"""mmjax: multimodal pretraining in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="JAX/Flax research codebase for multimodal (vision, language, speech) pretraining.",
    packages=find_packages(include=["mmjax", "mmjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.6",
        "ml_collections>=1.0",
        "einops>=0.8",
        "chex>=0.1.88",
        "absl-py>=2.1",
        "tokenizers>=0.20",
        "easy-vqa==1.0",
        "pillow>=10",
        "numpy>=1.26",
        "tensorboard>=2.16",
        "safetensors>=0.4",
        # TFDS catalogue builders (coco_captions, ...) import it to find their checksums when they prepare.
        "importlib_resources>=5",
        # The evaluation report's plots (python -m mmjax.evaluate).
        "matplotlib>=3.8",
        # Audio: decoding (libsndfile: WAV, FLAC, OGG, ...) and resampling in the builders and the input pipeline.
        "soundfile>=0.12",
        "soxr>=0.3",
    ],
    extras_require={
        # pycocoevalcap: the reference our caption metrics are tested against (its PTB tokenizer needs Java);
        # librosa: the reference of the log-mel frontend.
        "test": ["pytest>=8", "pytest-xdist>=3", "pycocoevalcap>=1.2", "librosa>=0.10"],
    },
)
