"""scripts/launch_tpu_pod.sh and scripts/slurm_multinode.sbatch: syntax, lint, and the TPU
launcher's dry run, with a `gcloud` that records its calls and fails, so nothing is started."""

import os
import shlex
import shutil
import subprocess

import pytest
from helpers.paths import REPO

TPU = "scripts/launch_tpu_pod.sh"
SLURM = "scripts/slurm_multinode.sbatch"


@pytest.fixture
def fake_gcloud(tmp_path):
    """A PATH whose `gcloud` appends its arguments to a log and fails; returns (env, log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(log))}\nexit 1\n')
    gcloud.chmod(0o755)
    # A clean environment: no TPU_* / JDISTILL_* defaults leak in from the caller's shell.
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "TMPDIR": str(tmp_path),
    }
    return env, log


def launch(env, *args):
    return subprocess.run(
        ["bash", TPU, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def remote_command(line):
    """The --command=... of a printed gcloud ssh line, as the worker's shell splits it."""
    words = shlex.split(line)
    (command,) = [w.removeprefix("--command=") for w in words if w.startswith("--command=")]
    return shlex.split(command)


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_bash_syntax(script):
    """`bash -n` parses the script."""
    out = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not on PATH")
def test_shellcheck():
    """shellcheck finds nothing in either script (quoting, unset variables, word splitting)."""
    out = subprocess.run(["shellcheck", TPU, SLURM], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dry_run_prints_the_launch_in_order_and_calls_nothing(fake_gcloud):
    """The dry run prints describe-or-create, the scp to every worker, the install and the run,
    in that order; the run carries the gs:// dirs, --multihost and the flags after --, and
    gcloud is never called."""
    env, log = fake_gcloud
    out = launch(
        env,
        "--dry-run",
        "--name=t",
        "--zone=us-central2-b",
        "--workdir=gs://b/run",
        "--tfds-data-dir=gs://b/tfds",
        "--",
        "--config.batch_size=64",
    )
    assert out.returncode == 0, out.stderr
    assert not log.exists(), f"dry run called gcloud: {log.read_text()}"
    lines = out.stdout.splitlines()

    def first(*needles):
        hits = [i for i, line in enumerate(lines) if all(n in line for n in needles)]
        assert hits, f"no line with {needles} in:\n{out.stdout}"
        return hits[0]

    create = first("tpu-vm describe t", "tpu-vm create t", "--accelerator-type=v4-32")
    scp = first("tpu-vm scp", "--worker=all")
    install = first("tpu-vm ssh t", "--worker=all", "pip install")
    run = first("tpu-vm ssh t", "--worker=all", "python -m jdistill.main")
    assert create < scp < install < run
    assert "jax[tpu]" in lines[install]

    words = remote_command(lines[run])
    main = words.index("jdistill.main")
    assert words[main - 2 : main] == ["python", "-m"]
    assert "TFDS_DATA_DIR=gs://b/tfds" in words[:main]
    assert {"--multihost", "--workdir=gs://b/run", "--config.batch_size=64"} <= set(words[main:])


def test_pass_through_flags_survive_two_shells(fake_gcloud):
    """A flag after -- with spaces and quotes reaches jdistill.main as one unchanged word, once
    the printed line and then the worker's shell have parsed it."""
    env, _ = fake_gcloud
    flag = """--config.note=it's "a" test"""
    out = launch(
        env,
        "--dry-run",
        "--name=t",
        "--zone=z",
        "--workdir=gs://b/run",
        "--tfds-data-dir=gs://b/tfds",
        "--",
        flag,
    )
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stdout.splitlines() if "jdistill.main" in line]
    assert remote_command(line)[-1] == flag


def test_without_dry_run_it_calls_gcloud_and_stops_at_the_failure(fake_gcloud):
    """The control for the dry-run test: for real, the stub is called (describe finds no slice,
    so create is tried) and the failed create ends the launch with a non-zero exit."""
    env, log = fake_gcloud
    out = launch(env, "--name=t", "--zone=z", "--workdir=gs://b/r", "--tfds-data-dir=gs://b/t")
    assert out.returncode != 0
    calls = log.read_text().splitlines()
    assert [c.split()[:4] for c in calls] == [
        ["compute", "tpus", "tpu-vm", "describe"],
        ["compute", "tpus", "tpu-vm", "create"],
    ]


def test_local_workdir_is_refused(fake_gcloud):
    """A workdir off GCS exits non-zero with one line naming gs://, before any command."""
    env, log = fake_gcloud
    out = launch(
        env, "--dry-run", "--name=t", "--zone=z", "--workdir=/tmp/x", "--tfds-data-dir=gs://b/t"
    )
    assert out.returncode != 0
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1
    assert "gs://" in out.stderr and "/tmp/x" in out.stderr
    assert not log.exists()


def test_help(fake_gcloud):
    """--help exits 0 and documents the options."""
    env, log = fake_gcloud
    out = launch(env, "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--name", "--zone", "--workdir", "--tfds-data-dir", "--dry-run"):
        assert option in out.stdout
    assert not log.exists()
