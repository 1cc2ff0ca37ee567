"""Times a config's compiled train step, its evaluation and its input pipeline, and optionally the
equivalent PyTorch/torchvision step in the same process, on synthetic input at the real canvas.

  python scripts/benchmark.py --config=configs/frs_retinanet.py [--batch_size=2] [--steps=10]
      [--peak_tflops=989]          # e.g. H100 dense bf16; utilisation = achieved / peak
      [--against=torchvision]      # also time torchvision's detector (needs the bench venv)
      [--notorch_compile]          # ... without the torch.compile run
      [--eval] [--eval_batch_size=2]   # evaluation: jitted predict + COCO results, s / 1000 img
      [--input]                    # the grain input pipeline alone, images/s
      [--canvas=512,896]           # a smaller canvas than the config's (e.g. on a CPU)
      [--notrain]                  # skip the train step

Train: step time and images/s (median of `--steps` steps after a warm-up step), compile time,
XLA's FLOP estimate per step and, given --peak_tflops, the utilisation. Runs on whatever
devices exist (the batch is sharded over all of them), so the same command serves a CPU, a GPU
box or a TPU slice. The teacher (if any) is randomly initialised: speed does not depend on its
weights.

--against=torchvision times torchvision's own detector of the same family (GFL, which
torchvision lacks, against RetinaNet), `weights=None, weights_backbone=None`, at the same
canvas and batch, float32, on the same device (CUDA when torch sees a GPU, else the CPU): the
student's step (forward with targets -> losses, backward, SGD) and, for a distillation config,
the teacher's forward (backbone + FPN, plus the head the loss reads) under `torch.no_grad()`
and a distillation loss on the FPN maps through per-level adapters. Both rates, their ratio,
and the same for `torch.compile` (a compile failure is reported as a row, not raised; inductor's
disk cache makes a repeated run's compile fast: TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 for a cold
figure).
torchvision does not import beside the CPU torch of the project's venv: see README, Benchmark.

Rows print as they are measured, one `key  value` per line on stdout.
"""

import os
import statistics
import sys
import time

