"""DeFeat: Faster R-CNN R101 teacher -> R50 student on Pascal VOC 07+12.

`released` (default): the reference config (`voc_stu_faster_rcnn_r50_decouple_neck.py`):
decoupled neck terms only, fg weight 3, bg weight 12, gt masks, lr 0.01, batch 8 x 2, grad
clip 35. `:paper` adds the decoupled proposal KD with consistent labels (the teacher's RoI head
on the student's sampled RoIs), weights 2 and 2, temperatures 1 and 1.
Command:
  python -m jdistill.main --config=configs/defeat_faster_rcnn_voc.py --workdir=/tmp/defeat \
      --config.data.root=/data/VOCdevkit --config.teacher.init=/tmp/frcnn_r101_voc \
      --config.init=/ckpt/resnet50-19c8e357.pth
Expected: student 80.52 -> 82.04 VOC07 mAP (the reference README's row, specs/defeat.md §8).
Hardware: 2 GPUs x 8 images (global batch 16).
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False, paper=False, years="0712")
    config = config_lib.voc_faster_rcnn(50, 0.01, args.years)
    config.optimizer.grad_clip = 35.0
    config.teacher = config_lib.teacher(config_lib.voc_faster_rcnn(101, 0.02).model)
    config.distill = config_lib.distill_preset("defeat_paper" if args.paper else "defeat_released")
    if args.runlocal:
        config_lib.shrink_voc_for_runlocal(config)
        for c in config.distill.losses.values():
            c.group_size = 0  # runlocal's 8 images may be split over 8 devices
    return config
