"""FGD: Focal and Global Distillation (Yang et al., CVPR 2022), `specs/distillers.md` § FGD.

Per paired FPN level, with S the student's features (1x1-aligned when the channel counts differ)
and T the teacher's, [N, H, W, C], t the temperature:

    A_S(F) = n_cells * softmax_hw(mean_c |F| / t)         spatial attention [N, H, W]
    A_C(F) = C * softmax_c(mean_hw |F| / t)               channel attention [N, C]
    M_fg[h, w] = max over gt boxes covering (h, w) of 1 / (h_box * w_box)
    M_bg = [M_fg == 0] / sum [M_fg == 0]                  per image
    L_fg = sum M_fg A_S(T) A_C(T) (S - T)^2 / N           L_bg: the same with M_bg
    L_at = sum |A_C(S) - A_C(T)| / N + sum |A_S(S) - A_S(T)| / N
    L_rela = sum (GC_s(S) - GC_t(T))^2 / N
    L = sum_levels alpha L_fg + beta L_bg + gamma L_at + lambda L_rela

as yzd-v/FGD `mmdet/distillation/losses/fgd.py` computes it. N is the number of real images of
the global batch (the reference divides per GPU of 2 images; DDP's mean makes it per image).

Boxes -> cells: a box (x1, y1, x2, y2) in canvas pixels becomes x / W_in * W on a level of width W,
with W_in the padded input (canvas) width (mmrazor's `batch_input_shape`; the original divided by
the unpadded `img_shape`, which stretches boxes on images smaller than the canvas). The canvas is
`batch["image"]`'s H, W when the batch has it, else the finest paired level's size times its
stride (the same for canvases divisible by that stride, as ours are). The box covers cells
floor(x1)..ceil(x2) inclusive (and likewise in y); 1 / (h_box * w_box) counts those cells,
including any beyond the map edge.

Quirks of the original kept: the inclusive ceil end marks one row and one column more than the
box touches (and a box ending exactly on a cell edge still gets the next cell); the fg/bg terms
weight the student by the TEACHER's attentions (the student's attentions only enter L_at); the
teacher's GC block is trainable (its gradient comes from L_rela only; T itself is data); the GC
blocks' last 1x1 conv is zero-initialised, so L_rela starts as sum (S - T)^2 / N.

GC block (GCNet's context block with channel addition): p = softmax_hw(conv1x1_{C->1}(F)),
context = sum_hw p F  [N, C]; add = conv1x1_{C/2->C}(relu(LayerNorm(conv1x1_{C->C/2}(context))));
GC(F) = F + add (broadcast over H, W). Inits as the original's `reset_parameters`: the C->1 conv
kaiming-normal (fan_in, relu gain) with zero bias, the C->C/2 conv PyTorch's default, LayerNorm
ones/zeros, the C/2->C conv zeros; `align` PyTorch's default.

Padding (`api.level_valid`): by default cells outside each image's padded size do not exist, as
in a per-image run: the spatial softmaxes (attention and GC pooling) run over valid cells only and
A_S is scaled by the number of valid cells (so it averages 1 over them); the channel attention
averages |F| over valid cells; M_fg is cut to valid cells and M_bg is normalised over valid
non-foreground cells; every sum runs over valid cells. `count_padding=True` keeps the original's
behaviour: its batch padding is image (background, attention mass, GC context).

Settings (the original's configs): RetinaNet and GFL (defaults) t 0.5, alpha 1e-3, beta 5e-4,
gamma 5e-4, lambda 5e-6; Faster R-CNN t 0.5, alpha 5e-5, beta 2.5e-5, gamma 5e-5, lambda 5e-7;
FCOS t 0.8, alpha 1.6e-3, beta 8e-4, gamma 8e-4, lambda 8e-6. All 5 FPN levels (Faster R-CNN:
P2..P5 only, `levels=(4, 8, 16, 32)`: `levels` lists the student strides to distil, None all
pairs), grad clip 35, the student inherits every non-backbone weight of the teacher.
"""

import jax
import jax.numpy as jnp

