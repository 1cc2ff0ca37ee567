"""Shared config blocks (model, data, optimizer, schedule), `parse_arg`, and the checks of what a
config alone can get wrong (the command lines' flag parser is `cli_flags.py`).

Configs are ml_collections files with `get_config(arg=None)`; `arg` is a comma-separated list
of flags and key=value pairs, e.g. `configs/frs_retinanet.py:runlocal`.
"""

import os

import jax
import ml_collections

from jdistill import paths
from jdistill.distill import registry
from jdistill.evaluate import coco as coco_eval
from jdistill.models import detector as detector_lib
from jdistill.models import faster_rcnn as faster_rcnn_model
from jdistill.models import fcos as fcos_model
from jdistill.models import gfl as gfl_model
from jdistill.models import retinanet as retinanet_model


def parse_arg(arg, **defaults):
    """Parses 'runlocal,depth=18' into a ConfigDict over `defaults`.

    A bare name sets a boolean default to True; key=value casts to the default's type. Unknown
    keys are an error naming the known ones.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
        if not value:
            out[key] = True
        elif isinstance(defaults[key], bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(defaults[key])(value)
    return out


# Each family's `model` block lives next to its model (`models/<family>.py: defaults`).
retinanet = retinanet_model.defaults
gfl = gfl_model.defaults
fcos = fcos_model.defaults
faster_rcnn = faster_rcnn_model.defaults


def coco_data(root="", builder="coco_folder"):
    """COCO 2017 at mmdetection's (1333, 800), landscape/portrait canvases of 1344 x 800."""
    return ml_collections.ConfigDict(
        dict(
            builder=builder,
            root=root,
            data_dir="",
            train_split="train",
            eval_split="validation",
            scales=((1333, 800),),  # (long_max, short_max) per training scale
            multiscale_mode="value",  # 'value': one of `scales`; 'range': uniform between
            scale_per="batch",  # 'batch' (tight canvases) or 'image' (mmdetection, more padding)
            canvases=((800, 1344), (1344, 800)),  # (H, W) of the fixed input shapes
            flip_ratio=0.5,
            max_boxes=100,
            # A damaged (e.g. truncated) image: decoded tolerantly with a warning naming it, as
            # OpenCV does (False), or refused with an error naming it (True).
            strict_images=False,
            num_workers=8,
            prefetch=4,
        )
    )


# Where the tests and `:runlocal` VOC configs find the raccoon data set (VOC layout).
SHARED_VOC = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "raccoon_voc")


def voc_data(root="", years="0712"):
    """Pascal VOC at (1000, 600): trainval of `years` ('07', '12' or '0712') for training,
    VOC2007 test for evaluation with VOC07 11-point mAP (the DeFeat setting, specs/defeat.md §6).
    """
    data = coco_data(root, builder="voc_folder")
    data.voc_years = tuple("20" + years[i : i + 2] for i in range(0, len(years), 2))
    data.class_names = ()  # () -> VOC's 20 classes, or the names the annotations use
    data.scales = ((1000, 600),)
    # Most VOC images are 500 x 375 -> 800 x 600; the long side never exceeds 1000.
    data.canvases = landscape_and_portrait((608, 800), (608, 1024))
    data.max_boxes = 64
    data.eval_metric = "voc"
    data.voc_ap_mode = "11points"
    return data


def voc_schedule():
    """DeFeat's VOC schedule: 12 effective epochs (RepeatDataset 3 x 4), x0.1 after epoch 9,
    linear warm-up of 200 iterations from 0.001."""
    sched = step_schedule(12, (9,))
    sched.warmup_steps = 200
    return sched


def voc_faster_rcnn(depth, lr, years="0712"):
    """The DeFeat reference's VOC Faster R-CNN recipe: batch 16 normalised per 8 images."""
    model = faster_rcnn(depth)
    model.loss_group_size = 8  # the reference normalises per GPU of 8 images
    config = base(model, voc_data(years=years), lr=lr)
    config.schedule = voc_schedule()
    return config


def shrink_voc_for_runlocal(config):
    """`shrink_for_runlocal` for VOC configs: reads ../shared/data/raccoon_voc when no root."""
    if not config.data.root:
        config.data.root = os.path.abspath(SHARED_VOC)
        config.data.voc_years = ("2007",)
    return shrink_for_runlocal(config)


