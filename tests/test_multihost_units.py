"""The multi-host pieces that need no second process: flag checks, the data state of a
checkpoint written by another number of processes, and the one-process collectives."""

import pytest

from jdistill import checkpoint, multihost


def test_coordinator_flags_need_multihost_and_each_other():
    with pytest.raises(ValueError, match="--coordinator_address is given without --multihost"):
        multihost.initialize_distributed(False, "localhost:1234")
    with pytest.raises(ValueError, match="also needs --num_processes, --process_id"):
        multihost.initialize_distributed(True, "localhost:1234")
    assert multihost.initialize_distributed(False) is False  # single process: nothing joins


def test_one_process_collectives_are_identities():
    assert multihost.allgather_json({"a": [1, 2]}) == [{"a": [1, 2]}]
    assert multihost.broadcast_json({"mAP": 0.5}) == {"mAP": 0.5}
    assert multihost.lost_processes(1) is None  # no runtime joined: nobody to ask


def test_data_state_of_each_process_and_of_another_process_count():
    same = checkpoint.data_states([{"next_index": 6}, {"next_index": 6}])
    assert same == {"process_count": 2, "per_process": [{"next_index": 6}] * 2}
    assert checkpoint.data_state_of_process(same, 1, 2, "d") == {"next_index": 6}
    # 2 processes at one position resume on 1 or on 4
    assert checkpoint.data_state_of_process(same, 0, 1, "d") == {"next_index": 6}
    assert checkpoint.data_state_of_process(same, 3, 4, "d") == {"next_index": 6}
    # a bare state (single-process checkpoints of earlier versions) and no item at all
    assert checkpoint.data_state_of_process({"next_index": 2}, 0, 1, "d") == {"next_index": 2}
    assert checkpoint.data_state_of_process(None, 0, 1, "d") is None
    apart = checkpoint.data_states([{"next_index": 6}, {"next_index": 7}])
    assert checkpoint.data_state_of_process(apart, 1, 2, "d") == {"next_index": 7}
    with pytest.raises(checkpoint.CheckpointError, match="resume with 2 processes"):
        checkpoint.data_state_of_process(apart, 0, 1, "d")


@pytest.mark.slow
def test_the_cli_reads_the_multihost_environment_and_names_a_bad_value(tmp_path):
    import subprocess
    import sys

    from helpers.paths import REPO, cli_env

    env = cli_env(JDISTILL_MULTIHOST="1", JDISTILL_NUM_PROCESSES="two", JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "jdistill.main",
        "--config=configs/frs_retinanet.py:runlocal",
        f"--workdir={tmp_path}",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "error: JDISTILL_NUM_PROCESSES='two': must be an integer"
    )
    env["JDISTILL_NUM_PROCESSES"] = "2"
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.stderr.strip().splitlines()[-1] == (
        "error: --multihost with --num_processes also needs --coordinator_address, --process_id "
        "(or none of them, to let JAX discover the cluster)"
    )
