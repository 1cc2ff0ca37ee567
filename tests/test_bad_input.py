"""Bad input through the command lines, as a user meets it: each case ends in one `error:` line
that names its cause, before anything is loaded (issue: "Every failure names its cause").

Cases with a file of their own elsewhere: weight files (test_weight_file_errors.py), the
multi-process launch (test_multihost_errors.py), signals in every phase (test_stopping.py),
damaged checkpoints (test_checkpoint_damage.py).
"""

import subprocess
import sys

import pytest
from helpers.paths import REPO, cli_env

# Every case runs a command line in a subprocess: the full suite runs them, the quick tier
# (-m "not slow") keeps to in-process tests.
pytestmark = pytest.mark.slow


def _run(args, timeout=120):
    out = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = out.stderr.strip().splitlines()
    return out.returncode, lines


def _assert_one_line(code, lines, *needles):
    assert code == 1, "\n".join(lines[-20:])
    assert lines and lines[-1].startswith("error: "), "\n".join(lines[-20:])
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    assert sum(ln.startswith("error: ") for ln in lines) == 1
    assert not any("Traceback" in ln for ln in lines), "\n".join(lines)


def test_a_family_changed_by_override_is_refused_saying_how(tmp_path):
    code, lines = _run(
        [
            "-m",
            "jdistill.main",
            "--config=configs/ld_gfl.py:runlocal",
            f"--workdir={tmp_path}",
            "--config.teacher.model.family=retinanet",
        ]
    )
    _assert_one_line(
        code,
        lines,
        "config.teacher.model.family='retinanet'",
        "lacks retinanet's settings (anchor_ratios",
        "cannot be changed by an override",
        "config_lib.retinanet(depth)",
    )
    assert not (tmp_path / "checkpoints").exists()


def test_an_unknown_family_is_refused_listing_the_known_ones(tmp_path):
    code, lines = _run(
        [
            "-m",
            "jdistill.main",
            "--config=configs/retinanet_r50_coco.py:runlocal",
            f"--workdir={tmp_path}",
            "--config.model.family=yolo",
        ]
    )
    _assert_one_line(code, lines, "config.model.family='yolo'", "'faster_rcnn', 'fcos'")


def test_an_unknown_eval_backend_is_refused_before_anything_loads(tmp_path):
    code, lines = _run(
        [
            "-m",
            "jdistill.main",
            "--config=configs/retinanet_r50_coco.py:runlocal",
            f"--workdir={tmp_path}",
            "--config.eval_backend=pycocotool",
        ]
    )
    _assert_one_line(
        code, lines, "config.eval_backend='pycocotool'", "'pycocotools', 'faster_coco_eval'"
    )
    assert not any("training images" in ln for ln in lines)  # refused before the data was read


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_compare_with_a_workdir_it_cannot_use_says_so_in_one_line(tmp_path, kind):
    afile = tmp_path / "afile"
    afile.write_text("kept")
    workdir = afile if kind == "file" else afile / "sub"
    code, lines = _run(["scripts/compare.py", f"--workdir={workdir}"])
    cause = "exists and is not a directory" if kind == "file" else "cannot be written"
    _assert_one_line(code, lines, f"--workdir={workdir}", cause)
    assert len(lines) == 1, lines
    assert afile.read_text() == "kept"


def test_compare_refuses_a_recipe_it_cannot_run_before_writing_anything(tmp_path):
    workdir = tmp_path / "cmp"
    code, lines = _run(
        ["scripts/compare.py", f"--workdir={workdir}", "--config=configs/retinanet_r50_coco.py"]
    )
    _assert_one_line(code, lines, "--config=configs/retinanet_r50_coco.py", "not a demo-shaped")
    code, lines = _run(
        ["scripts/compare.py", f"--workdir={workdir}", "--config=configs/bccd.py", "--config.x=1"]
    )
    assert code == 2 and lines[-1].startswith("error: --config.x=1: the config has no key 'x'")
    assert not workdir.exists()
