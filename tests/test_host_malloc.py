"""host_malloc: our programs re-execute under TCMalloc, and XLA:CPU's freed step buffers then stop page-faulting
(counts of page faults, not times: the speed-up is measured in experiments/)."""

import json
import os
import subprocess
import sys

import pytest

from mmjax import host_malloc

LIB = "libtcmalloc_minimal.so.4"


def test_preload_environment_adds_tcmalloc_once():
    env = host_malloc.preload_environment({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, LIB)
    assert env["LD_PRELOAD"] == f"{LIB} libfoo.so" and env["PATH"] == "/bin"
    assert host_malloc.preload_environment(env, LIB) is None  # the re-executed process does not loop


@pytest.mark.parametrize("environ,library", [
    ({}, None),  # not installed: run as before
    ({"MMJAX_TCMALLOC": "0"}, LIB),  # turned off
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, LIB),  # the user chose an allocator
    ({"LD_PRELOAD": "libtcmalloc.so.4"}, LIB),
])
def test_preload_environment_leaves_other_choices(environ, library):
    assert host_malloc.preload_environment(environ, library) is None


# The `python -m mmjax.<command>` start-up (argv[0] is "-m" while the package imports), then a jitted function
# whose two [4096, 8192] float32 temporaries (128 MiB each) are freed after every call: the allocator in use and the
# minor page faults of each of 20 calls.
CHILD = r"""
import sys
sys.argv[:1] = ["-m"]
import json, resource
import mmjax
from mmjax import host_malloc
import jax, jax.numpy as jnp

@jax.jit
def f(x, w):
    h = jnp.tanh(x @ w)
    return jnp.sum(jnp.sin(h) * h, axis=1)

x, w = jnp.ones((4096, 256)), jnp.full((256, 8192), 1e-3)
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"allocator": host_malloc.loaded_allocator(), "faults": faults}))
"""


def _child(tcmalloc: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "XLA_FLAGS")}
    env["MMJAX_TCMALLOC"] = tcmalloc
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True,
                         timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_malloc.tcmalloc_library() is None,
                    reason="TCMalloc is not installed (apt-get install libtcmalloc-minimal4; .ci/run installs it)")
def test_commands_run_under_tcmalloc_and_stop_faulting_freed_buffers():
    system, tcmalloc = _child("0"), _child("1")
    assert (system["allocator"], tcmalloc["allocator"]) == ("system", "tcmalloc")
    pages = 128 * 2**20 // 4096  # one temporary's 4 KiB pages
    faulted = {name: sum(n > pages // 2 for n in run["faults"][5:]) for name, run in
               (("system", system), ("tcmalloc", tcmalloc))}
    # glibc maps every call's temporaries afresh and faults them in; TCMalloc reuses the freed spans (its heap
    # may still grow once or twice while the two temporaries settle into place).
    assert faulted["system"] == 15, system["faults"]
    assert faulted["tcmalloc"] <= 2, tcmalloc["faults"]
