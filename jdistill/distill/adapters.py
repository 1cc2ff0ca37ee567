"""Student-side adaptation convs: one conv per FPN level mapping student features onto the
teacher's (FRS `adaptation_layers`, DeFeat's neck adapters). Trained with the student, dropped
at inference, never part of an exported student.

Params: {'level_{i}': {'kernel': [k, k, C_s, C_t], 'bias': [C_t]}} for every level i.
Initialised as PyTorch's `nn.Conv2d` default (kaiming-uniform, a = sqrt(5)), which is what the
reference's adaptation convs get; `defeat3x3` has DeFeat's tiny fmod(N(0, 1), 2) * 1e-4 weights
(bias still PyTorch's default).
"""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

# kaiming_uniform(a=sqrt(5)) == uniform(+-sqrt(1 / fan_in)) == variance_scaling(1/3, uniform).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

KERNELS = {"conv3x3": 3, "conv1x1": 1, "defeat3x3": 3}


def _defeat_kernel_init(key, shape, dtype=jnp.float32):
    """DeFeat's adapter weights: fmod(N(0, 1), 2) * 1e-4 (specs/defeat.md §3.1)."""
    return (jnp.fmod(jax.random.normal(key, shape, dtype), 2.0) * 1e-4).astype(dtype)


def torch_bias_init(fan_in):
    """PyTorch's default conv bias init: uniform(+-1 / sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_conv_init(key, shape, kernel_init=torch_kernel_init):
    """{'kernel': shape, 'bias': [shape[-1]]} float32 of a conv (HWIO kernel) or of a 1x1 conv
    as a [C_in, C_out] matrix: `kernel_init` (default PyTorch's nn.Conv2d one) and PyTorch's
    default bias, fan_in = the product of the kernel's leading dimensions."""
    kk, kb = jax.random.split(key)
    fan_in = math.prod(shape[:-1])
    return {
        "kernel": kernel_init(kk, shape, jnp.float32),
        "bias": torch_bias_init(fan_in)(kb, (shape[-1],)),
    }


def conv(x, kernel, bias):
    """SAME, stride-1 conv of x [N, H, W, C_in] with an HWIO kernel, in x's dtype."""
    k = kernel.shape[0]
    pad = k // 2
    y = jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(1, 1),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias.astype(y.dtype)


def init(rng, *, num_levels, in_channels, out_channels, kind):
    """Adapter params for `num_levels` levels.

    Args:
      rng: PRNG key.
      num_levels: levels adapted (5 for P3..P7).
      in_channels: student neck width; out_channels: teacher neck width.
      kind: 'conv3x3' or 'conv1x1'.
    Returns:
      the params dict described in the module docstring.
    """
    if kind not in KERNELS:
        raise ValueError(f"unknown adapter {kind!r}; choose one of {sorted(KERNELS)}")
    k = KERNELS[kind]
    kernel_init = _defeat_kernel_init if kind == "defeat3x3" else torch_kernel_init
    shape = (k, k, in_channels, out_channels)
    return {
        f"level_{i}": torch_conv_init(key, shape, kernel_init)
        for i, key in enumerate(jax.random.split(rng, num_levels))
    }


def apply_level(params, level, x):
    """Applies level `level`'s adapter in x's dtype, the result as float32.

    x: [N, H, W, C_s] student neck features in any float dtype (bfloat16 under mixed
    precision) -> [N, H, W, C_t] float32 (SAME, stride 1). The conv runs in the student's
    compute dtype, as every conv does (rule 8); the loss that compares its output with the
    teacher's features (themselves computed in that dtype) runs in float32. A float32 conv on
    bfloat16 features converted first moved 0.17 GiB per image more in FRS-GFL's bf16 step on
    an H100 (README, "Before you rent").
    """
    p = params[f"level_{level}"]
    return conv(x, p["kernel"], p["bias"]).astype(jnp.float32)
