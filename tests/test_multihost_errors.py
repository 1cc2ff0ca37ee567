"""A multi-host run that cannot start ends with one line naming why (issue 22).

Each case is the CLI as a user meets it: `--multihost` with a malformed coordinator address,
with nobody at the coordinator, with a peer that never joins, with the coordinator's port
taken, and alone outside any cluster. Each must exit 1 with `error: <cause>` as the last line
of stderr: no Python traceback, no C++ abort of JAX's runtime, no hang. None gets as far as
compiling anything, so each costs the interpreter's start plus the join timeout.
"""

import socket
import subprocess
import sys
import time

import pytest
from helpers.paths import REPO, cli_env

from jdistill import multihost

CONFIG = "--config=configs/frs_retinanet.py:runlocal"  # the multi-host tests' config; never run
JOIN_S = 5  # --distributed_timeout of the join tests
STARTUP_S = 40  # the interpreter, TF and JAX imports on 2 busy cores, with room to spare
LIMIT_S = 55  # a process still running after this has hung: killed, and the test fails
# What a failure must not look like: a Python traceback, or the runtime's LOG(FATAL) abort.
CRASH = ("Traceback", "Terminating process", "client.h", "Check failure", "Fatal Python error")
# Set by a launcher (Slurm, Open MPI, Kubernetes) or by the user: none may steer these runs.
FOREIGN = ("SLURM_", "OMPI_", "KUBERNETES_", "JAX_COORDINATOR", "JDISTILL_")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cli(tmp_path, *args):
    """Runs `python -m jdistill.main --multihost ARGS`; returns (exit code, stderr, seconds)."""
    env = {k: v for k, v in cli_env(JAX_PLATFORMS="cpu").items() if not k.startswith(FOREIGN)}
    cmd = [sys.executable, "-m", "jdistill.main", CONFIG, f"--workdir={tmp_path}", "--multihost"]
    t0 = time.monotonic()
    try:
        out = subprocess.run(
            [*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=LIMIT_S
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"still running after {LIMIT_S} s:\n{(e.stderr or b'')[-3000:]}")
    return out.returncode, out.stderr, time.monotonic() - t0


def _error_line(code, stderr, *causes):
    """The `error:` line that ends stderr, checked: exit 1, each of `causes` in it, no crash."""
    lines = stderr.strip().splitlines()
    assert code == 1, stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert sum(ln.startswith("error: ") for ln in lines) == 1, stderr[-3000:]
    for text in CRASH:
        assert text not in stderr, stderr[-3000:]
    for cause in causes:
        assert cause in lines[-1], lines[-1]
    return lines[-1]


@pytest.mark.slow  # a CLI subprocess: the full suite runs it
def test_a_coordinator_address_without_a_port_is_refused_before_jax_is_touched(tmp_path):
    args = ["--coordinator_address=localhost", "--num_processes=2", "--process_id=1"]
    code, stderr, took = _cli(tmp_path, *args)
    line = _error_line(code, stderr)
    assert line == (
        "error: --coordinator_address='localhost': no port; give host:port, e.g. localhost:1234"
    )
    assert "Connecting to JAX distributed service" not in stderr
    assert took < STARTUP_S


@pytest.mark.parametrize(
    "address, cause",
    [
        ("localhost", "no port"),
        ("localhost:", "no port after the ':'"),
        ("localhost:abc", "the port 'abc' is not a number"),
        ("localhost:0", "the port 0 is out of range (1 to 65535)"),
        ("localhost:70000", "the port 70000 is out of range (1 to 65535)"),
        (":1234", "no host"),
        ("[::1]", "no port"),
        ("[::1:1234", "no closing ']'"),
    ],
)
def test_a_malformed_coordinator_address_names_what_is_wrong(address, cause):
    with pytest.raises(ValueError, match="^--coordinator_address=") as e:
        multihost.initialize_distributed(True, address, 2, 1, timeout_s=1)
    assert cause in str(e.value)


def test_a_wellformed_coordinator_address_gives_its_host_and_port():
    assert multihost.parse_coordinator_address("localhost:1234") == ("localhost", 1234)
    assert multihost.parse_coordinator_address(" 10.0.0.1:80 ") == ("10.0.0.1", 80)
    assert multihost.parse_coordinator_address("[::1]:1234") == ("::1", 1234)


@pytest.mark.slow  # a CLI subprocess: the full suite runs it
def test_a_process_whose_coordinator_nobody_runs_says_so_within_the_timeout(tmp_path):
    port = _free_port()
    args = [f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=1"]
    code, stderr, took = _cli(tmp_path, *args, f"--distributed_timeout={JOIN_S}")
    line = _error_line(code, stderr, "process 1 of 2", f"localhost:{port}", f"within {JOIN_S} s")
    assert "nothing answered" in line and "process 0" in line, line
    assert took < JOIN_S + STARTUP_S


@pytest.mark.slow  # a CLI subprocess: the full suite runs it
def test_a_coordinator_whose_peer_never_joins_says_so_within_the_timeout(tmp_path):
    port = _free_port()
    args = [f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=0"]
    code, stderr, took = _cli(tmp_path, *args, f"--distributed_timeout={JOIN_S}")
    line = _error_line(code, stderr, "process 0 of 2", f"localhost:{port}", f"waited {JOIN_S} s")
    assert "process 1 never joined" in line and "--num_processes" in line, line
    assert "Connecting to JAX distributed service" in stderr  # it did wait in the runtime
    assert took < JOIN_S + STARTUP_S


@pytest.mark.slow  # a CLI subprocess: the full suite runs it
def test_a_coordinator_whose_port_is_taken_says_so(tmp_path):
    """The runtime would fail to bind the port and crash the process (SIGSEGV)."""
    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=0"]
        code, stderr, took = _cli(tmp_path, *args, f"--distributed_timeout={JOIN_S}")
    _error_line(code, stderr, "process 0 of 2", f"the port {port}", "taken")
    assert took < STARTUP_S


@pytest.mark.slow  # a CLI subprocess: the full suite runs it
def test_multihost_alone_outside_a_cluster_names_the_flags_to_give(tmp_path):
    code, stderr, took = _cli(tmp_path)
    line = _error_line(code, stderr, "Cloud TPU", "Slurm", "--coordinator_address=host:port")
    assert "--num_processes=N --process_id=I" in line and "JDISTILL_PROCESS_ID" in line, line
    assert "should be defined" not in stderr
    assert took < STARTUP_S


def test_jaxs_own_complaint_of_no_cluster_becomes_the_same_cause(monkeypatch):
    """Should the check before the join miss a difference from JAX's discovery."""
    monkeypatch.setattr(multihost, "_cluster_found", lambda: True)

    def initialize(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(multihost.jax.distributed, "initialize", initialize)
    with pytest.raises(ValueError, match="^--multihost alone lets JAX discover the cluster"):
        multihost.initialize_distributed(True)
