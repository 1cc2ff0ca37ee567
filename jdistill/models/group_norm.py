"""GroupNorm(32) and the ReLU after it, with a backward pass that reads each input twice.

mmcv's ConvModule(conv -> GroupNorm -> ReLU) is every tower conv of the GFL and FCOS heads.
Autodiff of flax's GroupNorm and a ReLU gives a backward pass that masks the gradient with the
ReLU's output, writes the masked gradient, and reads it back beside the conv output: three
reads and two writes of an activation-sized array per layer, plus the ReLU output kept for the
mask. Here the backward pass recomputes the mask from the conv output it reads anyway (the
normalised value's sign, rounded to the output dtype as the forward pass rounded it), so it
reads the conv output and the gradient twice (once for the per-channel sums, once for the
input gradient) and writes the input gradient: 0.14 GiB per image less in FRS-GFL's bf16 step
on an H100 (README, "Before you rent").

The forward pass is flax's `nn.GroupNorm` (fast variance, float32 statistics, epsilon 1e-5)
operation for operation; the gradients are its own in closed form:
  xhat = (x - mu) * r,   r = rsqrt(var + eps),   y = xhat * scale + bias,
  g = dL/dy (times relu'(y)),
  dL/dbias = sum g,   dL/dscale = sum g * xhat   (over the batch and the positions),
  dL/dx = r * (g * scale - mean_group(g * scale) - xhat * mean_group(g * scale * xhat)).
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.custom_derivatives import SymbolicZero

EPSILON = 1e-5
NUM_GROUPS = 32


class GroupNorm(nn.Module):
    """GroupNorm(32) over [N, H, W, C], then ReLU when `relu`; params `scale` and `bias` [C]
    float32 as flax's `nn.GroupNorm` names and initialises them. Statistics and the affine map
    are float32; the result is `dtype`.

    x: [N, H, W, C] (the conv's output, in the compute dtype) -> [N, H, W, C] `dtype`; with
    `keep_pre` a pair (that, the GroupNorm output before the ReLU), for a caller that taps the
    pre-activation (CrossKD's towers) and keeps this backward pass.
    """

    dtype: jnp.dtype = jnp.float32
    relu: bool = False
    keep_pre: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        out, pre = group_norm(x, scale, bias, jnp.dtype(self.dtype), self.relu)
        return (out, pre) if self.keep_pre else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x, scale, bias, dtype, relu):
    """GroupNorm(32) of x [N, H, W, C] with scale, bias [C] float32, as `dtype`: (the result
    after a ReLU when `relu`, the result before it)."""
    outputs, _ = _forward(x, scale, bias, dtype, relu)
    return outputs


def _stats(xf):
    """Per image and group: (mean, variance) [N, 1, 1, G, 1] float32 of xf [N, H, W, C], as
    flax computes them (E[x^2] - E[x]^2, clipped at 0)."""
    n, h, w, c = xf.shape
    g = xf.reshape(n, h, w, NUM_GROUPS, c // NUM_GROUPS)
    axes = (1, 2, 4)
    mu = g.mean(axes, keepdims=True)
    mu2 = jnp.square(g).mean(axes, keepdims=True)
    return mu, jnp.maximum(0.0, mu2 - jnp.square(mu))


def _per_channel(v, c):
    """[N, 1, 1, G, 1] -> [N, 1, 1, C] (each group's value on its channels)."""
    return jnp.repeat(v.reshape(v.shape[0], 1, 1, NUM_GROUPS), c // NUM_GROUPS, axis=-1)


def _affine(xf, mean, r, scale, bias):
    """The normalised, scaled and shifted xf, float32, in flax's order of operations."""
    return (xf - mean) * (r * scale) + bias


def _forward(x, scale, bias, dtype, relu):
    c = x.shape[-1]
    if c % NUM_GROUPS:
        raise ValueError(f"GroupNorm({NUM_GROUPS}) of {c} channels: they do not divide")
    xf = x.astype(jnp.float32)
    mu, var = _stats(xf)
    mean = _per_channel(mu, c)
    r = jax.lax.rsqrt(_per_channel(var, c) + EPSILON)
    pre = _affine(xf, mean, r, scale, bias).astype(dtype)
    out = jnp.maximum(pre, 0) if relu else pre
    return (out, pre), (x, mean, r, scale, bias)


def _fwd(x, scale, bias, dtype, relu):
    # symbolic_zeros: the primals come wrapped (`CustomVJPPrimal`).
    return _forward(x.value, scale.value, bias.value, dtype, relu)


def _bwd(dtype, relu, res, cotangents):
    # The barriers keep XLA to two passes over x and the gradients, each recomputing the mask:
    # without them it reads the forward pass's ReLU output for the mask (a third activation
    # read) and writes the masked gradient in the first pass to read it again in the second.
    x, mean, r, scale, bias = jax.lax.optimization_barrier(res)
    n, h, w, c = x.shape
    m = h * w * (c // NUM_GROUPS)

    # An output nothing reads has a symbolic zero cotangent: it is left out rather than
    # passed through the barriers as an array of zeros (which XLA would then have to read).
    cotangents = [None if isinstance(d, SymbolicZero) else d for d in cotangents]

    def grad_xhat(x, d_out, d_pre):
        """(dL/d(GroupNorm output), xhat), float32."""
        xf = x.astype(jnp.float32)
        g = jnp.zeros(x.shape, jnp.float32) if d_out is None else d_out.astype(jnp.float32)
        if relu:
            # The forward pass's ReLU saw the affine value rounded to `dtype`.
            g = jnp.where(_affine(xf, mean, r, scale, bias).astype(dtype) > 0, g, 0.0)
        if d_pre is not None:
            g = g + d_pre.astype(jnp.float32)
        return g, (xf - mean) * r

    # Pass 1: per-image, per-channel sums; the affine gradients and the group means are small
    # arrays built from them.
    g, xhat = grad_xhat(x, *cotangents)
    s1 = g.sum((1, 2))  # [N, C]
    s2 = (g * xhat).sum((1, 2))

    def group_mean(s):  # [N, C] -> [N, 1, 1, C]: the group's mean of (g * scale)(...)
        per_group = (s * scale).reshape(n, NUM_GROUPS, c // NUM_GROUPS).sum(-1) / m
        return jnp.repeat(per_group, c // NUM_GROUPS, axis=-1)[:, None, None, :]

    # Pass 2: the input gradient.
    x, cotangents, s1, s2 = jax.lax.optimization_barrier((x, cotangents, s1, s2))
    g, xhat = grad_xhat(x, *cotangents)
    dx = r * (g * scale - group_mean(s1) - xhat * group_mean(s2))
    return dx.astype(x.dtype), s2.sum(0), s1.sum(0)


group_norm.defvjp(_fwd, _bwd, symbolic_zeros=True)
