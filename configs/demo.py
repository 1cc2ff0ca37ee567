"""The embedded demo: distil a RetinaNet on `synthetic_shapes`, on a CPU, in minutes.

Command:
  python -m jdistill.main --config=configs/demo.py --workdir=/tmp/demo
Trains a ResNet-34 teacher, then a ResNet-18 baseline student and a ResNet-18 FRS student
(frs_feat + frs_cls from that teacher) on the generated shapes data set (no download), prints
the three mAPs and writes <workdir>/demo_results.json.
Expected on a 2-core CPU: about 12 minutes; the teacher scores above the baseline, and FRS
narrows the gap (see README for measured numbers).
`:runlocal` shrinks it to a few steps (CI).
"""

from jdistill import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg, runlocal=False)
    data = config_lib.coco_data(builder="synthetic_shapes")
    data.scales = ((160, 128),)
    data.canvases = ((128, 160), (160, 128))
    data.max_boxes = 8
    data.num_workers = 2
    config = config_lib.base(config_lib.scratch_retinanet(18, 0.25, 32), data, lr=0.02)
    config.batch_size = 16
    config.eval_batch_size = 16
    config.log_every = 50  # 48 step lines in all: the demo's log fits on two screens
    config.checkpoint_every = 200
    config.optimizer.grad_clip = 10.0  # from scratch, early steps spike without it
    config.schedule.epochs = 12
    config.schedule.milestones = (10, 11)  # decay late: short runs are still improving at 8/12
    config.schedule.warmup_steps = 100
    config.demo = config_lib.demo_block(
        config_lib.scratch_retinanet(34, 0.5, 64),
        config_lib.scratch_retinanet(18, 0.25, 32),
        teacher_steps=1000,
        student_steps=700,
    )
    # FRS with the demo's own weights (the published ones suit full-size COCO models)
    config.distill = config_lib.distill_preset(
        "frs_retinanet",
        warmup_steps=100,
        frs_feat=dict(weight=0.05),
        frs_cls=dict(weight=0.05),
    )
    if args.runlocal:
        config_lib.shrink_demo_for_runlocal(config)
        # 8 images: one per device when the tests simulate 8 devices
        config.batch_size = 8
        config.eval_batch_size = 8
        config.data.canvases = ((160, 160),)  # one canvas: one compile per function
    return config