# TensorFlow (imported by tfds through the pipeline) only prepares data here: quiet its banner,
# so that a refused run's stderr is its one error line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jdistill import experiment, parallel  # noqa: E402
from jdistill.data import datasets, pipeline, sources  # noqa: E402
from jdistill.distill import plan  # noqa: E402
from jdistill.evaluate import coco as coco_eval  # noqa: E402
from jdistill.evaluate import runner  # noqa: E402
from jdistill.models import detector as detector_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global train batch (0: the config's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after the warm-up (the median is shown).")
_CLASSES = flags.DEFINE_integer("num_classes", 80, "Classes of the synthetic task (VOC: 20).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device, for utilisation.")
_CANVAS = flags.DEFINE_string(
    "canvas", "", "H,W: time at this canvas instead of the config's first one (e.g. 512,896)."
)
_TRAIN = flags.DEFINE_bool("train", True, "Time the train step.")
_AGAINST = flags.DEFINE_enum(
    "against", "", ["", "torchvision"], "Also time the equivalent torchvision step."
)
_TORCH_COMPILE = flags.DEFINE_bool(
    "torch_compile", True, "With --against: also time the torch.compile'd models."
)
_EVAL = flags.DEFINE_bool("eval", False, "Time evaluation: jitted predict + COCO results.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 0, "Evaluation batch (0: the config's).")
_EVAL_THR = flags.DEFINE_float(
    "eval_score_thr",
    0.0,
    "Score threshold while timing evaluation. Randomly initialised heads score ~0.01, under the "
    "config's 0.05, and would send no detection to the host; 0 keeps test_max_per_img per "
    "image, as a trained detector on COCO nearly does. Negative: the config's.",
)
_INPUT = flags.DEFINE_bool("input", False, "Time the grain input pipeline alone (no model).")
_INPUT_BATCHES = flags.DEFINE_integer("input_batches", 20, "Timed input batches after the first.")
flags.mark_flags_as_required(["config"])

BENCH_VENV = (
    "python3 -m venv /work/benchvenv && . /work/benchvenv/bin/activate && "
    "pip install torch==2.14.1 torchvision==0.29.1 && pip install -e '.[bench]'"
)


# ============================================================================ output


def row(key, value):
    """Prints one `key  value` row at once, so a long run shows what it has measured so far."""
    print(f"{key:<34}  {value}", flush=True)


def median_seconds(fn, steps, warmup=1):
    """(first call's seconds, median seconds of `steps` further calls) of `fn()`.

    `fn` must return only once its work is done (block on the device), so each call is timed
    alone and the median is robust to a stray slow step.
    """
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(max(1, steps)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def cpu_model():
    """The host CPU's model name (Linux), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform  # noqa: PLC0415 (only off Linux)

    return platform.processor() or "unknown"


# ============================================================================ inputs


def parse_canvas(text):
    """'800,1344' -> (800, 1344); both multiples of 32, as every configured canvas is."""
    try:
        h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise app.UsageError(f"--canvas={text!r}: expected H,W such as 512,896") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise app.UsageError(f"--canvas={text!r}: H and W must be positive multiples of 32")
    return h, w


def synthetic_batch(batch, canvas, max_boxes, num_classes, seed=0):
    """A batch shaped like the pipeline's: full-canvas images with a few random boxes each."""
    rng = np.random.default_rng(seed)
    h, w = canvas
    xy = rng.uniform(0, 0.7, (batch, max_boxes, 2)) * [w, h]
    wh = rng.uniform(0.05, 0.3, (batch, max_boxes, 2)) * [w, h]
    n = max(1, max_boxes // 10)
    valid = np.zeros((batch, max_boxes), bool)
    valid[:, :n] = True
    return {
        "image": rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8),
        "boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
        "labels": rng.integers(0, num_classes, (batch, max_boxes)).astype(np.int32),
        "box_valid": valid,
        "img_shape": np.tile(np.array([h, w], np.int32), (batch, 1)),
        "pad_shape": np.tile(np.array([h, w], np.int32), (batch, 1)),
        "scale_factor": np.ones((batch, 2), np.float32),
        "image_valid": np.ones(batch, bool),
        "image_id": np.arange(batch, dtype=np.int32),
    }


# ============================================================================ jdistill


def bench_train(config, batch_size, canvas, num_classes, mesh, steps):
    """Compiles and times jdistill's train step. Returns images/s."""
    # Full-size configs name no teacher checkpoint: setup then draws a random teacher, which
    # costs the same.
    exp = experiment.setup(
        config, mesh, num_classes=num_classes, canvas=canvas, steps_per_epoch=1000
    )
    state, teacher_vars = exp.state, exp.teacher_vars
    local = synthetic_batch(batch_size, canvas, config.data.max_boxes, num_classes)
    batch = datasets.device_batch(local, mesh)
    t0 = time.perf_counter()
    compiled = exp.train_step.lower(state, teacher_vars, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    box = {"state": state, "metrics": None}

    def one_step():
        box["state"], box["metrics"] = compiled(box["state"], teacher_vars, batch)
        jax.block_until_ready(box["metrics"])

    _, step_s = median_seconds(one_step, steps)
    n_dev = jax.device_count()
    row("compile time", f"{compile_s:.1f} s")
    row("step time", f"{1000 * step_s:.1f} ms (median of {steps})")
    row("images/s", f"{batch_size / step_s:.4g}")
    row("XLA FLOPs/step", f"{flops / 1e12:.3f} TFLOP")
    row("achieved", f"{flops / step_s / 1e12:.3f} TFLOP/s")
    row("loss (sanity)", f"{float(box['metrics']['loss']):.4f}")
    if _PEAK.value > 0:
        util = flops / step_s / 1e12 / (_PEAK.value * n_dev)
        row("utilisation", f"{100 * util:.1f} % of {_PEAK.value} TFLOP/s x {n_dev}")
    return batch_size / step_s


def eval_model_cfg(model_cfg, score_thr):
    """The student's model config for timing evaluation, at `score_thr` when it is >= 0."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    if score_thr >= 0:
        cfg.test_score_thr = score_thr
    return cfg


def bench_eval(config, eval_batch, canvas, num_classes, mesh, steps):
    """Times evaluation as `runner.evaluate` runs it, minus the input pipeline and COCOeval.

    Device part: the jitted predict (network, decoding and NMS batched on device) until its
    fixed-size detections are ready. Total: plus the detections to the host and
    `coco_eval.to_results`. Returns (device s, total s) per image.
    """
    model_cfg = eval_model_cfg(config.model, _EVAL_THR.value)
    student = detector_lib.build(model_cfg, num_classes)
    variables = jax.device_put(
        experiment.init_variables(student, canvas, config.seed), parallel.replicated(mesh)
    )
    local = synthetic_batch(eval_batch, canvas, config.data.max_boxes, num_classes, seed=1)
    batch = datasets.device_batch(local, mesh)
    predict = jax.jit(runner.make_predict(student, model_cfg))
    t0 = time.perf_counter()
    compiled = predict.lower(variables, batch).compile()
    compile_s = time.perf_counter() - t0
    category_ids = list(range(1, num_classes + 1))
    device, total, found = [], [], []

    def one_batch():
        # both parts of the same calls, so that the total never reads below the device part
        t0 = time.perf_counter()
        dets = jax.block_until_ready(compiled(variables, batch))
        t1 = time.perf_counter()
        dets = multihost_utils.process_allgather(dets, tiled=True)
        results = coco_eval.to_results(dets, dets["image_id"], dets["image_valid"], category_ids)
        device.append(t1 - t0)
        total.append(time.perf_counter() - t0)
        found.append(len(results))

    median_seconds(one_batch, steps)
    device_s = statistics.median(device[1:])  # [0]: the warm-up call
    total_s = statistics.median(total[1:])
    per_k = 1000 / eval_batch
    thr = model_cfg.test_score_thr
    row("eval compile time", f"{compile_s:.1f} s")
    row("eval batch", f"{eval_batch} (score threshold {thr:g})")
    row("eval device s/1000 img", f"{device_s * per_k:.1f} (predict: network + decode + NMS)")
    row("eval total s/1000 img", f"{total_s * per_k:.1f} (+ to host + coco to_results)")
    row("eval detections/img", f"{found[-1] / eval_batch:.0f}")
    return device_s / eval_batch, total_s / eval_batch


def input_data_cfg(config, canvas_override):
    """The config's data block on `synthetic_shapes`, at its scales and canvases.

    With a canvas override, images are resized to fit it (landscape and portrait) instead.
    """
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.builder = "synthetic_shapes"
    data_cfg.root = ""
    if canvas_override:
        h, w = canvas_override
        data_cfg.canvases = ((h, w), (w, h))
        data_cfg.scales = ((max(h, w), min(h, w)),)
        data_cfg.multiscale_mode = "value"
    return data_cfg


def bench_input(config, batch_size, canvas_override, num_batches):
    """Images/s of the grain train pipeline alone (read, decode, resize, flip, pad, batch)."""
    data_cfg = input_data_cfg(config, canvas_override)
    split = sources.load_split(data_cfg, "train")
    sampler = pipeline.TrainSampler(split, data_cfg, batch_size, config.seed)
    ds = pipeline.train_dataset(
        split, sampler, data_cfg, seed=config.seed, num_steps=num_batches + 1
    )
    iterator = iter(ds)
    try:
        first = next(iterator)  # starts the reader threads; not timed
        t0 = time.perf_counter()
        canvases = {tuple(first["image"].shape[1:3])}
        for _ in range(num_batches):
            canvases.add(tuple(next(iterator)["image"].shape[1:3]))
        seconds = time.perf_counter() - t0
    finally:
        runner.close_iterator(iterator)  # stops grain's reader threads, as training does
    rate = num_batches * batch_size / seconds
    shown = ", ".join(f"{h} x {w}" for h, w in sorted(canvases))
    row("input images/s", f"{rate:.1f} ({data_cfg.num_workers} workers, canvases {shown})")
    return rate


# ============================================================================ torchvision

# jdistill family -> (torchvision builder, torchvision class, what the comparison is).
TORCH_MODELS = {
    "retinanet": ("retinanet_resnet50_fpn", "RetinaNet", "RetinaNet"),
    "gfl": ("retinanet_resnet50_fpn", "RetinaNet", "RetinaNet (torchvision has no GFL)"),
    "fcos": ("fcos_resnet50_fpn", "FCOS", "FCOS"),
    "faster_rcnn": ("fasterrcnn_resnet50_fpn", "FasterRCNN", "Faster R-CNN"),
}


def import_torchvision():
    """(torch, torchvision), or exits with one line saying how to make the bench venv."""
    try:
        import torch  # noqa: PLC0415 (optional: the [bench] extra)
        import torchvision  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 (a torchvision built for another torch raises anything)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        sys.exit(
            f"error: --against=torchvision needs torch and torchvision, which do not import here "
            f"({msg}); make the bench venv from the repository root: {BENCH_VENV}"
        )
    return torch, torchvision


class TorchSide:
    """torchvision's counterpart of a jdistill config: detectors, distillation loss, step."""

    def __init__(self, torch, tv, config, num_classes, canvas, batch_size):
        self.torch, self.tv, self.config = torch, tv, config
        self.family = config.model.family
        self.num_classes = num_classes
        self.canvas = canvas
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.losses = {t.key: t.cfg for t in plan.terms(config)}
        self.describe = []
        local = synthetic_batch(batch_size, canvas, config.data.max_boxes, num_classes)
        self.images = [
            torch.from_numpy(im).permute(2, 0, 1).float().div(255).to(self.device)
            for im in local["image"]
        ]
        # Faster R-CNN's softmax keeps class 0 for the background
        shift = 1 if self.family == "faster_rcnn" else 0
        self.targets = [
            {
                "boxes": torch.from_numpy(b[v]).to(self.device),
                "labels": torch.from_numpy(lb[v].astype(np.int64) + shift).to(self.device),
            }
            for b, lb, v in zip(local["boxes"], local["labels"], local["box_valid"], strict=True)
        ]

    # ------------------------------------------------------------------ models

    def detector(self, model_cfg, score_thr=0.05):
        """torchvision's detector for `model_cfg`'s family and depth, random weights.

        Depth 50: torchvision's builder (`weights=None, weights_backbone=None`); other depths:
        `resnet_fpn_backbone(resnet{depth})` with the builder's FPN levels + the same class.
        Either way, the transform is set to leave the canvas as it is (no resize: the images
        already are at the canvas; 32-divisible, so no padding either), and the backbone is
        frozen as mmdetection's `frozen_stages` / `norm_eval` / `norm_trainable` say.
        """
        torch, tv = self.torch, self.tv
        det = tv.models.detection
        builder, cls_name, _ = TORCH_MODELS[model_cfg.family]
        h, w = self.canvas
        classes = self.num_classes + (1 if model_cfg.family == "faster_rcnn" else 0)
        kw = dict(min_size=min(h, w), max_size=max(h, w), _skip_resize=True)
        kw.update(self._test_settings(model_cfg, score_thr))
        if model_cfg.depth == 50:
            model = getattr(det, builder)(
                weights=None, weights_backbone=None, num_classes=classes, **kw
            )
            how = f"{builder}(weights=None)"
        else:
            from torchvision.ops.feature_pyramid_network import (  # noqa: PLC0415
                LastLevelMaxPool,
                LastLevelP6P7,
            )

            dense = model_cfg.family != "faster_rcnn"
            backbone = det.backbone_utils.resnet_fpn_backbone(
                backbone_name=f"resnet{model_cfg.depth}",
                weights=None,
                norm_layer=torch.nn.BatchNorm2d,
                trainable_layers=5,
                returned_layers=[2, 3, 4] if dense else None,
                extra_blocks=LastLevelP6P7(256, 256) if dense else LastLevelMaxPool(),
            )
            model = getattr(det, cls_name)(backbone, num_classes=classes, **kw)
            how = f"{cls_name}(resnet_fpn_backbone('resnet{model_cfg.depth}'))"
        # Eval mode resizes even with _skip_resize (to scale 1, still a bilinear pass): the
        # jdistill side gets its canvas as is, so this side skips the resize in both modes.
        model.transform.resize = lambda image, target=None: (image, target)
        self._freeze_as_mmdet(model, model_cfg)
        return model.to(self.device), how

    @staticmethod
    def _test_settings(m, score_thr):
        """torchvision's keyword arguments for the config's sampling and test settings, so both
        sides keep, sample and return as many boxes (torchvision's RetinaNet would return 300
        detections per image, its Faster R-CNN keep 2000 proposals in training)."""
        if m.family != "faster_rcnn":
            return dict(
                score_thresh=score_thr,
                nms_thresh=m.test_nms_iou,
                detections_per_img=m.test_max_per_img,
                topk_candidates=m.test_nms_pre,
            )
        return dict(
            box_score_thresh=score_thr,
            box_nms_thresh=m.test_nms_iou,
            box_detections_per_img=m.test_max_per_img,
            box_batch_size_per_image=m.roi_num,
            box_positive_fraction=m.roi_pos_fraction,
            rpn_batch_size_per_image=m.rpn_num,
            rpn_positive_fraction=m.rpn_pos_fraction,
            rpn_nms_thresh=m.rpn_nms_iou,
            rpn_pre_nms_top_n_train=m.rpn_train_nms_pre,
            rpn_post_nms_top_n_train=m.rpn_train_max_num,
            rpn_pre_nms_top_n_test=m.rpn_test_nms_pre,
            rpn_post_nms_top_n_test=m.rpn_test_max_num,
        )

    def _freeze_as_mmdet(self, model, model_cfg):
        """Initialisation and requires_grad as mmdetection (and jdistill): the last BN of every
        block at scale 0 (`zero_init_residual`), the stem and the first `frozen_stages` stages
        frozen, BN affine trainable unless `norm_trainable=False`. torchvision without weights
        would train all of it, and a random deep ResNet without the zero init gives huge
        activations under `norm_eval`: the loss goes non-finite within a few steps."""
        for m in model.backbone.body.modules():
            last_bn = getattr(m, "bn3", None)  # Bottleneck
            if last_bn is not None:
                self.torch.nn.init.zeros_(last_bn.weight)
        frozen = {"conv1", "bn1"} | {f"layer{i}" for i in range(1, model_cfg.frozen_stages + 1)}
        for name, p in model.backbone.body.named_parameters():
            if name.split(".")[0] in frozen:
                p.requires_grad_(False)
        if not model_cfg.get("norm_trainable", True):
            for m in model.backbone.body.modules():
                if isinstance(m, self.torch.nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)

    def set_train_mode(self, model, model_cfg):
        """Training mode, with BN on running statistics when `norm_eval` (mmdetection)."""
        model.train()
        if model_cfg.norm_eval:
            for m in model.modules():
                if isinstance(m, self.torch.nn.BatchNorm2d):
                    m.eval()

    def cls_logits_module(self, model):
        """The module whose output is the classification map FRS reads: the dense heads'
        classification branch, or Faster R-CNN's RPN head (objectness)."""
        return model.rpn.head if self.family == "faster_rcnn" else model.head.classification_head

    def level_logits(self, out, feats):
        """Classification output of `cls_logits_module` -> per-level [N, H, W, A * K] maps."""
        if self.family == "faster_rcnn":
            return [o.permute(0, 2, 3, 1) for o in out[0]]  # RPN: ([N, A, H, W] per level, ...)
        # dense heads: [N, sum_l H_l W_l A, K] in (H, W, A) order per level
        sizes = [f.shape[-2] * f.shape[-1] for f in feats]
        per = out.shape[1] // sum(sizes)
        parts = out.split([s * per for s in sizes], dim=1)
        return [
            p.reshape(p.shape[0], f.shape[-2], f.shape[-1], -1)
            for p, f in zip(parts, feats, strict=True)
        ]

    # ------------------------------------------------------------------ step

    def build_train(self):
        """Builds student (+ teacher, adapters) and the SGD optimizer for `step`."""
        torch, config = self.torch, self.config
        self.student, how = self.detector(config.model)
        self.set_train_mode(self.student, config.model)
        self.describe.append(f"student {how}")
        self.taps = {}
        self.student.backbone.register_forward_hook(
            lambda m, i, o: self.taps.__setitem__("feats", o)
        )
        self.teacher = self.distill = None
        fns = {c.fn for c in self.losses.values()}
        self.frs = bool(fns & {"frs_feat", "frs_cls"})
        if self.losses:
            self.teacher, how = self.detector(config.teacher.model)
            self.teacher.eval().requires_grad_(False)
            self.describe.append(f"teacher {how}")
            if "frs_cls" in fns:
                self.cls_logits_module(self.student).register_forward_hook(
                    lambda m, i, o: self.taps.__setitem__("logits", o)
                )
            self.distill = self._distill_loss(fns).to(self.device)
            self.describe.append(self.distill.what)
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.distill is not None:
            params += list(self.distill.parameters())
        opt = config.optimizer
        # jdistill's first steps run at the warm-up's start: lr x warmup_ratio
        lr = opt.lr * config.schedule.get("warmup_ratio", 1.0)
        self.params = params
        self.optimizer = torch.optim.SGD(
            params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay
        )
        self.grad_clip = opt.get("grad_clip", 0.0)
        self.student_fn, self.teacher_fn, self.distill_fn = (
            self.student,
            self._teacher_forward,
            self.distill,
        )

    def _distill_loss(self, fns):
        """The distillation loss module: FRS for FRS configs, an adapted MSE otherwise."""
        torch = self.torch
        nn = torch.nn
        weights = {c.fn: float(c.weight) for c in self.losses.values()}
        adapter = next((c.adapter for c in self.losses.values() if c.get("adapter")), "conv3x3")
        k = 1 if "1x1" in adapter else 3
        num_levels = 5  # torchvision's FPNs: P3..P7 (dense heads) or P2..P6 (Faster R-CNN)
        frs = self.frs

        class DistillLoss(nn.Module):
            """FRS (specs/frs.md): teacher richness mask M = max sigmoid(teacher logits);
            sum M (T - A(S))^2 / sum M over channels and levels (+ the masked BCE of the class
            logits with frs_cls). Otherwise (DeFeat's decoupled fg/bg neck terms, masked MSEs of
            the same cost): mean (T - A(S))^2."""

            what = (
                f"distill: {'FRS masked' if frs else 'plain'} MSE on {num_levels} FPN levels "
                f"through {k}x{k} adapters" + (" + FRS cls BCE" if "frs_cls" in fns else "")
            )

            def __init__(self):
                super().__init__()
                self.adapters = nn.ModuleList(
                    nn.Conv2d(256, 256, k, padding=k // 2) for _ in range(num_levels)
                )

            def forward(self, s_feats, t_feats, s_logits, t_logits):
                total = s_feats[0].new_zeros(())
                for i, (a, s, t) in enumerate(zip(self.adapters, s_feats, t_feats, strict=True)):
                    sq = (a(s) - t).square()
                    if not frs:
                        total = total + weights.get("defeat_neck", 1.0) * sq.mean()
                        continue
                    mask = t_logits[i].sigmoid().amax(-1)  # [N, H, W]
                    norm = mask.sum()
                    total = total + weights.get("frs_feat", 0.0) * (mask * sq.sum(1)).sum() / norm
                    if s_logits is not None:
                        bce = nn.functional.binary_cross_entropy_with_logits(
                            s_logits[i], t_logits[i].sigmoid(), reduction="none"
                        )
                        total = total + weights["frs_cls"] * (mask[..., None] * bce).sum() / norm
                return total

        return DistillLoss()

    def _teacher_forward(self, x):
        """Teacher backbone + FPN (+ the classification map FRS reads), no transform."""
        feats = list(self.teacher.backbone(x).values())
        logits = None
        if self.frs:
            logits = self.level_logits(self.cls_logits_module(self.teacher)(feats), feats)
        return feats, logits

    def teacher_input(self):
        """The teacher's normalised [N, 3, H, W] batch, as its transform would make it."""
        t = self.teacher.transform
        mean = self.torch.tensor(t.image_mean, device=self.device)[:, None, None]
        std = self.torch.tensor(t.image_std, device=self.device)[:, None, None]
        return (self.torch.stack(self.images) - mean) / std

    def step(self):
        """One train step; returns the loss as a float (which waits for the device)."""
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        self.taps.clear()
        losses = self.student_fn(self.images, self.targets)
        total = sum(losses.values())
        if self.teacher is not None:
            with torch.no_grad():
                t_feats, t_logits = self.teacher_fn(self.teacher_input())
            s_feats = list(self.taps["feats"].values())
            s_logits = None
            if "logits" in self.taps:
                s_logits = self.level_logits(self.taps["logits"], s_feats)
            total = total + self.distill_fn(s_feats, t_feats, s_logits, t_logits)
        total.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.last_loss = float(total.detach())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return self.last_loss

    def compile(self):
        """Swaps in torch.compile'd student, teacher forward and distillation loss."""
        c = self.torch.compile
        self.student_fn = c(self.student)
        if self.teacher is not None:
            self.teacher_fn = c(self._teacher_forward)
            self.distill_fn = c(self.distill)

    # ------------------------------------------------------------------ eval

    def eval_seconds(self, steps, score_thr):
        """Median seconds of the student's inference on the batch (postprocess and NMS
        included) plus its detections to COCO results on the host."""
        torch = self.torch
        model, _ = self.detector(self.config.model, score_thr=max(score_thr, 0.0))
        model.eval()
        category_ids = list(range(1, self.num_classes + 1))

        def run():
            with torch.no_grad():
                out = model(self.images)
            results = []
            for i, d in enumerate(out):
                boxes, scores, labels = (d[k].cpu().numpy() for k in ("boxes", "scores", "labels"))
                if self.family == "faster_rcnn":
                    labels = labels - 1
                results += coco_eval.to_results(
                    {
                        "boxes": boxes[None],
                        "scores": scores[None],
                        "labels": labels[None],
                        "valid": np.ones((1, len(scores)), bool),
                    },
                    [i],
                    [True],
                    category_ids,
                )

        return median_seconds(run, steps)[1]


def bench_torch(torch, tv, config, num_classes, canvas, batch_size, steps, jd_rate):
    """Times torchvision's step, eager and (with --torch_compile) compiled."""
    side = TorchSide(torch, tv, config, num_classes, canvas, batch_size)
    side.build_train()
    row(
        "torch",
        f"{torch.__version__}, torchvision {tv.__version__}, {side.device.type}, "
        f"{torch.get_num_threads()} threads, float32",
    )
    row("torch model", TORCH_MODELS[side.family][2])
    widths = {config.model.width} | ({config.teacher.model.width} if side.losses else set())
    if widths != {1.0}:
        # :runlocal shrinks jdistill's networks; torchvision's have no width multiplier
        row("torch comparable", f"no: jdistill width {max(widths)}, torchvision's full width")
    for i, line in enumerate(side.describe):
        row(f"torch setup {i + 1}", line)
    first, step_s = median_seconds(side.step, steps)
    rate = batch_size / step_s
    row("torch eager step time", f"{1000 * step_s:.1f} ms (median of {steps})")
    row("torch eager images/s", f"{rate:.4g}")
    row("torch loss (sanity)", f"{side.last_loss:.4f}")
    if jd_rate:
        row("jdistill / torch eager", f"{jd_rate / rate:.2f}x")
    if not _TORCH_COMPILE.value:
        return
    try:
        side.compile()
        # torch.compile compiles on the first call; a second warm-up call absorbs a recompile
        first, step_s = median_seconds(side.step, steps, warmup=2)
    except Exception as e:  # noqa: BLE001 (report any compile failure and go on)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row("torch.compile", f"failed: {type(e).__name__}: {msg[:200]}")
        return
    rate = batch_size / step_s
    row("torch.compile warm-up (compile)", f"{first:.1f} s (2 steps)")
    row("torch.compile step time", f"{1000 * step_s:.1f} ms (median of {steps})")
    row("torch.compile images/s", f"{rate:.4g}")
    if jd_rate:
        row("jdistill / torch.compile", f"{jd_rate / rate:.2f}x")


# ============================================================================ main


def main(argv):
    del argv
    config = _CONFIG.value
    torch = tv = None
    if _AGAINST.value == "torchvision":
        # First: a missing venv fails at once, and torch must load before TensorFlow (triton,
        # which torch imports, crashes the process when TensorFlow's libraries are loaded).
        torch, tv = import_torchvision()
        # Both frameworks share the GPU: JAX takes memory as it needs it instead of 75% up front
        # (read when its backend starts, which is below).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import tensorflow as tf  # noqa: PLC0415 (tfds prepares the input data with it)

    tf.config.set_visible_devices([], "GPU")  # keep it off the accelerators JAX and torch use
    batch_size = _BATCH.value or config.batch_size
    override = parse_canvas(_CANVAS.value) if _CANVAS.value else None
    canvas = override or tuple(config.data.canvases[0])
    steps = _STEPS.value
    mesh = parallel.make_mesh()
    row("config", config_flags.get_config_filename(flags.FLAGS["config"]))
    row("devices", f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    row("host CPU", f"{cpu_model()}, {os.cpu_count()} cores")
    # other processes on the host slow every figure below (not equally: they come and go)
    row("host load (1 min)", f"{os.getloadavg()[0]:.2f}")
    row("canvas (H x W)", f"{canvas[0]} x {canvas[1]}")
    row("canvas source", "--canvas" if override else "the config's first")
    if _TRAIN.value or _INPUT.value:
        row("global batch", f"{batch_size}")
    if config.model.dtype != "float32":
        logging.warning("model dtype %s: torchvision runs float32", config.model.dtype)
    jd_rate = None
    if _TRAIN.value:
        jd_rate = bench_train(config, batch_size, canvas, _CLASSES.value, mesh, steps)
    if torch is not None and _TRAIN.value:
        bench_torch(torch, tv, config, _CLASSES.value, canvas, batch_size, steps, jd_rate)
    if _EVAL.value:
        eval_batch = _EVAL_BATCH.value or config.eval_batch_size
        _, total = bench_eval(config, eval_batch, canvas, _CLASSES.value, mesh, steps)
        if torch is not None:
            side = TorchSide(torch, tv, config, _CLASSES.value, canvas, eval_batch)
            t = side.eval_seconds(steps, _EVAL_THR.value) / eval_batch
            row("torch eager eval s/1000 img", f"{1000 * t:.1f} (forward + NMS + results)")
            row("jdistill / torch eager eval", f"{t / total:.2f}x")
    if _INPUT.value:
        rate = bench_input(config, batch_size, override, _INPUT_BATCHES.value)
        if jd_rate:
            verdict = "keeps ahead of" if rate > jd_rate else "falls behind"
            row(
                "input vs train step",
                f"{verdict} the step ({rate / jd_rate:.1f}x its {jd_rate:.4g} images/s; "
                "both share this host's cores when the device is the CPU)",
            )
    row("host load (1 min), at the end", f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    app.run(main)
