"""What makes a run safe to stop, kill and restart (used by mmjax/train.py):

    WorkdirLock    one run writes to a workdir at a time: WORKDIR/run.lock names the holder (host, pid); a second
                   run is refused in one line; the lock of a process that died on this host is taken over
    StopSignals    SIGTERM / SIGINT (a scheduler's or a preemption's notice, Ctrl-C) ask the trainer to finish the
                   current step, save a checkpoint, wait for it and exit with 128 + the signal number (143 / 130);
                   a second signal exits at once
    check_finite   a non-finite loss, gradient norm or parameter norm stops the run before that state is saved
"""
from __future__ import annotations

import atexit
import datetime
import json
import math
import os
import signal
import socket
import threading
from typing import Any

from absl import logging

LOCK_FILE = "run.lock"


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved: rerun the same "
                         f"command to resume")


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """WORKDIR/run.lock, created when constructed (process 0 only), removed by `release` (also at exit).

    A lock held by another live process, or by a process on another host (whose liveness cannot be checked from
    here), is refused with one line naming it; one left by a process that no longer exists on this host, or by
    this process, is taken over.
    """

    def __init__(self, workdir: str, *, process_index: int = 0):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.held = False
        if process_index != 0:
            return
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._holder()
            same_host = holder.get("host") == me["host"]
            pid = int(holder.get("pid", -1))
            if not same_host or (pid != me["pid"] and _alive(pid)):
                raise ValueError(f"workdir {workdir!r} is in use by another run (host {holder.get('host')}, pid "
                                 f"{pid}, since {holder.get('started')}); use another --workdir, or delete "
                                 f"{self.path} if that run is gone") from None
            logging.info("taking over %s from pid %d, which no longer runs", self.path, pid)
            tmp = f"{self.path}.{me['pid']}"
            with open(tmp, "w") as f:
                json.dump(me, f)
            os.replace(tmp, self.path)
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        self.held = True
        atexit.register(self.release)

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}  # a lock being written or left half-written: treated as another run's (refused)

    def release(self) -> None:
        """Removes the lock if this process holds it."""
        if self.held and self._holder().get("pid") == os.getpid():
            os.remove(self.path)
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class StopSignals:
    """Within the `with` block, SIGTERM and SIGINT set `signum` instead of killing the process; a second one exits
    at once (exit code 128 + signal). Outside the main thread (where handlers cannot be installed) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.signum is not None:
            os._exit(128 + signum)  # the second signal: no more waiting
        self.signum = signum
        logging.warning("received %s: finishing this step, saving a checkpoint, then exiting (send it again to "
                        "exit at once)", signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self, manager: Any = None, step: int | None = None) -> bool:
        """Whether to stop after this step: a signal here, or (several hosts) orbax's preemption sync point, where
        every host agrees on the step."""
        if self.signum is not None:
            return True
        if manager is not None and step is not None:
            import jax  # pylint: disable=import-outside-toplevel

            if jax.process_count() > 1:
                return bool(manager.reached_preemption(step))
        return False


def check_finite(metrics: dict, step: int, latest_checkpoint: int | None) -> None:
    """Raises FloatingPointError (one line) if the step's loss, gradient norm or parameter norm is not finite."""
    for name in ("loss", "grad_norm", "param_norm"):
        value = float(metrics.get(name, 0.0))
        if not math.isfinite(value):
            kept = f"step {latest_checkpoint}" if latest_checkpoint is not None else "none yet"
            raise FloatingPointError(f"{name} is {value} at step {step}: stopped before saving this state (latest "
                                     f"checkpoint: {kept}); lower optimizer.lr or check the data")
