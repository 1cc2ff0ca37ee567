"""Faster R-CNN R101-FPN on COCO 2017, mmdetection faster_rcnn_r101_fpn_1x_coco (`:2x`).

FRS's Faster R-CNN teacher is the 2x model (39.4 box AP in the FRS paper's table).
Command:
  python -m jdistill.main --config=configs/faster_rcnn_r101_coco.py:2x --workdir=/tmp/frcnn_r101 \
      --config.data.root=/data/coco --config.init=/ckpt/resnet101-63fe2227.pth
Expected: 39.4 box AP (1x), 39.8 (2x), the mmdetection model-zoo numbers.
Hardware: 8 GPUs x 2 images (global batch 16).
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False, schedule="1x")
    config = config_lib.base(config_lib.faster_rcnn(101), config_lib.coco_data(), lr=0.02)
    if args.schedule == "2x":
        config.schedule = config_lib.step_schedule(24, (16, 22))
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
