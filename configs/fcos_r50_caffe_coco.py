"""FCOS R50-caffe-FPN GN-head 1x on COCO 2017: mmdetection fcos_r50_caffe_fpn_gn-head_1x_coco.

caffe-style ResNet (BGR input, mean-only normalisation, BN fully frozen), ReLU before P7,
bias lr x2 without decay, gradient clip 35, constant warm-up 1/3 over 500 steps.
`:mstrain` switches to the FRS student, fcos_r50_caffe_fpn_gn-head_mstrain_640-800_2x_coco.
Command:
  python -m jdistill.main --config=configs/fcos_r50_caffe_coco.py --workdir=/tmp/fcos_r50 \
      --config.data.root=/data/coco --config.init=/ckpt/resnet50_caffe-788b5fa3.pth
Expected: 36.6 box AP (1x), 38.5 (mstrain 2x), the model-zoo numbers.
Hardware: 8 GPUs x 2 images (global batch 16).
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False, mstrain=False)
    data = config_lib.fcos_mstrain_data() if args.mstrain else config_lib.coco_data()
    config = config_lib.base(config_lib.fcos(50), data, lr=0.01)
    config.optimizer = config_lib.fcos_optimizer()
    config.schedule = (
        config_lib.fcos_schedule(24, (16, 22)) if args.mstrain else config_lib.fcos_schedule()
    )
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
