"""PKD across detector families: FCOS R101-caffe teacher -> RetinaNet R50 1x student on COCO 2017
(mmrazor pkd_fpn_fcos_x101_retina_r50_1x_coco, with the teacher we have).

Student: mmdetection retinanet_r50_fpn_1x_coco (36.5). Teacher:
fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco (40.8); the published run used FCOS
X-101-64x4d, a backbone jdistill lacks. Each model sees the canvas in its own style (the teacher
caffe BGR, the student pytorch RGB). PKD pairs the two FPNs by stride (P3..P7 on both sides),
distils the first 4 pairs (P3..P6) with weight 10 and per-channel statistics per group of 2
images, as mmrazor's config. Head-level methods (FRS's class term, CrossKD, LD) refuse this
pair; the feature-level ones (FRS feature term, PKD, CWD, MGD, FGD, DeFeat's neck) accept it.
Command:
  python -m jdistill.main --config=configs/pkd_fcos_to_retinanet.py --workdir=/tmp/pkd_x \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/fcos_r101_orbax \
      --config.init=/ckpt/resnet50-0676ba61.pth
Expected: published 36.5 -> 40.3 box AP from the X-101 teacher (mmrazor PKD README); an R101
teacher (40.8) should give somewhat less.
Hardware: 8 GPUs x 2 images (global batch 16), 12 epochs.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.retinanet(50), config_lib.coco_data(), lr=0.01)
    config.teacher = config_lib.teacher(config_lib.fcos(101))
    config.distill = config_lib.distill_preset("pkd_retinanet")  # mmrazor's, for this pair too
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
