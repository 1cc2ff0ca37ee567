"""Distillers and their presets by name, for configs: every module of `jdistill/distill/` that
defines `DISTILLERS = {name: api.Distiller}` is registered, and so is its `PRESETS = {name:
{key: {fn, setting: value, ...}}}` (the published recipes, each block holding only the settings
that differ from its distiller's defaults), so a new method needs no edit here.

`resolve` is the one place a config block meets its distiller's defaults. Also the loss schedule
factors the trainer applies to every distiller (warm-up, DeFeat's decay).
"""

import copy
import functools
import importlib
import pkgutil

import jax.numpy as jnp
import ml_collections

import jdistill.distill as package


def _merge(modules, attr, what):
    """{name: value} of the `attr` dicts of `modules` ([(module name, module)]), refusing a name
    two modules register: configs pick by name, so a clash would silently pick one."""
    found, owner = {}, {}
    for module_name, module in modules:
        for name, value in getattr(module, attr, {}).items():
            if name in found:
                raise RuntimeError(
                    f"{what} {name!r} is registered by both {owner[name]} and {module_name}"
                )
            found[name], owner[name] = value, module_name
    return found


@functools.cache
def _modules():
    """[(name, module)] of every module of the package, in name order."""
    infos = sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name)
    return [(m.name, importlib.import_module(f"{package.__name__}.{m.name}")) for m in infos]


@functools.cache
def all_distillers():
    """{name: Distiller} from every module of the package, checked for clashing names."""
    return _merge(_modules(), "DISTILLERS", "distiller")


@functools.cache
def all_presets():
    """{name: {key: block}} from every module's `PRESETS`, checked for clashing names."""
    return _merge(_modules(), "PRESETS", "preset")


def get(name):
    """The `Distiller` registered as `name`; a clear error listing the known names."""
    known = all_distillers()
    if name not in known:
        raise KeyError(f"unknown distillation loss {name!r}; registered: {sorted(known)}")
    return known[name]


def preset(name, **overrides):
    """A copy of the preset `name`'s loss blocks, {key: {fn, ...}}, for `config_lib.distill`.

    `overrides` are {key: {setting: value}} laid over those blocks, e.g.
    `preset('frs_gfl', frs_feat=dict(weight=0.2))`. Raises KeyError naming the known presets
    for an unknown `name`, and the preset's keys for an override of a key it lacks.
    """
    known = all_presets()
    if name not in known:
        raise KeyError(f"unknown distillation preset {name!r}; known: {sorted(known)}")
    # A copy: configs edit their blocks (runlocal's group_size), which must not reach the table.
    blocks = copy.deepcopy(dict(known[name]))
    for key, settings in overrides.items():
        if key not in blocks:
            raise KeyError(
                f"preset {name!r} has no loss {key!r} to override; it has {sorted(blocks)}"
            )
        blocks[key].update(settings)
    return blocks


def resolve(block):
    """A loss block's settings as its distiller runs them: weight 1, then the distiller's
    `defaults`, then the block (a dict or ConfigDict holding `fn`). Raises KeyError for an
    unregistered `fn`.

    The block is laid over the defaults by ConfigDict's update, so a value of another type than
    its default is refused (an int for a float default becomes a float).
    """
    block = block.to_dict() if isinstance(block, ml_collections.ConfigDict) else dict(block)
    cfg = ml_collections.ConfigDict({"weight": 1.0, **dict(get(block["fn"]).defaults)})
    cfg.update(block)
    return cfg


def warmup_factor(step, warmup_steps):
    """w(step) = min(1, step / warmup_steps), 1 when warmup_steps <= 0. step: int32 scalar."""
    if warmup_steps <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


DECAYS = ("none", "linear", "cos")


def decay_factor(step, total_steps, kind, stages=4):
    """DeFeat's `kd_decay`, made an explicit option: constant per stage e of `stages` equal parts
    of training (the reference's 4 runner epochs): 'linear' 1 - e / E, 'cos' 0.5 cos(pi e / E) +
    0.5, 'none' 1. step: int32 scalar."""
    if kind not in DECAYS:
        raise ValueError(f"distill.decay={kind!r}: use one of {DECAYS}")
    if kind == "none" or not total_steps:
        return jnp.float32(1.0)
    e = jnp.floor(step.astype(jnp.float32) * stages / total_steps)
    if kind == "linear":
        return 1.0 - e / stages
    return 0.5 * jnp.cos(jnp.pi * e / stages) + 0.5
