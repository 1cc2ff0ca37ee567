"""Helpers of the distiller tests: detector specs, random feature maps and taps, padding junk,
reference sums, and the registry, gradient, jit and bfloat16 checks every distiller shares."""

from .batches import MAP_CANVAS, batch_of

FPN_LEVELS = ("p3", "p4", "p5", "p6", "p7")
FPN_STRIDES = (8, 16, 32, 64, 128)


def det_spec(family="retinanet", levels=FPN_LEVELS, strides=FPN_STRIDES, channels=4, **fields):
    """An `api.DetectorSpec` for calling losses directly: 3 classes, one prior per cell, no
    anchor settings, GFL's reg_max 0, the `neck` and `head/cls_logits` taps, unless `fields`
    say otherwise; fields not named (loss taps, views, any the API adds later) are empty."""
    import dataclasses

    from jdistill.distill import api

    values = {f.name: () for f in dataclasses.fields(api.DetectorSpec)}
    values.update(num_classes=3, num_anchors=1, anchors={}, reg_max=0)
    values.update(family=family, levels=tuple(levels), strides=tuple(strides), channels=channels)
    values.update({"provides": ("neck", "head/cls_logits"), **fields})
    return api.DetectorSpec(**values)


def spec_pair(
    levels=("p3",),
    strides=(8,),
    *,
    channels=1,
    num_classes=1,
    anchors=None,
    teacher_channels=None,
    **fields,
):
    """An `api.Pair` of two same-family specs with these levels, for calling losses directly.

    The teacher is the student's spec, with `teacher_channels` channels when given. `fields`:
    further `det_spec` settings (family, num_anchors, reg_max, provides).
    """
    import dataclasses

    from jdistill.distill import api

    fields.update(channels=channels, num_classes=num_classes, anchors=anchors or {})
    spec = det_spec(levels=levels, strides=strides, **fields)
    if teacher_channels is None:
        return api.Pair(spec, spec)
    return api.Pair(spec, dataclasses.replace(spec, channels=teacher_channels))


def nchw_maps(
    rng, n, c, levels=FPN_LEVELS, strides=FPN_STRIDES, *, canvas=MAP_CANVAS, scale=1.0, affine=False
):
    """{level: [N, C, H, W] float64} normal draws * `scale` on each level's
    ceil(canvas / stride) grid; with `affine`, each channel gets a random scale in [0.5, 3) and
    offset instead (so that per-channel statistics matter)."""
    import math

    out = {}
    for lvl, stride in zip(levels, strides, strict=True):
        hw = (math.ceil(canvas[0] / stride), math.ceil(canvas[1] / stride))
        if affine:
            mult = rng.uniform(0.5, 3.0, size=(1, c, 1, 1))
            shift = rng.normal(size=(1, c, 1, 1)) * 2
            out[lvl] = rng.normal(size=(n, c, *hw)) * mult + shift
        else:
            out[lvl] = rng.normal(size=(n, c, *hw)) * scale
    return out


def to_taps(maps, prefix="neck"):
    """NCHW numpy maps {level: [N, C, H, W]} -> `<prefix>/<level>` NHWC float32 taps."""
    import jax.numpy as jnp

    return {
        f"{prefix}/{k}": jnp.asarray(v.transpose(0, 2, 3, 1), jnp.float32) for k, v in maps.items()
    }


def padded_maps(rng, maps, junk_scale):
    """The padding case of the NCHW-map tests: P3, P4 (strides 8, 16) of two images that fill
    32 x 48 and 64 x 24 px of the 64 x 48 canvas (P3 rows 0-3 / columns 0-2 valid), 3 channels.

    Args:
      rng: numpy Generator; it draws s, then t, then the junk.
      maps: `nchw_maps`-like fn(rng, n, c, levels, strides) -> {level: [N, C, H, W]}.
      junk_scale: scale of the normal junk put outside the images (negated on the teacher's).
    Returns:
      (spec: a GFL `spec_pair`, batch: `batch_of` with the two pad shapes, s, t,
       valid: {level: [N, H, W] valid cells}, s_bad, t_bad: s, t with junk outside).
    """
    import numpy as np

    from jdistill.distill import api

    levels, strides = ("p3", "p4"), (8, 16)
    spec = spec_pair(levels, strides, channels=3, num_classes=3, family="gfl")
    batch = batch_of(2, np.array([[32, 48], [64, 24]], np.int32))
    s, t = maps(rng, 2, 3, levels, strides), maps(rng, 2, 3, levels, strides)
    valid, s_bad, t_bad = {}, {}, {}
    for lvl, stride in zip(levels, strides, strict=True):
        valid[lvl] = np.asarray(api.pixel_valid(batch["pad_shape"], s[lvl].shape[2:], stride))
    for lvl in levels:
        junk = rng.normal(size=s[lvl].shape) * junk_scale
        s_bad[lvl] = np.where(valid[lvl][:, None] > 0, s[lvl], junk)
        t_bad[lvl] = np.where(valid[lvl][:, None] > 0, t[lvl], -junk)
    return spec, batch, s, t, valid, s_bad, t_bad


