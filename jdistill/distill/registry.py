"""Distillers by name, for configs: every module of `jdistill/distill/` that defines
`DISTILLERS = {name: api.Distiller}` is registered, so a new method needs no edit here.

Also the loss schedule factors the trainer applies to every distiller (warm-up, DeFeat's decay).
"""

import functools
import importlib
import pkgutil

import jax.numpy as jnp

import jdistill.distill as package


@functools.cache
def all_distillers():
    """{name: Distiller} from every module of the package, checked for clashing names."""
    found, owner = {}, {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, distiller in getattr(module, "DISTILLERS", {}).items():
            if name in found:
                raise RuntimeError(
                    f"distiller {name!r} is registered by both {owner[name]} and {info.name}"
                )
            found[name], owner[name] = distiller, info.name
    return found


def get(name):
    """The `Distiller` registered as `name`; a clear error listing the known names."""
    known = all_distillers()
    if name not in known:
        raise KeyError(f"unknown distillation loss {name!r}; registered: {sorted(known)}")
    return known[name]


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
