"""The trainer when things go wrong: bad settings, failing runs, preemption, divergence, resume.

The subprocess tests run the real command line, since what they check (exit status, the last
line of stderr, signal handling, exiting without hanging) only exists in a separate process.
"""

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
from helpers.paths import REPO, cli_env, load_config
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util

from jdistill import checkpoint, config_lib, main, metrics_writer, stopping, train


def override(config, **values):
    """Sets keys of a locked config in place ('a.b' spelt a__b) and locks it again."""
    config.unlock()
    for key, value in values.items():
        node = config
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.lock()
    return config


def train_rows(workdir):
    rows = metrics_writer.read_rows(os.path.join(workdir, "metrics.jsonl"))
    return [r for r in rows if "loss" in r]


def tensorboard_series(workdir, tag):
    """[(step, value)] of a scalar as TensorBoard shows it (orphaned data purged)."""
    acc = plugin_event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard"), size_guidance={plugin_event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


# ============================================================================ validate first


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("checkpoint_every", 0, "config.checkpoint_every=0: must be a positive integer"),
        ("log_every", -5, "config.log_every=-5: must be a positive integer"),
        ("eval_every", -1, "config.eval_every=-1: must be an integer >= 0"),
        ("keep_checkpoints", 0, "config.keep_checkpoints=0: must be a positive integer"),
        ("batch_size", 0, "config.batch_size=0: must be a positive integer"),
        ("eval_batch_size", 0, "config.eval_batch_size=0: must be a positive integer"),
        ("schedule__epochs", 0, "config.schedule.epochs=0: must be a positive integer"),
        ("data__max_boxes", 0, "config.data.max_boxes=0: must be a positive integer"),
        ("data__num_workers", -1, "config.data.num_workers=-1: must be an integer >= 0"),
        ("data__prefetch", -2, "config.data.prefetch=-2: must be an integer >= 0"),
    ],
)
def test_bad_integer_settings_are_refused_naming_key_and_value(key, value, message):
    config = override(load_config("retinanet_r50_coco", "runlocal"), **{key: value})
    with pytest.raises(train.ConfigError) as info:
        train.check_config(config)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_integer_settings_at_their_limits_are_accepted():
    config = override(
        load_config("retinanet_r50_coco", "runlocal"),
        eval_every=0,  # off
        schedule__num_steps=0,  # train `epochs` epochs
        data__num_workers=0,  # read in the training thread
        keep_checkpoints=1,
    )
    train.check_config(config)
    override(config, schedule__num_steps=-1)
    train.check_config(config)


