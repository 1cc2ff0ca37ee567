"""The levers that cut a step's memory traffic (README, "Before you rent") compute what the
plain network computes.

Folding frozen BN into the conv before it (`model.fold_bn`, `resnet.conv_bn`): equal parameter
trees and initial values, float32 outputs and gradients equal within 1e-5 relative, for every
family, as teacher (everything frozen) and as student (trainable BN affine, frozen stages); BN
on batch statistics is never folded. `layers.relu`, whose backward pass reads its output:
values and gradients bit for bit `jax.nn.relu`'s. A teacher folded once before training
(`models/prefold.py`): the step's numbers bit for bit. Kernels laid out output-channel major
(`layouts.py`): the same numbers, and checkpoints that restore. GroupNorm + ReLU with its
own backward pass (`models/group_norm.py`): flax's values, and gradients within 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers.batches import crafted_batch
from helpers.paths import load_config

from jdistill import checkpoint, experiment, layouts, parallel
from jdistill.models import detector as detector_lib
from jdistill.models import group_norm, layers

FAMILIES = {
    "retinanet": "retinanet_r50_coco",
    "gfl": "gfl_r50_coco",
    "fcos": "fcos_r50_caffe_coco",
    "faster_rcnn": "faster_rcnn_r50_coco",
}
CANVAS = (64, 96)


def _pair(name):
    model = load_config(name, "runlocal").model
    model.unlock()
    model.fold_bn = False
    plain = detector_lib.build(model, 3)
    model.fold_bn = True
    return plain, detector_lib.build(model, 3)


def _trained_like(variables, seed):
    """Variables as a trained network has them: BN statistics and affine away from 1 and 0,
    every zero-initialised BN scale non-zero (else the residual branches would not count)."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = []
    for k, x in zip(keys, leaves, strict=True):
        noise = jax.random.uniform(k, x.shape, x.dtype, 0.5, 1.5)
        out.append(x * noise + 0.1 * noise if x.ndim == 1 else x)
    return jax.tree_util.tree_unflatten(tree, out)


