"""Entry point: `python -m jdistill.main --config=configs/X.py[:arg] --workdir=DIR`.

Flags, logging and multi-host initialisation; then `train.run` (or the demo's three runs).

Exit status: 0 when the run finished or was preempted (SIGTERM / SIGINT: a checkpoint is saved
and the same command resumes), 1 when it failed, 2 for a bad flag or config override, 130 for
a second SIGINT. A failure ends stderr with one line, `error: <cause>`; errors that are not the
user's to fix (a bug) log their traceback above it, the others log it with --verbosity=1.
"""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes everything.")
flags.mark_flags_as_required(["config", "workdir"])
# More than one process (see README, "More than one machine"); each flag also reads the
# environment variable `multihost.ENV` names, so launchers can set them per process.
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    None,
    "Join a multi-process run (jax.distributed) before anything else; alone, JAX discovers a "
    "Cloud TPU or Slurm cluster. Env: JDISTILL_MULTIHOST=1.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for clusters JAX does not discover (plain GPU nodes). "
    "Env: JDISTILL_COORDINATOR_ADDRESS.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the run. Env: JDISTILL_NUM_PROCESSES."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 .. num_processes-1. Env: JDISTILL_PROCESS_ID."
)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for every process to join."
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout",
    100,
    "Seconds without a heartbeat after which a process counts as lost and the others stop.",
)

# Exit statuses (see the module docstring).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv):
    """Runs the config and ends the process with its exit status (never returns)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        _run()
        code = EXIT_OK
    except BaseException as e:  # noqa: BLE001 (every way out is reported in one line)
        code = report(e)
    _exit(code)


def _run():
    # TensorFlow is only used for tfds preparation: keep it off accelerators.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: PLC0415

    tf.config.set_visible_devices([], "GPU")
    from jdistill import multihost, train  # noqa: PLC0415 (after TF is fenced off)

    multihost.initialize_distributed(
        **_multihost_options(), timeout_s=_INIT_TIMEOUT.value, heartbeat_s=_HEARTBEAT.value
    )
    multihost.process_log_prefix()
    config = _CONFIG.value
    logging.info("config:\n%s", config)
    use_compilation_cache(_WORKDIR.value)
    if config.get("demo"):
        from jdistill import demo  # noqa: PLC0415

        demo.run(config, _WORKDIR.value)
    else:
        train.run(config, _WORKDIR.value)


def _multihost_options():
    """The multi-host flags, each falling back to its environment variable."""
    from jdistill import multihost  # noqa: PLC0415

    values = {
        "multihost": _MULTIHOST.value,
        "coordinator_address": _COORDINATOR.value,
        "num_processes": _NUM_PROCESSES.value,
        "process_id": _PROCESS_ID.value,
    }
    for key, value in values.items():
        env = os.environ.get(multihost.ENV[key], "")
        if value is None and env:
            values[key] = env
    if isinstance(values["multihost"], str):
        values["multihost"] = values["multihost"].strip().lower() in ("1", "true", "yes")
    for key in ("num_processes", "process_id"):
        if isinstance(values[key], str):
            try:
                values[key] = int(values[key])
            except ValueError:
                raise ValueError(
                    f"{multihost.ENV[key]}={values[key]!r}: must be an integer"
                ) from None
    return values


def use_compilation_cache(workdir):
    """Keeps XLA's compiled programs in $JAX_COMPILATION_CACHE_DIR, else <workdir>/compile_cache.

    A re-run (a resume, a preempted job, the next demo stage) then loads its step functions
    instead of compiling them again: every canvas of every detector costs seconds to minutes.
    The cache key covers the program, the compiler options and the jax version, so a stale
    entry is never used.
    """
    import jax  # noqa: PLC0415

    if jax.config.jax_compilation_cache_dir or not workdir:  # the environment's choice wins
        return
    # Created at the first compile, after the run has checked that the workdir is writable.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "compile_cache"))


def report(e):
    """Logs how a run ended when it did not finish; returns the exit status.

    Errors meant for the user (a bad config, path or data, a diverged loss: ValueError, OSError
    and the exception classes of this package) get their message only; anything else is a bug
    and gets its traceback first. Either way the last line of stderr is `error: <cause>`.
    """
    train = sys.modules.get("jdistill.train")  # absent: the error came before it could run
    if train is not None and isinstance(e, train.Preempted):
        logging.warning("%s", e)
        return EXIT_OK
    if isinstance(e, SystemExit):  # sys.exit() somewhere below: keep its status
        if e.code is None or isinstance(e.code, int):
            return e.code or EXIT_OK
        print(f"error: {e.code}", file=sys.stderr)
        return EXIT_ERROR
    exc_info = (type(e), e, e.__traceback__)
    if isinstance(e, KeyboardInterrupt):
        cause = "interrupted by SIGINT; the same command resumes from the last checkpoint"
        code = EXIT_INTERRUPTED
        logging.debug("interrupted here", exc_info=exc_info)
    elif lost := _lost_process_cause(e):
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


def _lost_process_cause(e):
    """The one-line cause of a multi-process run's failure that another process's loss caused,
    naming the lost processes once the runtime knows them (within the heartbeat timeout); None
    for any other error."""
    if "jax" not in sys.modules:  # failed before JAX was imported: nothing distributed
        return None
    from jdistill import multihost  # noqa: PLC0415

    if not multihost.is_runtime_failure(e):
        return None
    lost = multihost.lost_processes(_HEARTBEAT.value + 10)
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


def _exit(code):
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


def _parse_flags(argv):
    """Parses flags; a bad flag or misspelt `--config.key` is a one-line error, exit code 2.

    Overrides are applied while parsing, so this runs before anything is loaded or compiled.
    """
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"error: {_one_line(e, argv)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _one_line(e, argv):
    msg = str(e.args[0] if e.args else e).replace("\\n", "\n").replace("\\'", "'")
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if isinstance(e, AttributeError | KeyError):
        key = lines[0].strip("'\"")
        hint = " ".join(lines[1:]).rstrip("'\"")
        where = [a for a in argv if a.startswith("--config.") and key in a]
        flag = where[0] if where else "--config"
        return f"{flag}: the config has no key {key!r}. {hint}".strip()
    # A config file that fails to load reports its own traceback; its last line is the cause.
    return lines[-1] if lines else type(e).__name__


def run_cli(argv=None):
    """The command line: parses flags (and overrides), then runs `main`; never returns."""
    app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_cli()