def sgd(lr):
    """mmdetection's SGD: momentum 0.9, weight decay 1e-4 on every trainable param."""
    return ml_collections.ConfigDict(
        dict(
            lr=lr,
            momentum=0.9,
            weight_decay=1e-4,
            grad_clip=0.0,  # > 0: clip the global gradient norm (FCOS: 35), before decay
            bias_lr_mult=1.0,  # mmcv paramwise_cfg for conv/linear biases (FCOS: 2 and 0)
            bias_decay_mult=1.0,
        )
    )


def step_schedule(epochs=12, milestones=(8, 11)):
    """Linear warm-up (500 iterations from 0.001x) then x0.1 at each milestone epoch."""
    return ml_collections.ConfigDict(
        dict(
            epochs=epochs,
            milestones=milestones,
            warmup="linear",
            warmup_steps=500,
            warmup_ratio=0.001,
            num_steps=-1,  # > 0 overrides epochs; milestones then scale with it
        )
    )


def base(model, data, lr):
    """The top-level config every experiment starts from."""
    return ml_collections.ConfigDict(
        dict(
            seed=520,  # the FRS reference's seed
            runlocal=False,
            model=model,
            data=data,
            batch_size=16,  # global: mmdetection's 8 GPUs x 2 images
            eval_batch_size=8,
            optimizer=sgd(lr),
            schedule=step_schedule(),
            # The student's start when the workdir has no checkpoint: an ImageNet backbone .pth
            # (torchvision or detectron caffe), an mmdetection detector .pth, or a jdistill
            # checkpoint. init_skip: regexes of keys left at their fresh values.
            init="",
            init_skip=(),
            log_every=50,
            checkpoint_every=2000,
            keep_checkpoints=3,
            eval_every=0,  # 0: evaluate at the end only
            eval_max_images=0,  # 0: the whole split
            # COCO mAP by 'pycocotools', or 'faster_coco_eval' (pip install faster-coco-eval),
            # which is refused unless it gives pycocotools' numbers on a fixture
            eval_backend="pycocotools",
            num_vis_images=4,
            param_sharding=(),  # (regex, mesh axis) rules for FSDP; replicated by default
            teacher=None,
            distill=None,
        )
    )


def scratch_retinanet(depth, width, neck, max_per_img=50):
    """A small RetinaNet trained from scratch on a CPU (the demo-shaped recipes: `configs/demo.py`,
    `configs/bccd.py`): ResNet `depth` at `width`, an FPN and heads of `neck` channels with 2
    convs per tower, anchors from 16 px on P3."""
    m = retinanet(depth)
    m.width = width
    m.neck_channels = neck
    m.stacked_convs = 2
    # Trained from scratch: nothing to freeze, and BN must learn its statistics (norm_eval=False;
    # the COCO configs fine-tune ImageNet backbones with frozen BN, as mmdetection does).
    m.frozen_stages = -1
    m.norm_eval = False
    # Their objects are 14-64 px (shapes) or 15-120 px (cells at half size), so anchors start at
    # 16 px on P3 rather than COCO's 32 px.
    m.octave_base_scale = 2
    m.test_nms_pre = 300
    m.test_max_per_img = max_per_img
    return m


def demo_block(teacher, student, teacher_steps, student_steps):
    """The `config.demo` block of a demo-shaped recipe: its teacher's and student's model blocks
    and their steps (`jdistill/demo.py` trains the teacher, the baseline and the distilled
    student; `scripts/compare.py` every method)."""
    return ml_collections.ConfigDict(
        dict(
            teacher=teacher,
            student=student,
            teacher_steps=teacher_steps,
            student_steps=student_steps,
        )
    )


def shrink_demo_for_runlocal(config):
    """A demo-shaped recipe at a few steps of tiny networks (CI)."""
    for m in (config.demo.teacher, config.demo.student):
        m.width = 0.125
        m.neck_channels = 32
        m.stacked_convs = 1
    config.demo.teacher_steps = 2
    config.demo.student_steps = 2
    config.runlocal = True
    config.log_every = 1
    config.schedule.warmup_steps = 1
    config.eval_max_images = 4
    return config


