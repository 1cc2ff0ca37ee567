"""Shared config blocks (model, data, optimizer, schedule) and `parse_arg`.

Configs are ml_collections files with `get_config(arg=None)`; `arg` is a comma-separated list
of flags and key=value pairs, e.g. `configs/frs_retinanet.py:runlocal`.
"""

import ml_collections


def parse_arg(arg, **defaults):
    """Parses 'runlocal,depth=18' into a ConfigDict over `defaults`.

    A bare name sets a boolean default to True; key=value casts to the default's type. Unknown
    keys are an error naming the known ones.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
        if not value:
            out[key] = True
        elif isinstance(defaults[key], bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(defaults[key])(value)
    return out


def retinanet(depth=50):
    """mmdetection retinanet_r{depth}_fpn: ResNet + FPN (P6 on C5) + RetinaHead, COCO settings."""
    return ml_collections.ConfigDict(
        dict(
            family="retinanet",
            depth=depth,
            style="pytorch",
            frozen_stages=1,
            norm_trainable=True,  # BN affine params train (requires_grad=True)
            norm_eval=True,  # BN on running statistics (False: batch statistics, for scratch)
            width=1.0,
            neck_channels=256,
            stacked_convs=4,
            octave_base_scale=4,
            scales_per_octave=3,
            anchor_ratios=(0.5, 1.0, 2.0),
            pos_iou_thr=0.5,
            neg_iou_thr=0.4,
            min_pos_iou=0.0,
            focal_alpha=0.25,
            focal_gamma=2.0,
            cls_loss_weight=1.0,
            bbox_loss_weight=1.0,
            # Images per normalisation group: mmdetection normalises per GPU of 2 images.
            loss_group_size=2,
            test_score_thr=0.05,
            test_nms_pre=1000,
            test_nms_iou=0.5,
            test_max_per_img=100,
            dtype="float32",
            init="",  # a checkpoint for the student before training (e.g. a converted backbone)
            init_skip=(),  # regexes of param paths left at their initial values when loading
        )
    )


def coco_data(root="", builder="coco_folder"):
    """COCO 2017 at mmdetection's (1333, 800), landscape/portrait canvases of 1344 x 800."""
    return ml_collections.ConfigDict(
        dict(
            builder=builder,
            root=root,
            data_dir="",
            train_split="train",
            eval_split="validation",
            scales=((1333, 800),),  # (long_max, short_max) per training scale
            canvases=((800, 1344), (1344, 800)),  # (H, W) of the fixed input shapes
            flip_ratio=0.5,
            max_boxes=100,
            num_workers=8,
            prefetch=4,
        )
    )


def sgd(lr):
    """mmdetection's SGD: momentum 0.9, weight decay 1e-4 on every trainable param."""
    return ml_collections.ConfigDict(dict(lr=lr, momentum=0.9, weight_decay=1e-4, grad_clip=0.0))


def step_schedule(epochs=12, milestones=(8, 11)):
    """Linear warm-up (500 iterations from 0.001x) then x0.1 at each milestone epoch."""
    return ml_collections.ConfigDict(
        dict(
            epochs=epochs,
            milestones=milestones,
            warmup="linear",
            warmup_steps=500,
            warmup_ratio=0.001,
            num_steps=-1,  # > 0 overrides epochs; milestones then scale with it
        )
    )


def base(model, data, lr):
    """The top-level config every experiment starts from."""
    return ml_collections.ConfigDict(
        dict(
            seed=520,  # the FRS reference's seed
            runlocal=False,
            model=model,
            data=data,
            batch_size=16,  # global: mmdetection's 8 GPUs x 2 images
            eval_batch_size=8,
            optimizer=sgd(lr),
            schedule=step_schedule(),
            init="",
            log_every=50,
            checkpoint_every=2000,
            keep_checkpoints=3,
            eval_every=0,  # 0: evaluate at the end only
            eval_max_images=0,  # 0: the whole split
            num_vis_images=4,
            param_sharding=(),  # (regex, mesh axis) rules for FSDP; replicated by default
            teacher=None,
            distill=None,
        )
    )


def shrink_for_runlocal(config, steps=4):
    """Tiny widths, small images and a few steps, so CI runs every config end to end."""
    for m in [config.model] + ([config.teacher.model] if config.get("teacher") else []):
        m.width = 0.125
        m.neck_channels = 32
        m.stacked_convs = 1
        m.test_nms_pre = 100
        m.test_max_per_img = 20
        m.init = ""
    config.runlocal = True
    if config.data.builder == "coco_folder" and not config.data.root:
        config.data.builder = "synthetic_shapes"
    config.data.scales = ((128, 96),)
    config.data.canvases = ((96, 128), (128, 96))
    config.data.max_boxes = 8
    config.data.num_workers = 2
    # 8 images: one per device when the tests simulate 8 devices
    config.batch_size = 8
    config.eval_batch_size = 8
    config.schedule.num_steps = steps
    config.schedule.warmup_steps = 2
    config.log_every = 1
    config.checkpoint_every = 2
    config.eval_max_images = 4
    config.num_vis_images = 2
    if config.get("distill"):
        config.distill.warmup_steps = 2
    return config
