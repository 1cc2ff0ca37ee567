"""FCOS R101-caffe-FPN GN-head, multi-scale 640/800, 2x: the FRS FCOS teacher
(mmdetection fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco).

Command:
  python -m jdistill.main --config=configs/fcos_r101_caffe_mstrain_2x_coco.py \
      --workdir=/tmp/fcos_r101 --config.data.root=/data/coco \
      --config.init=/ckpt/resnet101_caffe-3ad79236.pth
Expected: 40.8 box AP (model zoo).
Hardware: 8 GPUs x 2 images (global batch 16), 24 epochs.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.fcos(101), config_lib.fcos_mstrain_data(), lr=0.01)
    config.optimizer = config_lib.fcos_optimizer()
    config.schedule = config_lib.fcos_schedule(24, (16, 22))
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
