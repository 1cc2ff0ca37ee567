"""CrossKD + PKD: GFL R101 (mstrain 2x) teacher -> GFL R50 1x student on COCO 2017
(jbwang1997/CrossKD configs/crosskd+pkd/crosskd+pkd_r50_gflv1_r101-2x-ms_fpn_1x_coco.py).

Student: mmdetection gfl_r50_fpn_1x_coco (40.2). Teacher: gfl_r101_fpn_mstrain_2x_coco (44.9).
CrossKD as configs/crosskd_gfl.py, plus PKD (jdistill/distill/pkd.py; the original's
`loss_feat_kd=PKDLoss(loss_weight=6)`) on all five FPN levels, statistics per group of 2 images
(the per-GPU batch). No warm-up.
Command:
  python -m jdistill.main --config=configs/crosskd_pkd_gfl.py --workdir=/tmp/crosskd_pkd_gfl \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/gfl_r101_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: student 40.2 -> 43.9 box AP (CrossKD README).
Hardware: 8 GPUs x 2 images (global batch 16), 12 epochs.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.gfl(50), config_lib.coco_data(), lr=0.01)
    config.teacher = config_lib.teacher(config_lib.gfl(101))
    config.distill = config_lib.distill_preset("crosskd_pkd_gfl")
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
