"""Shared pytest fixtures: 8 fake CPU devices, configs by file name, the embedded dataset (built once, offline)."""

import os

# Sharding tests compare 8 devices with 1; XLA reads this flag once, before jax is first imported.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit it
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


@contextlib.contextmanager
def _building(data_dir: str):
    """Hold an exclusive lock on data_dir while building into it: pytest-xdist workers share it (one builds, the
    others wait and then find it built)."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".mmjax_test_build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _shared_dir(tmp_path_factory, name: str) -> str:
    """A directory of this test run that every pytest-xdist worker sees (`pytest -n 2`: the run's base temp dir,
    above each worker's own), so what a session fixture builds there is built once per run, under `_building`."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / name
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def embedded_data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir holding the prepared easy_vqa_captions dataset (+ its tokenizer.json).

    Built once per test run into a temporary directory (~15 s). Set MMJAX_TEST_DATA_DIR to build into / reuse
    a fixed directory instead (faster repeated local runs).
    """
    from mmjax.data import easy_vqa_captions, sources  # pylint: disable=import-outside-toplevel

    data_dir = os.environ.get("MMJAX_TEST_DATA_DIR") or _shared_dir(tmp_path_factory, "tfds")
    with _building(data_dir):
        sources.open_source("easy_vqa", easy_vqa_captions.source_config(data_dir=data_dir))
    return data_dir


@pytest.fixture(scope="session")
def vqa_data_dir(embedded_data_dir) -> str:
    """A TFDS data_dir holding the embedded VQA questions (easy_vqa_questions, ~40 s to build) beside the embedded
    dataset."""
    from mmjax.data import sources, vqa  # pylint: disable=import-outside-toplevel

    with _building(embedded_data_dir):
        sources.open_source("easy_vqa", vqa.easy_vqa_source_config(data_dir=embedded_data_dir))
    return embedded_data_dir


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
def tiny_run(load_config, tmp_path_factory):
    """tiny_run("clip.py") -> (workdir, config): a 2-step run of that config as a user starts it, shrunk to seconds
    (one-layer towers, batch 16 from the first 64 training examples, no evaluators, the last step checkpointed),
    trained once per test run (by whichever worker asks first); the config is as loaded (before the trainer
    resolved its data-dependent fields). Tests only read the workdir; copy it to change it."""
    import copy  # pylint: disable=import-outside-toplevel

    from mmjax import train as trainer  # pylint: disable=import-outside-toplevel

    runs = {}
    shared = _shared_dir(tmp_path_factory, "tiny_runs")

    def get(filename: str):
        if filename not in runs:
            c = load_config(filename)
            for tower in ("image", "text"):
                if tower in c.model and "depth" in c.model[tower]:
                    c.model[tower].depth = 1
            if "depth" in c.model:
                c.model.depth = 1
            c.data.sources.easy_vqa.train_split = "train[:64]"  # in memory: decode only what 2 steps read
            c.train.update(dict(batch_size=16, steps=2, log_every=1))
            c.optimizer.warmup_steps = 1
            c.checkpoint.update(dict(every_steps=1000, async_save=False))  # the final step is always saved
            c.evals = {}
            workdir = os.path.join(shared, filename.replace(".py", "_run"))
            runs[filename] = workdir, copy.deepcopy(c)
            with _building(shared):
                if not os.path.exists(os.path.join(workdir, "trained")):
                    shutil.rmtree(workdir, ignore_errors=True)  # a worker that died mid-training left it
                    trainer.train_and_evaluate(c, workdir)
                    open(os.path.join(workdir, "trained"), "w").close()
        return runs[filename]

    return get


@pytest.fixture(scope="session")
def spoken_data_dir(embedded_data_dir) -> str:
    """A TFDS data_dir holding spoken_easy_vqa/tiny (96 train / 48 test images spoken by espeak-ng, ~10 s to
    build; reused from MMJAX_TEST_DATA_DIR when set). Skips, saying why, where espeak-ng is not installed."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): the spoken-caption tests need it")
    from mmjax.data import sources, spoken_captions  # pylint: disable=import-outside-toplevel

    with _building(embedded_data_dir):
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