from jdistill.distill import adapters, api

DEFAULTS = dict(
    weight=1.0,  # alpha/beta/gamma/lambda are inside the loss: keep the trainer's weight at 1
    temp=0.5,
    alpha_fgd=1e-3,
    beta_fgd=5e-4,
    gamma_fgd=5e-4,
    lambda_fgd=5e-6,
    count_padding=False,
    levels=(),  # student strides to distil (empty: every level paired with the teacher)
)

# The original's recipes (yzd-v/FGD configs/distillers/fgd/), per student family: the
# settings that differ from `DEFAULTS` (its RetinaNet and GFL numbers). Its grad clip 35 and the
# student's start from the teacher's neck and heads are config settings
# (`optimizer.grad_clip`, `distill.init_from_teacher`).
PRESETS = {
    # fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco, 37.4 -> 40.7 (the README's row;
    # fgd_retina_r101_fpn_2x_distill_retina_r50_fpn_2x_coco has the same settings, without a
    # result): t 0.5, alpha 1e-3, beta 5e-4, gamma 5e-4, lambda 5e-6 on all 5 levels, the
    # defaults.
    "fgd_retinanet": {"fgd": {"fn": "fgd"}},
    # fgd_gfl_r101_distill_gfl_r50_fpn_1x_coco, 40.2 -> 43.5: RetinaNet's settings, the
    # defaults.
    "fgd_gfl": {"fgd": {"fn": "fgd"}},
    # fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco: the original hooks
    # fpn_convs.0-3 only, P2..P5 (mmdetection's P6 is a max-pool of P5 without a conv of its
    # own).
    "fgd_faster_rcnn": {
        "fgd": {
            "fn": "fgd",
            "alpha_fgd": 5e-5,
            "beta_fgd": 2.5e-5,
            "gamma_fgd": 5e-5,
            "lambda_fgd": 5e-7,
            "levels": (4, 8, 16, 32),
        }
    },
    # fgd_fcos_r101_distill_fcos_r50_2x_coco.
    "fgd_fcos": {
        "fgd": {
            "fn": "fgd",
            "temp": 0.8,
            "alpha_fgd": 1.6e-3,
            "beta_fgd": 8e-4,
            "gamma_fgd": 8e-4,
            "lambda_fgd": 8e-6,
        }
    },
}

_LN_EPS = 1e-5  # torch.nn.LayerNorm's default


# ------------------------------------------------------------------------------------- params


