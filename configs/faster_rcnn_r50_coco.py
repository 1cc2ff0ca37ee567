"""Faster R-CNN R50-FPN on COCO 2017, mmdetection faster_rcnn_r50_fpn_1x_coco (`:2x` for 2x).

Command (COCO in its usual layout under /data/coco):
  python -m jdistill.main --config=configs/faster_rcnn_r50_coco.py --workdir=/tmp/frcnn_r50 \
      --config.data.root=/data/coco --config.init=/ckpt/resnet50-0676ba61.pth
Expected: 37.4 box AP (1x), 38.4 (2x), the mmdetection model-zoo numbers (RoIAlign here samples
a fixed 2 x 2 grid per bin; see configs' `roi_sampling_ratio`).
Hardware: 8 GPUs x 2 images (global batch 16), lr 0.02, ~90k steps for 1x.
`:runlocal` trains a tiny network a few steps on synthetic data (CI).
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False, schedule="1x", depth=50)
    config = config_lib.base(config_lib.faster_rcnn(args.depth), config_lib.coco_data(), lr=0.02)
    if args.schedule == "2x":
        config.schedule = config_lib.step_schedule(24, (16, 22))
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
