"""Every distiller against the baseline on one data set, over several seeds.

  python scripts/compare.py --workdir=/tmp/compare [--config=configs/demo.py] [--seeds=0,1,2]
      [--steps=N] [--methods=frs,pkd,...] [--balance=both|off|on] [--config.key=value ...]

`--config` is a demo-shaped recipe: `configs/demo.py` (synthetic shapes, the default) or
`configs/bccd.py` (real blood-cell photos). Its teacher (`config.demo.teacher`, RetinaNet R34)
is trained once; then its student (RetinaNet R18) trains for `--steps` steps (by default the
recipe's `demo.student_steps`) as a baseline and under each method, per seed. Each method
takes its loss block from its RetinaNet config (`METHODS`), so it runs with its published
weights; with `--balance=both` (the default) it runs again with `distill.auto_balance=True`.
All students share the teacher's neck and head widths, so every method (CrossKD included)
applies, one warm-up (`--warmup`), one schedule, the demo's gradient clip and one
normalisation group per batch. FGD and MGD are published starting from the teacher's neck and
heads (`init_from_teacher`), but the demo's student backbone is half the teacher's width, so the
teacher's lateral convs do not fit: here they start from scratch like every other student. LD
distils GFL's box distributions and has no RetinaNet form: it is not in this comparison.

Writes <workdir>/comparison.json (every run's mAP, wall time, loss balance), comparison.md
(mean +- std of the headline mAP per method and variant: COCO `bbox_mAP`, or VOC `mAP` for a
VOC recipe) and comparison.png (a bar chart with error
bars of one std). Each run has its own workdir below <workdir>, so an interrupted comparison
resumes where it stopped (a finished run's final eval JSON is read back); `--finished_only`
tabulates what has finished without training anything.
"""

import importlib.util
import json
import math
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ml_collections  # noqa: E402

from jdistill import cli_flags, config_lib, exits, paths, train  # noqa: E402
from jdistill import demo as demo_lib  # noqa: E402
from jdistill.distill import registry  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# Method -> the config whose `distill.losses` it runs (published weights, RetinaNet students).
METHODS = {
    "frs": "frs_retinanet",
    "defeat": "defeat_retinanet",
    "pkd": "pkd_retinanet",
    "cwd": "cwd_retinanet",
    "mgd": "mgd_retinanet",
    "fgd": "fgd_retinanet",
    "crosskd": "crosskd_retinanet",
}


def define_flags():
    """The command's flags (defined when run as a script, so importing this module for its
    functions defines none)."""
    from jdistill import logs  # noqa: PLC0415 (importing it defines --log_all)

    return dict(
        log_all=logs.LOG_ALL,
        workdir=flags.DEFINE_string("workdir", None, "Where the runs and the table go."),
        config=config_flags.DEFINE_config_file(
            "config",
            os.path.join(ROOT, "configs", "demo.py"),
            "The recipe: a demo-shaped config, with --config.key=value overrides.",
            lock_config=False,
        ),
        seeds=flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every student run."),
        steps=flags.DEFINE_integer(
            "steps", 0, "Training steps of every student (0: the recipe's demo.student_steps)."
        ),
        warmup=flags.DEFINE_integer("warmup", 100, "Distillation warm-up of every method."),
        methods=flags.DEFINE_list("methods", list(METHODS), "Methods besides the baseline."),
        balance=flags.DEFINE_enum(
            "balance", "both", ["both", "off", "on"], "Published weights, auto-balanced, or both."
        ),
        finished_only=flags.DEFINE_bool(
            "finished_only",
            False,
            "Train nothing: tabulate the runs that finished (an interrupted comparison's table).",
        ),
    )


def load_config(name, arg=None):
    """`configs/<name>.py`'s config for `arg`; `name` may also be a path to a config file."""
    path = name if name.endswith(".py") else os.path.join(ROOT, "configs", f"{name}.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config={name}: no such config file")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def headline(config):
    """The eval metric a comparison ranks by: VOC `mAP` for a VOC recipe, else COCO `bbox_mAP`."""
    return "mAP" if config.data.get("eval_metric") == "voc" else "bbox_mAP"


