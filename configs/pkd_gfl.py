"""PKD: GFL R101 (mstrain 2x) teacher -> GFL R50 1x student on COCO 2017.

Student: mmdetection gfl_r50_fpn_1x_coco (40.2). Teacher: gfl_r101_fpn_mstrain_2x_coco (44.9).
PKD (specs/distillers.md, jdistill/distill/pkd.py) on the FPN features: per-channel
standardised MSE / 2, weight 6 on all five levels, stats per group of 2 images (the per-GPU
batch), no warm-up: the PKD term of CrossKD + PKD (jbwang1997/CrossKD, `loss_feat_kd`), the only
published use of PKD on this GFL pair. mmrazor's own PKD configs would use weight 10 on levels
0-3 for a dense student (`--config.distill.losses.pkd.weight=10`,
`--config.distill.losses.pkd.max_levels=4`).
Command:
  python -m jdistill.main --config=configs/pkd_gfl.py --workdir=/tmp/pkd_gfl \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/gfl_r101_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: no PKD-only number is published for this pair; CrossKD + PKD (this term plus CrossKD)
reaches 40.2 -> 43.9 box AP, and PKD alone should land between the student and that.
Hardware: 8 GPUs x 2 images (global batch 16), 12 epochs.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.gfl(50), config_lib.coco_data(), lr=0.01)
    config.teacher = config_lib.teacher(config_lib.gfl(101))
    config.distill = config_lib.distill_preset("pkd_gfl")
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