def shrink_for_runlocal(config, steps=4):
    """Tiny widths, small images and a few steps, so CI runs every config end to end."""
    for m in [config.model] + ([config.teacher.model] if config.get("teacher") else []):
        m.width = 0.125
        m.neck_channels = 32
        m.stacked_convs = 1
        m.test_nms_pre = 100
        m.test_max_per_img = 20
        if m.family == "faster_rcnn":
            m.update(
                rpn_train_nms_pre=200,
                rpn_train_max_num=100,
                rpn_test_nms_pre=200,
                rpn_test_max_num=100,
                roi_num=64,
                fc_channels=64,
                test_nms_pre=-1,
            )
    config.runlocal = True
    if config.data.builder == "coco_folder" and not config.data.root:
        config.data.builder = "synthetic_shapes"
    multi = len(config.data.scales) > 1
    config.data.scales = ((128, 80), (128, 96)) if multi else ((128, 96),)
    config.data.canvases = ((128, 128),)  # one square canvas: one compile per function
    config.data.max_boxes = 8
    config.data.num_workers = 2
    # 8 images: one per device when the tests simulate 8 devices
    config.batch_size = 8
    config.eval_batch_size = 8
    config.schedule.num_steps = steps
    config.schedule.warmup_steps = 2
    config.log_every = 1
    config.checkpoint_every = 2
    config.eval_max_images = 4
    config.num_vis_images = 2
    if config.get("distill"):
        config.distill.warmup_steps = 2
        if "balance_steps" in config.distill:
            config.distill.balance_steps = 2
    return config


def landscape_and_portrait(*canvases):
    """((H, W), ...) -> the same canvases plus their transposes, for both orientations."""
    return tuple(tuple(c) for c in canvases) + tuple((w, h) for h, w in canvases)


def gfl_mstrain_data(root=""):
    """GFL mstrain: short side uniform in [480, 800], long side 1333, four canvas sizes."""
    data = coco_data(root)
    data.scales = ((1333, 480), (1333, 800))
    data.multiscale_mode = "range"
    data.canvases = landscape_and_portrait((512, 896), (608, 1088), (704, 1216), (800, 1344))
    return data


def fcos_mstrain_data(root=""):
    """FCOS mstrain_640-800: scale (1333, 640) or (1333, 800), one canvas size each."""
    data = coco_data(root)
    data.scales = ((1333, 640), (1333, 800))
    data.multiscale_mode = "value"
    data.canvases = landscape_and_portrait((640, 1088), (800, 1344))
    return data


def fcos_optimizer():
    """FCOS: lr 0.01, bias lr x2 without decay, gradient clip 35 (fcos_r50_caffe config)."""
    opt = sgd(0.01)
    opt.bias_lr_mult = 2.0
    opt.bias_decay_mult = 0.0
    opt.grad_clip = 35.0
    return opt


def fcos_schedule(epochs=12, milestones=(8, 11)):
    """Constant warm-up at 1/3 for 500 iterations, then steps."""
    sched = step_schedule(epochs, milestones)
    sched.warmup = "constant"
    sched.warmup_ratio = 1.0 / 3.0
    return sched


def distill(losses, *, warmup_steps=0, decay="none"):
    """A `distill` block: `losses` ({key: {fn, weight, ...}}, each overlaying its distiller's
    defaults, as `registry.resolve` lays them; `registry.preset` gives a published recipe's)
    and the settings every method shares.

    - warmup_steps: the terms' weights ramp linearly from 0 over these steps.
    - decay: DeFeat's stage-wise decay ('none', 'linear', 'cos').
    - init_from_teacher: the student's neck and heads start from the teacher's (FGD, MGD).
    - balance_steps: the window after the warm-up over which each term's ratio to the
      detection loss is logged (and warned about over 10x); auto_balance rescales each term
      once, at the window's end, to balance_target times the detection loss.
    """
    # Each block carries its distiller's defaults, so config.json records every setting a run
    # used and the command line can override any of them (it only sets keys that exist).
    filled = {key: registry.resolve(block).to_dict() for key, block in losses.items()}
    return ml_collections.ConfigDict(
        dict(
            warmup_steps=warmup_steps,
            decay=decay,
            init_from_teacher=False,
            balance_steps=50,
            auto_balance=False,
            balance_target=1.0,
            losses=filled,
        )
    )


def distill_preset(name, *, warmup_steps=0, decay="none", **overrides):
    """`distill` over the preset `name` (`registry.preset(name, **overrides)`: the recipe's loss
    blocks, each in its distiller's module, with {key: {setting: value}} overrides)."""
    return distill(registry.preset(name, **overrides), warmup_steps=warmup_steps, decay=decay)


