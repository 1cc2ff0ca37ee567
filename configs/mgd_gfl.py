"""MGD: GFL R101 (mstrain 2x) teacher -> GFL R50 1x student on COCO 2017.

Student: mmdetection gfl_r50_fpn_1x_coco (40.2); teacher: gfl_r101_fpn_mstrain_2x_coco (44.9).
MGD (specs/distillers.md, jdistill/distill/mgd.py) on all 5 FPN levels with the published
RetinaNet settings: mask ratio lambda 0.65, alpha 2e-5 (inside the loss: weight 1), a
generation block per level; no warm-up; gradient norm clipped at 35 (mmrazor's config). The
per-step masks come from the trainer's per-step key (`batch["rng"]`). Padding cells are excluded
(`count_padding=False`; True is the original's behaviour). 1x schedule, as the other GFL rows.
Command:
  python -m jdistill.main --config=configs/mgd_gfl.py --workdir=/tmp/mgd_gfl \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/gfl_r101_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: no published MGD result on GFL; MGD's published runs (RetinaNet, 37.4 -> 41.0) start
the student's neck and head from the teacher's weights, as here
(`distill.init_from_teacher=True`). Compare with FGD on this pair (40.2 -> 43.5 with that start)
and FRS (40.2 -> 43.6 without it).
Hardware: 8 GPUs x 2 images (global batch 16), 12 epochs.
`:runlocal` uses a tiny random teacher (with a warning) on synthetic data.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.gfl(50), config_lib.coco_data(), lr=0.01)
    config.optimizer.grad_clip = 35.0
    config.teacher = config_lib.teacher(config_lib.gfl(101))
    config.distill = config_lib.distill_preset("mgd_retinanet")  # no GFL recipe is published
    config.distill.init_from_teacher = True  # the published recipe
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