def _rel(a, b):
    """Relative error of `a` against `b`: ||a - b|| / ||b|| (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fold_keeps_the_variables_and_the_function(family):
    plain, folded = _pair(FAMILIES[family])
    v_plain = experiment.init_variables(plain, CANVAS, 0)
    v_folded = experiment.init_variables(folded, CANVAS, 0)
    # the same names, shapes and initial draws: checkpoints and converters cannot tell
    assert jax.tree_util.tree_structure(v_plain) == jax.tree_util.tree_structure(v_folded)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(v_plain), leaves(v_folded), strict=True):
        np.testing.assert_array_equal(a, b)
    variables = _trained_like(v_plain, 1)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, *CANVAS, 3), jnp.float32)
    (out_p, taps_p) = jax.jit(plain.module.apply)(variables, x)
    (out_f, taps_f) = jax.jit(folded.module.apply)(variables, x)
    for k in ("backbone/c2", "backbone/c5"):
        assert _rel(taps_f[k], taps_p[k]) < 1e-5, k
    flat_p = jax.tree_util.tree_leaves(out_p)
    flat_f = jax.tree_util.tree_leaves(out_f)
    for a, b in zip(flat_f, flat_p, strict=True):
        assert _rel(a, b) < 1e-5

    # The student's gradients: trainable BN affine (norm_trainable), through the folded kernel.
    def loss(params, module):
        (outs, taps) = module.apply({**variables, "params": params}, x)
        heads = sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(outs))
        return heads + jnp.sum(taps["backbone/c4"] ** 2) * 1e-3

    g_p = jax.jit(jax.grad(lambda p: loss(p, plain.module)))(variables["params"])
    g_f = jax.jit(jax.grad(lambda p: loss(p, folded.module)))(variables["params"])
    backbone_p = g_p["backbone"]
    backbone_f = g_f["backbone"]
    names = jax.tree_util.tree_leaves_with_path(backbone_p)
    checked = 0
    for (path, a), b in zip(names, jax.tree_util.tree_leaves(backbone_f), strict=True):
        if not np.any(np.asarray(a)):  # a frozen stage: no gradient in either
            assert not np.any(np.asarray(b)), jax.tree_util.keystr(path)
            continue
        assert _rel(b, a) < 1e-5, jax.tree_util.keystr(path)
        checked += 1
    assert checked > 10  # the trainable stages' convs and BN scales and biases


def test_a_folded_conv_refuses_a_bias_or_norm():
    conv = layers.Conv(4, 3, use_bias=True)
    x = jnp.zeros((1, 8, 8, 2))
    with pytest.raises(ValueError, match="folded affine"):
        conv.init(jax.random.PRNGKey(0), x, affine=(jnp.ones(4), jnp.zeros(4)))


def test_batch_statistics_are_never_folded():
    """norm_eval=False trains BN on batch statistics: fold_bn leaves it as it is."""
    model = load_config("retinanet_r50_coco", "runlocal").model
    model.unlock()
    model.norm_eval = False
    model.frozen_stages = -1
    model.fold_bn = False
    plain = detector_lib.build(model, 3)
    model.fold_bn = True
    folded = detector_lib.build(model, 3)
    v = experiment.init_variables(plain, CANVAS, 0)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, *CANVAS, 3), jnp.float32)
    (_, tp), sp = plain.module.apply(v, x, train=True, mutable=["batch_stats"])
    (_, tf), sf = folded.module.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(tp["backbone/c5"], tf["backbone/c5"])
    for a, b in zip(jax.tree_util.tree_leaves(sp), jax.tree_util.tree_leaves(sf), strict=True):
        np.testing.assert_array_equal(a, b)


def test_relu_values_and_gradients_are_jax_nn_relus_bit_for_bit():
    """`layers.relu` reads its derivative off its output (so the backward pass keeps only the
    output): the same values and gradients as `jax.nn.relu`, at 0, at -0 and at NaN too."""
    x = jnp.asarray([-2.0, -0.0, 0.0, 1e-30, 3.0, jnp.nan, -jnp.inf, jnp.inf], jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        xs = x.astype(dtype)
        np.testing.assert_array_equal(layers.relu(xs), jax.nn.relu(xs))
        g = jax.random.normal(jax.random.PRNGKey(0), x.shape).astype(dtype)
        ours = jax.vjp(layers.relu, xs)[1](g)[0]
        theirs = jax.vjp(jax.nn.relu, xs)[1](g)[0]
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(
            jax.jit(jax.grad(lambda v: jnp.sum(layers.relu(v) * v)))(x),
            jax.jit(jax.grad(lambda v: jnp.sum(jax.nn.relu(v) * v)))(x),
        )


# ---------------------------------------------------------------- a teacher folded once


def _teacher(name, dtype="float32"):
    model = load_config(name, "runlocal").model
    model.unlock()
    model.dtype = dtype
    return model, detector_lib.build(model, 3)


@pytest.mark.parametrize(
    "family", [f if f == "gfl" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
)
def test_a_prefolded_teacher_computes_what_it_folds_in_the_step(family):
    """`experiment.place_teacher` folds once what the step folded in every call: the same
    outputs and taps, float32 bit for bit on this CPU, from variables without BN scales or
    statistics; the loaded variables are left as they were."""
    model, det = _teacher(FAMILIES[family])
    variables = _trained_like(experiment.init_variables(det, CANVAS, 0), 1)
    before = jax.tree_util.tree_map(np.asarray, variables)
    mesh = parallel.make_mesh(jax.devices()[:1])
    folded, v_folded, _ = experiment.place_teacher(model, det, variables, mesh)
    assert folded.module.prefolded and not det.module.prefolded
    x = jax.random.normal(jax.random.PRNGKey(2), (2, *CANVAS, 3), jnp.float32)
    (out_a, taps_a) = jax.jit(det.module.apply)(variables, x)
    (out_b, taps_b) = jax.jit(folded.module.apply)(v_folded, x)
    for a, b in zip(
        jax.tree_util.tree_leaves(out_a), jax.tree_util.tree_leaves(out_b), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for k in taps_a:
        np.testing.assert_array_equal(taps_a[k], taps_b[k], err_msg=k)
    backbone = v_folded["params"]["backbone"]
    assert set(backbone["bn1"]) == {"bias"} and set(backbone["layer1_0"]["bn1"]) == {"bias"}
    assert "backbone" not in v_folded.get("batch_stats", {})
    for a, b in zip(
        jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_a_prefolded_bfloat16_teacher_reads_bfloat16_kernels_and_computes_the_same():
    """In bfloat16 the kernels are folded in float32 and rounded once, as the step rounds
    them: every kernel is stored bfloat16, and the outputs are the step's bit for bit."""
    model, det = _teacher("gfl_r50_coco", "bfloat16")
    variables = _trained_like(experiment.init_variables(det, CANVAS, 0), 1)
    mesh = parallel.make_mesh(jax.devices()[:1])
    folded, v_folded, _ = experiment.place_teacher(model, det, variables, mesh)
    kernels = [x for x in jax.tree_util.tree_leaves(v_folded) if x.ndim == 4]
    assert kernels and all(k.dtype == jnp.bfloat16 for k in kernels)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, *CANVAS, 3), jnp.float32).astype(jnp.bfloat16)
    (out_a, _), (out_b, _) = (
        jax.jit(det.module.apply)(variables, x),
        jax.jit(folded.module.apply)(v_folded, x),
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(out_a), jax.tree_util.tree_leaves(out_b), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_a_teacher_without_fold_bn_is_not_prefolded():
    model, det = _teacher("retinanet_r50_coco")
    model.fold_bn = False
    det = detector_lib.build(model, 3)
    variables = experiment.init_variables(det, CANVAS, 0)
    mesh = parallel.make_mesh(jax.devices()[:1])
    same, v_same, _ = experiment.place_teacher(model, det, variables, mesh)
    assert same is det
    assert jax.tree_util.tree_structure(v_same) == jax.tree_util.tree_structure(variables)


# ---------------------------------------------------------------- kernels output-channel major


@pytest.mark.slow
def test_gpu_kernel_layouts_change_no_number(monkeypatch, tmp_path):
    """On a GPU the state's kernels (and momentum) and the teacher's lie output-channel major
    (`layouts.py`). Forced here on the CPU: two distillation steps give the parameters and
    metrics of the default layout (to float rounding); the layout survives the step; a
    checkpoint of such a state restores to the same values."""
    config = load_config("frs_retinanet", "runlocal")
    batch, *_ = crafted_batch([[[4.0, 4.0, 30.0, 40.0]], [[10.0, 20.0, 50.0, 60.0]]], 3)
    rng = np.random.default_rng(0)
    batch.update(
        image=jnp.asarray(rng.integers(0, 255, (2, *CANVAS, 3)), jnp.uint8),
        img_shape=jnp.tile(jnp.array(CANVAS, jnp.int32), (2, 1)),
        scale_factor=jnp.ones((2, 2), jnp.float32),
        image_id=jnp.arange(2, dtype=jnp.int32),
    )
    batch["labels"] = batch["labels"] % 3

    def two_steps():
        mesh = parallel.make_mesh(jax.devices()[:1])
        exp = experiment.setup(config, mesh, num_classes=3, canvas=CANVAS, steps_per_epoch=100)
        state = exp.state
        for _ in range(2):
            state, metrics = exp.train_step(state, exp.teacher_vars, batch)
        return exp, state, metrics

    _, plain, m_plain = two_steps()
    monkeypatch.setattr(layouts, "wants_kernel_layout", lambda mesh: True)
    exp, state, metrics = two_steps()
    kernel = state["params"]["student"]["backbone"]["conv1"]["conv"]["kernel"]
    assert kernel.format.layout.major_to_minor == layouts.KERNEL_MAJOR_TO_MINOR
    bias = state["params"]["student"]["backbone"]["bn1"]["bias"]
    assert bias.format.layout.major_to_minor == (0,)
    t_kernel = exp.teacher_vars["params"]["backbone"]["conv1"]["conv"]["kernel"]
    assert t_kernel.format.layout.major_to_minor == layouts.KERNEL_MAJOR_TO_MINOR
    # XLA's CPU convolution sums in another order for another kernel layout (the last bit of
    # a few gradients moves); on a GPU cuDNN reads kernels output-channel major either way.
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(plain), leaves(state), strict=True):
        assert _rel(np.asarray(b), np.asarray(a)) < 1e-6
    for k in m_plain:
        assert _rel(metrics[k], m_plain[k]) < 1e-6, k

    mgr = checkpoint.manager(str(tmp_path / "checkpoints"))
    checkpoint.save(mgr, 2, state, None, {}, force=True)
    mgr.wait_until_finished()
    abstract = experiment.with_sharding(state, exp.state_sharding)
    _, restored, _, _ = checkpoint.restore_newest(mgr, abstract)
    restored = jax.device_put(restored, exp.state_formats)
    for a, b in zip(leaves(state), leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mgr.close()


# ---------------------------------------------------------------- GroupNorm + ReLU


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 7, 64), (2, 1, 1, 32), (1, 3, 4, 256)])
def test_group_norm_is_flaxs_with_a_cheaper_backward_pass(shape, dtype, relu):
    """`group_norm.GroupNorm` (the GFL / FCOS tower convs' norm): flax's GroupNorm(32) and
    ReLU bit for bit when compiled alone (float32 and bfloat16; one element per group
    included), and their gradients (input, scale, bias) within 1e-5 relative in float32,
    within bfloat16 rounding in bfloat16."""
    k = jax.random.split(jax.random.PRNGKey(sum(shape)), 4)
    x = (3.0 * jax.random.normal(k[0], shape) + 1.0).astype(dtype)
    c = shape[-1]
    variables = {
        "params": {
            "scale": jax.random.uniform(k[1], (c,), minval=0.5, maxval=1.5),
            "bias": 0.3 * jax.random.normal(k[2], (c,)),
        }
    }
    dy = jax.random.normal(k[3], shape).astype(dtype)
    ours = group_norm.GroupNorm(dtype=dtype, relu=relu)
    flax_gn = nn.GroupNorm(num_groups=32, epsilon=1e-5, param_dtype=jnp.float32, dtype=dtype)

    def theirs(v, x):
        y = flax_gn.apply(v, x.astype(jnp.float32))
        return jax.nn.relu(y) if relu else y

    def grads(fn):
        y, vjp = jax.vjp(fn, variables, x)
        return y, vjp(dy)

    as_f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    np.testing.assert_array_equal(
        as_f32(jax.jit(ours.apply)(variables, x)), as_f32(jax.jit(theirs)(variables, x))
    )
    (y_a, (gv_a, gx_a)) = jax.jit(lambda: grads(ours.apply))()
    (y_b, (gv_b, gx_b)) = jax.jit(lambda: grads(theirs))()
    assert y_a.dtype == dtype and gx_a.dtype == dtype
    # Compiled beside another backward pass, XLA may sum the statistics in another order.
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert _rel(y_a, y_b) < (1e-6 if dtype == jnp.float32 else 1e-2)
    if np.any(np.asarray(gx_b)):
        assert _rel(gx_a, gx_b) < tol
    else:
        # One element per group: x - mean(x) = 0 makes flax's input gradient 0 exactly; ours
        # is g * scale - mean(g * scale), 0 up to a fused multiply-add's rounding, times
        # rsqrt(eps) = 316.
        assert np.abs(as_f32(gx_a)).max() < 1e-4 * np.abs(as_f32(dy)).max()
    for name in ("scale", "bias"):
        assert _rel(gv_a["params"][name], gv_b["params"][name]) < tol, name


