"""ResNet 18/34/50/101 as mmdetection 2.x `ResNet`: pytorch and caffe style, frozen BN
(norm_eval=True), frozen stages, and a width multiplier for tiny test networks.

The last BN of every block starts at scale 0 (mmdetection's `zero_init_residual=True`), so an
untrained network is a stable near-identity even though its BN statistics are frozen.

Submodule names mirror mmdetection's state_dict: `conv1`, `bn1`, `layer{s}_{b}` blocks with
`conv1..3`, `bn1..3`, `downsample_conv`, `downsample_bn` (`layer1.0.downsample.0` in torch).
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdistill.models import layers

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


# The BatchNorm after each conv of the backbone, by the conv's name (mmdetection's names).
BN_OF_CONV = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "downsample_conv": "downsample_bn"}


def conv_bn(
    x,
    features,
    kernel,
    stride,
    conv_name,
    *,
    dtype,
    bn_train,
    fold,
    prefolded=False,
    zero=False,
):
    """A bias-free conv and its BatchNorm, named as mmdetection names them (`conv_name` and
    `BN_OF_CONV[conv_name]`), called from a module's compact method. With `fold` (and BN on
    running statistics) the BN is folded into the conv (`layers.FrozenBatchNorm`): the same
    function of the same variables, computed as one convolution with a bias. `prefolded`: the
    variables were folded ahead of time (`models/prefold.py`). `zero`: the BN scale starts at
    0 (`zero_init_residual`). x: [N, H, W, C] -> [N, H / stride, W / stride, features]."""
    bn_name = BN_OF_CONV[conv_name]
    scale_init = nn.initializers.zeros if zero else nn.initializers.ones
    conv = layers.Conv(features, kernel, stride, use_bias=False, dtype=dtype, name=conv_name)
    if (fold or prefolded) and not bn_train:
        affine = layers.FrozenBatchNorm(scale_init=scale_init, prefolded=prefolded, name=bn_name)
        return conv(x, affine=affine(features))
    bn = layers.BatchNorm(
        use_running_average=not bn_train, dtype=dtype, scale_init=scale_init, name=bn_name
    )
    return bn(conv(x))


class _Block(nn.Module):
    """What a residual block is given; `block_conv_bn` is its conv + BN under those settings."""

    planes: int
    stride: int
    downsample: bool
    style: str
    dtype: jnp.dtype
    bn_train: bool = False
    fold_bn: bool = False
    prefolded: bool = False


def block_conv_bn(block, x, features, kernel, stride, conv_name, zero=False):
    """`conv_bn` with a block's dtype and BN settings. A function, not a method: a method
    would add its name to every op's name (`layer1_0.cb/conv1/...`) in compiled programs."""
    return conv_bn(
        x,
        features,
        kernel,
        stride,
        conv_name,
        dtype=block.dtype,
        bn_train=block.bn_train,
        fold=block.fold_bn,
        prefolded=block.prefolded,
        zero=zero,
    )


class BasicBlock(_Block):
    expansion = 1

    @nn.compact
    def __call__(self, x):
        cb = functools.partial(block_conv_bn, self)
        out = layers.relu(cb(x, self.planes, 3, self.stride, "conv1"))
        out = cb(out, self.planes, 3, 1, "conv2", zero=True)
        if self.downsample:
            x = cb(x, self.planes, 1, self.stride, "downsample_conv")
        return layers.relu(out + x)


class Bottleneck(_Block):
    expansion = 4

    @nn.compact
    def __call__(self, x):
        cb = functools.partial(block_conv_bn, self)
        # pytorch style strides the 3x3 conv; caffe style the first 1x1 (resnet.py:155).
        s1, s2 = (1, self.stride) if self.style == "pytorch" else (self.stride, 1)
        out = layers.relu(cb(x, self.planes, 1, s1, "conv1"))
        out = layers.relu(cb(out, self.planes, 3, s2, "conv2"))
        out = cb(out, self.planes * 4, 1, 1, "conv3", zero=True)
        if self.downsample:
            x = cb(x, self.planes * 4, 1, self.stride, "downsample_conv")
        return layers.relu(out + x)


