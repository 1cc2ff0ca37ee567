"""How a command ends: the exit statuses, the one `error:` line, and the exit itself.

Shared by every entry point (`jdistill.main`, `jdistill.evaluate`, `jdistill.predict`,
`scripts/compare.py`), none of which defines its flags here.
"""

import os
import sys
import traceback

from absl import logging

# 0: finished or preempted (SIGTERM / SIGINT; the same command goes on), 1: failed, 2: a bad
# flag or config override, 130: a second SIGINT.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def report(e, heartbeat_s=100):
    """Logs how a run ended when it did not finish; returns the exit status.

    Errors meant for the user (a bad config, path or data, a diverged loss: ValueError, OSError
    and the exception classes of this package) get their message only; anything else is a bug
    and gets its traceback first. Either way the last line of stderr is `error: <cause>`.
    """
    stopping = sys.modules.get("jdistill.stopping")  # absent: the error came before it ran
    if stopping is not None and isinstance(e, stopping.Preempted | stopping.Stopped):
        logging.warning("%s", e)
        return EXIT_OK
    if isinstance(e, SystemExit):  # sys.exit() somewhere below: keep its status
        if e.code is None or isinstance(e.code, int):
            return e.code or EXIT_OK
        print(f"error: {e.code}", file=sys.stderr)
        return EXIT_ERROR
    exc_info = (type(e), e, e.__traceback__)
    if isinstance(e, KeyboardInterrupt):
        # A second SIGINT (the first stops in one line, see `stopping`): what is on disk stays.
        cause = "interrupted by SIGINT; what was written is kept, the same command goes on"
        code = EXIT_INTERRUPTED
        logging.debug("interrupted here", exc_info=exc_info)
    elif lost := _lost_process_cause(e, heartbeat_s):
        cause, code = lost, EXIT_ERROR
        logging.debug("raised here", exc_info=exc_info)
    elif _for_the_user(e):
        lines = _message_lines(e)
        cause, code = lines[0], EXIT_ERROR
        if len(lines) > 1:  # e.g. every mismatched key of a checkpoint: all in the log
            logging.error("%s", "\n".join(lines))
            cause += f" [{len(lines) - 1} more lines in the log above]"
        logging.debug("raised here", exc_info=exc_info)
    else:
        logging.error("unexpected error:\n%s", "".join(traceback.format_exception(e)).rstrip())
        lines = _message_lines(e)
        cause, code = f"{type(e).__name__}: {lines[0]}", EXIT_ERROR
    print(f"error: {cause}", file=sys.stderr)
    return code


def _lost_process_cause(e, heartbeat_s):
    """The one-line cause of a multi-process run's failure that another process's loss caused,
    naming the lost processes once the runtime knows them (within the heartbeat timeout); None
    for any other error."""
    if "jax" not in sys.modules:  # failed before JAX was imported: nothing distributed
        return None
    from jdistill import multihost  # noqa: PLC0415

    if not multihost.is_runtime_failure(e):
        return None
    lost = multihost.lost_processes(heartbeat_s + 10)
    who = (
        f"process {', '.join(map(str, lost))} of the run stopped answering"
        if lost
        else "another process of the run failed or the network dropped"
    )
    return f"{who}; this process stops too ({_message_lines(e)[0][:200]})"


def _for_the_user(e):
    return isinstance(e, ValueError | OSError) or type(e).__module__.startswith("jdistill.")


def _message_lines(e):
    lines = [ln.rstrip() for ln in str(e).splitlines() if ln.strip()]
    return lines or [type(e).__name__]


def run(body):
    """Runs `body()` and ends the process: 0 when it returns, else `report`'s status after one
    `error: <cause>` line. Never returns."""
    try:
        body()
        code = EXIT_OK
    except BaseException as e:  # noqa: BLE001 (every way out is reported in one line)
        code = report(e)
    sys.stdout.flush()
    exit_process(code)


def exit_process(code):
    """Flushes the logs and ends the process without interpreter teardown.

    A failed run once hung in about 1 exit in 4 after printing its error: the main thread sat
    in the XLA CPU client's thread-pool destructor, which teardown runs while holding the
    Python lock and which waits for its worker threads. A worker that still has to free a host
    buffer of a step in flight when the error unwound needs that lock to release the numpy
    array behind it (and Python 3.11 ends any thread taking the lock during finalisation), so
    the wait never ends. `train.run` now waits for the device, stops the input threads,
    finishes the checkpoint writes and closes the event writer; skipping teardown on top of
    that loses nothing and leaves no destructor to block. `jax.distributed.shutdown` is called
    on success so the other processes of a multi-host run see this one leave cleanly.
    """
    if code == EXIT_OK:
        import jax  # noqa: PLC0415

        jax.distributed.shutdown()
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