def teacher(model):
    """A teacher block: its model and the checkpoint to load (`init`, required outside runlocal)."""
    return ml_collections.ConfigDict(dict(model=model, init="", init_skip=()))


# ============================================================================ checks
# What a config alone can get wrong, refused (`ConfigError`) before anything is loaded or
# compiled. What a student/teacher pair can get wrong is `distill/plan.py: check`.


class ConfigError(ValueError):
    """A config value or flag the run cannot use; the message names the key and the value."""


# Integer settings: (key, smallest allowed value, what a value means). Checked before anything
# is built, since a 0 interval compiles and trains a step before `step % 0` fails, and a 0 batch
# fails deep inside the mesh code.
INTEGER_KEYS = (
    ("batch_size", 1, "images per step over all devices"),
    ("eval_batch_size", 1, "images per evaluation batch"),
    ("log_every", 1, "steps between log lines"),
    ("checkpoint_every", 1, "steps between checkpoints"),
    ("keep_checkpoints", 1, "checkpoints kept on disk"),
    ("eval_every", 0, "steps between evaluations; 0: at the end only"),
    ("eval_max_images", 0, "images evaluated; 0: the whole split"),
    ("num_vis_images", 0, "images drawn per evaluation"),
    ("seed", None, "the random seed"),
    ("schedule.epochs", 1, "epochs of training (milestones are in epochs)"),
    ("schedule.num_steps", None, "steps of training; 0 or less: `schedule.epochs` epochs"),
    ("schedule.warmup_steps", 0, "steps of LR warm-up"),
    ("data.max_boxes", 1, "ground-truth boxes kept per image"),
    ("data.num_workers", 0, "input threads; 0: read in the training thread"),
    ("data.prefetch", 0, "batches read ahead"),
    ("distill.balance_steps", 0, "steps after the warm-up over which the loss balance is measured"),
)
# The ones evaluation and prediction read.
EVAL_INTEGER_KEYS = ("eval_batch_size", "eval_max_images", "num_vis_images")


def check_integers(config, keys=None):
    """Refuses a non-integer or too small value of `keys` (default: every `INTEGER_KEYS` key)."""
    for key, low, meaning in INTEGER_KEYS:
        if keys is not None and key not in keys:
            continue
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if node is None:
            continue  # a config without the key: the code that reads it uses its default
        if isinstance(node, bool) or not isinstance(node, int):
            raise ConfigError(f"config.{key}={node!r}: must be an integer ({meaning})")
        if low is not None and node < low:
            need = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ConfigError(f"config.{key}={node!r}: must be {need} ({meaning})")


def check_eval(config):
    """Refuses the settings evaluation (and prediction) cannot use: its integers, a batch that
    does not split over the devices, an unknown or untrustworthy COCO backend."""
    check_integers(config, EVAL_INTEGER_KEYS)
    backend = config.get("eval_backend", "pycocotools")
    try:
        coco_eval.check_backend(backend)
    except ValueError as e:
        raise ConfigError(str(e)) from e  # the message names the key
    if config.eval_batch_size % jax.device_count():
        raise ConfigError(
            f"eval_batch_size {config.eval_batch_size} does not split over "
            f"{jax.device_count()} devices"
        )


def check_models(config):
    """Refuses a model block that is not its family's (e.g. `family` changed by override)."""
    blocks = [("model", config.model)]
    if config.get("teacher"):
        blocks.append(("teacher.model", config.teacher.model))
    for where, block in blocks:
        try:
            detector_lib.check_block(block, where)
        except ValueError as e:
            raise ConfigError(str(e)) from e


# The data block's settings with a fixed set of values: (key, the values, what they mean).
_DATA_CHOICES = (
    ("multiscale_mode", ("value", "range"), "one of data.scales, or uniform between them"),
    ("scale_per", ("batch", "image"), "one scale per global batch, or per image"),
)


