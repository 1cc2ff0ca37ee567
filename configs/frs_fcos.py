"""FRS: FCOS R101-caffe (mstrain 2x) teacher -> FCOS R50-caffe mstrain 640-800 2x student.

Student: fcos_r50_caffe_fpn_gn-head_mstrain_640-800_2x_coco; teacher:
fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco (40.8). FRS: feature weight 0.01,
classification weight 0.05 on the class logits only (centerness unused), warm-up 500.
Command:
  python -m jdistill.main --config=configs/frs_fcos.py --workdir=/tmp/frs_fcos \
      --config.data.root=/data/coco --config.teacher.init=/ckpt/fcos_r101_orbax \
      --config.init=/ckpt/resnet50_caffe-788b5fa3.pth
Expected: student 38.5 -> 40.9 box AP (AP50 60.3, AP75 43.6, APs 25.7, APm 45.2, APl 51.2).
Hardware: 8 GPUs x 2 images (global batch 16), 24 epochs.
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    config = config_lib.base(config_lib.fcos(50), config_lib.fcos_mstrain_data(), lr=0.01)
    config.optimizer = config_lib.fcos_optimizer()
    config.schedule = config_lib.fcos_schedule(24, (16, 22))
    config.teacher = config_lib.teacher(config_lib.fcos(101))
    config.distill = config_lib.distill_preset("frs_fcos", warmup_steps=500)
    if args.runlocal:
        config_lib.shrink_for_runlocal(config)
    return config
