"""SIGTERM and SIGINT in every phase of a run: one rule, one line.

A run is a sequence of phases (preparing the data, building the models, evaluating the teacher,
training, the final evaluation). A signal in any of them stops the run promptly and ends it with
`Stopped` (or, at a training step boundary, `Preempted`), whose message says what was kept and
how to go on; `main` logs it and exits 0, as for any preemption. Only training defers the stop:
the handler records the signal and the loop saves a checkpoint at the next step boundary, so no
step is lost. Everywhere else there is nothing to save (or it is already on disk), so the
handler raises at once in the main thread.

A second SIGINT raises KeyboardInterrupt at once (exit 130), for a user who will not wait.
Python runs signal handlers in the main thread only, between bytecodes, so a phase blocked in
one long C++ call (an XLA compile, a TensorFlow op) would stop only when that call returns. A
watcher thread, woken by the signal itself (`signal.set_wakeup_fd`), ends such a phase: when
the handler has not run `GRACE_S` seconds after a signal in a phase that does not defer, it logs
the same line and exits the process with 0 (nothing of such a phase is lost). A run started from
another thread installs nothing and keeps the default behaviour.
"""

import contextlib
import os
import signal
import socket
import sys
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):  # noqa: N818 (not an error: a requested stop, the run resumes)
    """SIGTERM or SIGINT stopped the run; the message says what was kept and how to go on."""

    def __init__(self, message, step=None):
        super().__init__(message)
        self.step = step


class Stopped(BaseException):  # noqa: N818 (a requested stop, like KeyboardInterrupt)
    """A signal stopped a phase at once; the message says what was kept and how to go on.

    A BaseException, as KeyboardInterrupt is: the handler raises it wherever the main thread
    is, and a library's `except Exception` there (an input iterator, a retry loop) must not
    swallow it. A cold run once lost one that way and went on into training.
    """


def saved_at(signame, step, directory):
    """The `Preempted` of a stop at a training step boundary after its checkpoint was saved."""
    return Preempted(
        f"preempted by {signame}: saved step {step} in {directory}; "
        "re-run the same command to resume",
        step,
    )


# Seconds a non-deferring phase may stay inside one C++ call after a signal before the watcher
# ends the process: longer than any Python-level unwind needs, far shorter than the 30 s a
# scheduler (Kubernetes, Slurm) usually waits before SIGKILL.
GRACE_S = 5.0


class Signals:
    """The run's stop signals: installed once per process (nesting is a no-op), with a phase.

    `phase(what, kept)` names the current phase; a signal in it raises `Stopped` saying
    "stopped by SIG while <what>; <kept>". `phase(..., deferred=True)` only records the signal
    (the training loop polls `agreed`).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signame = None
        self._previous = {}
        self._depth = 0
        self._what = "starting"
        self._kept = "re-run the same command to go on"
        self._deferred = False
        self._watched = True  # the watcher may end the process in this phase
        self._handled = threading.Event()  # the handler ran for the recorded signal
        self._wakeup = None  # (read end, write end, previous wakeup fd) while installed

    # ------------------------------------------------------------------ install
    def install(self):
        """Installs the handlers (main thread only); returns whether this call installed them."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._depth += 1
        if self._depth > 1:
            return False
        self.signame = None
        self._handled.clear()
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        read, write = socket.socketpair()
        write.setblocking(False)
        previous = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        self._wakeup = (read, write, previous)
        threading.Thread(target=self._watch, args=(read,), daemon=True, name="stop-watch").start()
        return True

    def restore(self):
        """Undoes the matching `install` (the outermost one puts the previous handlers back)."""
        if threading.current_thread() is not threading.main_thread() or self._depth == 0:
            return
        self._depth -= 1
        if self._depth:
            return
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is closest.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}
        read, write, previous = self._wakeup
        signal.set_wakeup_fd(previous)
        self._wakeup = None
        write.close()  # the watcher's recv returns b"" and it closes the read end

    @contextlib.contextmanager
    def installed(self):
        self.install()
        try:
            yield self
        finally:
            self.restore()

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def phase(self, what, kept, *, deferred=False, watched=True):
        """Runs the body as the phase `what` (e.g. 'evaluating the teacher').

        Args:
          what: the phase, as the stop line names it.
          kept: what is on disk and how to go on, as the stop line says it.
          deferred: record a signal instead of raising (the caller stops at a safe point).
          watched: the watcher may end the process when the handler cannot run; False where
            the caller saves something once the raise reaches it.
        """
        saved = (self._what, self._kept, self._deferred, self._watched)
        self._what, self._kept = what, kept
        self._deferred, self._watched = deferred, watched and not deferred
        try:
            if self.signame is not None and not deferred:
                raise self._stop()  # a signal recorded by a deferred phase just before
            yield
        finally:
            self._what, self._kept, self._deferred, self._watched = saved

    def _stop(self):
        return Stopped(f"stopped by {self.signame} while {self._what}; {self._kept}")

    def _handle(self, signum, frame):
        del frame
        self._handled.set()
        name = signal.Signals(signum).name
        if self.signame is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signame = name
        if self._deferred:
            logging.warning(
                "%s received: saving a checkpoint when this step ends (SIGINT again aborts)",
                name,
            )
            return
        raise self._stop()

    def _watch(self, read):
        """Ends the process when a signal's handler cannot run in a phase that does not defer."""
        while True:
            try:
                got = read.recv(64)
            except OSError:
                got = b""
            if not got:  # `restore` closed the write end
                read.close()
                return
            for signum in got:
                if signum not in self.SIGNALS:  # another handler's signal
                    continue
                if self._handled.wait(GRACE_S) or not self._watched:
                    continue
                # The main thread is inside one C++ call: say what the handler would have said.
                if self.signame is None:
                    self.signame = signal.Signals(signum).name
                logging.warning("%s", self._stop())
                logging.flush()
                sys.stderr.flush()
                os._exit(0)

    # ------------------------------------------------------------------ training
    def agreed(self, poll):
        """Whether training stops at this step.

        One process decides alone, at every step. Several must stop at the same step, as saving
        is collective: they compare flags at `poll` steps only (the log steps, where the host
        already waits for the device), so a signal on any of them stops them all there.
        """
        requested = self.signame is not None
        if jax.process_count() == 1:
            return requested
        if not poll:
            return False
        anyone = bool(multihost_utils.process_allgather(np.int32(requested)).max())
        if anyone and not requested:
            self.signame = "a signal to another process"
        return anyone


# The process's one instance: `main` installs it before anything slow, `train.run` again (a
# no-op then; it installs it for callers that run it directly).
SIGNALS = Signals()
