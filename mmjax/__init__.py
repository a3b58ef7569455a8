"""mmjax: multimodal pretraining in JAX/Flax (see README.md)."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# `python -m mmjax.<command>` (argv[0] is "-m" while the package imports): before anything else runs, re-execute
# under TCMalloc where it is installed (see host_malloc: XLA:CPU steps stop page-faulting their buffers in).
if _sys.argv[:1] == ["-m"]:
    from mmjax import host_malloc as _host_malloc

    _host_malloc.reexec_with_tcmalloc()


def _verbose(argv: list) -> bool:
    """Whether the command line asks for absl verbosity >= 1 (--verbosity=1, -v 1, ...)."""
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in ("--verbosity", "-v", "--v"):
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            if value.lstrip("-").isdigit() and int(value) >= 1:
                return True
    return False


class _QuietTensorflowImport:
    """A one-shot import hook: the first `import tensorflow` runs with file descriptor 2 captured, because its C++
    start-up notices (oneDNN, CPU features) print at import, before any flag is parsed and whatever
    TF_CPP_MIN_LOG_LEVEL says. A failed import shows what it printed. Commands that never touch TensorFlow pay
    nothing."""

    def find_spec(self, name, path=None, target=None):  # noqa: D102  (importlib's MetaPathFinder protocol)
        if name != "tensorflow":
            return None
        _sys.meta_path.remove(self)
        import importlib.util  # pylint: disable=import-outside-toplevel

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _CapturingLoader(spec.loader)
        return spec


class _CapturingLoader:
    """Wraps a module loader: exec_module runs with fd 2 redirected to a temporary file."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):  # noqa: D102
        return self._loader.create_module(spec)

    def exec_module(self, module):  # noqa: D102
        import tempfile  # pylint: disable=import-outside-toplevel

        _sys.stderr.flush()
        saved = _os.dup(2)
        with tempfile.TemporaryFile() as capture:
            _os.dup2(capture.fileno(), 2)
            try:
                self._loader.exec_module(module)
            except BaseException:
                _os.dup2(saved, 2)
                capture.seek(0)
                _sys.stderr.write(capture.read().decode(errors="replace"))
                raise
            finally:
                _os.dup2(saved, 2)
                _os.close(saved)


# Our command-line programs (python -m mmjax.train, ...: argv[0] is still "-m" while the package imports) start
# without TensorFlow's start-up notices and its C++ INFO lines unless --verbosity >= 1 asks for everything.
if _sys.argv[:1] == ["-m"] and "tensorflow" not in _sys.modules and not _verbose(_sys.argv):
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    _sys.meta_path.insert(0, _QuietTensorflowImport())