def _gc_params(key, c):
    """One GC block on C channels (see the module docstring for the inits)."""
    km, k1 = jax.random.split(key)
    # mmcv kaiming_init(mode='fan_in'): normal, a = 0, relu gain: std = sqrt(2 / fan_in).
    mask_kernel = jax.random.normal(km, (c, 1), jnp.float32) * jnp.sqrt(2.0 / c)
    return {
        "mask": {"kernel": mask_kernel, "bias": jnp.zeros((1,), jnp.float32)},
        "add1": adapters.torch_conv_init(k1, (c, c // 2)),
        "ln": {"scale": jnp.ones((c // 2,), jnp.float32), "bias": jnp.zeros((c // 2,))},
        "add2": {"kernel": jnp.zeros((c // 2, c), jnp.float32), "bias": jnp.zeros((c,))},
    }


def init(rng, *, cfg, spec):
    """Per paired level i: {'level_{i}': {'align'?: 1x1 C_s -> C_t, 'gc_s', 'gc_t': GC blocks
    on C_t}}, all float32; 1x1 convs are stored as [C_in, C_out] matrices plus a bias.
    `align` exists only when the neck widths differ."""
    cs, ct = spec.student.channels, spec.teacher.channels

    def level(key):
        ka, ks, kt = jax.random.split(key, 3)
        params = {"gc_s": _gc_params(ks, ct), "gc_t": _gc_params(kt, ct)}
        if cs != ct:
            params["align"] = adapters.torch_conv_init(ka, (cs, ct))
        return params

    return api.init_levels(rng, cfg, spec, level)


# ------------------------------------------------------------------------------------- pieces


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _masked_softmax_hw(logits, valid):
    """Softmax over H, W of each image, over valid cells only. [N, H, W] -> [N, H, W].

    Invalid cells get a large finite negative logit (not -inf: an image with no valid cell then
    yields a finite uniform distribution instead of NaN) and exactly 0 probability."""
    n, h, w = logits.shape
    z = jnp.where(valid > 0, logits, -1e30).reshape(n, h * w)
    return jax.nn.softmax(z, axis=-1).reshape(n, h, w) * valid


def attention(feat, valid, temp):
    """FGD's attentions of one level.

    Args:
      feat: [N, H, W, C] float32; valid: [N, H, W] float cell mask; temp: temperature t.
    Returns:
      (A_S [N, H, W], 0 on invalid cells, summing to the valid-cell count per image;
       A_C [N, C], summing to C).
    """
    c = feat.shape[-1]
    a = jnp.abs(feat)
    n_cells = valid.sum((1, 2))
    spatial = n_cells[:, None, None] * _masked_softmax_hw(a.mean(-1) / temp, valid)
    mean_hw = (a * valid[..., None]).sum((1, 2)) / jnp.maximum(n_cells, 1.0)[:, None]
    channel = c * jax.nn.softmax(mean_hw / temp, axis=-1)
    return spatial, channel


def foreground_mask(boxes, box_valid, feat_hw, canvas_hw):
    """M_fg of one level, vectorised over the padded boxes.

    Args:
      boxes: [N, G, 4] (x1, y1, x2, y2) canvas pixels; box_valid: [N, G] bool.
      feat_hw: the level's (H, W); canvas_hw: the padded input's (H_in, W_in).
    Returns:
      [N, H, W] float32: max over the valid boxes covering a cell of 1 / (h_box * w_box), with
      the box spanning cells floor(x1 / W_in * W) .. ceil(x2 / W_in * W) inclusive (as y).
    """
    h, w = feat_hw
    ch, cw = canvas_hw
    boxes = boxes.astype(jnp.float32)
    # Same operation order as the original (x / W_in * W) so floor/ceil agree at cell edges.
    wmin = jnp.floor(boxes[..., 0] / cw * w).astype(jnp.int32)
    hmin = jnp.floor(boxes[..., 1] / ch * h).astype(jnp.int32)
    wmax = jnp.ceil(boxes[..., 2] / cw * w).astype(jnp.int32)
    hmax = jnp.ceil(boxes[..., 3] / ch * h).astype(jnp.int32)
    area = 1.0 / (hmax + 1 - hmin).astype(jnp.float32) / (wmax + 1 - wmin).astype(jnp.float32)
    ys = jnp.arange(h)
    xs = jnp.arange(w)
    rows = (ys >= hmin[..., None]) & (ys <= hmax[..., None])  # [N, G, H]
    cols = (xs >= wmin[..., None]) & (xs <= wmax[..., None])  # [N, G, W]
    inside = rows[..., :, None] & cols[..., None, :] & box_valid[..., None, None]
    return jnp.where(inside, area[..., None, None], 0.0).max(axis=1, initial=0.0)


def background_mask(fg, valid):
    """M_bg = [M_fg == 0] / count, per image, over valid cells. [N, H, W] -> [N, H, W].

    An image without a background cell gets all zeros (the original skips the division)."""
    bg = jnp.where(fg > 0, 0.0, 1.0) * valid
    return bg / jnp.maximum(bg.sum((1, 2), keepdims=True), 1.0)


def global_context(gc, feat, valid):
    """GC(F) = F + add(context). feat: [N, H, W, C] float32, valid [N, H, W] -> [N, H, W, C]."""
    logits = (feat @ gc["mask"]["kernel"])[..., 0] + gc["mask"]["bias"][0]
    p = _masked_softmax_hw(logits, valid)
    context = jnp.einsum("nhw,nhwc->nc", p, feat)
    y = _dense(context, gc["add1"])
    mu = y.mean(-1, keepdims=True)
    var = jnp.square(y - mu).mean(-1, keepdims=True)
    y = (y - mu) / jnp.sqrt(var + _LN_EPS) * gc["ln"]["scale"] + gc["ln"]["bias"]
    add = _dense(jax.nn.relu(y), gc["add2"])
    return feat + add[:, None, None, :]


def fgd_level(level_params, student_feat, teacher_feat, fg, valid, temp):
    """The four unweighted FGD terms of one level, summed over images (not yet divided by N).

    Args:
      level_params: the level's params from `init`.
      student_feat: [N, H, W, C_s]; teacher_feat: [N, H, W, C_t] (any float dtype).
      fg: [N, H, W] M_fg (already cut to valid cells); valid: [N, H, W] float cell mask.
      temp: attention temperature.
    Returns:
      {'fg', 'bg', 'at', 'rela'}: float32 scalars.
    """
    s = student_feat.astype(jnp.float32)
    if "align" in level_params:
        s = _dense(s, level_params["align"])
    t = jax.lax.stop_gradient(teacher_feat.astype(jnp.float32))
    sp_t, ch_t = attention(t, valid, temp)
    sp_s, ch_s = attention(s, valid, temp)
    bg = background_mask(fg, valid)
    # Both sides weighted by the teacher's attentions (the original's get_fea_loss).
    err = jnp.square(s - t) * sp_t[..., None] * ch_t[:, None, None, :]
    img = (valid.sum((1, 2)) > 0).astype(jnp.float32)  # images with no valid cell count nowhere
    out_s = global_context(level_params["gc_s"], s, valid)
    out_t = global_context(level_params["gc_t"], t, valid)
    return {
        "fg": (err * fg[..., None]).sum(),
        "bg": (err * bg[..., None]).sum(),
        "at": (jnp.abs(ch_s - ch_t).sum(-1) * img).sum() + jnp.abs(sp_s - sp_t).sum(),
        "rela": (jnp.square(out_s - out_t).sum(-1) * valid).sum(),
    }


def _canvas_hw(batch, student_taps, spec):
    """(H_in, W_in) of the padded input: the image tensor's, else the finest level's x stride."""
    if "image" in batch:
        return tuple(batch["image"].shape[1:3])
    _, lvl, _, stride = api.paired_levels(spec)[0]
    _, h, w, _ = student_taps[f"neck/{lvl}"].shape
    return h * stride, w * stride


_WEIGHTS = (("fg", "alpha_fgd"), ("bg", "beta_fgd"), ("at", "gamma_fgd"), ("rela", "lambda_fgd"))


def _levels(student_taps, teacher_taps, batch, cfg, spec):
    """The inputs of each selected level pair, as both `loss` and `fgd_maps` read them.

    Yields (pair index i, student level name, S [N, H, W, C_s], T [N, H, W, C_t] as tapped,
    M_fg [N, H, W] float32 cut to the valid cells, valid [N, H, W] float32: cells inside each
    image's padded size (`api.level_valid`) of `image_valid` images). Raises ValueError for an
    empty selection or maps of different sizes.
    """
    level_pairs = api.selected_levels(cfg, spec)
    if not level_pairs:
        raise ValueError(f"FGD: no level to distil: {check(cfg, spec)}")
    canvas = _canvas_hw(batch, student_taps, spec)
    img = batch["image_valid"].astype(jnp.float32)
    for i, s_lvl, t_lvl, stride in level_pairs:
        s = student_taps[f"neck/{s_lvl}"]
        t = teacher_taps[f"neck/{t_lvl}"]
        n, h, w, _ = s.shape
        if t.shape[:3] != (n, h, w):
            raise ValueError(f"FGD level {s_lvl}: student {s.shape} vs teacher {t.shape}")
        valid = api.level_valid(batch, (h, w), stride, cfg) * img[:, None, None]
        fg = foreground_mask(batch["boxes"], batch["box_valid"], (h, w), canvas) * valid
        yield i, s_lvl, s, t, fg, valid


def loss(student_taps, teacher_taps, batch, params, *, cfg, spec):
    """FGD over the paired levels: sum_levels alpha L_fg + beta L_bg + gamma L_at + lambda L_rela.

    Args:
      student_taps, teacher_taps: `neck/<level>` [N, H, W, C] (teacher's under stop_gradient).
      batch: `boxes` [N, G, 4] canvas pixels, `box_valid` [N, G], `image_valid` [N] (images
        marked False count nowhere, not even in N), `pad_shape` [N, 2]; `image` [N, H, W, 3]
        if present gives the canvas size.
      params: from `init`.
      cfg: `temp`, `alpha_fgd`, `beta_fgd`, `gamma_fgd`, `lambda_fgd`, `count_padding`.
      spec: `api.Pair`.
    Returns:
      (scalar float32, {'fg', 'bg', 'at', 'rela'}: each term's weighted contribution, summed
      over levels; they add up to the loss).
    """
    sums = dict.fromkeys(("fg", "bg", "at", "rela"), jnp.float32(0.0))
    for i, _, s, t, fg, valid in _levels(student_taps, teacher_taps, batch, cfg, spec):
        terms = fgd_level(params[f"level_{i}"], s, t, fg, valid, cfg["temp"])
        for name, weight in _WEIGHTS:
            sums[name] = sums[name] + cfg[weight] * terms[name]
    n_img = jnp.maximum(batch["image_valid"].astype(jnp.float32).sum(), 1.0)
    metrics = {k: v / n_img for k, v in sums.items()}
    return sum(metrics.values()), metrics


def fgd_maps(student_taps, teacher_taps, batch, *, cfg, spec):
    """What FGD weighs cells and channels by, per selected level pair (`api.Distiller.maps`).

    Args: as `loss`, without `params`.
    Returns:
      {name: {student level: array}}, float32, the very masks and attentions of `fgd_level`:
      'foreground' M_fg and 'background' M_bg [N, H, W] (0 outside the valid cells);
      'spatial attention (teacher)' A_S(T) [N, H, W] (summing to the valid-cell count per
      image) and 'channel attention (teacher)' A_C(T) [N, C_t] (summing to C_t), which weigh the
      fg/bg terms; 'spatial attention (student)' A_S(S) [N, H, W] and 'channel attention
      (student)' A_C(S) [N, C_s], which L_at pulls towards the teacher's. The student's enter
      only when the neck widths match: otherwise the loss takes them of the aligned features,
      and the align conv is a trained parameter that maps do not get.
    """
    same = spec.student.channels == spec.teacher.channels
    names = ["foreground", "background", "spatial attention (teacher)"]
    names += ["channel attention (teacher)"]
    if same:
        names += ["spatial attention (student)", "channel attention (student)"]
    out = {name: {} for name in names}
    for _, s_lvl, s, t, fg, valid in _levels(student_taps, teacher_taps, batch, cfg, spec):
        sp_t, ch_t = attention(t.astype(jnp.float32), valid, cfg["temp"])
        out["foreground"][s_lvl] = fg
        out["background"][s_lvl] = background_mask(fg, valid)
        out["spatial attention (teacher)"][s_lvl] = sp_t
        out["channel attention (teacher)"][s_lvl] = ch_t
        if same:
            sp_s, ch_s = attention(s.astype(jnp.float32), valid, cfg["temp"])
            out["spatial attention (student)"][s_lvl] = sp_s
            out["channel attention (student)"][s_lvl] = ch_s
    return out


def check(cfg, spec):
    """An error for settings FGD cannot take (None: fine)."""
    msg = api.check_levels(cfg, spec)
    if msg:
        return msg
    if spec.teacher.channels < 2 or spec.teacher.channels % 2:
        return f"the GC blocks halve the teacher's {spec.teacher.channels} channels"
    if cfg["temp"] <= 0:
        return f"temp={cfg['temp']} must be positive"
    return None


DISTILLERS = {
    "fgd": api.Distiller(
        loss=loss,
        student_taps=("neck",),
        teacher_taps=("neck",),
        init=init,
        defaults=DEFAULTS,
        check=check,
        maps=fgd_maps,
    )
}
