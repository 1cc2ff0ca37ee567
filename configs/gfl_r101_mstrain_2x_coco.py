"""GFL R101-FPN, multi-scale 2x, on COCO 2017: mmdetection gfl_r101_fpn_mstrain_2x_coco.

The FRS GFL teacher. Training short side uniform in [480, 800] (long 1333), one scale per batch
on four canvas sizes per orientation; test at (1333, 800).
Command:
  python -m jdistill.main --config=configs/gfl_r101_mstrain_2x_coco.py --workdir=/tmp/gfl_r101 \
      --config.data.root=/data/coco --config.init=/ckpt/resnet101-63fe2227.pth
Expected: 44.7 box AP (model zoo; the FRS paper quotes 44.9).
Hardware: 8 GPUs x 2 images (global batch 16), 24 epochs.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.gfl(101), config_lib.gfl_mstrain_data(), lr=0.01)
    config.schedule = config_lib.step_schedule(24, (16, 22))
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
