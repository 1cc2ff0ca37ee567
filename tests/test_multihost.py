"""Several processes on one machine stand in for a pod: 2 processes x 2 simulated CPU devices,
joined by `jax.distributed` on localhost, against 1 process x 4 devices.

Each run is the CLI (`python -m jdistill.main --multihost ...`), as a pod would start it. The
runs share the suite's compilation cache, so only the first of each layout compiles.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers.paths import REPO, cli_env, shared_data

pytestmark = pytest.mark.slow

STEPS = 8  # long enough that a signal sent at step 2 lands well before the end
FRS = ["--config=configs/frs_retinanet.py:runlocal", f"--config.schedule.num_steps={STEPS}"]
HEARTBEAT_S = 10
TIMEOUT_S = 600  # a whole run, compiles included, on 2 busy cores


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices):
    return cli_env(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        # compiles in a fraction of the time; every run of the comparison uses the same programs
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    )


def start(workdir, args, processes):
    """Starts one run: `processes` CLI processes sharing 4 CPU devices between them."""
    cmd = [sys.executable, "-m", "jdistill.main", f"--workdir={workdir}", *args]
    if processes == 1:
        return [_popen(cmd, _env(4), workdir, 0)]
    port = _free_port()
    extra = [
        "--multihost",
        f"--coordinator_address=localhost:{port}",
        f"--num_processes={processes}",
        f"--heartbeat_timeout={HEARTBEAT_S}",
        "--distributed_timeout=120",
    ]
    devices = 4 // processes
    return [
        _popen([*cmd, *extra, f"--process_id={i}"], _env(devices), workdir, i)
        for i in range(processes)
    ]


def _popen(cmd, env, workdir, index):
    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, f"stderr.{index}.{time.monotonic_ns()}"), "w+")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def output(proc):
    proc.log.seek(0)
    return proc.log.read()


def wait(procs, timeout=TIMEOUT_S):
    """Waits for every process; kills all when one outlives `timeout`. Returns exit codes."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process outlived {timeout}s:\n{output(p)[-3000:]}")
    return codes


def run(workdir, args, processes):
    procs = start(workdir, args, processes)
    codes = wait(procs)
    assert codes == [0] * len(procs), "\n\n".join(output(p)[-3000:] for p in procs)
    return procs


