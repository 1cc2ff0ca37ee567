"""MGD: Masked Generative Distillation (Yang et al., ECCV 2022), `specs/distillers.md` § MGD.

Per paired FPN level, the student's features (1x1-aligned when the channel counts differ) are
masked at random cells and a small generation block must regenerate the teacher's full feature:

    M[n, h, w] = 0 with probability lambda_mgd, else 1        (a fresh mask every step)
    G = conv3x3(relu(conv3x3(align(S) * M)))                  (C -> C -> C, with bias)
    L = alpha_mgd * sum_levels sum_{n,h,w,c} (G - T)^2 / N

as mmrazor's `MGDConnector` + `MGDLoss` compute it. N is the number of real images in the global
batch (`image_valid`): the reference divides per GPU of 2 images and DDP averages the GPUs, which
is the same per-image mean.

Randomness: the mask is drawn from `batch["rng"]`, a per-step PRNG key the trainer puts into the
batch (e.g. `jax.random.fold_in(key, step)`). The key is first folded with a constant of this
method (so the mask is not correlated with other users of the same step key, such as the
samplers), then with the level's pair index (so levels get different masks). A batch without
`rng` is an error: a fixed mask every step would silently be another method.

Padding (`api.level_valid`): by default cells outside each image's padded size do not exist. The
inputs of both 3x3 convs of the generation block (the aligned, masked student features and the
hidden layer) are zeroed there, so the convs read zeros beyond the image edge, exactly the zero
padding of a per-image run; and the squared error is summed over valid cells only. Garbage in
padding cells therefore cannot change the loss. `count_padding=True` keeps the reference's
behaviour (the batch padding is image).

Quirks of the original kept: the mask is drawn after the align conv (the align bias reaches
unmasked cells only); masked cells are zeroed (not replaced by a learned token); the loss is a sum
over channels and cells, not a mean, hence the tiny alpha. `mask_on_channel=True` is mmrazor's
channel-mask variant (M[n, c] instead of M[n, h, w]).

Published setting (mmrazor configs/distill/mmdet/mgd): RetinaNet R50 2x from an X-101-64x4d
teacher, 37.4 -> 41.0, lambda 0.65, alpha 2e-5 on all 5 levels, grad clip 35, the student's neck
and head initialised from the teacher.
"""

import jax
import jax.numpy as jnp

from jdistill.distill import adapters, api

DEFAULTS = dict(
    weight=1.0,  # alpha_mgd is inside the loss: keep the trainer's weight at 1
    alpha_mgd=2e-5,
    lambda_mgd=0.65,  # probability that a cell is masked (zeroed)
    mask_on_channel=False,
    count_padding=False,
    levels=(),  # student strides to distil (empty: every level paired with the teacher)
)

# Folded into the step key before the level index: "MGD" in ASCII.
_KEY_SALT = 0x4D4744


def init(rng, *, cfg, spec):
    """Per paired level i: {'level_{i}': {'align'?: 1x1 C_s -> C_t, 'gen1', 'gen2': 3x3
    C_t -> C_t}}, every conv with a bias and PyTorch's default init (the connector has no
    init_cfg). `align` exists only when the neck widths differ."""
    cs, ct = spec.student.channels, spec.teacher.channels

    def level(key):
        ka, k1, k2 = jax.random.split(key, 3)
        params = {
            "gen1": adapters.torch_conv_init(k1, (3, 3, ct, ct)),
            "gen2": adapters.torch_conv_init(k2, (3, 3, ct, ct)),
        }
        if cs != ct:
            params["align"] = adapters.torch_conv_init(ka, (1, 1, cs, ct))
        return params

    return api.init_levels(rng, cfg, spec, level)


def draw_mask(key, shape, lambda_mgd, mask_on_channel=False):
    """The keep-mask of one level: 0 with probability lambda_mgd, else 1 (float32).

    shape: the level's aligned feature shape (N, H, W, C). Returns [N, H, W, 1], or [N, 1, 1, C]
    with `mask_on_channel`. Same rule as the original: u ~ U[0, 1), masked where u > 1 - lambda.
    """
    n, h, w, c = shape
    mshape = (n, 1, 1, c) if mask_on_channel else (n, h, w, 1)
    u = jax.random.uniform(key, mshape, jnp.float32)
    return jnp.where(u > 1.0 - lambda_mgd, 0.0, 1.0).astype(jnp.float32)


def level_keys(key, level_pairs):
    """{pair index: key}: the step key salted with this method, then folded with the index."""
    key = jax.random.fold_in(key, _KEY_SALT)
    return {i: jax.random.fold_in(key, i) for i, *_ in level_pairs}


def generate(level_params, student_feat, mask, valid):
    """The generation block of one level.

    Args:
      level_params: the level's params from `init`.
      student_feat: [N, H, W, C_s] student neck features (any float dtype).
      mask: [N, H, W, 1] or [N, 1, 1, C_t] keep-mask from `draw_mask`.
      valid: [N, H, W] float cell mask (0: padding, zeroed before each conv).
    Returns:
      G: [N, H, W, C_t] float32.
    """
    x = student_feat.astype(jnp.float32)
    if "align" in level_params:
        x = adapters.conv(x, **level_params["align"])
    # Zero both conv inputs outside the image, so each 3x3 conv reads zeros beyond the image
    # edge, as in a run on that image alone.
    x = x * mask * valid[..., None]
    x = jax.nn.relu(adapters.conv(x, **level_params["gen1"])) * valid[..., None]
    return adapters.conv(x, **level_params["gen2"])


