"""Mesh, shardings and global batch assembly: one `jax.jit` over a `Mesh` (no pmap).

The batch is sharded over the `data` axis; parameters are replicated unless a (regex, axis)
rule in `config.param_sharding` shards a large one (FSDP-style) along its first dimension that
divides evenly. The same code runs on 1 CPU, 8 simulated CPU devices, a GPU box and a TPU pod.
"""

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None):
    """A 1-D mesh over every device (or `devices`), axis `data`."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh):
    """Leading (batch) axis split over `data`."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh):
    return NamedSharding(mesh, P())


def _path_name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shardings(tree, mesh, rules=()):
    """Shardings for a param-like pytree: replicated, or sharded where a rule matches.

    Args:
      tree: pytree of arrays or ShapeDtypeStructs.
      mesh: the mesh.
      rules: sequence of (regex over 'a/b/c' paths, mesh axis name).
    Returns:
      a pytree of NamedSharding with the structure of `tree`.
    """
    compiled = [(re.compile(r), ax) for r, ax in rules]
    n = mesh.shape[DATA_AXIS]

    def one(path, leaf):
        name = _path_name(path)
        for rx, axis in compiled:
            if rx.search(name):
                for d, size in enumerate(leaf.shape):
                    if size % n == 0:
                        spec = [None] * len(leaf.shape)
                        spec[d] = axis
                        return NamedSharding(mesh, P(*spec))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def global_batch(local_batch, mesh):
    """This host's numpy batch -> global jax Arrays sharded over `data`.

    Args:
      local_batch: dict of [B_local, ...] numpy arrays (this host's slice of the global batch).
      mesh: the mesh.
    Returns:
      dict of [B_global, ...] jax.Array.
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
