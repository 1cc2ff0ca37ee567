"""Distillation on real photos: the BCCD blood-cell set (`../shared/data/bccd_voc`, VOC layout).

292 trainval / 72 test microscope photos at 640 x 480, 3 classes (RBC, WBC, Platelets), about
13 boxes per image, trained from scratch on a CPU at half size (320 x 240).

Commands:
  python -m jdistill.main --config=configs/bccd.py --workdir=/tmp/bccd
      the teacher (RetinaNet ResNet-34, width 0.5), then the baseline student (ResNet-18, width
      0.25) and the FRS student, as the demo runs them; <workdir>/demo_results.json
  python scripts/compare.py --config=configs/bccd.py --workdir=/tmp/bccd_compare
      the same teacher, then the baseline and every method over 3 seeds (README, "Distillation
      on real photos")
Another VOC-layout data set, through the same recipe (both commands take overrides):
  --config.data.root=/data/VOCdevkit --config.data.class_names="()"
  ("()": the names its annotations use, sorted; `data.voc_years` which VOC<year> folders).
`:runlocal` shrinks it to a few steps.
"""

import os

from jdistill import config_lib

SHARED_BCCD = os.path.join(
    os.path.dirname(config_lib.__file__), "..", "..", "shared", "data", "bccd_voc"
)


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    data = config_lib.voc_data(root=os.path.abspath(SHARED_BCCD), years="07")
    data.class_names = ("RBC", "WBC", "Platelets")
    data.scales = ((320, 240),)
    # BCCD is all landscape; a portrait photo of another set takes the transposed canvas.
    data.canvases = config_lib.landscape_and_portrait((256, 320))
    data.max_boxes = 64
    data.voc_ap_mode = "area"
    data.num_workers = 2
    config = config_lib.base(config_lib.scratch_retinanet(18, 0.25, 64, 100), data, lr=0.02)
    config.batch_size = 8
    config.eval_batch_size = 8
    config.log_every = 50
    config.checkpoint_every = 500
    config.optimizer.grad_clip = 10.0  # from scratch, early steps spike without it
    config.schedule.epochs = 12
    config.schedule.milestones = (10, 11)
    config.schedule.warmup_steps = 100
    # Up to 40 cells per image: keep 100 detections.
    config.demo = config_lib.demo_block(
        config_lib.scratch_retinanet(34, 0.5, 64, max_per_img=100),
        config_lib.scratch_retinanet(18, 0.25, 64, max_per_img=100),
        teacher_steps=2000,
        student_steps=300,
    )
    config.distill = config_lib.distill_preset(
        "frs_retinanet",
        warmup_steps=100,
        frs_feat=dict(weight=0.05),
        frs_cls=dict(weight=0.05),
    )
    if args.runlocal:
        config_lib.shrink_demo_for_runlocal(config)
    return config
