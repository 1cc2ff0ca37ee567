"""FRS: Faster R-CNN R101 (2x) teacher -> Faster R-CNN R50 1x student on COCO 2017.

The richness mask comes from the teacher's RPN objectness on P2..P6 (specs/frs.md: K = 3
anchors, one class); the classification term compares the RPN objectness of student and
teacher. Feature weight 0.002, classification weight 0.1, linear warm-up 500 steps.
Command:
  python -m jdistill.main --config=configs/frs_faster_rcnn.py --workdir=/tmp/frs_frcnn \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/faster_rcnn_r101_2x.pth \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: student 37.4 -> 39.5 box AP (AP50 60.1, AP75 43.3), the FRS paper's row.
Hardware: 8 GPUs x 2 images (global batch 16), 12 epochs.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.faster_rcnn(50), config_lib.coco_data(), lr=0.02)
    config.teacher = config_lib.teacher(config_lib.faster_rcnn(101))
    config.distill = config_lib.distill_preset("frs_faster_rcnn", warmup_steps=500)
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