class ResNet(nn.Module):
    """ResNet backbone returning C2..C5.

    Attributes:
      depth: 18, 34, 50 or 101.
      style: 'pytorch' or 'caffe' (where the stride-2 sits in a bottleneck).
      frozen_stages: -1 none; 0 the stem; k the stem and layer1..k. Gradients are stopped at
        their output, so they cost no backward pass; the optimizer masks them too.
      width: multiplier of the base width 64 (1.0 is the real network).
      norm_eval: BN always on running statistics (mmdetection's default for detection).
        False trains BN on batch statistics, computed over the global batch (SyncBN), except in
        frozen stages, which mmdetection keeps in eval mode regardless.
      dtype: compute dtype of the convs and of the activations between them (params and BN
        statistics stay float32).
      fold_bn: a BN on running statistics is folded into the conv before it (`conv_bn`): the
        same function of the same variables with less memory traffic (a conv with a bias fuses
        with its ReLU and residual add); BN on batch statistics is never folded.
      prefolded: the variables were folded ahead of time (`models/prefold.py`, a frozen
        teacher's): each conv reads its folded kernel, each BN its shift.
    """

    depth: int = 50
    style: str = "pytorch"
    frozen_stages: int = 1
    width: float = 1.0
    norm_eval: bool = True
    dtype: jnp.dtype = jnp.float32
    fold_bn: bool = False
    prefolded: bool = False

    @classmethod
    def of(cls, detector, **kwargs):
        """The backbone a detector module describes with its own fields of the same names."""
        names = (
            "depth",
            "style",
            "frozen_stages",
            "width",
            "norm_eval",
            "dtype",
            "fold_bn",
            "prefolded",
        )
        return cls(**{n: getattr(detector, n) for n in names}, **kwargs)

    @nn.compact
    def __call__(self, x, train=False):
        """x: [N, H, W, 3] -> dict c2..c5 of [N, ceil(H/s), ceil(W/s), C] for s = 4..32.

        `train` only matters with norm_eval=False: BN then uses batch statistics and updates
        its running averages (apply with mutable=['batch_stats']).
        """
        bn_train = lambda stage: train and not self.norm_eval and stage > self.frozen_stages  # noqa: E731
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet depth {self.depth} not in {sorted(STAGE_BLOCKS)}")
        if self.style not in ("pytorch", "caffe"):
            raise ValueError(f"ResNet style {self.style!r} must be 'pytorch' or 'caffe'")
        block_cls = BasicBlock if self.depth < 50 else Bottleneck
        base = max(1, int(round(64 * self.width)))
        x = conv_bn(
            x,
            base,
            7,
            2,
            "conv1",
            dtype=self.dtype,
            bn_train=bn_train(0),
            fold=self.fold_bn,
            prefolded=self.prefolded,
        )
        x = layers.relu(x)
        x = layers.max_pool_3x3_s2(x)
        if self.frozen_stages >= 0:
            x = jax.lax.stop_gradient(x)
        outs = {}
        in_ch = base
        for s, n_blocks in enumerate(STAGE_BLOCKS[self.depth]):
            planes = base * 2**s
            for b in range(n_blocks):
                stride = (1 if s == 0 else 2) if b == 0 else 1
                down = b == 0 and (stride != 1 or in_ch != planes * block_cls.expansion)
                x = block_cls(
                    planes,
                    stride,
                    down,
                    self.style,
                    self.dtype,
                    bn_train(s + 1),
                    self.fold_bn,
                    self.prefolded,
                    name=f"layer{s + 1}_{b}",
                )(x)
                in_ch = planes * block_cls.expansion
            if s + 1 <= self.frozen_stages:
                x = jax.lax.stop_gradient(x)
            outs[f"c{s + 2}"] = x
        return outs


def out_channels(depth, width=1.0):
    """Channels of C2..C5 for a depth and width multiplier."""
    base = max(1, int(round(64 * width)))
    exp = 1 if depth < 50 else 4
    return tuple(base * 2**s * exp for s in range(4))


def frozen_prefixes(frozen_stages):
    """Top-level param names frozen by `frozen_stages` (mmdetection `_freeze_stages`)."""
    if frozen_stages < 0:
        return ()
    names = ["conv1", "bn1"]
    names += [f"layer{s}_" for s in range(1, frozen_stages + 1)]
    return tuple(names)