def rows(workdir):
    """metrics.jsonl rows without timings (they differ from run to run)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        out = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in out]


def final_params(workdir):
    from jdistill import checkpoint

    variables, _ = checkpoint.load_model_variables(workdir)
    return variables


def assert_same_run(a, b, tol=1e-5):
    """Same logged metrics, final parameters and final eval JSON (to `tol`)."""
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_allclose(y[k], x[k], rtol=tol, atol=tol, err_msg=f"{k} {x['step']}")
    pa, pb = final_params(a), final_params(b)
    import jax

    diffs = jax.tree_util.tree_map(lambda u, v: float(np.max(np.abs(u - v))), pa, pb)
    assert max(jax.tree_util.tree_leaves(diffs)) <= tol
    evals = sorted(
        f
        for f in os.listdir(os.path.join(a, "eval"))
        if f.endswith(".json") and not f.endswith(".detections.json")
    )
    assert "teacher_step_0.json" in evals and len(evals) >= 2, evals  # the teacher's and final
    for name in evals:
        with open(os.path.join(a, "eval", name)) as f, open(os.path.join(b, "eval", name)) as g:
            ea, eb = json.load(f), json.load(g)
        assert ea.keys() == eb.keys()
        for k in ea:
            np.testing.assert_allclose(eb[k], ea[k], rtol=tol, atol=tol, err_msg=f"{name} {k}")


def wait_for_step(workdir, step, procs, timeout=TIMEOUT_S):
    """Returns once metrics.jsonl logs `step` (every process still running)."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"exited {p.returncode} early:\n{output(p)[-3000:]}"
        if os.path.exists(path):
            with open(path) as f:
                if any(json.loads(ln).get("step", -1) >= step for ln in f if ln.endswith("\n")):
                    return
        time.sleep(0.05)
    pytest.fail(f"step {step} not logged in {timeout}s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """frs_retinanet:runlocal, uninterrupted, on 1 process x 4 devices."""
    wd = str(tmp_path_factory.mktemp("one_process"))
    run(wd, FRS, 1)
    return wd


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, reference):
    wd = str(tmp_path_factory.mktemp("two_processes"))
    procs = run(wd, FRS, 2)
    return wd, procs


def test_two_processes_train_and_evaluate_as_one(reference, two_processes):
    wd, procs = two_processes
    assert_same_run(reference, wd)
    # process 0 alone writes; the others log, every line prefixed with their index
    assert "[process 1/2]" in output(procs[1])
    assert "[process 0/2]" in output(procs[0])
    with open(os.path.join(wd, "eval", f"step_{STEPS}.json")) as f:
        assert json.load(f)["step"] == STEPS
    # The pictures of what is distilled: gathered from both processes, drawn by process 0 as
    # one process draws them (to a colour step: the maps agree to 1e-5, not bit for bit).
    from PIL import Image

    for key in ("frs_feat", "frs_cls"):
        name = f"step_{STEPS}.maps.{key}.png"
        a = np.asarray(Image.open(os.path.join(reference, "eval", name)), np.int16)
        b = np.asarray(Image.open(os.path.join(wd, "eval", name)), np.int16)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, name


def test_sigterm_to_every_process_saves_and_a_resume_on_one_process_continues(
    tmp_path, reference, two_processes
):
    wd = str(tmp_path / "run")
    procs = start(wd, FRS, 2)
    wait_for_step(wd, 2, procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = wait(procs)
    logs = [output(p) for p in procs]
    assert codes == [0, 0], "\n\n".join(x[-3000:] for x in logs)
    saved = [int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()]
    stopped = max(saved)
    assert 2 <= stopped < STEPS, saved  # stopped early, at an agreed step boundary
    assert f"saved step {stopped}" in logs[0] and f"saved step {stopped}" in logs[1]
    # Resumed by another number of processes: the input position is the global step's.
    resumed = run(wd, FRS, 1)
    assert f"Resuming from step {stopped}" in output(resumed[0])
    assert_same_run(two_processes[0], wd)


def test_a_lost_process_stops_the_other_and_a_resume_ends_where_the_uninterrupted_run_ends(
    tmp_path, two_processes
):
    """SIGKILL to process 1 mid-run: process 0 fails within the heartbeat timeout, naming the
    lost process; then both are dead with no save at the stop, and a resume from the last
    checkpoint ends where the uninterrupted run ends."""
    wd = str(tmp_path / "run")
    procs = start(wd, FRS, 2)
    wait_for_step(wd, 3, procs)
    procs[1].kill()
    t0 = time.monotonic()
    (code,) = wait(procs[:1], timeout=HEARTBEAT_S + 60)
    took = time.monotonic() - t0
    log = output(procs[0])
    assert code != 0, log[-3000:]
    assert took < HEARTBEAT_S + 60
    errors = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    if errors:  # a collective failed at once (gloo saw the socket close): our one line
        assert "process 1" in errors[-1] or "another process" in errors[-1], log[-3000:]
    else:  # blocked until the heartbeat timeout: the runtime ends the process, naming task 1
        assert "Terminating process because the JAX distributed service" in log, log[-3000:]
        assert re.search(r"stopped sending heartbeats\):\s*\n\s*1\b", log), log[-3000:]
    resumed = run(wd, FRS, 2)
    assert "Resuming from step" in output(resumed[0])
    assert_same_run(two_processes[0], wd)


def test_defeat_faster_rcnn_on_two_processes_equals_one(tmp_path):
    shared_data("raccoon_voc")
    args = ["--config=configs/defeat_faster_rcnn_voc.py:paper,runlocal"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(one, args, 1)
    run(two, args, 2)
    assert_same_run(one, two)