def test_a_workdir_that_cannot_hold_the_run_is_refused_before_loading(tmp_path):
    config = load_config("retinanet_r50_coco", "runlocal")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    with pytest.raises(train.ConfigError, match=rf"^--workdir={a_file}: exists and is not a dir"):
        train.run(config, str(a_file))  # raises before any data is read or compiled
    with pytest.raises(train.ConfigError, match=rf"^--workdir={a_file}/run: cannot be written"):
        config_lib.check_workdir(str(a_file / "run"))
    fine = tmp_path / "new" / "run"
    config_lib.check_workdir(str(fine))
    assert fine.is_dir() and not list(fine.iterdir())  # created; the probe file is gone


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_workdir_is_refused(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(train.ConfigError, match=r"--workdir=.*/ro: cannot be written"):
            config_lib.check_workdir(str(read_only))
    finally:
        read_only.chmod(0o700)


# ============================================================================ how a run ends


def test_report_gives_one_error_line_and_the_exit_status(capsys, caplog):
    caplog.set_level(logging.DEBUG)
    assert main.report(train.ConfigError("config.log_every=0: must be a positive integer")) == 1
    assert capsys.readouterr().err == "error: config.log_every=0: must be a positive integer\n"

    # A multi-line message (every mismatched key) goes to the log; the error line counts it.
    mismatch = checkpoint.CheckpointMismatchError("teacher does not match:\n  missing key: a/b")
    assert main.report(mismatch) == 1
    assert capsys.readouterr().err == (
        "error: teacher does not match: [1 more lines in the log above]\n"
    )
    assert "missing key: a/b" in caplog.text

    assert main.report(FileNotFoundError(2, "No such file or directory", "/x")) == 1
    assert capsys.readouterr().err == "error: [Errno 2] No such file or directory: '/x'\n"

    # A bug: its traceback is logged before the line, which names the exception type.
    caplog.clear()
    try:
        {}["missing"]
    except KeyError as e:
        assert main.report(e) == 1
    assert capsys.readouterr().err == "error: KeyError: 'missing'\n"
    assert "Traceback" in caplog.text and "unexpected error" in caplog.text

    assert main.report(stopping.saved_at("SIGTERM", 7, "/w/checkpoints")) == 0
    assert capsys.readouterr().err == ""
    assert "preempted by SIGTERM: saved step 7 in /w/checkpoints" in caplog.text
    assert main.report(KeyboardInterrupt()) == 130
    assert capsys.readouterr().err.startswith("error: interrupted by SIGINT")
    assert main.report(SystemExit(3)) == 3 and main.report(SystemExit()) == 0
    assert main.report(SystemExit("gave up")) == 1
    assert capsys.readouterr().err == "error: gave up\n"


# Runs the CLI with an input pipeline whose reader fails on the 3rd image of step 4's batch
# (0-based batch 3), in a reader thread as a real read error would. The sampler marks which
# batch a reader thread is loading, so the failure is the same whatever the threads' timing.
DRIVER = """
    import threading

    from jdistill import main
    from jdistill.data import pipeline

    loading = threading.local()
    real_batch = pipeline.TrainSampler.batch
    real_process = pipeline.process_example


    def batch(self, step):
        loading.step, loading.images = step, 0
        return real_batch(self, step)


    def process_example(*args, **kwargs):
        if getattr(loading, "step", None) == 3:
            loading.images += 1
            if loading.images == 3:
                raise OSError("disk on fire")
        return real_process(*args, **kwargs)


    pipeline.TrainSampler.batch = batch
    pipeline.process_example = process_example
    main.run_cli()
"""


@pytest.mark.slow
def test_a_failing_run_prints_one_error_line_and_exits_at_once(tmp_path):
    # When step 4's batch fails, steps 1-3 have been dispatched, a checkpoint of step 2 is
    # being written and the input threads are reading ahead: work in flight, which is when the
    # process used to hang in interpreter teardown after printing its error.
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    cmd = [
        sys.executable,
        str(driver),
        "--config=configs/retinanet_r50_coco.py:runlocal",
        f"--workdir={tmp_path / 'run'}",
        "--config.schedule.num_steps=10",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stderr=subprocess.PIPE, text=True)
    lines = []  # (arrival time, line)

    def read():
        for line in proc.stderr:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run neither finished nor failed: " + "\n".join(t for _, t in lines[-20:]))
    exited = time.monotonic()
    reader.join(timeout=10)
    stderr = "\n".join(t for _, t in lines)
    assert proc.returncode == 1, stderr[-3000:]
    errors = [(t, line) for t, line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1][1] == errors[0][1], stderr[-3000:]
    assert "OSError: disk on fire" in errors[0][1]
    assert "Traceback" not in stderr  # a data error is the user's: no traceback by default
    assert exited - errors[0][0] < 10, "the process lingered after reporting its error"
    assert "step 3/10" in stderr and "step 4/10" not in stderr


# ============================================================================ preemption


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_0_and_the_rerun_matches_an_uninterrupted_run(
    tmp_path,
):
    steps = 60
    settings = dict(schedule__num_steps=steps, checkpoint_every=1000, log_every=1)
    reference = tmp_path / "reference"
    train.run(override(load_config("retinanet_r50_coco", "runlocal"), **settings), str(reference))

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "jdistill.main",
        "--config=configs/retinanet_r50_coco.py:runlocal",
        f"--workdir={run}",
    ] + [f"--config.{k.replace('__', '.')}={v}" for k, v in settings.items()]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=cli_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    deadline = time.monotonic() + 300
    while not train_rows(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    found = re.search(r"preempted by SIGTERM: saved step (\d+) in (\S+); re-run", stderr)
    assert found, stderr[-3000:]
    stopped = int(found.group(1))
    assert 1 <= stopped < steps
    assert checkpoint.manager(str(run / "checkpoints")).latest_step() == stopped
    assert [r["step"] for r in train_rows(run)] == list(range(1, stopped + 1))

    # A run killed outright after that checkpoint would have logged three more steps.
    killed = metrics_writer.MetricWriter(str(run))
    for step in range(stopped + 1, stopped + 4):
        killed.write(step, {"loss": 99.0})
    killed.close()

    out = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Resuming from step {stopped}" in out.stderr
    a, _ = checkpoint.load_model_variables(str(reference))
    b, _ = checkpoint.load_model_variables(str(run))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)
    final = json.loads((run / "eval" / f"step_{steps}.json").read_text())
    assert final == json.loads((reference / "eval" / f"step_{steps}.json").read_text())
    # every step once, in metrics.jsonl and in TensorBoard, with the resumed run's values
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in train_rows(reference)])
    series = tensorboard_series(run, "loss")
    assert [s for s, _ in series] == list(range(1, steps + 1))
    assert 99.0 not in [v for _, v in series]


# ============================================================================ resume rewinds logs


