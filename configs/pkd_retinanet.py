"""PKD: RetinaNet R101 teacher -> RetinaNet R50 2x student on COCO 2017 (mmrazor
pkd_fpn_retina_x101_retina_r50_2x_coco, with the teacher we have).

Student: mmdetection retinanet_r50_fpn_2x_coco (37.4). Teacher: retinanet_r101_fpn_2x_coco
(38.9); the published run used RetinaNet X-101-64x4d (41.0), a backbone jdistill lacks.
PKD (specs/distillers.md, jdistill/distill/pkd.py) on FPN levels 0-3 (P3..P6), weight 10, stats
per group of 2 images (the per-GPU batch), no warm-up, as mmrazor's config.
Command:
  python -m jdistill.main --config=configs/pkd_retinanet.py --workdir=/tmp/pkd_retina \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/retinanet_r101_2x_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: published 37.4 -> 40.8 box AP from the X-101 teacher (mmrazor PKD README); an R101
teacher (38.9) should give less.
Hardware: 8 GPUs x 2 images (global batch 16), 24 epochs.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.retinanet(50), config_lib.coco_data(), lr=0.01)
    config.schedule = config_lib.step_schedule(24, (16, 22))
    config.teacher = config_lib.teacher(config_lib.retinanet(101))
    config.distill = config_lib.distill_preset("pkd_retinanet")
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
