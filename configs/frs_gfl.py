"""FRS: GFL R101 (mstrain 2x) teacher -> GFL R50 1x student on COCO 2017, the paper's best row.

Student: mmdetection gfl_r50_fpn_1x_coco. Teacher: gfl_r101_fpn_mstrain_2x_coco (44.9).
FRS (specs/frs.md): feature weight 0.1, classification weight 0.05 on GFL's joint
class-quality logits, linear warm-up 500 steps, per-level 3x3 adapters.
Command:
  python -m jdistill.main --config=configs/frs_gfl.py --workdir=/tmp/frs_gfl \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/gfl_r101_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: student 40.2 -> 43.6 box AP (AP50 61.9, AP75 47.5, APs 25.9, APm 47.7, APl 56.4).
Hardware: 8 GPUs x 2 images (global batch 16), 12 epochs.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.gfl(50), config_lib.coco_data(), lr=0.01)
    config.teacher = config_lib.teacher(config_lib.gfl(101))
    config.distill = config_lib.distill_preset("frs_gfl", warmup_steps=500)
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
