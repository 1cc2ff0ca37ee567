"""Faster R-CNN R50-FPN on Pascal VOC 07+12, the DeFeat reference's student baseline.

specs/defeat.md §6: trainval 07+12 at (1000, 600), 12 effective epochs (x0.1 after 9), lr 0.01,
batch 8 x 2 GPUs (normalisers per 8 images), no gradient clip, VOC07 11-point mAP on 2007 test.
Command (a VOCdevkit holding VOC2007 and VOC2012):
  python -m jdistill.main --config=configs/faster_rcnn_r50_voc.py --workdir=/tmp/frcnn_r50_voc \
      --config.data.root=/data/VOCdevkit --config.init=/ckpt/resnet50-19c8e357.pth
Expected: 80.52 VOC07 mAP (the reference's linked baseline checkpoint).
Hardware: 2 GPUs x 8 images (global batch 16), ~12.4k steps.
Arg `years=07` trains on VOC2007 trainval alone. `:runlocal` trains a tiny network a few steps
on ../shared/data/raccoon_voc (CI).
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False, years="0712")
    config = config_lib.voc_faster_rcnn(50, 0.01, args.years)
    if args.runlocal:
        config_lib.shrink_voc_for_runlocal(config)
    return config
