"""A frozen detector's BatchNorms folded into its convs once, before training, not in every step.

A student folds each BN on running statistics into the conv before it inside the step
(`layers.FrozenBatchNorm`), since its scale and shift train. A teacher never changes, yet its
step would read every float32 kernel and write a scaled bfloat16 copy of it each time: 0.13
GiB per image of FRS-GFL's bf16 step (R101 teacher) on an H100. Folded here once, in the compute
dtype, the step's convs read the teacher's kernels as they are.

The folded variables hold, for each backbone conv and its BN: the conv's `kernel`
(kernel * scale, rounded once to the compute dtype, as `layers.fold_kernel` rounds it in the
step) and the BN's `bias` (the shift); the BN's scale and statistics are gone. Every other
conv kernel is cast to the compute dtype, as the conv would cast it. The module that reads
them is the detector's with `prefolded=True` (`detector`), and computes the same function:
bit for bit where XLA rounds the fold as it does in the step (tests/test_traffic_levers.py).
"""

import copy

import jax

from jdistill import layouts
from jdistill.models import layers, resnet


def variables(tree, dtype):
    """The prefolded {'params', 'batch_stats'} of a detector's (a `fold_bn` one).

    Args:
      tree: {'params', 'batch_stats'}, the detector's variables (arrays or ShapeDtypeStructs
        under `jax.eval_shape`).
      dtype: the detector's compute dtype.
    Returns:
      the variables the `prefolded=True` module reads (see the module docstring).
    """
    params = _copy_dicts(tree["params"])
    stats = _copy_dicts(tree.get("batch_stats", {}))
    backbone_p = params["backbone"]
    backbone_s = stats.get("backbone", {})
    scopes = [(backbone_p, backbone_s)]
    scopes += [(v, backbone_s.get(k, {})) for k, v in backbone_p.items() if k.startswith("layer")]
    for scope_p, scope_s in scopes:
        for conv_name, bn_name in resnet.BN_OF_CONV.items():
            if conv_name not in scope_p or bn_name not in scope_p:
                continue
            bn, st = scope_p[bn_name], scope_s.pop(bn_name)
            mul, shift = layers.frozen_bn_affine(bn["scale"], bn["bias"], st["mean"], st["var"])
            conv = scope_p[conv_name]["conv"]
            conv["kernel"] = layers.fold_kernel(conv["kernel"], mul, dtype)
            scope_p[bn_name] = {"bias": shift}
    params = jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if layouts.is_kernel(x) else x, params
    )
    out = {"params": params}
    stats = _prune(stats)
    if stats:
        out["batch_stats"] = stats
    return out


def detector(det):
    """A shallow copy of a detector whose module reads prefolded variables (`prefolded=True`);
    `det` is unchanged."""
    folded = copy.copy(det)
    folded.module = det.module.clone(prefolded=True)
    return folded


def _copy_dicts(tree):
    """The nested dicts of `tree` copied (its leaves shared), so edits leave `tree` as it was."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    return tree


def _prune(tree):
    """`tree` without its empty dicts (a block whose BNs were all folded keeps no statistics)."""
    if not isinstance(tree, dict):
        return tree
    kept = {k: _prune(v) for k, v in tree.items()}
    return {k: v for k, v in kept.items() if not (isinstance(v, dict) and not v)}
