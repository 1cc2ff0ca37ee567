"""Building blocks shared by every model: PyTorch-padded convs, frozen BN, initialisers.

mmdetection pads convs symmetrically (3x3 pad 1, 7x7 pad 3, stride-2 too); XLA's 'SAME' pads
stride-2 convs asymmetrically, so every conv here takes explicit padding (`specs/detectors.md`
§9.4). Parameter names follow mmdetection's state_dict (conv `kernel`/`bias` <-> `weight`/`bias`,
BN `scale`/`bias` + batch_stats `mean`/`var`) so conversion is one table.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdistill.models import group_norm

# mmcv inits: kaiming-normal (fan_out, relu) for backbone convs; xavier-uniform for FPN;
# normal(0, 0.01) for dense heads.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
xavier_uniform = nn.initializers.xavier_uniform()
normal_001 = nn.initializers.normal(0.01)


# Mixed precision (DESIGN.md rule 8): convs and matmuls run in the compute dtype, every param is
# float32 (`param_dtype`), and what a loss or a box op reads is float32. float16 is refused: it
# would need loss scaling, which nothing here does.
COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(name):
    """The compute dtype a model config names (`model.dtype`), refusing any but COMPUTE_DTYPES."""
    dtype = jnp.dtype(name)
    if dtype.name not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype={name!r}: use one of {COMPUTE_DTYPES}")
    return dtype


@jax.custom_jvp
def relu(x):
    """max(x, 0), with its derivative read off the output (1 where it is positive) instead of
    the input, as torch's in-place ReLU does. The backward pass then keeps the output, not the
    pre-activation, so a conv, its bias, a residual add and the ReLU fuse into one kernel that
    writes only the output (XLA keeps a value the backward reads as a kernel's output of its
    own). Values and gradients are `jax.nn.relu`'s, bit for bit: y > 0 exactly where x > 0."""
    return jnp.maximum(x, 0)


@relu.defjvp
def _relu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = relu(x)
    # Behind the barrier XLA cannot rewrite `max(x, 0) > 0` back into `x > 0`, which would keep
    # the pre-activation alive for the backward pass again.
    return y, jnp.where(jax.lax.optimization_barrier(y) > 0, t, jnp.zeros_like(t))


def prior_bias(prior_prob=0.01):
    """Bias of a sigmoid classifier so every class starts at `prior_prob`: -log((1-p)/p)."""
    return nn.initializers.constant(-math.log((1 - prior_prob) / prior_prob))


class Conv(nn.Module):
    """Conv2d with PyTorch's symmetric padding (k // 2 on every side), NHWC.

    With `norm='gn'` it is mmcv's ConvModule(conv -> GroupNorm(32) -> ReLU): the conv has no
    bias (bias='auto') and the norm is named `gn`, as in mmdetection's state_dict. `activate`
    False stops it before the ReLU (mmcv's `activate=False`), for callers that need the
    pre-activation features (CrossKD's tower taps); it changes no parameter. With GroupNorm,
    `keep_pre` returns both (after the ReLU, before it) from one GroupNorm whose backward pass
    recomputes the ReLU's mask (`group_norm.py`).
    """

    features: int
    kernel: int
    stride: int = 1
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = kaiming_fan_out
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    dtype: jnp.dtype = jnp.float32
    norm: str | None = None
    activate: bool = True
    keep_pre: bool = False

    @nn.compact
    def __call__(self, x, affine=None):
        """x: [N, H, W, C_in] -> [N, ceil(H / stride), ceil(W / stride), features].

        `affine`: a (scale, shift) pair of [features] float32 (`FrozenBatchNorm`) that the conv
        folds in: it convolves with kernel * scale and adds shift, which is the conv followed
        by that affine map, in one convolution with a bias (XLA fuses it with a following ReLU
        or residual add into one kernel). Only for a conv without bias or norm. A scale of
        None: the kernel is folded already (`fold_kernel`, a prefolded teacher's).
        """
        p = self.kernel // 2
        if affine is not None:
            if self.use_bias or self.norm is not None:
                raise ValueError("a folded affine replaces the bias and norm of a plain conv")
            scale, shift = affine
            kernel = _Kernel(self.features, self.kernel, self.kernel_init, name="conv")(x.shape[-1])
            if scale is None:
                w = kernel.astype(self.dtype)
            else:
                w = fold_kernel(kernel, scale, self.dtype)
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype),
                w,
                (self.stride, self.stride),
                ((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            return y + shift.astype(self.dtype)
        if self.norm is not None:
            if self.norm != "gn":
                raise ValueError(f"norm={self.norm!r}: only 'gn' is supported in heads")
            # The conv runs in the compute dtype and GroupNorm in float32 on its output, as mmcv
            # runs it under autocast. GroupNorm converts it once, for every use: XLA's default
            # excess precision may skip a rounding on some uses of a value and not on others,
            # and x - mean(x) over one element (P7 is 1 x 1 on the runlocal canvases, one
            # channel per group) once came out +-40 instead of 0 (tests/test_bf16.py). A conv
            # asked for a float32 result from bfloat16 operands runs in float32 on a GPU, both
            # operands converted first: FRS-GFL's 100 GroupNorm convs moved 1.4 GiB per image
            # more that way (scripts/aot_compile.py, README).
            y = nn.Conv(
                self.features,
                (self.kernel, self.kernel),
                strides=(self.stride, self.stride),
                padding=((p, p), (p, p)),
                use_bias=False,
                kernel_init=self.kernel_init,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="conv",
            )(x)
            gn = group_norm.GroupNorm(
                dtype=self.dtype, relu=self.activate, keep_pre=self.keep_pre, name="gn"
            )
            return gn(y)
        return nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="conv",
        )(x)


def fold_kernel(kernel, scale, dtype):
    """kernel [k, k, C_in, C_out] float32 times a per-output-channel scale [C_out], folded in
    float32 and then rounded once to `dtype`."""
    return (kernel * scale).astype(dtype)


class _Kernel(nn.Module):
    """The `kernel` param of `nn.Conv` ([k, k, C_in, features] float32, same name, shape and
    initialiser, so the same random draw), for a conv that transforms its kernel first."""

    features: int
    kernel: int
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, in_features):
        shape = (self.kernel, self.kernel, in_features, self.features)
        return self.param("kernel", self.kernel_init, shape, jnp.float32)


