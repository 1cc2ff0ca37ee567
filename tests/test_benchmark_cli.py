"""scripts/benchmark.py: the evaluation and input rows, and the refusal without torchvision."""

import subprocess
import sys

import pytest
from helpers.paths import REPO, cli_env


def run_benchmark(*args, timeout=300):
    cmd = [sys.executable, "scripts/benchmark.py", *args]
    return subprocess.run(
        cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def rows(stdout):
    """The `key  value` rows the benchmark prints, as a dict."""
    out = {}
    for line in stdout.splitlines():
        key, _, value = line.partition("  ")
        out[key.strip()] = value.strip()
    return out


@pytest.mark.slow
def test_eval_and_input_rows():
    out = run_benchmark(
        "--config=configs/frs_retinanet.py:runlocal",
        "--notrain",
        "--eval",
        "--input",
        "--steps=1",
        "--eval_batch_size=2",
        "--input_batches=2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = rows(out.stdout)
    assert table["canvas (H x W)"] == "128 x 128"
    assert float(table["eval device s/1000 img"].split()[0]) > 0
    assert float(table["eval total s/1000 img"].split()[0]) > 0
    # score threshold 0: every image sends test_max_per_img (20 under runlocal) to the host
    assert table["eval detections/img"] == "20"
    assert float(table["input images/s"].split()[0]) > 0
    assert "128 x 128" in table["input images/s"]
    assert "step time" not in table  # --notrain


def test_against_torchvision_without_it_is_one_line():
    out = run_benchmark(
        "--config=configs/frs_retinanet.py:runlocal", "--against=torchvision", "--notrain"
    )
    if out.returncode == 0:
        pytest.skip("torchvision imports here (a bench venv): nothing to refuse")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "torchvision" in lines[0] and "pip install" in lines[0] and "[bench]" in lines[0]
    assert out.stdout == ""  # refused before anything was measured
