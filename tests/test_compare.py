"""scripts/compare.py: the student configs it trains, and its table and chart."""

import importlib.util
import json

import pytest
from helpers.distill import check_before_training
from helpers.paths import REPO

from jdistill.distill import plan


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", REPO / "scripts" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe", ["demo", "bccd"])
def test_every_method_student_is_a_valid_distillation_config(compare, recipe):
    demo = compare.load_config(recipe)
    for method in compare.METHODS:
        cfg = compare.student_config(demo, method, 3, 300, 100, True, "/tmp/teacher")
        # the teacher's widths, so head-level methods (CrossKD) apply; the method's own losses
        assert cfg.model.neck_channels == demo.demo.teacher.neck_channels
        assert cfg.seed == 3 and cfg.schedule.num_steps == 300
        assert cfg.distill.auto_balance and cfg.distill.warmup_steps == 100
        published = compare.load_config(compare.METHODS[method]).distill.losses
        assert sorted(cfg.distill.losses) == sorted(published)
        assert [t.cfg.fn for t in plan.terms(cfg)] == [b.fn for b in published.values()]
        cfg.unlock()
        cfg.runlocal = True  # a random teacher is fine for the check
        check_before_training(cfg)
    base = compare.student_config(demo, None, 0, 300, 100, False, "")
    assert base.teacher is None and base.distill is None


def test_runs_put_published_weights_first(compare):
    labels = [label for label, _, _ in compare.runs(["frs", "pkd"], "both")]
    assert labels == ["baseline", "frs", "pkd", "frs+auto", "pkd+auto"]
    assert [r[0] for r in compare.runs(["pkd"], "on")] == ["baseline", "pkd+auto"]


def test_table_and_chart(compare, tmp_path):
    results = {
        "baseline": [{"bbox_mAP": 0.10}, {"bbox_mAP": 0.12}, {"bbox_mAP": 0.14}],
        "frs": [
            {"bbox_mAP": 0.2, "balance": {"frs_feat": 4.0}},
            {"bbox_mAP": 0.2, "balance": {"frs_feat": 6.0}},
        ],
    }
    rows = compare.summarise(results)
    assert rows[0][:4] == pytest.approx(("baseline", 0.12, 0.02, 3))  # sample std
    assert rows[1][4] == {"frs_feat": 5.0}
    table = compare.markdown(rows, 300, [0, 1, 2], 600)
    assert "| baseline | 12.0 ± 2.0 | 3 | - | - |" in table
    # +8 points over the larger std, the baseline's 2: 4 stds, more than 2
    assert "| frs | 20.0 ± 0.0 | 2 | +8.0 (+4.0 std) ✓ | frs_feat 5x |" in table
    assert compare.gain(("a", 0.13, 0.01), ("baseline", 0.12, 0.02))[1] == pytest.approx(0.5)
    assert compare.gain(("a", 0.2, 0.0), ("baseline", 0.1, 0.0))[1] == float("inf")
    png = tmp_path / "c.png"
    compare.bar_chart(rows, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_balance_ratios_read_the_window_from_metrics(compare, tmp_path):
    lines = [
        {"step": 1, "student/loss": 1.0, "distill/pkd": 100.0},  # in the warm-up: not counted
        {"step": 3, "student/loss": 2.0, "distill/pkd": 4.0, "distill/pkd/p3": 9.0},
        {"step": 4, "student/loss": 1.0, "distill/pkd": 4.0},
        {"step": 9, "eval/bbox_mAP": 0.1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert compare.balance_ratios(str(tmp_path), 2, 2) == {"pkd": 3.0}


def test_a_finished_run_is_read_back_not_trained_again(compare, tmp_path):
    import json
    import os

    assert compare.finished_metrics(str(tmp_path), 5) is None
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "step_5.json").write_text(json.dumps({"step": 5, "bbox_mAP": 0.25}))
    os.utime(tmp_path / "config.json", (1000, 1000))
    os.utime(tmp_path / "eval" / "step_5.json", (1090, 1090))
    assert compare.finished_metrics(str(tmp_path), 5)["bbox_mAP"] == 0.25
    assert compare.finished_metrics(str(tmp_path), 6) is None  # a run stopped before the end
    assert compare.run_seconds(str(tmp_path), 5) == 90


def test_a_voc_recipe_ranks_by_voc_map_and_names_its_data(compare):
    bccd = compare.load_config(str(REPO / "configs" / "bccd.py"))  # a path works too
    assert compare.headline(bccd) == "mAP"
    assert compare.headline(compare.load_config("demo")) == "bbox_mAP"
    assert compare.describe(bccd) == "bccd_voc, RetinaNet R34 w0.5 teacher -> R18 w0.25 student"
    rows = compare.summarise({"baseline": [{"mAP": 0.5}, {"mAP": 0.7}]}, "mAP")
    table = compare.markdown(rows, 400, [0, 1], 60, compare.describe(bccd), "mAP")
    assert table.startswith("bccd_voc, RetinaNet R34 w0.5 teacher -> R18 w0.25 student, 400")
    assert "| student | mAP (%) |" in table and "| baseline | 60.0 ± 14.1 | 2 | - | - |" in table
    with pytest.raises(FileNotFoundError, match="no such config file"):
        compare.load_config("no_such_recipe")


def test_the_demo_table_shows_a_voc_recipes_metrics():
    from jdistill import demo

    voc = {"mAP": 0.5, "AP50/RBC": 0.75, "AP50/WBC": 0.25, "num_gts/RBC": 3.0}
    text = demo.table({"teacher": voc, "baseline": {**voc, "mAP": 0.125}})
    head, _, teacher, baseline, summary = text.splitlines()
    assert head.split() == ["model", "mAP", "RBC", "WBC"]
    assert teacher.split() == ["teacher", "50.0", "75.0", "25.0"]
    assert baseline.split()[:2] == ["baseline", "12.5"]
    assert json.loads(summary) == {"teacher": 0.5, "baseline": 0.125}


def test_flag_values_it_cannot_use_are_refused(compare):
    good = {"methods": ["frs"], "seeds": ["0", "2"], "steps": 0, "warmup": 0}
    assert compare.check_options(good) == [0, 2]  # steps 0: the recipe's demo.student_steps
    for bad, match in [
        (dict(methods=["frz"]), "unknown methods"),
        (dict(seeds=["a"]), "must be integers"),
        (dict(seeds=[]), "--seeds is empty"),
        (dict(steps=-1), "0: the recipe's"),
        (dict(warmup=-5), "must be 0 or more"),
    ]:
        with pytest.raises(ValueError, match=match):
            compare.check_options({**good, **bad})