# torch BatchNorm2d: eps 1e-5, running-stat momentum 0.1 (flax counts the other way: 0.9).
# With mmdetection's norm_eval=True (every detector config here) it runs in inference mode on
# its running statistics; its affine params may still train (requires_grad), as configured.
# Callers pass the compute dtype as `dtype`: flax normalises in float32 whatever the input (the
# batch statistics are computed, and the running ones kept, in float32) and only casts the
# result, so a bfloat16 network's activations stay bfloat16 between its convs.
BatchNorm = functools.partial(nn.BatchNorm, epsilon=1e-5, momentum=0.9, param_dtype=jnp.float32)


class FrozenBatchNorm(nn.Module):
    """A BatchNorm on its running statistics, as the per-channel affine map it applies:
    (scale, shift), [features] float32 each, with y = x * scale + shift. Its variables are
    `BatchNorm`'s (params `scale`, `bias`; batch_stats `mean`, `var`; same initialisers), so
    checkpoints and conversions do not know which of the two ran; `Conv(affine=...)` folds the
    pair into the conv before it. Gradients reach `scale` and `bias` through the folded conv as
    they reach them through the BatchNorm (the same function of the same variables).

    `prefolded`: the variables were folded ahead of time (`models/prefold.py`, a frozen
    teacher's): `bias` holds the shift, the conv's kernel the scaled kernel, and the map is
    (None, shift).
    """

    scale_init: nn.initializers.Initializer = nn.initializers.ones
    prefolded: bool = False

    @nn.compact
    def __call__(self, features):
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        if self.prefolded:
            return None, bias
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        return frozen_bn_affine(scale, bias, mean.value, var.value)


def frozen_bn_affine(scale, bias, mean, var):
    """(mul, shift) of a BatchNorm on running statistics, [C] float32 each, as flax's
    BatchNorm computes it: (x - mean) * (rsqrt(var + eps) * scale) + bias = x * mul + shift."""
    mul = jax.lax.rsqrt(var + 1e-5) * scale
    return mul, bias - mean * mul


def max_pool_3x3_s2(x):
    """PyTorch MaxPool2d(3, stride 2, padding 1): pads with -inf. [N,H,W,C] -> ceil halves."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def nearest_resize(x, out_hw):
    """torch `interpolate(mode='nearest')` to `out_hw`: src index = floor(dst * in / out).

    x: [N, H, W, C] -> [N, out_h, out_w, C].
    """
    h, w = x.shape[1:3]
    oh, ow = out_hw
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    iy = (jnp.arange(oh) * h) // oh
    ix = (jnp.arange(ow) * w) // ow
    return x[:, iy][:, :, ix]


def conv_towers(x, *, num_convs, features, norm, dtype, hold=None, start=0):
    """The cls and reg towers of a dense head: `num_convs` 3x3 convs each, ReLU after each.

    Called inside a head's compact `__call__`, so the convs are the head's children
    `cls_convs_{i}` / `reg_convs_{i}` (mmdetection's names). norm: None (conv bias, RetinaNet)
    or 'gn' (ConvModule with GroupNorm, GFL and FCOS).

    Two extras serve CrossKD, which cuts the towers after conv `hold` (counted from 1; 0 is the
    towers' input) and runs the rest of a head on other features:
    - `hold`: also return the features there before their ReLU (with GroupNorm: conv + GN), as
      mmcv's `ConvModule(activate=False)` gives them; at 0 that is `x` itself.
    - `start`: only convs start + 1 .. num_convs run (the earlier ones are neither run nor
      created), on x, which is then what conv `start`'s ReLU gave (the input at 0); x may be a
      (cls, reg) pair, one input per tower.
    The towers compute the same with or without these, and their parameters keep their
    names.

    Args:
      x: [N, H, W, C], or a (cls, reg) pair of them.
    Returns:
      (cls features, reg features), each [N, H, W, features], after the last ReLU; with `hold`
      a third element, the (cls, reg) pre-activation pair at depth `hold`.
    """
    c, r = x if isinstance(x, tuple) else (x, x)
    held = (c, r) if hold == 0 else None
    for i in range(start, num_convs):
        # A GroupNorm conv applies its ReLU itself (its backward pass is cheaper so), and
        # hands the pre-activation out beside it where that is held.
        gn, here = norm is not None, hold == i + 1
        convs = []
        for tower in ("cls", "reg"):
            conv = Conv(
                features,
                3,
                kernel_init=normal_001,
                norm=norm,
                dtype=dtype,
                activate=gn,
                keep_pre=gn and here,
                name=f"{tower}_convs_{i}",
            )
            convs.append(conv)
        c, r = convs[0](c), convs[1](r)
        if gn and here:
            (c, held_c), (r, held_r) = c, r
            held = (held_c, held_r)
        elif here:
            held = (c, r)
        if not gn:
            c, r = relu(c), relu(r)
    return (c, r) if hold is None else (c, r, held)
