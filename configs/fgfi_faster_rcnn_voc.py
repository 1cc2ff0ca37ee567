"""FGFI baseline as the DeFeat reference runs it (`voc_stu_faster_rcnn_r50_FGFI.py`).

R101 teacher -> R50 student on VOC 07+12: RoI-anchor masks (phi 0.5) per FPN level with the
gts assigned to that level, foreground term only (weight 3, normalised by 2 C N_p), lr 0.02,
batch 4 x 2 GPUs (normalisers per 4 images), grad clip 35.
Command:
  python -m jdistill.main --config=configs/fgfi_faster_rcnn_voc.py --workdir=/tmp/fgfi \
      --config.data.root=/data/VOCdevkit --config.teacher.init=/tmp/frcnn_r101_voc \
      --config.init=/ckpt/resnet50-19c8e357.pth
Expected: about 81.0-81.2 VOC07 mAP (the reference README's FGFI rows).
Hardware: 2 GPUs x 4 images (global batch 8).
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False, years="0712")
    config = config_lib.voc_faster_rcnn(50, 0.02, args.years)
    config.batch_size = 8
    config.model.loss_group_size = 4
    config.optimizer.grad_clip = 35.0
    config.teacher = config_lib.teacher(config_lib.voc_faster_rcnn(101, 0.02).model)
    config.distill = config_lib.distill_preset("fgfi")
    if args.runlocal:
        config_lib.shrink_voc_for_runlocal(config)
        config.distill.losses.defeat_neck.group_size = 0
    return config
