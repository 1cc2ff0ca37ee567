"""CrossKD: GFL R101 (mstrain 2x) teacher -> GFL R50 1x student on COCO 2017
(jbwang1997/CrossKD configs/crosskd/crosskd_r50_gflv1_r101-2x-ms_fpn_1x_coco.py).

Student: mmdetection gfl_r50_fpn_1x_coco (40.2). Teacher: gfl_r101_fpn_mstrain_2x_coco (44.9).
CrossKD (specs/distillers.md, jdistill/distill/crosskd.py): the student's tower features after
conv 3 of 4, re-standardised to the teacher's statistics, run through the teacher's 4th tower
conv, gfl_cls / gfl_reg and Scale; KD quality focal loss (beta 1, weight 1) on the classes and
KL of the box-side distributions (T 1, weight 4, weighted by the teacher's max score) against
the teacher's predictions. No warm-up, no new parameters.
Command:
  python -m jdistill.main --config=configs/crosskd_gfl.py --workdir=/tmp/crosskd_gfl \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/gfl_r101_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: student 40.2 -> 43.7 box AP (CrossKD README).
Hardware: 8 GPUs x 2 images (global batch 16), 12 epochs.
`:runlocal` uses a tiny random teacher (with a warning) on synthetic data; its heads have one
tower conv, so the cut falls at the neck and the teacher's whole tower runs on the student's.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.gfl(50), config_lib.coco_data(), lr=0.01)
    config.teacher = config_lib.teacher(config_lib.gfl(101))
    config.distill = config_lib.distill_preset("crosskd_gfl")
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
