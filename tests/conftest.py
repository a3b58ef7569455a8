"""Shared pytest fixtures: 8 fake CPU devices, configs by file name, the embedded dataset (built once, offline)."""

import os

# Sharding tests compare 8 devices with 1; XLA reads this flag once, before jax is first imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="session")
def embedded_data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir holding the prepared easy_vqa_captions dataset (+ its tokenizer.json).

    Built once per test session into a temporary directory (~15 s). Set MMJAX_TEST_DATA_DIR to build into / reuse
    a fixed directory instead (faster repeated local runs).
    """
    from mmjax.data import easy_vqa_captions, sources  # pylint: disable=import-outside-toplevel

    data_dir = os.environ.get("MMJAX_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
    sources.open_source("easy_vqa", easy_vqa_captions.source_config(data_dir=data_dir))
    return data_dir


@pytest.fixture
def embedded_data_config(embedded_data_dir):
    """A fresh pipeline.embedded_data_config() reading the session's embedded dataset (safe to modify)."""
    from mmjax.data import pipeline  # pylint: disable=import-outside-toplevel

    return pipeline.embedded_data_config(data_dir=embedded_data_dir)


@pytest.fixture(scope="session")
def load_config(embedded_data_dir):
    """load_config('clip.py', 'tiny') -> the ConfigDict that `--config=configs/clip.py:tiny` gives, its embedded
    data source (if any) reading the session's prepared copy."""

    def load(filename: str, arg: str | None = None):
        spec = importlib.util.spec_from_file_location(f"mmjax_test_config_{filename}", CONFIG_DIR / filename)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(arg) if arg is not None else module.get_config()
        if "easy_vqa" in config.data.sources:
            config.data.sources.easy_vqa.data_dir = embedded_data_dir
        return config

    return load


@pytest.fixture(scope="session")
def spoken_data_dir(embedded_data_dir) -> str:
    """A TFDS data_dir holding spoken_easy_vqa/tiny (96 train / 48 test images spoken by espeak-ng, ~10 s to
    build; reused from MMJAX_TEST_DATA_DIR when set). Skips, saying why, where espeak-ng is not installed."""
    import shutil  # pylint: disable=import-outside-toplevel

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): the spoken-caption tests need it")
    from mmjax.data import sources, spoken_captions  # pylint: disable=import-outside-toplevel

    sources.open_source("spoken", spoken_captions.source_config(name="spoken_easy_vqa/tiny",
                                                                data_dir=embedded_data_dir))
    return embedded_data_dir


@pytest.fixture(scope="session")
def load_audio_config(load_config, spoken_data_dir):
    """load_audio_config('audio_image.py') -> that config reading spoken_easy_vqa/tiny (the session's copy)."""

    def load(filename: str, arg: str | None = None):
        config = load_config(filename, arg)
        config.data.sources.spoken.update(dict(name="spoken_easy_vqa/tiny", data_dir=spoken_data_dir))
        return config

    return load
