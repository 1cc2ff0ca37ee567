"""GFL R50-FPN 1x on COCO 2017, mmdetection gfl_r50_fpn_1x_coco (the FRS GFL student).

Command:
  python -m jdistill.main --config=configs/gfl_r50_coco.py --workdir=/tmp/gfl_r50 \
      --config.data.root=/data/coco --config.init=/ckpt/resnet50-0676ba61.pth
Expected: 40.2 box AP (mmdetection model zoo).
Hardware: 8 GPUs x 2 images (global batch 16), 12 epochs (~90k steps).
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.gfl(50), config_lib.coco_data(), lr=0.01)
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
