"""The demo: teacher, baseline student and FRS student on `synthetic_shapes`, on a CPU.

`configs/demo.py` holds three model blocks in `config.demo`; this runs them in turn in
`<workdir>/{teacher,baseline,frs}` (each resumable like any run), prints a table of the three
mAPs and writes `<workdir>/demo_results.json` as {"teacher": {...}, "baseline": {...},
"frs": {...}}, each holding the eval metrics.
"""

import json
import os

import jax
import ml_collections
from absl import logging

from jdistill import config_lib, paths, train
from jdistill.evaluate import coco as coco_eval


def stage_configs(config, workdir):
    """The three run configs of a demo config: (name, config, workdir) in order."""
    demo = config.demo
    common = {k: v for k, v in config.to_dict().items() if k not in ("demo", "teacher", "distill")}

    def make(model, steps, teacher=None, distill=None):
        c = ml_collections.ConfigDict(common)
        c.model = model
        c.schedule.num_steps = steps
        c.teacher = teacher
        c.distill = distill
        c.lock()
        return c

    t_dir = os.path.join(workdir, "teacher")
    teacher = make(demo.teacher.to_dict(), demo.teacher_steps)
    baseline = make(demo.student.to_dict(), demo.student_steps)
    frs = make(
        demo.student.to_dict(),
        demo.student_steps,
        teacher=dict(model=demo.teacher.to_dict(), init=t_dir, init_skip=()),
        distill=config.distill.to_dict(),
    )
    return [
        ("teacher", teacher, t_dir),
        ("baseline", baseline, os.path.join(workdir, "baseline")),
        ("frs", frs, os.path.join(workdir, "frs")),
    ]


def run(config, workdir):
    """Runs the three stages; returns {stage: metrics}.

    Each stage is a `train.run`: a preempted stage raises `train.Preempted` (or
    `stopping.Stopped`), which stops the demo there; the same command later resumes that stage
    (finished ones only re-evaluate).
    """
    config_lib.check_workdir(workdir)  # the stages' directories sit inside it
    results = {}
    for name, cfg, wd in stage_configs(config, workdir):
        logging.info("demo: training %s in %s", name, wd)
        results[name] = train.run(cfg, wd)
    if jax.process_index() == 0:
        paths.write_json(os.path.join(workdir, "demo_results.json"), results)
        print(table(results))
    return results


def table(results):
    """A plain-text table of the stages' mAPs: COCO's six, or a VOC recipe's (`configs/bccd.py`)
    mAP and AP50 per class."""
    keys = coco_eval.METRIC_NAMES
    first = next(iter(results.values()), {})
    if "bbox_mAP" not in first and "mAP" in first:
        keys = ["mAP"] + [k for k in first if k.startswith("AP50/")]
    width = max(10, *(len(k) - 3 for k in keys))
    head = f"{'model':<10}" + "".join(
        f"{k.replace('bbox_', '').replace('AP50/', ''):>{width}}" for k in keys
    )
    rows = [head, "-" * len(head)]
    for name, m in results.items():
        cells = [m.get(k, -1.0) for k in keys]  # -1: no ground truth in that area range
        rows.append(
            f"{name:<10}"
            + "".join(f"{100 * v:>{width}.1f}" if v >= 0 else f"{'n/a':>{width}}" for v in cells)
        )
    headline = keys[0]  # bbox_mAP or mAP
    return "\n".join(rows) + "\n" + json.dumps({k: v.get(headline) for k, v in results.items()})
