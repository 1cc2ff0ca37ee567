"""CrossKD: RetinaNet R101 2x teacher -> RetinaNet R50 2x student on COCO 2017
(jbwang1997/CrossKD configs/crosskd/crosskd_r50_retinanet_r101_fpn_2x_coco.py).

Student: mmdetection retinanet_r50_fpn_2x_coco (37.4). Teacher: retinanet_r101_fpn_2x_coco
(38.9).
CrossKD (specs/distillers.md, jdistill/distill/crosskd.py): the student's tower features after
conv 3 of 4 (conv with bias, before its ReLU), re-standardised to the teacher's statistics, run
through the teacher's 4th tower conv and retina_cls / retina_reg; KD quality focal loss (beta 1,
weight 1) on the classes and GIoU (weight 1, weighted by the teacher's max score) between the
boxes the two predictions decode to on the anchors, both normalised by the positives. No
warm-up, no new parameters.
Difference from the original: its student's FPN builds the extra levels 'on_output', unlike
mmdetection's RetinaNet and its teacher ('on_input'); here the student keeps RetinaNet's
'on_input'.
Command:
  python -m jdistill.main --config=configs/crosskd_retinanet.py --workdir=/tmp/crosskd_retina \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/retinanet_r101_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: student 37.4 -> 39.7 box AP (CrossKD README, RetinaNet table; 39.8 with PKD).
Hardware: 8 GPUs x 2 images (global batch 16), 24 epochs.
`:runlocal` uses a tiny random teacher (with a warning) on synthetic data.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.retinanet(50), config_lib.coco_data(), lr=0.01)
    config.schedule = config_lib.step_schedule(24, (16, 22))
    config.teacher = config_lib.teacher(config_lib.retinanet(101))
    config.distill = config_lib.distill_preset("crosskd_retinanet")
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
