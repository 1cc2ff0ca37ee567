"""The command-line frame `python -m jdistill.evaluate` and `python -m jdistill.predict` share
with `jdistill.main`, taken from it rather than copied: its `--config` flag (with
`--config.key=value` overrides, checked while parsing), its multi-host and `--log_all` flags,
its flag parser (a bad flag or override: one `error:` line, exit 2), its start (`main.start`:
log policy, TensorFlow off accelerators, the multi-host join, the stop signals, the log prefix),
its report (any failure: one `error:` line, exit 1) and its exit without interpreter teardown.
"""

from absl import app, flags

from jdistill import main as jmain


def run(body, what):
    """Parses the flags, runs `body(config)` and ends the process with `main`'s exit status.

    Never returns. `body` gets the parsed, locked config; the command's own flags are read
    from its module. `what` names the command's work in the line SIGTERM or SIGINT ends it
    with (exit 0, as any stop): e.g. 'scoring the checkpoint'.
    """
    # main's --workdir is required by the training command; these commands write to --out.
    if "workdir" in flags.FLAGS:
        delattr(flags.FLAGS, "workdir")

    def main_fn(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        try:
            jmain.start()
            from jdistill import stopping  # noqa: PLC0415 (after main's start)

            kept = "the files written before are kept; re-run the same command to finish"
            with stopping.SIGNALS.phase(what, kept):
                body(jmain._CONFIG.value)
            code = jmain.EXIT_OK
        except BaseException as e:  # noqa: BLE001 (every way out is reported in one line)
            code = jmain.report(e)
        jmain._exit(code)

    app.run(main_fn, flags_parser=jmain._parse_flags)
