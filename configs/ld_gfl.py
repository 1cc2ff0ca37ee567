"""LD: GFL R101 (mstrain 2x) teacher -> GFL R50 1x student on COCO 2017, mmdetection's
configs/ld (ld_r50_gflv1_r101_fpn_coco_1x).

Student: mmdetection gfl_r50_fpn_1x_coco (40.1 in the LD README). Teacher:
gfl_r101_fpn_mstrain_2x_coco (44.7-44.9).
LD (specs/distillers.md, jdistill/distill/ld.py), main region only as mmdetection ships it: at
the student's ATSS positives, KL between the two box-side distributions at temperature 10,
weighted by the student's max class score, weight 0.25, no warm-up. The student's own GFL losses
are unchanged (mmdetection's LDHead also divides its GIoU and DFL terms by sum w + 1e-6 instead
of GFL's clamp to 1, a difference only when a GPU has almost no positives).
Command:
  python -m jdistill.main --config=configs/ld_gfl.py --workdir=/tmp/ld_gfl \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/gfl_r101_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: student 40.1 -> 41.0 box AP (mmdetection configs/ld README).
Hardware: 8 GPUs x 2 images (global batch 16), 12 epochs.
`:runlocal` uses a tiny random teacher (with a warning) on synthetic data.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.gfl(50), config_lib.coco_data(), lr=0.01)
    config.teacher = config_lib.teacher(config_lib.gfl(101))
    config.distill = config_lib.distill_preset("ld_gfl")
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
