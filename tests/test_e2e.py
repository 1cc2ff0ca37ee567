"""End-to-end `runlocal` runs of every config, resume, and the CLI's error handling."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers.distill import check_before_training
from helpers.paths import REPO, cli_env, load_config, shared_data

from jdistill import checkpoint, config_lib, demo, train

# One end-to-end run per (family, method, data path) that no other end-to-end test trains; the
# configs left out differ from one here only in depth (the R101 teachers), are the student of a
# distillation config below, or are trained elsewhere: frs_gfl and frs_retinanet with every other
# method (test_methods_e2e.py), defeat_faster_rcnn_voc:paper on 1 and 8 devices
# (test_multidevice.py) and 1 and 2 processes (test_multihost.py), crosskd_gfl's method in
# test_methods_e2e.py. Every config is built and shape-checked without compiling by
# `test_every_config_builds`.
CONFIGS = [
    "gfl_r101_mstrain_2x_coco",  # multi-scale 'range' training
    "fcos_r101_caffe_mstrain_2x_coco",
    "frs_fcos",
    "faster_rcnn_r50_coco",
    "frs_faster_rcnn",
    "defeat_retinanet",
    "pkd_fcos_to_retinanet",  # teacher and student of two families
]
# Read ../shared/data/raccoon_voc under :runlocal (skipped when it is absent).
VOC_CONFIGS = [
    "defeat_faster_rcnn_voc",
    "fgfi_faster_rcnn_voc",
]
ALL_CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS + VOC_CONFIGS)
def test_runlocal_end_to_end(name, tmp_path):
    name, _, arg = name.partition(":")
    if "voc" in name:
        shared_data("raccoon_voc")
    config = load_config(name, ",".join(filter(None, [arg, "runlocal"])))
    final = train.run(config, str(tmp_path))
    key = "mAP" if "voc" in name else "bbox_mAP"
    if "voc" in name:
        assert set(final) >= {"mAP", "AP50/raccoon"} and 0.0 <= final["mAP"] <= 1.0
    else:
        assert set(final) >= {"bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s"}
    steps = config.schedule.num_steps
    saved = json.loads((tmp_path / "eval" / f"step_{steps}.json").read_text())
    assert saved[key] == final[key]
    assert (tmp_path / "eval" / f"step_{steps}.png").stat().st_size > 0
    rows = read_metrics(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    assert rows[-1][f"eval/{key}"] == final[key]
    assert list((tmp_path / "tensorboard").iterdir())
    if name.startswith("frs"):
        # every distillation term is logged by name from step 1; warm-up makes step 1's zero
        assert train_rows[0]["distill/frs_feat"] == 0.0 and train_rows[1]["distill/frs_feat"] > 0
        assert train_rows[1]["distill/frs_cls"] > 0
        assert any("teacher_eval/bbox_mAP" in r for r in rows)
        assert (tmp_path / "eval" / "teacher_step_0.json").exists()
    if name.startswith(("defeat", "fgfi")):
        terms = [k for k in train_rows[1] if k.startswith("distill/") and k.count("/") == 1]
        assert terms and all(train_rows[1][k] > 0 for k in terms), train_rows[1]
        if name.startswith("fgfi"):
            assert train_rows[1]["distill/defeat_neck/bg"] == 0.0


@pytest.mark.slow
def test_demo_runlocal_writes_three_result_sets(tmp_path):
    config = load_config("demo", "runlocal")
    results = demo.run(config, str(tmp_path))
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert set(saved) == {"teacher", "baseline", "frs"}
    for stage in saved.values():
        assert set(stage) == {
            "bbox_mAP",
            "bbox_mAP_50",
            "bbox_mAP_75",
            "bbox_mAP_s",
            "bbox_mAP_m",
            "bbox_mAP_l",
        }
    assert saved == json.loads(json.dumps(results))
    # the FRS stage distilled from the teacher stage's checkpoint
    frs_cfg = json.loads((tmp_path / "frs" / "config.json").read_text())
    assert frs_cfg["teacher"]["init"] == str(tmp_path / "teacher")


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_parameters(tmp_path):
    config = load_config("frs_retinanet", "runlocal")
    config.unlock()
    config.eval_max_images = 2
    config.lock()
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.run(config, str(full))
    assert train.run(config, str(cut), stop_at_step=2) == {}
    assert checkpoint.manager(str(cut / "checkpoints")).latest_step() == 2
    train.run(config, str(cut))
    a, _ = checkpoint.load_model_variables(str(full))
    b, meta = checkpoint.load_model_variables(str(cut))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)
    assert meta["class_names"] == ["circle", "square", "triangle", "ring"]
    # the resumed run logged steps 3..4 only once and no repeated teacher evaluation
    rows = [r for r in read_metrics(cut) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sum("teacher_eval/bbox_mAP" in r for r in read_metrics(cut)) == 1


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_builds(name):
    """Every config, full size and :runlocal, passes the config checks (a full-size distillation
    config only lacks its teacher checkpoint), and its models build to parameter trees, traced
    without compiling."""
    from jdistill.models import detector as detector_lib

    for arg in (None, "runlocal"):
        config = load_config(name, arg)
        if config.get("demo"):  # a demo-shaped recipe (demo, bccd): its three runs' models
            models = [config.demo.teacher, config.demo.student]
        else:
            models = [config.model] + ([config.teacher.model] if config.get("teacher") else [])
            if config.get("teacher") and not arg:
                with pytest.raises(train.ConfigError, match="teacher.init is empty"):
                    train.check_config(config)
            else:
                check_before_training(config)
        for model_cfg in models:
            det = detector_lib.build(model_cfg, 20)
            shapes = jax.eval_shape(
                det.module.init, jax.random.PRNGKey(0), jax.numpy.zeros((1, 64, 96, 3))
            )
            leaves = jax.tree_util.tree_leaves(shapes["params"])
            assert leaves and all(leaf.dtype == jax.numpy.float32 for leaf in leaves)


def test_mismatched_distillation_setups_are_refused():
    config = load_config("defeat_retinanet", "runlocal")
    config.unlock()
    config.teacher.model = config_lib.gfl(50)
    # defeat_dense_kd compares anchor classifications: a head-level method, one family only
    with pytest.raises(ValueError, match=r"dense_kd\) needs a teacher of the student's family"):
        check_before_training(config)
    config = load_config("frs_faster_rcnn", "runlocal")
    config.unlock()
    config.distill.losses.kd = dict(
        fn="defeat_dense_kd", weight=1.0, pos_weight=1.0, neg_weight=1.0
    )
    with pytest.raises(ValueError, match="'assign' taps, which a faster_rcnn student does not"):
        check_before_training(config)


def test_distillation_settings_are_checked_before_compiling():
    config = load_config("pkd_fcos_to_retinanet", "runlocal")
    config.unlock()
    # every default is in the config (config.json records it; the command line can set it)
    assert config.distill.losses.pkd.count_padding is False
    assert config.distill.losses.pkd.levels == () and config.distill.losses.pkd.max_levels == 4
    config.distill.losses.pkd.group_size = 3
    config.distill.init_from_teacher = True
    with pytest.raises(train.ConfigError) as e:
        train.check_config(config)
    msg = str(e.value)
    assert "distill.losses.pkd.group_size=3 does not divide batch_size 8" in msg
    assert "model.family 'retinanet' differs from the teacher's 'fcos'" in msg
    config.model.width = 0.25  # the teacher's is 0.125: the neck's lateral convs differ
    with pytest.raises(train.ConfigError, match=r"gives \[64, 128, 256, 512\], the teacher"):
        train.check_config(config)
    config = load_config("pkd_gfl", "runlocal")
    config.unlock()
    config.distill.losses = {"pkd": {"fn": "pkd", "group_size": 2.5}}  # a block made by hand
    with pytest.raises(train.ConfigError, match="config.distill.losses"):
        train.check_config(config)


def test_distillation_without_teacher_is_refused():
    config = load_config("frs_retinanet")
    with pytest.raises(ValueError, match="teacher.init is empty"):
        train.check_config(config)


def test_misspelt_config_key_is_a_one_line_error(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "jdistill.main",
        "--config=configs/frs_retinanet.py:runlocal",
        f"--workdir={tmp_path}",
        "--config.optimizer.lrr=0.1",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "lrr" in lines[0] and '"lr"' in lines[0]
    assert not (tmp_path / "config.json").exists()  # nothing started


@pytest.mark.slow
def test_benchmark_prints_its_table():
    cmd = [
        sys.executable,
        "scripts/benchmark.py",
        "--config=configs/frs_retinanet.py:runlocal",
        "--steps=1",
        "--peak_tflops=1",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = dict(
        line.split(None, 1) if "  " not in line else [p.strip() for p in line.split("  ", 1)]
        for line in out.stdout.splitlines()
    )
    assert float(table["step time"].split()[0]) > 0
    assert float(table["XLA FLOPs/step"].split()[0]) > 0
    assert table["canvas (H x W)"] == "128 x 128"
    assert "utilisation" in table