def student_config(demo, method, seed, steps, warmup, auto_balance, teacher_dir):
    """The run config of one student: the recipe's data and schedule, a RetinaNet R18 with the
    teacher's neck and head widths, and `method`'s loss block (None: the baseline)."""
    common = {k: v for k, v in demo.to_dict().items() if k not in ("demo", "teacher", "distill")}
    c = ml_collections.ConfigDict(common)
    c.model = demo.demo.student.to_dict()
    c.model.neck_channels = demo.demo.teacher.neck_channels
    c.model.stacked_convs = demo.demo.teacher.stacked_convs
    c.schedule.num_steps = steps
    c.seed = seed
    # The balance ratios average the logged windows after the warm-up: 25-step windows, as
    # every measured row of the README's table (the demo itself logs every 50).
    c.log_every = 25
    c.teacher = None
    c.distill = None
    if method is not None:
        published = load_config(METHODS[method]).distill
        losses = published.losses.to_dict()
        for block in losses.values():
            if "group_size" in registry.get(block["fn"]).defaults:
                block["group_size"] = 0  # one normalisation group: the demo's batch
        c.teacher = dict(model=demo.demo.teacher.to_dict(), init=teacher_dir, init_skip=())
        c.distill = config_lib.distill(losses, warmup_steps=warmup).to_dict()
        c.distill.auto_balance = auto_balance
        # FGD's and MGD's published start (the teacher's neck and heads) needs the teacher's
        # backbone widths, which the demo's student does not have (see the module docstring).
        c.distill.init_from_teacher = False
    c.lock()
    return c


def runs(methods, balance_mode):
    """(label, method or None, auto_balance) of every variant, baseline first."""
    out = [("baseline", None, False)]
    # Published weights first: an interrupted comparison has that half complete.
    if balance_mode in ("both", "off"):
        out += [(m, m, False) for m in methods]
    if balance_mode in ("both", "on"):
        out += [(f"{m}+auto", m, True) for m in methods]
    return out


def summarise(results, metric="bbox_mAP"):
    """{label: [{metric, ...} per seed]} -> rows (label, mean, std, n, mean loss ratios)."""
    rows = []
    for label, per_seed in results.items():
        maps = [r[metric] for r in per_seed]
        mean = sum(maps) / len(maps)
        std = (
            math.sqrt(sum((m - mean) ** 2 for m in maps) / (len(maps) - 1)) if len(maps) > 1 else 0
        )
        ratios = {}
        for r in per_seed:
            for k, v in (r.get("balance") or {}).items():
                ratios.setdefault(k, []).append(v)
        ratios = {k: sum(v) / len(v) for k, v in ratios.items()}
        rows.append((label, mean, std, len(maps), ratios))
    return rows


def describe(recipe):
    """'<data set>, RetinaNet R34 w0.5 teacher -> R18 w0.25 student' for a table's caption."""
    t, s = recipe.demo.teacher, recipe.demo.student
    data = recipe.data.builder
    if data == "voc_folder":
        data = os.path.basename(os.path.normpath(recipe.data.root)) or data
    return f"{data}, RetinaNet R{t.depth} w{t.width} teacher -> R{s.depth} w{s.width} student"


def gain(row, baseline):
    """(mean gain over the baseline, that gain in seed standard deviations): the larger of the
    two rows' sample stds, so 'more than 2' holds against either row's spread (inf when both
    spreads are 0 and the gain is not)."""
    diff = row[1] - baseline[1]
    spread = max(row[2], baseline[2])
    return diff, diff / spread if spread > 0 else math.copysign(math.inf, diff) if diff else 0.0


