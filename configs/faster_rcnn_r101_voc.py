"""Faster R-CNN R101-FPN on Pascal VOC 07+12, the DeFeat reference's teacher.

As faster_rcnn_r50_voc.py with ResNet-101 and lr 0.02 (`voc_faster_rcnn_r101.py`).
Command:
  python -m jdistill.main --config=configs/faster_rcnn_r101_voc.py --workdir=/tmp/frcnn_r101_voc \
      --config.data.root=/data/VOCdevkit --config.init=/ckpt/resnet101-5d3b4d8f.pth
Expected: 82.27 VOC07 mAP (the teacher the DeFeat reference distils from).
Hardware: 2 GPUs x 8 images (global batch 16).
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False, years="0712")
    config = config_lib.voc_faster_rcnn(101, 0.02, args.years)
    if args.runlocal:
        config_lib.shrink_voc_for_runlocal(config)
    return config