def check_data(data):
    """Refuses a `data` block the pipeline cannot use: scales or canvases that are not a
    non-empty tuple of (int, int) pairs (an empty one failed as `max() arg is an empty
    sequence`), an unknown multiscale_mode or scale_per (silently read as the default), a
    flip_ratio outside [0, 1]."""
    for key, meaning, example in (
        ("scales", "(long_max, short_max) per training scale", "((1333, 800),)"),
        ("canvases", "(H, W) of the fixed input shapes", "((800, 1344), (1344, 800))"),
    ):
        value = data.get(key)
        if value is None:
            continue
        pairs = isinstance(value, tuple | list) and len(value) > 0
        for pair in value if pairs else ():
            pairs = pairs and isinstance(pair, tuple | list) and len(pair) == 2
            pairs = pairs and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            pairs = pairs and min(pair) > 0
        if not pairs:
            raise ConfigError(
                f"config.data.{key}={value!r}: must be one or more pairs of positive integers "
                f"({meaning}), e.g. --config.data.{key}='{example}'"
            )
    for key, allowed, meaning in _DATA_CHOICES:
        value = data.get(key)
        if value is not None and value not in allowed:
            raise ConfigError(
                f"config.data.{key}={value!r}: use {' or '.join(map(repr, allowed))} ({meaning})"
            )
    flip = data.get("flip_ratio")
    if flip is not None and not (isinstance(flip, int | float) and 0 <= flip <= 1):
        raise ConfigError(f"config.data.flip_ratio={flip!r}: a probability, from 0 to 1")


def check(config):
    """Everything a training config alone can get wrong: integers, model blocks, the data
    block, batches that do not split over the devices, the evaluation settings."""
    check_integers(config)
    check_models(config)
    check_data(config.data)
    if config.batch_size % jax.device_count():
        raise ConfigError(
            f"batch_size {config.batch_size} does not split over {jax.device_count()} devices"
        )
    check_eval(config)
    group = config.model.loss_group_size
    per_device = config.batch_size // jax.device_count()
    if group and per_device % group and group % per_device:
        raise ConfigError(
            f"model.loss_group_size {group} must divide or be a multiple of the per-device batch "
            f"{per_device}"
        )


def check_paths(config):
    """Refuses an `init` or `teacher.init` that names nothing, before the data is prepared and
    the models built (what is there is read, and judged, when the run loads it)."""
    named = [("init", config.get("init"))]
    if config.get("teacher"):
        named.append(("teacher.init", config.teacher.get("init")))
    for key, value in named:
        if value and not paths.path(value).exists():
            raise ConfigError(f"config.{key}={value!r}: no such file or folder")


def check_workdir(workdir):
    """Creates `workdir` if needed and proves it writable, before anything is loaded.

    A regular file there, or a directory this user cannot write, would otherwise surface as a
    FileExistsError or PermissionError from wherever the run first writes.
    """
    if not workdir:
        raise ConfigError("--workdir is empty: pass the directory the run writes to")
    where = paths.path(workdir)
    if where.exists() and not where.is_dir():
        raise ConfigError(f"--workdir={workdir}: exists and is not a directory")
    probe = where / f".write_probe.{jax.process_index()}.{os.getpid()}"
    try:
        where.mkdir(parents=True, exist_ok=True)
        # Permission bits alone do not say it (root, ACLs, read-only mounts): try a write.
        probe.write_text("jdistill")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot be written ({e.strerror or e})") from e


def check_output(out, flag="--out", *, folder=False, overwrite=False):
    """Refuses an output path a command could not write, before it reads or computes anything.

    Args:
      out: the path (local or remote).
      flag: how the command line names it.
      folder: the output is a folder (an orbax checkpoint), else one file.
      overwrite: an existing file may be replaced (a report); never a non-empty folder.
    Raises:
      ConfigError naming the flag and the cause: empty, a folder where a file goes (or the
      reverse), an existing output, or a parent folder that is missing or cannot be written.
    """
    if not out:
        raise ConfigError(f"{flag} is empty: name the {'folder' if folder else 'file'} to write")
    where = paths.path(out)
    if where.is_dir():
        if not folder:
            raise ConfigError(f"{flag}={out}: is a folder; name the file to write in it")
        if any(where.iterdir()):
            raise ConfigError(f"{flag}={out}: exists and is not empty; refusing to overwrite it")
    elif where.exists():
        if folder:
            raise ConfigError(f"{flag}={out}: is a file; name a new or empty folder")
        if not overwrite:
            raise ConfigError(f"{flag}={out}: exists; refusing to overwrite it")
    parent = where.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag}={out}: the folder {parent} does not exist")
    probe = parent / f".write_probe.{os.getpid()}"
    try:  # permission bits alone do not say it (root, ACLs, read-only mounts): try a write
        probe.write_text("jdistill")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag}={out}: cannot write in {parent} ({e.strerror or e})") from e
