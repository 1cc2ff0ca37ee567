"""FRS: RetinaNet R101 teacher -> RetinaNet R50 student on COCO 2017 (FRS paper, Table 1).

Student: mmdetection retinanet_r50_fpn_2x_coco; teacher: retinanet_r101 (38.9).
FRS weights (specs/frs.md): feature 0.005, classification 0.02, linear warm-up over 500 steps,
per-level 3x3 adapters.
Command:
  python -m jdistill.main --config=configs/frs_retinanet.py --workdir=/tmp/frs_retina \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/retinanet_r101_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: student 37.4 -> 39.7 box AP (AP50 58.6, AP75 42.4, APs 21.8, APm 43.5, APl 52.4).
Hardware: 8 GPUs x 2 images (global batch 16), 24 epochs.
`:runlocal` uses a tiny random teacher (with a warning) on synthetic data.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.retinanet(50), config_lib.coco_data(), lr=0.01)
    config.schedule = config_lib.step_schedule(24, (16, 22))
    config.teacher = config_lib.teacher(config_lib.retinanet(101))
    config.distill = config_lib.distill_preset("frs_retinanet", warmup_steps=500)
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
