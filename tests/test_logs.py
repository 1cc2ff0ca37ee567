"""The console a person reads: jdistill's lines and every library's warnings and errors, not
orbax's INFO lines or tfds's progress bars (`jdistill.logs`); `--log_all` shows everything.

The command-line tests share one real run (`retinanet_r50_coco:runlocal`, 4 steps, checkpoints
at steps 2 and 4, its data prepared in that run) and re-run copies of its workdir.
"""

import glob
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging
from helpers.paths import REPO, cli_env, load_config

from jdistill import logs

CONFIG = "--config=configs/retinanet_r50_coco.py:runlocal"
# A Python absl line: "I1206 02:17:53.394055 140655061642112 train.py:403] ..." (native lines
# logged before absl is set up, "I0000 00:00:1796523470.481242 ...", do not match).
ABSL_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ([^:\s]+):\d+\] ")
OURS = {os.path.basename(p) for p in glob.glob(f"{REPO}/jdistill/**/*.py", recursive=True)}


def record(path, level=logging.INFO):
    return logging.LogRecord("absl", level, path, 1, "message", (), None)


def policies():
    return [
        f for f in absl_logging.get_absl_handler().filters if type(f).__module__ == "jdistill.logs"
    ]


def files_logging(stderr, level="I"):
    """Names of the files whose lines at `level` are in `stderr`."""
    return {m.group(2) for m in map(ABSL_LINE.match, stderr.splitlines()) if m and m[1] == level}


def run(workdir, *extra, env=None):
    cmd = [sys.executable, "-m", "jdistill.main", CONFIG, f"--workdir={workdir}", *extra]
    return subprocess.run(
        cmd, cwd=REPO, env=env or cli_env(), capture_output=True, text=True, timeout=400
    )


# ---------------------------------------------------------------- the policy, in process


@pytest.fixture
def restore_policy():
    yield
    logs.setup(log_all=True)  # no filter, tfds's bars on: the state before any setup


def test_our_lines_and_everyones_warnings_pass(restore_policy):
    logs.setup(log_all=False)
    (policy,) = policies()
    ours = os.path.join(REPO, "jdistill", "train.py")
    orbax = os.path.join(os.path.dirname(ocp.__file__), "checkpoint_manager.py")
    assert policy.filter(record(ours)) and policy.filter(record(ours, logging.DEBUG))
    assert not policy.filter(record(orbax)) and not policy.filter(record(orbax, logging.DEBUG))
    assert policy.filter(record(orbax, logging.WARNING))
    assert policy.filter(record(orbax, logging.ERROR))
    joining = record(os.path.join(os.path.dirname(jax.__file__), "_src", "distributed.py"))
    joining.name = "jax._src.distributed"  # where a multi-host run waits for the others
    assert policy.filter(joining)
    logs.setup(log_all=False)  # again: still one filter
    assert len(policies()) == 1
    logs.setup(log_all=True)
    assert not policies()


def test_config_summary_is_a_few_lines_naming_the_choices():
    frs = load_config("frs_retinanet", "runlocal")
    text = logs.config_summary(frs, "configs/frs_retinanet.py:runlocal", {"batch_size": 4})
    lines = text.splitlines()
    assert len(lines) <= 6 and all(len(ln) <= 160 for ln in lines), text
    assert lines[0].startswith("config configs/frs_retinanet.py:runlocal with batch_size=4 (")
    assert "retinanet R50" in text and "teacher: retinanet R101" in text
    assert "frs_feat" in text and "frs_cls" in text and "4 steps" in text
    demo = logs.config_summary(load_config("demo"), "configs/demo.py")
    assert "teacher retinanet R34 x0.5, 1000 steps" in demo
    assert "students retinanet R18 x0.25, 700 steps" in demo


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """(workdir, completed process) of a fresh run whose data set is prepared in it."""
    base = tmp_path_factory.mktemp("logs")
    out = run(base / "run", env=cli_env(TFDS_DATA_DIR=str(base / "tfds")))
    assert out.returncode == 0, out.stderr[-3000:]
    return base / "run", out


def copy_of(workdir, tmp_path):
    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_the_console_shows_our_lines_not_orbax_info_or_progress_bars(first_run):
    _, out = first_run
    stderr = out.stderr
    assert "Downloading and preparing dataset" in out.stdout  # tfds did prepare it here
    assert "examples/s" not in stderr and "Generating splits" not in stderr  # no tqdm bars
    assert "%|" not in stderr
    assert files_logging(stderr) <= OURS, files_logging(stderr) - OURS  # orbax's, tfds's...
    assert "CheckpointManager" not in stderr
    # ours: the config summary (not the whole config), the data, the steps, the evaluation
    assert "config configs/retinanet_r50_coco.py:runlocal" in stderr
    assert "\nseed: " not in stderr
    assert "data: 2000 training images" in stderr
    for step in range(1, 5):
        assert re.search(rf"step {step}/4 loss \S+ .* ETA \d", stderr), stderr
    evaluation = stderr[stderr.index("eval at step 4") :].splitlines()
    assert evaluation[1] == "no detections" or "Average Precision" in evaluation[1]
    assert len(stderr.splitlines()) < 40, stderr


@pytest.mark.slow
def test_a_librarys_warning_shows_and_log_all_brings_everything_back(first_run, tmp_path):
    workdir = copy_of(first_run[0], tmp_path)
    # orbax warns (through absl) about a step without its _CHECKPOINT_METADATA and reads it
    os.remove(workdir / "checkpoints" / "4" / "_CHECKPOINT_METADATA")
    out = run(workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    (warning,) = [ln for ln in out.stderr.splitlines() if "_CHECKPOINT_METADATA" in ln]
    assert warning.startswith("W") and ABSL_LINE.match(warning)[2] not in OURS
    assert files_logging(out.stderr) <= OURS
    assert "already trained to step 4" in out.stderr

    out = run(workdir, "--log_all")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint_manager.py" in files_logging(out.stderr)  # orbax's INFO lines
    assert "CheckpointManagerOptions" in out.stderr
    assert "\nseed: " in out.stderr  # and the whole config


@pytest.mark.slow
def test_every_step_damaged_ends_in_one_error_line_without_asyncio_tracebacks(first_run, tmp_path):
    workdir = copy_of(first_run[0], tmp_path)
    steps = sorted(os.listdir(workdir / "checkpoints"))
    assert steps == ["2", "4"]
    for step in steps:  # truncate the largest array file of each step
        files = glob.glob(str(workdir / "checkpoints" / step / "state" / "**"), recursive=True)
        largest = max(filter(os.path.isfile, files), key=os.path.getsize)
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    out = run(workdir)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = out.stderr.rstrip("\n").splitlines()
    checkpoints = str(workdir / "checkpoints")
    assert lines[-1].startswith(f"error: no checkpoint in {checkpoints} can be restored")
    assert "Task exception was never retrieved" not in out.stderr
    assert "Task was destroyed" not in out.stderr and "Exception ignored" not in out.stderr
    assert "Traceback" not in out.stderr
    for step in steps:  # each step named once, with its cause
        (line,) = [ln for ln in lines if ln.strip().startswith(f"{checkpoints}/{step}:")]
        assert "OUT_OF_RANGE" in line
    assert len(lines) < 30, out.stderr
