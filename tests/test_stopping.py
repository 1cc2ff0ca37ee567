"""SIGTERM and SIGINT in every phase of a run (jdistill/stopping.py): one line, prompt, exit 0.

The unit tests send signals to this process (main thread only); the CLI test stops a real run
during the teacher's step-0 evaluation, where the handler was once not installed yet.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from helpers.paths import REPO, cli_env

from jdistill import stopping


def _main_thread_only():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")


def _signal_self(sig):
    os.kill(os.getpid(), sig)
    time.sleep(0.2)  # the handler runs between bytecodes of the main thread


def test_a_signal_outside_training_raises_with_the_phase_and_what_was_kept():
    _main_thread_only()
    previous = signal.getsignal(signal.SIGTERM)
    signals = stopping.Signals()
    with signals.installed():
        with pytest.raises(stopping.Stopped) as e:
            with signals.phase("evaluating the teacher", "nothing was written; re-run"):
                _signal_self(signal.SIGTERM)
    assert str(e.value) == (
        "stopped by SIGTERM while evaluating the teacher; nothing was written; re-run"
    )
    assert signal.getsignal(signal.SIGTERM) is previous
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd was handed back too


def test_training_records_the_signal_and_a_second_sigint_aborts():
    _main_thread_only()
    previous = signal.getsignal(signal.SIGINT)
    signals = stopping.Signals()
    with signals.installed():
        with signals.phase("training", "", deferred=True):
            assert not signals.agreed(poll=False)
            _signal_self(signal.SIGTERM)
            assert signals.signame == "SIGTERM" and signals.agreed(poll=False)
            _signal_self(signal.SIGTERM)  # a second SIGTERM changes nothing
            with pytest.raises(KeyboardInterrupt):
                _signal_self(signal.SIGINT)
        # The next phase that does not defer stops at its start.
        with pytest.raises(stopping.Stopped, match="SIGTERM while evaluating"):
            with signals.phase("evaluating", "kept"):
                pass
    assert signal.getsignal(signal.SIGINT) is previous


def test_nested_installs_keep_the_outer_handler_until_the_outer_restore():
    _main_thread_only()
    signals = stopping.Signals()
    with signals.installed():
        handler = signal.getsignal(signal.SIGTERM)
        with signals.installed():
            assert signal.getsignal(signal.SIGTERM) == handler
        assert signal.getsignal(signal.SIGTERM) == handler  # still ours after the inner one
    assert signal.getsignal(signal.SIGTERM) != handler


# A phase blocked inside one C call (as in an XLA compile): the handler cannot run, the watcher
# ends the process after GRACE_S with the same line. pbkdf2 with 10^9 rounds runs for minutes in
# OpenSSL without returning to Python.
_STUCK = textwrap.dedent(
    """
    import hashlib, sys
    from absl import logging
    from jdistill import stopping
    logging.set_stderrthreshold("info")
    stopping.GRACE_S = 1.0
    with stopping.SIGNALS.installed(), stopping.SIGNALS.phase("compiling", "nothing lost"):
        print("ready", flush=True)
        hashlib.pbkdf2_hmac("sha256", b"p", b"s", 10**9)
    print("not reached", flush=True)
    """
)


def test_the_watcher_ends_a_phase_stuck_in_a_c_call_with_the_line():
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # inside pbkdf2 by now
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - sent < 20
    assert proc.returncode == 0, err
    assert "not reached" not in out
    assert "stopped by SIGTERM while compiling; nothing lost" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_sigterm_during_the_teacher_evaluation_stops_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jdistill.main",
            "--config=configs/frs_retinanet.py:runlocal",
            f"--workdir={workdir}",
            # 200 images: the evaluation outlasts the signal's way to the handler
            "--config.eval_max_images=0",
        ],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        deadline = time.monotonic() + 600
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if "evaluating the teacher" in line or time.monotonic() > deadline:
                break
        assert lines and "evaluating the teacher" in lines[-1], "\n".join(lines[-20:])
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines += rest.splitlines()
    assert proc.returncode == 0, "\n".join(lines[-30:])
    assert time.monotonic() - sent < 60
    assert "stopped by SIGTERM while evaluating the teacher; no step was trained" in lines[-1]
    assert not any("Traceback" in ln for ln in lines)
    steps = (
        [d for d in os.listdir(workdir / "checkpoints")]
        if (workdir / "checkpoints").exists()
        else []
    )
    assert not [d for d in steps if d.isdigit()]
