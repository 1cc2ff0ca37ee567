"""FGD: GFL R101 (mstrain 2x) teacher -> GFL R50 1x student on COCO 2017 (yzd-v/FGD README).

Student: mmdetection gfl_r50_fpn_1x_coco (40.2); teacher: gfl_r101_fpn_mstrain_2x_coco (44.9).
FGD (specs/distillers.md, jdistill/distill/fgd.py) on all 5 FPN levels with the original's
RetinaNet/GFL settings: t 0.5, alpha 1e-3, beta 5e-4, gamma 5e-4, lambda 5e-6 (they sit inside
the loss, so its weight is 1); no warm-up; gradient norm clipped at 35 (the original's config).
Padding cells are excluded (`count_padding=False`; True is the original's behaviour).
Command:
  python -m jdistill.main --config=configs/fgd_gfl.py --workdir=/tmp/fgd_gfl \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/gfl_r101_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected (published): student 40.2 -> 43.5 box AP, with the student's neck and head starting
from the teacher's weights (the original's `init_student`: every non-backbone weight), which
this config does (`distill.init_from_teacher=True`; off by default elsewhere).
Hardware: 8 GPUs x 2 images (global batch 16), 12 epochs.
`:runlocal` uses a tiny random teacher (with a warning) on synthetic data.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.gfl(50), config_lib.coco_data(), lr=0.01)
    config.optimizer.grad_clip = 35.0
    config.teacher = config_lib.teacher(config_lib.gfl(101))
    config.distill = config_lib.distill_preset("fgd_gfl")
    config.distill.init_from_teacher = True  # the published recipe
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