def markdown(rows, steps, seeds, wall_s, caption="synthetic_shapes", metric="bbox_mAP"):
    """The comparison table (`metric` in %, mean +- sample std over seeds; each method's gain
    over the baseline, in points and in seed stds (`gain`), marked when above 2 stds)."""
    lines = [
        f"{caption}, {steps} steps, seeds "
        f"{', '.join(map(str, seeds))}, wall time {wall_s / 60:.0f} min.",
        "",
        f"| student | {metric} (%) | seeds | gain over the baseline | term / detection loss "
        "after warm-up |",
        "|---|---|---|---|---|",
    ]
    baseline = next((r for r in rows if r[0] == "baseline"), None)
    for row in rows:
        label, mean, std, n, ratios = row
        ratio = ", ".join(f"{k} {v:.2g}x" for k, v in ratios.items()) or "-"
        versus = "-"
        if baseline is not None and row is not baseline:
            diff, sds = gain(row, baseline)
            mark = " ✓" if sds > 2 else ""
            versus = f"{100 * diff:+.1f} ({sds:+.1f} std){mark}"
        lines.append(f"| {label} | {100 * mean:.1f} ± {100 * std:.1f} | {n} | {versus} | {ratio} |")
    return "\n".join(lines) + "\n"


def bar_chart(rows, path, size=(900, 420), metric="bbox_mAP"):
    """A PNG bar chart of mean `metric` with one-std error bars, one bar per row."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    w, h = size
    left, bottom, top = 50, 90, 20
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    peak = max((m + s for _, m, s, _, _ in rows), default=1.0) or 1.0
    scale = (h - bottom - top) / peak
    slot = (w - left - 10) / max(len(rows), 1)
    d.line([(left, top), (left, h - bottom), (w - 10, h - bottom)], fill="black")
    for k in range(5):
        v = peak * k / 4
        y = h - bottom - v * scale
        d.line([(left - 4, y), (left, y)], fill="black")
        d.text((4, y - 6), f"{100 * v:.1f}", fill="black")
    for i, (label, mean, std, _, _) in enumerate(rows):
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        y = h - bottom - mean * scale
        colour = (
            "gray" if label == "baseline" else ("steelblue" if "+auto" not in label else "orange")
        )
        d.rectangle([x0, y, x1, h - bottom], fill=colour)
        xc = (x0 + x1) / 2
        y_hi, y_lo = h - bottom - (mean + std) * scale, h - bottom - (mean - std) * scale
        d.line([(xc, y_hi), (xc, y_lo)], fill="black", width=2)
        d.line([(xc - 5, y_hi), (xc + 5, y_hi)], fill="black", width=2)
        d.line([(xc - 5, y_lo), (xc + 5, y_lo)], fill="black", width=2)
        d.text((x0, h - bottom + 6 + 12 * (i % 2)), label, fill="black")
    d.text((left, h - 30), f"{metric} (%), mean and one std over seeds", fill="black")
    img.save(path)


def balance_ratios(workdir, start, steps):
    """Mean ratio of each term to the detection loss over the balance window of a run, from its
    metrics.jsonl ({} for the baseline)."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    rows = [r for r in rows if start < r.get("step", 0) <= start + steps and "student/loss" in r]
    out = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("distill/") and k.count("/") == 1:
                out.setdefault(k.split("/")[1], []).append(v / max(r["student/loss"], 1e-12))
    return {k: sum(v) / len(v) for k, v in out.items()}