def neck_case(rng, spec, n, hw, scale=1.0):
    """Random neck taps of a `spec_pair` for n images filling the canvas.

    Args:
      rng: numpy Generator; it draws the student's taps, then the teacher's.
      spec: the `api.Pair`; taps on the student's levels, of each side's neck width.
      n: images.
      hw: (H, W) of the first level; each next level halves it, rounding up.
      scale: the normal draws' scale.
    Returns:
      (s, t: {'neck/<level>': [N, H, W, C] float32 numpy}, batch: `batch_of` n images of the
      first level's size x its stride).
    """
    import math

    import numpy as np

    levels = spec.student.levels
    grid = {lvl: (math.ceil(hw[0] / 2**k), math.ceil(hw[1] / 2**k)) for k, lvl in enumerate(levels)}
    s, t = (
        {
            f"neck/{lvl}": (rng.normal(size=(n, *grid[lvl], c)) * scale).astype(np.float32)
            for lvl in levels
        }
        for c in (spec.student.channels, spec.teacher.channels)
    )
    stride = spec.student.strides[0]
    return s, t, batch_of(n, canvas=(hw[0] * stride, hw[1] * stride))


def random_leaves(rng, tree, scale):
    """`tree` with every leaf replaced by float32 normal draws * `scale` of its shape."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale, jnp.float32), tree)


def as_jnp(taps):
    """{name: numpy array} -> {name: jnp array}."""
    import jax.numpy as jnp

    return {k: jnp.asarray(v) for k, v in taps.items()}


def to_nchw(x):
    """NHWC -> NCHW float64 numpy."""
    import numpy as np

    return np.asarray(x, np.float64).transpose(0, 3, 1, 2)


def junk_padding(rng, s, t, valid_hw, image, scale):
    """Copies of NHWC numpy taps s, t whose image `image` has normal junk * `scale` outside its
    valid_hw {level: [(H, W) per image]} corner on `neck/<level>`, each side its own draws."""
    import numpy as np

    dirty_s, dirty_t = dict(s), dict(t)
    for lvl, hws in valid_hw.items():
        vh, vw = hws[image]
        for taps in (dirty_s, dirty_t):
            x = taps[f"neck/{lvl}"].copy()
            pad = np.ones(x.shape[1:3], bool)
            pad[:vh, :vw] = False
            x[image][pad] = rng.normal(size=x[image][pad].shape) * scale
            taps[f"neck/{lvl}"] = x
    return dirty_s, dirty_t


def mse_sum_per_image(a, b):
    """torch `nn.MSELoss(reduction='sum')(a, b) / N` in loops, for NCHW numpy arrays (the
    feature losses of the MGD and FGD originals)."""
    n_img, c, h, w = b.shape
    total = 0.0
    for n in range(n_img):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    total += (a[n, ch, i, j] - b[n, ch, i, j]) ** 2
    return total / n_img


def registered(module, name, taps=("neck",), any_family=True):
    """The distiller registered as `name`, checked to be `module.DISTILLERS[name]`, to read the
    tap groups `taps` from the student and the teacher, and to take a teacher of any family
    (or, with `any_family=False`, to refuse another family with a reason)."""
    from jdistill.distill import registry

    d = registry.get(name)
    assert d is module.DISTILLERS[name]
    assert d.student_taps == taps and d.teacher_taps == taps
    assert (d.same_family == "") == any_family
    return d


def assert_gradients(zero, *nonzero):
    """Every leaf of the gradient tree `zero` (the teacher's) is 0; every leaf of each tree in
    `nonzero` (the student's, trainable params) has a nonzero entry."""
    import jax
    import jax.numpy as jnp

    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(zero))
    for tree in nonzero:
        assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(tree))


def assert_jit_and_bfloat16(fn, s, t, batch, params, metric_names):
    """For a loss fn(student_taps, teacher_taps, batch, params) -> (loss, metrics) on numpy taps
    s, t: jit agrees with eager, the metrics are `metric_names`, and bfloat16 taps give a
    float32 loss equal to float32 taps holding the rounded values."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    eager, _ = fn(as_jnp(s), as_jnp(t), batch, params)
    jitted, m_jit = jax.jit(fn)(as_jnp(s), as_jnp(t), batch, params)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)
    assert sorted(m_jit) == sorted(metric_names)
    s16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in s.items()}
    t16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in t.items()}
    got, _ = fn(s16, t16, batch, params)
    up = lambda d: {k: v.astype(jnp.float32) for k, v in d.items()}  # noqa: E731
    want, _ = fn(up(s16), up(t16), batch, params)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


def distiller_config(name, **overrides):
    """A distiller's resolved settings, as `plan.terms` builds them (`registry.resolve`): weight
    1, its defaults, then `overrides`."""
    from jdistill.distill import registry

    return registry.resolve({"fn": name, **overrides})


def check_before_training(config):
    """Everything a run refuses before it trains: the config's own checks
    (`train.check_config`), then the built student/teacher pair's (`experiment.build_models`,
    which a run reaches after the data, with the data set's class count)."""
    from jdistill import experiment, train

    train.check_config(config)
    experiment.build_models(config, 1)
