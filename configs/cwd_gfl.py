"""CWD on the classification logits: GFL R101 (mstrain 2x) teacher -> GFL R50 1x student on
COCO 2017 (mmrazor v0.x cwd_cls_head_gfl_r101_fpn_gfl_r50_fpn_1x_coco).

Student: mmdetection gfl_r50_fpn_1x_coco (40.2). Teacher: gfl_r101_fpn_mstrain_2x_coco (44.7
in mmrazor's table). CWD (specs/distillers.md, jdistill/distill/cwd.py, `cwd_logits`): the
spatial KL of every (image, class) channel of `gfl_cls`'s logits, tau 1, weight 5, on all five
levels, no warm-up.
Command:
  python -m jdistill.main --config=configs/cwd_gfl.py --workdir=/tmp/cwd_gfl \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/gfl_r101_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: student 40.2 -> 41.9 box AP (mmrazor CWD README).
Hardware: 8 GPUs x 2 images (global batch 16), 12 epochs.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.gfl(50), config_lib.coco_data(), lr=0.01)
    config.teacher = config_lib.teacher(config_lib.gfl(101))
    config.distill = config_lib.distill_preset("cwd_gfl")
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
