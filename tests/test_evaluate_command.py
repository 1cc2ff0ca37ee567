"""`python -m jdistill.evaluate`: a step scored by the command gives the training run's own
evaluation of that step bit for bit, and what it cannot score ends in one `error:` line.

The command runs as a subprocess (the real command line: flags, exit status, last line of
stderr) with this process's XLA optimisation setting, so that both sides compile alike.
"""

import json
import subprocess
import sys

import jax
import pytest
from helpers.paths import REPO, cli_env, load_config

from jdistill import experiment, train
from jdistill.convert import mmdet
from jdistill.data.builders import synthetic_shapes
from jdistill.models import detector as detector_lib

RUNLOCAL = "configs/retinanet_r50_coco.py:runlocal"
# A network trained 4 steps scores every box under the configs' 0.05: with 0 every image keeps
# its 20 best, so that the comparison covers real detections, not two empty lists.
KEEP_ALL = "--config.model.test_score_thr=0.0"


def command(module, *args, timeout=300):
    """Runs `python -m <module> *args` as a user would; returns the CompletedProcess."""
    optimised = "1" if jax.config.read("jax_disable_most_optimizations") else "0"
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=cli_env(JAX_DISABLE_MOST_OPTIMIZATIONS=optimised),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(proc):
    """The `error:` lines of a finished command's stderr, checked to end it."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert errors and lines[-1] == errors[-1], proc.stderr[-3000:]
    return errors


def random_checkpoint(path, class_names=synthetic_shapes.CLASS_NAMES):
    """A runlocal RetinaNet with random weights, written as a converted model (step 0)."""
    config = load_config("retinanet_r50_coco", "runlocal")
    det = detector_lib.build(config.model, len(class_names))
    variables = jax.device_get(experiment.init_variables(det, (64, 64), seed=0))
    mmdet.write_orbax(str(path), variables, {"class_names": list(class_names)})
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, last step) of a runlocal RetinaNet trained by `train.run`, keeping every box."""
    workdir = tmp_path_factory.mktemp("run")
    config = load_config("retinanet_r50_coco", "runlocal")
    config.model.test_score_thr = 0.0
    train.run(config, str(workdir))
    return workdir, config.schedule.num_steps


@pytest.mark.slow
def test_scoring_a_runs_workdir_gives_its_final_evaluation_bit_for_bit(trained):
    workdir, steps = trained
    proc = command("jdistill.evaluate", f"--config={RUNLOCAL}", KEEP_ALL, f"--init={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = workdir / "evaluate", workdir / "eval"
    want = json.loads((theirs / f"step_{steps}.json").read_text())
    assert json.loads((ours / f"step_{steps}.json").read_text()) == want
    assert want["step"] == steps
    detections = (theirs / f"step_{steps}.detections.json").read_bytes()
    assert len(json.loads(detections)) == 4 * 20  # 4 eval images, 20 boxes each
    assert (ours / f"step_{steps}.detections.json").read_bytes() == detections
    png = (ours / f"step_{steps}.png").read_bytes()
    assert png == (theirs / f"step_{steps}.png").read_bytes()
    # The printed table: every metric, as the JSON holds it, then the files written.
    for key, value in want.items():
        if key != "step":
            shown = f"{value:.4f}" if value >= 0 else "n/a"
            assert any(ln.split() == [key, shown] for ln in proc.stdout.splitlines()), key
    assert proc.stdout.splitlines()[-1].startswith(f"wrote {ours / f'step_{steps}.json'}")


@pytest.mark.slow
def test_a_distillation_configs_teacher_on_the_same_weights_scores_the_same(trained, tmp_path):
    # frs_retinanet's teacher at depth 50 is retinanet_r50's model; its init names one step.
    workdir, steps = trained
    proc = command(
        "jdistill.evaluate",
        "--config=configs/frs_retinanet.py:runlocal",
        "--config.teacher.model.depth=50",
        "--config.teacher.model.test_score_thr=0.0",
        f"--config.teacher.init={workdir}/checkpoints/{steps}",
        "--teacher",
        f"--out={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = json.loads((workdir / "eval" / f"step_{steps}.json").read_text())
    assert json.loads((tmp_path / f"teacher_step_{steps}.json").read_text()) == want


@pytest.mark.slow
def test_the_runs_student_exported_for_mmdetection_scores_the_same(trained, tmp_path):
    # The .pth goes through the converter both ways (export, then `teacher.init`'s loader).
    pytest.importorskip("torch")
    from jdistill.convert import tools  # noqa: PLC0415 (needs the [convert] extra)

    workdir, steps = trained
    pth = tmp_path / "student.pth"
    tools.export(str(workdir), str(pth), "mmdet")
    proc = command("jdistill.evaluate", f"--config={RUNLOCAL}", KEEP_ALL, f"--init={pth}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = tmp_path / "student_eval", workdir / "eval"  # a weights file is step 0
    want = json.loads((theirs / f"step_{steps}.json").read_text())
    assert json.loads((ours / "step_0.json").read_text()) == {**want, "step": 0}
    detections = (theirs / f"step_{steps}.detections.json").read_bytes()
    assert (ours / "step_0.detections.json").read_bytes() == detections


@pytest.mark.slow
def test_what_cannot_be_scored_ends_in_one_error_line(tmp_path):
    ckpt = random_checkpoint(tmp_path / "retina")
    other_classes = random_checkpoint(tmp_path / "pets", ("cat", "dog", "bird", "fish"))
    damaged = tmp_path / "damaged"
    random_checkpoint(damaged)
    for array_file in (damaged / "0" / "state" / "d").iterdir():
        array_file.write_bytes(array_file.read_bytes()[:10])
    cases = [
        # (arguments, exit status, what the error line says)
        (["--no_such_flag"], 2, "Unknown command line flag 'no_such_flag'"),
        (["--config.model.no_such_key=1"], 2, "the config has no key 'no_such_key'"),
        ([], 1, "--init is empty"),
        ([f"--init={tmp_path / 'absent'}"], 1, f"no checkpoint at {tmp_path / 'absent'}"),
        ([f"--init={damaged}/0"], 1, f"checkpoint {damaged}/0 cannot be restored"),
        ([f"--init={other_classes}"], 1, "was trained on classes ['cat', 'dog', 'bird', 'fish']"),
        (["--teacher", f"--init={ckpt}"], 1, "--teacher: the config has no teacher"),
    ]
    for args, status, message in cases:
        proc = command("jdistill.evaluate", f"--config={RUNLOCAL}", *args)
        assert proc.returncode == status, (args, proc.stderr[-3000:])
        [line] = error_lines(proc)
        assert message in line, (args, line)
    # Another model's checkpoint: every differing key in the log, one line to the user.
    proc = command(
        "jdistill.evaluate", "--config=configs/gfl_r50_coco.py:runlocal", f"--init={ckpt}"
    )
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert line.startswith(f"error: checkpoint {ckpt} does not match the model")
    assert "more lines in the log above" in line and "missing key: params/bbox_head/gfl_cls" in (
        proc.stderr
    )