def loss_with_masks(student_taps, teacher_taps, batch, params, masks, *, cfg, spec):
    """MGD with given keep-masks: alpha * sum_levels sum_valid (G - T)^2 / N.

    Args:
      student_taps, teacher_taps: `neck/<level>` [N, H, W, C] (teacher's under stop_gradient).
      batch: `pad_shape` [N, 2] int32; `image_valid` [N] bool (images marked False count
        nowhere, not even in N).
      params: from `init`.
      masks: {pair index: keep-mask of `draw_mask`}.
      cfg: `alpha_mgd`, `count_padding`.
      spec: `api.Pair`.
    Returns:
      (scalar float32, {'p3': per-level contribution, ...} keyed by the student level).
    """
    level_pairs = api.selected_levels(cfg, spec)
    if not level_pairs:
        raise ValueError(f"MGD: no level to distil: {check(cfg, spec)}")
    total = jnp.float32(0.0)
    metrics = {}
    for i, s_lvl, t_lvl, stride in level_pairs:
        s = student_taps[f"neck/{s_lvl}"]
        t = jax.lax.stop_gradient(teacher_taps[f"neck/{t_lvl}"].astype(jnp.float32))
        n, h, w, _ = s.shape
        if t.shape[:3] != (n, h, w):
            raise ValueError(f"MGD level {s_lvl}: student {s.shape} vs teacher {t.shape}")
        img = batch["image_valid"].astype(jnp.float32)
        valid = api.level_valid(batch, (h, w), stride, cfg) * img[:, None, None]
        g = generate(params[f"level_{i}"], s, masks[i], valid)
        sq = jnp.square(g - t).sum(-1)
        n_img = jnp.maximum(img.sum(), 1.0)
        value = cfg["alpha_mgd"] * (sq * valid).sum() / n_img
        metrics[s_lvl] = value
        total = total + value
    return total, metrics


def draw_masks(student_taps, batch, *, cfg, spec):
    """The keep-masks of one step, as `loss` draws them: {pair index: `draw_mask`} over the
    selected level pairs, from `batch["rng"]` through `level_keys`.

    Args:
      student_taps: `neck/<level>` [N, H, W, C_s] (only their shapes are read).
      batch: `rng`, the step's PRNG key.
      cfg: `lambda_mgd`, `mask_on_channel`, `levels`.
      spec: `api.Pair` (the masks have the teacher's channels).
    Returns:
      {i: [N, H, W, 1] float32 in {0, 1} (1: kept), or [N, 1, 1, C_t] with `mask_on_channel`}.
    """
    if "rng" not in batch:
        raise KeyError(
            "MGD draws its random masks from batch['rng'], a per-step PRNG key the trainer must "
            "put into the batch (e.g. jax.random.fold_in(key, step))"
        )
    level_pairs = api.selected_levels(cfg, spec)
    keys = level_keys(batch["rng"], level_pairs)
    masks = {}
    for i, s_lvl, _, _ in level_pairs:
        n, h, w, _ = student_taps[f"neck/{s_lvl}"].shape
        shape = (n, h, w, spec.teacher.channels)
        masks[i] = draw_mask(keys[i], shape, cfg["lambda_mgd"], cfg.get("mask_on_channel", False))
    return masks


def loss(student_taps, teacher_taps, batch, params, *, cfg, spec):
    """MGD as the trainer calls it: draws each level's mask from `batch["rng"]` (`draw_masks`,
    see the module docstring), then `loss_with_masks`. Returns (scalar, per-level metrics)."""
    masks = draw_masks(student_taps, batch, cfg=cfg, spec=spec)
    return loss_with_masks(student_taps, teacher_taps, batch, params, masks, cfg=cfg, spec=spec)


def mgd_maps(student_taps, teacher_taps, batch, *, cfg, spec):
    """The random keep-mask `loss` draws for `batch["rng"]` (`api.Distiller.maps`).

    Args: as `loss`, without `params` (the teacher's taps are not read).
    Returns:
      {'random mask': {student level: [N, H, W] float32}}: 1 where the aligned student feature
      is kept, 0 where it is zeroed before the generation block, as drawn (padding cells, which
      the loss zeroes anyway, included); with `mask_on_channel`, [N, C_t] per channel.
    """
    del teacher_taps
    masks = draw_masks(student_taps, batch, cfg=cfg, spec=spec)
    out = {}
    for i, s_lvl, _, _ in api.selected_levels(cfg, spec):
        m = masks[i]
        out[s_lvl] = m[:, 0, 0, :] if cfg.get("mask_on_channel", False) else m[..., 0]
    return {"random mask": out}


def check(cfg, spec):
    """An error for settings MGD cannot take (None: fine)."""
    msg = api.check_levels(cfg, spec)
    if msg:
        return msg
    if not 0.0 <= cfg["lambda_mgd"] < 1.0:
        return f"lambda_mgd={cfg['lambda_mgd']} must lie in [0, 1)"
    return None


DISTILLERS = {
    "mgd": api.Distiller(
        loss=loss,
        student_taps=("neck",),
        teacher_taps=("neck",),
        init=init,
        defaults=DEFAULTS,
        check=check,
        maps=mgd_maps,
    )
}

# The published MGD recipe: mmrazor configs/distill/mmdet/mgd, RetinaNet R50 2x from an
# X-101-64x4d teacher, 37.4 -> 41.0, lambda 0.65, alpha 2e-5 on all 5 levels: the defaults.
# Its grad clip 35 and the student's neck and head starting from the teacher's are config
# settings (`optimizer.grad_clip`, `distill.init_from_teacher`).
PRESETS = {"mgd_retinanet": {"mgd": {"fn": "mgd"}}}