def test_rewind_keeps_metrics_and_events_up_to_the_checkpoint_once(tmp_path):
    first = metrics_writer.MetricWriter(str(tmp_path))
    assert first.rewind(-1) == []  # a fresh run
    first.write(0, {"teacher_eval/bbox_mAP": 0.5})
    for step in range(1, 7):
        first.write(step, {"loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"loss": 7.0, "st')  # a kill in the middle of a line

    # (Event files sort by creation second, then pid, then a per-process counter: these
    # writers' files sort in the order they were created, as separate runs' files do.)
    resumed = metrics_writer.MetricWriter(str(tmp_path))
    kept = resumed.rewind(4)  # the last checkpoint was step 4
    assert [r["step"] for r in kept] == [0, 1, 2, 3, 4]
    for step in range(5, 9):
        resumed.write(step, {"loss": 10.0 * step})
    resumed.close()

    rows = metrics_writer.read_rows(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(0, 9))
    assert [r.get("loss") for r in rows] == [None, 1.0, 2.0, 3.0, 4.0, 50.0, 60.0, 70.0, 80.0]
    assert tensorboard_series(tmp_path, "loss") == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 50.0),
        (6, 60.0),
        (7, 70.0),
        (8, 80.0),
    ]
    assert tensorboard_series(tmp_path, "teacher_eval/bbox_mAP") == [(0, 0.5)]

    again = metrics_writer.MetricWriter(str(tmp_path))
    assert again.rewind(-1) == []  # no checkpoint survived: start over, drop everything
    again.write(1, {"loss": 0.25})
    again.close()
    assert [r["step"] for r in metrics_writer.read_rows(str(tmp_path / "metrics.jsonl"))] == [1]
    assert tensorboard_series(tmp_path, "loss") == [(1, 0.25)]


# ============================================================================ divergence


def test_a_checkpoint_is_judged_by_the_loss_its_parameters_gave_next():
    # Logged windows (step, mean loss, mean grad norm): the loss blows up from step 4.
    losses = [(1, 2.0, 1.0), (2, 1.5, 1.0), (3, 1.2, 1.0), (4, 30.0, 9.0), (5, 1e13, 1e9)]
    losses.append((6, math.nan, math.nan))
    # Checkpoint 3 was saved after a fine window, but its parameters gave 30 = 25x the best.
    assert train.last_good_checkpoint([2, 3, 5], losses) == 2
    assert train.last_good_checkpoint([3, 5], losses) is None
    assert train.last_good_checkpoint([3, 5], losses, factor=30.0) == 3
    # A finite loss with a non-finite gradient norm is not good either.
    assert train.last_good_checkpoint([1], [(1, 2.0, 1.0), (2, 1.9, math.inf)]) is None
    # Nothing logged after a checkpoint: nothing says its parameters work.
    assert train.last_good_checkpoint([6], losses) is None


def test_loss_record_in_checkpoint_meta():
    history = [(1, 2.0, 1.0), (2, 1.0, 1.0)]
    assert train.loss_record((3, 1.5, 0.5), history) == {
        "mean": 1.5,
        "grad_norm": 0.5,
        "finite": True,
        "best": 1.0,
        "sane": True,
    }
    assert train.loss_record((3, 1e13, 0.5), history)["sane"] is False
    assert train.loss_record((3, 2.0, math.inf), history) == {
        "mean": 2.0,
        "grad_norm": None,
        "finite": False,
        "best": 1.0,
        "sane": False,
    }
    json.dumps(train.loss_record((3, math.nan, math.nan), history), allow_nan=False)


@pytest.mark.slow
def test_non_finite_loss_names_the_step_as_logged_and_no_poisoned_checkpoint(tmp_path):
    # lr = NaN: update 1 is computed from finite parameters (its loss is fine, and so is the
    # checkpoint's loss record) but makes them NaN; update 2 is the first non-finite one.
    config = override(
        load_config("retinanet_r50_coco", "runlocal"),
        optimizer__lr=math.nan,
        checkpoint_every=1,
        log_every=1,
    )
    with pytest.raises(train.NonFiniteLossError) as info:
        train.run(config, str(tmp_path))
    message = str(info.value)
    assert re.search(r"at step 2;.*student/loss_cls.*nan", message), message
    assert "last good checkpoint: none" in message, message
    assert [r["step"] for r in train_rows(tmp_path)] == [1]  # the log counts the same way
    _, meta = checkpoint.load_model_variables(str(tmp_path / "checkpoints" / "1"))
    assert meta["loss"]["finite"] and meta["loss"]["sane"]
    assert meta["loss"]["mean"] == pytest.approx(train_rows(tmp_path)[0]["loss"])
