"""Entry point: `python -m jdistill.main --config=configs/X.py[:arg] --workdir=DIR`.

Flags, logging and multi-host initialisation; then `train.run` (or the demo's three runs).

Exit status: 0 when the run finished or was preempted (SIGTERM / SIGINT: a checkpoint is saved
and the same command resumes), 1 when it failed, 2 for a bad flag or config override, 130 for
a second SIGINT. A failure ends stderr with one line, `error: <cause>`; errors that are not the
user's to fix (a bug) log their traceback above it, the others log it with --verbosity=1.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from jdistill import cli_flags, exits, logs

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
EXIT_OK, EXIT_ERROR, EXIT_USAGE = exits.EXIT_OK, exits.EXIT_ERROR, exits.EXIT_USAGE
EXIT_INTERRUPTED = exits.EXIT_INTERRUPTED


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
    start()
    from jdistill import train  # noqa: PLC0415 (after TF is fenced off)

    config = _CONFIG.value
    logs.log_config(config, flags.FLAGS["config"])
    use_compilation_cache(_WORKDIR.value)
    if config.get("demo"):
        from jdistill import demo  # noqa: PLC0415

        demo.run(config, _WORKDIR.value)
    else:
        train.run(config, _WORKDIR.value)


def start():
    """What every command does before its work: the console's log policy (`--log_all`),
    TensorFlow (tfds preparation only) kept off accelerators, the multi-process join when asked
    for, the stop signals (`stopping`) and the `[process i/n]` log prefix."""
    logs.setup()  # first: what the console shows, before any library logs
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: PLC0415

    tf.config.set_visible_devices([], "GPU")
    from jdistill import multihost, stopping  # noqa: PLC0415 (after TF is fenced off)

    multihost.initialize_distributed(
        **_multihost_options(), timeout_s=_INIT_TIMEOUT.value, heartbeat_s=_HEARTBEAT.value
    )
    # From here on SIGTERM and SIGINT stop the command in one line, whatever phase it is in (not
    # before: a handler cannot run while the runtime's join blocks, and the default one can).
    stopping.SIGNALS.install()
    multihost.process_log_prefix()


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
    """`exits.report` with this command's heartbeat timeout; returns the exit status."""
    parsed = flags.FLAGS.is_parsed()  # not when a test calls it
    return exits.report(e, heartbeat_s=_HEARTBEAT.value if parsed else _HEARTBEAT.default)


_exit = exits.exit_process


# A bad flag, config file or `--config.key` override: one `error:` line, exit 2 (cli_flags.py).
_parse_flags = cli_flags.parse_flags


def run_cli(argv=None):
    """The command line: parses flags (and overrides), then runs `main`; never returns."""
    app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_cli()
