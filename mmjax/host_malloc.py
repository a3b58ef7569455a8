"""Run our programs under TCMalloc, so XLA:CPU's per-step buffers are not page-faulted in again every step.

XLA:CPU allocates one block for all of a compiled step's temporaries on every execution (737 MiB for the 192-wide
CLIP step at batch 128) and frees it when the step ends. glibc's malloc serves a block that large from a fresh mmap
(the request comes from one of XLA's worker threads, whose heaps stop at 64 MiB) and gives it back with munmap, so
each step faults ~200,000 new 4 KiB pages in, zeroed by the kernel, inside its matmuls and fusions. TCMalloc keeps
freed spans for reuse: no faults, and that step ran 1.2-1.3x faster on the 2-core CPU machine (experiments/README.md,
"profile_step.py"). glibc's own settings cannot fix it from inside the process: one arena (so XLA's threads
allocate from the main heap, which can keep the block) removed the faults but made the step slower (heap lock).

`python -m mmjax.<command>` (and the benchmarks) re-execute themselves once with TCMalloc in LD_PRELOAD when the
library is installed (Debian / Ubuntu: `apt-get install libtcmalloc-minimal4`) and not loaded yet; without it they
run as before. MMJAX_TCMALLOC=0 turns this off. The trainer logs which allocator a run got.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Mapping, Optional, Sequence

LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # gperftools' sonames, minimal first (no heap profiler)
_REEXEC_MARK = "MMJAX_TCMALLOC_REEXEC"


def tcmalloc_library() -> Optional[str]:
    """The installed TCMalloc's soname (what LD_PRELOAD takes), or None."""
    if not sys.platform.startswith("linux"):
        return None
    for name in LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def loaded_allocator() -> str:
    """"tcmalloc" / "jemalloc" when this process has one mapped, else "system"."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def preload_environment(environ: Mapping[str, str], library: Optional[str]) -> Optional[dict[str, str]]:
    """The environment to re-execute with (LD_PRELOAD += library), or None when nothing should change: no
    library, MMJAX_TCMALLOC=0, another allocator already preloaded, or this process is the re-execution."""
    if library is None or environ.get("MMJAX_TCMALLOC", "1") == "0" or environ.get(_REEXEC_MARK):
        return None
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("malloc", "jemalloc")):  # tcmalloc / jemalloc / mimalloc chosen already
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{library} {preload}".strip()
    # Keep freed spans (by default TCMalloc gives some back now and then, and the next step faults them in again);
    # and no line on stderr for every allocation over 1 GiB, which a big model's step makes several of.
    env.setdefault("TCMALLOC_RELEASE_RATE", "0")
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**50))
    env[_REEXEC_MARK] = "1"
    return env


def reexec_with_tcmalloc(argv: Optional[Sequence[str]] = None) -> None:
    """Replaces this process by the same command line under TCMalloc when preload_environment says so.

    Call before anything else runs (the new process starts from scratch). argv defaults to sys.orig_argv.
    """
    env = preload_environment(os.environ, tcmalloc_library())
    if env is None or loaded_allocator() != "system":
        return
    argv = list(argv if argv is not None else sys.orig_argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)

