"""FPN as mmdetection 2.x `FPN` (`specs/detectors.md` §1.3).

Lateral 1x1 convs and 3x3 output convs with bias, no norm, no activation; top-down nearest
upsampling; extra levels by max-pool (k1 s2), or by stride-2 3x3 convs on the input (C5) or on
the output (P5), with an optional ReLU before every extra conv but the first.
Names mirror mmdetection: `lateral_convs_{i}`, `fpn_convs_{i}` (extra convs continue the index).
"""

import jax.numpy as jnp
from flax import linen as nn

from jdistill.models import layers

EXTRA_MODES = (False, "on_input", "on_output")


class FPN(nn.Module):
    """Feature pyramid.

    Attributes:
      out_channels: width of every output level (256 in the real models).
      start_level: first backbone level used (1: C3 for one-stage detectors, 0: C2).
      num_outs: number of outputs (5).
      add_extra_convs: False (max-pool extras), 'on_input' or 'on_output'.
      relu_before_extra_convs: ReLU on the input of every extra conv after the first.
      dtype: compute dtype.
    """

    out_channels: int = 256
    start_level: int = 1
    num_outs: int = 5
    add_extra_convs: bool | str = "on_input"
    relu_before_extra_convs: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, feats):
        """feats: dict c2..c5 [N, H_l, W_l, C_l] -> dict p{start_level+2}.. of [N, H, W, out]."""
        if self.add_extra_convs not in EXTRA_MODES:
            raise ValueError(f"add_extra_convs={self.add_extra_convs!r} not in {EXTRA_MODES}")
        names = [f"c{i + 2}" for i in range(self.start_level, 4)]
        inputs = [feats[n] for n in names]
        conv = lambda f, k, s, name: layers.Conv(  # noqa: E731
            f, k, s, kernel_init=layers.xavier_uniform, dtype=self.dtype, name=name
        )
        lat = [conv(self.out_channels, 1, 1, f"lateral_convs_{i}")(x) for i, x in enumerate(inputs)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + layers.nearest_resize(lat[i], lat[i - 1].shape[1:3])
        outs = [conv(self.out_channels, 3, 1, f"fpn_convs_{i}")(x) for i, x in enumerate(lat)]
        n_used = len(outs)
        for j in range(self.num_outs - n_used):
            if not self.add_extra_convs:
                outs.append(outs[-1][:, ::2, ::2])  # max_pool2d(kernel 1, stride 2)
                continue
            if j == 0:
                src = inputs[-1] if self.add_extra_convs == "on_input" else outs[-1]
            else:
                src = layers.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
            outs.append(conv(self.out_channels, 3, 2, f"fpn_convs_{n_used + j}")(src))
        first = self.start_level + 2
        return {f"p{first + i}": o for i, o in enumerate(outs)}
