"""The levers that cut a step's memory traffic (README, "Before you rent") compute what the
plain network computes.

Folding frozen BN into the conv before it (`model.fold_bn`, `resnet.conv_bn`): equal parameter
trees and initial values, float32 outputs and gradients equal within 1e-5 relative, for every
family, as teacher (everything frozen) and as student (trainable BN affine, frozen stages); BN
on batch statistics is never folded. `layers.relu`, whose backward pass reads its output:
values and gradients bit for bit `jax.nn.relu`'s."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import load_config

from jdistill import experiment
from jdistill.models import detector as detector_lib
from jdistill.models import layers

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