def finished_metrics(workdir, steps):
    """The final eval metrics of a run that finished (eval/step_<steps>.json), else None."""
    path = os.path.join(workdir, "eval", f"step_{steps}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_seconds(workdir, steps):
    """Seconds a finished run took: its config.json (written at the start of its last session)
    to its final eval JSON."""
    end = os.path.getmtime(os.path.join(workdir, "eval", f"step_{steps}.json"))
    return end - os.path.getmtime(os.path.join(workdir, "config.json"))


def check_options(o):
    """Refuses a flag value the comparison cannot use (ValueError naming the flag); returns the
    seeds as integers."""
    unknown = sorted(set(o["methods"]) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods: unknown methods {unknown}; known: {sorted(METHODS)}")
    try:
        seeds = [int(s) for s in o["seeds"]]
    except ValueError:
        raise ValueError(f"--seeds={','.join(o['seeds'])}: must be integers, e.g. 0,1,2") from None
    if not seeds:
        raise ValueError("--seeds is empty: give at least one seed, e.g. 0,1,2")
    if o["steps"] < 0:
        raise ValueError(
            f"--steps={o['steps']}: must be a positive number of training steps (0: the recipe's)"
        )
    if o["warmup"] < 0:
        raise ValueError(f"--warmup={o['warmup']}: must be 0 or more steps")
    return seeds


def main(argv, opts):
    del argv
    o = {k: flag.value for k, flag in opts.items()}
    from jdistill import logs  # noqa: PLC0415 (see define_flags)

    logs.setup(o.get("log_all", False))  # the console: our lines, everyone's warnings
    seeds = check_options(o)  # every flag before the workdir is created
    demo = o["config"]
    if not demo.get("demo"):
        raise ValueError(
            f"--config={flags.FLAGS['config'].config_filename}: not a demo-shaped recipe (no "
            "`demo` block: configs/demo.py and configs/bccd.py are)"
        )
    workdir = o["workdir"]
    config_lib.check_workdir(workdir)
    steps = o["steps"] or demo.demo.student_steps
    metric = headline(demo)
    t0 = time.time()
    _, t_cfg, teacher_dir = demo_lib.stage_configs(demo, workdir)[0]  # the demo's teacher run
    teacher = finished_metrics(teacher_dir, t_cfg.schedule.num_steps)
    if teacher is None and not o["finished_only"]:
        teacher = train.run(t_cfg, teacher_dir)
    results = {}
    for label, method, auto in runs(o["methods"], o["balance"]):
        for seed in seeds:
            cfg = student_config(demo, method, seed, steps, o["warmup"], auto, teacher_dir)
            wd = os.path.join(workdir, label, f"seed{seed}")
            logging.info("compare: %s seed %d in %s", label, seed, wd)
            start = time.time()
            metrics = finished_metrics(wd, steps)
            if metrics is None and o["finished_only"]:
                continue
            if metrics is None:
                metrics = train.run(cfg, wd)
                took = time.time() - start
            else:  # finished earlier: from its files, config written to final eval written
                took = run_seconds(wd, steps)
            window = (o["warmup"], cfg.distill.balance_steps) if method else (0, 0)
            results.setdefault(label, []).append(
                {
                    "seed": seed,
                    metric: metrics[metric],
                    "wall_s": took,
                    "balance": balance_ratios(wd, *window) if method else {},
                }
            )
    # Every student run's own time (a resumed comparison does not count its earlier sessions
    # in its own clock).
    wall = max(time.time() - t0, sum(r["wall_s"] for v in results.values() for r in v))
    rows = summarise(results, metric)
    table = markdown(rows, steps, seeds, wall, describe(demo), metric)
    paths.write_json(
        os.path.join(workdir, "comparison.json"),
        {"teacher": teacher, "runs": results, "wall_s": wall, "steps": steps, "metric": metric},
    )
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(table)
    bar_chart(rows, os.path.join(workdir, "comparison.png"), metric=metric)
    print(table)


def cli(argv, opts):
    """Runs `main` and ends the process as `jdistill.main` does: any failure (an unwritable
    workdir, a bad teacher, a diverged run) is one `error:` line and exit 1, never a traceback
    without its cause; SIGTERM / SIGINT stop the run in progress in one line (exit 0)."""
    exits.run(lambda: main(argv, opts))


if __name__ == "__main__":
    FLAGS = define_flags()
    flags.mark_flags_as_required(["workdir"])
    app.run(lambda argv: cli(argv, FLAGS), flags_parser=cli_flags.parse_flags)
