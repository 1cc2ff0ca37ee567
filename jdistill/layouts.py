"""Where the train state's conv kernels lie in device memory (their physical layout).

A conv kernel is an HWIO array ([k, k, C_in, C_out]) everywhere in this code base, and on the
host and in checkpoints it stays so. On a GPU, cuDNN reads and writes kernels output-channel
major (OHWI, XLA's `o01i`): the kernel gradient arrives in that order. With the parameter and
its momentum stored HWIO, XLA's update of each kernel reads the gradient through a transpose,
cannot update in place, and copies every new kernel and momentum into the output buffers:
0.26 GiB per image of FRS-GFL's bf16 step on an H100, 3 % of it (`scripts/aot_compile.py`).
Stored OHWI in device memory, the update is one in-place pass, and the forward conv reads its
kernel without a transpose.

Only the physical order changes: the arrays keep their HWIO shape and values, `np.asarray`
gives the same numbers, and a program given either order runs (jax lays an argument out as
the program wants). TPU and CPU programs keep XLA's default layouts.
"""

import jax
import jax.numpy as jnp
from jax.experimental.layout import Format, Layout

# HWIO dimensions, from the most to the least significant in memory: O, H, W, I.
KERNEL_MAJOR_TO_MINOR = (3, 0, 1, 2)
_PLATFORMS = ("gpu", "cuda", "rocm")


def wants_kernel_layout(mesh):
    """True where the mesh's devices run convolutions through cuDNN (GPUs)."""
    return mesh.devices.flat[0].platform in _PLATFORMS


def is_kernel(leaf):
    """A floating rank-4 leaf: an HWIO conv kernel, or an optimizer trace shaped like one.

    Every rank-4 floating array in a state or a detector's variables is one (convs are the only
    rank-4 weights of the models and adapters here)."""
    return len(leaf.shape) == 4 and jnp.issubdtype(leaf.dtype, jnp.floating)


def formats(tree, shardings, mesh):
    """The jit argument / result specs of `tree` on `mesh`: for a kernel (`is_kernel`) on a GPU
    mesh, `Format(Layout(KERNEL_MAJOR_TO_MINOR), sharding)`; elsewhere the sharding itself.

    Args:
      tree: pytree of arrays or ShapeDtypeStructs.
      shardings: a matching pytree of shardings.
      mesh: the mesh the program runs on.
    Returns:
      a pytree of `Format` and sharding leaves with `tree`'s structure.
    """
    if not wants_kernel_layout(mesh):
        return shardings

    def one(leaf, sharding):
        if is_kernel(leaf):
            return Format(Layout(KERNEL_MAJOR_TO_MINOR), sharding)
        return sharding

    return jax.tree_util.tree_map(one, tree, shardings)