def test_a_group_norm_keeping_its_pre_activation_differentiates_through_both():
    """`keep_pre` (CrossKD's held tower conv): (ReLU output, GroupNorm output), flax's values,
    and the gradient of a loss of both within 1e-5 relative of flax's."""
    shape = (2, 6, 5, 64)
    k = jax.random.split(jax.random.PRNGKey(7), 4)
    x = 2.0 * jax.random.normal(k[0], shape)
    variables = {"params": {"scale": jnp.full((64,), 1.2), "bias": jnp.full((64,), 0.1)}}
    w1, w2 = jax.random.normal(k[1], shape), jax.random.normal(k[2], shape)
    ours = group_norm.GroupNorm(relu=True, keep_pre=True)
    flax_gn = nn.GroupNorm(num_groups=32, epsilon=1e-5, param_dtype=jnp.float32)

    def theirs(v, x):
        pre = flax_gn.apply(v, x)
        return jax.nn.relu(pre), pre

    def loss(fn):
        def f(v, x):
            out, pre = fn(v, x)
            return jnp.sum(out * w1) + jnp.sum(pre * w2)

        return jax.jit(jax.grad(f, argnums=(0, 1)))(variables, x)

    for a, b in zip(jax.jit(ours.apply)(variables, x), jax.jit(theirs)(variables, x), strict=True):
        np.testing.assert_array_equal(a, b)
    (gv_a, gx_a), (gv_b, gx_b) = loss(ours.apply), loss(theirs)
    assert _rel(gx_a, gx_b) < 1e-5
    for name in ("scale", "bias"):
        assert _rel(gv_a["params"][name], gv_b["params"][name]) < 1e-5, name


def test_a_group_norm_refuses_channels_its_groups_do_not_divide():
    with pytest.raises(ValueError, match="do not divide"):
        group_norm.GroupNorm().init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 48)))
